//! `signing_key_file` for `client_auth = "private_key_jwt"` (RFC 7523 / OIDC Core §9): a
//! PKCS#8 PEM key — RSA (RS256, PS256) or EC P-256 (ES256) — read and checked when the
//! config is loaded, so a wrong or unreadable key is a config error naming the key, not a
//! failed token call later. Re-read on change (the file is watched like the others).

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey};

/// A loaded private key and the algorithm it signs with. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct SigningKey {
    pub key: Arc<EncodingKey>,
    pub alg: Algorithm,
    /// SHA-256 of the key (DER): tells a rotated key apart (config fingerprints), never shown.
    pub digest: [u8; 32],
    /// RFC 7638 thumbprint of the public key: the assertion's `kid` unless one is set.
    pub thumbprint: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KeyType {
    Rsa,
    EcP256,
}

/// Load `path` (`key` names the config key in errors); `alg` is `signing_alg`, if set.
pub fn load(key: &str, path: &Path, alg: Option<&str>) -> Result<SigningKey, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "{key}.signing_key_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    let der = match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(der)) => der,
        _ => {
            return Err(format!(
                "{key}.signing_key_file: {} holds no PEM private key",
                path.display()
            ))
        }
    };
    let bytes = match &der {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
        rustls::pki_types::PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der(),
        _ => {
            return Err(format!(
                "{key}.signing_key_file: {} is a SEC1 EC key; convert it to PKCS#8 \
                 (openssl pkcs8 -topk8 -nocrypt -in old.pem -out new.pem)",
                path.display()
            ))
        }
    };
    // Parsing the public half (strictly, by ring) also tells the key's type.
    let public = public_jwk(&der).ok_or_else(|| {
        format!(
            "{key}.signing_key_file: {} is neither an RSA nor an EC P-256 key",
            path.display()
        )
    })?;
    let key_type = match public["kty"].as_str() {
        Some("RSA") => KeyType::Rsa,
        _ => KeyType::EcP256,
    };
    let alg = match (alg, key_type) {
        (None, KeyType::Rsa) => Algorithm::RS256,
        (None, KeyType::EcP256) => Algorithm::ES256,
        (Some("RS256"), KeyType::Rsa) => Algorithm::RS256,
        (Some("PS256"), KeyType::Rsa) => Algorithm::PS256,
        (Some("ES256"), KeyType::EcP256) => Algorithm::ES256,
        (Some(a @ ("RS256" | "PS256" | "ES256")), t) => {
            return Err(format!(
                "{key}.signing_alg: {a} does not fit the key in signing_key_file ({})",
                if t == KeyType::Rsa {
                    "an RSA key: use RS256 or PS256"
                } else {
                    "an EC P-256 key: use ES256"
                }
            ))
        }
        (Some(a), _) => {
            return Err(format!(
                "{key}.signing_alg: {a:?} is not supported (RS256, PS256 or ES256)"
            ))
        }
    };
    // From the PEM: jsonwebtoken unwraps PKCS#8 itself (its DER constructors want PKCS#1).
    let encoding = match key_type {
        KeyType::Rsa => EncodingKey::from_rsa_pem(&pem),
        KeyType::EcP256 => EncodingKey::from_ec_pem(&pem),
    }
    .map_err(|_| {
        format!(
            "{key}.signing_key_file: {} could not be read as a signing key",
            path.display()
        )
    })?;
    // Sign once now: a key that cannot sign is a config error, not a failed refresh.
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &serde_json::json!({}),
        &encoding,
    )
    .map_err(|_| {
        format!(
            "{key}.signing_key_file: {} cannot sign {alg:?}",
            path.display()
        )
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    Ok(SigningKey {
        key: Arc::new(encoding),
        alg,
        digest: digest.as_ref().try_into().expect("32 bytes"),
        thumbprint: crate::jwk::thumbprint(&public),
    })
}

/// The public half of a private key, as a JWK.
fn public_jwk(der: &rustls::pki_types::PrivateKeyDer<'_>) -> Option<serde_json::Value> {
    use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use rustls::pki_types::PrivateKeyDer;
    let rsa = match der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).ok(),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()).ok(),
        _ => None,
    };
    if let Some(rsa) = rsa {
        let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(rsa.public());
        return Some(crate::jwk::rsa(&c.n, &c.e));
    }
    let PrivateKeyDer::Pkcs8(k) = der else {
        return None;
    };
    let rng = ring::rand::SystemRandom::new();
    let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, k.secret_pkcs8_der(), &rng)
        .ok()?;
    crate::jwk::ec_p256(ec.public_key().as_ref())
}
