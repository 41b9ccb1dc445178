//! The request path: pick a route, attach the token, forward (streaming), replay once on 401.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;

use crate::access::{requested_host, AccessPolicy};
use crate::body::{self, AppBody, ProxyBody, ReplayBuffer, TeeBody};
use crate::error::{error_chain, ProxyError};
use crate::h1;
use crate::idle::{is_idle_timeout, IdleBody};
use crate::intercept::{Interceptor, Target};
use crate::metrics::Metrics;
use crate::routes::{
    normalize_path, requested_upgrade, rewrite_request_headers, strip_hop_by_hop, Route, RouteTable,
};
use crate::token::{ActiveToken, Credential, TokenStore};
use crate::upstream::{BoxError, Connector};

/// Cheap to clone: one per connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped whole by a reload; each request takes the table current when it arrives.
    routes: Arc<RwLock<Arc<RouteTable>>>,
    store: Arc<TokenStore>,
    metrics: Arc<Metrics>,
    /// Log the query string too (`server.log_query`).
    log_query: bool,
    /// Which hosts and web origins may use the proxy (DNS rebinding, CSRF).
    access: AccessPolicy,
    /// `[intercept]`: TLS interception for `CONNECT` to the routes' hosts.
    intercept: Option<Arc<Interceptor>>,
}

/// What one request did, for the metrics and the log line.
#[derive(Default)]
struct Trace {
    route: Option<Arc<str>>,
    /// The route's metrics, once a route was selected.
    metrics: Option<Arc<crate::metrics::RouteMetrics>>,
    credential: Option<Arc<str>>,
    replayed: bool,
    /// Time spent waiting for upstream response heads (both attempts, if replayed).
    upstream: std::time::Duration,
}

impl Proxy {
    pub fn new(
        routes: Arc<RwLock<Arc<RouteTable>>>,
        store: Arc<TokenStore>,
        metrics: Arc<Metrics>,
        log_query: bool,
        access: AccessPolicy,
        intercept: Option<Arc<Interceptor>>,
    ) -> Proxy {
        Proxy {
            inner: Arc::new(Inner {
                routes,
                store,
                metrics,
                log_query,
                access,
                intercept,
            }),
        }
    }

    /// Serve one request from the app. Never fails: errors become JSON responses.
    /// Takes the (cheap) `Proxy` by value, so that callers can hand this future on as it
    /// is, without an `async` block of their own around it holding the request again.
    pub async fn handle(self, req: Request<AppBody>) -> Response<ProxyBody> {
        let started = Instant::now();
        // What the request log line needs, kept only when it will be written.
        let logged = tracing::enabled!(tracing::Level::INFO)
            .then(|| (req.method().clone(), req.uri().clone()));
        let mut trace = Trace::default();
        let response = match self.forward(req, &mut trace).await {
            Ok(resp) => resp,
            Err(e) => {
                let resp = e.to_response(trace.route.as_deref(), trace.credential.as_deref());
                resp.map(body::full)
            }
        };
        let status = response.status().as_u16();
        let route = trace.route.as_deref().unwrap_or("-");
        let elapsed = started.elapsed();
        match &trace.metrics {
            Some(m) => m.request(status, elapsed),
            None => self.inner.metrics.request(route, status, elapsed),
        }
        if let Some((method, uri)) = logged {
            let path = match (self.inner.log_query, uri.path_and_query()) {
                (true, Some(pq)) => pq.as_str(),
                _ => uri.path(),
            };
            if let Some(log) = crate::access_log::get() {
                log.write(&crate::access_log::Record {
                    route,
                    method: method.as_str(),
                    path,
                    status,
                    latency: elapsed,
                    upstream: trace.upstream,
                    replayed: trace.replayed,
                });
                return response;
            }
            tracing::info!(
                route,
                method = %method,
                path = %path,
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                upstream_ms = trace.upstream.as_secs_f64() * 1000.0,
                replayed = trace.replayed,
                "request"
            );
        }
        response
    }

