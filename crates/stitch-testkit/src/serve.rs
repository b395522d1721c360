//! A real `stitch serve` child process for end-to-end tests of any crate:
//! start it from a config text, kill and restart it, and drive builds
//! through its HTTP API with verbs (create, get, logs_text, cancel,
//! promise, webhook) while waiting on its `/v1/events` stream (never by
//! polling), and read a build's poll loop from its queue (`stitch mq
//! partitions`), re-read on each change in the data directory.
//!
//! Readiness is the line the server prints once its listener is bound
//! (`stitch is serving http://…`), seen in its log file through inotify:
//! from then on connections queue until the server answers them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// A running `stitch serve` with its data directory and config file.
pub struct Serve {
    pub child: Child,
    /// The `stitch` binary this server runs.
    pub bin: PathBuf,
    pub base: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The data directory (`{data}` in the config).
    pub data: PathBuf,
    env: Vec<(String, String)>,
    /// Extra arguments after `serve --config … --listen …`.
    args: Vec<String>,
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

/// What `stitch serve` prints (to stderr) once its listener is bound.
pub const SERVING: &str = "stitch is serving http://";

/// Waits until the `stitch serve` process `pid`, whose stderr goes to the
/// file `log`, printed [`SERVING`]: its listener is bound, so requests from
/// now on are answered. Panics with the log if the process exits first.
pub async fn wait_serving(log: &Path, pid: u32) {
    let pid = i32::try_from(pid).unwrap_or_else(|_| panic!("pid {pid} out of range"));
    let serving = crate::file_text_where(log, |t| t.contains(SERVING));
    tokio::select! {
        biased;
        _ = serving => {}
        () = crate::process_exit(pid) => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("server exited before serving: {text}");
        }
    }
}

/// Starts `bin serve`; stderr goes to `log`, stdout (the log lines) to
/// `log` with the extension `out`.
fn spawn(
    bin: &Path,
    config: &Path,
    port: u16,
    log: &Path,
    env: &[(String, String)],
    args: &[String],
) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env("STITCH_LOG", "warn")
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

impl Serve {
    /// Starts `bin serve` with `config` (`{data}` is replaced by the data
    /// directory) and `env`, and waits until it serves.
    pub async fn start(bin: &str, config: &str, env: &[(&str, &str)]) -> Serve {
        Self::start_on(bin, config, None, env).await
    }

