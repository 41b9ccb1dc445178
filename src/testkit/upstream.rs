//! The mock upstream API: checks every bearer against a [`MockAuth`], records what it saw,
//! and serves slow, large and early-401 responses on request.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONNECTION, UPGRADE, WWW_AUTHENTICATE};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{json, spawn, MockAuth, MockServer};
use crate::body::{self, ProxyBody};

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: Method,
    pub version: http::Version,
    /// Path and query as received.
    pub uri: String,
    pub headers: HeaderMap,
    /// The body (kept only up to 4 MiB).
    pub body: Bytes,
    pub body_len: u64,
    pub authorized: bool,
}

/// An API that requires a valid bearer from `auth`.
///
/// Paths: `/big/{n}` streams n bytes; `/slow/{ms}` waits first; `/early401/...` answers 401
/// before reading the body; anything else answers 200 JSON describing the request.
pub struct MockUpstream {
    pub auth: Option<Arc<MockAuth>>,
    pub name: String,
    pub seen: Mutex<Vec<SeenRequest>>,
    pub unauthorized: AtomicU64,
    pub ok: AtomicU64,
}

impl MockUpstream {
    pub fn new(name: &str, auth: Option<Arc<MockAuth>>) -> Arc<MockUpstream> {
        Arc::new(MockUpstream {
            auth,
            name: name.to_string(),
            seen: Mutex::new(Vec::new()),
            unauthorized: AtomicU64::new(0),
            ok: AtomicU64::new(0),
        })
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(auth) = &self.auth else { return true };
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        bearer.is_some_and(|t| auth.check(t).is_ok())
    }

    /// Accept a protocol upgrade (with a valid bearer) and echo every byte back.
    fn upgrade(
        &self,
        parts: Parts,
        on_upgrade: hyper::upgrade::OnUpgrade,
        protocol: HeaderValue,
    ) -> Response<ProxyBody> {
        let authorized = self.authorized(&parts.headers);
        self.record(&parts, Bytes::new(), 0, authorized);
        if !authorized {
            return self.unauthorized();
        }
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let mut r = Response::new(body::full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut().insert(UPGRADE, protocol);
        r
    }

    fn record(&self, parts: &Parts, body: Bytes, body_len: u64, authorized: bool) {
        let uri = parts.uri.path_and_query().map(|p| p.to_string());
        let seen = SeenRequest {
            method: parts.method.clone(),
            version: parts.version,
            uri: uri.unwrap_or_default(),
            headers: parts.headers.clone(),
            body,
            body_len,
            authorized,
        };
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seen);
    }

    fn unauthorized(&self) -> Response<ProxyBody> {
        self.unauthorized.fetch_add(1, Ordering::SeqCst);
        let mut r = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_token"}),
        );
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        r
    }

    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        if let Some(protocol) = req.headers().get(UPGRADE).cloned() {
            let on_upgrade = hyper::upgrade::on(&mut req);
            return self.upgrade(req.into_parts().0, on_upgrade, protocol);
        }
        let (parts, mut body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let authorized = self.authorized(&parts.headers);
        if path.starts_with("/early401") && !authorized {
            return self.unauthorized();
        }
        // Read the body as a stream: count everything, keep up to 4 MiB.
        let mut kept = Vec::new();
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                len += data.len() as u64;
                if kept.len() + data.len() <= 4 << 20 {
                    kept.extend_from_slice(data);
                }
            }
        }
        self.record(&parts, Bytes::from(kept), len, authorized);
        if !authorized {
            return self.unauthorized();
        }
        self.ok.fetch_add(1, Ordering::SeqCst);
        if let Some(ms) = path
            .strip_prefix("/slow/")
            .and_then(|s| s.parse::<u64>().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(n) = path
            .strip_prefix("/big/")
            .and_then(|s| s.parse::<u64>().ok())
        {
            return stream_bytes(n);
        }
        let mut r = json(
            StatusCode::OK,
            serde_json::json!({
                "upstream": self.name,
                "method": parts.method.as_str(),
                "uri": parts.uri.path_and_query().map(|p| p.as_str()),
                "body_len": len,
            }),
        );
        r.headers_mut().insert(
            "x-upstream",
            HeaderValue::from_str(&self.name).unwrap_or(HeaderValue::from_static("?")),
        );
        r
    }
}

/// A response of `n` bytes generated chunk by chunk (never held in memory).
fn stream_bytes(n: u64) -> Response<ProxyBody> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let size = CHUNK.min(n - i * CHUNK) as usize;
        Ok::<_, Infallible>(Frame::data(chunk.slice(..size)))
    });
    let stream = IterStream(frames);
    let mut r = Response::new(body::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    r
}

/// An iterator as a `Stream` (frames are produced on demand, so memory stays flat).
struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

/// Start `upstream` over plain HTTP (HTTP/1.1 and h2c).
pub async fn upstream_server(upstream: Arc<MockUpstream>) -> MockServer {
    spawn(
        None,
        Arc::new(move |req| Box::pin(upstream.clone().handle(req))),
    )
    .await
}

/// Start `upstream` over TLS with the given rustls server config (ALPN h2 + http/1.1).
pub async fn upstream_server_tls(
    upstream: Arc<MockUpstream>,
    mut tls: rustls::ServerConfig,
) -> MockServer {
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    spawn(
        Some(acceptor),
        Arc::new(move |req| Box::pin(upstream.clone().handle(req))),
    )
    .await
}
