//! In-process mock servers: an OAuth token endpoint and an upstream API that checks the
//! bearer against it. Used by the tests, the benchmarks and `token-proxy demo`.
//!
//! The token server behaves like a strict real one: refresh tokens rotate, and presenting a
//! refresh token twice revokes its whole family (RFC 9700 §4.14.2), so any client that
//! loses a rotation is locked out and the test sees it. Everything binds 127.0.0.1:0 and
//! counts what it sees.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::body::{self, ProxyBody};

mod auth;
pub mod dpop;
mod upstream;

pub use auth::{
    token_server, token_server_tls, Canned, ClientKey, ErrorStyle, JwtSigner, MockAuth,
    RefreshMode, TokenRequest,
};
pub use upstream::{upstream_server, upstream_server_tls, MockUpstream, SeenRequest};

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>
        + Send
        + Sync,
>;

/// A running mock server; stops when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port` (or https).
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn spawn(tls: Option<tokio_rustls::TlsAcceptor>, handler: Handler) -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    MockServer {
        addr,
        url: format!("{scheme}://{addr}"),
        task,
    }
}

pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(crate) fn random_hex(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
        .collect()
}

/// Serve a JSON document that can be changed while running, counting GETs (a JWKS endpoint).
pub async fn json_server(doc: Arc<Mutex<serde_json::Value>>, hits: Arc<AtomicU64>) -> MockServer {
    spawn(
        None,
        Arc::new(move |_req| {
            hits.fetch_add(1, Ordering::SeqCst);
            let value = doc.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Box::pin(async move { json(StatusCode::OK, value) })
        }),
    )
    .await
}
