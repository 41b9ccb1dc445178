//! A 401 for our token: one shared refresh, one replay, never a loop.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

async fn world_and_proxy(extra_route: &str) -> (World, token_proxy::AppHandle) {
    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let app = start(&world.config(extra_route, &format!("refresh_token = \"{rt}\""))).await;
    assert_eq!(get(&url(&app, "/warmup")).await.status, 200);
    (world, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refreshed_and_the_request_replayed() {
    let (world, app) = world_and_proxy("").await;
    world.auth.revoke_all_access();
    let r = get(&url(&app, "/v1/after-revoke")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 2);
    assert_eq!(world.api.unauthorized.load(Ordering::SeqCst), 1);
    let metrics = get(&admin(&app, "/metrics")).await.text();
    assert!(
        metrics.contains("token_proxy_upstream_retries_total{route=\"api\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_401s_cause_one_refresh() {
    let (world, app) = world_and_proxy("").await;
    world.auth.revoke_all_access();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let u = url(&app, &format!("/v1/concurrent/{i}"));
        tasks.push(tokio::spawn(async move { get(&u).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        2,
        "one refresh at start, one for all the 401s"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_post_body_is_byte_identical() {
    let (world, app) = world_and_proxy("").await;
    let body: Vec<u8> = (0..512 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    world.auth.revoke_all_access();
    let r = send(
        Method::POST,
        &url(&app, "/v1/upload"),
        &[("content-type", "application/octet-stream")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = world.api.seen();
    let (first, replay) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert!(!first.authorized && replay.authorized);
    assert_eq!(first.body.as_ref(), body.as_slice());
    assert_eq!(
        replay.body.as_ref(),
        body.as_slice(),
        "replay carries the same bytes"
    );
    assert_eq!(replay.method, Method::POST);
    assert_eq!(replay.uri, "/v1/upload");
    assert_eq!(replay.headers["content-type"], "application/octet-stream");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_retry_body_is_not_replayed_but_the_refresh_still_happens() {
    let (world, app) = world_and_proxy("max_retry_body = \"1KiB\"").await;
    world.auth.revoke_all_access();
    let r = send(
        Method::POST,
        &url(&app, "/v1/big-upload"),
        &[],
        vec![7u8; 64 * 1024],
    )
    .await;
    assert_eq!(
        r.status, 401,
        "the app sees the 401 of a request we cannot replay"
    );
    assert_eq!(world.api.seen().last().unwrap().body_len, 64 * 1024);
    wait_for(
        "the refresh the 401 triggered",
        Duration::from_secs(10),
        || async { world.auth.refresh_calls.load(Ordering::SeqCst) == 2 },
    )
    .await;
    let r = send(
        Method::POST,
        &url(&app, "/v1/big-upload"),
        &[],
        vec![7u8; 64 * 1024],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_while_the_body_is_still_streaming_is_not_replayed() {
    let (world, app) = world_and_proxy("").await;
    world.auth.revoke_all_access();
    // The app sends part of its body and holds the rest; the upstream answers 401 at once.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"first part",
    ))))
    .await
    .unwrap();
    let req = Request::post(url(&app, "/early401/stream"))
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 401);
    drop(tx);
    let _ = resp.into_body().collect().await;
    assert_eq!(
        world.api.unauthorized.load(Ordering::SeqCst),
        1,
        "not replayed"
    );
    app.stop().await;
}

/// An mpsc receiver as a `Stream` (no extra crate needed).
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_always_says_401_is_tried_twice_never_more() {
    let world = World::new(Duration::from_secs(300)).await;
    // An API that trusts a different identity provider: every token is refused.
    let stranger = MockUpstream::new("stranger", Some(MockAuth::new(Duration::from_secs(300))));
    let stranger_server = upstream_server(stranger.clone()).await;
    let rt = world.auth.new_refresh_token();
    let toml = world
        .config("", &format!("refresh_token = \"{rt}\""))
        .replace(&world.api_server.url, &stranger_server.url);
    let app = start(&toml).await;
    let r = get(&url(&app, "/v1/never")).await;
    assert_eq!(r.status, 401);
    assert_eq!(stranger.seen().len(), 2, "one request, one replay");
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 2);
    // Many more 401s do not turn into a refresh storm: a burst of 10, then about one a
    // second, however many requests arrive.
    let started = std::time::Instant::now();
    for _ in 0..60 {
        assert_eq!(get(&url(&app, "/v1/never")).await.status, 401);
    }
    let refreshes = world.auth.refresh_calls.load(Ordering::SeqCst);
    let allowed = 2 + 10 + started.elapsed().as_secs() + 1;
    assert!(
        refreshes <= allowed,
        "401-driven refreshes are rate-limited, saw {refreshes} (allowed {allowed})"
    );
    assert!(stranger.seen().len() <= 2 + 2 * 60);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_401_false_passes_the_401_through() {
    let (world, app) = world_and_proxy("retry_on_401 = false").await;
    world.auth.revoke_all_access();
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 401);
    assert_eq!(world.api.unauthorized.load(Ordering::SeqCst), 1);
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        1,
        "no refresh without retry_on_401"
    );
    app.stop().await;
}
