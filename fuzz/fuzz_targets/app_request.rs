//! What an app sends our HTTP/1.1 server (`src/h1/app_wire.rs`), and the response heads it
//! writes. Never a panic; a head found in a prefix of the bytes is never anything but
//! "read more" (so how the bytes arrive cannot change what is served); a request taken
//! keeps every field as sent; and every response head we write parses back with the
//! fields we gave it and one framing.
#![no_main]

#[path = "../common.rs"]
mod common;

use bytes::Bytes;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use token_proxy::h1::app_wire::{classify, encode_response_head, take_request, Framing, Parsed};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    if mode & 1 == 0 {
        request(data, usize::from(mode >> 1));
    } else {
        response_head(data, mode);
    }
});

fn request(data: &[u8], cut: usize) {
    match classify(data) {
        Parsed::Plain(plain) => {
            let len = plain.len;
            assert!(len <= data.len() && plain.body_len <= 64 * 1024);
            let k = cut % len;
            assert!(
                matches!(classify(&data[..k]), Parsed::Partial),
                "a {k}-byte prefix of a {len}-byte head"
            );
            let Some(request) = take_request(&Bytes::copy_from_slice(&data[..len]), plain) else {
                return;
            };
            let mut slots = [httparse::EMPTY_HEADER; 100];
            let mut oracle = httparse::Request::new(&mut slots);
            assert_eq!(oracle.parse(&data[..len]), Ok(httparse::Status::Complete(len)));
            let headers = request.headers();
            assert_eq!(headers.len(), oracle.headers.len());
            for h in oracle.headers.iter() {
                assert!(headers
                    .get_all(h.name.to_ascii_lowercase().as_str())
                    .iter()
                    .any(|v| v.as_bytes() == h.value));
            }
        }
        Parsed::Partial | Parsed::Other => {}
    }
}

/// Header fields from `name: value` lines (those `http` accepts), a status and a length.
fn response_head(data: &[u8], mode: u8) {
    let headers = common::headers_from_lines(data);
    if headers.len() > 500 {
        return; // more fields than the parser below has room for
    }
    let status = StatusCode::from_u16(100 + u16::from(data.first().copied().unwrap_or(0)) * 2)
        .unwrap_or(StatusCode::OK);
    let exact = (mode & 2 != 0).then(|| u64::from(mode));
    let (head_request, close) = (mode & 4 != 0, mode & 8 != 0);
    let mut out = Vec::new();
    let framing = encode_response_head(&mut out, status, &headers, exact, head_request, close);
    let mut slots = [httparse::EMPTY_HEADER; 512];
    let mut parsed = httparse::Response::new(&mut slots);
    assert_eq!(
        parsed.parse(&out),
        Ok(httparse::Status::Complete(out.len())),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(parsed.code, Some(status.as_u16()));
    let count = |name: &str| parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
    let lengths = count("content-length");
    let chunked = count("transfer-encoding");
    match framing {
        Framing::Chunked => assert_eq!((lengths, chunked), (0, 1)),
        Framing::Length(_) => assert_eq!((lengths, chunked), (1, 0)),
        Framing::None => assert_eq!(chunked, 0),
    }
    assert!(lengths <= 1, "one length at most");
    assert_eq!(count("connection"), usize::from(close));
    for (name, value) in &headers {
        if ["content-length", "transfer-encoding", "connection"].contains(&name.as_str()) {
            continue;
        }
        assert!(parsed.headers.iter().any(|h| h.name == name.as_str() && h.value == value.as_bytes()));
    }
}
