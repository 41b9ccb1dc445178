//! The small parsers of outside input: `Retry-After`, durations and sizes in config, the
//! secret scrubber (which must remove every copy of a secret it knows), a `CONNECT`
//! target and the `Host` check inside an intercepted tunnel, and DPoP nonce challenges.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use token_proxy::config::{parse_duration, parse_size};
use token_proxy::redact::Redactor;
use token_proxy::token::grant::parse_retry_after;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = HeaderValue::from_bytes(data) {
        if let Some(d) = parse_retry_after(&v) {
            assert!(d <= std::time::Duration::from_secs(3600));
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::WWW_AUTHENTICATE, v.clone());
        let _ = token_proxy::dpop::asks_for_nonce(&h);
        h.insert("dpop-nonce", v);
        let _ = token_proxy::dpop::asks_for_nonce(&h);
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(uri) = text.parse::<http::Uri>() {
        if let Ok(target) = token_proxy::intercept::Target::of_connect(&uri) {
            assert!(!target.host.is_empty());
            // The tunnel's own host (as an app names it) is always admitted.
            if !target.host.contains(':') {
                if let Ok(req) = http::Request::get("/")
                    .header("host", target.to_string())
                    .body(())
                {
                    assert!(target.admits(&req).is_ok(), "{target} refused itself");
                }
            }
        }
    }
    let _ = parse_duration("k", text);
    let _ = parse_size("k", text);
    // The first 8..=40 characters are a secret; the text quotes it amid the rest.
    let split = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .find(|&i| i >= 8 && i <= 40);
    if let Some(i) = split {
        let (secret, rest) = text.split_at(i);
        if secret.len() >= 8 {
            let quoted = format!("{rest} {secret} {rest}");
            let out = Redactor::new([secret]).scrub(&quoted);
            // (The marker itself may spell a secret such as "redacted": not a leak.)
            let sentinel = ['\u{0}', '\u{1}', '\u{2}']
                .into_iter()
                .find(|c| !secret.contains(*c))
                .unwrap_or('\u{3}');
            let ours_removed = out.replace("[redacted]", &sentinel.to_string());
            assert!(!ours_removed.contains(secret), "{secret:?} survived in {out:?}");
        }
    }
});
