//! The promise-failure wire types, shared by the job API, its client and
//! the declaration to the stitch server.

use serde::{Deserialize, Serialize};

/// Longest accepted `reason`, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;

/// A declaration that the running job will finish with `exit_status`
/// (the body of both the job API route and the server endpoint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiseFailure {
    /// The non-zero exit status the job promises to finish with.
    pub exit_status: i32,
    /// Why, for humans. For a given exit status the first caller's reason wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why a promise is not valid. Nothing is declared for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPromise {
    /// Zero, negative or beyond `i32`.
    #[error("exit_status must be an integer from 1 to {max}, got {0}", max = i32::MAX)]
    ExitStatus(i64),
    /// `reason` is longer than [`MAX_REASON_BYTES`].
    #[error("reason is {0} bytes long; at most {MAX_REASON_BYTES} are accepted")]
    ReasonTooLong(usize),
}

impl PromiseFailure {
    /// A validated promise: `exit_status` in 1..=`i32::MAX`, `reason` at
    /// most [`MAX_REASON_BYTES`] (an empty reason counts as none).
    pub fn new(exit_status: i64, reason: Option<String>) -> Result<Self, InvalidPromise> {
        let exit_status = i32::try_from(exit_status)
            .ok()
            .filter(|n| *n > 0)
            .ok_or(InvalidPromise::ExitStatus(exit_status))?;
        let reason = reason.filter(|r| !r.trim().is_empty());
        if let Some(r) = &reason {
            if r.len() > MAX_REASON_BYTES {
                return Err(InvalidPromise::ReasonTooLong(r.len()));
            }
        }
        Ok(Self {
            exit_status,
            reason,
        })
    }

    /// Parses and validates a JSON body `{exit_status, reason?}`; unknown
    /// fields and non-integer statuses are refused.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        let raw: stitch_api::PromiseFailureBody =
            serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
        Self::new(raw.exit_status, raw.reason).map_err(|e| e.to_string())
    }
}

/// Whether this caller's request reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// This call declared the promise to the stitch server.
    Declared,
    /// An earlier or concurrent call with the same exit status did; this
    /// one shares its result and made no request.
    Debounced,
}

/// What the stitch server answered a declaration (after retries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declaration {
    /// The last HTTP status received; `None` when none was (network error).
    pub status: Option<u16>,
    /// Why it was not accepted, when it was not.
    pub error: Option<String>,
}

impl Declaration {
    /// The server took the declaration (2xx, no error).
    pub fn accepted(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// Whether the result may be reused for later calls: acceptance and
    /// terminal refusals (4xx except 429) stay; transient failures (5xx,
    /// 429, network, a 2xx that came with an error) are evicted so a later
    /// call declares again.
    pub fn is_final(&self) -> bool {
        match self.status {
            Some(s) if (400..500).contains(&s) && s != 429 => true,
            _ => self.accepted(),
        }
    }
}

/// The job API's answer: always HTTP 200, even when the server refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiseFailureResult {
    /// `declared` or `debounced`.
    pub outcome: Outcome,
    /// Whether the stitch server accepted the promise.
    pub accepted: bool,
    /// The stitch server's HTTP status, when one was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Why it was not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PromiseFailureResult {
    /// The result of `declaration` as seen by a caller with `outcome`.
    pub fn from_declaration(outcome: Outcome, declaration: &Declaration) -> Self {
        Self {
            outcome,
            accepted: declaration.accepted(),
            upstream_status: declaration.status,
            error: declaration.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(PromiseFailure::new(3, None).unwrap().exit_status, 3);
        for bad in [0, -1, i64::from(i32::MAX) + 1] {
            assert_eq!(
                PromiseFailure::new(bad, None),
                Err(InvalidPromise::ExitStatus(bad))
            );
        }
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        assert!(matches!(
            PromiseFailure::new(1, Some(long)),
            Err(InvalidPromise::ReasonTooLong(_))
        ));
        assert_eq!(
            PromiseFailure::new(1, Some("  ".into())).unwrap().reason,
            None
        );
    }

    #[test]
    fn json_bodies() {
        let p = PromiseFailure::from_json(br#"{"exit_status":2,"reason":"tests"}"#).unwrap();
        assert_eq!(p.reason.as_deref(), Some("tests"));
        for bad in [
            &br#"{"exit_status":1.5}"#[..],
            br#"{"exit_status":"1"}"#,
            br#"{"exit_status":0}"#,
            br#"{"reason":"x"}"#,
            br#"{"exit_status":1,"extra":true}"#,
            b"not json",
        ] {
            assert!(PromiseFailure::from_json(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn what_stays_cached() {
        let d = |status: Option<u16>, error: Option<&str>| Declaration {
            status,
            error: error.map(str::to_string),
        };
        assert!(d(Some(204), None).is_final());
        assert!(d(Some(409), Some("x")).is_final());
        assert!(d(Some(422), Some("x")).is_final());
        assert!(!d(Some(429), Some("x")).is_final());
        assert!(!d(Some(503), Some("x")).is_final());
        assert!(!d(None, Some("refused")).is_final());
        assert!(!d(Some(204), Some("odd")).is_final());
        let r = PromiseFailureResult::from_declaration(Outcome::Debounced, &d(Some(204), None));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"outcome":"debounced","accepted":true,"upstream_status":204}"#
        );
    }
}
