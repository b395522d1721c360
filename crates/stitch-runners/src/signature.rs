//! HMAC-SHA256, the MAC both providers sign webhooks with (Buildkite over
//! `"<timestamp>.<body>"`, GitHub over the body): one keyed MAC over a
//! sequence of byte slices, and its constant-time check.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The MAC of `parts` (concatenated) keyed with `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Lower-case hex of the MAC of `parts` keyed with `key`.
pub fn hmac_sha256_hex(key: &[u8], parts: &[&[u8]]) -> String {
    hex::encode(hmac_sha256(key, parts).finalize().into_bytes())
}

/// Whether `expected` is the MAC of `parts` keyed with `key`, compared in
/// constant time.
pub fn verify_hmac_sha256(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    hmac_sha256(key, parts).verify_slice(expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_concatenate() {
        let whole = hmac_sha256_hex(b"k", &[b"12.body"]);
        assert_eq!(hmac_sha256_hex(b"k", &[b"12", b".", b"body"]), whole);
        let raw = hex::decode(&whole).unwrap();
        assert!(verify_hmac_sha256(b"k", &[b"12.body"], &raw));
        assert!(!verify_hmac_sha256(b"k", &[b"12.bodY"], &raw));
        assert!(!verify_hmac_sha256(b"k", &[b"12.body"], &raw[..31]));
    }
}
