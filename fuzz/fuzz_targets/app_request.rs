//! What an app sends our HTTP/1.1 server (`src/h1/app_wire.rs`), and the response heads it
//! writes. Never a panic; a head found in a prefix of the bytes is never anything but
//! "read more" (so how the bytes arrive cannot change what is served); a request taken
//! keeps every field as sent; and every response head we write parses back with the
//! fields we gave it and one framing.
#![no_main]

#[path = "../common.rs"]
mod common;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use token_proxy::h1::app_wire::{classify, encode_response_head, take_request, Framing, Parsed};
use token_proxy::h1::wire::parse_response;

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

/// Header fields from `name: value` lines (those `http` accepts), a status and a length;
/// given as a `HeaderMap`, or (mode bit 16) as an upstream response's fields as our client
/// keeps them (`h1::wire::Fields`, written as they are).
fn response_head(data: &[u8], mode: u8) {
    let mut headers = common::headers_from_lines(data);
    if headers.len() > 100 {
        return; // more fields than the parsers here have room for
    }
    let mut upstream = None;
    if mode & 16 != 0 {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        for (name, value) in &headers {
            wire.extend_from_slice(name.as_str().as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        let Ok(Some(head)) = parse_response(&mut BytesMut::from(&wire[..]), &Method::GET) else {
            return; // e.g. conflicting lengths: the client refuses the response
        };
        // What the app must get: the fields as kept (not the hop-by-hop ones).
        headers = head.fields.to_header_map();
        upstream = Some(head.fields);
    }
    let status = StatusCode::from_u16(100 + u16::from(data.first().copied().unwrap_or(0)) * 2)
        .unwrap_or(StatusCode::OK);
    let exact = (mode & 2 != 0).then(|| u64::from(mode));
    let (head_request, close) = (mode & 4 != 0, mode & 8 != 0);
    let mut out = Vec::new();
    let framing = match &upstream {
        Some(fields) => encode_response_head(&mut out, status, &HeaderMap::new(), Some(fields), exact, head_request, close),
        None => encode_response_head(&mut out, status, &headers, None, exact, head_request, close),
    };
    let mut slots = [httparse::EMPTY_HEADER; 128];
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
    assert!(count("date") >= 1, "a Date, ours or theirs");
    assert_eq!(count("connection"), usize::from(close));
    for (name, value) in &headers {
        if ["content-length", "transfer-encoding", "connection"].contains(&name.as_str()) {
            continue;
        }
        assert!(parsed.headers.iter().any(|h| h.name == name.as_str() && h.value == value.as_bytes()));
    }
}
