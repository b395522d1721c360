//! Free-form build metadata: caller keys in at trigger time, runner keys out
//! of `status`.

use std::collections::btree_map;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validation::{limits, preview, ValidationError};

/// Well-known metadata keys that runners and stitch itself write.
pub mod keys {
    /// A human-facing URL of the build on the provider.
    pub const URL: &str = "url";
    /// Why a build failed, in words a user can act on.
    pub const ERROR: &str = "error";
    /// The process/job exit status, as a decimal string.
    pub const EXIT_STATUS: &str = "exit_status";
    /// The signal that killed the process (e.g. `SIGKILL`).
    pub const SIGNAL: &str = "signal";
    /// The exit status a running job promised to fail with (early failure).
    pub const PROMISED_EXIT_STATUS: &str = "promised_exit_status";
    /// When the failure was promised (RFC 3339).
    pub const PROMISED_EXIT_STATUS_AT: &str = "promised_exit_status_at";
    /// Why the failure was promised, when the job said.
    pub const PROMISED_EXIT_STATUS_REASON: &str = "promised_exit_status_reason";
}

/// Free-form `string → string` metadata, ordered by key so serialized output
/// is stable. Serializes as a plain JSON object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuildMetadata(BTreeMap<String, String>);

impl BuildMetadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Set `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }

    /// Builder form of [`insert`](Self::insert).
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> btree_map::Iter<'_, String, String> {
        self.0.iter()
    }

    /// Copy every entry of `other` into `self`; `other` wins on conflicts
    /// (used to lay runner keys over caller keys).
    pub fn merge(&mut self, other: &BuildMetadata) {
        for (k, v) in other.iter() {
            self.0.insert(k.clone(), v.clone());
        }
    }

    /// The underlying map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Take the underlying map.
    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }

    /// Check caller-supplied metadata against [`limits`]: at most
    /// `MAX_METADATA_KEYS` keys, each a valid key (see
    /// [`validate_metadata_key`]) with a value of at most
    /// `MAX_METADATA_VALUE_BYTES` bytes.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.0.len() > limits::MAX_METADATA_KEYS {
            return Err(ValidationError::TooManyMetadataKeys {
                count: self.0.len(),
                max: limits::MAX_METADATA_KEYS,
            });
        }
        for (key, value) in &self.0 {
            validate_metadata_key(key)?;
            if value.len() > limits::MAX_METADATA_VALUE_BYTES {
                return Err(ValidationError::MetadataValueTooLong {
                    key: key.clone(),
                    len: value.len(),
                    max: limits::MAX_METADATA_VALUE_BYTES,
                });
            }
        }
        Ok(())
    }
}

/// Check one metadata key: 1 to `MAX_METADATA_KEY_BYTES` bytes of
/// `[A-Za-z0-9_.:-]`. The character set keeps keys safe to use as
/// environment-variable suffixes, URL query names and Buildkite meta-data keys.
pub fn validate_metadata_key(key: &str) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::EmptyMetadataKey {
            max: limits::MAX_METADATA_KEY_BYTES,
        });
    }
    if key.len() > limits::MAX_METADATA_KEY_BYTES {
        return Err(ValidationError::MetadataKeyTooLong {
            key: preview(key),
            len: key.len(),
            max: limits::MAX_METADATA_KEY_BYTES,
        });
    }
    if let Some(ch) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(ValidationError::MetadataKeyInvalidChar {
            key: preview(key),
            ch,
        });
    }
    Ok(())
}

impl From<BTreeMap<String, String>> for BuildMetadata {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }
}

impl From<BuildMetadata> for BTreeMap<String, String> {
    fn from(m: BuildMetadata) -> Self {
        m.0
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for BuildMetadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for BuildMetadata {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.0
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl IntoIterator for BuildMetadata {
    type Item = (String, String);
    type IntoIter = btree_map::IntoIter<String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a BuildMetadata {
    type Item = (&'a String, &'a String);
    type IntoIter = btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_keys() {
        for key in [
            "a",
            "ticket",
            "stitch:build_id",
            "a.b-c_d:9",
            &"k".repeat(128),
        ] {
            assert_eq!(validate_metadata_key(key), Ok(()), "{key}");
        }
    }

    #[test]
    fn empty_key_is_refused_with_the_allowed_set() {
        let err = validate_metadata_key("").unwrap_err();
        assert_eq!(err, ValidationError::EmptyMetadataKey { max: 128 });
        assert!(err.to_string().contains("letters, digits"), "{err}");
        assert_eq!(err.field(), "metadata");
    }

    #[test]
    fn long_key_is_refused_and_shortened_in_the_message() {
        let key = "k".repeat(10_000);
        let err = validate_metadata_key(&key).unwrap_err();
        assert!(matches!(
            err,
            ValidationError::MetadataKeyTooLong {
                len: 10_000,
                max: 128,
                ..
            }
        ));
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn key_with_bad_char_names_the_char() {
        let err = validate_metadata_key("has space").unwrap_err();
        assert_eq!(
            err,
            ValidationError::MetadataKeyInvalidChar {
                key: "has space".into(),
                ch: ' '
            }
        );
        assert!(err.to_string().contains("' '"), "{err}");
        assert_eq!(err.field(), "metadata.has space");
        assert!(validate_metadata_key("ключ").is_err());
        assert!(validate_metadata_key("a/b").is_err());
    }

    #[test]
    fn value_limit() {
        let ok = BuildMetadata::new().with("k", "v".repeat(64 * 1024));
        assert_eq!(ok.validate(), Ok(()));
        let too_long = BuildMetadata::new().with("k", "v".repeat(64 * 1024 + 1));
        let err = too_long.validate().unwrap_err();
        assert!(matches!(
            err,
            ValidationError::MetadataValueTooLong {
                len: 65537,
                max: 65536,
                ..
            }
        ));
        assert_eq!(err.field(), "metadata.k");
    }

    #[test]
    fn key_count_limit() {
        let ok: BuildMetadata = (0..256).map(|i| (format!("k{i}"), "v")).collect();
        assert_eq!(ok.validate(), Ok(()));
        let too_many: BuildMetadata = (0..257).map(|i| (format!("k{i}"), "v")).collect();
        assert_eq!(
            too_many.validate(),
            Err(ValidationError::TooManyMetadataKeys {
                count: 257,
                max: 256
            })
        );
    }

    #[test]
    fn serializes_as_a_plain_sorted_object() {
        let m = BuildMetadata::new().with("z", "1").with("a", "2");
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":"2","z":"1"}"#);
        let back: BuildMetadata = serde_json::from_str(r#"{"z":"1","a":"2"}"#).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn merge_lets_the_argument_win() {
        let mut caller = BuildMetadata::new()
            .with("url", "old")
            .with("ticket", "T-1");
        caller.merge(&BuildMetadata::new().with("url", "new"));
        assert_eq!(caller.get("url"), Some("new"));
        assert_eq!(caller.get("ticket"), Some("T-1"));
    }
}
