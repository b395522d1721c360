//! Event and log streams over a real server: SSE parsed from raw bytes and
//! a real WebSocket client.

mod http_support;

use std::time::Duration;

use futures::StreamExt;
use http_support::{error_code, Server, SseReader};
use serde_json::Value;
use stitch_core::{BuildId, BuildStatus, LogKind, LogLine, OutputStream, StepStatus};
use stitch_server::http::HttpOptions;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(s: &Server, path: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(s.ws_request(path))
        .await
        .expect("websocket connect");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// The next text frame, or the close frame's code when the socket closes.
async fn ws_next(ws: &mut Ws) -> Result<String, Option<u16>> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a WebSocket frame");
        match msg {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error: {e}"),
            None => return Err(None),
        }
    }
}

fn seq_of(data: &str) -> u64 {
    let v: Value = serde_json::from_str(data).expect("event json");
    v["seq"].as_u64().expect("seq")
}

#[tokio::test]
async fn events_sse_resumes_with_after_and_last_event_id() {
    let s = Server::start().await;
    let base = s.state.store().latest_seq().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(s.create_ok("default", &format!("h{i}")).await);
    }

    // From the start: every event once, in order, framed per the contract.
    let mut sse = SseReader::new(s.get("/v1/events").send().await.unwrap());
    for (i, id) in ids.iter().enumerate() {
        let f = sse.next_event(WAIT).await.expect("frame");
        let seq = base + 1 + i as u64;
        assert_eq!(f.id.as_deref(), Some(seq.to_string().as_str()));
        assert_eq!(f.event.as_deref(), Some("build"));
        let ev: Value = serde_json::from_str(&f.data).unwrap();
        assert_eq!(ev["seq"], seq);
        assert_eq!(ev["build_id"], id.as_str());
        assert_eq!(ev["queue"], "default");
        assert_eq!(ev["kind"], "status");
        assert_eq!(ev["status"], "accepted");
        assert!(ev["metadata"].is_object() && ev["at"].is_string());
    }
    // Live: a new build arrives on the open stream.
    let live = s.create_ok("default", "live").await;
    let f = sse.next_event(WAIT).await.unwrap();
    assert_eq!(seq_of(&f.data), base + 4);
    assert!(f.data.contains(&live));
    drop(sse);

    // ?after= resumes after that seq.
    let mut sse = SseReader::new(
        s.get(&format!("/v1/events?after={}", base + 2))
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(seq_of(&sse.next_event(WAIT).await.unwrap().data), base + 3);
    assert_eq!(seq_of(&sse.next_event(WAIT).await.unwrap().data), base + 4);
    drop(sse);

    // Last-Event-ID wins over ?after= (what an EventSource sends on reconnect);
    // events committed while disconnected arrive with no gap, no duplicate.
    s.create_ok("default", "while-away").await;
    let mut sse = SseReader::new(
        s.get("/v1/events?after=0")
            .header("Last-Event-ID", (base + 1).to_string())
            .send()
            .await
            .unwrap(),
    );
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(seq_of(&sse.next_event(WAIT).await.unwrap().data));
    }
    assert_eq!(got, vec![base + 2, base + 3, base + 4, base + 5]);
}

/// `after=latest` skips the log as it stands and follows what comes next.
#[tokio::test]
async fn events_after_latest_follows_only_later_events() {
    let s = Server::start().await;
    for i in 0..3 {
        s.create_ok("default", &format!("old{i}")).await;
    }
    let before = s.state.store().latest_seq().await.unwrap();
    assert!(before >= 3);
    let mut sse = SseReader::new(s.get("/v1/events?after=latest").send().await.unwrap());
    let live = s.create_ok("default", "live").await;
    loop {
        let f = sse.next_event(WAIT).await.expect("the live build's event");
        // Nothing from before the request (the old builds may still move on
        // to later statuses, which are later events).
        assert!(seq_of(&f.data) > before, "{}", f.data);
        if f.data.contains(&live) {
            break;
        }
    }
    let resp = s.get("/v1/events?after=earliest").send().await.unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
    // A Last-Event-ID that is sent must be a position, even when empty.
    let resp = s
        .get("/v1/events")
        .header("last-event-id", "")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
}

