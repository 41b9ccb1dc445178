//! Reverse and forward proxying: routing, rewriting, HTTP/1.1 and h2c from the app, TLS
//! upstreams, and what the proxy refuses.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Version};
use support::*;

async fn world_and_proxy(extra_routes: &str) -> (World, token_proxy::AppHandle) {
    let world = World::new(Duration::from_secs(300)).await;
    let toml = format!("{}\n{extra_routes}", world.config_rt("", ""));
    let app = start(&toml).await;
    (world, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_strip_and_base_path_rewrite_the_path() {
    let world = World::new(Duration::from_secs(300)).await;
    let extra = format!(
        "[[routes]]\nname = \"v2\"\nprefix = \"/svc\"\nstrip_prefix = true\nupstream = \"{}/base/\"\ncredential = \"main\"\n",
        world.api_server.url
    );
    let app = start(&format!("{}\n{extra}", world.config_rt("", ""))).await;
    assert_eq!(get(&url(&app, "/svc/users?id=7&x=%20")).await.status, 200);
    assert_eq!(get(&url(&app, "/plain/path?q=1")).await.status, 200);
    let seen = world.api.seen();
    assert_eq!(seen[0].uri, "/base/users?id=7&x=%20");
    assert_eq!(seen[1].uri, "/plain/path?q=1");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_for_the_upstream() {
    let (world, app) = world_and_proxy("").await;
    let r = send(
        Method::GET,
        &url(&app, "/h"),
        &[
            ("authorization", "Bearer the-apps-own-stale-token"),
            ("connection", "x-private-hop"),
            ("x-private-hop", "secret"),
            ("proxy-authorization", "Basic abc"),
            ("x-custom", "kept"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-upstream"], "api");
    let seen = &world.api.seen()[0];
    let auths: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(
        auths.len(),
        1,
        "the app's Authorization is replaced, not forwarded alongside"
    );
    assert_ne!(auths[0], "Bearer the-apps-own-stale-token");
    assert!(seen.authorized);
    assert!(seen.headers.get("x-private-hop").is_none());
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert_eq!(seen.headers["x-custom"], "kept");
    assert_eq!(seen.headers["host"], world.api_server.addr.to_string());
    app.stop().await;
}

/// The protocol is told from the first bytes: an h2c preface that arrives in pieces is still
/// h2, and HTTP/1.1 requests whose method starts like the preface (`PUT`, `PRI` with
/// HTTP/1.1) are still HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_is_told_from_the_first_bytes_even_in_pieces() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (world, app) = world_and_proxy("").await;
    let mut h2 = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    h2.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
    // An empty SETTINGS frame, as every h2 client sends next.
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), h2.read_exact(&mut frame))
        .await
        .expect("the server answers")
        .unwrap();
    assert_eq!(
        frame[3], 4,
        "the server's first frame is its SETTINGS: {frame:?}"
    );

    for (request, want) in [
        (
            &b"PUT /v1/put HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nhi"[..],
            "HTTP/1.1 200",
        ),
        (
            &b"PRI /v1/pri HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"[..],
            "HTTP/1.1 ",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(app.proxy_addr)
            .await
            .unwrap();
        s.write_all(&request[..3]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&request[3..]).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
            .await
            .expect("an HTTP/1.1 answer")
            .unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with(want), "{head}");
    }
    assert!(world
        .api
        .seen()
        .iter()
        .any(|r| r.uri == "/v1/put" && &r.body[..] == b"hi"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_from_the_app_works() {
    let (world, app) = world_and_proxy("").await;
    let client = h2c_client();
    for i in 0..10 {
        let r = send_with(
            &client,
            Method::POST,
            &url(&app, &format!("/h2/{i}")),
            &[],
            vec![1u8; 1000],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(world.api.seen().len(), 10);
    assert!(world
        .api
        .seen()
        .iter()
        .all(|s| s.authorized && s.body_len == 1000));
    app.stop().await;
}

fn test_pki(dir: &std::path::Path) -> (std::path::PathBuf, rustls::ServerConfig) {
    let ca = TestCa::new("token-proxy test CA");
    let (leaf, leaf_key) = ca.server();
    let ca_path = write_file(dir, "ca.pem", &ca.cert.pem());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    (ca_path, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_a_private_ca_speaks_h2_via_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_path, server_tls) = test_pki(dir.path());
    let world = World::new(Duration::from_secs(300)).await;
    let secure = MockUpstream::new("secure", Some(world.auth.clone()));
    let secure_server = token_proxy::testkit::upstream_server_tls(secure.clone(), server_tls).await;
    let extra = format!(
        "[[routes]]\nname = \"tls\"\nprefix = \"/tls\"\nupstream = \"https://127.0.0.1:{}\"\ncredential = \"main\"\nca_file = \"{}\"\n\
         [[routes]]\nname = \"untrusted\"\nprefix = \"/untrusted\"\nupstream = \"https://127.0.0.1:{}\"\ncredential = \"main\"\n",
        secure_server.addr.port(),
        ca_path.display(),
        secure_server.addr.port(),
    );
    let app = start(&format!("{}\n{extra}", world.config_rt("", ""))).await;
    let r = get(&url(&app, "/tls/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["upstream"], "secure");
    assert_eq!(
        secure.seen()[0].version,
        Version::HTTP_2,
        "h2 negotiated by ALPN"
    );
    assert!(secure.seen()[0].authorized);
    // Without the CA the certificate is refused: 502, and the token never left.
    let r = get(&url(&app, "/untrusted/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_unreachable");
    assert_eq!(secure.seen().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_mode_matches_listed_hosts_only() {
    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let toml = world
        .config("", &format!("refresh_token = \"{rt}\""))
        .replace(
            "prefix = \"/\"",
            "prefix = \"/\"\nhosts = [\"api.example.com\"]",
        );
    let app = start(&toml).await;

    let ok = raw(
        app.proxy_addr,
        b"GET http://API.example.com/v1/fwd?q=1 HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let seen = world.api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/v1/fwd?q=1");
    assert!(seen[0].authorized);

    for host in ["api.example.com.evil.test", "evil.test", "xapi.example.com"] {
        let req = format!(
            "GET http://{host}/steal HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let resp = raw(app.proxy_addr, req.as_bytes(), Duration::from_secs(10)).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{host}: {resp}");
        assert!(resp.contains("host_not_allowed"));
    }
    let connect = raw(
        app.proxy_addr,
        b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(
        connect.contains("http://"),
        "the message tells the user what to do: {connect}"
    );
    assert_eq!(
        world.api.seen().len(),
        1,
        "nothing refused reached the upstream"
    );
    // Reverse mode works on the same listener, side by side.
    assert_eq!(get(&url(&app, "/v1/reverse")).await.status, 200);
    assert_eq!(world.api.seen().last().unwrap().uri, "/v1/reverse");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431() {
    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let toml = world
        .config("", &format!("refresh_token = \"{rt}\""))
        .replace(
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nmax_header_size = \"16KiB\"",
        );
    let app = start(&toml).await;
    let big = "a".repeat(40 * 1024);
    let req = format!("GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    let resp = raw(app.proxy_addr, req.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    assert_eq!(world.api.seen().len(), 0);
    let small = raw(
        app.proxy_addr,
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(small.starts_with("HTTP/1.1 200"), "{small}");
    // h2c too.
    let req = http::Request::get(url(&app, "/x"))
        .header("x-big", "a".repeat(40 * 1024))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(
        world.api.seen().len(),
        1,
        "only the small request got through"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_credential_forwards_without_a_token() {
    let world = World::new(Duration::from_secs(300)).await;
    let public = MockUpstream::new("public", None);
    let public_server = upstream_server(public.clone()).await;
    let toml = format!(
        "{}\n[[routes]]\nname = \"public\"\nprefix = \"/public\"\nupstream = \"{}\"\n",
        world.config_rt("", ""),
        public_server.url
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/public/x")).await.status, 200);
    assert!(
        public.seen()[0].headers.get("authorization").is_none(),
        "no token for a route without credential"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_share_the_listener_and_the_token() {
    let world = World::new(Duration::from_secs(300)).await;
    let toml = world.config_rt("", "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nworkers = 3",
    );
    let app = start(&toml).await;
    // Fresh connections (no keep-alive) land on whichever worker the kernel picks.
    for i in 0..30 {
        let client = client();
        let r = send_with(
            &client,
            Method::GET,
            &url(&app, &format!("/v1/w/{i}")),
            &[],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        world
            .auth
            .refresh_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one token for every worker"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_already_in_use_is_refused_not_shared() {
    let world = World::new(Duration::from_secs(300)).await;
    let first = start(&world.config_rt("", "")).await;
    let port = first.proxy_addr.port();
    let toml = world.config_rt("", "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let config = token_proxy::config::Config::parse(&toml, &|_| None).unwrap();
    let Err(e) = token_proxy::App::spawn(config).await else {
        panic!("a second proxy on the same port started (it would share the connections)");
    };
    assert!(e.to_string().contains("cannot listen"), "{e}");
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_keepalive_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::new(Duration::from_secs(300)).await;
    let toml = world.config_rt("", "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nkeepalive_timeout = \"2s\"",
    );
    let app = start(&toml).await;
    let mut conn = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut buf = vec![0u8; 16 * 1024];
    // Idle for less than the timeout between requests: the connection is kept.
    for _ in 0..3 {
        conn.write_all(request).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // Then silent past it: the proxy closes the connection.
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("closed by the proxy, not left open")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(world.api.seen().len(), 3);
    app.stop().await;
}
