//! What an upstream sends our HTTP/1.1 client (`src/h1/wire.rs`): response heads and
//! chunked bodies. Never a panic; a head leaves exactly the bytes after it; no hop-by-hop
//! field reaches the forwarded headers; and the chunked decoder gives the same body,
//! trailers and verdict however the bytes are split into reads.
#![no_main]

use bytes::BytesMut;
use http::Method;
use libfuzzer_sys::fuzz_target;
use token_proxy::h1::wire::{parse_response, Chunked, Decoded, Framing};

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-connection",
];

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let method = if split & 1 == 0 { Method::GET } else { Method::HEAD };

    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = parse_response(&mut buf, &method) {
        assert!(buf.len() < data.len(), "a head consumes bytes");
        assert_eq!(&data[data.len() - buf.len()..], &buf[..], "the body's start is left");
        let map = head.fields.to_header_map();
        for name in map.keys() {
            assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name} forwarded");
        }
        // Every line kept for the app reads back as one field.
        let lines = head.fields.lines().split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
        assert_eq!(map.len(), lines + usize::from(head.fields.content_length.is_some()));
        if method == Method::HEAD {
            assert_eq!(head.framing, Framing::Empty);
        }
    }

    // The same bytes as a chunked body: whole, and in reads of `step` bytes.
    let whole = decode(data, data.len().max(1));
    let step = usize::from(split >> 1).max(1);
    assert_eq!(whole, decode(data, step), "split into {step}-byte reads");
});

/// Body bytes, trailer count, and how it ended (complete, error, or out of input).
fn decode(wire: &[u8], step: usize) -> (Vec<u8>, usize, &'static str) {
    let mut chunked = Chunked::default();
    let mut buf = BytesMut::new();
    let (mut body, mut trailers, mut fed) = (Vec::new(), 0, 0);
    loop {
        match chunked.decode(&mut buf) {
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty());
                body.extend_from_slice(&d);
            }
            Ok(Decoded::Trailers(t)) => trailers += t.len(),
            Ok(Decoded::End) => return (body, trailers, "end"),
            Err(_) => return (body, trailers, "error"),
            Ok(Decoded::NeedMore) if fed == wire.len() => return (body, trailers, "more"),
            Ok(Decoded::NeedMore) => {
                let n = step.min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
        }
    }
}
