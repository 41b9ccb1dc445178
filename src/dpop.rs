//! DPoP (RFC 9449): the key a credential's tokens are bound to, the proofs made with it
//! (one per request, never reused), and the nonces servers hand out.
//!
//! The key is ES256 (P-256), held as a ring key pair so a proof costs one signature and
//! nothing else: the JOSE header (with the public JWK) is encoded once. It comes from
//! `dpop_key_file`, or is generated — and, when the setting names a file that does not
//! exist yet, written there (PKCS#8 PEM, 0600) at start so that restarts and replicas keep it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, Uri};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// The `DPoP` request header (RFC 9449 §4.1).
pub static DPOP: HeaderName = HeaderName::from_static("dpop");
/// The `DPoP-Nonce` response header (RFC 9449 §8, §9).
pub static DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
/// Longer nonces are not kept (a server has no reason to send one; we hold one per origin).
const MAX_NONCE: usize = 512;

/// A credential's DPoP key and the nonces its servers asked for.
pub struct Dpop {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    /// base64url of `{"typ":"dpop+jwt","alg":"ES256","jwk":{...}}`: the same in every proof.
    header: String,
    /// RFC 7638 thumbprint of the public key: what tokens are bound to (`cnf.jkt`).
    pub jkt: String,
    /// SHA-256 of the private key (PKCS#8): tells a replaced key apart, never shown.
    pub digest: [u8; 32],
    /// `dpop_key_file`; `None`: a key for this process only.
    pub file: Option<PathBuf>,
    /// A generated key still to be written to `file` (PKCS#8 DER), by `persist` at start.
    unsaved: Mutex<Option<Vec<u8>>>,
    /// The newest `DPoP-Nonce` per server: the token endpoint's by its URL, a resource
    /// server's by its origin (`scheme://authority`) — apart even when they share an origin.
    nonces: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Dpop {
    /// The source only: a generated key differs at every load, and must not look like a
    /// config change on reload.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dpop")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Dpop {
    /// The key in `file`; a new key when `file` is `None` or does not exist yet (written
    /// there by [`Dpop::persist`]). `key` names the credential in errors.
    pub fn load(key: &str, file: Option<&Path>) -> Result<Dpop, String> {
        let rng = SystemRandom::new();
        let existing = match file {
            Some(path) => match std::fs::read(path) {
                Ok(pem) => Some(pkcs8_of(key, path, &pem)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(format!(
                        "{key}.dpop_key_file: cannot read {}: {e}",
                        path.display()
                    ))
                }
            },
            None => None,
        };
        let (pkcs8, generated) = match existing {
            Some(der) => (der, false),
            None => {
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| format!("{key}.dpop: cannot generate a P-256 key"))?;
                (doc.as_ref().to_vec(), true)
            }
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| {
                format!(
                    "{key}.dpop_key_file: {} is not an EC P-256 key (DPoP signs with ES256)",
                    file.map(|p| p.display().to_string()).unwrap_or_default()
                )
            })?;
        let jwk = crate::jwk::ec_p256(pair.public_key().as_ref())
            .ok_or_else(|| format!("{key}.dpop_key_file: not an uncompressed P-256 key"))?;
        let header = serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
        let digest = ring::digest::digest(&ring::digest::SHA256, &pkcs8);
        Ok(Dpop {
            header: URL_SAFE_NO_PAD.encode(header.to_string()),
            jkt: crate::jwk::thumbprint(&jwk),
            digest: digest.as_ref().try_into().expect("32 bytes"),
            file: file.map(Path::to_path_buf),
            unsaved: Mutex::new((generated && file.is_some()).then_some(pkcs8)),
            nonces: Mutex::new(HashMap::new()),
            pair,
            rng,
        })
    }

