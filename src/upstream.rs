//! Outbound HTTP clients: pooled, rustls (HTTP/1.1 and h2 via ALPN), with a connect timeout
//! that covers TCP *and* the TLS handshake, and optional extra trusted roots.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::idle::StallGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connector every outbound client uses.
pub type Connector = TimeoutConnector<HttpsConnector<HttpConnector>>;

/// How an outbound client connects.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP + TLS handshake.
    pub connect: Duration,
    /// A socket write that makes no progress for this long fails (and the connection closes).
    pub write_stall: Duration,
}

/// Build a pooled client for bodies of type `B` (HTTP/1.1, and h2 when TLS negotiates it).
pub fn client<B>(ca_file: Option<&Path>, timeouts: Timeouts) -> Result<Client<Connector, B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    build_client(ca_file, timeouts, true)
}

/// The same, HTTP/1.1 only: protocol upgrades (WebSocket) exist only there.
pub fn http1_client<B>(
    ca_file: Option<&Path>,
    timeouts: Timeouts,
) -> Result<Client<Connector, B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    build_client(ca_file, timeouts, false)
}

fn build_client<B>(
    ca_file: Option<&Path>,
    timeouts: Timeouts,
    http2: bool,
) -> Result<Client<Connector, B>, String>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = tls_config(ca_file)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.connect));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let https = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    let connector = TimeoutConnector {
        inner: https,
        timeout: timeouts.connect,
        write_stall: timeouts.write_stall,
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector))
}

/// Mozilla's roots (so a minimal container image works) plus the PEM roots in `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
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
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
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
