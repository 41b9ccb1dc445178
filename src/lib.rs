//! token-proxy: a sidecar HTTP proxy that attaches OAuth 2.0 bearer tokens to an app's
//! requests, refreshes them ahead of expiry (single flight), and replays once on 401.
//!
//! `App::spawn(config)` binds the listeners and returns a handle with the real addresses,
//! so tests and the demo run the whole proxy in-process on port 0.
#![forbid(unsafe_code)]

pub mod access;
pub mod access_log;
pub mod admin;
pub mod body;
pub mod config;
/// `token-proxy demo` (feature `demo`, on by default).
#[cfg(feature = "demo")]
pub mod demo;
pub mod dpop;
pub mod egress;
pub mod error;
pub mod files;
pub mod h1;
pub mod idle;
pub mod intercept;
pub mod jwk;
pub mod metrics;
pub mod proxy;
pub mod redact;
pub mod routes;
pub mod server;
pub mod supervise;
/// The mock identity provider and upstream used by the tests, the benchmarks and the demo
/// (feature `demo`). Nothing on the production path imports it; a build with
/// `--no-default-features` leaves it, and the demo, out of the binary.
#[cfg(feature = "demo")]
pub mod testkit;
pub mod token;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use crate::server::ConnLimits;
use crate::token::TokenStore;

/// What `Config` validation cannot see without building things: that every CA file holds
/// certificates, every token client and JWKS client can be built, and every
/// `initial_tokens_file` is a usable token response, and every state directory is private
/// and writable (a probe file is created and removed; nothing else changes). No network.
pub fn check_deep(config: &Config) -> Result<(), String> {
    RouteTable::from_config(config)?;
    let mut endpoints = token::grant::Endpoints::default();
    for c in config.credentials.values() {
        token::grant::Grant::from_config(c, &mut endpoints)
            .map_err(|e| format!("credentials.{}: {e}", c.name))?;
        token::verify::Verifier::for_credential(c)
            .map_err(|e| format!("credentials.{}: {e}", c.name))?;
        if let Some(path) = &c.state_file {
            token::state::check_state_dir(path, false)
                .map_err(|e| format!("credentials.{}.state_file: {e}", c.name))?;
        }
        if let Some(json) = c.initial_tokens() {
            use secrecy::ExposeSecret;
            token::response::parse_token_response(
                json.expose_secret().as_bytes(),
                std::time::SystemTime::now(),
            )
            .map_err(|e| format!("credentials.{}.initial_tokens_file: {e}", c.name))?;
        }
    }
    Ok(())
}