    async fn forward(
        &self,
        mut req: Request<AppBody>,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let routes = self
            .inner
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if req.method() == Method::CONNECT {
            return self.connect(req, &routes, trace);
        }
        // A request inside an intercepted tunnel must be for the tunnel's host.
        let intercepted = req.extensions().get::<Target>().cloned();
        if let Some(target) = &intercepted {
            target.admits(&req).map_err(|got| ProxyError::Misdirected {
                expected: target.to_string(),
                got,
            })?;
        }
        admit(&self.inner.access, &req, intercepted.is_some())?;
        // Route (and forward) the path the upstream will actually serve: "/api/../admin"
        // is "/admin", and must not ride the "/api" route's token there.
        // Only a path that changed is copied; the usual one is borrowed from the request.
        let normalized = match normalize_path(req.uri().path()) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(path)) => Some(path),
            Err(e) => return Err(ProxyError::BadRequest(e.to_string())),
        };
        let path = normalized.as_deref().unwrap_or(req.uri().path());
        let route = select_route(&routes, &req, path, intercepted.as_ref())?.clone();
        trace.route = Some(route.name.clone());
        trace.metrics = Some(route.metrics(&self.inner.metrics));
        trace.credential = route.credential.clone();
        let credential =
            match &route.credential {
                Some(name) => Some(self.inner.store.get(name).ok_or_else(|| {
                    ProxyError::TokenUnavailable {
                        reason: format!("credential {name} is not loaded"),
                        retry_after: std::time::Duration::from_secs(5),
                    }
                })?),
                None => None,
            };
        let lease = match &credential {
            Some(c) => Some(lease(c).await?),
            None => None,
        };

        // A protocol upgrade (WebSocket) is forwarded over HTTP/1.1 and, once the upstream
        // agrees (101), the two connections are spliced together.
        let upgrade = requested_upgrade(req.version(), req.headers())
            .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));

        let (mut parts, incoming) = req.into_parts();
        let path = normalized.as_deref().unwrap_or(parts.uri.path());
        parts.uri = route.upstream_uri(&parts.uri, path)?;
        parts.version = Version::HTTP_11; // the client negotiates h2 upstream via ALPN itself
        rewrite_request_headers(&mut parts.headers, header_of(&credential, &lease));
        if let (Some(credential), Some(lease)) = (&credential, &lease) {
            add_dpop_proof(
                credential,
                lease,
                &parts.method,
                &parts.uri,
                &mut parts.headers,
            );
        }
        if let Some((protocol, app_side)) = upgrade {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, protocol);
            let req = Request::from_parts(parts, body::boxed(incoming));
            let response = send_with(&route.upgrade_client, &route, req, trace).await?;
            if let (Some(credential), Some(lease)) = (&credential, &lease) {
                if response.status() == StatusCode::UNAUTHORIZED {
                    // Not replayed (the app's handshake is spent), but the next one gets a new token.
                    credential.reject(lease.generation);
                }
            }
            return Ok(splice(response, app_side, &route));
        }

        // Only requests that can be replayed (after a 401, or a DPoP nonce challenge) keep
        // what they sent. A request our own HTTP/1.1 client sends is whole already, and
        // comes back from `send` as it went; any other keeps a copy as it streams.
        let replays = credential
            .as_ref()
            .is_some_and(|c| route.retry_on_401 || c.dpop.is_some());
        let copy = (replays && !goes_whole(&route, &incoming)).then(|| ReplayCopy {
            buffer: ReplayBuffer::new(route.max_retry_body, &incoming.size_hint()),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        });
        let sent = match (&copy, route.h1_pool()) {
            // Our own client, which reads the (small) body whole: no boxing it first.
            (None, Some(pool)) if goes_whole(&route, &incoming) => {
                let body = IdleBody::new(incoming, route.idle_timeout);
                send_h1(pool, &route, Request::from_parts(parts, body), trace).await
            }
            (Some(copy), _) => {
                let body = body::boxed(IdleBody::new(
                    TeeBody::new(incoming, copy.buffer.clone()),
                    route.idle_timeout,
                ));
                send(&route, Request::from_parts(parts, body), trace).await
            }
            (None, _) => {
                let body = body::boxed(IdleBody::new(incoming, route.idle_timeout));
                send(&route, Request::from_parts(parts, body), trace).await
            }
        };
        let (mut response, kept) = sent?;
        let mut resend = match (copy, kept) {
            (Some(copy), _) => Resend::Copy(copy),
            (None, Some((parts, body))) if replays => Resend::Kept(parts, body),
            _ => return Ok(finish(response, &route)),
        };
        let (Some(credential), Some(mut lease)) = (credential, lease) else {
            return Ok(finish(response, &route));
        };
        // At most one retry for a DPoP nonce challenge (RFC 9449 §9: with the nonce the
        // resource server sent) and one replay after a 401 for our token, in either order.
        let (mut nonce_retried, mut token_replayed) = (false, false);
        loop {
            if credential.dpop.is_some() {
                h1::materialize(&mut response); // the nonce checks read the fields
            }
            let unauthorized = response.status() == StatusCode::UNAUTHORIZED;
            let new_nonce = credential
                .dpop
                .as_ref()
                .is_some_and(|d| d.remember_nonce(resend.uri(), response.headers()));
            let nonce_challenge = unauthorized
                && new_nonce
                && !nonce_retried
                && crate::dpop::asks_for_nonce(response.headers());
            if nonce_challenge {
                nonce_retried = true;
            } else if unauthorized
                && route.retry_on_401
                && !token_replayed
                && credential.reject(lease.generation)
            {
                // Our token was refused and a new one is coming.
                token_replayed = true;
            } else {
                return Ok(finish(response, &route));
            }
            // Replay only a body we hold whole.
            let Some(body) = resend.body(route.max_retry_body) else {
                tracing::info!(route = %route.name, "401 not replayed: body too large or still streaming");
                return Ok(finish(response, &route));
            };
            drop(response);
            if !nonce_challenge {
                lease = self::lease(&credential).await?;
            }
            trace.replayed = true;
            self.inner.metrics.retry(&route.name);
            let request = resend.request(body, &credential, &lease);
            let (again, kept) = send(&route, request, trace).await?;
            response = again;
            if let (Resend::Kept(..), Some((parts, body))) = (&resend, kept) {
                resend = Resend::Kept(parts, body);
            }
        }
    }
}

