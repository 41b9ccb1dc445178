//! Tokens are refreshed ahead of expiry, in the background, once however many requests wait.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_refresh_keeps_every_request_authorized_across_many_expiries() {
    let world = World::new(Duration::from_secs(2)).await;
    let app = start(&world.config_rt("", "")).await;

    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let r = get(&url(&app, &format!("/v1/items/{sent}"))).await;
        assert_eq!(r.status, 200, "request {sent}: {}", r.text());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refreshes = world.auth.refresh_calls.load(Ordering::SeqCst);
    // 7 s of 2 s tokens: the first fetch plus at least three lifetimes crossed.
    assert!(
        refreshes >= 4,
        "expected several refreshes, saw {refreshes}"
    );
    assert_eq!(
        world.api.unauthorized.load(Ordering::SeqCst),
        0,
        "the upstream never saw an expired token"
    );
    assert_eq!(world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    // Every upstream request carried exactly one Authorization header: ours.
    for seen in world.api.seen() {
        assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_at_expiry_share_one_refresh() {
    // The first token lives 2 s; the one the held refresh returns lives a minute.
    let world = World::new(Duration::from_secs(60)).await;
    let config = world.config_rt("", "");
    // After the login above: the first token the proxy fetches lives 2 s.
    world.auth.queue_lifetimes(&[Duration::from_secs(2)]);
    let app = start(&config).await;
    assert_eq!(get(&url(&app, "/warmup")).await.status, 200);
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 1);

    // Hold the background refresh at the token server until the token has expired.
    world.auth.set_gate(false);
    wait_for(
        "the background refresh to reach the token server",
        Duration::from_secs(10),
        || async { world.auth.requests().len() == 2 },
    )
    .await;
    let cred = app.store.get("main").unwrap();
    wait_for(
        "the first token to expire",
        Duration::from_secs(10),
        || async { cred.snapshot().usable_token(SystemTime::now()).is_none() },
    )
    .await;

    let mut tasks = Vec::new();
    for i in 0..200 {
        let u = url(&app, &format!("/v1/at-expiry/{i}"));
        tasks.push(tokio::spawn(async move { get(&u).await.status }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    world.auth.set_gate(true);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        2,
        "exactly one refresh for 200 waiting requests"
    );
    assert_eq!(world.api.unauthorized.load(Ordering::SeqCst), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_grant_fetches_with_basic_auth() {
    let world = World::new(Duration::from_secs(2)).await;
    let toml = world.config("", "").replace(
        "grant = \"refresh_token\"",
        "grant = \"client_credentials\"\nscope = \"read write\"\nparams = { audience = \"https://api.example.com\" }",
    );
    let app = start(&toml).await;
    for i in 0..5 {
        assert_eq!(get(&url(&app, &format!("/cc/{i}"))).await.status, 200);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(world.auth.client_credentials_calls.load(Ordering::SeqCst) >= 2);
    let req = &world.auth.requests()[0];
    assert_eq!(req.params["grant_type"], "client_credentials");
    assert_eq!(req.params["scope"], "read write");
    assert_eq!(
        req.params["audience"], "https://api.example.com",
        "extra params are sent"
    );
    assert!(
        !req.params.contains_key("client_secret"),
        "basic auth keeps the secret out of the body"
    );
    let basic = req.headers["authorization"].to_str().unwrap();
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(decoded, b"cid:client-secret-value-123");
    assert_eq!(req.content_type, "application/x-www-form-urlencoded");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_encoding_with_extra_headers_and_body_client_auth() {
    let world = World::new(Duration::from_secs(60)).await;
    let rt = world.auth.new_refresh_token();
    let cred = format!(
        "refresh_token = \"{rt}\"\nencoding = \"json\"\nclient_auth = \"body\"\nheaders = {{ API_KEY_ID = \"key-123\" }}"
    );
    let app = start(&world.config("", &cred)).await;
    assert_eq!(get(&url(&app, "/x")).await.status, 200);
    let req = &world.auth.requests()[0];
    assert_eq!(req.content_type, "application/json");
    assert_eq!(req.params["grant_type"], "refresh_token");
    assert_eq!(req.params["refresh_token"], rt);
    assert_eq!(req.params["client_id"], "cid");
    assert_eq!(req.params["client_secret"], "client-secret-value-123");
    assert_eq!(req.headers["api_key_id"], "key-123");
    assert!(req.headers.get("authorization").is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_credentials_starting_together_do_not_stampede_the_token_endpoint() {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.set_response_delay(Duration::from_millis(100));
    let mut toml = world.config("", "");
    for i in 0..100 {
        toml.push_str(&format!(
            "\n[credentials.c{i}]\ngrant = \"client_credentials\"\n\
             token_url = \"{}/oauth/token\"\nclient_id = \"cid\"\nclient_secret = \"s-{i}\"\n",
            world.idp.url
        ));
    }
    let app = start(&toml).await;
    let tokens_url = admin(&app, "/tokens");
    wait_for(
        "all 100 credentials fresh",
        Duration::from_secs(60),
        || async {
            let tokens = get(&tokens_url).await.json();
            (0..100).all(|i| tokens[format!("c{i}")]["state"] == "fresh")
        },
    )
    .await;
    assert_eq!(
        world.auth.client_credentials_calls.load(Ordering::SeqCst),
        100
    );
    let most = world.auth.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=token_proxy::upstream::TOKEN_CALLS_IN_FLIGHT as u64).contains(&most),
        "token calls at once: {most}"
    );
    app.stop().await;
}
