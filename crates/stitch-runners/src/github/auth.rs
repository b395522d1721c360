//! How the GitHub client authenticates: a fixed token (a fine-grained or
//! classic personal access token, from an environment variable), or a
//! GitHub App installation token minted with an RS256 JWT and minted again
//! before its hour runs out (`research/github_actions.md` §6).
//!
//! Installation tokens are cached per [`AppTokens`]; concurrent callers
//! share one minting. A token is refreshed when less than a quarter of its
//! life (at most five minutes) is left, and at once after GitHub refused
//! it with a 401 ([`Credentials::refused`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{StatusCode, Url};
use serde::Serialize;
use tokio::time::Instant;

use super::error::{api_error, GithubError};
use super::model::InstallationToken;
use super::model::{API_VERSION_HEADER, MEDIA_TYPE};
use crate::http_metrics;
use crate::http_util::{join_segments, transport_message};

/// The longest refresh margin before an installation token expires.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// JWTs are back-dated against clock drift, as GitHub recommends.
const JWT_BACKDATE_SECS: i64 = 60;
/// JWT lifetime (GitHub allows at most ten minutes).
const JWT_LIFETIME_SECS: i64 = 540;

/// What the client sends as `Authorization`.
#[derive(Clone)]
pub enum Credentials {
    /// `Authorization: Bearer <token>`: the same token every time.
    Token(HeaderValue),
    /// An App installation token, minted on demand.
    App(std::sync::Arc<AppTokens>),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Credentials::Token(<redacted>)"),
            Credentials::App(app) => f
                .debug_struct("Credentials::App")
                .field("app", &app.issuer)
                .field("installation_id", &app.installation_id)
                .finish_non_exhaustive(),
        }
    }
}

impl Credentials {
    /// A fixed bearer token. Fails on characters a header cannot carry.
    pub fn token(token: &str) -> Result<Self, GithubError> {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                GithubError::Auth("the token holds characters a header cannot carry".into())
            })?;
        value.set_sensitive(true);
        Ok(Credentials::Token(value))
    }

    /// The `Authorization` value for the next request.
    pub async fn authorization(&self) -> Result<HeaderValue, GithubError> {
        match self {
            Credentials::Token(v) => Ok(v.clone()),
            Credentials::App(app) => app.authorization().await,
        }
    }

    /// GitHub answered 401 to `presented`: drop it so the next call mints
    /// a fresh one. Returns whether a retry can help (App tokens only).
    pub fn refused(&self, presented: &HeaderValue) -> bool {
        match self {
            Credentials::Token(_) => false,
            Credentials::App(app) => app.forget(presented),
        }
    }
}

struct Cached {
    header: HeaderValue,
    refresh_at: Instant,
}

/// A GitHub App's installation tokens for one installation.
pub struct AppTokens {
    http: reqwest::Client,
    mint_url: Url,
    api_version: String,
    issuer: String,
    installation_id: u64,
    key: EncodingKey,
    cached: tokio::sync::Mutex<Option<Cached>>,
    minted: AtomicU64,
}

#[derive(Serialize)]
struct Claims<'a> {
    iat: i64,
    exp: i64,
    iss: &'a str,
}

impl AppTokens {
    /// `issuer` is the App's id (or client id); `private_key_pem` the PEM
    /// private key GitHub generated for the App (PKCS#1 or PKCS#8);
    /// `api_root` the REST root (`https://api.github.com`, or
    /// `https://HOST/api/v3` on GitHub Enterprise Server). `http` must not
    /// carry an `Authorization` header of its own.
    pub fn new(
        http: reqwest::Client,
        api_root: &str,
        api_version: impl Into<String>,
        issuer: impl Into<String>,
        installation_id: u64,
        private_key_pem: &[u8],
    ) -> Result<Self, GithubError> {
        let key = EncodingKey::from_rsa_pem(private_key_pem).map_err(|e| {
            GithubError::Auth(format!("the App private key is not an RSA PEM key: {e}"))
        })?;
        let (_, base) = crate::http_util::parse_api_root(api_root).map_err(GithubError::Url)?;
        let id = installation_id.to_string();
        let mint_url = join_segments(&base, &["app", "installations", &id, "access_tokens"])
            .map_err(GithubError::Url)?;
        Ok(Self {
            http,
            mint_url,
            api_version: api_version.into(),
            issuer: issuer.into(),
            installation_id,
            key,
            cached: tokio::sync::Mutex::new(None),
            minted: AtomicU64::new(0),
        })
    }

    /// How many installation tokens were minted so far.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// When the installation token held now is due for its refresh (the
    /// first request from then on mints a new one); `None` before the first
    /// mint and after a refused token was dropped.
    pub async fn refresh_at(&self) -> Option<Instant> {
        self.cached.lock().await.as_ref().map(|c| c.refresh_at)
    }