/// DPoP (RFC 9449 §7): a fresh proof of the key the token is bound to, for this request.
fn add_dpop_proof(
    credential: &Credential,
    token: &ActiveToken,
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
) {
    if let Some(dpop) = &credential.dpop {
        let proof = dpop.proof(method, uri, token.ath.as_deref());
        headers.insert(crate::dpop::DPOP.clone(), proof);
    }
}

impl Proxy {
    /// `CONNECT host:port`: 405 without `[intercept]`; with it, 200 and a TLS tunnel served
    /// as that host — only for a host a route names (403 otherwise: never a blind tunnel).
    fn connect(
        &self,
        mut req: Request<AppBody>,
        routes: &RouteTable,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(interceptor) = &self.inner.intercept else {
            let host = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            return Err(ProxyError::ConnectNotSupported { host });
        };
        let target = Target::of_connect(req.uri()).map_err(ProxyError::BadRequest)?;
        let route = routes
            .naming_host(&target.host, Some(target.port))
            .ok_or_else(|| ProxyError::HostNotAllowed {
                host: target.to_string(),
            })?;
        trace.route = Some(route.name.clone());
        trace.metrics = Some(route.metrics(&self.inner.metrics));
        if !interceptor.ca().permits(&target.host) {
            return Err(ProxyError::CaCannotSign { host: target.host });
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let proxy = self.clone();
        let inside = target.clone();
        tokio::spawn(
            interceptor
                .clone()
                .tunnel(on_upgrade, target, move |mut req| {
                    req.extensions_mut().insert(inside.clone());
                    proxy.clone().handle(req)
                }),
        );
        Ok(Response::new(body::full(Bytes::new())))
    }
}

/// What a request keeps so it can be sent again after a 401.
struct ReplayCopy {
    buffer: Arc<Mutex<ReplayBuffer>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl ReplayCopy {
    /// The body, if it was held whole (not too large, not still streaming).
    fn replayable(&self) -> Option<Bytes> {
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replayable()
    }

    /// The same request with the whole body, `token` attached (and a new DPoP proof).
    fn rebuild(
        &self,
        body: Bytes,
        credential: &Credential,
        token: &ActiveToken,
    ) -> Request<ProxyBody> {
        let mut req = Request::new(body::full(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req.headers_mut()
            .insert(credential.header().clone(), token.header_value.clone());
        add_dpop_proof(
            credential,
            token,
            &self.method,
            &self.uri,
            req.headers_mut(),
        );
        req
    }
}

/// What a request that may be replayed keeps of itself.
enum Resend {
    /// A copy taken as the request streamed through hyper's client.
    Copy(ReplayCopy),
    /// The request itself, as our own HTTP/1.1 client sent it: nothing was copied.
    Kept(http::request::Parts, Bytes),
}

impl Resend {
    fn uri(&self) -> &Uri {
        match self {
            Resend::Copy(copy) => &copy.uri,
            Resend::Kept(parts, _) => &parts.uri,
        }
    }

    /// The whole body, if it is held and within the route's `max_retry_body` (the copy
    /// gives up past it as it streams; a kept body is whole, and checked here).
    fn body(&self, max_retry_body: usize) -> Option<Bytes> {
        match self {
            Resend::Copy(copy) => copy.replayable(),
            Resend::Kept(_, body) => (body.len() <= max_retry_body).then(|| body.clone()),
        }
    }

    /// The request again with `body`, `token` attached (and a new DPoP proof). A kept
    /// request is moved out: `send` hands it back.
    fn request(
        &mut self,
        body: Bytes,
        credential: &Credential,
        token: &ActiveToken,
    ) -> Request<ProxyBody> {
        match self {
            Resend::Copy(copy) => copy.rebuild(body, credential, token),
            Resend::Kept(parts, _) => {
                let mut parts = std::mem::replace(parts, Request::new(()).into_parts().0);
                parts
                    .headers
                    .insert(credential.header().clone(), token.header_value.clone());
                add_dpop_proof(
                    credential,
                    token,
                    &parts.method,
                    &parts.uri,
                    &mut parts.headers,
                );
                Request::from_parts(parts, body::full(body))
            }
        }
    }
}

/// Absolute-form over HTTP/1 means the app uses us as HTTP_PROXY. (HTTP/2 requests always
/// carry an authority; they are reverse-mode requests.)
fn is_forward_mode<B>(req: &Request<B>) -> bool {
    req.version() < Version::HTTP_2 && req.uri().scheme().is_some()
}

/// Refuse requests made by web pages, and reverse-mode requests addressed to a name that
/// DNS rebinding could have pointed here (forward-mode hosts are checked by the routes).
fn admit<B>(access: &AccessPolicy, req: &Request<B>, intercepted: bool) -> Result<(), ProxyError> {
    access
        .check_browser(req.headers())
        .map_err(|r| ProxyError::BrowserRequestRefused(r.0))?;
    // Inside a tunnel the host was checked against the CONNECT (and the routes) already.
    if !is_forward_mode(req) && !intercepted {
        access
            .check_host(requested_host(req.uri(), req.headers()))
            .map_err(|r| ProxyError::BrowserRequestRefused(r.0))?;
    }
    Ok(())
}

fn select_route<'a>(
    routes: &'a RouteTable,
    req: &Request<AppBody>,
    path: &str,
    intercepted: Option<&Target>,
) -> Result<&'a Arc<Route>, ProxyError> {
    if let Some(t) = intercepted {
        return routes.by_host(&t.host, Some(t.port), path);
    }
    let uri = req.uri();
    match (is_forward_mode(req), uri.host()) {
        (true, Some(host)) => routes.by_host(host, uri.port_u16(), path),
        (true, None) => Err(ProxyError::BadRequest("absolute URI without a host".into())),
        (false, _) => routes.by_path(path),
    }
}

async fn lease(credential: &Credential) -> Result<Arc<ActiveToken>, ProxyError> {
    credential
        .lease()
        .await
        .map_err(|u| ProxyError::TokenUnavailable {
            reason: u.reason,
            retry_after: u.retry_after,
        })
}

fn header_of<'a>(
    credential: &'a Option<Arc<Credential>>,
    lease: &'a Option<Arc<ActiveToken>>,
) -> Option<(&'a HeaderName, &'a HeaderValue)> {
    match (credential, lease) {
        (Some(c), Some(l)) => Some((c.header(), &l.header_value)),
        _ => None,
    }
}

/// A response body from either upstream client: hyper's, or ours (`h1`).
type UpstreamBody = Either<Incoming, h1::ResponseBody>;

/// Whether a request with this body goes to `route` through our own HTTP/1.1 client (a
/// plain-HTTP upstream, and a body small enough to read whole), not hyper's.
fn goes_whole<B: Body>(route: &Route, body: &B) -> bool {
    route.h1_pool().is_some()
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= h1::BUFFERED_BODY_LIMIT)
}