/// Tokens sent over plain HTTP beyond this host can be read on the wire: allowed (a service
/// mesh may encrypt), but said out loud once at start.
fn warn_about_plaintext(config: &Config) {
    let remote = |host: &str| !matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1");
    for r in &config.routes {
        if r.credential.is_some()
            && r.upstream.scheme == http::uri::Scheme::HTTP
            && remote(r.upstream.authority.host())
        {
            tracing::warn!(route = %r.name, "tokens go to this upstream over plain http");
        }
    }
    for c in config.credentials.values() {
        if let Some(url) = c.endpoint().map(|e| &e.token_url) {
            if url.scheme_str() == Some("http") && url.host().is_some_and(remote) {
                tracing::warn!(credential = %c.name, "secrets go to this token_url over plain http");
            }
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration discovered while building (exit 2).
    #[error("{0}")]
    Config(String),
    /// Could not bind a listener, read a state file... (exit 1).
    #[error("{0}")]
    Runtime(String),
}

/// A running proxy.
pub struct AppHandle {
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    /// The live route table; a reload swaps it whole.
    routes: Arc<RwLock<Arc<RouteTable>>>,
    /// Server settings in force (they need a restart to change).
    server: config::ServerConfig,
    /// Identifies the `[shared]` settings in force (they need a restart to change).
    shared: Option<u64>,
    /// The interceptor in force, and the CA files it came from (a restart changes them).
    intercept: Option<(Arc<intercept::Interceptor>, (PathBuf, PathBuf))>,
    /// Cancelled first on shutdown: readiness fails.
    draining: CancellationToken,
    /// Cancelled after `shutdown_delay`: the proxy stops accepting and drains.
    stop_proxy: CancellationToken,
    /// Cancelled last: the admin listener and the refreshers stop.
    stop_all: CancellationToken,
    proxy_task: JoinHandle<()>,
    admin_task: Option<JoinHandle<()>>,
    /// Fires when an essential task (a listener) panicked: the binary exits 1.
    fatal: supervise::Fatal,
}

pub struct App;

impl App {
    /// Build everything from `config`, bind the listeners, start refreshers and servers.
    pub async fn spawn(config: Config) -> Result<AppHandle, StartError> {
        check_deep(&config).map_err(StartError::Config)?;
        let metrics = Arc::new(Metrics::new());
        let stop_all = CancellationToken::new();
        let store = Arc::new(
            TokenStore::from_config(&config, &metrics, stop_all.clone())
                .await
                .map_err(StartError::Runtime)?,
        );
        let routes = RouteTable::from_config(&config).map_err(StartError::Config)?;
        warn_about_plaintext(&config);
        let (proxy_addr, proxy_listeners) =
            workers::bind(config.server.listen, config.server.workers).map_err(|e| {
                StartError::Runtime(format!("cannot listen on {}: {e}", config.server.listen))
            })?;
        let admin_listener = match config.server.admin_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                StartError::Runtime(format!("cannot listen on {addr} (admin): {e}"))
            })?),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

        store.spawn_refreshers();
        let limits = ConnLimits {
            max_header_size: config.server.max_header_size,
            header_timeout: config.server.keepalive_timeout,
        };
        let grace = config.server.shutdown_grace;
        let draining = CancellationToken::new();
        let stop_proxy = CancellationToken::new();

        let intercept = match &config.intercept {
            Some(settings) => Some(Arc::new(start_interception(
                settings,
                limits,
                stop_proxy.clone(),
            )?)),
            None => None,
        };
        let routes = Arc::new(RwLock::new(Arc::new(routes)));
        let proxy = proxy::Proxy::new(
            routes.clone(),
            store.clone(),
            metrics.clone(),
            config.server.log_query,
            config.server.access.clone(),
            intercept.clone(),
        );
        let handler = move |req, _peer| proxy.clone().handle(req);
        let fatal = supervise::Fatal::new();
        let stop_workers = stop_proxy.clone();
        let drain_intercept = intercept.clone();
        let proxy_task = supervise::spawn_essential(
            "proxy listener",
            workers::run(proxy_listeners, move |listener| {
                let serve = server::serve(
                    listener,
                    handler.clone(),
                    limits,
                    stop_workers.clone(),
                    grace,
                );
                // Tunnels run on the worker threads: keep them alive until they drained.
                let tunnels = drain_intercept.clone();
                async move {
                    serve.await;
                    if let Some(tunnels) = tunnels {
                        tunnels.drained(grace).await;
                    }
                }
            }),
            fatal.clone(),
        );

        // The admin listener outlives the proxy's drain, so probes see 503, not a refusal.
        let admin_task = admin_listener.map(|listener| {
            let admin = admin::Admin {
                store: store.clone(),
                metrics: metrics.clone(),
                draining: draining.clone(),
                access: config.server.access.clone(),
            };
            let handler = move |mut req: hyper::Request<crate::body::AppBody>, peer| {
                req.extensions_mut().insert(server::PeerAddr(peer));
                let admin = admin.clone();
                async move { admin.handle(req).await }
            };
            supervise::spawn_essential(
                "admin listener",
                server::serve(
                    listener,
                    handler,
                    limits,
                    stop_all.clone(),
                    Duration::from_secs(1),
                ),
                fatal.clone(),
            )
        });
        let admin_shown = admin_addr.map_or_else(|| "none".to_string(), |a| a.to_string());
        tracing::info!(proxy = %proxy_addr, admin = %admin_shown, "listening");
        Ok(AppHandle {
            proxy_addr,
            admin_addr,
            store,
            metrics,
            routes,
            shared: config
                .shared
                .as_ref()
                .map(config::SharedConfig::fingerprint),
            server: config.server,
            intercept: intercept.zip(config.intercept.map(|c| (c.ca_cert_file, c.ca_key_file))),
            draining,
            stop_proxy,
            stop_all,
            proxy_task,
            admin_task,
            fatal,
        })
    }
}

impl AppHandle {
    /// Completes, with the reason, if a listener task panicked (the process should exit 1).
    pub async fn failed(&self) -> String {
        self.fatal.failed().await
    }

