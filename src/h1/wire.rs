//! HTTP/1.1 on the wire (RFC 9112), upstream side: the request we write, the response head
//! we read and how its body is framed, and the chunked decoder. Pure functions over
//! buffers: no sockets here, so every rule is unit-tested byte for byte.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// A response head larger than this is refused (nginx's default is 4–8 KiB; hyper's ~400).
pub const MAX_HEAD: usize = 64 * 1024;
/// More header fields than this in one response head (or trailer section) is refused.
pub const MAX_HEADERS: usize = 128;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// A trailer section larger than this is refused.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an upstream's bytes were not valid HTTP/1.1 (the connection is then closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid response from the upstream: {0}")]
pub struct WireError(pub &'static str);

/// Write the request: head, our `Host`, a `Content-Length` for `body`, then `body`.
/// `headers` has had hop-by-hop fields and the app's `Host` removed already; its
/// `Content-Length` (if any) is replaced by the length of the body actually sent.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    body: &[u8],
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::HOST {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // As hyper does: no length on an empty GET (and the like) unless the app sent one.
    if !body.is_empty() || headers.contains_key(header::CONTENT_LENGTH) || expects_body(method) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Methods a request can be sent again with, when the connection turned out to be closed
/// (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, a 1xx, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// The end-to-end fields, ready to be written to the app.
    pub fields: Fields,
    pub framing: Framing,
    /// The connection can carry another request once this body is read.
    pub keep_alive: bool,
}

/// An upstream response's end-to-end fields as the app is to get them: `name: value\r\n`
/// lines (names as the upstream wrote them, as nginx passes them on: some legacy clients
/// match names case-sensitively; `HeaderMap` lower-cases them when they are moved into
/// one), hop-by-hop and framing fields left out, and what the app's response head needs of
/// the framing fields.
///
/// Kept as bytes, not a `HeaderMap`: building a map from the upstream's head only for our
/// own server to iterate over it and write the same bytes again cost about a seventh of
/// the proxy's instructions per request. Code that reads or changes a response's fields
/// first moves these into its `HeaderMap` ([`crate::h1::materialize`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    lines: Vec<u8>,
    /// A `Date` field is among the lines.
    pub has_date: bool,
    /// The `Content-Length` the upstream stated (not among the lines); `None` when it
    /// sent none, or framed the body with `Transfer-Encoding`.
    pub content_length: Option<u64>,
}

impl Fields {
    /// The `name: value\r\n` lines.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Append the fields (and the stated `Content-Length`) to `headers`.
    pub fn append_to(&self, headers: &mut HeaderMap) {
        for line in self.lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let value = line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]);
            // Both were checked as they were read; a failure here would be our own bug.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        if let Some(n) = self.content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }

    /// The fields as a `HeaderMap` of their own.
    pub fn to_header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.append_to(&mut headers);
        headers
    }
}

/// Parse a response head from the front of `buf`. `None`: more bytes are needed. On
/// success the head's bytes are taken off `buf` and what follows (the start of the body)
/// stays.
pub fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, WireError> {
    // Uninitialised slots: writing 128 empty headers first would cost more than parsing.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(WireError("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError("too many header fields")),
        Err(_) => return Err(WireError("malformed response head")),
    };
    if len > MAX_HEAD {
        return Err(WireError("response head too large"));
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(WireError("invalid status code"))?;
    // First the framing and hop-by-hop fields, which never reach the app (`Connection`
    // may name more of them); then the others, copied as lines.
    // (httparse has checked the names are tokens and the values are what `HeaderValue`
    // accepts: visible ASCII, spaces, tabs and obs-text.)
    let mut wire = WireFields::default();
    let mut size = 0;
    let mut end_to_end = [false; MAX_HEADERS];
    for (h, keep) in parsed.headers.iter().zip(end_to_end.iter_mut()) {
        *keep = !wire.take(h.name.as_bytes(), h.value)?;
        if *keep {
            size += h.name.len() + h.value.len() + 4;
        }
    }
    let mut fields = Fields {
        lines: Vec::with_capacity(size),
        has_date: false,
        content_length: None,
    };
    let mut length_named = false;
    for (h, keep) in parsed.headers.iter().zip(end_to_end) {
        let name = h.name.as_bytes();
        if !wire.named.is_empty() && wire.named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            length_named |= name.eq_ignore_ascii_case(b"content-length");
            continue; // listed in Connection: hop-by-hop too
        }
        if !keep {
            continue;
        }
        fields.has_date |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        fields.lines.extend_from_slice(name);
        fields.lines.extend_from_slice(b": ");
        fields.lines.extend_from_slice(h.value);
        fields.lines.extend_from_slice(b"\r\n");
    }
    let framing = framing(method, status, version, &wire)?;
    // RFC 9112 §6.3: a length next to a transfer coding is ignored, and not forwarded.
    if wire.chunked.is_none() && !length_named {
        fields.content_length = wire.length;
    }
    let keep_alive = version == Version::HTTP_11 && framing != Framing::UntilClose && !wire.close;
    buf.advance(len);
    Ok(Some(Head {
        status,
        version,
        fields,
        framing,
        keep_alive,
    }))
}

