//! Our own HTTP/1.1 server for the app's plain requests, in the connection's own task.
//!
//! hyper's server keeps an 8 KiB read buffer and an 8 KiB write buffer for each HTTP/1.1
//! connection's whole life: at 10,000 idle keep-alive connections, most of the proxy's
//! memory. Here a buffer exists only while a request is being read (an idle connection
//! holds none), a request head is parsed straight into an `http::Request` that shares the
//! buffer's bytes, and the response head goes out in one write with the body bytes that
//! are ready. (It also runs fewer instructions per request than hyper's dispatcher, though
//! not enough to show in CPU time: benches/HISTORY.md.)
//!
//! Requests [`app_wire::classify`](super::app_wire::classify) does not call plain (and
//! anything malformed) are not ours: the connection is handed to hyper's server with
//! every byte read so far ([`Rewind`]), and hyper serves it from that request on.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::app_wire::{self, Framing, Parsed};
use super::rewind::Rewind;
use super::wire::Fields;
use crate::body::{AppBody, ProxyBody};
use crate::server::ConnLimits;

/// The read buffer's first size (a request head is rarely larger).
const READ_SIZE: usize = 4096;
/// How long the rest of a small request body may take to arrive once its head has: a
/// slower one is handed to hyper's server, which streams it.
const BODY_WAIT: Duration = Duration::from_secs(1);
/// Body data up to this size is copied into the pending write; larger is written as is.
const COALESCE: usize = 16 * 1024;

/// Serve `stream`'s plain requests with `handler` until the app closes it, it idles past
/// `limits.header_timeout`, `draining` ends it between requests, or a request is not ours:
/// then it is returned, rewound, for hyper's server.
pub async fn serve<F, Fut>(
    mut stream: TcpStream,
    handler: F,
    limits: ConnLimits,
    draining: &CancellationToken,
) -> io::Result<Option<Rewind>>
where
    F: Fn(Request<AppBody>) -> Fut,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // hyper's server answers a head larger than this with 431: past it, hyper is handed it.
    let head_limit = limits.max_header_size.max(8192);
    let mut buf = BytesMut::new();
    // One timer and one drain watch for the connection's life, rather than a new pair per
    // request: moving a registered deadline later is one atomic operation (the timer wheel
    // sees it only when the old deadline comes), where a new timer is a wheel insert and
    // a removal, and a new drain watch a lock and a list insert.
    let mut header_timer = std::pin::pin!(tokio::time::sleep(limits.header_timeout));
    let mut drained = std::pin::pin!(draining.cancelled());
    loop {
        header_timer
            .as_mut()
            .reset(Instant::now() + limits.header_timeout);
        let plain = loop {
            if !buf.is_empty() {
                match app_wire::classify(&buf) {
                    Parsed::Plain(plain) => break plain,
                    Parsed::Partial if buf.len() <= head_limit => {}
                    _ => return Ok(Some(Rewind::new(buf.freeze(), stream))),
                }
            }
            let read = tokio::select! {
                biased;
                read = read_some(&stream, &mut buf) => read,
                _ = drained.as_mut() => return Ok(None),
                _ = header_timer.as_mut() => return Ok(None),
            };
            match read {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        };
        // A small body is read whole before the request is handled, as nginx does.
        let (len, body_len) = (plain.len, plain.body_len);
        let whole = len + body_len;
        if buf.len() < whole {
            let deadline = Instant::now() + BODY_WAIT;
            while buf.len() < whole {
                buf.reserve(whole - buf.len());
                match tokio::time::timeout_at(deadline, read_some(&stream, &mut buf)).await {
                    Err(_) => return Ok(Some(Rewind::new(buf.freeze(), stream))),
                    Ok(Ok(0)) => return Ok(None),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                }
            }
        }
        let (close, trailers) = (plain.close, plain.trailers);
        let head = buf.split_to(len).freeze();
        let Some(request) = app_wire::take_request(&head, plain) else {
            // A value or target `http` refuses: hyper answers it.
            let mut prefix = BytesMut::from(&head[..]);
            prefix.extend_from_slice(&buf);
            return Ok(Some(Rewind::new(prefix.freeze(), stream)));
        };
        let body = buf.split_to(body_len).freeze();
        let head_request = request.method() == Method::HEAD;
        let request = request.map(|()| Either::Right(Full::new(body)));
        // Boxed: the connection's future would otherwise hold room for a whole request's
        // future while it idles.
        let response = Box::pin(handler(request)).await;
        let close = close || draining.is_cancelled() || closes(response.headers());
        write_response(&mut stream, response, head_request, close, trailers).await?;
        if close {
            let _ = stream.shutdown().await;
            return Ok(None);
        }
        if buf.is_empty() {
            // Idle connections hold no buffer.
            buf = BytesMut::new();
        }
    }
}

/// Read what the socket has into `buf` (allocating it only once there is something to
/// read). `Ok(0)`: the app closed the connection.
async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// The response says the connection ends with it.
fn closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| app_wire::has_token(v.as_bytes(), "close"))
}

/// Write `response`: its head and the first body bytes ready with it in one write, then
/// the rest as it comes. An error leaves the connection to be closed (the app sees the
/// response cut short, as with hyper).
async fn write_response(
    stream: &mut TcpStream,
    response: Response<ProxyBody>,
    head_request: bool,
    close: bool,
    trailers_accepted: bool,
) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let mut out = Vec::with_capacity(512);
    let framing = app_wire::encode_response_head(
        &mut out,
        parts.status,
        &parts.headers,
        parts.extensions.get::<Fields>(),
        body.size_hint().exact(),
        head_request,
        close,
    );
    let mut remaining = match framing {
        Framing::None => return stream.write_all(&out).await,
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    let mut trailers = None;
    while !body.is_end_stream() {
        // What is ready now joins the pending write; otherwise that goes out first.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                stream.write_all(&out).await?;
                out.clear();
                body.frame().await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                stream.write_all(&out).await?;
                return Err(io::Error::other(e));
            }
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if framing == Framing::Chunked {
            app_wire::chunk_size_line(&mut out, data.len());
        } else if data.len() as u64 > remaining {
            stream.write_all(&out).await?;
            return Err(io::Error::other(
                "response body longer than its content-length",
            ));
        } else {
            remaining -= data.len() as u64;
        }
        put(stream, &mut out, data).await?;
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    match framing {
        Framing::Chunked => {
            app_wire::last_chunk(&mut out, trailers.as_ref().filter(|_| trailers_accepted))
        }
        _ if remaining != 0 => {
            stream.write_all(&out).await?;
            return Err(io::Error::other(
                "response body shorter than its content-length",
            ));
        }
        _ => {}
    }
    stream.write_all(&out).await
}

/// Add `data` to the pending write, or write both when it is large (no copy).
async fn put(stream: &mut TcpStream, out: &mut Vec<u8>, data: Bytes) -> io::Result<()> {
    if data.len() <= COALESCE {
        out.extend_from_slice(&data);
        return Ok(());
    }
    stream.write_all(out).await?;
    out.clear();
    stream.write_all(&data).await
}
