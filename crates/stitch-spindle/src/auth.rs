//! atproto service-auth: a compact JWT signed (ES256K or ES256) by the
//! caller's DID key, addressed to this spindle (`aud` = `did:web:<host>`)
//! for one method (`lxm`), not expired (`exp`) and short-lived.
//!
//! Verification is two steps so that nothing reaches the network for a
//! stranger: [`check_claims`] does every check that needs no I/O; the
//! caller then decides whether the issuer is someone it has a reason to
//! trust, and only then [`verify_signature`] resolves the issuer's DID.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

use crate::did::{DidError, DidKey, DidResolver};

/// Why a service-auth token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("service auth required: send Authorization: Bearer <jwt>")]
    Missing,
    /// Not a well-formed JWT with a supported algorithm.
    #[error("malformed service-auth token: {0}")]
    Malformed(String),
    /// `aud` is not this spindle.
    #[error("token audience {0:?} is not this spindle")]
    Audience(String),
    /// `lxm` is not the method called.
    #[error("token is for method {0:?}, not this one")]
    Method(String),
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// The token lives longer than [`MAX_TOKEN_LIFETIME`], or was issued in
    /// the future.
    #[error("token lifetime is not within {} seconds from now", MAX_TOKEN_LIFETIME)]
    Lifetime,
    /// The issuer is not the owner, a member or a repo owner of this
    /// spindle: its DID is not resolved.
    #[error("token issuer is not known to this spindle")]
    Untrusted,
    /// The issuer's keys could not be resolved.
    #[error("{0}")]
    Resolve(#[from] DidError),
    /// No key of the issuer verifies the signature.
    #[error("token signature does not verify against the issuer's key")]
    Signature,
}

/// Longest accepted token lifetime in seconds (`exp - iat`, and `exp`
/// from now). atproto service tokens default to 60 s.
pub const MAX_TOKEN_LIFETIME: i64 = 600;
/// Clock skew tolerated on `iat`.
const CLOCK_SKEW: i64 = 60;

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    lxm: Option<String>,
}

/// A token whose claims passed every check but the signature.
#[derive(Debug)]
pub struct CheckedToken {
    /// The issuer's DID (without a `#service` fragment).
    pub did: String,
    alg: String,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

/// The checks that need no I/O: shape, `alg`, `aud`, `lxm`, `exp` and a
/// lifetime of at most [`MAX_TOKEN_LIFETIME`].
pub fn check_claims(
    token: &str,
    audience: &str,
    method: &str,
    now: i64,
) -> Result<CheckedToken, AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| AuthError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header: Header = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|e| AuthError::Malformed(format!("header: {e}")))?;
    let claims: Claims = serde_json::from_slice(&decode(p, "payload")?)
        .map_err(|e| AuthError::Malformed(format!("payload: {e}")))?;
    let signature = decode(s, "signature")?;
    if header.alg != "ES256K" && header.alg != "ES256" {
        return Err(AuthError::Malformed(format!(
            "unsupported alg {:?}",
            header.alg
        )));
    }
    if claims.aud != audience {
        return Err(AuthError::Audience(claims.aud));
    }
    match claims.lxm.as_deref() {
        Some(lxm) if lxm == method => {}
        other => return Err(AuthError::Method(other.unwrap_or_default().to_string())),
    }
    if claims.exp <= now {
        return Err(AuthError::Expired);
    }
    let too_long = claims.exp.saturating_sub(now) > MAX_TOKEN_LIFETIME
        || claims.iat.is_some_and(|iat| {
            iat > now.saturating_add(CLOCK_SKEW)
                || claims.exp.saturating_sub(iat) > MAX_TOKEN_LIFETIME
        });
    if too_long {
        return Err(AuthError::Lifetime);
    }
    // `iss` may name a service of the DID (`did:plc:x#atproto_labeler`).
    let did = claims.iss.split('#').next().unwrap_or_default().to_string();
    Ok(CheckedToken {
        did,
        alg: header.alg,
        signed: token.as_bytes()[..h.len() + 1 + p.len()].to_vec(),
        signature,
    })
}

/// Resolves the issuer's keys and checks the signature; returns the
/// caller's DID. Call only for issuers the spindle has a reason to trust.
pub async fn verify_signature(
    resolver: &DidResolver,
    token: CheckedToken,
) -> Result<String, AuthError> {
    let keys = resolver.keys(&token.did).await?;
    if keys
        .iter()
        .any(|k| verifies(k, &token.alg, &token.signed, &token.signature))
    {
        Ok(token.did)
    } else {
        Err(AuthError::Signature)
    }
}

fn verifies(key: &DidKey, alg: &str, signed: &[u8], signature: &[u8]) -> bool {
    use k256::ecdsa::signature::Verifier;
    match (key, alg) {
        (DidKey::K256(k), "ES256K") => k256::ecdsa::Signature::from_slice(signature)
            .is_ok_and(|sig| k.verify(signed, &sig).is_ok()),
        (DidKey::P256(k), "ES256") => p256::ecdsa::Signature::from_slice(signature)
            .is_ok_and(|sig| k.verify(signed, &sig).is_ok()),
        _ => false,
    }
}
