//! HTTPS interception for `HTTPS_PROXY` apps that call `https://` URLs (`[intercept]`).
//!
//! A `CONNECT host:port` for a host a route names is answered 200; the proxy then completes
//! a TLS handshake with the app *as that host* (a leaf certificate minted by the
//! interception CA, cached per host, short-lived), reads the HTTP/1.1 or h2 requests inside
//! and serves each like a forward-mode request for that route. Any other host gets 403 and
//! nothing is tunnelled: the proxy is never an open proxy.

mod ca;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Uri};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub use ca::Ca;

use crate::config::InterceptConfig;
use crate::server::ConnLimits;

/// Where a tunnel was opened to: the requests inside must be for this host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// The `CONNECT` request's authority (`host:port`), or why it is not one.
    pub fn of_connect(uri: &Uri) -> Result<Target, String> {
        let authority = uri
            .authority()
            .ok_or("CONNECT needs host:port as its target")?;
        let host = authority
            .host()
            .trim_matches(['[', ']'])
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let extra = uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty());
        // RFC 9110 §9.3.6: authority-form is host:port, nothing more (no userinfo); a host
        // is a DNS name or an IP literal.
        let name_like = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        let valid = !host.is_empty() && (name_like || host.parse::<std::net::IpAddr>().is_ok());
        if !valid || extra || authority.as_str().contains('@') {
            return Err("CONNECT needs host:port as its target".into());
        }
        Ok(Target {
            host,
            port: authority.port_u16().unwrap_or(443),
        })
    }

    /// Whether a request inside the tunnel names this target (h2 `:authority`, else
    /// `Host`; no port means 443).
    pub fn admits<B>(&self, req: &Request<B>) -> Result<(), String> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        let Some(authority) = authority else {
            return Err("(no Host)".into());
        };
        let parsed: Option<http::uri::Authority> = authority.parse().ok();
        let same = parsed.as_ref().is_some_and(|a| {
            a.host()
                .trim_matches(['[', ']'])
                .trim_end_matches('.')
                .eq_ignore_ascii_case(&self.host)
                && a.port_u16().unwrap_or(443) == self.port
        });
        match same {
            true => Ok(()),
            false => Err(authority),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The CA, a leaf key, and the TLS settings minted per host.
pub struct Interceptor {
    ca: Arc<Ca>,
    /// One key for every leaf (the CA's signature is what binds a leaf to its host).
    leaf_key: KeyPair,
    lifetime: Duration,
    limits: ConnLimits,
    /// Per host: the TLS settings holding its leaf, and when to mint a new one.
    configs: Mutex<HashMap<String, (Arc<ServerConfig>, Instant)>>,
    /// Hosts whose failed handshake was logged (once per host, not per attempt).
    refused: Mutex<HashSet<String>>,
    /// Cancelled when the proxy stops accepting: tunnels finish their requests and close.
    stopping: tokio_util::sync::CancellationToken,
    /// Tunnels open now, and a wake-up when the last one closes (the drain waits for it).
    open: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

impl Interceptor {
    pub fn new(
        ca: Arc<Ca>,
        config: &InterceptConfig,
        limits: ConnLimits,
        stopping: tokio_util::sync::CancellationToken,
    ) -> Result<Interceptor, String> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("intercept: cannot generate the leaf key: {e}"))?;
        Ok(Interceptor {
            ca,
            leaf_key,
            lifetime: config.leaf_lifetime,
            limits,
            configs: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashSet::new()),
            stopping,
            open: std::sync::atomic::AtomicUsize::new(0),
            closed: tokio::sync::Notify::new(),
        })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// TLS settings presenting a leaf for `host`, minted on first use and again once half
    /// its lifetime has passed.
    fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, String> {
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((config, renew_at)) = configs.get(host) {
            if Instant::now() < *renew_at {
                return Ok(config.clone());
            }
        }
        let leaf = self.ca.mint(host, &self.leaf_key, self.lifetime)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("intercept: leaf key: {e}"))?;
        let certified = Arc::new(CertifiedKey::new(vec![leaf, self.ca.der.clone()], signer));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("intercept: TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Leaf(certified)));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if configs.len() > 10_000 {
            configs.clear(); // bounded: hosts come from the route table, but be safe
        }
        configs.insert(
            host.to_string(),
            (config.clone(), Instant::now() + self.lifetime / 2),
        );
        Ok(config)
    }

    /// Once the app's `CONNECT` got its 200: the TLS handshake as `target.host`, then
    /// every request inside served by `serve` (forward-mode, for that target).
    pub async fn tunnel<S, Fut>(self: Arc<Self>, on_upgrade: OnUpgrade, target: Target, serve: S)
    where
        S: Fn(Request<crate::body::AppBody>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = http::Response<crate::body::ProxyBody>> + Send + 'static,
    {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(target = %target, error = %e, "CONNECT tunnel not opened");
                return;
            }
        };
        let tls = match self.server_config(&target.host) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(target = %target, error = %e, "cannot make a certificate for an intercepted host");
                return;
            }
        };
        let stream = match tokio_rustls::TlsAcceptor::from(tls)
            .accept(TokioIo::new(upgraded))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.handshake_failed(&target, &e);
                return;
            }
        };
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let fut = Box::pin(serve(req.map(crate::body::AppBody::Left)));
            async move {
                let mut response = fut.await;
                // hyper writes only the header map.
                crate::h1::materialize(&mut response);
                Ok::<_, Infallible>(response)
            }
        });
        let builder = crate::server::builder(self.limits);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let _open = OpenTunnel::new(&self);
        tokio::pin!(conn);
        // On shutdown the tunnel drains like any connection: requests in flight finish,
        // then it closes (the proxy's drain waits for it, within the grace period).
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = self.stopping.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(target = %target, error = %e, "intercepted connection ended with an error");
        }
    }

    /// Wait (at most `grace`) until every tunnel has closed; called once the proxy has
    /// stopped accepting.
    pub async fn drained(&self, grace: Duration) {
        let all_closed = async {
            loop {
                let notified = self.closed.notified();
                if self.open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(grace, all_closed).await.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown grace elapsed with intercepted tunnels still open"
            );
        }
    }

    /// An app that does not trust the CA fails its handshake on every attempt: say so once
    /// per host, with what to do.
    fn handshake_failed(&self, target: &Target, e: &std::io::Error) {
        let first = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.host.clone());
        if first {
            tracing::warn!(
                target = %target,
                error = %e,
                "TLS handshake with the app failed for an intercepted host: does the app trust token-proxy's CA? (`token-proxy ca` prints it; logged once per host)"
            );
        } else {
            tracing::debug!(target = %target, error = %e, "TLS handshake with the app failed");
        }
    }
}

