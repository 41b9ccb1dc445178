//! When things break: token endpoint down, refresh token revoked, upstream down or slow.
//! Every error the app receives is the JSON body INTERFACE.md names.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use support::*;

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    let v = r.json();
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        v.get("route").is_some() && v.get("credential").is_some(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_old_token_serves_then_503_then_recovers() {
    let world = World::new(Duration::from_secs(3)).await;
    let app = start(&world.config_rt("", "")).await;
    assert_eq!(get(&url(&app, "/a")).await.status, 200);

    world.auth.fail_with(Some(StatusCode::SERVICE_UNAVAILABLE));
    // The old token is still valid: requests keep working while refreshes fail.
    assert_eq!(get(&url(&app, "/b")).await.status, 200);
    wait_for(
        "a 503 token_unavailable once the token has expired",
        Duration::from_secs(20),
        || async { get(&url(&app, "/c")).await.status == 503 },
    )
    .await;
    let r = get(&url(&app, "/d")).await;
    assert_error(&r, 503, "token_unavailable");
    assert_eq!(r.json()["credential"], "main");
    assert!(
        r.headers.get("retry-after").is_some(),
        "503 carries Retry-After"
    );
    assert_eq!(
        world.api.unauthorized.load(Ordering::SeqCst),
        0,
        "an expired token is never attached"
    );
    let tokens = get(&admin(&app, "/tokens")).await.json();
    assert!(
        tokens["main"]["last_error"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{tokens}"
    );

    world.auth.fail_with(None);
    wait_for(
        "recovery once the endpoint is back",
        Duration::from_secs(45),
        || async { get(&url(&app, "/e")).await.status == 200 },
    )
    .await;
    assert!(get(&admin(&app, "/tokens")).await.json()["main"]["last_error"].is_null());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_means_needs_reauth_without_hammering() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    assert_eq!(get(&url(&app, "/a")).await.status, 200);
    world.auth.revoke_all_refresh(); // the user's session was revoked...
    world.auth.revoke_all_access(); // ...and with it the access token

    let r = get(&url(&app, "/b")).await;
    assert_error(&r, 503, "token_unavailable");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{}",
        r.text()
    );
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    for _ in 0..30 {
        assert_eq!(get(&url(&app, "/c")).await.status, 503);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        calls,
        "no retries after invalid_grant"
    );
    let tokens = get(&admin(&app, "/tokens")).await.json();
    assert_eq!(tokens["main"]["state"], "needs_reauth");
    assert!(tokens["main"]["last_error"]
        .as_str()
        .unwrap()
        .contains("invalid_grant"));
    assert_eq!(get(&admin(&app, "/readyz")).await.status, 503);

    // A new login installed through the admin API brings it back.
    let login = world.auth.login().to_string();
    let r = send(http::Method::PUT, &admin(&app, "/tokens/main"), &[], login).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&url(&app, "/d")).await.status, 200);
    assert_eq!(get(&admin(&app, "/readyz")).await.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cotter_style_error_is_surfaced_in_last_error() {
    let auth = MockAuth::with_style(Duration::from_secs(300), ErrorStyle::Cotter);
    let world = World::with_auth(auth).await;
    let app = start(&world.config(
        "",
        "refresh_token = \"235:not-a-real-token\"\nencoding = \"json\"",
    ))
    .await;
    let r = get(&url(&app, "/a")).await;
    assert_error(&r, 503, "token_unavailable");
    let tokens = get(&admin(&app, "/tokens")).await.json();
    let last = tokens["main"]["last_error"].as_str().unwrap();
    assert!(last.contains("refresh token is not valid"), "{last}");
    assert!(
        !last.contains("not-a-real-token"),
        "no secrets in last_error: {last}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_token_endpoint_gives_503_quickly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let world = World::new(Duration::from_secs(300)).await;
    let toml = world
        .config("", "refresh_token = \"x\"")
        .replace(&world.idp.url, &format!("http://{closed}"));
    let app = start(&toml).await;
    let r = get(&url(&app, "/a")).await;
    assert_error(&r, 503, "token_unavailable");
    let tokens = get(&admin(&app, "/tokens")).await.json();
    assert!(
        tokens["main"]["last_error"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{tokens}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_is_504() {
    let world = World::new(Duration::from_secs(300)).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rt = world.auth.new_refresh_token();
    let toml = format!(
        "{}\n[[routes]]\nname = \"down\"\nprefix = \"/down\"\nupstream = \"http://{closed}\"\ncredential = \"main\"\n",
        world.config("timeout = \"500ms\"", &format!("refresh_token = \"{rt}\""))
    );
    let app = start(&toml).await;
    assert_error(
        &get(&url(&app, "/down/x")).await,
        502,
        "upstream_unreachable",
    );
    assert_error(
        &get(&url(&app, "/slow/3000")).await,
        504,
        "upstream_timeout",
    );
    assert_eq!(get(&url(&app, "/slow/10")).await.status, 200);
    // Again, now that a pooled connection has answered (on this worker, if the request
    // lands there): a reused connection's timer is re-armed for each request's deadline.
    let started = std::time::Instant::now();
    assert_error(
        &get(&url(&app, "/slow/3000")).await,
        504,
        "upstream_timeout",
    );
    assert!(started.elapsed() < Duration::from_millis(2500));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_path_is_404_no_route() {
    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let toml = world
        .config("", &format!("refresh_token = \"{rt}\""))
        .replace("prefix = \"/\"", "prefix = \"/api\"");
    let app = start(&toml).await;
    let r = get(&url(&app, "/other")).await;
    assert_error(&r, 404, "no_route");
    assert_eq!(world.api.seen().len(), 0);
    assert_eq!(get(&url(&app, "/api/x")).await.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_hangs_times_out_and_is_retried() {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.set_gate(false); // every token request hangs
    let app = start(&world.config_rt("", "timeout = \"1s\"")).await;
    let r = get(&url(&app, "/a")).await;
    assert_error(&r, 503, "token_unavailable");
    let tokens = get(&admin(&app, "/tokens")).await.json();
    assert!(
        tokens["main"]["last_error"]
            .as_str()
            .unwrap()
            .contains("did not answer within"),
        "{tokens}"
    );
    world.auth.set_gate(true);
    wait_for(
        "recovery after the hang",
        Duration::from_secs(30),
        || async { get(&url(&app, "/b")).await.status == 200 },
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_mid_response_does_not_hang_the_app() {
    let world = World::new(Duration::from_secs(300)).await;
    // An "upstream" that sends a response head promising 1 MB, a few bytes, then closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial")
                .await;
            drop(s);
        }
    });
    let toml = format!(
        "{}\n[[routes]]\nname = \"dying\"\nprefix = \"/dying\"\nupstream = \"http://{addr}\"\ncredential = \"main\"\n",
        world.config_rt("", "")
    );
    let app = start(&toml).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client().get(url(&app, "/dying/x").parse().unwrap()),
    )
    .await
    .expect("the head arrives")
    .expect("a response");
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the app is not left hanging");
    assert!(
        body.is_err(),
        "a truncated body surfaces as an error, not as a complete body"
    );
    assert_eq!(get(&url(&app, "/still/fine")).await.status, 200);
    app.stop().await;
}
