//! The admin listener: health, readiness, token status, metrics, forced refresh, install.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_without_a_token_becomes_live_when_one_is_put() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state/main.json");
    let app = start(&world.config("", &format!("state_file = \"{}\"", state.display()))).await;

    assert_eq!(get(&admin(&app, "/healthz")).await.status, 200);
    let ready = get(&admin(&app, "/readyz")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["credentials"][0], "main");
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "token_unavailable");
    assert_eq!(
        get(&admin(&app, "/tokens")).await.json()["main"]["state"],
        "needs_reauth"
    );

    // What a login SDK returns (Cotter's oauth_token shape carries extra fields).
    let mut login = world.auth.login();
    login["id_token"] = "eyJhbGciOiJFUzI1NiJ9.e30.sig".into();
    login["auth_method"] = "OTP".into();
    let rt = login["refresh_token"].as_str().unwrap().to_string();
    let r = send(
        Method::PUT,
        &admin(&app, "/tokens/main"),
        &[("content-type", "application/json")],
        login.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "fresh");
    assert_eq!(get(&admin(&app, "/readyz")).await.status, 200);
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    // Its refresh token is persisted, privately.
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains(&rt));
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Bad installs are refused with a reason.
    let r = send(
        Method::PUT,
        &admin(&app, "/tokens/main"),
        &[],
        "{\"token_type\":\"Bearer\"}",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("access_token"));
    assert_eq!(
        send(Method::PUT, &admin(&app, "/tokens/nope"), &[], "{}")
            .await
            .status,
        404
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refresh_reports_success_and_the_endpoints_error() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    assert_eq!(get(&url(&app, "/a")).await.status, 200);

    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["refresh_count"], 2);
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 2);

    world.auth.fail_with(Some(StatusCode::BAD_REQUEST));
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.json()["message"].as_str().unwrap().contains("400"),
        "{}",
        r.text()
    );

    // A refused refresh parks the credential in needs_reauth; forcing works from there too.
    assert_eq!(
        get(&admin(&app, "/tokens")).await.json()["main"]["state"],
        "needs_reauth"
    );
    world.auth.fail_with(None);
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "fresh");
    assert_eq!(
        send(Method::POST, &admin(&app, "/tokens/nope/refresh"), &[], "")
            .await
            .status,
        404
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_metrics_describe_state_without_token_values() {
    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let app = start(&world.config("", &format!("refresh_token = \"{rt}\""))).await;
    for i in 0..3 {
        assert_eq!(get(&url(&app, &format!("/m/{i}"))).await.status, 200);
    }
    world.auth.revoke_all_access();
    assert_eq!(get(&url(&app, "/m/replayed")).await.status, 200);

    let tokens = get(&admin(&app, "/tokens")).await;
    let v = tokens.json();
    let main = &v["main"];
    assert_eq!(main["state"], "fresh");
    assert!(main["expires_in_s"].as_i64().unwrap() > 250);
    assert_eq!(main["refresh_count"], 2);
    assert!(main["refreshed_at"].as_str().unwrap().ends_with('Z'));
    assert!(main["last_error"].is_null());

    let metrics = get(&admin(&app, "/metrics")).await.text();
    for needle in [
        "token_proxy_requests_total{route=\"api\",status=\"200\",class=\"2xx\"} 4",
        "token_proxy_request_duration_seconds_bucket{le=",
        "token_proxy_upstream_retries_total{route=\"api\"} 1",
        "token_proxy_token_refresh_total{credential=\"main\",outcome=\"ok\"} 2",
        "token_proxy_token_expires_in_seconds{credential=\"main\"}",
        "token_proxy_token_state{credential=\"main\",state=\"fresh\"} 1",
        "token_proxy_token_state{credential=\"main\",state=\"needs_reauth\"} 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }
    for seen in world.api.seen() {
        let token = seen.headers["authorization"]
            .to_str()
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_string();
        assert!(!tokens.text().contains(&token) && !metrics.contains(&token));
    }
    assert!(!tokens.text().contains(&rt) && !metrics.contains(&rt));
    assert_eq!(get(&admin(&app, "/nothing")).await.status, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_signs_a_credential_out_until_a_new_token_is_put() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("main.json");
    let app = start(&world.config_rt("", &format!("state_file = \"{}\"", state.display()))).await;
    assert_eq!(get(&url(&app, "/a")).await.status, 200);
    assert!(state.exists());

    let r = send(Method::DELETE, &admin(&app, "/tokens/main"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "needs_reauth");
    assert!(!state.exists(), "the state file is gone too");
    let before = world.api.seen().len();
    let r = get(&url(&app, "/b")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "token_unavailable");
    assert_eq!(world.api.seen().len(), before, "no token, nothing sent");
    assert_eq!(get(&admin(&app, "/readyz")).await.status, 503);

    let login = world.auth.login().to_string();
    assert_eq!(
        send(Method::PUT, &admin(&app, "/tokens/main"), &[], login)
            .await
            .status,
        200
    );
    assert_eq!(get(&url(&app, "/c")).await.status, 200);
    assert!(state.exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_install_leaves_the_working_tokens_alone() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("main.json");
    let app = start(&world.config_rt("", &format!("state_file = \"{}\"", state.display()))).await;
    assert_eq!(get(&url(&app, "/v1/before")).await.status, 200);
    let saved = std::fs::read_to_string(&state).unwrap();
    let status = get(&admin(&app, "/tokens/main")).await.json();

    for bad in [
        // Not usable in an HTTP header.
        r#"{"access_token":"line\nbreak","refresh_token":"attacker-rt","expires_in":3600}"#,
        r#"{"access_token":"ctl\u0001x","refresh_token":"attacker-rt"}"#,
        r#"{"access_token":"ok","refresh_token":"rt\r\nX-Evil: 1"}"#,
        r#"{"access_token":"ok","token_type":"mac","refresh_token":"attacker-rt"}"#,
    ] {
        let r = send(Method::PUT, &admin(&app, "/tokens/main"), &[], bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(!r.text().contains("attacker-rt"), "{}", r.text());
    }
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        saved,
        "state file untouched"
    );
    let after = get(&admin(&app, "/tokens/main")).await.json();
    assert_eq!(after["state"], "fresh", "{after}");
    assert_eq!(after["generation"], status["generation"]);
    assert_eq!(get(&url(&app, "/v1/after")).await.status, 200);
    // The refresh token kept is the working one: the next refresh is not a reuse.
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    assert_eq!(world.auth.rejected_calls.load(Ordering::SeqCst), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_that_fails_verification_is_refused_without_damage() {
    let world = World::new(Duration::from_secs(300)).await;
    let (signer, jwk) = es256_signer("k1", "https://idp.test", "api");
    world.auth.set_jwt_signer(Some(signer));
    let jwks = Jwks::serve(vec![jwk]).await;
    let extra = format!(
        "jwks_url = \"{}/jwks\"\nissuer = \"https://idp.test\"\naudience = \"api\"",
        jwks.server.url
    );
    let app = start(&world.config_rt("", &extra)).await;
    assert_eq!(get(&url(&app, "/v1/before")).await.status, 200);
    // Signed by someone else's key, with a refresh token of theirs.
    let (forger, _) = es256_signer("k1", "https://idp.test", "api");
    let forged = jsonwebtoken::encode(
        &{
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            h.kid = Some("k1".into());
            h
        },
        &serde_json::json!({"iss": "https://idp.test", "aud": "api", "exp": 4_000_000_000u64}),
        &forger.key,
    )
    .unwrap();
    let body = serde_json::json!({"access_token": forged, "refresh_token": "forged-rt"});
    let r = send(
        Method::PUT,
        &admin(&app, "/tokens/main"),
        &[],
        body.to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("verification"), "{}", r.text());
    assert_eq!(
        get(&admin(&app, "/tokens/main")).await.json()["state"],
        "fresh"
    );
    assert_eq!(get(&url(&app, "/v1/after")).await.status, 200);
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(
        r.status,
        200,
        "the refresh token was not replaced: {}",
        r.text()
    );
    app.stop().await;
}
