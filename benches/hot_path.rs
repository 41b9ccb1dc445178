//! Criterion benchmarks of the request path.
//!
//! - `hot_path`: what the proxy adds per request before any I/O: route match, token lookup
//!   (DashMap + watch borrow), header rewrite.
//! - `round_trip`: a GET through the in-process proxy vs. straight to the same upstream,
//!   both over loopback with a pooled HTTP/1.1 client. The ratio is what matters.
//! - `intercept`: through a CONNECT tunnel with TLS interception (keep-alive: one
//!   handshake, many requests) vs. plain forward mode on a kept-alive connection, and a
//!   whole new tunnel per request (CONNECT + TLS handshake + one request: handshakes/s).
//! - `dpop`: one DPoP proof (an ES256 signature with ring), and a GET through the proxy
//!   with a bearer token vs. a DPoP-bound one (a fresh proof per request; the upstream does
//!   not verify, so the difference is the proxy's own cost).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use token_proxy::config::Config;
use token_proxy::metrics::Metrics;
use token_proxy::routes::{rewrite_request_headers, RouteTable};
use token_proxy::testkit::{upstream_server, MockUpstream};
use token_proxy::token::TokenStore;
use token_proxy::App;

fn config(upstream: &str) -> Config {
    let text = format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        [[routes]]
        name = "other"
        prefix = "/other"
        upstream = "{upstream}"
        [[routes]]
        name = "api"
        prefix = "/api"
        upstream = "{upstream}"
        credential = "main"
        [[routes]]
        name = "root"
        prefix = "/"
        upstream = "{upstream}"
        credential = "main"
        [credentials.main]
        grant = "static"
        access_token = "bench-access-token-0123456789abcdef"
        "#
    );
    Config::parse(&text, &|_| None).expect("bench config")
}

fn hot_path(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let config = config("http://127.0.0.1:9");
    let routes = RouteTable::from_config(&config).unwrap();
    let store = rt
        .block_on(TokenStore::from_config(
            &config,
            &Arc::new(Metrics::new()),
            Default::default(),
        ))
        .unwrap();
    let cred = store.get("main").unwrap();
    store.spawn_refreshers();
    rt.block_on(async {
        while cred.current().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    let mut template = HeaderMap::new();
    template.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
    template.insert("user-agent", HeaderValue::from_static("legacy-app/1.0"));
    template.insert("accept", HeaderValue::from_static("application/json"));
    template.insert("connection", HeaderValue::from_static("keep-alive"));
    c.bench_function("hot_path: route + token lookup + header rewrite", |b| {
        b.iter(|| {
            let route = routes.by_path("/api/v1/orders/42").unwrap();
            let cred = store.get(route.credential.as_deref().unwrap()).unwrap();
            let token = cred.current().unwrap();
            let mut headers = template.clone();
            rewrite_request_headers(&mut headers, Some((cred.header(), &token.header_value)));
            headers
        })
    });
}

/// A private redis-server for the `[shared]` variant, if the machine has one.
struct Redis(std::process::Child, u16);

impl Redis {
    fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Redis(child, port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The proxied round trip with `[shared]` (Redis) and without: the request path reads the
/// token from memory either way, so the two should match (the issue's bar: within 5 %).
fn shared_round_trip(c: &mut Criterion) {
    let Some(redis) = Redis::start() else {
        eprintln!("shared_round_trip: no redis-server on this machine; skipped");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(upstream_server(MockUpstream::new("bench", None)));
    let mut group = c.benchmark_group("shared_round_trip");
    for (name, shared) in [("memory_store", false), ("redis_store", true)] {
        let mut config = config(&upstream.url);
        if shared {
            let text = format!(
                "[[routes]]\nprefix = \"/\"\nupstream = \"{}\"\ncredential = \"main\"\n[credentials.main]\ngrant = \"static\"\naccess_token = \"bench-access-token-0123456789abcdef\"\n[shared]\nredis_url = \"redis://127.0.0.1:{}/0\"\n",
                upstream.url, redis.1
            );
            config = Config::parse(&text, &|_| None).unwrap();
            config.server.listen = "127.0.0.1:0".parse().unwrap();
        }
        let app = rt.block_on(async {
            let app = App::spawn(config).await.unwrap();
            let cred = app.store.get("main").unwrap();
            while cred.current().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            app
        });
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let uri: http::Uri = format!("http://{}/api/v1/orders/42", app.proxy_addr)
            .parse()
            .unwrap();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let uri = uri.clone();
                let client = client.clone();
                async move {
                    let resp = client.get(uri).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                }
            })
        });
        rt.block_on(app.stop());
    }
    group.finish();
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (upstream, app) = rt.block_on(async {
        let upstream = upstream_server(MockUpstream::new("bench", None)).await;
        let app = App::spawn(config(&upstream.url)).await.unwrap();
        // Let the static token load.
        let cred = app.store.get("main").unwrap();
        for _ in 0..100 {
            if cred.current().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (upstream, app)
    });
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let direct: http::Uri = format!("{}/api/v1/orders/42", upstream.url)
        .parse()
        .unwrap();
    let proxied: http::Uri = format!("http://{}/api/v1/orders/42", app.proxy_addr)
        .parse()
        .unwrap();
    let mut group = c.benchmark_group("round_trip");
    for (name, uri) in [("direct", direct), ("via_proxy", proxied)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let uri = uri.clone();
                let client = client.clone();
                async move {
                    let resp = client.get(uri).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                }
            })
        });
    }
    group.finish();
    rt.block_on(app.stop());
}

