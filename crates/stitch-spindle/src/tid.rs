//! TIDs: atproto's timestamp identifiers used as record keys. 13 characters
//! of base32-sortable over 64 bits: a zero top bit, 53 bits of unix
//! microseconds, 10 bits of clock id. Minted strictly increasing within the
//! process so two records never share a key.

use std::sync::atomic::{AtomicU64, Ordering};

const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

static LAST: AtomicU64 = AtomicU64::new(0);

/// A fresh TID, greater than every TID this process minted before.
pub fn next_tid() -> String {
    let micros = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
    // A random clock id would do; a fixed one plus the monotonic bump keeps
    // keys ordered and unique within this process.
    let candidate = (micros & ((1 << 53) - 1)) << 10;
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = candidate.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return encode(next),
            Err(actual) => prev = actual,
        }
    }
}

fn encode(mut v: u64) -> String {
    let mut out = [0u8; 13];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    out.iter().map(|&b| b as char).collect()
}

/// Whether `s` has the shape of a TID (13 base32-sortable characters, the
/// first within the top-bit-zero range).
pub fn is_tid(s: &str) -> bool {
    s.len() == 13
        && s.bytes().all(|b| ALPHABET.contains(&b))
        && s.as_bytes()
            .first()
            .is_some_and(|b| b"234567abcdefghij".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tids_are_well_formed_and_increase() {
        let a = next_tid();
        let b = next_tid();
        assert!(is_tid(&a), "{a}");
        assert!(a < b);
        assert!(!is_tid("not-a-tid"));
        assert!(!is_tid("zzzzzzzzzzzzz"));
    }
}
