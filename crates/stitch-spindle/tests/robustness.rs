//! Property tests: arbitrary bytes and structured-but-wrong input at the
//! spindle's network-facing parsers — service-auth JWTs, DID document keys,
//! knot and Jetstream frames and the records inside them, xrpc inputs. Each
//! must answer with a typed error (or a value), never panic.

use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use proptest::prelude::*;
use serde_json::{json, Value};
use stitch_spindle::auth::{check_claims, verify_signature, AuthError, MAX_TOKEN_LIFETIME};
use stitch_spindle::did::{decode_multikey, DidResolver};
use stitch_spindle::records::{
    CancelInput, CollaboratorRecord, JetstreamFrame, KnotFrame, MemberRecord, PipelineRecord,
    RepoRecord,
};

const AUDIENCE: &str = "did:web:spindle.example";
const METHOD: &str = "sh.tangled.pipeline.cancelPipeline";
const NOW: i64 = 1_767_225_600;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One runtime and one resolver for every case (building an HTTP client
/// per case would dominate the run). The resolver's PLC directory is a
/// closed loopback port: a token that passes the cheap checks fails at
/// resolution, quickly and offline.
static SHARED: LazyLock<(tokio::runtime::Runtime, DidResolver)> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let resolver = rt.block_on(async { DidResolver::new("http://127.0.0.1:9", false) });
    (rt, resolver)
});

fn verify(token: &str) -> Result<String, AuthError> {
    let (rt, resolver) = &*SHARED;
    // The cheap checks first, then resolution and the signature, as the
    // spindle's handlers run them.
    let checked = check_claims(token, AUDIENCE, METHOD, NOW)?;
    rt.block_on(verify_signature(resolver, checked))
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

/// Arbitrary JSON with the keys the records use mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("rkey".to_string()),
        Just("nsid".to_string()),
        Just("event".to_string()),
        Just("created".to_string()),
        Just("did".to_string()),
        Just("kind".to_string()),
        Just("commit".to_string()),
        Just("record".to_string()),
        Just("triggerMetadata".to_string()),
        Just("workflows".to_string()),
        Just("engine".to_string()),
        Just("name".to_string()),
        Just("knot".to_string()),
        Just("subject".to_string()),
        "[a-zA-Z_]{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn decode_all(bytes: &[u8]) {
    let _ = serde_json::from_slice::<KnotFrame>(bytes);
    let _ = serde_json::from_slice::<JetstreamFrame>(bytes);
    let _ = serde_json::from_slice::<PipelineRecord>(bytes);
    let _ = serde_json::from_slice::<RepoRecord>(bytes);
    let _ = serde_json::from_slice::<MemberRecord>(bytes);
    let _ = serde_json::from_slice::<CollaboratorRecord>(bytes);
    let _ = serde_json::from_slice::<CancelInput>(bytes);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tokens_of_any_text_are_malformed(token in ".{0,200}|[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}") {
        let r = verify(&token);
        let malformed = matches!(r, Err(AuthError::Malformed(_)));
        prop_assert!(malformed, "{r:?}");
    }

    /// Well-encoded tokens with wrong claims fail on the claim, before any
    /// resolution; right claims with a junk signature fail at resolution
    /// or signature — never with a panic, never accepted.
    #[test]
    fn tokens_with_wrong_claims_are_refused_by_kind(
        alg in prop_oneof![Just("ES256K"), Just("ES256"), Just("none"), Just("HS256")],
        header_extra in json_value(),
        aud in prop_oneof![Just(AUDIENCE.to_string()), ".{0,20}"],
        lxm in prop::option::of(prop_oneof![Just(METHOD.to_string()), ".{0,20}"]),
        exp in prop_oneof![Just(NOW + 60), any::<i64>()],
        iss in prop_oneof!["did:plc:[a-z2-7]{0,24}", ".{0,20}", "did:plc:[a-z]{4}#[a-z_]{0,10}"],
        signature in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let header = json!({"alg": alg, "typ": "JWT", "x": header_extra});
        let claims = json!({"iss": iss, "aud": aud, "exp": exp, "lxm": lxm});
        let token = format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(&signature)
        );
        let r = verify(&token);
        match r {
            Ok(did) => prop_assert!(false, "a junk signature was accepted for {did}"),
            Err(AuthError::Malformed(_)) => prop_assert!(alg == "none" || alg == "HS256"),
            Err(AuthError::Audience(a)) => prop_assert_eq!(a, aud),
            Err(AuthError::Method(_)) => prop_assert!(lxm.as_deref() != Some(METHOD)),
            Err(AuthError::Expired) => prop_assert!(exp <= NOW),
            Err(AuthError::Lifetime) => prop_assert!(exp - NOW > MAX_TOKEN_LIFETIME),
            Err(AuthError::Untrusted) => prop_assert!(false, "no trust check runs here"),
            Err(AuthError::Resolve(_) | AuthError::Signature) => {
                prop_assert_eq!(aud.as_str(), AUDIENCE);
                prop_assert!(exp > NOW);
            }
            Err(AuthError::Missing) => prop_assert!(false, "a token was given"),
        }
    }

    #[test]
    fn token_parts_of_any_bytes_are_malformed(
        header in prop::collection::vec(any::<u8>(), 0..64),
        claims in prop::collection::vec(any::<u8>(), 0..64),
        signature in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let token = format!("{}.{}.{}", b64(&header), b64(&claims), b64(&signature));
        let r = verify(&token);
        prop_assert!(r.is_err());
    }

    #[test]
    fn did_document_keys_of_any_text_decode_or_fail_typed(value in ".{0,80}|z[1-9A-HJ-NP-Za-km-z]{0,60}") {
        let _ = decode_multikey(&value);
    }

    #[test]
    fn frames_and_records_of_any_bytes_decode_or_fail_typed(body in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&body);
    }

    #[test]
    fn frames_and_records_of_the_wrong_shape_decode_or_fail_typed(value in json_value()) {
        decode_all(&serde_json::to_vec(&value).unwrap());
        if let Ok(frame) = serde_json::from_value::<KnotFrame>(value) {
            let _ = serde_json::from_value::<PipelineRecord>(frame.event);
        }
    }
}
