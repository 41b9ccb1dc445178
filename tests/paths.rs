//! Paths: dot-segments cannot carry a route's token outside its prefix, and prefixes match
//! whole segments only.

mod support;

use std::time::Duration;

use support::*;

/// "/api" carries the token (to the API's /v1); everything else goes, tokenless, to a
/// public upstream.
async fn setup() -> (
    World,
    std::sync::Arc<MockUpstream>,
    MockServer,
    token_proxy::AppHandle,
) {
    let world = World::new(Duration::from_secs(300)).await;
    let public = MockUpstream::new("public", None);
    let public_server = upstream_server(public.clone()).await;
    let toml = world
        .config_rt("", "")
        .replace("prefix = \"/\"", "prefix = \"/api\"\nstrip_prefix = true")
        .replace(
            "[credentials.main]",
            &format!(
                "[[routes]]\nname = \"public\"\nprefix = \"/\"\nupstream = \"{}\"\n\n[credentials.main]",
                public_server.url
            ),
        );
    let app = start(&toml).await;
    (world, public, public_server, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_resolved_before_routing() {
    let (world, public, _s, app) = setup().await;
    assert_eq!(get(&url(&app, "/api/v1/me")).await.status, 200);
    assert_eq!(world.api.seen().len(), 1);
    for path in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/%2E./admin",
        "/api/v1/../../admin",
    ] {
        let r = raw(
            app.proxy_addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
        let seen = public.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.uri, "/admin", "{path}");
        assert!(
            last.headers.get("authorization").is_none(),
            "{path}: the token did not leave its prefix"
        );
    }
    assert_eq!(world.api.seen().len(), 1, "the API saw none of them");
    // Inside the prefix the normalised path is what is forwarded.
    let r = raw(
        app.proxy_addr,
        b"GET /api/v1/./x/../me HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(world.api.seen().last().unwrap().uri, "/v1/me");
    // Climbing above the root, or Tomcat's "..;", is refused outright.
    for path in ["/../etc/passwd", "/api/../../x", "/api/..;/admin"] {
        let r = raw(
            app.proxy_addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400"), "{path}: {r}");
        assert!(r.contains("bad_request"), "{r}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_match_whole_segments() {
    let (world, public, _s, app) = setup().await;
    for path in ["/apix", "/api-internal/keys", "/apiv2"] {
        assert_eq!(get(&url(&app, path)).await.status, 200, "{path}");
        let seen = public.seen();
        assert_eq!(seen.last().unwrap().uri, path);
        assert!(seen.last().unwrap().headers.get("authorization").is_none());
    }
    for path in ["/api", "/api/", "/api/v1"] {
        assert_eq!(get(&url(&app, path)).await.status, 200, "{path}");
    }
    assert_eq!(world.api.seen().len(), 3);
    assert!(world.api.seen().iter().all(|s| s.authorized));
    app.stop().await;
}
