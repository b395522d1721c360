//! `stitch build logs` and `stitch build watch` against stream servers in
//! the test that misbehave on purpose: a UTF-8 character split across
//! chunks, a connection cut mid-way (resumed, or never back), and an event
//! stream whose resume position retention deleted (410 `events_pruned`).
//! The `stitch` binary runs as a real child process over loopback HTTP.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ID: &str = "b_01jf8k0000000000000000000a";

/// A log frame as the server sends it.
fn log_frame(n: u64, content: &str) -> String {
    let line = serde_json::json!({
        "kind": "data", "content": content, "time": "2026-01-02T03:04:05.000Z",
        "step_id": 1, "stream": "stdout",
    });
    format!("id: {n}\nevent: log\ndata: {line}\n\n")
}

const END_FRAME: &str = "event: end\ndata: {\"status\":\"complete\"}\n\n";

/// What one connection to the fake's stream route answers: chunks, each
/// written and flushed as its own HTTP chunk, then either the final chunk
/// (a clean end) or a closed socket without it (a cut mid-body).
#[derive(Clone)]
struct Answer {
    chunks: Vec<Vec<u8>>,
    cut: bool,
}

/// Per connection, in order; once they run out every request gets 503.
#[derive(Default)]
struct Script {
    answers: Vec<Answer>,
    /// `Last-Event-ID` (or else `after=`) of each request, in order.
    positions: Vec<Option<String>>,
}

/// The request line's path and the request's headers (lower-cased names).
struct Request {
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    /// `Last-Event-ID`, or else the `after` query parameter.
    fn position(&self) -> Option<String> {
        self.header("last-event-id").or_else(|| {
            self.path
                .split_once('?')
                .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("after=")))
                .map(str::to_string)
        })
    }
}

/// Reads one request head (these are GETs: no body).
async fn read_request(socket: &mut TcpStream) -> Option<Request> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Request { path, headers })
}

