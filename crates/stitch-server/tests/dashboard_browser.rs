//! The dashboard in a real headless Chromium against the API server in
//! this process (no stages run: builds stay `accepted`): the Builds pager
//! goes forward and back, by keyboard too, the Overview's oldest waiting
//! age ticks without a reload, and a page left closes its streams. See
//! `stitch_testkit::browser` for the Chromium it needs.

mod http_support;

use http_support::Server;
use serde_json::Value;
use stitch_testkit::browser::fantoccini::key::Key;
use stitch_testkit::browser::fantoccini::{Client, Locator};
use stitch_testkit::browser::{browser, open, wait_for, wait_for_locator};

/// The ids of the rows the Builds page shows, top to bottom.
async fn rows(c: &Client) -> Vec<String> {
    let ids = c
        .execute(
            "return [...document.querySelectorAll('#builds tbody tr')].map(r => r.dataset.build)",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(ids).unwrap()
}

/// Every page of `/v1/builds?limit=50` over the API, as ids.
async fn api_pages(s: &Server) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/builds?limit=50&cursor={c}"),
            None => "/v1/builds?limit=50".to_string(),
        };
        let page: Value = s.get(&path).send().await.unwrap().json().await.unwrap();
        let ids = page["builds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        pages.push(ids);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return pages,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_builds_pager_goes_forward_twice_and_back_once() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let s = Server::start().await;
    for i in 0..120 {
        s.create_ok("q-noop", &format!("https://example.com/change/{i}"))
            .await;
    }
    let pages = api_pages(&s).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [50, 50, 20]);

    open(c, &s.url("/builds")).await;
    wait_for(c, &format!("tr[data-build='{}']", pages[0][0])).await;
    assert_eq!(rows(c).await, pages[0]);
    assert!(
        c.find(Locator::Css("#prev-page")).await.is_err(),
        "no Previous on the first page"
    );

    // Forward twice.
    for page in &pages[1..] {
        c.find(Locator::Css("#next-page"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(c, &format!("tr[data-build='{}']", page[0])).await;
        assert_eq!(&rows(c).await, page);
    }
    assert!(
        c.find(Locator::Css("#next-page")).await.is_err(),
        "last page"
    );

    // Back once, by keyboard: the link takes focus and Enter follows it.
    let prev = wait_for(c, "a#prev-page[rel='prev']").await;
    c.execute("document.getElementById('prev-page').focus()", vec![])
        .await
        .unwrap();
    prev.send_keys(&Key::Enter.to_string()).await.unwrap();
    wait_for(c, &format!("tr[data-build='{}']", pages[1][0])).await;
    assert_eq!(rows(c).await, pages[1]);

    // The URL is enough to go on back: opened afresh (as shared), its
    // Previous leads to the first page.
    let shared = c.current_url().await.unwrap();
    assert!(shared.as_str().contains("cursor="), "{shared}");
    open(c, shared.as_str()).await;
    wait_for(c, &format!("tr[data-build='{}']", pages[1][0])).await;
    c.find(Locator::Css("#prev-page"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, &format!("tr[data-build='{}']", pages[0][0])).await;
    assert_eq!(rows(c).await, pages[0]);
    assert!(!c.current_url().await.unwrap().as_str().contains("cursor="));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_oldest_waiting_age_ticks_without_a_reload() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let s = Server::start().await;
    // No stage runs here: the build waits (`accepted`) for the whole test,
    // and no event follows that would make the page refetch.
    s.create_ok("default", "https://example.com/change/waiting")
        .await;

    open(c, &s.url("/")).await;
    let age = wait_for(c, "tr[data-queue='default'] [data-age-since]").await;
    let first = age.text().await.unwrap();
    let answered = wait_for(c, "[data-at]").await;
    let at = answered.attr("data-at").await.unwrap();
    assert!(first.ends_with(" s"), "{first}");

    // The text changes on its own: WebDriver waits for it, nothing sleeps.
    let changed = wait_for_locator(
        c,
        Locator::XPath(&format!(
            "//tr[@data-queue='default']//*[@data-age-since][normalize-space(.) != '{first}']"
        )),
    )
    .await;
    let second = changed.text().await.unwrap();
    let seconds = |t: &str| t.trim_end_matches(" s").parse::<u64>().unwrap();
    assert!(seconds(&second) > seconds(&first), "{first} -> {second}");
    // Drawn from the same answer: no reload, no refetch.
    assert_eq!(answered.attr("data-at").await.unwrap(), at);
}

/// The server's open event streams (`stitch_http_streams_active`).
async fn open_event_streams(s: &Server) -> u64 {
    let text = s.metrics_text().await;
    text.lines()
        .find(|l| l.starts_with("stitch_http_streams_active{stream=\"events\""))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_left_closes_its_streams() {
    let Some(browser) = browser().await else {
        return;
    };
    let c = &browser.client;
    let s = Server::start().await;
    let id = s
        .create_ok("default", "https://example.com/change/streams")
        .await;

    // Each of these pages follows /v1/events. Chromium kept the pages it
    // left (and their streams) alive: six of them held every connection a
    // browser opens to one server, and the next page waited 30-50 s for one.
    let build = format!("/builds/{id}");
    for path in ["/", "/builds", &build, "/", "/builds", &build] {
        open(c, &s.url(path)).await;
        wait_for(c, "main h1").await;
    }
    // The build page's timeline is drawn from its event stream: open now.
    wait_for(c, "ol#timeline li[data-seq]").await;
    assert!(open_event_streams(&s).await >= 1);
    // Dead letters follows nothing: every stream open now is a left page's.
    open(c, &s.url("/dead-letters")).await;
    wait_for(c, "main h1").await;

    // The page aborted its streams as it was hidden; the server sees each
    // connection close a moment later, without writing to it. The bound is
    // far above that moment on a loaded machine, and far below how long
    // Chromium kept the streams of the pages it left (20 s and more).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut polls = 0;
    loop {
        let open = open_event_streams(&s).await;
        polls += 1;
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} event streams still open after leaving their pages ({polls} polls)"
        );
        // A metrics scrape is the only view of the server's streams: no
        // event announces one closing, so this polls at a fixed step.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
