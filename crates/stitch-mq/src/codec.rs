//! How message metadata and failure details are stored as text, shared by
//! the SQL backends so a row written by one reads the same in another.

use std::collections::BTreeMap;

use crate::error::{MqError, MqResult};

/// Metadata as a JSON object, or `None` when empty (most messages).
pub(crate) fn encode_meta(meta: &BTreeMap<String, String>) -> Option<String> {
    if meta.is_empty() {
        None
    } else {
        serde_json::to_string(meta).ok()
    }
}

/// The inverse of [`encode_meta`]; unreadable JSON is corruption.
pub(crate) fn decode_meta(raw: Option<String>) -> MqResult<BTreeMap<String, String>> {
    match raw {
        None => Ok(BTreeMap::new()),
        Some(s) => {
            serde_json::from_str(&s).map_err(|e| MqError::Corrupt(format!("message metadata: {e}")))
        }
    }
}

/// A failure's structured detail (`null` when absent or unreadable).
pub(crate) fn decode_detail(raw: Option<String>) -> serde_json::Value {
    raw.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// A failure's structured detail as stored (`None` for `null`).
pub(crate) fn encode_detail(detail: &serde_json::Value) -> Option<String> {
    if detail.is_null() {
        None
    } else {
        Some(detail.to_string())
    }
}
