//! Hostile input to the spindle: tokens naming DIDs that would make the
//! spindle connect somewhere (a loopback did:web), tokens of strangers,
//! over-long tokens, knots on IP literals, and repo records that go away.
//! "No connection" is checked on a real listener with one non-blocking
//! `accept` after the request completed.

mod support;

use std::net::TcpListener;

use serde_json::{json, Value};
use support::*;

const CANCEL: &str = "/xrpc/sh.tangled.pipeline.cancelPipeline";

/// A listener a hostile DID points at; [`assert_untouched`] checks it.
fn bait() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, format!("did:web:127.0.0.1%3A{port}"))
}

/// One non-blocking accept: nothing ever connected to the listener.
#[track_caller]
fn assert_untouched(listener: &TcpListener) {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, from)) => panic!("the spindle connected to the bait listener from {from}"),
        Err(e) => panic!("accept failed: {e}"),
    }
}

async fn cancel(h: &Harness, token: &str) -> (u16, Value, String) {
    let body = json!({
        "repo": format!("at://{OWNER}/sh.tangled.repo/repo1"),
        "pipeline": "3lzabcdefghij",
        "workflow": "ci.yml",
    });
    let resp = h
        .client
        .post(h.url(CANCEL))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("cancel request");
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("xrpc error body: {text}"));
    (code, v, text)
}

/// The error body tells the caller nothing about where the spindle looked
/// (it may echo the caller's own DID, nothing more).
#[track_caller]
fn assert_no_address(text: &str, port_did: &str) {
    let port = port_did.rsplit("%3A").next().unwrap_or_default();
    let host = format!("127.0.0.1:{port}");
    for leak in ["http://", "https://", "/.well-known", host.as_str()] {
        assert!(!text.contains(leak), "{leak:?} leaked in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_loopback_did_web_gets_401_and_no_connection() {
    // dev = true: loopback hosts would be allowed, so only the trust check
    // stands between the token and a connection.
    let h = Harness::start().await;
    let (listener, did) = bait();
    let token = TestKey::k256().sign_jwt(&cancel_claims(&did));
    let (code, v, text) = cancel(&h, &token).await;
    assert_eq!(
        (code, v["error"].as_str()),
        (401, Some("InvalidToken")),
        "{text}"
    );
    assert_eq!(v["message"], "token issuer is not known to this spindle");
    assert_no_address(&text, &did);
    assert_untouched(&listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_token_is_refused_before_resolution() {
    let h = Harness::start().await;
    let (listener, did) = bait();
    let now = chrono::Utc::now().timestamp();
    let key = TestKey::k256();
    for (what, iat, exp) in [
        ("an hour", now, now + 3600),
        ("issued in the future", now + 3600, now + 3660),
    ] {
        let mut claims = cancel_claims(&did);
        claims["iat"] = json!(iat);
        claims["exp"] = json!(exp);
        let (code, v, text) = cancel(&h, &key.sign_jwt(&claims)).await;
        assert_eq!(
            (code, v["error"].as_str()),
            (401, Some("InvalidToken")),
            "{what}: {text}"
        );
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("lifetime"),
            "{what}: {text}"
        );
    }
    assert_untouched(&listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_dev_a_members_ip_literal_did_web_and_knot_are_refused() {
    let h = Harness::start_not_dev().await;
    let (listener, did) = bait();
    // The owner makes the did:web a member: trusted, but its host is an IP.
    h.jetstream.commit(
        OWNER,
        "create",
        "sh.tangled.spindle.member",
        "m1",
        Some(json!({"subject": did, "instance": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
    );
    let spindle = h.spindle.clone();
    until_written(
        &spindle.db,
        "membership mirrored from jetstream",
        || async { spindle.db.is_member(&did).await.unwrap() },
    )
    .await;

    let token = TestKey::p256().sign_jwt(&cancel_claims(&did));
    let (code, v, text) = cancel(&h, &token).await;
    assert_eq!(
        (code, v["error"].as_str()),
        (401, Some("InvalidToken")),
        "{text}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("unsupported DID"),
        "{text}"
    );
    assert_no_address(&text, &did);
    assert_untouched(&listener);

    // The owner's repo (processed before the membership) is on a knot named
    // by an IP literal: not followed, never dialed.
    assert!(
        spindle
            .db
            .repo_tracked(&h.knot.host(), OWNER, "myrepo")
            .await
            .unwrap(),
        "the repo record itself was mirrored"
    );
    assert_eq!(spindle.knots.followed(), Vec::<String>::new());
    assert!(h.knot.connections().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_repo_record_stops_its_knot_subscription() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let knot = h.knot.host();
    assert_eq!(h.spindle.knots.followed(), vec![knot.clone()]);
    let fake = h.knot.clone();
    eventually(
        "the knot stream to be served",
        fake.connections_moved(),
        || fake.active() == 1,
    )
    .await;

    h.jetstream
        .commit(OWNER, "delete", "sh.tangled.repo", "repo1", None);
    // The spindle drops the knot from its set as it stops the client, so
    // the stream's close (which the fake announces) comes after both.
    let spindle = h.spindle.clone();
    eventually(
        "the knot to be dropped and its stream closed",
        fake.connections_moved(),
        || spindle.knots.followed().is_empty() && fake.active() == 0,
    )
    .await;

    // Recreating the record follows the knot again: exactly one new
    // connection, so nothing reconnected while the repo was gone.
    h.jetstream.commit(
        OWNER,
        "create",
        "sh.tangled.repo",
        "repo1",
        Some(json!({"$type": "sh.tangled.repo", "name": "myrepo", "knot": knot, "spindle": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
    );
    h.knot_connections(2).await;
    assert_eq!(h.knot.connections().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_repo_does_not_make_the_spindle_follow_its_knot() {
    let h = Harness::start().await;
    h.knot_connections(1).await;
    let other = FakeKnot::start().await;
    h.jetstream.commit(
        "did:plc:stranger",
        "create",
        "sh.tangled.repo",
        "r9",
        Some(json!({"name": "theirs", "knot": other.host(), "spindle": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
    );
    // A later owner record proves the stranger's was processed.
    h.jetstream.commit(
        OWNER,
        "create",
        "sh.tangled.spindle.member",
        "m1",
        Some(json!({"subject": "did:plc:member", "instance": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
    );
    let spindle = h.spindle.clone();
    until_written(&spindle.db, "the membership mirrored", || async {
        spindle.db.is_member("did:plc:member").await.unwrap()
    })
    .await;
    assert_eq!(spindle.knots.followed(), vec![h.knot.host()]);
    assert!(other.connections().is_empty());
}
