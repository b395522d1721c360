//! Resolving a DID to its atproto signing keys: `did:plc` through the PLC
//! directory, `did:web` through `/.well-known/did.json` (`http://` in dev).
//! Keys are `Multikey` values (`publicKeyMultibase`, base58btc `z…`,
//! multicodec-prefixed compressed points).

use std::time::Duration;

use serde::Deserialize;

/// A verification key of a DID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DidKey {
    /// secp256k1 (`ES256K`).
    K256(k256::ecdsa::VerifyingKey),
    /// NIST P-256 (`ES256`).
    P256(p256::ecdsa::VerifyingKey),
}

/// Why a DID could not be resolved to a key.
#[derive(Debug, thiserror::Error)]
pub enum DidError {
    /// The DID method is not plc or web, or the DID is malformed.
    #[error("unsupported DID {0:?}")]
    Unsupported(String),
    /// The directory or host could not be reached or answered an error.
    #[error("resolving {did}: {message}")]
    Fetch {
        /// The DID.
        did: String,
        /// What went wrong.
        message: String,
    },
    /// The document has no usable atproto key.
    #[error("DID document of {0} has no usable atproto signing key")]
    NoKey(String),
}

/// Multicodec varint prefix of a compressed secp256k1 public key (0xe7).
const K256_PREFIX: [u8; 2] = [0xe7, 0x01];
/// Multicodec varint prefix of a compressed P-256 public key (0x1200).
const P256_PREFIX: [u8; 2] = [0x80, 0x24];

/// Resolves DIDs over HTTP.
#[derive(Clone, Debug)]
pub struct DidResolver {
    client: reqwest::Client,
    plc_url: String,
    dev: bool,
}

#[derive(Deserialize)]
struct DidDocument {
    id: String,
    #[serde(default, rename = "verificationMethod")]
    verification_method: Vec<VerificationMethod>,
}

#[derive(Deserialize)]
struct VerificationMethod {
    id: String,
    #[serde(default, rename = "publicKeyMultibase")]
    public_key_multibase: Option<String>,
}

impl DidResolver {
    /// A resolver using `plc_url` for `did:plc`; `dev` resolves `did:web`
    /// over plain HTTP.
    pub fn new(plc_url: &str, dev: bool) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            client,
            plc_url: plc_url.trim_end_matches('/').to_string(),
            dev,
        }
    }

    /// The atproto signing keys of `did` (the `#atproto` method first).
    pub async fn keys(&self, did: &str) -> Result<Vec<DidKey>, DidError> {
        let url = self.document_url(did)?;
        let fetch = |message: String| DidError::Fetch {
            did: did.to_string(),
            message,
        };
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| fetch(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fetch(format!("{url} answered {}", resp.status())));
        }
        let doc: DidDocument = resp
            .json()
            .await
            .map_err(|e| fetch(format!("invalid DID document: {e}")))?;
        if doc.id != did {
            return Err(fetch(format!("the document is for {:?}", doc.id)));
        }
        let mut methods = doc.verification_method;
        // The atproto key is the one named `#atproto`; others may follow.
        methods.sort_by_key(|m| !m.id.ends_with("#atproto"));
        let keys: Vec<DidKey> = methods
            .iter()
            .filter_map(|m| m.public_key_multibase.as_deref())
            .filter_map(|mb| decode_multikey(mb).ok())
            .collect();
        if keys.is_empty() {
            return Err(DidError::NoKey(did.to_string()));
        }
        Ok(keys)
    }

    fn document_url(&self, did: &str) -> Result<String, DidError> {
        if let Some(id) = did.strip_prefix("did:plc:") {
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(DidError::Unsupported(did.to_string()));
            }
            return Ok(format!("{}/{did}", self.plc_url));
        }
        if let Some(host) = did.strip_prefix("did:web:") {
            // did:web encodes a port's colon as %3A; paths are not used by atproto.
            let host = host.replace("%3A", ":").replace("%3a", ":");
            if host.is_empty()
                || host.contains(['/', '?', '#', '@'])
                || host.contains(char::is_whitespace)
            {
                return Err(DidError::Unsupported(did.to_string()));
            }
            let scheme = if self.dev { "http" } else { "https" };
            return Ok(format!("{scheme}://{host}/.well-known/did.json"));
        }
        Err(DidError::Unsupported(did.to_string()))
    }
}

/// Decodes a `Multikey` `publicKeyMultibase` value.
pub fn decode_multikey(value: &str) -> Result<DidKey, String> {
    let b58 = value
        .strip_prefix('z')
        .ok_or_else(|| "only base58btc (z…) multibase keys are supported".to_string())?;
    let bytes = bs58::decode(b58).into_vec().map_err(|e| e.to_string())?;
    if let Some(point) = bytes.strip_prefix(&K256_PREFIX) {
        return k256::ecdsa::VerifyingKey::from_sec1_bytes(point)
            .map(DidKey::K256)
            .map_err(|e| e.to_string());
    }
    if let Some(point) = bytes.strip_prefix(&P256_PREFIX) {
        return p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
            .map(DidKey::P256)
            .map_err(|e| e.to_string());
    }
    Err("unknown multicodec key type".to_string())
}

/// Encodes a key as a `Multikey` `publicKeyMultibase` value (for DID
/// documents served by tests and tools).
pub fn encode_multikey(key: &DidKey) -> String {
    let mut bytes = Vec::with_capacity(35);
    match key {
        DidKey::K256(k) => {
            bytes.extend_from_slice(&K256_PREFIX);
            bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
        }
        DidKey::P256(k) => {
            bytes.extend_from_slice(&P256_PREFIX);
            bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
        }
    }
    format!("z{}", bs58::encode(bytes).into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multikeys_round_trip_and_known_vector_decodes() {
        // The secp256k1 example key of the atproto cryptography spec.
        let k = decode_multikey("zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc").unwrap();
        assert!(matches!(k, DidKey::K256(_)));
        assert_eq!(
            encode_multikey(&k),
            "zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"
        );
        // And the P-256 one.
        let p = decode_multikey("zDnaembgSGUhZULN2Caob4HLJPaxBh92N7rtH21TErzqf8HQo").unwrap();
        assert!(matches!(p, DidKey::P256(_)));
        assert!(decode_multikey("mAAAA").is_err());
        assert!(decode_multikey("z111").is_err());
    }

    #[test]
    fn only_plc_and_web_dids_resolve() {
        let r = DidResolver::new("http://plc.test/", false);
        assert_eq!(
            r.document_url("did:plc:abc123").unwrap(),
            "http://plc.test/did:plc:abc123"
        );
        assert_eq!(
            r.document_url("did:web:example.com%3A8443").unwrap(),
            "https://example.com:8443/.well-known/did.json"
        );
        assert!(r.document_url("did:key:z6Mk").is_err());
        assert!(r.document_url("did:plc:../x").is_err());
        assert!(r.document_url("did:web:evil.com/path").is_err());
    }
}
