//! `GET /v1/queues`, the dead-letter routes and the `queue`/`build` filters
//! of `/v1/events`, over a real server on loopback.

mod http_support;

use std::time::Duration;

use futures::StreamExt;
use http_support::{error_code, Server, SseReader};
use serde_json::Value;
use stitch_core::{BuildId, BuildStatus};
use stitch_mq::{Failure, SubscriptionConfig};
use stitch_server::http::HttpOptions;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

async fn json(s: &Server, path: &str) -> Value {
    let resp = s.get(path).send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().await.expect("json")
}

fn queue<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("queue {name} listed"))
}

#[tokio::test]
async fn queues_list_configuration_live_counts_and_the_last_day() {
    let s = Server::start().await;
    let empty = json(&s, "/v1/queues").await;
    let names: Vec<&str> = empty["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "q-local", "q-noop"]);
    let default = queue(&empty, "default");
    assert_eq!(default["runner"], "fake");
    assert_eq!(default["concurrency"], Value::Null);
    assert_eq!(default["oldest_waiting_at"], Value::Null);
    assert_eq!(default["counts"]["accepted"], 0);
    assert_eq!(queue(&empty, "q-local")["runner"], "local");
    assert_eq!(queue(&empty, "q-local")["concurrency"], 1);
    assert_eq!(queue(&empty, "q-noop")["runner"], "noop");
    assert_eq!(empty["last_24h"].as_array().unwrap().len(), 24);

    // No stage runs in this server: builds stay accepted until the test
    // moves them.
    let first = s.create_ok("default", "one").await;
    let second = s.create_ok("default", "two").await;
    let third = s.create_ok("q-noop", "three").await;
    let store = s.state.store();
    let first_record = store.get_build(&first.parse().unwrap()).await.unwrap();
    let none = Default::default();
    let second_id: BuildId = second.parse().unwrap();
    store
        .record_status(&second_id, None, BuildStatus::Running, &none, None)
        .await
        .unwrap();
    let third_id: BuildId = third.parse().unwrap();
    store
        .record_status(&third_id, None, BuildStatus::Running, &none, None)
        .await
        .unwrap();
    store
        .record_status(&third_id, None, BuildStatus::Failed, &none, Some("broke"))
        .await
        .unwrap();

    let list = json(&s, "/v1/queues").await;
    let default = queue(&list, "default");
    assert_eq!(default["counts"]["accepted"], 1);
    assert_eq!(default["counts"]["running"], 1);
    assert_eq!(default["counts"]["failed"], 0);
    let oldest: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(default["oldest_waiting_at"].clone()).unwrap();
    assert_eq!(oldest, first_record.created_at);
    assert!(default["oldest_waiting_seconds"].as_u64().is_some());
    let noop = queue(&list, "q-noop");
    assert_eq!(noop["counts"]["failed"], 1);
    assert_eq!(noop["counts"]["running"], 0);
    assert_eq!(noop["oldest_waiting_at"], Value::Null);
    // The failure lands in the current hour, the last bucket, with its run time.
    let hours = list["last_24h"].as_array().unwrap();
    let last = &hours[23];
    assert_eq!(
        (last["failed"].as_u64(), last["succeeded"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(last["median_duration_ms"].as_u64().is_some());
    let earlier: u64 = hours[..23]
        .iter()
        .map(|h| h["failed"].as_u64().unwrap())
        .sum();
    assert_eq!(earlier, 0);
}

/// Every open overview page refetches `/v1/queues` after an event: the
/// server computes the answer once and hands it to the requests that
/// follow until the next event (or for at most a second).
#[tokio::test]
async fn queue_lists_are_reused_until_the_next_event() {
    use chrono::{DateTime, Utc};
    let s = Server::start().await;
    s.create_ok("default", "one").await;
    let at = |v: &Value| -> DateTime<Utc> { serde_json::from_value(v["at"].clone()).unwrap() };

    // Two requests in a row with no event between: the second gets the
    // first's answer, computed at the same `at`. A request the server
    // reached a second or more after the first answer was computed may be
    // recomputed, so such a pair (a stalled machine) proves nothing and is
    // tried again.
    let mut conclusive = 0;
    for _ in 0..20 {
        let first = json(&s, "/v1/queues").await;
        let second = json(&s, "/v1/queues").await;
        let answered = Utc::now();
        if answered - at(&first) >= chrono::TimeDelta::milliseconds(900) {
            continue;
        }
        conclusive += 1;
        assert_eq!(at(&second), at(&first), "reused answer");
        assert_eq!(second, first);
    }
    assert!(
        conclusive > 0,
        "no request pair within a second in 20 tries"
    );

    // Concurrent requests after an event share one fresh answer.
    let before = json(&s, "/v1/queues").await;
    s.create_ok("default", "two").await;
    let lists = futures::future::join_all((0..16).map(|_| json(&s, "/v1/queues"))).await;
    for list in &lists {
        assert!(
            list["event_seq"].as_u64() > before["event_seq"].as_u64(),
            "an answer after the event knows of it"
        );
        assert_eq!(queue(list, "default")["counts"]["accepted"], 2);
    }
}

/// Runs one statement on the server's SQLite store, outside the store.
async fn exec(s: &Server, sql: &str) {
    match s.state.store().pool() {
        stitch_store::StorePool::Sqlite(p) => drop(sqlx::query(sql).execute(&p).await.unwrap()),
        _ => panic!("the test server runs on SQLite"),
    }
}

/// The last day's bucket of the hour starting at `start`.
fn bucket(list: &Value, start: chrono::DateTime<chrono::Utc>) -> Value {
    list["last_24h"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            serde_json::from_value::<chrono::DateTime<chrono::Utc>>(h["start"].clone()).unwrap()
                == start
        })
        .cloned()
        .unwrap_or_else(|| panic!("an hour starting at {start} in {list}"))
}

/// Settled hours (ended more than a few minutes ago) are counted once and
/// kept; the current hour is counted once and then from the events.
#[tokio::test]
async fn settled_hours_are_kept_and_the_current_hour_follows_the_events() {
    use chrono::{DurationRound, TimeDelta, Utc};
    let s = Server::start().await;
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap() - TimeDelta::hours(3);
    let past = s.create_ok("q-noop", "past").await;
    let hidden = s.create_ok("q-noop", "hidden").await;
    let at = hour.timestamp_millis() + 60_000;
    exec(
        &s,
        &format!(
            "UPDATE builds SET status = 'failed', started_at = {}, finished_at = {at} \
             WHERE id = '{past}'",
            at - 4000
        ),
    )
    .await;
    let first = json(&s, "/v1/queues").await;
    let settled = bucket(&first, hour);
    assert_eq!(
        (
            settled["failed"].as_u64(),
            settled["median_duration_ms"].as_u64()
        ),
        (Some(1), Some(4000))
    );
    assert_eq!(queue(&first, "q-noop")["counts"]["failed"], 1);

    // Behind the store's back the settled hour changes and a build
    // finishes now without an event (nothing in stitch does either: finish
    // times are written once, at the finish, with an event), and a build
    // finishes through the store. The next answer (after the events)
    // keeps the settled hour's count and counts the current hour from the
    // events: the silent finish is not seen.
    exec(
        &s,
        &format!("UPDATE builds SET status = 'succeeded' WHERE id = '{past}'"),
    )
    .await;
    let now_ms = Utc::now().timestamp_millis();
    exec(
        &s,
        &format!(
            "UPDATE builds SET status = 'failed', started_at = {}, finished_at = {now_ms} \
             WHERE id = '{hidden}'",
            now_ms - 10
        ),
    )
    .await;
    let now_id: BuildId = s.create_ok("q-noop", "now").await.parse().unwrap();
    let none = Default::default();
    let store = s.state.store();
    store
        .record_status(&now_id, None, BuildStatus::Running, &none, None)
        .await
        .unwrap();
    store
        .record_status(&now_id, None, BuildStatus::Cancelled, &none, None)
        .await
        .unwrap();
    let second = json(&s, "/v1/queues").await;
    let kept = bucket(&second, hour);
    assert_eq!(
        (kept["failed"].as_u64(), kept["succeeded"].as_u64()),
        (Some(1), Some(0))
    );
    let current = second["last_24h"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(current["cancelled"], 1, "{second}");
    assert_eq!(current["failed"], 0, "{second}");
    assert_eq!(queue(&second, "q-noop")["counts"]["cancelled"], 1);
    assert_eq!(queue(&second, "q-noop")["counts"]["failed"], 1);
}

#[tokio::test]
async fn queues_need_the_token_when_tokens_are_configured() {
    let s = Server::start_with(Some("sekrit-token"), HttpOptions::default()).await;
    let resp = s.client.get(s.url("/v1/queues")).send().await.unwrap();
    assert_eq!(error_code(resp).await, (401, "unauthorized".to_string()));
    assert_eq!(
        json(&s, "/v1/queues").await["queues"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed() {
    let s = Server::start().await;
    let id = s.create_ok("default", "poison").await;
    // Stand in for a stage that gives up: take the build's trigger message
    // and reject it, which dead-letters it.
    let mut sub = s
        .state
        .queue()
        .subscriber()
        .subscribe("trigger", SubscriptionConfig::new("test-stage"))
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, sub.recv())
        .await
        .unwrap()
        .unwrap();
    d.reject(Failure::new("cannot trigger")).await.unwrap();

    let list = json(&s, "/v1/dead-letters?topic=trigger").await;
    let dead = list["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{list}");
    assert_eq!(dead[0]["build_id"], id.as_str());
    assert_eq!(dead[0]["topic"], "trigger");
    assert_eq!(dead[0]["group"], "test-stage");
    assert_eq!(dead[0]["failure"], "cannot trigger");
    assert_eq!(dead[0]["attempts"], 1);
    assert_eq!(list["next_after"], Value::Null);
    assert_eq!(
        json(&s, "/v1/dead-letters?topic=signal").await["dead_letters"],
        serde_json::json!([])
    );

    let dlq = dead[0]["id"].as_i64().unwrap();
    let resp = s
        .post(&format!("/v1/dead-letters/trigger/{dlq}/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    // Published again: the stage gets it back, and it left the dead letters.
    let again = tokio::time::timeout(WAIT, sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.partition_key(), id);
    let list = json(&s, "/v1/dead-letters?topic=trigger").await;
    assert_eq!(list["dead_letters"], serde_json::json!([]));
    // Replaying it again: it is gone.
    let resp = s
        .post(&format!("/v1/dead-letters/trigger/{dlq}/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(resp).await,
        (404, "dead_letter_not_found".to_string())
    );
}

#[tokio::test]
async fn bad_dead_letter_requests_are_refused() {
    let s = Server::start().await;
    for path in [
        "/v1/dead-letters",
        "/v1/dead-letters?topic=",
        "/v1/dead-letters?topic=nope",
        "/v1/dead-letters?topic=trigger&after=-1",
        "/v1/dead-letters?topic=trigger&after=x",
        "/v1/dead-letters?topic=trigger&limit=0",
        "/v1/dead-letters?topic=trigger&limit=1001",
        "/v1/dead-letters?topic=trigger&extra=1",
    ] {
        let resp = s.get(path).send().await.unwrap();
        assert_eq!(
            error_code(resp).await,
            (400, "invalid_request".to_string()),
            "{path}"
        );
    }
    for path in [
        "/v1/dead-letters/nope/1/replay",
        "/v1/dead-letters/trigger/x/replay",
        "/v1/dead-letters/trigger/12345/replay",
    ] {
        let resp = s.post(path).send().await.unwrap();
        assert_eq!(
            error_code(resp).await,
            (404, "dead_letter_not_found".to_string()),
            "{path}"
        );
    }
}

#[tokio::test]
async fn event_filters_narrow_replay_and_live_on_both_transports() {
    let s = Server::start().await;
    let a = s.create_ok("default", "a").await;
    let b = s.create_ok("q-noop", "b").await;
    let c = s.create_ok("default", "c").await;

    // queue=: replay only that queue's builds, then follow live.
    let mut sse = SseReader::new(s.get("/v1/events?queue=default").send().await.unwrap());
    let mut got = Vec::new();
    for _ in 0..2 {
        let f = sse.next_event(WAIT).await.expect("frame");
        let ev: Value = serde_json::from_str(&f.data).unwrap();
        got.push(ev["build_id"].as_str().unwrap().to_string());
    }
    assert_eq!(got, [a.clone(), c.clone()]);
    s.create_ok("q-noop", "not-shown").await;
    let d = s.create_ok("default", "d").await;
    let f = sse.next_event(WAIT).await.expect("live frame");
    assert!(f.data.contains(&d), "{}", f.data);
    drop(sse);

    // build=: only that build's events.
    let mut sse = SseReader::new(
        s.get(&format!("/v1/events?build={b}"))
            .send()
            .await
            .unwrap(),
    );
    let f = sse.next_event(WAIT).await.expect("frame");
    assert!(f.data.contains(&b));
    let b_id: BuildId = b.parse().unwrap();
    s.state
        .store()
        .record_status(&b_id, None, BuildStatus::Running, &Default::default(), None)
        .await
        .unwrap();
    let f = sse.next_event(WAIT).await.expect("live frame");
    let ev: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(
        (ev["build_id"].as_str(), ev["status"].as_str()),
        (Some(b.as_str()), Some("running"))
    );
    drop(sse);

    // Both filters over WebSocket: an event must match both.
    let path = format!("/v1/events?queue=default&build={c}");
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_request(&path))
        .await
        .expect("websocket");
    let first = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("no frame: {other:?}"),
        }
    };
    let ev: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(ev["build_id"], c.as_str());
}

#[tokio::test]
async fn bad_event_filters_are_400_before_any_upgrade() {
    let s = Server::start().await;
    for path in [
        "/v1/events?queue=nope",
        "/v1/events?queue=%20default",
        "/v1/events?build=b_123",
        "/v1/events?build=nope",
    ] {
        let resp = s.get(path).send().await.unwrap();
        let (status, code) = error_code(resp).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{path}");
    }
    let err = tokio_tungstenite::connect_async(s.ws_request("/v1/events?queue=nope"))
        .await
        .expect_err("refused before the upgrade");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 400)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}