/// Counts a tunnel as open for as long as it lives.
struct OpenTunnel<'a>(&'a Interceptor);

impl<'a> OpenTunnel<'a> {
    fn new(i: &'a Interceptor) -> OpenTunnel<'a> {
        i.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenTunnel(i)
    }
}

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        if self
            .0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.closed.notify_waiters();
        }
    }
}

/// The CA in use: the one in the files, or a new one generated into them now (key 0600),
/// name-constrained to `config.hosts`.
pub fn open_ca(config: &InterceptConfig) -> Result<Arc<Ca>, String> {
    if let Some(ca) = &config.ca {
        return Ok(ca.clone());
    }
    if config.ca_cert_file.exists() && config.ca_key_file.exists() {
        // Made meanwhile (`token-proxy ca`, or another replica on the same volume).
        return Ca::load(&config.ca_cert_file, &config.ca_key_file).map(Arc::new);
    }
    let (ca, key_pem) = Ca::generate(&config.hosts)?;
    ca::write(&config.ca_cert_file, &config.ca_key_file, &ca.pem, &key_pem)?;
    tracing::info!(
        cert = %config.ca_cert_file.display(),
        can_sign = %ca.describe_constraints(),
        "generated the interception CA; apps must trust it (`token-proxy ca` prints it)"
    );
    Ok(Arc::new(ca))
}

/// Route hosts the CA cannot sign for (a CA made before those routes existed).
pub fn uncovered_hosts(ca: &Ca, hosts: &[String]) -> Vec<String> {
    hosts.iter().filter(|h| !ca.permits(h)).cloned().collect()
}

/// Always the tunnel's own leaf, whatever the ClientHello's SNI says (or whether it sends
/// one): requests for other hosts are refused with 421 inside.
#[derive(Debug)]
struct Leaf(Arc<CertifiedKey>);

impl ResolvesServerCert for Leaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Result<Target, String> {
        Target::of_connect(&s.parse::<Uri>().map_err(|e| e.to_string())?)
    }

    #[test]
    fn connect_targets_are_host_and_port_only() {
        let t = target("API.Example.com.:8443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("api.example.com", 8443));
        assert_eq!(target("[::1]:443").unwrap().host, "::1");
        assert_eq!(target("api.example.com").unwrap().port, 443);
        for bad in [
            ".:443",
            "user@api.example.com:443",
            "a]b:443",
            "/path",
            "x y:1",
        ] {
            assert!(target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_inside_must_name_the_tunnel_host() {
        let t = target("api.example.com:443").unwrap();
        let req = |host: &str| Request::get("/").header("host", host).body(()).unwrap();
        assert!(t.admits(&req("api.example.com")).is_ok());
        assert!(t.admits(&req("API.example.com:443")).is_ok());
        assert!(t.admits(&req("api.example.com:8443")).is_err());
        assert!(t.admits(&req("evil.example.com")).is_err());
        let h2 = Request::get("https://api.example.com/x").body(()).unwrap();
        assert!(t.admits(&h2).is_ok());
    }
}
