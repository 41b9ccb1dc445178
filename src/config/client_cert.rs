//! `tls_client_cert_file` + `tls_client_key_file`: a client certificate for mutual TLS to a
//! token endpoint (RFC 8705 `tls_client_auth`) or a route's upstream. Read and checked when
//! the config is loaded (a certificate that has expired, or a key that rustls cannot use,
//! is a config error naming the key); both files are watched, and a change reloads.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client certificate chain and its key. `Debug` shows no key material.
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
    /// SHA-256 over chain and key: tells a renewed certificate apart, never shown.
    pub digest: [u8; 32],
}

impl ClientCert {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("certificates", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Load the pair named `{prefix}.tls_client_cert_file` / `{prefix}.tls_client_key_file`.
pub fn load(prefix: &str, cert: &Path, key: &Path) -> Result<Arc<ClientCert>, String> {
    load_pair(
        &format!("{prefix}.tls_client_cert_file"),
        &format!("{prefix}.tls_client_key_file"),
        cert,
        key,
    )
}

/// A certificate and its key (the keys named in errors as `cert_key` and `key_key`):
/// readable, not expired, and the key the certificate's.
pub fn load_pair(
    cert_key: &str,
    key_key: &str,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ClientCert>, String> {
    let pem = std::fs::read(cert)
        .map_err(|e| format!("{cert_key}: cannot read {}: {e}", cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{cert_key}: {} is not valid PEM", cert.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{cert_key}: {} holds no certificate",
            cert.display()
        ));
    };
    let not_after = not_after(leaf).ok_or_else(|| {
        format!(
            "{cert_key}: {} is not a readable X.509 certificate",
            cert.display()
        )
    })?;
    if not_after <= SystemTime::now() {
        let days = SystemTime::now()
            .duration_since(not_after)
            .unwrap_or_default()
            .as_secs()
            / 86_400;
        return Err(format!(
            "{cert_key}: the certificate in {} has expired ({days} days ago)",
            cert.display()
        ));
    }
    let key_pem =
        std::fs::read(key).map_err(|e| format!("{key_key}: cannot read {}: {e}", key.display()))?;
    let private = match rustls_pemfile::private_key(&mut key_pem.as_slice()) {
        Ok(Some(k)) => k,
        _ => {
            return Err(format!(
                "{key_key}: {} holds no PEM private key",
                key.display()
            ))
        }
    };
    // rustls must accept the pair as it will be used (key type, and key matching the leaf).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified =
        rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider)
            .map_err(|e| {
                format!(
                    "{key_key}: {} cannot be used with {}: {e}",
                    key.display(),
                    cert.display()
                )
            })?;
    certified.keys_match().map_err(|_| {
        format!(
            "{key_key}: {} is not the key of the certificate in {}",
            key.display(),
            cert.display()
        )
    })?;
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for c in &chain {
        h.update(c.as_ref());
    }
    h.update(private.secret_der());
    Ok(Arc::new(ClientCert {
        chain,
        key: private,
        not_after,
        digest: h.finish().as_ref().try_into().expect("32 bytes"),
    }))
}

/// A DER element: (tag, contents, rest).
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The certificate's notAfter (RFC 5280 §4.1.2.5: UTCTime or GeneralizedTime).
fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, certificate, _) = element(cert.as_ref())?;
    let (_, tbs, _) = element(certificate)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2; // [0] version
    }
    rest = element(rest)?.2; // serialNumber
    rest = element(rest)?.2; // signature
    rest = element(rest)?.2; // issuer
    let (_, validity, _) = element(rest)?;
    let after = element(validity)?.2;
    let (tag, time, _) = element(after)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| rest.get(r)?.parse::<i64>().ok();
    let (month, day, hour, min, sec) =
        (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec;
    Some(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 27), 20_784);
    }
}
