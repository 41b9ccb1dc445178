//! HTTP/1.1 on the wire (RFC 9112), app side: which requests our own server serves, their
//! heads parsed into `http::Request`s, and the response heads we write. Pure functions over
//! buffers, unit-tested byte for byte.
//!
//! Only plain requests are ours: HTTP/1.1, no transfer coding, at most a 64 KiB body of
//! known length, no `Expect`, no upgrade, no `CONNECT`. Anything else (and anything
//! malformed) is [`Parsed::Other`]: hyper's server takes the connection over from that
//! request on, with the bytes read so far, so its answers (400, 431, 100 Continue,
//! upgrades, streamed uploads) are exactly what they always were.

use std::cell::RefCell;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use super::wire::Fields;
use super::BUFFERED_BODY_LIMIT;

/// hyper's server allows 100 header fields; a request with more is left to it (431).
const MAX_REQUEST_HEADERS: usize = 100;

/// A plain request's head as [`classify`] read it: names checked, values and target as
/// positions in the buffer, so that [`take_request`] need not parse it again.
#[derive(Debug)]
pub struct PlainHead {
    /// The head's length in the buffer.
    pub len: usize,
    /// `Content-Length` (0 without one).
    pub body_len: usize,
    /// The app asked to close the connection after this exchange.
    pub close: bool,
    /// The app accepts trailers (`TE: trailers`).
    pub trailers: bool,
    method: Method,
    target: Range<usize>,
    fields: Vec<(HeaderName, Range<usize>)>,
}

/// What the front of the buffer holds.
#[derive(Debug)]
pub enum Parsed {
    /// An incomplete head: read more (the caller bounds how much).
    Partial,
    /// A plain request (see [`take_request`]).
    Plain(PlainHead),
    /// Anything else: hyper's server takes the connection over.
    Other,
}

/// Look at the request at the front of `buf` without taking it.
pub fn classify(buf: &[u8]) -> Parsed {
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut req, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Other;
    };
    let method = match Method::from_bytes(method.as_bytes()) {
        Ok(m) if m != Method::CONNECT && req.version == Some(1) => m,
        _ => return Parsed::Other,
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| s.as_ptr() as usize - base..s.as_ptr() as usize - base + s.len();
    let mut body_len = None;
    let (mut close, mut trailers) = (false, false);
    let mut fields = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Other;
        };
        if name == header::CONTENT_LENGTH {
            match (body_len, parse_length(h.value)) {
                (None, Some(n)) => body_len = Some(n),
                _ => return Parsed::Other, // repeated or invalid: hyper answers it
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Parsed::Other;
        } else if name == header::CONNECTION {
            close |= has_token(h.value, "close");
        } else if name == header::TE {
            trailers |= has_token(h.value, "trailers");
        }
        fields.push((name, at(h.value)));
    }
    match body_len.unwrap_or(0) {
        n if n > BUFFERED_BODY_LIMIT => Parsed::Other,
        n => Parsed::Plain(PlainHead {
            len,
            body_len: n as usize,
            close,
            trailers,
            method,
            target: at(path.as_bytes()),
            fields,
        }),
    }
}

