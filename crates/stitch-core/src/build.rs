//! Build identity and the narrow status set every runner maps onto.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A stitch-minted build identifier: a ULID rendered in lower-case Crockford
/// base32 with a `b_` prefix. Time-ordered (lexicographic order follows
/// creation time), URL-safe and opaque to callers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BuildId(String);

/// Why a string is not a valid [`BuildId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid build id {0:?}: expected `b_` followed by 26 base32 characters")]
pub struct BuildIdError(pub String);

impl BuildId {
    const PREFIX: &'static str = "b_";

    /// Mint a new, time-ordered build id.
    pub fn new() -> Self {
        Self(format!(
            "{}{}",
            Self::PREFIX,
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        ))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the id was minted (millisecond precision), read back from the
    /// ULID's timestamp. Lets stateless runners (the fake) derive a timeline
    /// from the id alone, identically on every instance.
    pub fn created_at(&self) -> DateTime<Utc> {
        // Every BuildId is validated on construction, so the parse succeeds;
        // the epoch fallback only keeps this total without a panic path.
        let millis = self
            .0
            .strip_prefix(Self::PREFIX)
            .and_then(|rest| ulid::Ulid::from_string(rest).ok())
            .map(|u| u.timestamp_ms())
            .unwrap_or(0);
        i64::try_from(millis)
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(DateTime::UNIX_EPOCH)
    }
}

impl BuildId {
    /// What [`BuildId::from_str`] accepts, as a regular expression: `b_` and
    /// 26 Crockford base32 characters in either case (the OpenAPI schema
    /// states it, so clients know which ids can exist).
    pub const PATTERN: &'static str = "^b_[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$";
}

impl utoipa::PartialSchema for BuildId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some(Self::PATTERN))
            .description(Some(
                "A build id: `b_` and a ULID in Crockford base32, time-ordered.",
            ))
            .examples([serde_json::json!("b_01jz8k2m3n4p5q6r7s8t9v0w1x")])
            .into()
    }
}

impl utoipa::ToSchema for BuildId {}

impl Default for BuildId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BuildId {
    type Err = BuildIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| BuildIdError(s.to_string()))?;
        if rest.len() != 26 || ulid::Ulid::from_string(rest).is_err() {
            return Err(BuildIdError(s.to_string()));
        }
        // Canonical form is lower-case so ids compare and dedup byte-wise.
        Ok(Self(format!(
            "{}{}",
            Self::PREFIX,
            rest.to_ascii_lowercase()
        )))
    }
}

impl TryFrom<String> for BuildId {
    type Error = BuildIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BuildId> for String {
    fn from(id: BuildId) -> String {
        id.0
    }
}

/// The narrow status set. `Unknown` is **non-terminal**: a provider state
/// stitch does not understand never fails a build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// The provider reported a state stitch does not recognise. Not terminal.
    Unknown,
    /// Accepted but not executing yet (queued, scheduled, waiting for a slot).
    Accepted,
    /// Executing.
    Running,
    /// Finished and passed. Terminal.
    Succeeded,
    /// Finished and did not pass, or could not run. Terminal.
    Failed,
    /// Stopped on request before it finished. Terminal.
    Cancelled,
}

/// A status string that is not one of the six known names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown build status {0:?}")]
pub struct ParseStatusError(pub String);

impl BuildStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [BuildStatus; 6] = [
        BuildStatus::Unknown,
        BuildStatus::Accepted,
        BuildStatus::Running,
        BuildStatus::Succeeded,
        BuildStatus::Failed,
        BuildStatus::Cancelled,
    ];

    /// Succeeded, failed and cancelled are final; nothing moves a build out of them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildStatus::Succeeded | BuildStatus::Failed | BuildStatus::Cancelled
        )
    }

    /// The stable wire name (`"running"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Unknown => "unknown",
            BuildStatus::Accepted => "accepted",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BuildStatus {
    type Err = ParseStatusError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseStatusError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered_and_parse_back() {
        let a = BuildId::new();
        // Ids are ordered by their millisecond: take the first one of a
        // later millisecond (at most one millisecond of new ids).
        let b = std::iter::repeat_with(BuildId::new)
            .find(|b| b.created_at() > a.created_at())
            .unwrap();
        assert!(a < b);
        assert_eq!(a.as_str().parse::<BuildId>().unwrap(), a);
        assert!("b_nope".parse::<BuildId>().is_err());
        assert!("x_01hzzzzzzzzzzzzzzzzzzzzzzz".parse::<BuildId>().is_err());
    }

    #[test]
    fn created_at_reads_the_ulid_timestamp() {
        let before = Utc::now().timestamp_millis();
        let id = BuildId::new();
        let after = Utc::now().timestamp_millis();
        let at = id.created_at().timestamp_millis();
        assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
    }

    #[test]
    fn terminal_statuses() {
        let terminal: Vec<_> = BuildStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            vec![
                BuildStatus::Succeeded,
                BuildStatus::Failed,
                BuildStatus::Cancelled
            ]
        );
        for s in BuildStatus::ALL {
            assert_eq!(s.as_str().parse::<BuildStatus>().unwrap(), s);
        }
    }
}