fn dpop(c: &mut Criterion) {
    let key = token_proxy::dpop::Dpop::load("bench", None).unwrap();
    let uri: http::Uri = "https://api.example.com/v1/orders/42".parse().unwrap();
    let ath = token_proxy::dpop::ath("bench-access-token-0123456789abcdef");
    c.bench_function("dpop: one proof (ES256 signature)", |b| {
        b.iter(|| key.proof(&http::Method::GET, &uri, Some(&ath)))
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (servers, app) = rt.block_on(async {
        use token_proxy::testkit::{token_server, MockAuth};
        let plain = MockAuth::new(Duration::from_secs(3600));
        let bound = MockAuth::new(Duration::from_secs(3600));
        bound.require_dpop(None);
        let plain_idp = token_server(plain).await;
        let bound_idp = token_server(bound).await;
        let upstream = upstream_server(MockUpstream::new("bench", None)).await;
        let text = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [[routes]]
            name = "bearer"
            prefix = "/bearer"
            upstream = "{up}"
            credential = "bearer"
            [[routes]]
            name = "dpop"
            prefix = "/dpop"
            upstream = "{up}"
            credential = "dpop"
            [credentials.bearer]
            grant = "client_credentials"
            token_url = "{plain}/token"
            client_id = "bench"
            [credentials.dpop]
            grant = "client_credentials"
            token_url = "{bound}/token"
            client_id = "bench"
            dpop = true
            "#,
            up = upstream.url,
            plain = plain_idp.url,
            bound = bound_idp.url,
        );
        let app = App::spawn(Config::parse(&text, &|_| None).unwrap())
            .await
            .unwrap();
        (vec![plain_idp, bound_idp, upstream], app)
    });
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut group = c.benchmark_group("dpop_round_trip");
    for name in ["bearer", "dpop"] {
        let uri: http::Uri = format!("http://{}/{name}/v1/orders/42", app.proxy_addr)
            .parse()
            .unwrap();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let uri = uri.clone();
                let client = client.clone();
                async move {
                    let resp = client.get(uri).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                }
            })
        });
    }
    group.finish();
    rt.block_on(app.stop());
    drop(servers);
}

fn intercept(c: &mut Criterion) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HOST: &str = "api.example.test";
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (upstream, app) = rt.block_on(async {
        let upstream = upstream_server(MockUpstream::new("bench", None)).await;
        let text = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [intercept]
            ca_cert_file = "{dir}/ca.crt"
            ca_key_file = "{dir}/ca.key"
            [[routes]]
            hosts = ["{HOST}"]
            upstream = "{up}"
            credential = "main"
            [credentials.main]
            grant = "static"
            access_token = "bench-access-token-0123456789abcdef"
            "#,
            dir = dir.path().display(),
            up = upstream.url,
        );
        let app = App::spawn(Config::parse(&text, &|_| None).unwrap())
            .await
            .unwrap();
        (upstream, app)
    });
    let addr = app.proxy_addr;
    let tls = {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(dir.path().join("ca.crt")).unwrap();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    // One tunnel: CONNECT, then TLS as HOST; an HTTP/1.1 sender on it.
    let open_tunnel = move || {
        let tls = tls.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
            let stream = tls.connect(name, s).await.unwrap();
            let (sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender
        }
    };
    let plain = async move {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    };
    let request = |uri: &str| {
        http::Request::get(uri)
            .header("host", HOST)
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    async fn exchange(
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        req: http::Request<Empty<Bytes>>,
    ) {
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let mut group = c.benchmark_group("intercept");
    let forward = Arc::new(tokio::sync::Mutex::new(rt.block_on(plain)));
    group.bench_function("forward_mode_keep_alive", |b| {
        b.to_async(&rt).iter(|| async {
            let mut sender = forward.lock().await;
            exchange(&mut sender, request(&format!("http://{HOST}/v1/orders/42"))).await
        })
    });
    let tunnel = Arc::new(tokio::sync::Mutex::new(rt.block_on(open_tunnel())));
    group.bench_function("tunnel_keep_alive", |b| {
        b.to_async(&rt).iter(|| async {
            let mut sender = tunnel.lock().await;
            exchange(&mut sender, request("/v1/orders/42")).await
        })
    });
    group.bench_function("new_tunnel_per_request", |b| {
        b.to_async(&rt).iter(|| async {
            let mut sender = open_tunnel().await;
            exchange(&mut sender, request("/v1/orders/42")).await
        })
    });
    group.finish();
    rt.block_on(app.stop());
    drop(upstream);
}

criterion_group!(
    benches,
    hot_path,
    round_trip,
    shared_round_trip,
    dpop,
    intercept
);
criterion_main!(benches);
