//! Scrubbing our own secrets out of text that came from elsewhere (a token endpoint's
//! error description may quote the request it was sent) before it reaches logs, `/tokens`
//! or an error body.
//!
//! A secret can come back in many shapes: raw, URL-encoded (as the form body carried it),
//! JSON-escaped, base64 (the client secret inside `Basic base64(id:secret)`, at any offset),
//! or cut short. Every shape of every secret is cut into 8-character windows, and any run
//! of the text covered by such a window is replaced, so a fragment of 8 or more characters
//! of any shape is removed too. Shorter secrets are replaced where they appear whole.

use std::collections::HashSet;

use base64::Engine;

/// Fragments at least this long are redacted.
const WINDOW: usize = 8;
const MARK: &str = "[redacted]";

#[derive(Default)]
pub struct Redactor {
    /// Every 8-byte window of every shape of every secret.
    windows: HashSet<Vec<u8>>,
    /// Whole shapes of secrets shorter than a window.
    short: Vec<String>,
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut r = Redactor::default();
        for secret in secrets {
            r.add(secret);
        }
        r
    }

    /// Add a secret (all of its shapes).
    pub fn add(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        for shape in shapes(secret) {
            if shape.len() < WINDOW {
                if shape.len() >= 4 {
                    self.short.push(shape);
                }
                continue;
            }
            for w in shape.as_bytes().windows(WINDOW) {
                self.windows.insert(w.to_vec());
            }
        }
    }

    /// `text` with every covered run replaced by `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        let bytes = text.as_bytes();
        let mut covered = vec![false; bytes.len()];
        if bytes.len() >= WINDOW {
            for i in 0..=bytes.len() - WINDOW {
                if self.windows.contains(&bytes[i..i + WINDOW]) {
                    covered[i..i + WINDOW].iter_mut().for_each(|c| *c = true);
                }
            }
        }
        for s in &self.short {
            for (i, _) in text.match_indices(s.as_str()) {
                covered[i..i + s.len()].iter_mut().for_each(|c| *c = true);
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < bytes.len() {
            if covered[i] {
                while i < bytes.len() && covered[i] {
                    i += 1;
                }
                out.push_str(MARK);
            } else {
                // Copy up to the next covered byte; keep UTF-8 boundaries intact.
                let start = i;
                while i < bytes.len() && !covered[i] {
                    i += 1;
                }
                out.push_str(&String::from_utf8_lossy(&bytes[start..i]));
            }
        }
        out
    }
}

/// The shapes a secret takes on the wire and in echoes of it.
fn shapes(secret: &str) -> Vec<String> {
    let mut v = vec![secret.to_string()];
    // Form encoding (spaces as +) and strict percent-encoding (spaces as %20).
    v.push(form_urlencoded::byte_serialize(secret.as_bytes()).collect());
    v.push(
        form_urlencoded::byte_serialize(secret.as_bytes())
            .collect::<String>()
            .replace('+', "%20"),
    );
    // JSON string escaping, with and without the quotes.
    if let Ok(json) = serde_json::to_string(secret) {
        v.push(json.trim_matches('"').to_string());
    }
    // base64 at each of the three alignments it can sit at inside a longer encoded value
    // (`Basic base64("client-id:" + secret)`), standard and URL-safe alphabets.
    for offset in 0..3 {
        let mut bytes = vec![0u8; offset];
        bytes.extend_from_slice(secret.as_bytes());
        for engine in [
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            let enc = engine.encode(&bytes);
            // Characters that mix in the alignment bytes or the padding are not the secret's.
            let skip = (offset * 8).div_ceil(6);
            let end = enc.len().saturating_sub(2);
            if end > skip {
                v.push(enc[skip..end].to_string());
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const RT: &str = "235:s3kjlwkg035/+= x\"y";
    const SECRET: &str = "cs-very-secret-7f3a9";

    fn r() -> Redactor {
        Redactor::new([RT, SECRET])
    }

    fn leaks(text: &str) -> bool {
        text.contains("s3kjlwkg") || text.contains("very-sec") || text.contains("t-7f3a9")
    }

    #[test]
    fn raw_and_fragments() {
        let out = r().scrub(&format!("token {RT} and part s3kjlwkg03 of it"));
        assert!(!leaks(&out), "{out}");
        assert!(out.starts_with("token [redacted]"), "{out}");
        assert!(out.contains("of it"), "unrelated text stays: {out}");
    }

    #[test]
    fn url_encoded_json_escaped_and_base64() {
        let form: String = form_urlencoded::byte_serialize(RT.as_bytes()).collect();
        let json = serde_json::to_string(RT).unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("my-client:{SECRET}"));
        for offset_id in ["a", "ab", "abc"] {
            let other =
                base64::engine::general_purpose::STANDARD.encode(format!("{offset_id}:{SECRET}"));
            let out = r().scrub(&format!("Authorization: Basic {other}"));
            assert!(!out.contains(&other[8..]), "{offset_id}: {out}");
        }
        let text = format!(
            "body grant_type=refresh_token&refresh_token={form} json {json} auth Basic {basic}"
        );
        let out = r().scrub(&text);
        assert!(!out.contains(&form[4..]), "{out}");
        assert!(!out.contains(&basic[12..]), "{out}");
        assert!(!leaks(&out), "{out}");
        assert!(out.contains("grant_type=refresh_token"), "{out}");
    }

    #[test]
    fn short_secrets_and_non_ascii() {
        let r = Redactor::new(["abcd", ""]);
        assert_eq!(r.scrub("x abcd y"), "x [redacted] y");
        assert_eq!(r.scrub("é ü"), "é ü");
    }
}
