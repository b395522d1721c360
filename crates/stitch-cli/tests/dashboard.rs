//! The web dashboard in a real headless Chromium, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`), against a real `stitch
//! serve` child process: builds appear and change status live, a build
//! page streams its log, the Cancel button cancels, a dead letter is
//! replayed, and with API tokens the page asks for one and refuses a wrong
//! one.
//!
//! The browser is `stitch_testkit::browser`'s: without `chromedriver` the
//! tests skip with a notice, unless `STITCH_REQUIRE_BROWSER=1` (CI), where
//! they fail. With
//! `STITCH_UPDATE_SCREENSHOTS=1` they write the README's screenshots to
//! `docs/images/`.

mod support;

use std::path::Path;

use serde_json::{json, Value};
use stitch_testkit::browser::fantoccini::{Client, Locator};
use stitch_testkit::browser::{browser, click_and_wait_for_next_page, open, wait_for};
use stitch_testkit::WAIT;
use support::serve::{Serve, STITCH};

const CONFIG: &str = r#"data_dir = "{data}"
[queues.default]
runner = "fake"
poll = { accepted = "100ms", running = "100ms" }
fake = { accept_delay = "100ms", run_duration = "1500ms" }
[queues.gone]
runner = "fake"
poll = { accepted = "100ms", running = "100ms" }
fake = { accept_delay = "100ms", run_duration = "60s" }
"#;

