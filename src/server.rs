//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and h2c (detected from
//! the first bytes), a cap on request-head size, and graceful shutdown (stop accepting, let
//! in-flight requests finish within the grace period).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;

/// The client's address, set on every request (the admin API trusts loopback only).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Limits applied to every connection.
#[derive(Clone, Copy)]
pub struct ConnLimits {
    /// Request heads larger than this get 431 (HTTP/1) or a stream error (h2).
    pub max_header_size: usize,
}

pub(crate) fn builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // hyper's minimum buffer is 8 KiB; a head that does not fit is answered with 431.
        .max_buf_size(limits.max_header_size.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX));
    b
}

/// The same HTTP/1.1 settings, for connections that cannot be h2c (see [`sniff`]).
fn http1_builder(limits: ConnLimits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(limits.max_header_size.max(8192));
    b
}

/// A request head must arrive within this (hyper's own default, made explicit).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a new connection's first bytes say it speaks.
enum Protocol {
    /// Cannot be HTTP/2's preface (`PRI * HTTP/2.0...`): served as HTTP/1.1 alone.
    Http1,
    /// Starts like the preface (or like PUT/POST/PATCH): the auto-detecting server decides.
    Either,
}

/// Peek (without consuming) at the first two bytes. Nearly every connection is told apart
/// at once, and an HTTP/1.1-only connection then carries neither HTTP/2 machinery nor the
/// detector's buffered prefix for its whole life: 19.3 -> 13.0 KiB per idle keep-alive
/// connection (benches/scale.rs). Until its first byte arrives a connection holds no HTTP
/// state at all. `None`: the peer closed, or sent nothing within the header timeout.
async fn sniff(stream: &tokio::net::TcpStream) -> Option<Protocol> {
    let mut first = [0u8; 2];
    match tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => None,
        Ok(Ok(n)) if first[..n] == b"PR"[..n] => Some(Protocol::Either),
        Ok(Ok(_)) => Some(Protocol::Http1),
    }
}

/// Serve `listener` until `shutdown` is cancelled, then drain for at most `grace`.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    limits: ConnLimits,
    shutdown: CancellationToken,
    grace: Duration,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // Shared, not cloned into each connection's task: every byte a task holds is paid by
    // every idle keep-alive connection.
    let builders = Arc::new((builder(limits), http1_builder(limits)));
    // hyper-util's GracefulShutdown drains the connections it watches, and waits for every
    // watcher handed out. It cannot watch an HTTP/1.1-only connection (hyper-util has no
    // impl for its upgradeable type): those hold a watcher to be waited for, and are told
    // to finish by `draining`.
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
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            // Boxed: hyper keeps room for one in-flight service future per connection for
            // the connection's whole life, so an unboxed (large) request future would cost
            // its full size on every idle keep-alive connection.
            let fut = Box::pin(handler(req));
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let (builders, watcher, draining) =
            (builders.clone(), graceful.watcher(), draining.clone());
        tokio::spawn(async move {
            let protocol = tokio::select! {
                _ = draining.cancelled() => return,
                protocol = sniff(&stream) => protocol,
            };
            let served = match protocol {
                None => return,
                Some(Protocol::Http1) => {
                    let _counted = watcher;
                    let conn = builders
                        .1
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        served = conn.as_mut() => served,
                        _ = draining.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    }
                    .map_err(Into::into)
                }
                Some(Protocol::Either) => {
                    let conn = builders
                        .0
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(conn).await
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
