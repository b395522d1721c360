//! Build-scoped job tokens (docs/adr/0003-job-tokens.md).
//!
//! A build's token is `stj_` + hex(HMAC-SHA256(key, "stitch-job-token:" +
//! build id)), where `key` is a random server secret created once per
//! database (`server_secrets.job_token_key`). Deriving instead of drawing
//! a fresh random token makes it reproducible: a redelivered trigger hands
//! the provider the same token its build already holds. The build record
//! keeps only hex(SHA-256(token)); presented tokens are hashed and compared
//! in constant time.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use stitch_core::BuildId;
use subtle::ConstantTimeEq;

/// Name of the server secret job tokens are derived from.
pub const SECRET_NAME: &str = "job_token_key";

/// Prefix of every job token, so a leaked one is recognisable.
const PREFIX: &str = "stj_";

/// Derives and checks job tokens. Cheap to clone.
#[derive(Clone)]
pub struct JobTokens {
    key: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for JobTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobTokens { key: <redacted> }")
    }
}

impl JobTokens {
    /// Tokens derived from `key` (the stored server secret).
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.into() }
    }

    /// A fresh random key for a database that has none yet.
    pub fn random_key() -> Vec<u8> {
        use rand::RngCore;
        let mut key = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        key
    }

    /// The token of build `id`: the same on every call and every restart.
    pub fn token_for(&self, id: &BuildId) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"stitch-job-token:");
        mac.update(id.as_str().as_bytes());
        format!("{PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// What the build record stores: hex(SHA-256(token)).
    pub fn hash(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// Whether `presented` is build `id`'s token. `stored_hash` is the
    /// record's hash; before the trigger stored one, the derived token's
    /// hash stands in. Constant time in the token's content.
    pub fn verify(&self, id: &BuildId, presented: &str, stored_hash: Option<&str>) -> bool {
        let expected = match stored_hash {
            Some(h) => h.to_string(),
            None => Self::hash(&self.token_for(id)),
        };
        let got = Self::hash(presented.trim());
        bool::from(got.as_bytes().ct_eq(expected.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_per_build_and_key() {
        let id = BuildId::new();
        let other = BuildId::new();
        let t = JobTokens::new(b"key-one");
        assert_eq!(t.token_for(&id), t.token_for(&id));
        assert!(t.token_for(&id).starts_with("stj_"));
        assert_ne!(t.token_for(&id), t.token_for(&other));
        assert_ne!(t.token_for(&id), JobTokens::new(b"key-two").token_for(&id));
        let hash = JobTokens::hash(&t.token_for(&id));
        assert_eq!(hash.len(), 64);
        assert!(t.verify(&id, &t.token_for(&id), Some(&hash)));
        assert!(t.verify(&id, &t.token_for(&id), None));
        assert!(!t.verify(&id, &t.token_for(&other), Some(&hash)));
        assert!(!t.verify(&other, &t.token_for(&id), None));
        assert!(!t.verify(&id, "", Some(&hash)));
        assert!(!format!("{t:?}").contains("key-one"));
    }
}
