//! Optional verification of JWT access tokens against the issuer's JWKS (`jwks_url`), so a
//! token that is not what the operator expects (wrong issuer, audience, algorithm, forged
//! signature) is never attached.
//!
//! Keys are cached. A token whose `kid` the cache does not know triggers one refetch, at
//! most every `MIN_REFETCH` (so junk tokens cannot make us hammer the JWKS endpoint); the
//! issuer's key rotations are picked up that way.

use std::time::{Duration, Instant};

use http::Uri;
use http_body_util::{BodyExt, Full, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::CredentialConfig;
use crate::error::error_chain;

const MIN_REFETCH: Duration = Duration::from_secs(10);
const MAX_JWKS: usize = 256 * 1024;

struct VerifierConfig {
    jwks_url: Uri,
    policy: Policy,
    timeout: Duration,
}

/// What a token must satisfy, besides being signed by a key of the issuer's JWKS.
#[derive(Debug, Clone)]
pub struct Policy {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub algorithms: Vec<Algorithm>,
}

impl Policy {
    /// The token's algorithm (if allowed) and key id, from its header.
    fn admit_header(&self, token: &str) -> Result<(Algorithm, Option<String>), VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| VerifyError::Invalid(format!("not a JWT ({e})")))?;
        let alg = header.alg;
        if !self.algorithms.contains(&alg) {
            return Err(VerifyError::Invalid(format!(
                "algorithm {alg:?} is not in `algorithms`"
            )));
        }
        Ok((alg, header.kid))
    }

    /// Signature (with `jwk`, which fits `alg`), expiry, issuer and audience.
    fn check(&self, token: &str, jwk: &Jwk, alg: Algorithm) -> Result<(), VerifyError> {
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| VerifyError::Invalid(format!("unusable JWK: {e}")))?;
        // Verify with exactly the token's algorithm: it is in the allowed list and fits the
        // key. jsonwebtoken insists every listed algorithm fits the key, so handing it the
        // whole list would refuse RS256 tokens whenever ES256 is also allowed.
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = 30;
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map(|_| ())
            .map_err(|e| VerifyError::Invalid(e.to_string()))
    }
}

/// Verify `token` against an already-fetched key set (what `Verifier::verify` does once it
/// has the keys; also the fuzzing entry point).
pub fn verify_with_keys(token: &str, keys: &[Jwk], policy: &Policy) -> Result<(), VerifyError> {
    let (alg, kid) = policy.admit_header(token)?;
    let jwk = find(keys, kid.as_deref(), alg)
        .ok_or_else(|| VerifyError::Invalid(format!("no {alg:?} key for this token")))?;
    policy.check(token, &jwk, alg)
}

pub struct Verifier {
    config: VerifierConfig,
    client: std::sync::Arc<crate::upstream::TokenClient>,
    cache: tokio::sync::Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    keys: Vec<Jwk>,
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
            policy: Policy {
                issuer: v.issuer.clone(),
                audience: v.audience.clone(),
                algorithms: v.algorithms.clone(),
            },
            timeout: c.timeout,
        };
        let client = crate::upstream::token_client(
            c.ca_file.as_deref(),
            c.client_cert.as_deref(),
            c.egress.as_ref(),
            c.timeout,
        )?;
        Ok(Some(Verifier {
            config,
            client,
            cache: tokio::sync::Mutex::new(Cache::default()),
        }))
    }

    pub async fn verify(&self, token: &str) -> Result<(), VerifyError> {
        let (alg, kid) = self.config.policy.admit_header(token)?;
        let jwk = self.key_for(kid.as_deref(), alg).await?;
        self.config.policy.check(token, &jwk, alg)
    }

    /// The signing key for `kid` that fits `alg` (or the only such key, when the token
    /// names no kid).
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Jwk, VerifyError> {
        let mut cache = self.cache.lock().await;
        if let Some(jwk) = find(&cache.keys, kid, alg) {
            return Ok(jwk);
        }
        let shown = kid.unwrap_or("(none)");
        if cache
            .fetched_at
            .is_some_and(|at| at.elapsed() < MIN_REFETCH)
        {
            // Possibly a key rotation we have not seen yet: try again later.
            return Err(VerifyError::Jwks(format!(
                "no {alg:?} key with kid {shown:?} in the cached JWKS; refetching at most every {MIN_REFETCH:?}"
            )));
        }
        cache.keys = self.fetch().await?;
        cache.fetched_at = Some(Instant::now());
        find(&cache.keys, kid, alg).ok_or_else(|| {
            VerifyError::Invalid(format!("no {alg:?} key with kid {shown:?} in the JWKS"))
        })
    }

    async fn fetch(&self) -> Result<Vec<Jwk>, VerifyError> {
        let err = |m: String| VerifyError::Jwks(m);
        let exchange = async {
            let mut req = http::Request::new(Full::default());
            *req.uri_mut() = self.config.jwks_url.clone();
            let (_slot, resp) = self.client.request(req).await;
            let resp = resp.map_err(|e| err(error_chain(&e)))?;
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
            parse_jwks(&body).map_err(err)
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

/// The usable signing keys of a JWKS document. Keys this verifier cannot use (encryption
/// keys, curves or key types it does not know) are skipped, not fatal: real providers
/// publish them side by side with their signing keys.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet = serde_json::from_slice(body)
        .map_err(|e| format!("JWKS is not a key set ({:?} error)", e.classify()))?;
    Ok(set
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .filter(|k| k.common.public_key_use != Some(PublicKeyUse::Encryption))
        .collect())
}

/// Whether `jwk` can verify a signature made with `alg`: the key type and curve fit the
/// algorithm, and a key that names its own `alg` names this one.
pub fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    use Algorithm::*;
    let family_fits = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, ES256) | (EllipticCurve::P384, ES384)
        ),
        AlgorithmParameters::OctetKeyPair(okp) => {
            okp.curve == EllipticCurve::Ed25519 && alg == EdDSA
        }
        // Symmetric keys never verify: a published "secret" would let anyone sign.
        AlgorithmParameters::OctetKey(_) => false,
    };
    let named_fits = match &jwk.common.key_algorithm {
        None => true,
        Some(named) => format!("{named:?}") == format!("{alg:?}"),
    };
    family_fits && named_fits
}

fn find(keys: &[Jwk], kid: Option<&str>, alg: Algorithm) -> Option<Jwk> {
    let mut fitting = keys.iter().filter(|k| key_fits(k, alg));
    match kid {
        Some(kid) => fitting
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned(),
        None => {
            let only = fitting.next()?;
            fitting.next().is_none().then(|| only.clone())
        }
    }
}
