//! Web pages in a browser on the same machine must not be able to spend the token (CSRF) or
//! read through the proxy (DNS rebinding), nor drive the admin API.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::*;

async fn world_and_app(server_extra: &str) -> (World, token_proxy::AppHandle) {
    let world = World::new(Duration::from_secs(300)).await;
    let toml = world.config_rt("", "").replace(
        "shutdown_grace = \"5s\"",
        &format!("shutdown_grace = \"5s\"\n{server_extra}"),
    );
    let app = start(&toml).await;
    (world, app)
}

fn assert_refused(r: &Reply, setting: &str) {
    assert_eq!(r.status, 403, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"], "browser_request_refused", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains(setting),
        "the message names {setting}: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_host_name_is_refused_in_reverse_mode() {
    let (world, app) = world_and_app("allowed_hosts = [\"token-proxy\"]").await;
    let u = url(&app, "/v1/x");
    // DNS rebinding: the page's own name now resolves to 127.0.0.1.
    for host in ["evil.test", "evil.test:8080", "127.0.0.1.evil.test"] {
        let r = send(Method::GET, &u, &[("host", host)], Bytes::new()).await;
        assert_refused(&r, "server.allowed_hosts");
    }
    // The same over h2c, where the name is the :authority.
    let stream = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://evil.test/v1/x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 403, "h2c :authority evil.test");
    assert_eq!(world.api.seen().len(), 0, "nothing reached the upstream");
    let before = world.api.seen().len();
    // Local names, IP literals and allowed_hosts names pass.
    for host in [
        "127.0.0.1",
        "localhost:8080",
        "[::1]:8080",
        "token-proxy:8080",
        "10.0.0.7",
    ] {
        let r = send(Method::GET, &u, &[("host", host)], Bytes::new()).await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    assert_eq!(world.api.seen().len(), before + 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_made_by_web_pages_are_refused_unless_their_origin_is_allowed() {
    let (world, app) = world_and_app("allowed_origins = [\"https://dashboard.example.com\"]").await;
    let u = url(&app, "/v1/x");
    for headers in [
        vec![("origin", "https://evil.test")],
        vec![("origin", "null")],
        vec![
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "no-cors"),
        ],
        vec![("sec-fetch-site", "same-site")],
    ] {
        let r = send(Method::POST, &u, &headers, "transfer=all").await;
        assert_refused(&r, "server.allowed_origins");
    }
    assert_eq!(world.api.seen().len(), 0, "nothing reached the upstream");
    let ok = send(
        Method::POST,
        &u,
        &[
            ("origin", "https://dashboard.example.com"),
            ("sec-fetch-site", "cross-site"),
        ],
        "x",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // A person typing the URL (Sec-Fetch-Site: none) is not a page's request.
    let typed = send(Method::GET, &u, &[("sec-fetch-site", "none")], Bytes::new()).await;
    assert_eq!(typed.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_mode_refuses_web_pages_too() {
    let world = World::new(Duration::from_secs(300)).await;
    let toml = world.config_rt("", "").replace(
        "prefix = \"/\"",
        "prefix = \"/\"\nhosts = [\"api.example.com\"]",
    );
    let app = start(&toml).await;
    let resp = raw(
        app.proxy_addr,
        b"POST http://api.example.com/v1/x HTTP/1.1\r\nHost: api.example.com\r\nOrigin: https://evil.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("browser_request_refused") && resp.contains("server.allowed_origins"));
    // The forward-mode Host is the target, checked by the routes, not by allowed_hosts.
    let ok = raw(
        app.proxy_addr,
        b"GET http://api.example.com/v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(world.api.seen().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_cannot_drive_the_admin_api() {
    let (world, app) = world_and_app("allowed_hosts = [\"token-proxy\"]").await;
    assert_eq!(get(&url(&app, "/v1/before")).await.status, 200);
    let tokens = admin(&app, "/tokens/main");
    let attacker_token =
        r#"{"access_token":"attacker","refresh_token":"attacker-rt","expires_in":3600}"#;
    type Attempt<'a> = (Method, Vec<(&'a str, &'a str)>, &'a str);
    let attempts: Vec<Attempt> = vec![
        (Method::DELETE, vec![("host", "evil.test:9901")], ""),
        (Method::PUT, vec![("host", "evil.test")], attacker_token),
        // allowed_hosts opens reads, never writes.
        (Method::DELETE, vec![("host", "token-proxy")], ""),
        (
            Method::PUT,
            vec![("origin", "https://evil.test")],
            attacker_token,
        ),
        (Method::DELETE, vec![("sec-fetch-site", "cross-site")], ""),
    ];
    for (method, headers, body) in attempts {
        let r = send(method.clone(), &tokens, &headers, body.to_string()).await;
        assert_eq!(r.status, 403, "{method} {headers:?}: {}", r.text());
    }
    let refresh = send(
        Method::POST,
        &admin(&app, "/tokens/main/refresh"),
        &[("host", "evil.test")],
        Bytes::new(),
    )
    .await;
    assert_eq!(refresh.status, 403);
    // The credential is untouched.
    assert_eq!(get(&url(&app, "/v1/after")).await.status, 200);
    assert_eq!(get(&tokens).await.json()["refresh_count"], 1);
    assert!(world.api.seen().iter().all(|s| s.authorized));

    // Reads: IP literals (kubelet probes, pod-IP scrapes), localhost and allowed_hosts.
    let metrics = admin(&app, "/metrics");
    for host in ["10.0.0.5:9901", "localhost", "token-proxy:9901"] {
        let r = send(Method::GET, &metrics, &[("host", host)], Bytes::new()).await;
        assert_eq!(r.status, 200, "{host}");
    }
    let r = send(
        Method::GET,
        &metrics,
        &[("host", "prometheus-target.svc")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("server.allowed_hosts"), "{}", r.text());
    // A local write addressed properly still works.
    let ok = send(
        Method::POST,
        &admin(&app, "/tokens/main/refresh"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_admin_listener_accepts_writes_from_ipv4_loopback() {
    // A dual-stack socket bound to the v4-mapped loopback address: IPv4 clients arrive as
    // ::ffff:127.0.0.1, exactly as they do on `[::]:9901`, without listening beyond loopback.
    let world = World::new(Duration::from_secs(300)).await;
    let toml = world.config_rt("", "").replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"[::ffff:127.0.0.1]:0\"",
    );
    let app = start(&toml).await;
    let port = app.admin_addr.unwrap().port();
    let r = send(
        Method::POST,
        &format!("http://127.0.0.1:{port}/tokens/main/refresh"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    app.stop().await;
}
