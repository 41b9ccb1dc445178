//! A token endpoint that misbehaves: oversized answers, redirects, odd token types, missing
//! fields, string expiries, tokens dead on arrival.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use support::*;
use token_proxy::testkit::Canned;

async fn with_canned(canned: Canned) -> (World, token_proxy::AppHandle, String) {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.set_canned(Some(canned));
    let app = start(&world.config("", "refresh_token = \"rt-123\"")).await;
    let r = get(&url(&app, "/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "token_unavailable");
    let last = get(&admin(&app, "/tokens")).await.json()["main"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(world.api.seen().len(), 0, "nothing was attached");
    (world, app, last)
}

fn ok_json(body: serde_json::Value) -> Canned {
    Canned {
        status: StatusCode::OK,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_is_refused() {
    let huge = serde_json::json!({"access_token": "a".repeat(100 * 1024), "expires_in": 60});
    let (_, app, last) = with_canned(ok_json(huge)).await;
    assert!(last.contains("length limit"), "{last}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let elsewhere = MockAuth::new(Duration::from_secs(60));
    let elsewhere_server = token_server(elsewhere.clone()).await;
    let redirect = Canned {
        status: StatusCode::TEMPORARY_REDIRECT,
        headers: vec![("location".into(), format!("{}/steal", elsewhere_server.url))],
        body: Bytes::new(),
    };
    let (world, app, last) = with_canned(redirect).await;
    assert!(last.contains("307") && last.contains("redirect"), "{last}");
    assert_eq!(
        elsewhere.requests().len(),
        0,
        "the refresh token never went to the redirect target"
    );
    assert_eq!(world.auth.requests().len(), 1, "and it was not retried");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_token_type_and_missing_access_token_are_errors() {
    let (_, app, last) = with_canned(ok_json(
        serde_json::json!({"access_token": "x", "token_type": "mac"}),
    ))
    .await;
    assert!(last.contains("token_type"), "{last}");
    app.stop().await;
    let (_, app, last) = with_canned(ok_json(
        serde_json::json!({"token_type": "Bearer", "expires_in": 60}),
    ))
    .await;
    assert!(last.contains("no access_token"), "{last}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expired_on_arrival_is_refreshed_not_attached() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = jsonwebtoken::EncodingKey::from_secret(b"k");
    let stale = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"exp": now - 120}),
        &key,
    )
    .unwrap();
    let (world, app, last) = with_canned(ok_json(serde_json::json!({"access_token": stale}))).await;
    assert!(last.contains("expired on arrival"), "{last}");
    // It is retried (transient), not parked: the next good answer is used.
    world.auth.set_canned(None);
    world.auth.revoke_all_refresh();
    let rt = world.auth.new_refresh_token();
    let r = send(
        http::Method::PUT,
        &admin(&app, "/tokens/main"),
        &[],
        serde_json::json!({"refresh_token": rt, "access_token": stale}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for("a fresh token", Duration::from_secs(20), || async {
        get(&url(&app, "/y")).await.status == 200
    })
    .await;
    assert!(
        world.api.seen().iter().all(|s| s.authorized),
        "the stale token never reached the upstream"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_in_as_a_string_is_honoured() {
    let world = World::new(Duration::from_secs(300)).await;
    let body = serde_json::json!({"access_token": "string-expiry-token", "expires_in": "2", "token_type": "bearer"});
    world.auth.set_canned(Some(ok_json(body)));
    let app = start(&world.config("", "refresh_token = \"rt\"")).await;
    wait_for(
        "a few refreshes driven by the 2 s string expiry",
        Duration::from_secs(15),
        || async { world.auth.requests().len() >= 3 },
    )
    .await;
    let tokens = get(&admin(&app, "/tokens")).await.json();
    assert!(
        tokens["main"]["expires_in_s"].as_i64().unwrap() <= 2,
        "{tokens}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_that_quotes_the_refresh_token_does_not_leak_it() {
    let echo = Canned {
        status: StatusCode::BAD_REQUEST,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(
            serde_json::json!({"error": "invalid_grant", "error_description": "token rt-123 was revoked"})
                .to_string(),
        ),
    };
    let (_, app, last) = with_canned(echo).await;
    assert!(
        last.contains("invalid_grant") && last.contains("[redacted]"),
        "{last}"
    );
    assert!(!last.contains("rt-123"), "{last}");
    let body = get(&url(&app, "/again")).await.text();
    assert!(!body.contains("rt-123"), "{body}");
    app.stop().await;
}