/// A `Content-Length` value: 1 to 19 digits, nothing else.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The request whose head [`classify`] read, from `head` (those bytes, split off the read
/// buffer): the target and header values share them. `None`: a value or target `http`
/// refuses, which hyper's server is then left to answer.
pub fn take_request(head: &Bytes, plain: PlainHead) -> Option<Request<()>> {
    let uri = Uri::from_maybe_shared(head.slice(plain.target)).ok()?;
    let mut headers = HeaderMap::with_capacity(plain.fields.len());
    for (name, value) in plain.fields {
        let value = HeaderValue::from_maybe_shared(head.slice(value)).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = plain.method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// Whether a comma-separated field value lists `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body may be sent (HEAD, 1xx, 204, 304): what the body holds is not written.
    None,
    Length(u64),
    Chunked,
}

/// Write the response head: status line, the response's fields (those in `headers`, then
/// an upstream's `fields` as they came), `Date` unless it has one, the framing field and
/// `Connection: close` when the connection ends after it. `exact` is the body's known
/// length, if any. Returns how the body is to be framed.
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    fields: Option<&Fields>,
    exact: Option<u64>,
    head_request: bool,
    close: bool,
) -> Framing {
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = match fields.and_then(|f| f.content_length) {
        Some(n) => Some(n),
        None if headers.is_empty() => None,
        None => headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes())),
    };
    let framing = match (bodiless, declared, exact) {
        (true, _, _) => Framing::None,
        (false, Some(n), _) | (false, None, Some(n)) => Framing::Length(n),
        (false, None, None) => Framing::Chunked,
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        let ours = *name == header::CONTENT_LENGTH
            || *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION;
        if ours {
            continue; // framing and connection fields are written below, once
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(fields) = fields {
        out.extend_from_slice(fields.lines());
    }
    let has_date = fields.is_some_and(|f| f.has_date)
        || (!headers.is_empty() && headers.contains_key(header::DATE));
    if !has_date {
        out.extend_from_slice(b"date: ");
        with_date(|date| out.extend_from_slice(date));
        out.extend_from_slice(b"\r\n");
    }
    // A response to HEAD, and a 304, may state the length the body would have had.
    let no_length = status == StatusCode::NO_CONTENT || status.is_informational();
    let length = match framing {
        Framing::Length(n) => Some(n),
        Framing::None if !no_length => declared,
        _ => None,
    };
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// A chunk's size line.
pub fn chunk_size_line(out: &mut Vec<u8>, len: usize) {
    use std::io::Write;
    let _ = write!(out, "{len:X}\r\n");
}

/// The last chunk, with `trailers` if the app accepts them.
pub fn last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value, formatted once per second per worker thread.
    static DATE: RefCell<(u64, Bytes)> = const { RefCell::new((0, Bytes::new())) };
}

fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs || cell.1.is_empty() {
            *cell = (secs, Bytes::from(httpdate::fmt_http_date(now)));
        }
        f(&cell.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn plain(raw: &[u8]) -> (usize, usize) {
        match classify(raw) {
            Parsed::Plain(head) => (head.len, head.body_len),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn plain_requests_are_ours() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(plain(raw), (raw.len(), 0));
        let raw = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nbody";
        assert_eq!(plain(raw), (raw.len() - 4, 4));
        assert!(matches!(
            classify(b"GET / HTTP/1.1\r\nhost: x\r\n"),
            Parsed::Partial
        ));
        assert!(matches!(classify(b"GE"), Parsed::Partial));
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        for raw in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"CONNECT up:443 HTTP/1.1\r\nhost: up:443\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 65537\r\n\r\n",
            b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(
                matches!(classify(raw), Parsed::Other),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(classify(&many), Parsed::Other));
    }

    #[test]
    fn a_taken_request_shares_the_buffer_and_leaves_what_follows() {
        let mut buf = BytesMut::from(
            &b"GET http://up/p?q HTTP/1.1\r\nHost: up\r\nX-A: 1\r\nx-a: 2\r\nConnection: keep-alive, close\r\nTE: trailers\r\n\r\nGET /next"[..],
        );
        let Parsed::Plain(plain) = classify(&buf) else {
            panic!()
        };
        let (close, trailers) = (plain.close, plain.trailers);
        let req = take_request(&buf.split_to(plain.len).freeze(), plain).unwrap();
        assert_eq!(&buf[..], b"GET /next");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().host(), Some("up"));
        assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/p?q");
        let a: Vec<_> = req.headers().get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(req.headers()["host"], "up");
        assert!(close && trailers);
    }

    #[test]
    fn a_target_http_refuses_is_left_to_hyper() {
        let mut buf = BytesMut::from(&b"GET /a\x7f HTTP/1.1\r\n\r\n"[..]);
        if let Parsed::Plain(plain) = classify(&buf) {
            assert!(take_request(&buf.split_to(plain.len).freeze(), plain).is_none());
        }
    }

    fn head(
        status: u16,
        headers: &[(&str, &str)],
        exact: Option<u64>,
        head_req: bool,
        close: bool,
    ) -> (String, Framing) {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map.insert(header::DATE, HeaderValue::from_static("D"));
        let mut out = Vec::new();
        let framing = encode_response_head(
            &mut out,
            StatusCode::from_u16(status).unwrap(),
            &map,
            None,
            exact,
            head_req,
            close,
        );
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn response_heads_carry_the_framing_we_write() {
        assert_eq!(
            head(200, &[("x-a", "1")], Some(5), false, false),
            (
                "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: D\r\ncontent-length: 5\r\n\r\n".into(),
                Framing::Length(5)
            )
        );
        assert_eq!(
            head(200, &[("content-length", "7")], None, false, true),
            (
                "HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 7\r\nconnection: close\r\n\r\n"
                    .into(),
                Framing::Length(7)
            )
        );
        assert_eq!(
            head(
                502,
                &[("transfer-encoding", "chunked"), ("connection", "x")],
                None,
                false,
                false
            ),
            (
                "HTTP/1.1 502 Bad Gateway\r\ndate: D\r\ntransfer-encoding: chunked\r\n\r\n".into(),
                Framing::Chunked
            )
        );
        // HEAD and 304 keep the length they describe; 204 has none.
        assert_eq!(
            head(200, &[("content-length", "9")], Some(0), true, false),
            (
                "HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 9\r\n\r\n".into(),
                Framing::None
            )
        );
        assert_eq!(
            head(204, &[("content-length", "0")], Some(0), false, false),
            (
                "HTTP/1.1 204 No Content\r\ndate: D\r\n\r\n".into(),
                Framing::None
            )
        );
        assert_eq!(head(304, &[], Some(0), false, false).1, Framing::None);
        // Repeated lengths (an upstream may send the same one twice) are written once.
        assert_eq!(
            head(
                200,
                &[("content-length", "2"), ("content-length", "2")],
                Some(2),
                false,
                false
            )
            .0,
            "HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn a_date_is_added_when_missing() {
        let mut out = Vec::new();
        encode_response_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            Some(0),
            false,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        let date = text.lines().find_map(|l| l.strip_prefix("date: ")).unwrap();
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    }

    #[test]
    fn chunks_and_trailers() {
        let mut out = Vec::new();
        chunk_size_line(&mut out, 300);
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("1"));
        last_chunk(&mut out, Some(&t));
        assert_eq!(out, b"12C\r\n0\r\nx-sum: 1\r\n\r\n");
    }
}
