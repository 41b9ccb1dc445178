//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and h2c (detected from
//! the first bytes; plain HTTP/1.1 requests served by our own server, `h1::app`, the rest by
//! hyper's), a cap on request-head size, and graceful shutdown (stop accepting, let
//! in-flight requests finish within the grace period).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{AppBody, ProxyBody};
use crate::h1;

/// The client's address, set on every admin request (the admin API trusts loopback only).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Limits applied to every connection.
#[derive(Clone, Copy)]
pub struct ConnLimits {
    /// Request heads larger than this get 431 (HTTP/1) or a stream error (h2).
    pub max_header_size: usize,
    /// An HTTP/1.1 connection must send a complete request head within this, the first
    /// one and each one after an idle keep-alive wait (`server.keepalive_timeout`).
    pub header_timeout: Duration,
}

/// The auto-detecting server (HTTP/1.1 or h2, by what arrives), for intercepted tunnels.
pub(crate) fn builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(max_buf_size(limits));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_header_list_size(limits));
    b
}

fn http1_builder(limits: ConnLimits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(max_buf_size(limits));
    b
}

fn http2_builder(limits: ConnLimits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(max_header_list_size(limits));
    b
}

/// hyper's minimum buffer is 8 KiB; an HTTP/1.1 head that does not fit gets 431.
fn max_buf_size(limits: ConnLimits) -> usize {
    limits.max_header_size.max(8192)
}

fn max_header_list_size(limits: ConnLimits) -> u32 {
    u32::try_from(limits.max_header_size).unwrap_or(u32::MAX)
}

/// What h2c with prior knowledge starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a new connection speaks, by its first bytes.
#[derive(Debug, PartialEq)]
enum Protocol {
    Http1,
    /// h2c with prior knowledge.
    Http2,
}

/// Which protocol `first` (the bytes received so far) is, if they tell yet.
fn protocol_of(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Peek (without consuming) at a new connection's first bytes, and serve it with hyper's
/// HTTP/1.1 or h2 server alone, rather than hyper-util's auto-detecting one: that one
/// keeps the detector's buffered prefix and room for the other protocol's state for the
/// connection's whole life (19.3 -> 13.5 KiB per idle keep-alive connection, measured by
/// benches/scale.rs). Until its first byte arrives a connection holds no HTTP state at
/// all. Nearly every HTTP/1.1 request differs from the preface in its first two bytes; an
/// h2c client sends the whole preface at once. A peer that sends a piece of it and stalls
/// is looked at again every 20 ms until the header timeout. `None`: the peer closed, or
/// did not say within the header timeout.
async fn sniff(stream: &tokio::net::TcpStream, header_timeout: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + header_timeout;
    let mut first = [0u8; 24];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(protocol) = protocol_of(&first[..n]) {
            return Some(protocol);
        }
        // Peeking again at once would return the same bytes: wait a little instead.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Serve `listener` until `shutdown` is cancelled, then drain for at most `grace`. The
/// handler gets each request with the address of the client that sent it.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    limits: ConnLimits,
    shutdown: CancellationToken,
    grace: Duration,
) where
    F: Fn(Request<AppBody>, std::net::SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // Shared, not cloned into each connection's task: every byte a task holds is paid by
    // every idle keep-alive connection.
    let builders = Arc::new((http1_builder(limits), http2_builder(limits)));
    // hyper-util's GracefulShutdown drains the connections it watches, and waits for every
    // watcher handed out. It cannot watch an HTTP/1.1 connection with upgrades (hyper-util
    // has no impl for that type): those hold a watcher to be waited for, and are told to
    // finish by `draining`, as are connections still being sniffed.
    let graceful = GracefulShutdown::new();
    let draining = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let hyper_handler = handler.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            // Boxed: hyper keeps room for one in-flight service future per connection for
            // the connection's whole life, so an unboxed (large) request future would cost
            // its full size on every idle keep-alive connection.
            let fut = Box::pin(hyper_handler(req.map(AppBody::Left), peer));
            async move {
                let mut response = fut.await;
                // hyper writes only the header map.
                h1::materialize(&mut response);
                Ok::<_, Infallible>(response)
            }
        });
        let (builders, watcher, draining) =
            (builders.clone(), graceful.watcher(), draining.clone());
        tokio::spawn(async move {
            let protocol = tokio::select! {
                _ = draining.cancelled() => return,
                protocol = sniff(&stream, limits.header_timeout) => protocol,
            };
            let served = match protocol {
                None => return,
                Some(Protocol::Http1) => {
                    let _counted = watcher;
                    // Plain requests are served by our own HTTP/1.1 server; from the first
                    // one that is not (an upgrade, Expect, a streamed or chunked upload,
                    // HTTP/1.0, anything malformed), hyper's server takes the connection.
                    let plain = h1::app::serve(stream, |req| handler(req, peer), limits, &draining);
                    let rewound = match plain.await {
                        Ok(Some(rewound)) => rewound,
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                            return;
                        }
                    };
                    // Boxed, as the h2 server below: rare, and large, they would otherwise
                    // be paid for by every connection's task.
                    Box::pin(hyper_http1(&builders.0, rewound, service, &draining)).await
                }
                Some(Protocol::Http2) => {
                    let conn = builders.1.serve_connection(TokioIo::new(stream), service);
                    Box::pin(watcher.watch(conn)).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    draining.cancel();
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace elapsed with requests still in flight"
        );
    }
}

/// hyper's HTTP/1.1 server on a connection our own server handed over, until it ends or
/// `draining` asks it to finish its request in flight and close.
async fn hyper_http1<S>(
    builder: &http1::Builder,
    rewound: h1::Rewind,
    service: S,
    draining: &CancellationToken,
) -> Result<(), hyper::Error>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder
        .serve_connection(TokioIo::new(rewound), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => served,
        _ = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(protocol_of(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(protocol_of(b"PUT"), Some(Protocol::Http1));
        assert_eq!(protocol_of(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            protocol_of(b"\x16\x03\x01"),
            Some(Protocol::Http1),
            "TLS: hyper says 400"
        );
        assert_eq!(protocol_of(b"P"), None);
        assert_eq!(protocol_of(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(protocol_of(H2_PREFACE), Some(Protocol::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(protocol_of(&more), Some(Protocol::Http2));
    }
}
