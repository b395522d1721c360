//! Outcome markers: `stitch-fake=<token>` inside a head change URI selects
//! what the fake CI does with the build.

use std::fmt;

/// The text that introduces a marker inside a change URI.
pub const MARKER_PREFIX: &str = "stitch-fake=";

/// One recognised marker token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FakeMarker {
    /// The build runs normally and fails at the end (`exit_status` 1).
    Fail,
    /// `trigger` answers HTTP 503 every time (a retryable provider outage).
    TriggerError,
    /// `trigger` refuses the build as an invalid request (permanent).
    TriggerReject,
    /// `status` (and `logs`) answer HTTP 503 every time.
    StatusError,
    /// The run takes `slow_factor` times longer.
    Slow,
    /// The build runs until cancelled.
    Hang,
    /// After acceptance the provider reports a state stitch does not know,
    /// until cancelled.
    Unknown,
}

impl FakeMarker {
    /// Every marker, for help texts.
    pub const ALL: [FakeMarker; 7] = [
        FakeMarker::Fail,
        FakeMarker::TriggerError,
        FakeMarker::TriggerReject,
        FakeMarker::StatusError,
        FakeMarker::Slow,
        FakeMarker::Hang,
        FakeMarker::Unknown,
    ];

    /// The token as written after `stitch-fake=`.
    pub fn token(self) -> &'static str {
        match self {
            FakeMarker::Fail => "fail",
            FakeMarker::TriggerError => "trigger-error",
            FakeMarker::TriggerReject => "trigger-reject",
            FakeMarker::StatusError => "status-error",
            FakeMarker::Slow => "slow",
            FakeMarker::Hang => "hang",
            FakeMarker::Unknown => "unknown",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.token() == token)
    }
}

impl fmt::Display for FakeMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{MARKER_PREFIX}{}", self.token())
    }
}

/// A `stitch-fake=` token that is not one of [`FakeMarker::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown fake marker {MARKER_PREFIX}{token} in head[{index}]; valid markers: {}",
    valid_markers()
)]
pub struct UnknownMarker {
    /// The unrecognised token.
    pub token: String,
    /// Which head URI carried it.
    pub index: usize,
}

fn valid_markers() -> String {
    FakeMarker::ALL
        .iter()
        .map(|m| m.token())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every marker token in one URI. A token runs from after `stitch-fake=` to
/// the next `&` or `#` (so markers work inside query strings and fragments).
pub fn marker_tokens(uri: &str) -> impl Iterator<Item = &str> {
    uri.match_indices(MARKER_PREFIX).map(move |(at, _)| {
        let rest = &uri[at + MARKER_PREFIX.len()..];
        let end = rest.find(['&', '#']).unwrap_or(rest.len());
        &rest[..end]
    })
}

/// All markers found in the head URIs, in order of appearance.
pub fn parse_markers(head: &[String]) -> Result<Vec<FakeMarker>, UnknownMarker> {
    let mut found = Vec::new();
    for (index, uri) in head.iter().enumerate() {
        for token in marker_tokens(uri) {
            let marker = FakeMarker::from_token(token).ok_or_else(|| UnknownMarker {
                token: token.to_string(),
                index,
            })?;
            found.push(marker);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uris: &[&str]) -> Vec<String> {
        uris.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tokens_end_at_ampersand_or_hash() {
        let uri = "https://git.example/c/1?stitch-fake=fail&x=1#stitch-fake=slow";
        assert_eq!(marker_tokens(uri).collect::<Vec<_>>(), vec!["fail", "slow"]);
        assert_eq!(
            marker_tokens("c?stitch-fake=hang#frag").collect::<Vec<_>>(),
            vec!["hang"]
        );
        assert_eq!(marker_tokens("plain").count(), 0);
    }

    #[test]
    fn markers_across_uris() {
        let found =
            parse_markers(&head(&["a?stitch-fake=slow", "b", "c#stitch-fake=fail"])).unwrap();
        assert_eq!(found, vec![FakeMarker::Slow, FakeMarker::Fail]);
        for m in FakeMarker::ALL {
            assert_eq!(parse_markers(&head(&[&format!("x?{m}")])).unwrap(), vec![m]);
        }
    }

    #[test]
    fn unknown_marker_lists_the_valid_ones() {
        let err = parse_markers(&head(&["a", "b?stitch-fake=explode"])).unwrap_err();
        assert_eq!(err.index, 1);
        let msg = err.to_string();
        assert!(msg.contains("stitch-fake=explode in head[1]"), "{msg}");
        assert!(
            msg.contains("fail, trigger-error, trigger-reject, status-error, slow, hang, unknown"),
            "{msg}"
        );
        assert!(parse_markers(&head(&["a?stitch-fake="])).is_err());
    }
}
