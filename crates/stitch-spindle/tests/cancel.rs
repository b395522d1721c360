//! `sh.tangled.pipeline.cancelPipeline` with atproto service auth: tokens
//! signed with real secp256k1 (did:plc via the fake PLC directory) and
//! P-256 (did:web) keys.

mod support;

use serde_json::{json, Value};
use support::*;

const SLOW: &str = "engine: nixery\nstitch:\n  queue: slow\n";
const CANCEL: &str = "/xrpc/sh.tangled.pipeline.cancelPipeline";

async fn cancel(h: &Harness, token: Option<&str>, body: &Value) -> (u16, String) {
    let mut req = h.client.post(h.url(CANCEL)).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("cancel request");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("xrpc error body: {body}"));
    assert!(v["message"].is_string(), "{v}");
    v["error"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_needs_a_valid_token_of_the_repo_owner() {
    let h = Harness::start().await;
    let owner_key = TestKey::k256();
    h.plc.register(OWNER, &owner_key);
    let stranger_key = TestKey::k256();
    h.plc.register("did:plc:stranger", &stranger_key);
    h.knot_connections(1).await;
    let knot = h.knot.host();
    let rkey = "3lzcancel2222";
    h.push_trigger(rkey, &knot, OWNER, "myrepo", &[("ci.yml", SLOW)]);
    let mut events = h.events(None).await;
    events
        .until("the workflow to run", |f| {
            reached(f, rkey, "ci.yml", "running")
        })
        .await;

    let body = json!({
        "repo": format!("at://{OWNER}/sh.tangled.repo/repo1"),
        "pipeline": format!("at://did:web:{knot}/sh.tangled.pipeline/{rkey}"),
        "workflow": "ci.yml",
    });
    let good = cancel_claims(OWNER);

    // Refused: no token, forged (another key), expired, wrong audience,
    // wrong method, garbage, and a valid token of someone else.
    let (code, text) = cancel(&h, None, &body).await;
    assert_eq!((code, error_of(&text).as_str()), (401, "AuthRequired"));
    let forged = stranger_key.sign_jwt(&good);
    let mut expired = good.clone();
    expired["exp"] = json!(chrono::Utc::now().timestamp() - 10);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("did:web:other.test");
    let mut wrong_lxm = good.clone();
    wrong_lxm["lxm"] = json!("sh.tangled.repo.addSecret");
    let mut tampered = owner_key.sign_jwt(&good);
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    for (what, token) in [
        ("forged", forged),
        ("expired", owner_key.sign_jwt(&expired)),
        ("wrong audience", owner_key.sign_jwt(&wrong_aud)),
        ("wrong method", owner_key.sign_jwt(&wrong_lxm)),
        ("tampered", tampered),
        ("garbage", "not.a.jwt".to_string()),
    ] {
        let (code, text) = cancel(&h, Some(&token), &body).await;
        assert_eq!(
            (code, error_of(&text).as_str()),
            (401, "InvalidToken"),
            "{what}: {text}"
        );
    }
    // A stranger (not the owner, a member or a repo owner) is refused
    // before its DID is resolved.
    let (code, text) = cancel(
        &h,
        Some(&stranger_key.sign_jwt(&cancel_claims("did:plc:stranger"))),
        &body,
    )
    .await;
    assert_eq!(
        (code, error_of(&text).as_str()),
        (401, "InvalidToken"),
        "{text}"
    );
    assert!(text.contains("not known to this spindle"), "{text}");
    // Bad input with a valid token.
    let token = owner_key.sign_jwt(&good);
    for bad in [
        json!({"repo": "myrepo", "pipeline": rkey, "workflow": "ci.yml"}),
        json!({"repo": body["repo"], "pipeline": "at://did:plc:x/sh.tangled.pipeline/3l", "workflow": "ci.yml"}),
        json!({"repo": body["repo"], "pipeline": rkey}),
    ] {
        let (code, text) = cancel(&h, Some(&token), &bad).await;
        assert_eq!(
            (code, error_of(&text).as_str()),
            (400, "InvalidRequest"),
            "{bad}: {text}"
        );
    }
    let huge = h
        .client
        .post(h.url(CANCEL))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413, "oversized bodies are refused");
    let (code, text) = cancel(
        &h,
        Some(&token),
        &json!({"repo": body["repo"], "pipeline": rkey, "workflow": "nope.yml"}),
    )
    .await;
    assert_eq!((code, error_of(&text).as_str()), (400, "NotFound"));
    // Nothing was cancelled by any of that.
    let run = h
        .spindle
        .db
        .run(&knot, rkey, "ci.yml")
        .await
        .unwrap()
        .unwrap();
    let build = h
        .state
        .store()
        .get_build(run.build_id.as_ref().unwrap())
        .await
        .unwrap();
    assert!(!build.cancel_requested);

    // The owner's valid token, with the pipeline as a bare TID.
    let mut by_tid = body.clone();
    by_tid["pipeline"] = json!(rkey);
    let (code, text) = cancel(&h, Some(&token), &by_tid).await;
    assert_eq!((code, text.as_str()), (200, ""));
    events
        .until("cancelled", |f| reached(f, rkey, "ci.yml", "cancelled"))
        .await;
    assert_eq!(
        statuses(&events.frames, rkey, "ci.yml"),
        ["pending", "running", "cancelled"]
    );
    let last = events.frames.last().unwrap();
    assert_eq!(last["event"]["error"], "User canceled the workflow");
    assert_eq!(last["event"]["exitCode"], -1);
    events.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_did_web_member_cancels_with_an_es256_token() {
    let h = Harness::start().await;
    let key = TestKey::p256();
    let did = h.plc.web_did();
    h.plc.register(&did, &key);
    let knot = h.knot.host();
    h.jetstream.commit(&did, "create", "sh.tangled.repo", "web1",
        Some(json!({"name": "webrepo", "knot": knot, "spindle": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})));
    h.jetstream.commit(
        OWNER,
        "create",
        "sh.tangled.spindle.member",
        "m1",
        Some(json!({"subject": did, "instance": HOSTNAME, "createdAt": "2026-01-02T03:04:05Z"})),
    );
    h.knot_connections(1).await;
    let spindle = h.spindle.clone();
    until_written(&spindle.db, "the membership mirrored", || async {
        spindle.db.is_member(&did).await.unwrap()
    })
    .await;
    let rkey = "3lzwebcancel2";
    h.push_trigger(rkey, &knot, &did, "webrepo", &[("ci.yml", SLOW)]);
    let mut events = h.events(None).await;
    events
        .until("running", |f| reached(f, rkey, "ci.yml", "running"))
        .await;
    let body = json!({
        "repo": format!("at://{did}/sh.tangled.repo/web1"),
        "pipeline": format!("at://did:web:{knot}/sh.tangled.pipeline/{rkey}"),
        "workflow": "ci.yml",
    });
    // The repo must be the run's own.
    let mut other_repo = body.clone();
    other_repo["repo"] = json!(format!("at://{OWNER}/sh.tangled.repo/repo1"));
    let token = key.sign_jwt(&cancel_claims(&did));
    let (code, text) = cancel(&h, Some(&token), &other_repo).await;
    assert_eq!((code, error_of(&text).as_str()), (400, "InvalidRequest"));
    let (code, _) = cancel(&h, Some(&token), &body).await;
    assert_eq!(code, 200);
    events
        .until("cancelled", |f| reached(f, rkey, "ci.yml", "cancelled"))
        .await;
    events.close().await;
}
