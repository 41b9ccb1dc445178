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
    /// DPoP (RFC 9449 §9): the nonce proofs must carry, when set.
    pub dpop_nonce: Mutex<Option<String>>,
    /// Sent as `DPoP-Nonce` on the next successful answer, and required from then on.
    pub dpop_next_nonce: Mutex<Option<String>>,
    /// 401s answered `use_dpop_nonce`.
    pub dpop_nonce_challenges: AtomicU64,
    /// Why DPoP proofs were refused (for test messages).
    pub dpop_refusals: Mutex<Vec<String>>,
    dpop_seen_jti: Mutex<std::collections::HashSet<String>>,
}

/// The upstream's verdict on a request's credentials.
enum Verdict {
    Ok,
    Denied,
    /// A valid DPoP proof without the nonce this server requires.
    NeedNonce,
}

impl MockUpstream {
    pub fn new(name: &str, auth: Option<Arc<MockAuth>>) -> Arc<MockUpstream> {
        Arc::new(MockUpstream {
            auth,
            name: name.to_string(),
            seen: Mutex::new(Vec::new()),
            unauthorized: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            dpop_nonce: Mutex::new(None),
            dpop_next_nonce: Mutex::new(None),
            dpop_nonce_challenges: AtomicU64::new(0),
            dpop_refusals: Mutex::new(Vec::new()),
            dpop_seen_jti: Mutex::new(std::collections::HashSet::new()),
        })
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A valid token from `auth`; a DPoP-bound one only as `DPoP <token>` with a valid
    /// proof by its key for this very request (RFC 9449 §7.1).
    fn verdict(&self, parts: &Parts) -> Verdict {
        let Some(auth) = &self.auth else {
            return Verdict::Ok;
        };
        let value = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (scheme, token) = value.split_once(' ').unwrap_or(("", ""));
        if auth.check(token).is_err() {
            return Verdict::Denied;
        }
        let bound = auth.bound_key(token);
        match (scheme, bound) {
            ("Bearer", None) => Verdict::Ok,
            ("DPoP", Some(jkt)) => self.check_proof(parts, token, &jkt),
            _ => {
                self.refused("token presented with the wrong scheme for its binding".into());
                Verdict::Denied
            }
        }
    }

    fn check_proof(&self, parts: &Parts, token: &str, jkt: &str) -> Verdict {
        let proofs: Vec<_> = parts.headers.get_all("dpop").iter().collect();
        let [proof] = proofs[..] else {
            self.refused(format!("{} DPoP headers", proofs.len()));
            return Verdict::Denied;
        };
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let htu = [
            format!("http://{host}{}", parts.uri.path()),
            format!("https://{host}{}", parts.uri.path()),
        ];
        let nonce = self
            .dpop_nonce
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let expect = super::dpop::Expect {
            method: parts.method.as_str(),
            htu: &htu,
            ath: Some(crate::dpop::ath(token)),
            nonce: nonce.as_deref(),
        };
        let mut seen = self.dpop_seen_jti.lock().unwrap_or_else(|e| e.into_inner());
        match super::dpop::verify(proof.to_str().unwrap_or(""), &expect, &mut seen) {
            Ok(key) if key == jkt => Verdict::Ok,
            Ok(_) => {
                self.refused("proof signed by another key than the token is bound to".into());
                Verdict::Denied
            }
            Err(super::dpop::Refused::Nonce) => Verdict::NeedNonce,
            Err(super::dpop::Refused::Invalid(why)) => {
                self.refused(why);
                Verdict::Denied
            }
        }
    }

    fn refused(&self, why: String) {
        self.dpop_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(why);
    }

    /// The 401 for a request whose credentials do not pass, if they do not.
    fn refusal(&self, parts: &Parts) -> Option<Response<ProxyBody>> {
        match self.verdict(parts) {
            Verdict::Ok => None,
            Verdict::Denied => Some(self.unauthorized()),
            Verdict::NeedNonce => {
                self.dpop_nonce_challenges.fetch_add(1, Ordering::SeqCst);
                self.unauthorized.fetch_add(1, Ordering::SeqCst);
                let mut r = json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "use_dpop_nonce"}),
                );
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "DPoP error=\"use_dpop_nonce\", error_description=\"Resource server requires nonce in DPoP proof\"",
                    ),
                );
                let nonce = self
                    .dpop_nonce
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(n) = nonce.and_then(|n| HeaderValue::from_str(&n).ok()) {
                    r.headers_mut().insert("dpop-nonce", n);
                }
                Some(r)
            }
        }
    }

    /// Accept a protocol upgrade (with a valid bearer) and echo every byte back.
    fn upgrade(
        &self,
        parts: Parts,
        on_upgrade: hyper::upgrade::OnUpgrade,
        protocol: HeaderValue,
    ) -> Response<ProxyBody> {
        let refusal = self.refusal(&parts);
        self.record(&parts, Bytes::new(), 0, refusal.is_none());
        if let Some(refusal) = refusal {
            return refusal;
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
        let mut refusal = self.refusal(&parts);
        let authorized = refusal.is_none();
        if path.starts_with("/early401") {
            if let Some(refusal) = refusal.take() {
                return refusal;
            }
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
        if let Some(refusal) = refusal {
            return refusal;
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
        let next = self
            .dpop_next_nonce
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(n) = next {
            if let Ok(v) = HeaderValue::from_str(&n) {
                r.headers_mut().insert("dpop-nonce", v);
            }
            *self.dpop_nonce.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
        }
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
