//! A real `stitch serve` child process for end-to-end tests against the
//! fake providers: start it from a config text, restart it (after a
//! SIGKILL), and drive builds through its HTTP API.

#![allow(dead_code)] // each test file uses its own part of the helpers

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `stitch serve` with its data directory and config file.
pub struct Serve {
    pub child: Child,
    pub base: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    starts: usize,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn spawn(config: &Path, port: u16, log: &Path, env: &[(String, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stitch"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("STITCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

impl Serve {
    /// Starts `stitch serve` with `config` (`{data}` is replaced by the
    /// data directory) and `env`, and waits until it is healthy.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Serve {
        Self::start_on(config, None, env).await
    }

    /// [`Serve::start`] with `{data}` replaced by `data` when given (several
    /// servers sharing one data directory) instead of a directory of its own.
    pub async fn start_on(config: &str, data: Option<&Path>, env: &[(&str, &str)]) -> Serve {
        let s = Self::spawn_on(config, data, env);
        s.wait_healthy().await;
        s
    }

    /// Spawns the server without waiting for it to be healthy.
    pub fn spawn_on(config: &str, data: Option<&Path>, env: &[(&str, &str)]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stitch.toml");
        let data = data
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        std::fs::write(&path, config.replace("{data}", &data.display().to_string())).unwrap();
        let port = free_port();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = spawn(&path, port, &dir.path().join("serve-1.log"), &env);
        Serve {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            config: path,
            env,
            starts: 1,
        }
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts it again on the same port, config and data.
    pub async fn restart(&mut self) {
        self.starts += 1;
        let log = self.dir.path().join(format!("serve-{}.log", self.starts));
        self.child = spawn(&self.config, self.port, &log, &self.env);
        self.wait_healthy().await;
    }

    pub async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not come up: {}", self.log());
    }

    /// The tails of the server's logs.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let text = std::fs::read_to_string(self.dir.path().join(format!("serve-{n}.log")))
                .unwrap_or_default();
            let tail: Vec<char> = text.chars().rev().take(3000).collect();
            out.extend(tail.into_iter().rev());
        }
        out
    }

    /// Creates a build on `queue`; returns its id.
    pub async fn create(&self, http: &reqwest::Client, queue: &str, head: &str) -> String {
        let r = http
            .post(format!("{}/v1/queues/{queue}/builds", self.base))
            .json(&serde_json::json!({"head": [head]}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            202,
            "{}",
            r.text().await.unwrap_or_default()
        );
        let v: serde_json::Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// `GET /v1/builds/{id}`.
    pub async fn get(&self, http: &reqwest::Client, id: &str) -> serde_json::Value {
        http.get(format!("{}/v1/builds/{id}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until an event says `id` has `status` (the stream is read from
    /// the start, so a status already passed counts).
    pub async fn wait_status(&self, http: &reqwest::Client, id: &str, status: &str) {
        let seen = self
            .follow_events(http, Duration::from_secs(30), |_, event| {
                event["build_id"] == id && event["status"] == status
            })
            .await;
        if seen.is_none() {
            let now = self.get(http, id).await;
            panic!("{id} never {status}: {now:#?}\n{}", self.log());
        }
    }

    /// Waits until every build is terminal; returns `status` per build.
    pub async fn wait_all_terminal(
        &self,
        http: &reqwest::Client,
        ids: &[String],
        within: Duration,
    ) -> BTreeMap<String, String> {
        let terminal = |s: &str| matches!(s, "succeeded" | "failed" | "cancelled");
        let all_done = |latest: &BTreeMap<String, String>| {
            ids.iter()
                .all(|id| latest.get(id).is_some_and(|s| terminal(s)))
        };
        match self
            .follow_events(http, within, |latest, _| all_done(latest))
            .await
        {
            Some(latest) => ids
                .iter()
                .map(|id| (id.clone(), latest[id].clone()))
                .collect(),
            None => {
                let mut stuck = Vec::new();
                for id in ids {
                    let v = self.get(http, id).await;
                    if !terminal(v["status"].as_str().unwrap_or_default()) {
                        stuck.push(v);
                    }
                }
                panic!(
                    "{}/{} terminal within {within:?}; first stuck: {:#?}\n{}",
                    ids.len() - stuck.len(),
                    ids.len(),
                    stuck.first(),
                    self.log()
                );
            }
        }
    }

    /// Follows `/v1/events` from the first event, keeping each build's
    /// latest status, until `done(latest, event)` holds after an event;
    /// returns the latest statuses then, or `None` after `within`. A
    /// connection that ends (the server was restarted) is resumed after the
    /// last event read, so nothing is missed or read twice.
    pub async fn follow_events(
        &self,
        http: &reqwest::Client,
        within: Duration,
        mut done: impl FnMut(&BTreeMap<String, String>, &serde_json::Value) -> bool,
    ) -> Option<BTreeMap<String, String>> {
        use futures::StreamExt;
        let mut latest: BTreeMap<String, String> = BTreeMap::new();
        if done(&latest, &serde_json::Value::Null) {
            return Some(latest);
        }
        let mut after = 0u64;
        let follow = async {
            loop {
                let url = format!("{}/v1/events?after={after}", self.base);
                let answer = http
                    .get(url)
                    .header("accept", "text/event-stream")
                    .send()
                    .await;
                let Ok(answer) = answer else {
                    // The server is restarting: resume once it answers.
                    self.wait_healthy().await;
                    continue;
                };
                assert!(answer.status().is_success(), "events: {}", answer.status());
                let mut body = answer.bytes_stream();
                let mut buf: Vec<u8> = Vec::new();
                while let Some(Ok(chunk)) = body.next().await {
                    buf.extend_from_slice(&chunk);
                    for event in take_sse_events(&mut buf) {
                        after = event["seq"].as_u64().unwrap_or(after);
                        if let (Some(id), Some(status)) =
                            (event["build_id"].as_str(), event["status"].as_str())
                        {
                            latest.insert(id.to_string(), status.to_string());
                        }
                        if done(&latest, &event) {
                            return;
                        }
                    }
                }
                self.wait_healthy().await;
            }
        };
        tokio::time::timeout(within, follow).await.ok()?;
        Some(latest)
    }
}

/// Drains the complete SSE frames at the front of `buf` (bytes as they
/// arrive, frames ending in a blank line) and returns their `data:` lines
/// parsed as JSON; an incomplete last frame stays in `buf`.
pub fn take_sse_events(buf: &mut Vec<u8>) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let frame: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&frame);
        for data in text.lines().filter_map(|l| l.strip_prefix("data:")) {
            if let Ok(event) = serde_json::from_str(data.trim()) {
                events.push(event);
            }
        }
    }
    events
}
