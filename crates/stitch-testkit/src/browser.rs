//! Headless Chromium over WebDriver (Debian's `chromium` and
//! `chromium-driver`) for the dashboard's browser tests: stitch-server's
//! `dashboard_browser.rs` (the API server in its process) and stitch-cli's
//! `dashboard.rs` (a whole `stitch serve`). Behind the `browser` feature, so
//! only the crates with browser tests build the WebDriver client.
//!
//! Without `chromedriver` on `PATH`, [`browser`] answers `None` and the test
//! skips with a notice, unless `STITCH_REQUIRE_BROWSER=1` (CI), where it
//! fails.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The WebDriver client, for the tests' own page steps (one version, here).
pub use fantoccini;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::WAIT;

/// A chromedriver child and a WebDriver session in headless Chromium; the
/// driver's whole process group is killed when this is dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver leads its own process group, and the Chromium it
        // starts (browser, renderers, GPU and network helpers) stays in it:
        // killing chromedriver alone left them all running after every test.
        // A test that panics never reaches a session close, so Drop ends
        // the group rather than asking WebDriver to quit.
        let group = rustix::process::Pid::from_child(&self.driver);
        if rustix::process::kill_process_group(group, rustix::process::Signal::KILL).is_err() {
            let _ = self.driver.kill();
        }
        let _ = self.driver.wait();
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Starts chromedriver and a headless Chromium session, or `None` (with a
/// notice) when chromedriver is not installed and the browser is not
/// required.
pub async fn browser() -> Option<Browser> {
    let Some(chromedriver) = find_program("chromedriver") else {
        if std::env::var("STITCH_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!(
                "STITCH_REQUIRE_BROWSER=1 but chromedriver is not on PATH \
                 (apt-get install -y chromium chromium-driver)"
            );
        }
        eprintln!(
            "skipping: chromedriver is not installed (apt-get install -y chromium chromium-driver)"
        );
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port for chromedriver");
    let mut driver = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        // Its own process group, so Drop can end Chromium with it.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    // Ready when it says so on stdout: no polling of its port.
    let stdout = driver.stdout.take().expect("chromedriver stdout");
    let ready = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let ok = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("started successfully"));
        // Keep draining so chromedriver never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        ok
    });
    let started = tokio::time::timeout(WAIT, ready)
        .await
        .expect("chromedriver did not start in time")
        .expect("reading chromedriver's output");
    assert!(started, "chromedriver exited without starting");
    let mut options = json!({
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--force-prefers-reduced-motion"]
    });
    if let Some(chromium) = find_program("chromium") {
        options["binary"] = json!(chromium);
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), options);
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("WebDriver session in headless Chromium");
    Some(Browser { client, driver })
}

/// Waits (WebDriver's own wait, no sleeps) for an element the locator
/// finds; after [`WAIT`], fails with the page's text.
pub async fn wait_for_locator(c: &Client, what: Locator<'_>) -> Element {
    match c.wait().at_most(WAIT).for_element(what).await {
        Ok(e) => e,
        Err(e) => {
            let body = c
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("{what:?} did not appear: {e}\npage text: {body}");
        }
    }
}

/// [`wait_for_locator`] with a CSS selector.
pub async fn wait_for(c: &Client, css: &str) -> Element {
    wait_for_locator(c, Locator::Css(css)).await
}

/// Clicks `css` (a submit button or a link) and waits until the page it
/// leads to has drawn itself. The page being left is marked first: its own
/// `body[data-ready]` (and any element also on the next page) would
/// otherwise satisfy a wait before the browser has even navigated.
pub async fn click_and_wait_for_next_page(c: &Client, css: &str) {
    c.execute("document.body.setAttribute('data-left', '')", vec![])
        .await
        .unwrap_or_else(|e| panic!("marking the page before clicking {css}: {e}"));
    wait_for(c, css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    wait_for(c, "body[data-ready]:not([data-left])").await;
}

/// Opens `url` and waits until the page has drawn itself (`body[data-ready]`).
pub async fn open(c: &Client, url: &str) {
    c.goto(url)
        .await
        .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    wait_for(c, "body[data-ready]").await;
}
