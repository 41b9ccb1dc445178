//! `egress_proxy`: token-proxy's own outbound connections (token endpoint, upstream) through
//! an HTTP proxy as `CONNECT` tunnels — a proxy given by URL (with credentials), or
//! `"env"` (HTTPS_PROXY / HTTP_PROXY / NO_PROXY). A loopback CONNECT proxy here logs what it
//! tunnelled; one that refuses CONNECT gives a clear error.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Each tunnel: its `host:port` and the `Proxy-Authorization` it came with.
type TunnelLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A CONNECT proxy on 127.0.0.1: records each tunnel's target and Proxy-Authorization.
struct ConnectProxy {
    port: u16,
    tunnels: TunnelLog,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    async fn start(refuse: bool) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tunnels: TunnelLog = Arc::new(Mutex::new(Vec::new()));
        let log = tunnels.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut app, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if app.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head
                        .strip_prefix("CONNECT ")
                        .and_then(|r| r.split_whitespace().next())
                        .unwrap_or("")
                        .to_string();
                    let auth = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Proxy-Authorization: "))
                        .map(str::to_string);
                    log.lock().unwrap().push((target.clone(), auth));
                    if refuse || target.is_empty() {
                        let _ = app
                            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    let Ok(mut upstream) = TcpStream::connect(&target).await else {
                        let _ = app.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    let _ = app
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await;
                    let _ = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
                });
            }
        });
        ConnectProxy {
            port,
            tunnels,
            task,
        }
    }

    fn targets(&self) -> Vec<String> {
        self.tunnels
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn authority(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_and_upstream_through_a_proxy_with_credentials() {
    let world = World::new(Duration::from_secs(300)).await;
    let proxy = ConnectProxy::start(false).await;
    let setting = format!(
        "egress_proxy = \"http://corp%20user:s3cret@127.0.0.1:{}\"\n",
        proxy.port
    );
    let toml = world.config_rt(&setting, &setting);
    let app = start(&toml).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let targets = proxy.targets();
    assert!(
        targets.contains(&authority(&world.idp.url)),
        "the token call was tunnelled: {targets:?}"
    );
    assert!(
        targets.contains(&authority(&world.api_server.url)),
        "the upstream request was tunnelled: {targets:?}"
    );
    let auths: Vec<Option<String>> = proxy
        .tunnels
        .lock()
        .unwrap()
        .iter()
        .map(|(_, a)| a.clone())
        .collect();
    // base64("corp user:s3cret")
    assert!(
        auths
            .iter()
            .all(|a| a.as_deref() == Some("Basic Y29ycCB1c2VyOnMzY3JldA==")),
        "{auths:?}"
    );
    let status = get(&admin(&app, "/tokens/main")).await.text();
    assert!(!status.contains("s3cret"), "{status}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_follows_https_proxy_http_proxy_and_no_proxy() {
    let world = World::new(Duration::from_secs(300)).await;
    let proxy = ConnectProxy::start(false).await;
    // The API by name (exempted by NO_PROXY), the IdP by address (proxied).
    let api_by_name = world.api_server.url.replace("127.0.0.1", "localhost");
    let toml = world
        .config_rt("egress_proxy = \"env\"\n", "egress_proxy = \"env\"\n")
        .replace(
            &format!("upstream = \"{}\"", world.api_server.url),
            &format!("upstream = \"{api_by_name}\""),
        );
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port);
    let app = start_with_env(
        &toml,
        &[
            ("http_proxy", proxy_url.as_str()),
            ("NO_PROXY", "localhost,.internal"),
        ],
    )
    .await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        proxy.targets(),
        vec![authority(&world.idp.url)],
        "only the IdP went through the proxy"
    );
    assert_eq!(world.api.seen().len(), 1, "the API was reached directly");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_connect_is_named_in_the_error() {
    let world = World::new(Duration::from_secs(300)).await;
    let proxy = ConnectProxy::start(true).await;
    let setting = format!("egress_proxy = \"http://127.0.0.1:{}\"\n", proxy.port);
    // The token endpoint behind the refusing proxy: no token, and the reason says why.
    let app = start(&world.config_rt("", &setting)).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let status = get(&admin(&app, "/tokens/main")).await.text();
    assert!(status.contains("refused CONNECT"), "{status}");
    app.stop().await;
    // The upstream behind it: 502 naming the refusal.
    let app = start(&world.config_rt(&setting, "")).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("refused CONNECT"), "{}", r.text());
    app.stop().await;
}

#[test]
fn bad_proxy_settings_are_config_errors() {
    let base = "[[routes]]\nprefix = \"/\"\nupstream = \"https://api.example.com\"\n";
    for (setting, expected) in [
        (
            "egress_proxy = \"https://proxy:3128\"",
            "routes[0].egress_proxy: only http://",
        ),
        ("egress_proxy = \"http://\"", "routes[0].egress_proxy"),
    ] {
        let e = token_proxy::config::Config::parse(&format!("{base}{setting}\n"), &|_| None)
            .unwrap_err();
        assert!(e.to_string().contains(expected), "{setting}: {e}");
    }
}
