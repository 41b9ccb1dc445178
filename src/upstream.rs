//! Outbound HTTP clients: pooled, rustls (HTTP/1.1 and h2 via ALPN), with a connect timeout
//! that covers TCP *and* the TLS handshake, and optional extra trusted roots.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::client_cert::ClientCert;
use crate::egress::{Egress, EgressConnector};
use crate::idle::StallGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connector every outbound client uses.
pub type Connector = TimeoutConnector<HttpsConnector<EgressConnector>>;

/// How an outbound client connects.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP + TLS handshake.
    pub connect: Duration,
    /// A socket write that makes no progress for this long fails (and the connection closes).
    pub write_stall: Duration,
}

/// `count` pooled clients with the same settings (one per worker thread, each its own
/// pool), for bodies of type `B` (HTTP/1.1, and h2 when TLS negotiates it). The TLS
/// settings (roots, `ca_file`, client certificate) are read once and shared.
pub fn clients<B>(
    count: usize,
    ca_file: Option<&Path>,
    cert: Option<&ClientCert>,
    egress: Option<&Arc<Egress>>,
    timeouts: Timeouts,
) -> Result<Vec<Client<Connector, B>>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = tls_config(ca_file, cert)?;
    Ok((0..count)
        .map(|_| pooled(connector(tls.clone(), egress, timeouts, true)))
        .collect())
}

fn pooled<B>(connector: Connector) -> Client<Connector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// How many token-endpoint (and JWKS) calls one token client makes at once. Ten thousand
/// credentials starting together would otherwise open ten thousand connections to the
/// identity provider in the same instant (a stampede it may well rate-limit), and the
/// proxy would carry their buffers at its memory peak for good: the heap does not shrink
/// back. Calls beyond this wait their turn, within their own timeout.
pub const TOKEN_CALLS_IN_FLIGHT: usize = 32;

/// The client for token endpoints and JWKS (credentials' own calls, not app traffic).
/// Shared through an `Arc`: a hyper client is a few hundred bytes, and there may be ten
/// thousand credentials.
pub struct TokenClient {
    client: Client<Connector, http_body_util::Full<bytes::Bytes>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl TokenClient {
    /// Send `req` once a call slot is free (see [`TOKEN_CALLS_IN_FLIGHT`]). The slot comes
    /// back with the response: the caller holds it until it has read the body.
    pub async fn request(
        &self,
        req: http::Request<http_body_util::Full<bytes::Bytes>>,
    ) -> (
        tokio::sync::OwnedSemaphorePermit,
        Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    ) {
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        (permit, self.client.request(req).await)
    }
}

/// Credentials without `ca_file` and with the same timeout share one client, so ten
/// thousand credentials share a few pooled connections rather than keeping one each;
/// and a burst of token calls (every credential fetching at start) leaves at most a few
/// idle connections behind per host.
pub fn token_client(
    ca_file: Option<&Path>,
    cert: Option<&ClientCert>,
    egress: Option<&Arc<Egress>>,
    timeout: Duration,
) -> Result<Arc<TokenClient>, String> {
    static SHARED: std::sync::Mutex<Vec<(Duration, Arc<TokenClient>)>> =
        std::sync::Mutex::new(Vec::new());
    let timeouts = Timeouts {
        connect: timeout,
        write_stall: timeout,
    };
    let build = || -> Result<Arc<TokenClient>, String> {
        let tls = tls_config(ca_file, cert)?;
        Ok(Arc::new(TokenClient {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(4)
                .build(connector(tls, egress, timeouts, true)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(TOKEN_CALLS_IN_FLIGHT)),
        }))
    };
    if ca_file.is_some() || cert.is_some() || egress.is_some() {
        return build();
    }
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, client)) = shared.iter().find(|(t, _)| *t == timeout) {
        return Ok(client.clone());
    }
    let client = build()?;
    shared.push((timeout, client.clone()));
    Ok(client)
}

/// The same, HTTP/1.1 only: protocol upgrades (WebSocket) exist only there.
pub fn http1_client<B>(
    ca_file: Option<&Path>,
    cert: Option<&ClientCert>,
    egress: Option<&Arc<Egress>>,
    timeouts: Timeouts,
) -> Result<Client<Connector, B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    build_client(ca_file, cert, egress, timeouts, false)
}

fn build_client<B>(
    ca_file: Option<&Path>,
    cert: Option<&ClientCert>,
    egress: Option<&Arc<Egress>>,
    timeouts: Timeouts,
    http2: bool,
) -> Result<Client<Connector, B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Ok(pooled(connector(
        tls_config(ca_file, cert)?,
        egress,
        timeouts,
        http2,
    )))
}

fn connector(
    tls: rustls::ClientConfig,
    egress: Option<&Arc<Egress>>,
    timeouts: Timeouts,
    http2: bool,
) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.connect));
    let http = EgressConnector {
        http,
        egress: egress.cloned(),
    };
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let https = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    TimeoutConnector {
        inner: https,
        timeout: timeouts.connect,
        write_stall: timeouts.write_stall,
    }
}

/// Mozilla's roots (so a minimal container image works) plus the PEM roots in `ca_file`.
/// Without `ca_file` every client shares one parsed root store (a clone of the config is
/// shallow): thousands of credentials must not each hold a copy of ~150 roots.
fn tls_config(
    ca_file: Option<&Path>,
    cert: Option<&ClientCert>,
) -> Result<rustls::ClientConfig, String> {
    static DEFAULT: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    if let Some(cert) = cert {
        return build_tls_config(ca_file, Some(cert));
    }
    if ca_file.is_none() {
        if let Some(config) = DEFAULT.get() {
            return Ok(config.clone());
        }
        let config = build_tls_config(None, None)?;
        return Ok(DEFAULT.get_or_init(|| config).clone());
    }
    build_tls_config(ca_file, None)
}

fn build_tls_config(
    ca_file: Option<&Path>,
    cert: Option<&ClientCert>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!(
                "ca_file {}: no PEM certificates found",
                path.display()
            ));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match cert {
        Some(c) => config
            .with_client_auth_cert(c.chain.clone(), c.key())
            .map_err(|e| format!("client certificate: {e}")),
        None => Ok(config.with_no_client_auth()),
    }
}

/// Bounds the whole connect (TCP + TLS): `HttpConnector`'s own timeout covers TCP only.
/// The connections it makes fail a write that stalls longer than `write_stall`.
#[derive(Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
    write_stall: Duration,
}

impl<C> tower_service::Service<Uri> for TimeoutConnector<C>
where
    C: tower_service::Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = StallGuard<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let (timeout, write_stall) = (self.timeout, self.write_stall);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result
                    .map(|io| StallGuard::new(io, write_stall))
                    .map_err(Into::into),
                Err(_) => Err(format!("connect timed out after {timeout:?}").into()),
            }
        })
    }
}