    /// Apply a new config without a restart: routes swap at once for new requests,
    /// unchanged credentials keep their tokens, changed ones are rebuilt. An invalid route
    /// table is refused whole (`Err`) and nothing changes. Returns a one-line summary.
    pub async fn reload(&self, config: Config) -> Result<String, String> {
        let routes = RouteTable::from_config(&config)?;
        let report = self.store.apply(&config.credentials).await;
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        let mut summary = format!(
            "routes={} credentials kept={:?} replaced={:?} added={:?} removed={:?}",
            config.routes.len(),
            report.kept,
            report.replaced,
            report.added,
            report.removed
        );
        for (name, e) in &report.failed {
            summary.push_str(&format!("; credential {name} kept its old config: {e}"));
        }
        let s = &config.server;
        if s.listen != self.server.listen
            || s.admin_listen != self.server.admin_listen
            || s.max_header_size != self.server.max_header_size
            || s.keepalive_timeout != self.server.keepalive_timeout
            || s.shutdown_grace != self.server.shutdown_grace
            || s.shutdown_delay != self.server.shutdown_delay
            || s.log_query != self.server.log_query
            || s.access != self.server.access
            || s.workers != self.server.workers
        {
            summary.push_str("; [server] changes take effect after a restart");
        }
        if config
            .shared
            .as_ref()
            .map(config::SharedConfig::fingerprint)
            != self.shared
        {
            summary.push_str("; [shared] changes take effect after a restart");
        }
        let files = |c: &config::InterceptConfig| (c.ca_cert_file.clone(), c.ca_key_file.clone());
        match (&config.intercept, &self.intercept) {
            (Some(new), Some((running, old_files))) => {
                if *old_files != files(new) {
                    summary.push_str("; [intercept] changes take effect after a restart");
                }
                let uncovered = intercept::uncovered_hosts(running.ca(), &new.hosts);
                if !uncovered.is_empty() {
                    tracing::warn!(hosts = ?uncovered, "the interception CA cannot sign for these route hosts: CONNECT to them gets 403 until a new CA is made (remove both CA files and restart; apps must then trust the new CA)");
                    summary.push_str(&format!(
                        "; [intercept] the CA cannot sign for {uncovered:?}: a new CA is needed"
                    ));
                }
            }
            (None, None) => {}
            _ => summary.push_str("; [intercept] changes take effect after a restart"),
        }
        Ok(summary)
    }

    /// Graceful shutdown: readiness fails at once; new connections are still served for
    /// `shutdown_delay` (while the kubelet and the app notice); then the proxy stops
    /// accepting and in-flight requests get up to `shutdown_grace` to finish.
    pub async fn stop(self) {
        self.draining.cancel();
        tokio::time::sleep(self.server.shutdown_delay).await;
        self.stop_proxy.cancel();
        // The supervisors never panic themselves; a listener's own panic was logged.
        if let Err(e) = self.proxy_task.await {
            tracing::error!(error = %e, "proxy listener supervisor failed");
        }
        self.stop_all.cancel();
        if let Some(admin) = self.admin_task {
            if let Err(e) = admin.await {
                tracing::error!(error = %e, "admin listener supervisor failed");
            }
        }
    }
}

/// `[intercept]`: open (or generate) the CA and say what it can sign for.
fn start_interception(
    settings: &config::InterceptConfig,
    limits: ConnLimits,
    stopping: CancellationToken,
) -> Result<intercept::Interceptor, StartError> {
    let ca = intercept::open_ca(settings).map_err(StartError::Runtime)?;
    if !ca.constrained() {
        tracing::warn!("the interception CA has no name constraints: whoever holds its key can impersonate any site to apps that trust it; prefer a generated CA (remove both files)");
    }
    let uncovered = intercept::uncovered_hosts(&ca, &settings.hosts);
    if !uncovered.is_empty() {
        tracing::warn!(hosts = ?uncovered, "the interception CA cannot sign for these route hosts: CONNECT to them gets 403 until a new CA is made (remove both CA files and restart; apps must then trust the new CA)");
    }
    tracing::info!(can_sign = %ca.describe_constraints(), "HTTPS interception on");
    intercept::Interceptor::new(ca, settings, limits, stopping).map_err(StartError::Runtime)
}
