//! Verifying Buildkite webhook requests (`research/buildkite.md` §2.3).
//!
//! A webhook carries exactly one of:
//! - `X-Buildkite-Token: <token>`: the configured token in clear text,
//!   compared in constant time (no replay protection: prefer signatures);
//! - `X-Buildkite-Signature: timestamp=<unix s>,signature=<hex>`: parts in
//!   any order; the signature is HMAC-SHA256 keyed with the token over
//!   `"<timestamp>.<raw body>"`, compared in constant time, and the
//!   timestamp must lie within `max_age` of now (replay window).

use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::signature::{hmac_sha256_hex, verify_hmac_sha256};

/// The token header.
pub const TOKEN_HEADER: &str = "x-buildkite-token";
/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-buildkite-signature";
/// The event name header.
pub const EVENT_HEADER: &str = "x-buildkite-event";

/// How a webhook proves where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookMode {
    /// `X-Buildkite-Token`.
    Token,
    /// `X-Buildkite-Signature` (HMAC-SHA256 with a timestamp).
    Signature,
}

/// Why a webhook was refused. The messages never echo secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// Neither header is present (or only the one the mode does not use).
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// The token does not match.
    #[error("invalid X-Buildkite-Token")]
    BadToken,
    /// The signature header is not `timestamp=…,signature=…`.
    #[error("malformed X-Buildkite-Signature: {0}")]
    MalformedSignature(&'static str),
    /// The signature does not match the body.
    #[error("X-Buildkite-Signature does not match the request body")]
    BadSignature,
    /// The signed timestamp is outside the replay window.
    #[error("X-Buildkite-Signature timestamp is {age_secs} s away from now; at most {max_secs} s is accepted")]
    Stale {
        /// How far the timestamp is from now, seconds.
        age_secs: u64,
        /// The window, seconds.
        max_secs: u64,
    },
}

/// HMAC-SHA256 of `"<timestamp>.<body>"` keyed with `secret`, lower-case hex.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    hmac_sha256_hex(secret, &[timestamp.to_string().as_bytes(), b".", body])
}

/// Checks an `X-Buildkite-Token` value against `secret` in constant time.
/// The SHA-256 digests are compared, not the values: both are 32 bytes, so
/// the comparison's time says nothing about the secret's length either
/// (comparing slices of different lengths returns at once).
pub fn verify_token(secret: &[u8], presented: &[u8]) -> Result<(), WebhookError> {
    let (expected, got) = (Sha256::digest(secret), Sha256::digest(presented));
    if bool::from(expected.ct_eq(&got)) {
        Ok(())
    } else {
        Err(WebhookError::BadToken)
    }
}

/// Checks an `X-Buildkite-Signature` value for `body` against `secret`,
/// with `now` (unix seconds) and the replay window `max_age`.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    max_age: Duration,
) -> Result<(), WebhookError> {
    let (timestamp, signature) = parse_signature_header(header)?;
    let expected = hex::decode(signature)
        .map_err(|_| WebhookError::MalformedSignature("signature is not hex"))?;
    // Signature first: only a genuine timestamp is worth judging for age.
    if !verify_hmac_sha256(
        secret,
        &[timestamp.to_string().as_bytes(), b".", body],
        &expected,
    ) {
        return Err(WebhookError::BadSignature);
    }
    let age = now.abs_diff(timestamp);
    if age > max_age.as_secs() {
        return Err(WebhookError::Stale {
            age_secs: age,
            max_secs: max_age.as_secs(),
        });
    }
    Ok(())
}

/// `timestamp=…,signature=…` in any order → (timestamp, signature hex).
pub fn parse_signature_header(header: &str) -> Result<(i64, &str), WebhookError> {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            return Err(WebhookError::MalformedSignature("expected key=value parts"));
        };
        match key.trim() {
            "timestamp" => {
                let t = value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| WebhookError::MalformedSignature("timestamp is not an integer"))?;
                timestamp = Some(t);
            }
            "signature" => signature = Some(value.trim()),
            _ => {}
        }
    }
    match (timestamp, signature) {
        (Some(t), Some(s)) => Ok((t, s)),
        (None, _) => Err(WebhookError::MalformedSignature("no timestamp")),
        (_, None) => Err(WebhookError::MalformedSignature("no signature")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// go-buildkite `webhook_test.go` `TestValidatePayload`: a real signed
    /// `ping` (research/buildkite.md §2.3), recomputed independently.
    const SECRET: &str = "29b1ff5779c76bd48ba6705eb99ff970";
    const TIMESTAMP: i64 = 1642080837;
    const SIGNATURE: &str = "582d496ac2d869dd97a3101c4cda346288c49a742592daf582ec64c86449f79c";

    fn vector_body() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/buildkite/webhook_ping_signed.json"
        );
        let body = std::fs::read(path).unwrap();
        // The captured body has no trailing newline; editors must not add one.
        assert_eq!(body.last(), Some(&b'}'));
        body
    }

    #[test]
    fn the_documented_vector_verifies() {
        let body = vector_body();
        assert_eq!(sign(SECRET.as_bytes(), TIMESTAMP, &body), SIGNATURE);
        let header = format!("timestamp={TIMESTAMP},signature={SIGNATURE}");
        let window = Duration::from_secs(300);
        verify_signature(SECRET.as_bytes(), &header, &body, TIMESTAMP + 10, window).unwrap();
        // Any order, spaces tolerated.
        let swapped = format!("signature={SIGNATURE}, timestamp={TIMESTAMP}");
        verify_signature(SECRET.as_bytes(), &swapped, &body, TIMESTAMP, window).unwrap();
    }

    #[test]
    fn tampering_staleness_and_garbage_are_refused() {
        let body = vector_body();
        let window = Duration::from_secs(300);
        let header = format!("timestamp={TIMESTAMP},signature={SIGNATURE}");
        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert_eq!(
            verify_signature(SECRET.as_bytes(), &header, &tampered, TIMESTAMP, window),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"wrong secret", &header, &body, TIMESTAMP, window),
            Err(WebhookError::BadSignature)
        );
        // A replayed (genuine) signature outside the window.
        assert!(matches!(
            verify_signature(SECRET.as_bytes(), &header, &body, TIMESTAMP + 301, window),
            Err(WebhookError::Stale {
                age_secs: 301,
                max_secs: 300
            })
        ));
        assert!(matches!(
            verify_signature(SECRET.as_bytes(), &header, &body, TIMESTAMP - 301, window),
            Err(WebhookError::Stale { .. })
        ));
        // A moved timestamp breaks the signature.
        let moved = format!("timestamp={},signature={SIGNATURE}", TIMESTAMP + 1);
        assert_eq!(
            verify_signature(SECRET.as_bytes(), &moved, &body, TIMESTAMP, window),
            Err(WebhookError::BadSignature)
        );
        for bad in [
            "",
            "timestamp=1",
            "signature=ab",
            "timestamp=x,signature=ab",
            "timestamp=1,signature=zz",
            "nonsense",
        ] {
            assert!(
                matches!(
                    verify_signature(SECRET.as_bytes(), bad, &body, TIMESTAMP, window),
                    Err(WebhookError::MalformedSignature(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tokens_compare_exactly() {
        verify_token(b"s3cret", b"s3cret").unwrap();
        assert_eq!(
            verify_token(b"s3cret", b"s3cres"),
            Err(WebhookError::BadToken)
        );
        assert_eq!(
            verify_token(b"s3cret", b"s3cret "),
            Err(WebhookError::BadToken)
        );
        assert_eq!(verify_token(b"s3cret", b""), Err(WebhookError::BadToken));
    }
}
