//! Resolving a DID to its atproto signing keys: `did:plc` through the PLC
//! directory, `did:web` through `/.well-known/did.json` (`http://` in dev).
//! Keys are `Multikey` values (`publicKeyMultibase`, base58btc `z…`,
//! multicodec-prefixed compressed points).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A verification key of a DID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DidKey {
    /// secp256k1 (`ES256K`).
    K256(k256::ecdsa::VerifyingKey),
    /// NIST P-256 (`ES256`).
    P256(p256::ecdsa::VerifyingKey),
}

/// Why a DID could not be resolved to a key. The messages are safe to
/// send to callers: they never carry a URL, an address or an upstream
/// answer (those are logged instead).
#[derive(Debug, thiserror::Error)]
pub enum DidError {
    /// The DID method is not plc or web, the DID is malformed, or its
    /// did:web host is not a public DNS name.
    #[error("unsupported DID {0:?}")]
    Unsupported(String),
    /// The directory or host could not be reached, answered an error, or
    /// sent something that is not a DID document of this DID.
    #[error("could not resolve {0}")]
    Fetch(String),
    /// The document has no usable atproto key.
    #[error("DID document of {0} has no usable atproto signing key")]
    NoKey(String),
}

/// Multicodec varint prefix of a compressed secp256k1 public key (0xe7).
const K256_PREFIX: [u8; 2] = [0xe7, 0x01];
/// Multicodec varint prefix of a compressed P-256 public key (0x1200).
const P256_PREFIX: [u8; 2] = [0x80, 0x24];

/// Largest DID document read; larger answers are refused.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// How long resolved keys are reused before the document is fetched again.
pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// Most DIDs whose keys are kept at once.
pub const CACHE_CAPACITY: usize = 1024;
/// Time limit of one document fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves DIDs over HTTP: without redirects, size-capped, cached. did:web
/// hosts must be DNS names that resolve to public addresses (outside
/// `dev`).
#[derive(Clone)]
pub struct DidResolver {
    /// For the configured PLC directory (trusted by the operator).
    plc_client: reqwest::Client,
    /// For did:web hosts: only public addresses outside `dev`.
    web_client: reqwest::Client,
    plc_url: String,
    dev: bool,
    cache: Arc<Mutex<KeyCache>>,
}

impl std::fmt::Debug for DidResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DidResolver")
            .field("plc_url", &self.plc_url)
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
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

/// Resolved keys by DID, each until its expiry; at most [`CACHE_CAPACITY`].
#[derive(Default)]
struct KeyCache {
    entries: HashMap<String, (Instant, Vec<DidKey>)>,
}