/// What a field is to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Another hop-by-hop field (RFC 9110 §7.6.1, and `Keep-Alive`, `Proxy-Connection`).
    HopByHop,
    EndToEnd,
}

/// A field's kind by its name, in any case (the lengths tell most names apart at once).
/// `name` is a token (httparse checked it): for those, setting the 0x20 bit maps exactly
/// the two cases of a letter to the lower one and leaves '-' alone, so one branch-free
/// pass compares.
pub(crate) fn field_kind(name: &[u8]) -> Kind {
    let is = |lower: &str| {
        name.iter()
            .zip(lower.as_bytes())
            .fold(0, |diff, (a, b)| diff | ((a | 0x20) ^ b))
            == 0
    };
    match name.len() {
        2 if is("te") => Kind::HopByHop,
        7 if is("trailer") || is("upgrade") => Kind::HopByHop,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::HopByHop,
        14 if is("content-length") => Kind::ContentLength,
        16 if is("proxy-connection") => Kind::HopByHop,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        18 if is("proxy-authenticate") => Kind::HopByHop,
        19 if is("proxy-authorization") => Kind::HopByHop,
        _ => Kind::EndToEnd,
    }
}

/// What the hop-by-hop and framing fields of a response head say.
#[derive(Default)]
struct WireFields<'a> {
    /// `Transfer-Encoding` was present; `true` when its last coding is chunked.
    chunked: Option<bool>,
    /// `Content-Length`, when present (every value must agree).
    length: Option<u64>,
    /// `Connection: close`.
    close: bool,
    /// Other fields `Connection` names: hop-by-hop for this message.
    named: Vec<&'a [u8]>,
}

impl<'a> WireFields<'a> {
    /// Note a framing or hop-by-hop field. `true`: it stays out of the forwarded fields.
    fn take(&mut self, name: &[u8], value: &'a [u8]) -> Result<bool, WireError> {
        match field_kind(name) {
            Kind::ContentLength => {
                self.add_length(value)?;
                Ok(true)
            }
            Kind::TransferEncoding => {
                let text = std::str::from_utf8(value).unwrap_or("");
                let last = text.rsplit(',').next().unwrap_or("").trim();
                self.chunked = Some(last.eq_ignore_ascii_case("chunked"));
                Ok(true)
            }
            Kind::Connection => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive")
                        && HeaderName::from_bytes(token).is_ok()
                    {
                        self.named.push(token);
                    }
                }
                Ok(true)
            }
            Kind::HopByHop => Ok(true),
            Kind::EndToEnd => Ok(false),
        }
    }

    fn add_length(&mut self, value: &[u8]) -> Result<(), WireError> {
        let text = std::str::from_utf8(value).map_err(|_| WireError("invalid content-length"))?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(WireError("invalid content-length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| WireError("invalid content-length"))?;
            if self.length.is_some_and(|l| l != n) {
                return Err(WireError("conflicting content-length values"));
            }
            self.length = Some(n);
        }
        Ok(())
    }
}

fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    wire: &WireFields,
) -> Result<Framing, WireError> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(chunked) = wire.chunked {
        if version != Version::HTTP_11 {
            return Err(WireError("transfer-encoding in an HTTP/1.0 response"));
        }
        // Chunked must be the last coding; otherwise the body runs to the close.
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    Ok(match wire.length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// What the chunked decoder made of the bytes it had.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// More bytes are needed.
    NeedMore,
    /// The body is complete (the final CRLF consumed).
    End,
}

/// The chunked transfer coding (RFC 9112 §7.1), decoded incrementally from a buffer.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Take what `buf` holds of the body; chunk data comes out without copying.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = match size {
                        0 => ChunkState::Trailers,
                        n => ChunkState::Data(n),
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(take).freeze();
                    self.state = match left - take as u64 {
                        0 => ChunkState::DataEnd,
                        n => ChunkState::Data(n),
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Decoded::End);
                    }
                    let Some(end) = find(buf, b"\r\n\r\n", MAX_TRAILERS)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let trailers = parse_trailers(&buf[..end + 4])?;
                    buf.advance(end + 4);
                    self.state = ChunkState::Done;
                    if trailers.is_empty() {
                        return Ok(Decoded::End);
                    }
                    return Ok(Decoded::Trailers(trailers));
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, WireError> {
    find(buf, b"\r\n", limit)
}

fn find(buf: &[u8], needle: &[u8], limit: usize) -> Result<Option<usize>, WireError> {
    match buf.windows(needle.len()).position(|w| w == needle) {
        Some(i) if i <= limit => Ok(Some(i)),
        Some(_) => Err(WireError("chunk framing line too long")),
        None if buf.len() > limit + needle.len() => Err(WireError("chunk framing line too long")),
        None => Ok(None),
    }
}

/// `1a;name=value` -> 26. Extensions are ignored; at most 16 hex digits.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(WireError("invalid chunk size"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || line.contains(&b'\n') || line.contains(&b'\r') {
        return Err(WireError("invalid chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| WireError("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| WireError("invalid chunk size"))
}

