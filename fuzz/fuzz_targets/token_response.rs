//! Token responses as token endpoints send them, and what login SDKs hand over
//! (`PUT /tokens/{name}`, `initial_tokens_file`): never a panic; an accepted response has
//! an access token, and an error message never quotes the access or refresh token.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;
use token_proxy::token::response::{jwt_expiry, parse_handed_over, parse_token_response};

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    match parse_token_response(data, now) {
        Ok(set) => {
            assert!(!set.access_token.expose_secret().is_empty());
            if let Some(at) = set.expires_at {
                assert!(at > SystemTime::UNIX_EPOCH);
            }
        }
        Err(e) => assert_no_echo(data, &e.to_string()),
    }
    if let Err(e) = parse_handed_over(data, now) {
        assert_no_echo(data, &e);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = jwt_expiry(text);
    }
});

/// The tokens a body carries must not come back in the error about it.
fn assert_no_echo(data: &[u8], message: &str) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for key in ["access_token", "refresh_token"] {
        if let Some(token) = v.get(key).and_then(|t| t.as_str()) {
            if token.len() >= 12 {
                assert!(!message.contains(token), "{key} echoed in {message:?}");
            }
        }
    }
}