/// A whole JSON answer.
async fn answer_json(socket: &mut TcpStream, status: &str, body: &str) {
    let text = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(text.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// An SSE answer per `answer`.
async fn answer_sse(socket: &mut TcpStream, answer: Answer) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for chunk in answer.chunks {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        if socket.write_all(&framed).await.is_err() || socket.flush().await.is_err() {
            return;
        }
    }
    if !answer.cut {
        let _ = socket.write_all(b"0\r\n\r\n").await;
    }
    // Dropping the socket closes it: after the final chunk that is a clean
    // end; without it the client reads a body cut short.
}

/// Answers a stream request from `script`: the next scripted answer, or 503.
async fn answer_from_script(socket: &mut TcpStream, script: &Arc<Mutex<Script>>, req: &Request) {
    let next = {
        let mut s = script.lock();
        s.positions.push(req.position());
        (!s.answers.is_empty()).then(|| s.answers.remove(0))
    };
    match next {
        Some(answer) => answer_sse(socket, answer).await,
        None => {
            answer_json(
                socket,
                "503 Service Unavailable",
                r#"{"error":{"code":"unavailable","message":"the test server is gone"}}"#,
            )
            .await
        }
    }
}

/// Serves `handle` on a loopback port, one task per connection; returns
/// the base URL.
async fn start<F, Fut>(handle: F) -> String
where
    F: Fn(TcpStream, Request) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                if let Some(req) = read_request(&mut socket).await {
                    handle(socket, req).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn stitch(args: &[&str], server: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(args)
        .env("STITCH_SERVER", server)
        .env_remove("STITCH_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A log stream server following `answers`; returns the script (for the
/// positions asked for) and its URL.
async fn logs_server(answers: Vec<Answer>) -> (Arc<Mutex<Script>>, String) {
    let script = Arc::new(Mutex::new(Script {
        answers,
        positions: Vec::new(),
    }));
    let shared = script.clone();
    let url = start(move |mut socket, req| {
        let script = shared.clone();
        async move {
            assert!(req.path.contains("/logs"), "{}", req.path);
            answer_from_script(&mut socket, &script, &req).await;
        }
    })
    .await;
    (script, url)
}

#[tokio::test]
async fn a_character_split_across_chunks_arrives_whole() {
    // "✓ ünïcødé 🦀": the split falls inside the three-byte check mark and
    // inside the four-byte crab.
    let frame = log_frame(1, "✓ ünïcødé 🦀");
    let bytes = frame.into_bytes();
    let check = bytes.iter().position(|&b| b == 0xE2).unwrap();
    let crab = bytes.iter().position(|&b| b == 0xF0).unwrap();
    let chunks = vec![
        bytes[..check + 1].to_vec(),
        bytes[check + 1..crab + 2].to_vec(),
        bytes[crab + 2..].to_vec(),
        END_FRAME.as_bytes().to_vec(),
    ];
    let (_script, url) = logs_server(vec![Answer { chunks, cut: false }]).await;
    let out = stitch(&["build", "logs", ID], &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout).expect("valid UTF-8");
    assert_eq!(stdout, "  ✓ ünïcødé 🦀\n");
}

#[tokio::test]
async fn a_cut_log_stream_resumes_after_the_last_line() {
    let first = Answer {
        chunks: vec![
            log_frame(1, "one").into_bytes(),
            // The cut falls inside the second frame.
            log_frame(2, "two").into_bytes()[..20].to_vec(),
        ],
        cut: true,
    };
    let second = Answer {
        chunks: vec![
            log_frame(2, "two").into_bytes(),
            log_frame(3, "three").into_bytes(),
            END_FRAME.as_bytes().to_vec(),
        ],
        cut: false,
    };
    let (shared, url) = logs_server(vec![first, second]).await;
    let out = stitch(&["build", "logs", ID], &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "  one\n  two\n  three\n",
        "each line once, in order"
    );
    let positions = shared.lock().positions.clone();
    assert_eq!(
        positions,
        vec![None, Some("1".to_string())],
        "the reconnect resumes after the last whole frame"
    );
}

#[tokio::test]
async fn a_log_stream_cut_for_good_exits_non_zero() {
    let first = Answer {
        chunks: vec![log_frame(1, "one").into_bytes()],
        cut: true,
    };
    let (shared, url) = logs_server(vec![first]).await;
    let out = stitch(&["build", "logs", ID, "--reconnect-for", "1"], &url).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "  one\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was cut"), "{stderr}");
    assert!(
        stderr.contains("could not be resumed within 1s"),
        "{stderr}"
    );
    // It did try again, resuming after line 1, before giving up.
    let positions = shared.lock().positions.clone();
    assert!(positions.len() >= 2, "{positions:?}");
    assert!(
        positions[1..].iter().all(|p| p.as_deref() == Some("1")),
        "{positions:?}"
    );
}

#[tokio::test]
async fn a_stream_that_ends_without_its_end_frame_is_not_complete() {
    // A clean close (no transport error) before `event: end` is a cut too.
    let first = Answer {
        chunks: vec![log_frame(1, "one").into_bytes()],
        cut: false,
    };
    let (_shared, url) = logs_server(vec![first]).await;
    let out = stitch(&["build", "logs", ID, "--reconnect-for", "0"], &url).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("before the log's end frame"),
        "{}",
        text(&out)
    );
}

/// The fake for `build watch`: the build record answers `statuses` in turn
/// (the last one repeats) and `/v1/events` follows `events`; a resume from
/// seq 1 is answered 410 `events_pruned`.
struct WatchFake {
    statuses: Vec<&'static str>,
    events: Script,
}

fn record(status: &str) -> serde_json::Value {
    serde_json::json!({
        "id": ID, "queue": "ci", "status": status, "base": [], "head": ["c/1"],
        "metadata": {}, "runner_ref": null, "created_at": "2026-01-02T03:04:05Z",
        "updated_at": "2026-01-02T03:04:05Z", "finished_at": null, "url": null,
        "cancel_requested": false,
    })
}

fn event_frame(seq: u64, status: &str) -> String {
    let event = serde_json::json!({
        "seq": seq, "build_id": ID, "queue": "ci", "kind": "status",
        "status": status, "metadata": {}, "at": "2026-01-02T03:04:05Z",
    });
    format!("id: {seq}\nevent: build\ndata: {event}\n\n")
}

async fn watch_answer(mut socket: TcpStream, req: Request, fake: Arc<Mutex<WatchFake>>) {
    if req.path.starts_with("/v1/builds/") {
        let status = {
            let mut f = fake.lock();
            if f.statuses.len() > 1 {
                f.statuses.remove(0)
            } else {
                f.statuses[0]
            }
        };
        answer_json(&mut socket, "200 OK", &record(status).to_string()).await;
        return;
    }
    assert!(req.path.starts_with("/v1/events"), "{}", req.path);
    let position = req.position();
    fake.lock().events.positions.push(position.clone());
    if position.as_deref() == Some("1") {
        answer_json(
            &mut socket,
            "410 Gone",
            r#"{"error":{"code":"events_pruned","oldest_seq":40,"message":"events after 1 were deleted by retention"}}"#,
        )
        .await;
        return;
    }
    let next = {
        let mut f = fake.lock();
        (!f.events.answers.is_empty()).then(|| f.events.answers.remove(0))
    };
    match next {
        Some(answer) => answer_sse(&mut socket, answer).await,
        None => {
            // Nothing more to say: a stream that stays open until the
            // client, done with the build, goes away.
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = socket.write_all(head.as_bytes()).await;
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        }
    }
}

#[tokio::test]
async fn watch_follows_events_and_resyncs_after_events_pruned() {
    let shared = Arc::new(Mutex::new(WatchFake {
        // Read once at the start, once after the event, once after the
        // resync.
        statuses: vec!["accepted", "running", "succeeded"],
        events: Script {
            answers: vec![Answer {
                chunks: vec![event_frame(1, "running").into_bytes()],
                cut: true,
            }],
            positions: Vec::new(),
        },
    }));
    let fake = shared.clone();
    let url = start(move |socket, req| watch_answer(socket, req, fake.clone())).await;
    let out = stitch(&["build", "watch", ID, "--json"], &url).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let statuses: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["status"].to_string())
        .collect();
    assert_eq!(statuses, ["\"accepted\"", "\"running\"", "\"succeeded\""]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("deleted by the server's retention (the oldest kept is 40)"),
        "{stderr}"
    );
    let positions = shared.lock().events.positions.clone();
    assert_eq!(
        positions,
        vec![
            Some("latest".to_string()),
            Some("1".to_string()),
            Some("latest".to_string())
        ],
        "subscribe at the newest event, resume after seq 1, start again after the 410"
    );
}