fn parse_trailers(section: &[u8]) -> Result<HeaderMap, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| WireError("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(f.value)
                    .map_err(|_| WireError("invalid trailer value"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(WireError("malformed trailer section")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, method: Method) -> Result<Option<Head>, WireError> {
        parse_response(&mut BytesMut::from(bytes), &method)
    }

    fn framing_of(bytes: &str, method: Method) -> Framing {
        head(bytes, method).unwrap().unwrap().framing
    }

    #[test]
    fn the_request_head_carries_our_host_and_the_real_length() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let mut out = Vec::new();
        let host = HeaderValue::from_static("up:8080");
        encode_request(&mut out, &Method::POST, "/p?q=1", &host, &headers, b"body");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: up:8080\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 4\r\n\r\nbody"
        );
        let mut out = Vec::new();
        encode_request(&mut out, &Method::GET, "/", &host, &HeaderMap::new(), b"");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: up:8080\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request(&mut out, &Method::PUT, "/", &host, &HeaderMap::new(), b"");
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("content-length: 0\r\n\r\n"));
    }

    #[test]
    fn a_head_is_taken_off_the_buffer_and_the_body_stays() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: z\r\n\r\nhello");
        let h = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(
            h.fields.lines(),
            b"X-Y: z\r\n",
            "names as the upstream wrote them"
        );
        assert_eq!(h.fields.content_length, Some(5));
        assert_eq!(h.fields.to_header_map()["x-y"], "z");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn a_partial_head_asks_for_more_and_a_huge_one_is_refused() {
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le", Method::GET)
            .unwrap()
            .is_none());
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(head(&huge, Method::GET).is_err());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        assert_eq!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), Method::GET).unwrap_err(),
            WireError("too many header fields")
        );
        assert!(head("HTTP/1.1 2OO OK\r\n\r\n", Method::GET).is_err());
        assert!(head("HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n", Method::GET).is_err());
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let g = Method::GET;
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", Method::HEAD),
            Framing::Empty
        );
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\n\r\n", g.clone()),
            Framing::Empty
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                g.clone()
            ),
            Framing::Empty
        );
        assert_eq!(
            framing_of("HTTP/1.1 100 Continue\r\n\r\n", g.clone()),
            Framing::Empty
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
                g.clone()
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                g.clone()
            ),
            Framing::UntilClose
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", g.clone()),
            Framing::Length(3)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\n\r\n", g.clone()),
            Framing::UntilClose
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", g.clone()),
            Framing::Empty
        );
        for bad in ["3, 4", "-1", "+3", "0x3", "", "99999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(head(&text, g.clone()).is_err(), "{bad}");
        }
        assert!(head(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            g.clone()
        )
        .is_err());
    }

    #[test]
    fn keep_alive_needs_http_1_1_a_delimited_body_and_no_close() {
        let ka = |s: &str| head(s, Method::GET).unwrap().unwrap().keep_alive;
        assert!(ka("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"));
        assert!(!ka(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\n"
        ));
        assert!(!ka("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"));
        assert!(!ka("HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn field_names_are_told_apart_in_any_case_and_near_misses_are_not_taken() {
        for (name, kind) in [
            ("Content-Length", Kind::ContentLength),
            ("CONTENT-LENGTH", Kind::ContentLength),
            ("transfer-encoding", Kind::TransferEncoding),
            ("Connection", Kind::Connection),
            ("TE", Kind::HopByHop),
            ("Keep-Alive", Kind::HopByHop),
            ("Proxy-Connection", Kind::HopByHop),
            ("upgrade", Kind::HopByHop),
            ("trailer", Kind::HopByHop),
            ("proxy-authenticate", Kind::HopByHop),
            ("Proxy-Authorization", Kind::HopByHop),
            ("content_length", Kind::EndToEnd),
            ("content-lengtH2", Kind::EndToEnd),
            ("connectio~", Kind::EndToEnd),
            ("conne^tion", Kind::EndToEnd),
            ("tf", Kind::EndToEnd),
            ("content-type", Kind::EndToEnd),
        ] {
            assert_eq!(field_kind(name.as_bytes()), kind, "{name}");
        }
    }

    #[test]
    fn values_http_would_refuse_are_refused_by_the_parser_already() {
        for bad in ["a\x7fb", "a\x01b", "a\x00b"] {
            let wire = format!("HTTP/1.1 200 OK\r\nX: {bad}\r\n\r\n");
            assert!(head(&wire, Method::GET).is_err(), "{bad:?}");
        }
        let h = head("HTTP/1.1 200 OK\r\nX: a\tb \u{e9}\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(
            h.fields.to_header_map()["x"].as_bytes(),
            "a\tb \u{e9}".as_bytes()
        );
    }

    #[test]
    fn hop_by_hop_fields_are_read_and_left_out() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
             X-Hop: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nTrailer: X-Sum\r\n\
             X-End: 2\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.fields.lines(), b"X-End: 2\r\n");
        assert_eq!(
            h.fields.content_length, None,
            "a length beside chunked is dropped"
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
    }

    fn decode_all(
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, usize), WireError> {
        let mut chunked = Chunked::default();
        let mut buf = BytesMut::new();
        let (mut body, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match chunked.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((body, trailers, buf.len())),
                Decoded::NeedMore if fed == wire.len() => return Err(WireError("eof")),
                Decoded::NeedMore => {
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_are_split() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (body, trailers, left) = decode_all(wire, step).unwrap();
            assert_eq!(body, b"hello world", "step {step}");
            assert_eq!(trailers.unwrap()["x-sum"], "42");
            // What follows the body is left for the caller (and makes the connection unusable).
            assert!(left <= 4);
        }
        let (body, trailers, _) = decode_all(b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!(body, b"0123456789");
        assert!(trailers.is_none());
    }

    #[test]
    fn malformed_chunking_is_an_error_not_a_guess() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                decode_all(bad, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 10));
        assert_eq!(
            decode_all(long.as_bytes(), 1000).unwrap_err(),
            WireError("chunk framing line too long")
        );
    }
}
