//! Optional verification of JWT access tokens against the issuer's JWKS (`jwks_url`), so a
//! token that is not what the operator expects (wrong issuer, audience, algorithm, forged
//! signature) is never attached.
//!
//! Keys are cached. A token whose `kid` the cache does not know triggers one refetch, at
//! most every `MIN_REFETCH` (so junk tokens cannot make us hammer the JWKS endpoint); the
//! issuer's key rotations are picked up that way.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::CredentialConfig;
use crate::error::error_chain;
use crate::upstream::Connector;

const MIN_REFETCH: Duration = Duration::from_secs(10);
const MAX_JWKS: usize = 256 * 1024;

struct VerifierConfig {
    jwks_url: Uri,
    issuer: Option<String>,
    audience: Option<String>,
    algorithms: Vec<Algorithm>,
    timeout: Duration,
}

pub struct Verifier {
    config: VerifierConfig,
    client: Client<Connector, Full<Bytes>>,
    cache: tokio::sync::Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    keys: Option<JwkSet>,
    fetched_at: Option<Instant>,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The JWKS could not be fetched: worth retrying.
    #[error("cannot fetch JWKS: {0}")]
    Jwks(String),
    /// The token itself is not acceptable.
    #[error("access token failed verification: {0}")]
    Invalid(String),
}

impl Verifier {
    /// The verifier a credential's config asks for, if any.
    pub fn for_credential(c: &CredentialConfig) -> Result<Option<Verifier>, String> {
        let Some(v) = &c.verify else { return Ok(None) };
        let config = VerifierConfig {
            jwks_url: v.jwks_url.clone(),
            issuer: v.issuer.clone(),
            audience: v.audience.clone(),
            algorithms: v.algorithms.clone(),
            timeout: c.timeout,
        };
        let client = crate::upstream::client(c.ca_file.as_deref(), c.timeout)?;
        Ok(Some(Verifier {
            config,
            client,
            cache: tokio::sync::Mutex::new(Cache::default()),
        }))
    }

    pub async fn verify(&self, token: &str) -> Result<(), VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| VerifyError::Invalid(format!("not a JWT ({e})")))?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(VerifyError::Invalid(format!(
                "algorithm {:?} is not in `algorithms`",
                header.alg
            )));
        }
        let jwk = self.key_for(header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| VerifyError::Invalid(format!("unusable JWK: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = self.config.algorithms.clone();
        validation.leeway = 30;
        match &self.config.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map(|_| ())
            .map_err(|e| VerifyError::Invalid(e.to_string()))
    }

    /// The key for `kid` (or the only key, when the token names none).
    async fn key_for(&self, kid: Option<&str>) -> Result<jsonwebtoken::jwk::Jwk, VerifyError> {
        let mut cache = self.cache.lock().await;
        if let Some(jwk) = find(cache.keys.as_ref(), kid) {
            return Ok(jwk);
        }
        let shown = kid.unwrap_or("(none)");
        if cache
            .fetched_at
            .is_some_and(|at| at.elapsed() < MIN_REFETCH)
        {
            // Possibly a key rotation we have not seen yet: try again later.
            return Err(VerifyError::Jwks(format!(
                "no key with kid {shown:?} in the cached JWKS; refetching at most every {MIN_REFETCH:?}"
            )));
        }
        cache.keys = Some(self.fetch().await?);
        cache.fetched_at = Some(Instant::now());
        find(cache.keys.as_ref(), kid)
            .ok_or_else(|| VerifyError::Invalid(format!("no key with kid {shown:?} in the JWKS")))
    }

    async fn fetch(&self) -> Result<JwkSet, VerifyError> {
        let err = |m: String| VerifyError::Jwks(m);
        let exchange = async {
            let resp = self
                .client
                .get(self.config.jwks_url.clone())
                .await
                .map_err(|e| err(error_chain(&e)))?;
            if !resp.status().is_success() {
                return Err(err(format!(
                    "JWKS endpoint answered {}",
                    resp.status().as_u16()
                )));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS)
                .collect()
                .await
                .map_err(|e| err(format!("reading JWKS: {e}")))?
                .to_bytes();
            serde_json::from_slice::<JwkSet>(&body)
                .map_err(|e| err(format!("JWKS is not a key set: {e}")))
        };
        tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| {
                err(format!(
                    "JWKS endpoint did not answer within {:?}",
                    self.config.timeout
                ))
            })?
    }
}

fn find(keys: Option<&JwkSet>, kid: Option<&str>) -> Option<jsonwebtoken::jwk::Jwk> {
    let keys = keys?;
    match kid {
        Some(kid) => keys.find(kid).cloned(),
        None if keys.keys.len() == 1 => keys.keys.first().cloned(),
        None => None,
    }
}
