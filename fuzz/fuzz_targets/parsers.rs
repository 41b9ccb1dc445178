//! The small parsers of outside input: `Retry-After`, durations and sizes in config, and
//! the secret scrubber (which must remove every copy of a secret it knows).
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
    let Ok(text) = std::str::from_utf8(data) else { return };
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
