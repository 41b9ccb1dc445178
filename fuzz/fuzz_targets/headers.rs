//! Header rewriting on arbitrary request heads: never a panic; afterwards no hop-by-hop
//! header (nor one `Connection` named) is left, and exactly our token is attached.
#![no_main]

#[path = "../common.rs"]
mod common;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use libfuzzer_sys::fuzz_target;
use token_proxy::routes::{requested_upgrade, rewrite_request_headers, strip_hop_by_hop};

fuzz_target!(|data: &[u8]| {
    let mut headers = common::headers_from_lines(data);
    let _ = requested_upgrade(http::Version::HTTP_11, &headers);
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| HeaderName::from_bytes(n.as_bytes()).is_ok())
        .collect();
    let mut response = headers.clone();
    strip_hop_by_hop(&mut response);

    let ours = HeaderValue::from_static("Bearer ours");
    rewrite_request_headers(&mut headers, Some((&AUTHORIZATION, &ours)));
    let auth: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
    assert_eq!(auth, vec![&ours]);
    for h in [&headers, &response] {
        for hop in ["connection", "te", "transfer-encoding", "upgrade", "keep-alive", "proxy-connection", "trailer", "proxy-authorization"] {
            assert!(!h.contains_key(hop), "{hop} left");
        }
    }
    for n in &named {
        assert!(!response.contains_key(n.as_str()), "{n} named by Connection left");
        if n != "authorization" {
            assert!(!headers.contains_key(n.as_str()), "{n} named by Connection left");
        }
    }
    assert!(!headers.contains_key(http::header::HOST));
});