#[tokio::test]
async fn events_websocket_resumes_with_after() {
    let s = Server::start().await;
    let base = s.state.store().latest_seq().await.unwrap();
    for i in 0..3 {
        s.create_ok("default", &format!("h{i}")).await;
    }
    let mut ws = ws_connect(&s, &format!("/v1/events?after={}", base + 1)).await;
    assert_eq!(seq_of(&ws_next(&mut ws).await.unwrap()), base + 2);
    assert_eq!(seq_of(&ws_next(&mut ws).await.unwrap()), base + 3);
    // Live, including an event committed by a writer that does not notify
    // (found by the periodic re-check).
    s.create_ok("q-noop", "live").await;
    let ev: Value = serde_json::from_str(&ws_next(&mut ws).await.unwrap()).unwrap();
    assert_eq!(ev["seq"], base + 4);
    assert_eq!(ev["queue"], "q-noop");
    let first: BuildId = ev["build_id"].as_str().unwrap().parse().unwrap();
    s.state
        .store()
        .record_status(
            &first,
            None,
            BuildStatus::Running,
            &Default::default(),
            None,
        )
        .await
        .unwrap();
    let ev: Value = serde_json::from_str(&ws_next(&mut ws).await.unwrap()).unwrap();
    assert_eq!(ev["seq"], base + 5);
    assert_eq!(ev["status"], "running");
    ws.close(None).await.unwrap();

    // Reconnect where we left off: nothing repeated.
    s.create_ok("default", "after-reconnect").await;
    let mut ws = ws_connect(&s, &format!("/v1/events?after={}", base + 5)).await;
    assert_eq!(seq_of(&ws_next(&mut ws).await.unwrap()), base + 6);
}

#[tokio::test]
async fn keepalives_on_idle_streams() {
    let s = Server::start_with(
        None,
        HttpOptions {
            keepalive: Duration::from_millis(150),
            ..HttpOptions::default()
        },
    )
    .await;
    let mut sse = SseReader::new(s.get("/v1/events").send().await.unwrap());
    let f = sse.next(WAIT).await.expect("a keepalive comment");
    assert_eq!(f.comments, vec!["keepalive".to_string()], "{f:?}");

    let mut ws = ws_connect(&s, "/v1/events").await;
    let msg = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(msg, Some(Ok(Message::Ping(_)))), "{msg:?}");
}

#[tokio::test]
async fn logs_answer_404_before_any_upgrade() {
    let s = Server::start().await;
    let unknown = BuildId::new().to_string();
    // A noop build with a ref: its runner has no logs.
    let noop = s.create_ok("q-noop", "h").await;
    s.trigger_on_runner("q-noop", &noop, "h").await;
    // A fake build the runner has not seen yet (no ref).
    let fresh = s.create_ok("default", "h").await;

    for (id, code) in [
        (unknown.as_str(), "build_not_found"),
        ("b_not-an-id", "build_not_found"),
        (noop.as_str(), "logs_not_found"),
        (fresh.as_str(), "logs_not_found"),
    ] {
        let path = format!("/v1/builds/{id}/logs");
        let resp = s.get(&path).send().await.unwrap();
        assert_eq!(error_code(resp).await, (404, code.to_string()), "SSE {id}");

        let err = tokio_tungstenite::connect_async(s.ws_request(&path))
            .await
            .expect_err("no upgrade");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status().as_u16(), 404, "WS {id}");
                let body: Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["error"]["code"], code, "WS {id}");
            }
            other => panic!("expected an HTTP 404, got {other}"),
        }
    }
}

#[tokio::test]
async fn local_build_logs_follow_live_over_websocket_and_close_normally() {
    let s = Server::start().await;
    let id = s.create_ok("q-local", "h").await;
    let r = s.trigger_on_runner("q-local", &id, "h").await;
    let mut ws = ws_connect(&s, &format!("/v1/builds/{id}/logs")).await;

    let mut lines = Vec::new();
    let close = loop {
        match ws_next(&mut ws).await {
            Ok(t) => {
                if lines.is_empty() {
                    // The first frame arrives while the process still runs.
                    let rt = s.state.build_queue("q-local").unwrap();
                    let handle = stitch_core::BuildHandle::new(id.parse().unwrap(), "q-local")
                        .with_ref(r.clone());
                    let st = rt.runner.status(&handle).await.unwrap();
                    assert!(!st.status.is_terminal(), "{st:?}");
                }
                lines.push(serde_json::from_str::<LogLine>(&t).expect("LogLine frame"));
            }
            Err(code) => break code,
        }
    };
    assert_eq!(close, Some(u16::from(CloseCode::Normal)));
    let first = lines.first().unwrap();
    assert_eq!(first.kind, LogKind::Control);
    assert_eq!(first.step_status, Some(StepStatus::Start));
    let last = lines.last().unwrap();
    assert_eq!(last.kind, LogKind::Control);
    assert_eq!(last.step_status, Some(StepStatus::End));
    let data: Vec<&str> = lines
        .iter()
        .filter(|l| l.kind == LogKind::Data && l.stream == Some(OutputStream::Stdout))
        .map(|l| l.content.as_str())
        .collect();
    assert_eq!(data, vec!["hello", "done"]);
}

