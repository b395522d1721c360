//! The change set a build verifies: an assumed-good `base` prefix and the
//! `head` changes under test, both ordered lists of opaque change URIs.

use serde::{Deserialize, Serialize};

use crate::validation::{limits, ChangeList, ValidationError};

/// Ordered change URIs. stitch never interprets them; the CI pipeline does.
///
/// `base` is the dependency prefix assumed good (a runner may cache it or
/// attribute failures to it); `head` is what the build verifies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChangeSet {
    /// Assumed-good prefix, applied first. May be empty.
    #[serde(default)]
    pub base: Vec<String>,
    /// Changes under test, applied after `base`. Must not be empty.
    // A missing `head` deserializes as empty so `validate` can say what is
    // wrong in its own words instead of serde's "missing field".
    #[serde(default)]
    pub head: Vec<String>,
}

impl ChangeSet {
    /// A change set from its two lists.
    pub fn new(base: Vec<String>, head: Vec<String>) -> Self {
        Self { base, head }
    }

    /// A change set with an empty base.
    pub fn head_only<I, S>(head: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            base: Vec::new(),
            head: head.into_iter().map(Into::into).collect(),
        }
    }

    /// Check the limits: `head` non-empty; each list at most
    /// `MAX_CHANGES_PER_LIST` entries; each URI non-empty, at most
    /// `MAX_CHANGE_URI_BYTES` bytes and free of control characters.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.head.is_empty() {
            return Err(ValidationError::EmptyHead);
        }
        validate_list(ChangeList::Base, &self.base)?;
        validate_list(ChangeList::Head, &self.head)
    }
}

fn validate_list(list: ChangeList, uris: &[String]) -> Result<(), ValidationError> {
    if uris.len() > limits::MAX_CHANGES_PER_LIST {
        return Err(ValidationError::TooManyChanges {
            list,
            count: uris.len(),
            max: limits::MAX_CHANGES_PER_LIST,
        });
    }
    for (index, uri) in uris.iter().enumerate() {
        if uri.is_empty() {
            return Err(ValidationError::EmptyChange { list, index });
        }
        if uri.len() > limits::MAX_CHANGE_URI_BYTES {
            return Err(ValidationError::ChangeTooLong {
                list,
                index,
                len: uri.len(),
                max: limits::MAX_CHANGE_URI_BYTES,
            });
        }
        if let Some(c) = uri.chars().find(|c| c.is_control()) {
            return Err(ValidationError::ChangeControlChar {
                list,
                index,
                code: u32::from(c),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uris(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("https://git.example/c/{i}"))
            .collect()
    }

    #[test]
    fn valid_change_set() {
        let cs = ChangeSet::new(uris(3), uris(1000));
        assert_eq!(cs.validate(), Ok(()));
        assert_eq!(ChangeSet::head_only(["x"]).validate(), Ok(()));
    }

    #[test]
    fn empty_head_says_what_head_is_for() {
        let err = ChangeSet::new(uris(2), vec![]).validate().unwrap_err();
        assert_eq!(err, ValidationError::EmptyHead);
        assert_eq!(err.field(), "head");
        assert!(err.to_string().contains("at least one change URI"), "{err}");
    }

    #[test]
    fn too_many_changes_in_either_list() {
        let err = ChangeSet::new(uris(1001), uris(1)).validate().unwrap_err();
        assert_eq!(
            err,
            ValidationError::TooManyChanges {
                list: ChangeList::Base,
                count: 1001,
                max: 1000
            }
        );
        assert!(err.to_string().contains("split the change set"), "{err}");
        let err = ChangeSet::new(vec![], uris(1001)).validate().unwrap_err();
        assert_eq!(err.field(), "head");
    }

    #[test]
    fn empty_uri_is_located() {
        let mut head = uris(3);
        head[2] = String::new();
        let err = ChangeSet::new(vec![], head).validate().unwrap_err();
        assert_eq!(
            err,
            ValidationError::EmptyChange {
                list: ChangeList::Head,
                index: 2
            }
        );
        assert_eq!(err.field(), "head[2]");
    }

    #[test]
    fn over_long_uri_is_located() {
        let mut base = uris(2);
        base[1] = "u".repeat(2049);
        let err = ChangeSet::new(base, uris(1)).validate().unwrap_err();
        assert_eq!(
            err,
            ValidationError::ChangeTooLong {
                list: ChangeList::Base,
                index: 1,
                len: 2049,
                max: 2048
            }
        );
        assert_eq!(
            err.to_string(),
            "base[1] is 2049 bytes long; change URIs are limited to 2048 bytes"
        );
        assert_eq!(ChangeSet::head_only(["u".repeat(2048)]).validate(), Ok(()));
    }

    #[test]
    fn control_chars_are_refused() {
        let err = ChangeSet::head_only(["ok", "bad\nuri"])
            .validate()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::ChangeControlChar {
                list: ChangeList::Head,
                index: 1,
                code: 0x0a
            }
        );
        assert!(err.to_string().contains("U+000A"), "{err}");
    }

    #[test]
    fn missing_lists_deserialize_empty() {
        let cs: ChangeSet = serde_json::from_str("{}").unwrap();
        assert_eq!(cs.validate(), Err(ValidationError::EmptyHead));
        let cs: ChangeSet = serde_json::from_str(r#"{"head":["a"]}"#).unwrap();
        assert_eq!(cs, ChangeSet::head_only(["a"]));
    }
}