    /// [`Serve::start`] with extra arguments to `serve` (`--log-format json`).
    pub async fn start_with_args(
        bin: &str,
        config: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Serve {
        let s = Self::spawn_with_args(bin, config, None, env, args);
        s.wait_healthy().await;
        s
    }

    /// [`Serve::start`] with `{data}` replaced by `data` when given (several
    /// servers sharing one data directory) instead of a directory of its own.
    pub async fn start_on(
        bin: &str,
        config: &str,
        data: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Serve {
        let s = Self::spawn_on(bin, config, data, env);
        s.wait_healthy().await;
        s
    }

    /// Spawns the server without waiting for it to serve.
    pub fn spawn_on(bin: &str, config: &str, data: Option<&Path>, env: &[(&str, &str)]) -> Serve {
        Self::spawn_with_args(bin, config, data, env, &[])
    }

    /// [`Serve::spawn_on`] with extra arguments to `serve`.
    pub fn spawn_with_args(
        bin: &str,
        config: &str,
        data: Option<&Path>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Serve {
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
        let bin = PathBuf::from(bin);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn(
            &bin,
            &path,
            port,
            &dir.path().join("serve-1.log"),
            &env,
            &args,
        );
        Serve {
            child,
            bin,
            base: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            config: path,
            data,
            env,
            args,
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
        self.child = spawn(
            &self.bin,
            &self.config,
            self.port,
            &log,
            &self.env,
            &self.args,
        );
        self.wait_healthy().await;
    }

    /// Waits until the current process printed [`SERVING`] (its listener is
    /// bound) and answered `/healthz`. Panics with the log if the process
    /// exits first or does not answer within [`crate::WAIT`].
    pub async fn wait_healthy(&self) {
        let log = self.dir.path().join(format!("serve-{}.log", self.starts));
        wait_serving(&log, self.child.id()).await;
        // Bound is not yet answering (storage, stages and add-ons start
        // first): one `/healthz`, which waits in the listen queue until the
        // server answers, is the sync point for "serving".
        let answer = reqwest::Client::new()
            .get(format!("{}/healthz", self.base))
            .timeout(crate::WAIT)
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => {}
            other => panic!("server not healthy: {other:?}\n{}", self.log()),
        }
    }

    /// Whether the server process has exited (a zombie counts).
    fn exited(&self) -> bool {
        let pid = self.child.id();
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => matches!(
                stat.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next()),
                Some("Z" | "X")
            ),
        }
    }

    /// Everything the current process wrote to stdout: its log lines.
    pub fn stdout(&self) -> String {
        let out = self.dir.path().join(format!("serve-{}.out", self.starts));
        std::fs::read_to_string(out).unwrap_or_default()
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

    /// Build `id`'s poll loop (its partition of the `signal` topic) as
    /// `stitch mq partitions --json` lists it from the database: `next_due`,
    /// `due`, `in_flight`, the lease, and the listing's `now` (epoch
    /// milliseconds). `None` while it has no partition.
    pub fn poll_loop(&self, id: &str) -> Option<serde_json::Value> {
        let out = Command::new(&self.bin)
            .args([
                "mq",
                "partitions",
                "--topic",
                "signal",
                "--json",
                "--config",
            ])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stitch mq partitions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // A page holds 100 partitions; these tests keep fewer live builds.
        let mut found = page["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["partition"] == id)
            .cloned()?;
        found["now"] = page["now"].clone();
        Some(found)
    }

    /// Waits until build `id`'s poll loop rests: no poll in flight and its
    /// message held until at least `held` from now. A wake makes a held
    /// message due at once and marks an in-flight one so that its hold is
    /// due at once (ADR 0012), so a resting loop has no wake pending: until
    /// something wakes it or the hold runs out, [`Serve::poll_loop`] lists
    /// it unchanged. Returns that listing. Re-checked after each change in
    /// the data directory (every queue write lands there).
    pub async fn wait_poll_loop_resting(&self, id: &str, held: Duration) -> serde_json::Value {
        let what = format!("the poll loop of {id} resting");
        let held = i64::try_from(held.as_millis()).unwrap_or(i64::MAX);
        crate::dir_change(&[&self.data], &what, || {
            let resting = self.poll_loop(id).filter(|p| {
                let (due, now) = (p["next_due"].as_i64(), p["now"].as_i64());
                p["in_flight"] == 0
                    && due
                        .zip(now)
                        .is_some_and(|(due, now)| due >= now.saturating_add(held))
            });
            std::future::ready(resting)
        })
        .await
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

    /// `GET /v1/builds/{id}/logs` read to its end: a terminal build's log
    /// lines as SSE frames (the stream ends with the build). Panics on an
    /// answer other than 200.
    pub async fn logs_text(&self, http: &reqwest::Client, id: &str) -> String {
        let r = http
            .get(format!("{}/v1/builds/{id}/logs", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "logs of {id}: {text}");
        text
    }

    /// `POST /v1/builds/{id}/cancel`; returns the HTTP status (202 when
    /// the cancel was requested).
    pub async fn cancel(&self, http: &reqwest::Client, id: &str) -> u16 {
        http.post(format!("{}/v1/builds/{id}/cancel", self.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `POST /v1/builds/{id}/promise-failure` with the job token `token`
    /// and `body`; returns the HTTP status and the answer's body.
    pub async fn promise(
        &self,
        http: &reqwest::Client,
        id: &str,
        token: &str,
        body: serde_json::Value,
    ) -> (u16, String) {
        let r = http
            .post(format!("{}/v1/builds/{id}/promise-failure", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Delivers a provider's webhook: `POST /webhooks/{provider}` with
    /// `headers` and the raw `body` (signatures are over the exact bytes).
    pub async fn webhook(
        &self,
        http: &reqwest::Client,
        provider: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut r = http.post(format!("{}/webhooks/{provider}", self.base));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(body).send().await.unwrap()
    }

    /// Waits until an event satisfies `wanted` (the stream is read from the
    /// start); returns that event. Panics with the log after `within`.
    pub async fn wait_for_event(
        &self,
        http: &reqwest::Client,
        within: Duration,
        mut wanted: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        let seen = self
            .follow_events(http, within, |_, event| {
                let hit = !event.is_null() && wanted(event);
                if hit {
                    found = Some(event.clone());
                }
                hit
            })
            .await;
        match (seen, found) {
            (Some(_), Some(event)) => event,
            _ => panic!("no such event within {within:?}\n{}", self.log()),
        }
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
                    assert!(!self.exited(), "server exited: {}", self.log());
                    // Bound but not answering yet: the request is retried.
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
                // The stream ended (a storage error on the server's side):
                // resume after the last event read.
                assert!(!self.exited(), "server exited: {}", self.log());
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
