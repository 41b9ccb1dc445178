//! A strict DPoP proof checker (RFC 9449 §4.3) for the mock token server and upstream:
//! signature by the embedded public JWK, `typ`, `alg`, `htm`, `htu`, `iat` freshness,
//! `jti` never seen before, `ath` and the nonce when they are required.

use std::collections::HashSet;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// What a proof must match.
pub struct Expect<'a> {
    pub method: &'a str,
    /// Accepted `htu` values (a server may know itself by more than one URL).
    pub htu: &'a [String],
    /// Required `ath` (the access token's hash), for resource requests.
    pub ath: Option<String>,
    /// Required `nonce`, when the server demands one.
    pub nonce: Option<&'a str>,
}

/// Why a proof was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Only the nonce is missing or stale: the server answers `use_dpop_nonce`.
    Nonce,
    Invalid(String),
}

/// Check `proof`; on success its key's RFC 7638 thumbprint (the `jkt` tokens bind to).
pub fn verify(
    proof: &str,
    expect: &Expect<'_>,
    seen_jti: &mut HashSet<String>,
) -> Result<String, Refused> {
    let bad = |why: &str| Refused::Invalid(why.to_string());
    let mut parts = proof.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a compact JWS"));
    };
    let decode = |p: &str| -> Result<serde_json::Value, Refused> {
        let bytes = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| bad("not base64url"))?;
        serde_json::from_slice(&bytes).map_err(|_| bad("not JSON"))
    };
    let header = decode(h)?;
    let claims = decode(c)?;
    if header["typ"] != "dpop+jwt" || header["alg"] != "ES256" {
        return Err(bad("typ must be dpop+jwt and alg ES256"));
    }
    let jwk = &header["jwk"];
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" || jwk.get("d").is_some() {
        return Err(bad("jwk must be a public EC P-256 key"));
    }
    let coord = |k: &str| {
        jwk[k]
            .as_str()
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .filter(|v| v.len() == 32)
            .ok_or_else(|| bad("bad jwk coordinate"))
    };
    let mut point = vec![0x04];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad("bad signature encoding"))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(format!("{h}.{c}").as_bytes(), &signature)
        .map_err(|_| bad("signature does not verify"))?;
    if claims["htm"] != expect.method {
        return Err(bad("htm does not match the request method"));
    }
    let htu = claims["htu"].as_str().unwrap_or_default();
    if !expect.htu.iter().any(|u| u == htu) {
        return Err(Refused::Invalid(format!(
            "htu {htu:?} does not match {:?}",
            expect.htu
        )));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let iat = claims["iat"].as_i64().ok_or_else(|| bad("iat missing"))?;
    if (now - iat).abs() > 60 {
        return Err(bad("iat is not recent"));
    }
    if let Some(ath) = &expect.ath {
        if claims["ath"].as_str() != Some(ath.as_str()) {
            return Err(bad("ath does not match the access token"));
        }
    }
    if let Some(nonce) = expect.nonce {
        if claims["nonce"].as_str() != Some(nonce) {
            return Err(Refused::Nonce);
        }
    }
    let jti = claims["jti"].as_str().ok_or_else(|| bad("jti missing"))?;
    if !seen_jti.insert(jti.to_string()) {
        return Err(bad("jti seen before (a replayed proof)"));
    }
    Ok(crate::jwk::thumbprint(jwk))
}