/// Resolves when `#log` holds more than `n` lines: a MutationObserver in
/// the page answers, nothing polls.
async fn wait_log_lines_over(c: &Client, n: u64) -> u64 {
    let script = r#"
        const [n, done] = arguments;
        const box = document.getElementById('log');
        const count = () => box.querySelectorAll('.line').length;
        if (count() > n) { done(count()); return; }
        new MutationObserver((_, observer) => {
            if (count() > n) { observer.disconnect(); done(count()); }
        }).observe(box, { childList: true, subtree: true });
    "#;
    let got = c.execute_async(script, vec![json!(n)]).await.unwrap();
    got.as_u64().unwrap()
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = if std::env::var("STITCH_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/images")
    } else {
        std::env::temp_dir().join("stitch-dashboard-screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("dashboard-{name}.png")), png).unwrap();
}

/// Whether the page is wider than the window (something would need a
/// sideways scroll).
async fn overflows(c: &Client) -> bool {
    let w = c
        .execute(
            "return document.documentElement.scrollWidth > window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    w.as_bool().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_pages_work_live_in_chromium() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let mut serve = Serve::start(STITCH, CONFIG, &[]).await;
    let http = reqwest::Client::new();

    // A build on a queue that will disappear: after a restart without the
    // queue, its poll message is dead-lettered.
    let orphan = serve
        .create(&http, "gone", "https://example.com/change/orphan")
        .await;
    serve.wait_status(&http, &orphan, "running").await;
    serve.kill();
    let config = std::fs::read_to_string(&serve.config).unwrap();
    let cut = config.find("[queues.gone]").unwrap();
    std::fs::write(&serve.config, &config[..cut]).unwrap();
    serve.restart().await;

    // Builds list: a build triggered through the API appears without a
    // reload and its status changes in place.
    open(c, &format!("{}/builds", serve.base)).await;
    wait_for(c, "table#builds").await;
    let id = serve
        .create(&http, "default", "https://example.com/change/1")
        .await;
    wait_for(c, &format!("tr[data-build='{id}']")).await;
    wait_for(
        c,
        &format!("tr[data-build='{id}'] [data-status='succeeded']"),
    )
    .await;
    let failing = serve
        .create(
            &http,
            "default",
            "https://example.com/change/2?stitch-fake=fail",
        )
        .await;
    wait_for(
        c,
        &format!("tr[data-build='{failing}'] [data-status='failed']"),
    )
    .await;
    screenshot(c, "builds").await;
    // Filters are a plain GET form: the URL is shareable.
    c.find(Locator::Css("#filter-status"))
        .await
        .unwrap()
        .select_by_value("failed")
        .await
        .unwrap();
    click_and_wait_for_next_page(c, "form.filters button[type=submit]").await;
    wait_for(c, &format!("tr[data-build='{failing}']")).await;
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains("status=failed"));
    let statuses = c
        .execute(
            "return [...document.querySelectorAll('#builds tbody [data-status]')].map(e => e.dataset.status)",
            vec![],
        )
        .await
        .unwrap();
    let statuses = statuses.as_array().unwrap();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| s == "failed"),
        "{statuses:?}"
    );

    // A build page streams its log while the build runs.
    let slow = serve
        .create(
            &http,
            "default",
            "https://example.com/change/3?stitch-fake=slow",
        )
        .await;
    open(c, &format!("{}/builds/{slow}", serve.base)).await;
    let first = wait_log_lines_over(c, 0).await;
    let later = wait_log_lines_over(c, first).await;
    assert!(later > first);
    wait_for(c, "#log details[data-step] summary").await;
    wait_for(c, "#timeline [data-status='running']").await;
    screenshot(c, "build").await;

    // Cancel a hanging build with the button.
    let hanging = serve
        .create(
            &http,
            "default",
            "https://example.com/change/4?stitch-fake=hang",
        )
        .await;
    serve.wait_status(&http, &hanging, "running").await;
    open(c, &format!("{}/builds/{hanging}", serve.base)).await;
    let cancel = wait_for(c, "#cancel:not([disabled])").await;
    cancel.click().await.unwrap();
    wait_for(c, "#build-status [data-status='cancelled']").await;
    wait_for(c, "#cancel[disabled]").await;
    assert_eq!(serve.get(&http, &hanging).await["status"], "cancelled");

    // Overview: every queue with live counts and the chart.
    open(c, &format!("{}/", serve.base)).await;
    wait_for(c, "tr[data-queue='default']").await;
    wait_for(c, "svg.chart rect.bar-succeeded").await;
    wait_for(c, "svg.chart rect.bar-failed").await;
    screenshot(c, "overview").await;

    // Dead letters: the orphan's poll message, replayed with the button.
    serve.wait_status(&http, &orphan, "failed").await;
    open(c, &format!("{}/dead-letters", serve.base)).await;
    let replay = wait_for(c, "section[data-topic='signal'] button[data-replay]").await;
    let dlq = replay.attr("data-replay").await.unwrap().unwrap();
    screenshot(c, "dead-letters").await;
    replay.click().await.unwrap();
    wait_for(c, "section[data-topic='signal'] p[role='status']").await;
    let note = c
        .find(Locator::Css(
            "section[data-topic='signal'] p[role='status']",
        ))
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::XPath(&format!(
            "//section[@data-topic='signal']//p[contains(., 'Dead letter {dlq} replayed')]"
        )))
        .await
        .unwrap_or_else(|e| panic!("no replay note: {e}"));
    assert!(note.text().await.unwrap().contains("replayed"));
    assert!(c
        .find(Locator::Css(&format!("tr[data-dead-letter='{dlq}']")))
        .await
        .is_err());

    // Readable at 360 px: nothing forces a sideways scroll.
    c.set_window_size(360, 800).await.unwrap();
    for path in ["/", "/builds", &format!("/builds/{slow}"), "/dead-letters"] {
        open(c, &format!("{}{path}", serve.base)).await;
        wait_for(c, "main h1").await;
        assert!(!overflows(c).await, "{path} is wider than 360 px");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_tokens_the_dashboard_asks_for_one_and_refuses_a_wrong_one() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let token = "dashboard-test-token-0123456789";
    let config = format!("{CONFIG}[api]\ntokens_env = [\"STITCH_API_TOKEN\"]\n");
    let serve = Serve::start(STITCH, &config, &[("STITCH_API_TOKEN", token)]).await;
    let http = reqwest::Client::new();
    let build: Value = http
        .post(format!("{}/v1/queues/default/builds", serve.base))
        .bearer_auth(token)
        .json(&json!({"head": ["https://example.com/change/t"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = build["id"].as_str().unwrap();

    // No token yet: the page asks for one.
    open(c, &format!("{}/builds", serve.base)).await;
    let input = wait_for(c, "form.login input#token").await;
    assert!(c.find(Locator::Css("table#builds")).await.is_err());
    screenshot(c, "login").await;

    // A wrong token is refused, and nothing is shown.
    input.send_keys("not-the-token").await.unwrap();
    c.find(Locator::Css("form.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "#login-error").await;
    assert!(c.find(Locator::Css("table#builds")).await.is_err());

    // The right one: the list, and it stays for the session.
    let input = wait_for(c, "form.login input#token").await;
    input.send_keys(token).await.unwrap();
    c.find(Locator::Css("form.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, &format!("tr[data-build='{id}']")).await;
    open(c, &format!("{}/builds/{id}", serve.base)).await;
    wait_for(c, "#timeline li").await;
    // The token never went into a URL: the server's request log has none.
    assert!(!serve.log().contains(token));
}