impl KeyCache {
    fn get(&mut self, did: &str, now: Instant) -> Option<Vec<DidKey>> {
        match self.entries.get(did) {
            Some((expires, keys)) if *expires > now => Some(keys.clone()),
            Some(_) => {
                self.entries.remove(did);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, did: &str, keys: Vec<DidKey>, now: Instant) {
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries.retain(|_, (expires, _)| *expires > now);
        }
        if self.entries.len() >= CACHE_CAPACITY {
            // Still full of live entries: drop the one expiring first.
            let first = self
                .entries
                .iter()
                .min_by_key(|(_, (expires, _))| *expires)
                .map(|(k, _)| k.clone());
            if let Some(k) = first {
                self.entries.remove(&k);
            }
        }
        self.entries
            .insert(did.to_string(), (now + CACHE_TTL, keys));
    }
}

/// A DNS resolver for did:web fetches that only hands out public
/// addresses, so a DNS name cannot point the spindle at loopback, private
/// or link-local services.
struct PublicAddresses;

impl reqwest::dns::Resolve for PublicAddresses {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = found.filter(|a| is_public(&a.ip())).collect();
            if public.is_empty() {
                return Err("the name resolves to no public address".into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether `ip` is a public unicast address (not loopback, private,
/// link-local, shared, documentation, multicast or unspecified).
pub fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(&IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// Checks a host named by a DID or a repo record (`name` or `name:port`):
/// outside `dev` it must be a DNS name of at least two labels — no IP
/// literal, no `localhost` — made of letters, digits and hyphens.
pub fn check_host(host: &str, dev: bool) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (host, None),
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{host:?} has an invalid port"));
        }
    }
    if dev {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'));
        return if ok {
            Ok(())
        } else {
            Err(format!("{host:?} is not a host name"))
        };
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(format!("{host:?} is an IP address, not a DNS name"));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Err(format!("{host:?} is a loopback name"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    // The last label cannot be all digits: that would be an IPv4 literal
    // in another spelling (`127.1`, `0x7f.1`).
    let tld_ok = labels
        .last()
        .is_some_and(|t| !t.chars().all(|c| c.is_ascii_digit()) && !t.starts_with("0x"));
    if name.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) || !tld_ok {
        return Err(format!("{host:?} is not a DNS name"));
    }
    Ok(())
}

impl DidResolver {
    /// A resolver using `plc_url` for `did:plc`; `dev` resolves `did:web`
    /// over plain HTTP and allows any host.
    pub fn new(plc_url: &str, dev: bool) -> Self {
        let builder = || {
            reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
        };
        let plc_client = builder().build().unwrap_or_default();
        let web_client = if dev {
            builder().build()
        } else {
            builder().dns_resolver(Arc::new(PublicAddresses)).build()
        }
        // Building only fails without a TLS backend; the default client
        // then fails every request, which refuses every token.
        .unwrap_or_default();
        Self {
            plc_client,
            web_client,
            plc_url: plc_url.trim_end_matches('/').to_string(),
            dev,
            cache: Arc::default(),
        }
    }

    /// The atproto signing keys of `did` (the `#atproto` method first),
    /// from the cache when fetched within [`CACHE_TTL`].
    pub async fn keys(&self, did: &str) -> Result<Vec<DidKey>, DidError> {
        let (url, web) = self.document_url(did)?;
        if let Some(keys) = self.lock_cache().get(did, Instant::now()) {
            return Ok(keys);
        }
        let client = if web {
            &self.web_client
        } else {
            &self.plc_client
        };
        let body = match fetch_capped(client, &url).await {
            Ok(body) => body,
            Err(why) => {
                tracing::warn!(did, url, error = %why, "spindle: resolving a DID failed");
                return Err(DidError::Fetch(did.to_string()));
            }
        };
        let doc: DidDocument = match serde_json::from_slice(&body) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::warn!(did, url, error = %e, "spindle: invalid DID document");
                return Err(DidError::Fetch(did.to_string()));
            }
        };
        if doc.id != did {
            tracing::warn!(did, url, document_id = %doc.id, "spindle: the DID document is for another DID");
            return Err(DidError::Fetch(did.to_string()));
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
        self.lock_cache().insert(did, keys.clone(), Instant::now());
        Ok(keys)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // Entries are replaced whole; a panic elsewhere cannot leave one
        // half-written.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The document URL of `did`, and whether it is a did:web one.
    fn document_url(&self, did: &str) -> Result<(String, bool), DidError> {
        if let Some(id) = did.strip_prefix("did:plc:") {
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(DidError::Unsupported(did.to_string()));
            }
            return Ok((format!("{}/{did}", self.plc_url), false));
        }
        if let Some(host) = did.strip_prefix("did:web:") {
            // did:web encodes a port's colon as %3A; paths are not used by atproto.
            let host = host.replace("%3A", ":").replace("%3a", ":");
            if let Err(why) = check_host(&host, self.dev) {
                tracing::info!(did, reason = %why, "spindle: refusing to resolve a did:web");
                return Err(DidError::Unsupported(did.to_string()));
            }
            let scheme = if self.dev { "http" } else { "https" };
            return Ok((format!("{scheme}://{host}/.well-known/did.json"), true));
        }
        Err(DidError::Unsupported(did.to_string()))
    }
}

/// GET `url`, reading at most [`MAX_DOCUMENT_BYTES`] of a 2xx answer.
async fn fetch_capped(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err("document larger than the limit".into());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err("document larger than the limit".into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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
            r.document_url("did:plc:abc123").unwrap().0,
            "http://plc.test/did:plc:abc123"
        );
        assert_eq!(
            r.document_url("did:web:example.com%3A8443").unwrap().0,
            "https://example.com:8443/.well-known/did.json"
        );
        assert!(r.document_url("did:key:z6Mk").is_err());
        assert!(r.document_url("did:plc:../x").is_err());
        assert!(r.document_url("did:web:evil.com/path").is_err());
    }

    #[test]
    fn did_web_hosts_must_be_dns_names_outside_dev() {
        let r = DidResolver::new("http://plc.test/", false);
        for did in [
            "did:web:127.0.0.1%3A8080",
            "did:web:127.0.0.1",
            "did:web:%5B::1%5D%3A80",
            "did:web:[::1]",
            "did:web:10.0.0.7",
            "did:web:localhost%3A80",
            "did:web:app.localhost",
            "did:web:intranet",
            "did:web:127.1",
            "did:web:0x7f.1",
            "did:web:evil.com%3A0",
            "did:web:a..b",
            "did:web:user@evil.com",
        ] {
            let err = r.document_url(did).unwrap_err();
            assert!(matches!(err, DidError::Unsupported(_)), "{did}: {err}");
        }
        let dev = DidResolver::new("http://plc.test/", true);
        assert_eq!(
            dev.document_url("did:web:127.0.0.1%3A8080").unwrap().0,
            "http://127.0.0.1:8080/.well-known/did.json"
        );
        assert!(dev.document_url("did:web:evil.com/path").is_err());
    }

    #[test]
    fn only_public_addresses_are_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(&ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(&ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let key = decode_multikey("zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc").unwrap();
        let mut cache = KeyCache::default();
        let t0 = Instant::now();
        for i in 0..CACHE_CAPACITY + 10 {
            cache.insert(&format!("did:plc:{i}"), vec![key.clone()], t0);
        }
        assert_eq!(cache.entries.len(), CACHE_CAPACITY);
        let last = format!("did:plc:{}", CACHE_CAPACITY + 9);
        assert!(cache.get(&last, t0).is_some());
        assert!(cache.get(&last, t0 + CACHE_TTL).is_none(), "expired");
        assert!(!cache.entries.contains_key(&last), "expired entries go");
    }
}
