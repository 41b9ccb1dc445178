//! In-process mock servers: an OAuth token endpoint and an upstream API that checks the
//! bearer against it. Used by the tests, the benchmarks and `token-proxy demo`.
//!
//! The token server behaves like a strict real one: refresh tokens rotate, and presenting a
//! refresh token twice revokes its whole family (RFC 9700 §4.14.2), so any client that
//! loses a rotation is locked out and the test sees it. Everything binds 127.0.0.1:0 and
//! counts what it sees.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::body::{self, ProxyBody};

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

async fn spawn(tls: Option<tokio_rustls::TlsAcceptor>, handler: Handler) -> MockServer {
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
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
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

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
        .collect()
}

// ------------------------------------------------------------------ token server

/// Error body style of the token server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStyle {
    /// RFC 6749 §5.2: `{"error": "invalid_grant"}`.
    Rfc6749,
    /// Cotter: `{"msg": "...", "type": "..."}`.
    Cotter,
}

struct Access {
    expires: Instant,
    family: u64,
    revoked: bool,
}

struct Refresh {
    family: u64,
    used: bool,
}

/// What a refresh does with the refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshMode {
    /// Issue a new one and invalidate the old (reuse revokes the family).
    Rotate,
    /// Return the same one again.
    Keep,
    /// Leave `refresh_token` out of the response (older Cotter endpoint).
    Omit,
    /// Send `"refresh_token": ""`.
    Empty,
}

/// Makes access tokens ES256/RS256/HS256 JWTs, as a real IdP (e.g. Cotter) does.
#[derive(Clone)]
pub struct JwtSigner {
    pub key: jsonwebtoken::EncodingKey,
    pub algorithm: jsonwebtoken::Algorithm,
    pub kid: String,
    pub issuer: String,
    pub audience: String,
}

/// A canned answer that replaces normal behaviour (for robustness tests).
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

struct AuthState {
    lifetime: Duration,
    refresh_mode: RefreshMode,
    signer: Option<JwtSigner>,
    canned: Option<Canned>,
    /// When set, the next token responses use these lifetimes first (one each).
    next_lifetimes: Vec<Duration>,
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    revoked_families: HashSet<u64>,
    next_family: u64,
    fail_with: Option<StatusCode>,
    requests: Vec<TokenRequest>,
}

/// One request the token server received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub headers: HeaderMap,
    pub content_type: String,
    pub params: HashMap<String, String>,
}

/// The identity provider's state, shared by the token server and the upstream.
pub struct MockAuth {
    state: Mutex<AuthState>,
    pub error_style: ErrorStyle,
    /// While `false`, token requests wait (to hold a refresh "in flight").
    gate: watch::Sender<bool>,
    pub refresh_calls: AtomicU64,
    pub client_credentials_calls: AtomicU64,
    /// A refresh token presented a second time (a client lost a rotation).
    pub reuse_detected: AtomicU64,
    pub rejected_calls: AtomicU64,
}

impl MockAuth {
    pub fn new(lifetime: Duration) -> Arc<MockAuth> {
        Self::with_style(lifetime, ErrorStyle::Rfc6749)
    }

