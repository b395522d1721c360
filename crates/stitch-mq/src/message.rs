//! Messages, failures and the validation rules for names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::MqError;

/// Milliseconds since the Unix epoch; the queue's only time unit on disk.
pub type Millis = i64;

/// Current wall-clock time in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// A message to publish. `id` is the dedup key within (topic, partition):
/// name the *occasion* the message exists for, not just the entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Dedup key, unique per (topic, partition_key) for the retention horizon.
    pub id: String,
    /// Messages with one key are delivered in publish order, one window at a time.
    pub partition_key: String,
    /// Opaque bytes.
    pub payload: Vec<u8>,
    /// Free-form string metadata carried next to the payload.
    pub metadata: BTreeMap<String, String>,
}

impl Message {
    /// A message with no metadata.
    pub fn new(
        id: impl Into<String>,
        partition_key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            id: id.into(),
            partition_key: partition_key.into(),
            payload: payload.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds one metadata entry.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// Why a delivery failed: a human message plus optional structured detail.
/// Stored with dead letters so operators see what the consumer saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Human-readable reason.
    pub message: String,
    /// Structured context (subjects, codes…); `Null` when the failure is unattributed.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl Failure {
    /// A failure with a message and no structured detail.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            detail: serde_json::Value::Null,
        }
    }

    /// Attaches structured detail.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// Topic names: 1-200 chars of `[a-z0-9_.-]`, first char alphanumeric.
pub fn validate_topic(topic: &str) -> Result<(), MqError> {
    let ok = !topic.is_empty()
        && topic.len() <= 200
        && topic.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.'
        })
        && topic
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(MqError::InvalidTopic(topic.to_string()))
    }
}

/// Consumer group and subscriber names: 1-200 printable characters.
pub fn validate_name(kind: &'static str, value: &str) -> Result<(), MqError> {
    if value.is_empty() || value.len() > 200 || value.chars().any(char::is_control) {
        return Err(MqError::InvalidName {
            kind,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn validate_key(field: &'static str, value: &str) -> Result<(), MqError> {
    if value.is_empty() {
        return Err(MqError::InvalidMessage {
            field,
            reason: "must not be empty".into(),
        });
    }
    if value.len() > 255 {
        return Err(MqError::InvalidMessage {
            field,
            reason: format!("{} bytes is longer than 255", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(MqError::InvalidMessage {
            field,
            reason: "must not contain control characters".into(),
        });
    }
    Ok(())
}

/// Checks id, partition key, metadata and payload size of one message.
pub fn validate_message(msg: &Message, max_payload: usize) -> Result<(), MqError> {
    validate_key("id", &msg.id)?;
    validate_key("partition key", &msg.partition_key)?;
    let meta_size: usize = msg.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    let size = msg.payload.len() + meta_size;
    if size > max_payload {
        return Err(MqError::PayloadTooLarge {
            size,
            limit: max_payload,
        });
    }
    for key in msg.metadata.keys() {
        validate_key("metadata key", key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["trigger", "signal", "a", "build-signal.v2", "0_x"] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Trigger", "has space", "-lead", "ütf", &"x".repeat(201)] {
            assert!(
                matches!(validate_topic(bad), Err(MqError::InvalidTopic(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn message_limits() {
        let m = Message::new("id", "p", vec![0u8; 10]);
        assert!(validate_message(&m, 10).is_ok());
        assert!(matches!(
            validate_message(&m, 9),
            Err(MqError::PayloadTooLarge { size: 10, limit: 9 })
        ));
        assert!(validate_message(&Message::new("", "p", vec![]), 10).is_err());
        assert!(validate_message(&Message::new("i", "", vec![]), 10).is_err());
        assert!(validate_message(&Message::new("i\n", "p", vec![]), 10).is_err());
        assert!(validate_message(&Message::new("i".repeat(256), "p", vec![]), 10_000).is_err());
    }
}
