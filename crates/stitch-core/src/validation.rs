//! Input limits and the typed error every validator in this crate returns.
//!
//! Messages are written for the person who sent the request: they name the
//! offending field, say what is wrong and what is allowed.

use std::fmt;

/// The limits enforced on caller input. Public so the HTTP layer can document
/// them and size its body limits from them.
pub mod limits {
    /// Maximum change URIs in `base` and, separately, in `head`.
    pub const MAX_CHANGES_PER_LIST: usize = 1000;
    /// Maximum length of one change URI, in bytes.
    pub const MAX_CHANGE_URI_BYTES: usize = 2048;
    /// Maximum number of metadata keys.
    pub const MAX_METADATA_KEYS: usize = 256;
    /// Maximum length of one metadata key, in bytes.
    pub const MAX_METADATA_KEY_BYTES: usize = 128;
    /// Maximum length of one metadata value, in bytes (64 KiB).
    pub const MAX_METADATA_VALUE_BYTES: usize = 64 * 1024;
    /// Maximum length of a queue name, in bytes.
    pub const MAX_QUEUE_NAME_BYTES: usize = 128;
}

/// Which list of a [`ChangeSet`](crate::ChangeSet) a problem was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeList {
    /// The assumed-good prefix.
    Base,
    /// The changes under test.
    Head,
}

impl ChangeList {
    /// The field name as it appears on the wire (`"base"`, `"head"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeList::Base => "base",
            ChangeList::Head => "head",
        }
    }
}

impl fmt::Display for ChangeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a trigger request (change set, metadata, queue name) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// `head` has no entries.
    #[error("head must list at least one change URI: it names the changes this build verifies")]
    EmptyHead,
    /// `base` or `head` has more entries than allowed.
    #[error(
        "{list} lists {count} change URIs but at most {max} are allowed per list; \
         split the change set into several builds"
    )]
    TooManyChanges {
        /// The list that is too long.
        list: ChangeList,
        /// How many entries it has.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A change URI is the empty string.
    #[error("{list}[{index}] is empty; every change URI must be a non-empty string")]
    EmptyChange {
        /// The list holding the URI.
        list: ChangeList,
        /// Its position in that list.
        index: usize,
    },
    /// A change URI is longer than allowed.
    #[error("{list}[{index}] is {len} bytes long; change URIs are limited to {max} bytes")]
    ChangeTooLong {
        /// The list holding the URI.
        list: ChangeList,
        /// Its position in that list.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A change URI contains a control character (newline, tab, NUL, …).
    #[error(
        "{list}[{index}] contains the control character U+{code:04X}; \
         change URIs must not contain control characters (percent-encode them)"
    )]
    ChangeControlChar {
        /// The list holding the URI.
        list: ChangeList,
        /// Its position in that list.
        index: usize,
        /// The offending character's code point.
        code: u32,
    },
    /// More metadata keys than allowed.
    #[error("metadata has {count} keys but at most {max} are allowed")]
    TooManyMetadataKeys {
        /// How many keys were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A metadata key is the empty string.
    #[error(
        "a metadata key is empty; keys must be 1 to {max} bytes of letters, digits and _ . : -"
    )]
    EmptyMetadataKey {
        /// The key length limit.
        max: usize,
    },
    /// A metadata key is longer than allowed.
    #[error("metadata key {key:?} is {len} bytes long; keys are limited to {max} bytes")]
    MetadataKeyTooLong {
        /// The start of the key (long keys are shortened for the message).
        key: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A metadata key uses a character outside `[A-Za-z0-9_.:-]`.
    #[error("metadata key {key:?} contains {ch:?}; keys may only use letters, digits and _ . : -")]
    MetadataKeyInvalidChar {
        /// The start of the key (long keys are shortened for the message).
        key: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// A metadata value is longer than allowed.
    #[error(
        "metadata value for key {key:?} is {len} bytes long; values are limited to {max} bytes"
    )]
    MetadataValueTooLong {
        /// The key whose value is too long.
        key: String,
        /// The value's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The queue name is empty.
    #[error("queue name is empty; name the queue the build belongs to")]
    EmptyQueue,
    /// The queue name is malformed.
    #[error("queue name {name:?} is invalid: {reason}")]
    InvalidQueueName {
        /// The start of the name (long names are shortened for the message).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ValidationError {
    /// The path of the offending field in a trigger request, e.g. `head[3]`,
    /// `metadata.ticket` or `queue`, for error bodies that point at a field.
    pub fn field(&self) -> String {
        match self {
            ValidationError::EmptyHead => "head".to_string(),
            ValidationError::TooManyChanges { list, .. } => list.to_string(),
            ValidationError::EmptyChange { list, index }
            | ValidationError::ChangeTooLong { list, index, .. }
            | ValidationError::ChangeControlChar { list, index, .. } => format!("{list}[{index}]"),
            ValidationError::TooManyMetadataKeys { .. }
            | ValidationError::EmptyMetadataKey { .. } => "metadata".to_string(),
            ValidationError::MetadataKeyTooLong { key, .. }
            | ValidationError::MetadataKeyInvalidChar { key, .. }
            | ValidationError::MetadataValueTooLong { key, .. } => format!("metadata.{key}"),
            ValidationError::EmptyQueue | ValidationError::InvalidQueueName { .. } => {
                "queue".to_string()
            }
        }
    }
}

/// Shorten untrusted text for an error message so a 1 MiB key does not
/// become a 1 MiB error body. Cuts on a char boundary.
pub(crate) fn preview(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Check a queue name: 1 to [`limits::MAX_QUEUE_NAME_BYTES`] bytes, no
/// control characters and no `/` (queue names appear in URL paths).
pub fn validate_queue_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::EmptyQueue);
    }
    let reason = if name.len() > limits::MAX_QUEUE_NAME_BYTES {
        Some("longer than 128 bytes")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.contains('/') {
        Some("contains '/', which cannot appear in a URL path segment")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ValidationError::InvalidQueueName {
            name: preview(name),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_cuts_on_char_boundary() {
        let long = "é".repeat(100);
        let p = preview(&long);
        assert!(p.ends_with('…'));
        assert!(p.len() <= 64 + '…'.len_utf8());
        assert_eq!(preview("short"), "short");
    }

    #[test]
    fn queue_names() {
        assert!(validate_queue_name("default").is_ok());
        assert!(validate_queue_name("team.app-ci_2").is_ok());
        assert_eq!(validate_queue_name(""), Err(ValidationError::EmptyQueue));
        let err = validate_queue_name("a/b").unwrap_err();
        assert_eq!(err.field(), "queue");
        assert!(err.to_string().contains("'/'"), "{err}");
        assert!(validate_queue_name("a\nb").is_err());
        assert!(validate_queue_name(&"q".repeat(129)).is_err());
        assert!(validate_queue_name(&"q".repeat(128)).is_ok());
    }
}