    pub fn with_style(lifetime: Duration, error_style: ErrorStyle) -> Arc<MockAuth> {
        Arc::new(MockAuth {
            state: Mutex::new(AuthState {
                lifetime,
                refresh_mode: RefreshMode::Rotate,
                signer: None,
                canned: None,
                next_lifetimes: Vec::new(),
                access: HashMap::new(),
                refresh: HashMap::new(),
                revoked_families: HashSet::new(),
                next_family: 1,
                fail_with: None,
                requests: Vec::new(),
            }),
            error_style,
            gate: watch::Sender::new(true),
            refresh_calls: AtomicU64::new(0),
            client_credentials_calls: AtomicU64::new(0),
            reuse_detected: AtomicU64::new(0),
            rejected_calls: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lock().lifetime = lifetime;
    }

    /// The next responses use these lifetimes, in order, before falling back to the default.
    pub fn queue_lifetimes(&self, lifetimes: &[Duration]) {
        self.lock().next_lifetimes.extend_from_slice(lifetimes);
    }

    pub fn set_refresh_mode(&self, mode: RefreshMode) {
        self.lock().refresh_mode = mode;
    }

    /// Issue JWT access tokens signed by `signer` from now on.
    pub fn set_jwt_signer(&self, signer: Option<JwtSigner>) {
        self.lock().signer = signer;
    }

    /// Answer every token request with exactly this (`None`: behave normally).
    pub fn set_canned(&self, canned: Option<Canned>) {
        self.lock().canned = canned;
    }

    /// Answer every token request with this status (`None`: behave normally).
    pub fn fail_with(&self, status: Option<StatusCode>) {
        self.lock().fail_with = status;
    }

    /// Close (`false`) or open (`true`) the gate token requests wait at.
    pub fn set_gate(&self, open: bool) {
        self.gate.send_replace(open);
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    /// A fresh login: a new token family, returned as the token response JSON a login SDK
    /// hands over (`{access_token, refresh_token, expires_in, ...}`).
    pub fn login(&self) -> serde_json::Value {
        let mut s = self.lock();
        let family = s.next_family;
        s.next_family += 1;
        self.issue(&mut s, family, true)
    }

    /// Just a refresh token of a fresh family.
    pub fn new_refresh_token(&self) -> String {
        self.login()["refresh_token"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn issue(&self, s: &mut AuthState, family: u64, with_refresh: bool) -> serde_json::Value {
        let lifetime = if s.next_lifetimes.is_empty() {
            s.lifetime
        } else {
            s.next_lifetimes.remove(0)
        };
        let access = match &s.signer {
            Some(signer) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let mut header = jsonwebtoken::Header::new(signer.algorithm);
                header.kid = Some(signer.kid.clone());
                let claims = serde_json::json!({
                    "sub": format!("user-{family}"),
                    "aud": signer.audience,
                    "iss": signer.issuer,
                    "iat": now,
                    "exp": now + lifetime.as_secs().max(1),
                    "jti": random_hex(16),
                    "scope": "access",
                    "type": "access_token",
                });
                jsonwebtoken::encode(&header, &claims, &signer.key).unwrap_or_default()
            }
            None => format!("at{family}.{}", random_hex(24)),
        };
        s.access.insert(
            access.clone(),
            Access {
                expires: Instant::now() + lifetime,
                family,
                revoked: false,
            },
        );
        let mut resp = serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs_f64().ceil() as u64,
        });
        if with_refresh {
            let refresh = format!("{family}:{}", random_hex(24));
            s.refresh.insert(
                refresh.clone(),
                Refresh {
                    family,
                    used: false,
                },
            );
            resp["refresh_token"] = refresh.into();
        }
        if self.error_style == ErrorStyle::Cotter {
            resp["id_token"] = format!("id.{}", random_hex(8)).into();
            resp["auth_method"] = "OTP".into();
        }
        resp
    }

    /// Did this server issue `token` (valid or not)?
    pub fn issued(&self, token: &str) -> bool {
        self.lock().access.contains_key(token)
    }

    /// Is this bearer token currently valid?
    pub fn check(&self, token: &str) -> Result<(), &'static str> {
        let s = self.lock();
        match s.access.get(token) {
            None => Err("unknown token"),
            Some(a) if a.revoked || s.revoked_families.contains(&a.family) => Err("revoked token"),
            Some(a) if Instant::now() >= a.expires => Err("expired token"),
            Some(_) => Ok(()),
        }
    }

    /// Revoke every access token issued so far (the upstream will answer 401).
    pub fn revoke_all_access(&self) {
        for a in self.lock().access.values_mut() {
            a.revoked = true;
        }
    }

    /// Revoke every refresh token (the next refresh gets invalid_grant).
    pub fn revoke_all_refresh(&self) {
        let mut s = self.lock();
        let families: Vec<u64> = s.refresh.values().map(|r| r.family).collect();
        s.revoked_families.extend(families);
    }

    fn error(&self, status: StatusCode, code: &str, description: &str) -> Response<ProxyBody> {
        self.rejected_calls.fetch_add(1, Ordering::SeqCst);
        let body = match self.error_style {
            ErrorStyle::Rfc6749 => {
                serde_json::json!({"error": code, "error_description": description})
            }
            ErrorStyle::Cotter => serde_json::json!({"msg": description, "type": code}),
        };
        json(status, body)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let params: HashMap<String, String> = if content_type.starts_with("application/json") {
            serde_json::from_slice::<HashMap<String, serde_json::Value>>(&body)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        } else {
            form_urlencoded::parse(&body).into_owned().collect()
        };
        self.lock().requests.push(TokenRequest {
            headers: parts.headers.clone(),
            content_type,
            params: params.clone(),
        });
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        if parts.method != Method::POST {
            return self.error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "use POST",
            );
        }
        let canned = self.lock().canned.clone();
        if let Some(c) = canned {
            let mut r = Response::new(body::full(c.body));
            *r.status_mut() = c.status;
            for (k, v) in &c.headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    r.headers_mut().insert(k, v);
                }
            }
            return r;
        }
        let fail = self.lock().fail_with;
        if let Some(status) = fail {
            return self.error(
                status,
                "temporarily_unavailable",
                "the token service is down",
            );
        }
        match params.get("grant_type").map(String::as_str) {
            Some("refresh_token") => {
                self.refresh_calls.fetch_add(1, Ordering::SeqCst);
                let presented = params.get("refresh_token").cloned().unwrap_or_default();
                let mut s = self.lock();
                let Some(entry) = s.refresh.get(&presented) else {
                    drop(s);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is not valid",
                    );
                };
                let (family, used) = (entry.family, entry.used);
                if used {
                    // Reuse of a rotated token: revoke the whole family, as real servers do.
                    s.revoked_families.insert(family);
                    drop(s);
                    self.reuse_detected.fetch_add(1, Ordering::SeqCst);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is not valid (reused)",
                    );
                }
                if s.revoked_families.contains(&family) {
                    drop(s);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is not valid (revoked)",
                    );
                }
                let mode = s.refresh_mode;
                if mode == RefreshMode::Rotate {
                    if let Some(entry) = s.refresh.get_mut(&presented) {
                        entry.used = true;
                    }
                }
                let mut resp = self.issue(&mut s, family, mode == RefreshMode::Rotate);
                match mode {
                    RefreshMode::Rotate => {}
                    RefreshMode::Keep => resp["refresh_token"] = presented.into(),
                    RefreshMode::Omit => {}
                    RefreshMode::Empty => resp["refresh_token"] = "".into(),
                }
                json(StatusCode::OK, resp)
            }
            Some("client_credentials") => {
                self.client_credentials_calls.fetch_add(1, Ordering::SeqCst);
                let mut s = self.lock();
                let resp = self.issue(&mut s, 0, false);
                json(StatusCode::OK, resp)
            }
            _ => self.error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type not supported",
            ),
        }
    }
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

/// Start the token endpoint for `auth` (any path; POST).
pub async fn token_server(auth: Arc<MockAuth>) -> MockServer {
    spawn(
        None,
        Arc::new(move |req| Box::pin(auth.clone().handle(req))),
    )
    .await
}

// ------------------------------------------------------------------ upstream

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

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
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
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(SeenRequest {
                method: parts.method.clone(),
                version: parts.version,
                uri: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: parts.headers.clone(),
                body: Bytes::from(kept),
                body_len: len,
                authorized,
            });
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