#[tokio::test]
async fn fake_build_logs_over_sse_end_and_resume() {
    let s = Server::start().await;
    let id = s.create_ok("default", "h").await;
    s.trigger_on_runner("default", &id, "h").await;
    let path = format!("/v1/builds/{id}/logs");
    let mut sse = SseReader::new(s.get(&path).send().await.unwrap());
    let mut frames = Vec::new();
    loop {
        let f = sse.next_event(WAIT).await.expect("frame before the end");
        match f.event.as_deref() {
            Some("log") => frames.push(f),
            Some("end") => break,
            other => panic!("unexpected event {other:?}: {f:?}"),
        }
    }
    assert!(
        sse.next(WAIT).await.is_none(),
        "the stream ends after `end`"
    );
    assert!(frames.len() > 4, "{frames:?}");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.id.as_deref(), Some((i + 1).to_string().as_str()));
        serde_json::from_str::<LogLine>(&f.data).expect("LogLine frame");
    }

    // Resume after frame 3 with Last-Event-ID.
    let mut sse = SseReader::new(
        s.get(&path)
            .header("Last-Event-ID", "3")
            .send()
            .await
            .unwrap(),
    );
    let f = sse.next_event(WAIT).await.unwrap();
    assert_eq!(f.id.as_deref(), Some("4"));
    assert_eq!(f.data, frames[3].data);

    // WebSocket with ?after= skips too, and closes normally.
    let mut ws = ws_connect(&s, &format!("{path}?after={}", frames.len() - 1)).await;
    assert_eq!(ws_next(&mut ws).await.unwrap(), frames.last().unwrap().data);
    assert_eq!(ws_next(&mut ws).await, Err(Some(1000)));
}

#[tokio::test]
async fn stored_log_lines_are_served_and_followed_until_terminal() {
    let s = Server::start().await;
    let id = s.create_ok("q-noop", "h").await;
    let bid: BuildId = id.parse().unwrap();
    let line = |n: usize| {
        LogLine::data(
            1,
            OutputStream::Stdout,
            format!("line {n}"),
            chrono::Utc::now(),
        )
    };
    s.state
        .store()
        .append_log_lines(&bid, &[line(1), line(2)])
        .await
        .unwrap();
    let mut sse = SseReader::new(
        s.get(&format!("/v1/builds/{id}/logs"))
            .send()
            .await
            .unwrap(),
    );
    let mut ws = ws_connect(&s, &format!("/v1/builds/{id}/logs")).await;
    for n in 1..=2 {
        let f = sse.next_event(WAIT).await.unwrap();
        assert!(f.data.contains(&format!("line {n}")), "{f:?}");
        assert!(ws_next(&mut ws)
            .await
            .unwrap()
            .contains(&format!("line {n}")));
    }
    // The build is not terminal: new lines follow, then the end.
    s.state
        .store()
        .append_log_lines(&bid, &[line(3)])
        .await
        .unwrap();
    assert!(sse.next_event(WAIT).await.unwrap().data.contains("line 3"));
    assert!(ws_next(&mut ws).await.unwrap().contains("line 3"));
    s.state
        .store()
        .record_status(
            &bid,
            None,
            BuildStatus::Succeeded,
            &Default::default(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        sse.next_event(WAIT).await.unwrap().event.as_deref(),
        Some("end")
    );
    assert_eq!(ws_next(&mut ws).await, Err(Some(1000)));
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let mut s = Server::start().await;
    let mut sse = SseReader::new(s.get("/v1/events").send().await.unwrap());
    let mut ws = ws_connect(&s, "/v1/events").await;
    // Both streams are established (an event arrives on each).
    s.create_ok("default", "h").await;
    assert!(sse.next_event(WAIT).await.is_some());
    assert!(ws_next(&mut ws).await.is_ok());

    let took = s.stop().await;
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert_eq!(ws_next(&mut ws).await, Err(Some(1001)));
    assert!(sse.next(WAIT).await.is_none(), "SSE stream ends");
}

#[tokio::test]
async fn a_slow_reader_lags_but_gets_every_event_across_batches() {
    let s = Server::start().await;
    let base = s.state.store().latest_seq().await.unwrap();
    s.create_ok("default", "first").await;
    let mut sse = SseReader::new(s.get("/v1/events").send().await.unwrap());
    assert_eq!(seq_of(&sse.next_event(WAIT).await.unwrap().data), base + 1);
    // More than one read batch (500) is committed while the client reads nothing.
    let n = 520u64;
    for i in 0..n {
        let req = stitch_server::service::CreateBuild {
            head: vec![format!("c{i}")],
            ..Default::default()
        };
        stitch_server::service::create_build(&s.state, "default", req)
            .await
            .unwrap();
    }
    for expected in base + 2..=base + 1 + n {
        let f = sse.next_event(WAIT).await.unwrap();
        assert_eq!(f.id, Some(expected.to_string()));
        assert_eq!(seq_of(&f.data), expected);
    }
}
