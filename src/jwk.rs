//! Public keys as JWKs (RFC 7517) and their RFC 7638 thumbprints: the `kid` of a
//! private_key_jwt assertion when none is configured, and DPoP's `jkt` (RFC 9449 §6.1).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The public JWK of a P-256 key, from its uncompressed point (`04 || x || y`).
pub fn ec_p256(point: &[u8]) -> Option<serde_json::Value> {
    let (x, y) = match point {
        [0x04, rest @ ..] if rest.len() == 64 => rest.split_at(32),
        _ => return None,
    };
    Some(serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(x),
        "y": URL_SAFE_NO_PAD.encode(y),
    }))
}

/// The public JWK of an RSA key, from its modulus and exponent (big-endian).
pub fn rsa(n: &[u8], e: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(n),
        "e": URL_SAFE_NO_PAD.encode(e),
    })
}

/// RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace,
/// base64url. (serde_json's map is ordered by key, which is exactly that order.)
pub fn thumbprint(jwk: &serde_json::Value) -> String {
    let required: &[&str] = match jwk["kty"].as_str() {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("RSA") => &["e", "kty", "n"],
        _ => &[],
    };
    let members: serde_json::Map<String, serde_json::Value> = required
        .iter()
        .map(|k| (k.to_string(), jwk[*k].clone()))
        .collect();
    let canonical = serde_json::Value::Object(members).to_string();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let n = URL_SAFE_NO_PAD.decode(n).unwrap();
        let jwk = rsa(&n, &[1, 0, 1]);
        assert_eq!(
            thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn ec_points_must_be_uncompressed_p256() {
        assert!(ec_p256(&[0x02; 33]).is_none());
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let jwk = ec_p256(&point).unwrap();
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(thumbprint(&jwk).len(), 43);
    }
}