/// A request as our own HTTP/1.1 client sent it, handed back for a replay.
type Kept = Option<(http::request::Parts, Bytes)>;

/// Send upstream; the response head must arrive within the route's timeout. See
/// [`goes_whole`] for which client sends it. (Not itself `async`: the client is chosen
/// before the future is made, so the request is not held twice in the future's state.)
fn send<'a>(
    route: &'a Route,
    req: Request<ProxyBody>,
    trace: &'a mut Trace,
) -> impl Future<Output = Result<(Response<UpstreamBody>, Kept), ProxyError>> + 'a {
    use futures_util::future::Either as OneOf;
    match route.h1_pool() {
        Some(pool) if goes_whole(route, req.body()) => {
            OneOf::Left(send_h1(pool, route, req, trace))
        }
        _ => OneOf::Right(async move {
            let response = send_with(route.client(), route, req, trace).await?;
            Ok((response.map(Either::Left), None))
        }),
    }
}

/// Why our own client's exchange failed: the app's body, or the upstream.
enum H1Failure {
    AppBody(BoxError),
    Upstream(h1::Error),
}

async fn send_h1<B>(
    pool: &Arc<h1::Pool>,
    route: &Route,
    req: Request<B>,
    trace: &mut Trace,
) -> Result<(Response<UpstreamBody>, Kept), ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let started = tokio::time::Instant::now();
    // The response head is due by then (the connection's own timer keeps it).
    let deadline = started + route.timeout;
    let (parts, body) = req.into_parts();
    let exchange = async {
        let body = match body.is_end_stream() {
            true => Bytes::new(),
            false => match tokio::time::timeout_at(deadline, body.collect()).await {
                Ok(collected) => collected
                    .map_err(|e| H1Failure::AppBody(e.into()))?
                    .to_bytes(),
                Err(_) => return Err(H1Failure::Upstream(h1::Error::Deadline)),
            },
        };
        let response = h1::send(pool, &parts, &body, deadline)
            .await
            .map_err(H1Failure::Upstream)?;
        Ok((response, body))
    };
    let result = exchange.await;
    trace.upstream += started.elapsed();
    match result {
        Err(H1Failure::Upstream(h1::Error::Deadline)) => {
            Err(ProxyError::UpstreamTimeout(route.timeout))
        }
        Err(H1Failure::AppBody(e)) if is_idle_timeout(&*e) => {
            Err(ProxyError::RequestTimeout(route.idle_timeout))
        }
        Err(H1Failure::AppBody(e)) => Err(ProxyError::BadRequest(format!(
            "the request body could not be read: {}",
            error_chain(&*e)
        ))),
        Err(H1Failure::Upstream(e)) => Err(ProxyError::UpstreamUnreachable(error_chain(&e))),
        Ok((response, body)) => Ok((response.map(Either::Right), Some((parts, body)))),
    }
}