    /// The App JWT (RS256), valid for nine minutes from a minute ago.
    pub fn jwt(&self) -> Result<String, GithubError> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            iat: now - JWT_BACKDATE_SECS,
            exp: now + JWT_LIFETIME_SECS,
            iss: &self.issuer,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| GithubError::Auth(format!("signing the App JWT: {e}")))
    }

    async fn authorization(&self) -> Result<HeaderValue, GithubError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.header.clone());
            }
        }
        let fresh = self.mint().await?;
        let header = fresh.header.clone();
        *cached = Some(fresh);
        Ok(header)
    }

    fn forget(&self, presented: &HeaderValue) -> bool {
        // try_lock: a minting in progress will hand out a fresh token anyway.
        if let Ok(mut cached) = self.cached.try_lock() {
            if cached.as_ref().is_some_and(|c| c.header == *presented) {
                *cached = None;
            }
        }
        true
    }

    async fn mint(&self) -> Result<Cached, GithubError> {
        let jwt = self.jwt()?;
        let timing = http_metrics::Attempt::start(http_metrics::GITHUB, "mint_token");
        let resp = self
            .http
            .post(self.mint_url.clone())
            .header(AUTHORIZATION, format!("Bearer {jwt}"))
            .header(ACCEPT, MEDIA_TYPE)
            .header(API_VERSION_HEADER, &self.api_version)
            .send()
            .await;
        match &resp {
            Ok(r) => timing.answered(r.status().as_u16()),
            Err(_) => timing.failed(),
        }
        let resp = resp.map_err(|e| GithubError::Transport {
            message: format!("minting an installation token: {}", transport_message(&e)),
            maybe_processed: !e.is_connect(),
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        if status != StatusCode::CREATED && status != StatusCode::OK {
            let e = api_error(status, &headers, &body);
            return Err(match e {
                GithubError::Api {
                    status,
                    message,
                    detail,
                } => GithubError::Api {
                    status,
                    message: format!(
                        "minting an installation token for installation {}: {message}",
                        self.installation_id
                    ),
                    detail,
                },
                other => other,
            });
        }
        let token: InstallationToken =
            serde_json::from_str(&body).map_err(|e| GithubError::Decode {
                status: status.as_u16(),
                message: format!("installation token: {e}"),
            })?;
        let expires_at = DateTime::parse_from_rfc3339(&token.expires_at)
            .map_err(|e| GithubError::Decode {
                status: status.as_u16(),
                message: format!("installation token expires_at {:?}: {e}", token.expires_at),
            })?
            .with_timezone(&Utc);
        let life = (expires_at - Utc::now()).to_std().unwrap_or_default();
        let margin = (life / 4).min(MAX_REFRESH_MARGIN);
        let mut header =
            HeaderValue::from_str(&format!("Bearer {}", token.token)).map_err(|_| {
                GithubError::Auth("the installation token is not a header value".into())
            })?;
        header.set_sensitive(true);
        self.minted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(installation = self.installation_id, expires_at = %expires_at, "minted a GitHub App installation token");
        Ok(Cached {
            header,
            refresh_at: Instant::now() + life.saturating_sub(margin),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] =
        include_bytes!("../../../stitch-fake-providers/tests/data/github/test_app_key.pem");
    const PUBLIC: &[u8] =
        include_bytes!("../../../stitch-fake-providers/tests/data/github/test_app_key.pub.pem");

    #[test]
    fn jwts_are_rs256_backdated_and_short() {
        let app = AppTokens::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1",
            "2022-11-28",
            "12345",
            7,
            KEY,
        )
        .unwrap();
        let jwt = app.jwt().unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
        v.set_required_spec_claims(&["exp", "iat", "iss"]);
        v.set_issuer(&["12345"]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_rsa_pem(PUBLIC).unwrap(),
            &v,
        )
        .unwrap();
        let (iat, exp) = (
            decoded.claims["iat"].as_i64().unwrap(),
            decoded.claims["exp"].as_i64().unwrap(),
        );
        let now = Utc::now().timestamp();
        assert!(iat <= now - 59 && iat >= now - 61, "{iat} vs {now}");
        assert!(exp - iat <= 600, "GitHub refuses JWTs over ten minutes");
        assert_eq!(
            app.mint_url.as_str(),
            "http://127.0.0.1:1/app/installations/7/access_tokens"
        );
    }

    #[test]
    fn bad_keys_and_tokens_are_refused_up_front() {
        let err = AppTokens::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1",
            "2022-11-28",
            "1",
            1,
            b"not a key",
        )
        .err()
        .unwrap();
        assert!(matches!(err, GithubError::Auth(_)), "{err}");
        assert!(Credentials::token("bad\ntoken").is_err());
        let c = Credentials::token("ghp_x").unwrap();
        assert!(!c.refused(&HeaderValue::from_static("Bearer ghp_x")));
        assert!(!format!("{c:?}").contains("ghp_x"));
    }
}
