//! Property tests: arbitrary bytes and structured-but-wrong input thrown at
//! every runner parser that reads what the network sends — the Buildkite and
//! GitHub webhook verifiers and payload decoders, Buildkite build JSON and
//! raw job logs. Each must answer with a typed error (or a value), never
//! panic. Case counts stay modest so the suite is fast on two cores.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};
use stitch_runners::buildkite::logs::{parse_log, LineSplitter};
use stitch_runners::buildkite::webhook::{
    parse_signature_header, sign, verify_signature, verify_token, WebhookError,
};
use stitch_runners::buildkite::Build;
use stitch_runners::github::webhook::{
    run_hint, sign as gh_sign, verify_signature as gh_verify, RunHint,
    WebhookError as GhWebhookError,
};

const SECRET: &[u8] = b"webhook-secret";
const NOW: i64 = 1_767_225_600;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Arbitrary JSON, a few levels deep, with the keys the decoders look for
/// mixed into random ones so wrong shapes reach the interesting fields.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("id".to_string()),
        Just("number".to_string()),
        Just("state".to_string()),
        Just("jobs".to_string()),
        Just("meta_data".to_string()),
        Just("run_id".to_string()),
        Just("workflow_run".to_string()),
        Just("workflow_job".to_string()),
        Just("repository".to_string()),
        Just("display_title".to_string()),
        Just("full_name".to_string()),
        Just("exit_status".to_string()),
        "[a-z_]{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn buildkite_signature_headers_of_any_text_are_typed_errors(
        header in ".{0,120}",
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        match verify_signature(SECRET, &header, &body, NOW, Duration::from_secs(300)) {
            Ok(()) => prop_assert!(false, "an arbitrary header verified: {header:?}"),
            Err(WebhookError::MalformedSignature(_) | WebhookError::BadSignature) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn buildkite_signature_headers_shaped_right_but_wrong_are_refused(
        timestamp in any::<i64>(),
        signature in "[0-9a-fA-F]{0,80}|.{0,20}",
        extra in "(,[a-z]{0,6}=[^,]{0,8}){0,3}",
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let header = format!("timestamp={timestamp},signature={signature}{extra}");
        prop_assert!(verify_signature(SECRET, &header, &body, NOW, Duration::from_secs(300)).is_err());
        // The parser reads back what was written.
        let plain = !signature.contains(',') && !signature.trim().is_empty();
        if plain && !extra.contains("timestamp=") && !extra.contains("signature=") {
            let (t, s) = parse_signature_header(&header).unwrap();
            prop_assert_eq!(t, timestamp);
            prop_assert_eq!(s, signature.trim());
        }
    }

    #[test]
    fn genuine_buildkite_signatures_verify_only_inside_the_window(
        timestamp in (NOW - 1_000)..(NOW + 1_000),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let header = format!("timestamp={timestamp},signature={}", sign(SECRET, timestamp, &body));
        let checked = verify_signature(SECRET, &header, &body, NOW, Duration::from_secs(300));
        if (timestamp - NOW).abs() <= 300 {
            prop_assert!(checked.is_ok());
        } else {
            let stale = matches!(checked, Err(WebhookError::Stale { .. }));
            prop_assert!(stale);
        }
    }

    #[test]
    fn buildkite_tokens_of_any_bytes_are_refused(presented in prop::collection::vec(any::<u8>(), 0..64)) {
        prop_assume!(presented != SECRET);
        prop_assert_eq!(verify_token(SECRET, &presented), Err(WebhookError::BadToken));
    }

    #[test]
    fn github_signature_headers_of_any_text_are_typed_errors(
        header in prop::option::of(".{0,100}|sha256=[0-9a-f]{60,68}"),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        match gh_verify(SECRET, header.as_deref(), &body) {
            Ok(()) => prop_assert!(false, "an arbitrary header verified: {header:?}"),
            Err(GhWebhookError::MissingSignature) => prop_assert!(header.is_none()),
            Err(GhWebhookError::MalformedSignature(_) | GhWebhookError::BadSignature) => {}
        }
    }

    #[test]
    fn genuine_github_signatures_verify(body in prop::collection::vec(any::<u8>(), 0..256)) {
        prop_assert!(gh_verify(SECRET, Some(&gh_sign(SECRET, &body)), &body).is_ok());
    }

    #[test]
    fn github_payloads_of_any_bytes_decode_or_fail_typed(
        event in prop_oneof![Just("workflow_run"), Just("workflow_job"), Just("ping"), Just("")],
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = run_hint(event, &body);
    }

    #[test]
    fn github_payloads_of_the_wrong_shape_decode_or_fail_typed(
        event in prop_oneof![Just("workflow_run"), Just("workflow_job")],
        value in json_value(),
    ) {
        let body = serde_json::to_vec(&value).unwrap();
        // serde also reads a struct from an array of its fields in order,
        // so only "no panic, typed error" holds for every shape; a hint
        // needs the event's object (or array) to be there.
        if let Ok(Some(RunHint { run_id: Some(_), .. })) = run_hint(event, &body) {
            prop_assert!(value.get(event).is_some() || value.is_array());
        }
    }

    #[test]
    fn buildkite_builds_of_the_wrong_shape_decode_or_fail_typed(value in json_value()) {
        let _ = serde_json::from_value::<Build>(value);
    }

    #[test]
    fn buildkite_builds_of_any_bytes_decode_or_fail_typed(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<Build>(&body);
    }

    /// Raw job logs are whatever a build printed: any bytes, markers with
    /// absurd timestamps, cut anywhere.
    #[test]
    fn raw_logs_of_any_bytes_split_into_the_same_lines_however_cut(
        pieces in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                any::<i64>().prop_map(|t| format!("\u{1b}_bk;t={t}\u{7}x\n").into_bytes()),
                Just(b"_bk;t=".to_vec()),
                Just(b"\r\n".to_vec()),
            ],
            0..12,
        ),
        cut in any::<prop::sample::Index>(),
    ) {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let raw: Vec<u8> = pieces.concat();
        let mut whole = LineSplitter::new(start);
        let mut expected = whole.push(&raw);
        expected.extend(whole.finish());
        let at = if raw.is_empty() { 0 } else { cut.index(raw.len() + 1) };
        let mut split = LineSplitter::new(start);
        let mut got = split.push(&raw[..at]);
        got.extend(split.push(&raw[at..]));
        got.extend(split.finish());
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(got.len(), raw.split(|b| *b == b'\n').count() - usize::from(raw.last() == Some(&b'\n') || raw.is_empty()));
        let _ = parse_log(&String::from_utf8_lossy(&raw), start, false);
    }
}
