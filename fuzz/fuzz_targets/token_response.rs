//! Token responses as token endpoints send them, and what login SDKs hand over
//! (`PUT /tokens/{name}`, `initial_tokens_file`): never a panic; an accepted response has
//! an access token, and an error message never quotes the access or refresh token.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use token_proxy::token::response::{jwt_expiry, parse_handed_over, parse_token_response};

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(set) = parse_token_response(data, now) {
        assert!(!set.access_token.expose_secret().is_empty());
        if let Some(at) = set.expires_at {
            assert!(at > SystemTime::UNIX_EPOCH);
        }
    }
    let _ = parse_handed_over(data, now);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = jwt_expiry(text);
    }
    errors_do_not_depend_on_token_values(data, now);
});

/// An error about a body must read the same whatever its tokens are: then it cannot be
/// quoting them. The body is compared with a twin whose `access_token` and `refresh_token`
/// are replaced by `Q`s of the same encoded length (so error positions do not move).
fn errors_do_not_depend_on_token_values(data: &[u8], now: SystemTime) {
    let Ok(original) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let mut twin = original.clone();
    let mut replaced = false;
    for key in ["access_token", "refresh_token"] {
        if let Some(serde_json::Value::String(token)) = twin.get_mut(key) {
            let encoded = serde_json::to_string(token).unwrap().len() - 2;
            *token = "Q".repeat(encoded);
            replaced = true;
        }
    }
    if !replaced {
        return;
    }
    let a = serde_json::to_vec(&original).unwrap();
    let b = serde_json::to_vec(&twin).unwrap();
    if let (Err(x), Err(y)) = (parse_token_response(&a, now), parse_token_response(&b, now)) {
        assert_eq!(x.to_string(), y.to_string(), "an error depends on a token's value");
    }
}
