//! A JWKS document and a token (split at the first NUL): key parsing, key selection by
//! `kid` and algorithm family, and verification never panic, and never accept a token
//! whose algorithm the policy does not list.
#![no_main]

use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;
use token_proxy::token::response::jwt_expiry;
use token_proxy::token::verify::{parse_jwks, verify_with_keys, Policy};

fuzz_target!(|data: &[u8]| {
    let (jwks, token) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let keys = parse_jwks(jwks).unwrap_or_default();
    let Ok(token) = std::str::from_utf8(token) else { return };
    let _ = jwt_expiry(token);
    let policy = Policy {
        issuer: Some("https://idp.example".into()),
        audience: Some("api".into()),
        algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
    };
    if verify_with_keys(token, &keys, &policy).is_ok() {
        let alg = jsonwebtoken::decode_header(token).unwrap().alg;
        assert!(policy.algorithms.contains(&alg));
    }
});
