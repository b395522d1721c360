//! Property tests: every wire type survives serde, status names and HTTP
//! classification follow their rules for all inputs, validators accept
//! exactly what the documented rules allow.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use stitch_core::*;

fn status() -> impl Strategy<Value = BuildStatus> {
    proptest::sample::select(BuildStatus::ALL.to_vec())
}

fn build_id() -> impl Strategy<Value = BuildId> {
    // Any 48-bit timestamp and 80-bit randomness is a valid ULID.
    (0u64..(1 << 48), any::<u128>()).prop_map(|(ms, rand)| {
        let ulid = ulid::Ulid::from_parts(ms, rand);
        format!("b_{}", ulid.to_string().to_ascii_lowercase())
            .parse()
            .unwrap()
    })
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Years 1970..2200, any millisecond.
    (0i64..7_258_118_400_000).prop_map(|ms| Utc.timestamp_millis_opt(ms).unwrap())
}

fn valid_key() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,128}"
}

fn metadata() -> impl Strategy<Value = BuildMetadata> {
    proptest::collection::btree_map(valid_key(), ".{0,64}", 0..8).prop_map(BuildMetadata::from)
}

fn uri() -> impl Strategy<Value = String> {
    // Printable, non-empty, bounded: what validation accepts.
    "[^\\p{Cc}]{1,80}"
}

fn change_set() -> impl Strategy<Value = ChangeSet> {
    (
        proptest::collection::vec(uri(), 0..5),
        proptest::collection::vec(uri(), 1..5),
    )
        .prop_map(|(base, head)| ChangeSet::new(base, head))
}

fn log_line() -> impl Strategy<Value = LogLine> {
    let stream = prop_oneof![Just(OutputStream::Stdout), Just(OutputStream::Stderr)];
    let kind = prop_oneof![Just(StepKind::System), Just(StepKind::User)];
    prop_oneof![
        (any::<i64>(), stream, ".*", time()).prop_map(|(id, s, c, t)| LogLine::data(id, s, c, t)),
        (
            any::<i64>(),
            ".*",
            kind.clone(),
            proptest::option::of(".*"),
            time()
        )
            .prop_map(|(id, n, k, cmd, t)| LogLine::step_start(id, n, k, cmd, t)),
        (any::<i64>(), ".*", kind, time()).prop_map(|(id, n, k, t)| LogLine::step_end(id, n, k, t)),
    ]
}

fn round_trip<T>(value: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let json = serde_json::to_string(value).unwrap();
    serde_json::from_str(&json).unwrap()
}

proptest! {
    #[test]
    fn status_names_serde_and_parse_agree(s in status()) {
        let json = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(&json, &format!("\"{}\"", s.as_str()));
        prop_assert_eq!(round_trip(&s), s);
        prop_assert_eq!(s.as_str().parse::<BuildStatus>().unwrap(), s);
        prop_assert_eq!(s.is_terminal(), matches!(s, BuildStatus::Succeeded | BuildStatus::Failed | BuildStatus::Cancelled));
    }

    #[test]
    fn only_the_six_names_parse(name in "[a-z_]{0,12}") {
        let known = BuildStatus::ALL.iter().any(|s| s.as_str() == name);
        prop_assert_eq!(name.parse::<BuildStatus>().is_ok(), known);
        prop_assert_eq!(serde_json::from_str::<BuildStatus>(&format!("\"{name}\"")).is_ok(), known);
    }

    #[test]
    fn http_status_classification_rule(code in any::<u16>()) {
        let expect_retry = code == 408 || code == 429 || ((500..=599).contains(&code) && code != 501 && code != 505);
        prop_assert_eq!(classify_http_status(code) == ErrorClass::Retryable, expect_retry);
        prop_assert_eq!(RunnerError::http(code, "m").is_retryable(), expect_retry);
    }

    #[test]
    fn build_ids_round_trip(id in build_id()) {
        prop_assert_eq!(round_trip(&id), id.clone());
        prop_assert_eq!(id.as_str().to_ascii_uppercase().replacen("B_", "b_", 1).parse::<BuildId>().unwrap(), id);
    }

    #[test]
    fn log_lines_round_trip(line in log_line()) {
        prop_assert_eq!(round_trip(&line), line.clone());
        // The four always-present fields lead, in Tangled's order.
        let json = serde_json::to_string(&line).unwrap();
        let leads_with_kind = json.starts_with(r#"{"kind":"#);
        prop_assert!(leads_with_kind, "{}", json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for field in ["kind", "content", "time", "step_id"] {
            prop_assert!(v.get(field).is_some(), "{} missing in {}", field, json);
        }
    }

    #[test]
    fn log_time_has_millis_and_z(t in time()) {
        let line = LogLine::data(1, OutputStream::Stdout, "x", t);
        let v: serde_json::Value = serde_json::to_value(&line).unwrap();
        let s = v["time"].as_str().unwrap().to_string();
        prop_assert_eq!(s.len(), 24, "{}", s);
        prop_assert!(s.ends_with('Z'));
        prop_assert_eq!(&s[19..20], ".");
        prop_assert_eq!(DateTime::parse_from_rfc3339(&s).unwrap().with_timezone(&Utc), t);
    }

    #[test]
    fn valid_metadata_validates_and_round_trips(m in metadata()) {
        prop_assert_eq!(m.validate(), Ok(()));
        prop_assert_eq!(round_trip(&m), m);
    }

    #[test]
    fn metadata_key_rule(key in ".{0,140}") {
        let expect_ok = !key.is_empty()
            && key.len() <= 128
            && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
        prop_assert_eq!(validate_metadata_key(&key).is_ok(), expect_ok);
    }

    #[test]
    fn valid_change_sets_validate_and_round_trip(cs in change_set()) {
        prop_assert_eq!(cs.validate(), Ok(()));
        prop_assert_eq!(round_trip(&cs), cs);
    }

    #[test]
    fn a_control_char_anywhere_is_refused(cs in change_set(), at in any::<prop::sample::Index>(), c in "\\p{Cc}") {
        let mut cs = cs;
        let i = at.index(cs.head.len());
        cs.head[i].push_str(&c);
        let refused = matches!(
            cs.validate(),
            Err(ValidationError::ChangeControlChar { list: ChangeList::Head, .. })
        );
        prop_assert!(refused);
    }

    #[test]
    fn trigger_requests_round_trip(id in build_id(), queue in "[a-z]{1,10}", cs in change_set(), m in metadata()) {
        let req = TriggerRequest::new(id, queue, cs).with_metadata(m);
        prop_assert_eq!(req.validate(), Ok(()));
        prop_assert_eq!(round_trip(&req), req);
    }

    #[test]
    fn handles_refs_and_reports_round_trip(
        id in build_id(),
        ref_id in ".*",
        url in proptest::option::of(".*"),
        data in proptest::collection::btree_map(".*", ".*", 0..4),
        s in status(),
        m in metadata(),
    ) {
        let r = RunnerRef { id: ref_id, url, data: data.into_iter().collect::<BTreeMap<_, _>>() };
        prop_assert_eq!(round_trip(&r), r.clone());
        let h = BuildHandle::new(id, "q").with_ref(r);
        prop_assert_eq!(round_trip(&h), h);
        let report = StatusReport::new(s).with_metadata(m);
        prop_assert_eq!(round_trip(&report), report);
    }
}
