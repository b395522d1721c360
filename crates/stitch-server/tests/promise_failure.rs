//! `POST /v1/builds/{id}/promise-failure` on a real server (HTTP on
//! loopback, stages running, SQLite file, local runner with real child
//! processes): every answer of the endpoint, bad input changing nothing,
//! `fail_fast` failing the build at once and killing its process, a broken
//! promise, and the job environment a triggered command receives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use stitch_core::{BuildId, BuildStatus};
use stitch_server::config::{Config, LocalSection, PollConfig, QueueConfig, RunnerSection};
use stitch_server::http;
use stitch_server::stages;
use stitch_server::state::AppState;
use stitch_store::{EventKind, NewBuild};
use stitch_testkit::watch_until;
use tokio_util::sync::CancellationToken;

const API_TOKEN: &str = "api-token-for-tests";

struct Harness {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    state: AppState,
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn local(command: &str, fail_fast: bool) -> QueueConfig {
    QueueConfig {
        fail_fast,
        concurrency: Some(8),
        poll: PollConfig {
            accepted: Duration::from_millis(100),
            running: Duration::from_millis(200),
        },
        runner: RunnerSection::Local(LocalSection {
            command: command.to_string(),
            workdir: Some(".".into()),
            cancel_grace: Duration::from_secs(5),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            user: None,
            group: None,
        }),
        ..QueueConfig::default()
    }
}

/// Queues: `hold` (runs until `<dir>/release-<build id>` exists, then
/// exits 0), `fast` (fail_fast; writes its pid, then sleeps), `quick`.
async fn harness(api_tokens: bool) -> Harness {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut queues = BTreeMap::new();
    let hold = format!(
        "while [ ! -f {d}/release-$STITCH_BUILD_ID ]; do sleep 0.05; done",
        d = dir.display()
    );
    queues.insert("hold".to_string(), local(&hold, false));
    let fast = format!(
        "echo $$ > {d}/pid-$STITCH_BUILD_ID.tmp; mv {d}/pid-$STITCH_BUILD_ID.tmp {d}/pid-$STITCH_BUILD_ID; sleep 60",
        d = dir.display()
    );
    // Polled once a minute: the fail-fast test finishes long before a
    // poll would come on its own, so only the promise's wake can do it.
    let mut fast = local(&fast, true);
    fast.poll.running = Duration::from_secs(60);
    queues.insert("fast".to_string(), fast);
    queues.insert("quick".to_string(), local("true", false));
    let config = Config {
        data_dir: dir.join("data"),
        queues,
        ..Config::default()
    };
    let state = AppState::open(config).await.unwrap();
    let stop = CancellationToken::new();
    stages::start(&state, stop.clone());
    let tokens = if api_tokens {
        vec![API_TOKEN.to_string()]
    } else {
        Vec::new()
    };
    let router = http::router(state.clone(), tokens);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    state.set_bound_addr(addr);
    let served = stop.clone();
    tokio::spawn(http::serve(listener, router, async move {
        served.cancelled().await
    }));
    Harness {
        _tmp: tmp,
        dir,
        state,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        stop,
    }
}

impl Harness {
    async fn create(&self, queue: &str) -> BuildId {
        let (b, _) = stitch_server::service::create_build(
            &self.state,
            queue,
            stitch_server::service::CreateBuild {
                head: vec!["https://forge/c/1".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        b.id
    }

    /// Waits until the trigger stage handed the build to its runner and the
    /// signal stage saw it run. Recording the ref commits no event; the
    /// signal stage's first poll, published with the ref, records the
    /// status the runner reports, which does.
    async fn triggered(&self, id: &BuildId) {
        self.until(id, |b| {
            b.job_token_hash.is_some() && b.runner_ref.is_some() && b.status == BuildStatus::Running
        })
        .await;
    }

    /// Waits until the build satisfies `ok`, re-reading it after every
    /// event this process commits (each change of status is one).
    async fn until(
        &self,
        id: &BuildId,
        ok: impl Fn(&stitch_store::Build) -> bool,
    ) -> stitch_store::Build {
        let (mut commits, ok) = (self.state.event_seq(), &ok);
        watch_until(
            &mut commits,
            &format!("build {id} as wanted"),
            move || async move {
                let b = self.state.store().get_build(id).await.unwrap();
                ok(&b).then_some(b)
            },
        )
        .await
    }

    fn token(&self, id: &BuildId) -> String {
        self.state.job_tokens().token_for(id)
    }

    async fn promise(&self, id: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/builds/{id}/promise-failure", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn failing_events(&self, id: &BuildId) -> usize {
        self.state
            .store()
            .events_for_build(id)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == EventKind::Failing)
            .count()
    }

    fn release(&self, id: &BuildId) {
        std::fs::write(self.dir.join(format!("release-{id}")), "").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_every_case_and_bad_input_changes_nothing() {
    let h = harness(false).await;
    let a = h.create("hold").await;
    let b = h.create("hold").await;
    // Running and polled: no status event can land during the checks below.
    for id in [&a, &b] {
        h.until(id, |b| b.status == BuildStatus::Running).await;
    }
    let (ta, tb) = (h.token(&a), h.token(&b));
    let seq_before = h.state.store().latest_seq().await.unwrap();
    let record_before = h.state.store().get_build(&a).await.unwrap().runner_metadata;

    let bad: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (None, json!({"exit_status": 1}), 401, "unauthorized"),
        (
            Some(tb.as_str()),
            json!({"exit_status": 1}),
            403,
            "forbidden",
        ),
        (
            Some("stj_0000"),
            json!({"exit_status": 1}),
            403,
            "forbidden",
        ),
        (
            Some(ta.as_str()),
            json!({"exit_status": 0}),
            400,
            "invalid_request",
        ),
        (
            Some(ta.as_str()),
            json!({"exit_status": -3}),
            400,
            "invalid_request",
        ),
        (
            Some(ta.as_str()),
            json!({"exit_status": 1.5}),
            400,
            "invalid_request",
        ),
        (
            Some(ta.as_str()),
            json!({"exit_status": "2"}),
            400,
            "invalid_request",
        ),
        (
            Some(ta.as_str()),
            json!({"exit_status": 4294967296u64}),
            400,
            "invalid_request",
        ),
        (Some(ta.as_str()), json!({}), 400, "invalid_request"),
        (
            Some(ta.as_str()),
            json!({"exit_status": 1, "extra": 1}),
            400,
            "invalid_request",
        ),
        (
            Some(ta.as_str()),
            json!({"exit_status": 1, "reason": "x".repeat(5000)}),
            400,
            "invalid_request",
        ),
    ];
    for (token, body, status, code) in bad {
        let (got, answer) = h.promise(a.as_str(), token, body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    // Not JSON at all, and a non-bearer scheme.
    let resp = h
        .http
        .post(format!("{}/v1/builds/{a}/promise-failure", h.base))
        .bearer_auth(&ta)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = h
        .http
        .post(format!("{}/v1/builds/{a}/promise-failure", h.base))
        .header("authorization", format!("Token {ta}"))
        .json(&json!({"exit_status": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Unknown and impossible build ids.
    let unknown = BuildId::new();
    let (got, answer) = h
        .promise(
            unknown.as_str(),
            Some(&h.token(&unknown)),
            json!({"exit_status": 1}),
        )
        .await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (404, Some("build_not_found"))
    );
    let (got, _) = h
        .promise("b_nope", Some(&ta), json!({"exit_status": 1}))
        .await;
    assert_eq!(got, 404);
    assert_eq!(
        h.state.store().latest_seq().await.unwrap(),
        seq_before,
        "no event"
    );
    assert_eq!(
        h.state.store().get_build(&a).await.unwrap().runner_metadata,
        record_before
    );

    // Declared, then idempotent, then a different status conflicts.
    let (got, _) = h
        .promise(
            a.as_str(),
            Some(&ta),
            json!({"exit_status": 3, "reason": "test_login failed"}),
        )
        .await;
    assert_eq!(got, 204);
    let (got, _) = h
        .promise(a.as_str(), Some(&ta), json!({"exit_status": 3}))
        .await;
    assert_eq!(got, 204);
    let (got, answer) = h
        .promise(a.as_str(), Some(&ta), json!({"exit_status": 4}))
        .await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (409, Some("different_exit_status_promised"))
    );
    assert_eq!(h.failing_events(&a).await, 1);
    let record: Value = h
        .http
        .get(format!("{}/v1/builds/{a}", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["metadata"]["promised_exit_status"], "3");
    assert_eq!(
        record["metadata"]["promised_exit_status_reason"],
        "test_login failed"
    );
    assert!(record["metadata"]["promised_exit_status_at"].is_string());
    assert_ne!(
        record["status"], "failed",
        "without fail_fast the build keeps running"
    );

    // Terminal: 422. Not yet triggered: 422.
    h.release(&b);
    h.until(&b, |b| b.status.is_terminal()).await;
    let (got, answer) = h
        .promise(b.as_str(), Some(&tb), json!({"exit_status": 1}))
        .await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (422, Some("build_not_running"))
    );
    let never = NewBuild {
        id: BuildId::new(),
        queue: "hold".into(),
        runner: "local".into(),
        base: vec![],
        head: vec!["c".into()],
        metadata: Default::default(),
        idempotency_key: None,
        job_token_hash: None,
    };
    let never_id = never.id.clone();
    h.state.store().create_build(never).await.unwrap();
    let (got, answer) = h
        .promise(
            never_id.as_str(),
            Some(&h.token(&never_id)),
            json!({"exit_status": 1}),
        )
        .await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (422, Some("build_not_started"))
    );
    h.release(&a);
}

/// Credentials before work: without a token the answer is 401 whatever the
/// body is, and a wrong token is refused while another writer holds the
/// store's write lock: refusing it took no write transaction (the handler
/// used to open one, with the lock, before checking the token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_token_is_checked_before_the_body_and_without_the_write_lock() {
    let h = harness(false).await;
    let a = h.create("hold").await;
    h.triggered(&a).await;
    let url = format!("{}/v1/builds/{a}/promise-failure", h.base);
    // A deadline instead of hanging forever if a request does wait for the lock.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let no_token = [
        client
            .post(&url)
            .header("content-type", "application/json")
            .body("{nope"),
        client.post(&url).body("not json, no content type"),
        client
            .post(&url)
            .json(&json!({"exit_status": 0, "extra": true})),
    ];
    for req in no_token {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "unauthorized");
    }

    let held = h.state.store().begin().await.unwrap();
    let another = h.token(&BuildId::new());
    let refused = [
        (Some(another.as_str()), json!({"exit_status": 1}), 403),
        (Some("stj_0000"), json!({"exit_status": 1}), 403),
        (Some(another.as_str()), json!({"exit_status": 0}), 403),
        (None, json!({"exit_status": 1}), 401),
    ];
    for (token, body, status) in refused {
        let mut req = client.post(&url).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .expect("a refused request is answered while the store's writer is held");
        assert_eq!(resp.status(), status, "{token:?} {body}");
    }
    drop(held);
    let (got, _) = h
        .promise(a.as_str(), Some(&h.token(&a)), json!({"exit_status": 1}))
        .await;
    assert_eq!(got, 204);
    assert_eq!(h.failing_events(&a).await, 1);
    h.release(&a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_token_is_the_only_credential_even_with_api_tokens() {
    let h = harness(true).await;
    let a = h.create("hold").await;
    h.triggered(&a).await;
    let (got, _) = h
        .promise(a.as_str(), Some(API_TOKEN), json!({"exit_status": 2}))
        .await;
    assert_eq!(
        got, 403,
        "the API token does not stand in for the job token"
    );
    let (got, _) = h
        .promise(a.as_str(), Some(&h.token(&a)), json!({"exit_status": 2}))
        .await;
    assert_eq!(got, 204, "no API token needed");
    // Other routes still need the API token.
    let resp = h
        .http
        .get(format!("{}/v1/builds/{a}", h.base))
        .bearer_auth(h.token(&a))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    h.release(&a);
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next()),
            Some("Z" | "X")
        ),
    }
}

async fn read_pid(path: &Path) -> i32 {
    // Renamed into place by the command, complete with its newline.
    stitch_testkit::file_text(path)
        .await
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_fails_the_build_at_once_and_kills_its_process() {
    let h = harness(false).await;
    let id = h.create("fast").await;
    h.triggered(&id).await;
    let pid = read_pid(&h.dir.join(format!("pid-{id}"))).await;
    assert!(alive(pid));
    let (got, _) = h
        .promise(id.as_str(), Some(&h.token(&id)), json!({"exit_status": 3}))
        .await;
    assert_eq!(got, 204);
    // The request recorded the promise and woke the build; the signal
    // stage, the one writer of status, fails it and cancels at the runner.
    // The queue is polled every 60 s (see `harness`): only the wake makes
    // this happen within `until`'s 20 s.
    let b = h.until(&id, |b| b.status.is_terminal()).await;
    assert_eq!(b.status, BuildStatus::Failed);
    assert_eq!(b.failure_reason.as_deref(), Some("promised exit status 3"));
    assert!(
        !b.cancel_requested,
        "no cancel intent: the stage cancels itself"
    );
    let kinds: Vec<(EventKind, BuildStatus)> = h
        .state
        .store()
        .events_for_build(&id)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.kind, e.status))
        .collect();
    // The `failing` event, then the `failed` status event.
    let n = kinds.len();
    assert_eq!(kinds[n - 2].0, EventKind::Failing);
    assert!(!kinds[n - 2].1.is_terminal());
    assert_eq!(kinds[n - 1], (EventKind::Status, BuildStatus::Failed));
    // The signal stage cancels at the runner: the process group is killed.
    // Bounded: a process that survives fail_fast fails the wait.
    stitch_testkit::process_exit(pid).await;
    // Declaring again is idempotent even though the build is terminal now.
    let (got, _) = h
        .promise(id.as_str(), Some(&h.token(&id)), json!({"exit_status": 3}))
        .await;
    assert_eq!(got, 204);
    let (got, _) = h
        .promise(id.as_str(), Some(&h.token(&id)), json!({"exit_status": 9}))
        .await;
    assert_eq!(got, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promised_failure_is_binding_when_the_job_then_succeeds() {
    let h = harness(false).await;
    let id = h.create("hold").await;
    h.triggered(&id).await;
    let (got, _) = h
        .promise(id.as_str(), Some(&h.token(&id)), json!({"exit_status": 2}))
        .await;
    assert_eq!(got, 204);
    h.release(&id);
    let b = h.until(&id, |b| b.status.is_terminal()).await;
    assert_eq!(b.status, BuildStatus::Failed);
    assert!(b.failure_reason.unwrap().contains("promised exit status 2"),);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_hands_the_job_its_token_server_and_build_id() {
    let h = harness(false).await;
    let id = h.create("quick").await;
    let b = h.until(&id, |b| b.status.is_terminal()).await;
    assert_eq!(b.status, BuildStatus::Succeeded);
    let state_file = h
        .dir
        .join("data/local/quick")
        .join(id.as_str())
        .join("state.json");
    let state: Value = serde_json::from_slice(&std::fs::read(state_file).unwrap()).unwrap();
    assert_eq!(state["job_env"]["STITCH_JOB_TOKEN"], h.token(&id));
    assert_eq!(state["job_env"]["STITCH_SERVER"], h.base);
    assert_eq!(state["job_env"]["STITCH_BUILD_ID"], id.as_str());
    // Only the hash is in the record, and it matches.
    assert_eq!(
        b.job_token_hash.as_deref(),
        Some(stitch_server::job_token::JobTokens::hash(&h.token(&id)).as_str())
    );
    // The token survives a reopen of the database (the key is persisted).
    let key_again = h
        .state
        .store()
        .ensure_secret(stitch_server::job_token::SECRET_NAME, b"other")
        .await
        .unwrap();
    assert_eq!(
        stitch_server::job_token::JobTokens::new(&key_again).token_for(&id),
        h.token(&id)
    );
}