    /// Write a key generated for `dpop_key_file` there (PKCS#8 PEM, mode 0600, fsynced),
    /// never over an existing file. Called at start, not by `check`.
    pub fn persist(&self) -> Result<(), String> {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(der), Some(path)) = (unsaved.as_ref(), &self.file) else {
            return Ok(());
        };
        let pem = rcgen::KeyPair::try_from(der.as_slice())
            .map(|k| k.serialize_pem())
            .map_err(|e| format!("dpop_key_file: cannot encode the key: {e}"))?;
        crate::files::create_new(path, pem.as_bytes(), 0o600)
            .map_err(|e| format!("dpop_key_file: cannot write {}: {e}", path.display()))?;
        tracing::info!(path = %path.display(), jkt = %self.jkt, "generated a DPoP key");
        *unsaved = None;
        Ok(())
    }

    /// A fresh proof for one request (RFC 9449 §4.2): `htm`, `htu` (no query or fragment),
    /// `iat`, a random `jti`, `ath` when a token goes with it (a resource request), and the
    /// server's nonce if it sent one.
    pub fn proof(&self, method: &Method, uri: &Uri, ath: Option<&str>) -> HeaderValue {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            jti: String,
            htm: &'a str,
            htu: String,
            iat: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            ath: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            nonce: Option<String>,
        }
        let jti: [u8; 16] = rand::random();
        let claims = Claims {
            jti: URL_SAFE_NO_PAD.encode(jti),
            htm: method.as_str(),
            htu: htu(uri),
            iat: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            ath,
            nonce: self.nonce(&server(uri, ath.is_none())),
        };
        let claims = serde_json::to_vec(&claims).unwrap_or_default();
        let mut jws = String::with_capacity(self.header.len() + claims.len() * 4 / 3 + 100);
        jws.push_str(&self.header);
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut jws);
        let signature = self
            .pair
            .sign(&self.rng, jws.as_bytes())
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default();
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut jws);
        let mut value = HeaderValue::from_str(&jws).expect("base64url is a valid header value");
        value.set_sensitive(true);
        value
    }

    /// Keep a `DPoP-Nonce` the resource server at `uri` sent; `true` when it is new.
    pub fn remember_nonce(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        self.remember(server(uri, false), headers)
    }

    /// Keep a `DPoP-Nonce` the token endpoint at `uri` sent; `true` when it is new.
    pub fn remember_token_endpoint_nonce(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        self.remember(server(uri, true), headers)
    }

    fn remember(&self, key: String, headers: &HeaderMap) -> bool {
        let Some(nonce) = headers
            .get(&DPOP_NONCE)
            .and_then(|v| v.to_str().ok())
            .filter(|n| !n.is_empty() && n.len() <= MAX_NONCE)
        else {
            return false;
        };
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        match nonces.get_mut(&key) {
            Some(known) if known == nonce => false,
            Some(known) => {
                *known = nonce.to_string();
                true
            }
            None => {
                nonces.insert(key, nonce.to_string());
                true
            }
        }
    }

    fn nonce(&self, key: &str) -> Option<String> {
        let nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        if nonces.is_empty() {
            return None;
        }
        nonces.get(key).cloned()
    }
}

/// `ath` (RFC 9449 §4.2): base64url SHA-256 of the access token.
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        access_token.as_bytes(),
    ))
}

/// A resource server's nonce challenge (RFC 9449 §9): 401 with
/// `WWW-Authenticate: DPoP error="use_dpop_nonce"` (and a `DPoP-Nonce` header).
pub fn asks_for_nonce(headers: &HeaderMap) -> bool {
    headers.contains_key(&DPOP_NONCE)
        && headers.get_all(WWW_AUTHENTICATE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                let s = s.trim_start();
                s.len() > 4 && s[..4].eq_ignore_ascii_case("dpop") && s.contains("use_dpop_nonce")
            })
        })
}

/// `scheme://authority/path`, without query or fragment (RFC 9449 §4.2 `htu`).
fn htu(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

/// Whose nonce a proof for `uri` carries: the token endpoint's (its whole URL) or a
/// resource server's (its origin).
fn server(uri: &Uri, token_endpoint: bool) -> String {
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    )
    .to_ascii_lowercase();
    match token_endpoint {
        true => format!("token endpoint {origin}{}", uri.path()),
        false => origin,
    }
}