async fn send_with(
    client: &Client<Connector, ProxyBody>,
    route: &Route,
    req: Request<ProxyBody>,
    trace: &mut Trace,
) -> Result<Response<Incoming>, ProxyError> {
    let started = Instant::now();
    let result = tokio::time::timeout(route.timeout, client.request(req)).await;
    trace.upstream += started.elapsed();
    match result {
        Err(_) => Err(ProxyError::UpstreamTimeout(route.timeout)),
        Ok(Err(e)) if is_idle_timeout(&e) && app_body_failed(&e) => {
            Err(ProxyError::RequestTimeout(route.idle_timeout))
        }
        Ok(Err(e)) if app_body_failed(&e) => Err(ProxyError::BadRequest(format!(
            "the request body could not be read: {}",
            error_chain(&e)
        ))),
        Ok(Err(e)) => Err(ProxyError::UpstreamUnreachable(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Whether sending failed because the app's own request body broke (malformed chunking,
/// a connection cut mid-body): the app's fault (400), not the upstream's (502).
fn app_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(err) = cause {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return true;
        }
        cause = err.source();
    }
    false
}

/// The upstream's answer to an upgrade request. On 101 both sides switch protocols and a
/// task copies bytes both ways until either closes; anything else is an ordinary response.
fn splice(
    mut response: Response<Incoming>,
    app_side: OnUpgrade,
    route: &Route,
) -> Response<ProxyBody> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return finish(response.map(Either::Left), route);
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        match tokio::try_join!(app_side, upstream_side) {
            Ok((app, upstream)) => {
                let (mut app, mut upstream) = (TokioIo::new(app), TokioIo::new(upstream));
                let _ = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
            }
            Err(e) => tracing::debug!(error = %e, "protocol upgrade did not complete"),
        }
    });
    // The 101 keeps its Connection/Upgrade headers: they are the handshake.
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, body::full(Bytes::new()))
}

/// The upstream's response, streamed back with hop-by-hop headers removed; an upstream
/// that stops sending mid-body is cut off after the route's `idle_timeout`.
fn finish(response: Response<UpstreamBody>, route: &Route) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        body::boxed(IdleBody::new(incoming, route.idle_timeout)),
    )
}
