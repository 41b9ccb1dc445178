//! Our own HTTP/1.1 code: a client for plain-HTTP upstreams and a server for the app's
//! plain requests, each run in the task that needs it.
//!
//! hyper's client drives each upstream connection from a task of its own: a request goes
//! there through a channel, and the response body comes back through another. On this
//! hop that machinery was most of the CPU that token-proxy spent beyond nginx
//! (`benches/floor`, benches/HISTORY.md). Here the request's task writes the request,
//! reads the response head, and the app connection's task reads the body straight off the
//! socket as it sends it on; the connection then goes back to a per-worker pool.
//!
//! The client is used for `http://` upstreams without an egress proxy, for requests whose
//! body is already whole or small enough to read first ([`BUFFERED_BODY_LIMIT`]). Everything
//! else (TLS and h2 upstreams, egress proxies, streamed uploads, protocol upgrades) goes
//! through hyper's client as before. The server side ([`app`]) serves plain requests and
//! hands a connection to hyper's server at the first request that is not plain.

pub mod app;
pub mod app_wire;
mod body;
mod pool;
mod rewind;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub use body::{BodyError, ResponseBody};
use pool::Conn;
pub use pool::Pool;
pub use rewind::Rewind;
use wire::{Head, WireError};

/// A request body of at most this size (known from its length) is read whole before the
/// request is sent, as nginx does; larger or unsized bodies stream through hyper's client.
pub const BUFFERED_BODY_LIMIT: u64 = 64 * 1024;
/// How much is read from an upstream connection at a time.
pub const READ_SIZE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Connect(String),
    #[error("the upstream closed the connection before sending a response")]
    Closed,
    #[error("writing the request stalled for {0:?} (idle_timeout)")]
    WriteStalled(Duration),
    /// The exchange's deadline passed before the response head arrived.
    #[error("no response before the deadline")]
    Deadline,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// Why one exchange failed, and whether the request may be sent again on a new connection.
struct Failure {
    error: Error,
    /// Not one byte of the request reached the socket.
    nothing_sent: bool,
    /// The upstream went away before a byte of its response: a pooled connection it had
    /// closed while idle, as far as we can tell.
    no_response: bool,
}

/// Send `parts` with `body` on a pooled (or new) connection to the pool's upstream and
/// read the response head, by `deadline` ([`Error::Deadline`]). A reused connection that
/// turns out to be closed is replaced by a new one once: always when nothing was sent,
/// else only for idempotent methods (as Go's `net/http` does).
pub async fn send(
    pool: &Arc<Pool>,
    parts: &http::request::Parts,
    body: &[u8],
    deadline: Instant,
) -> Result<Response<ResponseBody>, Error> {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut request = Vec::with_capacity(512 + body.len());
    wire::encode_request(
        &mut request,
        &parts.method,
        target,
        &pool.host_header,
        &parts.headers,
        body,
    );
    let (mut conn, mut reused) = match pool.checkout() {
        Some(conn) => (conn, true),
        // Boxed, as below: connecting is rare, and its future would otherwise enlarge
        // every request's.
        None => (Box::pin(connect(pool, deadline)).await?, false),
    };
    loop {
        conn.deadline.as_mut().reset(deadline);
        match exchange(&mut conn, &request, &parts.method, pool.write_stall).await {
            Ok(head) => return Ok(respond(head, conn, pool)),
            Err(f)
                if reused
                    && f.no_response
                    && (f.nothing_sent || wire::is_idempotent(&parts.method)) =>
            {
                tracing::debug!(error = %f.error, "pooled upstream connection was closed; sending on a new one");
                conn = Box::pin(connect(pool, deadline)).await?;
                reused = false;
            }
            Err(f) => return Err(f.error),
        }
    }
}

/// Move the upstream's fields of a response our client received (kept as written, see
/// [`wire::Fields`]) into its `HeaderMap`: for code that reads or changes them, and for
/// hyper's server, which writes only the map. Any other response is left as it is.
pub fn materialize<B>(response: &mut Response<B>) {
    if let Some(fields) = response.extensions_mut().remove::<wire::Fields>() {
        fields.append_to(response.headers_mut());
    }
}

/// A new connection, by `deadline`.
async fn connect(pool: &Pool, deadline: Instant) -> Result<Conn, Error> {
    match tokio::time::timeout_at(deadline, pool.connect()).await {
        Ok(connected) => connected.map_err(Error::Connect),
        Err(_) => Err(Error::Deadline),
    }
}

fn respond(head: Head, conn: Conn, pool: &Arc<Pool>) -> Response<ResponseBody> {
    let body = ResponseBody::new(conn, pool.clone(), head.framing, head.keep_alive);
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    response.extensions_mut().insert(head.fields);
    response
}

/// The deadline passed: the request is not sent again.
fn past_deadline() -> Failure {
    Failure {
        error: Error::Deadline,
        nothing_sent: false,
        no_response: false,
    }
}

/// Write the whole request, then read up to the final response head (interim 1xx
/// responses are read and dropped, as hyper's client does).
async fn exchange(
    conn: &mut Conn,
    request: &[u8],
    method: &Method,
    write_stall: Duration,
) -> Result<Head, Failure> {
    let mut sent = 0;
    while sent < request.len() {
        let failure = |error| Failure {
            error,
            nothing_sent: sent == 0,
            no_response: true,
        };
        let written = tokio::select! {
            biased;
            written = tokio::time::timeout(write_stall, conn.io.write(&request[sent..])) => written,
            _ = conn.deadline.as_mut() => return Err(past_deadline()),
        };
        match written {
            Ok(Ok(0)) => return Err(failure(Error::Closed)),
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => return Err(failure(Error::Io(e))),
            Err(_) => {
                return Err(Failure {
                    error: Error::WriteStalled(write_stall),
                    nothing_sent: false,
                    no_response: false,
                })
            }
        }
    }
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            let fail = |e: WireError| Failure {
                error: e.into(),
                nothing_sent: false,
                no_response: false,
            };
            if let Some(head) = wire::parse_response(&mut conn.buf, method).map_err(fail)? {
                if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                    return Err(fail(WireError(
                        "101 Switching Protocols to a request that asked for no upgrade",
                    )));
                }
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
        }
        if conn.buf.capacity() - conn.buf.len() < READ_SIZE / 4 {
            conn.buf.reserve(READ_SIZE);
        }
        let failure = |error| Failure {
            error,
            nothing_sent: false,
            no_response: !got_any,
        };
        let read = tokio::select! {
            biased;
            read = conn.io.read_buf(&mut conn.buf) => read,
            _ = conn.deadline.as_mut() => return Err(past_deadline()),
        };
        match read {
            Ok(0) => return Err(failure(Error::Closed)),
            Ok(_) => got_any = true,
            Err(e) => return Err(failure(Error::Io(e))),
        }
    }
}