/// The PKCS#8 DER of an EC key in a PEM file, or an error that says what the file holds.
fn pkcs8_of(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::PrivateKeyDer;
    let shown = path.display();
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(PrivateKeyDer::Pkcs8(k))) => Ok(k.secret_pkcs8_der().to_vec()),
        Ok(Some(PrivateKeyDer::Sec1(_))) => Err(format!(
            "{key}.dpop_key_file: {shown} is a SEC1 EC key; convert it to PKCS#8 \
             (openssl pkcs8 -topk8 -nocrypt -in old.pem -out new.pem)"
        )),
        Ok(Some(_)) => Err(format!(
            "{key}.dpop_key_file: {shown} is an RSA key; DPoP keys are EC P-256 (ES256)"
        )),
        _ => Err(format!(
            "{key}.dpop_key_file: {shown} holds no PEM private key"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(jws: &HeaderValue) -> (serde_json::Value, serde_json::Value) {
        let s = jws.to_str().unwrap();
        let mut it = s.split('.');
        let mut decode = || {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap()).unwrap()
        };
        (decode(), decode())
    }

    #[test]
    fn proofs_are_fresh_and_carry_what_rfc9449_asks() {
        let d = Dpop::load("credentials.x", None).unwrap();
        let uri: Uri = "https://API.example.com:8443/v1/items?page=2#x"
            .parse()
            .unwrap();
        let a = d.proof(&Method::GET, &uri, Some("ath-value"));
        let b = d.proof(&Method::GET, &uri, Some("ath-value"));
        assert_ne!(a, b, "a proof is never reused");
        let (header, claims) = parts(&a);
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(crate::jwk::thumbprint(&header["jwk"]), d.jkt);
        assert!(header["jwk"].get("d").is_none(), "no private part");
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://API.example.com:8443/v1/items");
        assert_eq!(claims["ath"], "ath-value");
        assert!(claims.get("nonce").is_none());
        assert!(claims["iat"].as_u64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn nonces_are_kept_per_origin() {
        let d = Dpop::load("credentials.x", None).unwrap();
        let api: Uri = "https://api.example.com/a".parse().unwrap();
        let idp: Uri = "https://idp.example.com/token".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(&DPOP_NONCE, HeaderValue::from_static("n-1"));
        assert!(d.remember_nonce(&api, &h));
        assert!(!d.remember_nonce(&api, &h), "the same nonce is not new");
        assert_eq!(
            parts(&d.proof(&Method::POST, &api, Some("a"))).1["nonce"],
            "n-1"
        );
        assert!(parts(&d.proof(&Method::POST, &idp, None))
            .1
            .get("nonce")
            .is_none());
        // The token endpoint's nonce is its own, even on the API's origin.
        let same_origin: Uri = "https://api.example.com/token".parse().unwrap();
        h.insert(&DPOP_NONCE, HeaderValue::from_static("as-1"));
        assert!(d.remember_token_endpoint_nonce(&same_origin, &h));
        assert_eq!(
            parts(&d.proof(&Method::POST, &same_origin, None)).1["nonce"],
            "as-1"
        );
        assert_eq!(
            parts(&d.proof(&Method::GET, &api, Some("a"))).1["nonce"],
            "n-1"
        );
    }

    #[test]
    fn a_nonce_challenge_is_recognised() {
        let mut h = HeaderMap::new();
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="use_dpop_nonce", error_description="x""#),
        );
        assert!(!asks_for_nonce(&h), "no nonce sent: nothing to retry with");
        h.insert(&DPOP_NONCE, HeaderValue::from_static("n"));
        assert!(asks_for_nonce(&h));
        h.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
        assert!(!asks_for_nonce(&h));
    }

    #[test]
    fn a_generated_key_is_written_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/dpop.pem");
        let d = Dpop::load("credentials.x", Some(&path)).unwrap();
        assert!(
            !path.exists(),
            "loading writes nothing (check stays read-only)"
        );
        d.persist().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Dpop::load("credentials.x", Some(&path)).unwrap();
        assert_eq!(again.jkt, d.jkt);
        assert_eq!(again.digest, d.digest);
        again.persist().unwrap();
    }

    #[test]
    fn keys_of_the_wrong_kind_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, "not a key").unwrap();
        let e = Dpop::load("credentials.x", Some(&path)).unwrap_err();
        assert!(
            e.contains("credentials.x.dpop_key_file") && e.contains("no PEM private key"),
            "{e}"
        );
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        std::fs::write(&path, p384.serialize_pem()).unwrap();
        let e = Dpop::load("credentials.x", Some(&path)).unwrap_err();
        assert!(e.contains("not an EC P-256 key"), "{e}");
    }
}
