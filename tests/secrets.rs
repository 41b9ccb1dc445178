//! No secret (access token, refresh token, client secret) appears in any log line at any
//! level, in either log format, in error bodies, `/tokens` or `/metrics`.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

async fn exercise(format: &str) {
    let world = World::new(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let client_secret = "cs-very-secret-7f3a9";
    let secret_file = write_file(dir.path(), "client_secret", client_secret);
    let rt = world.auth.new_refresh_token();
    let cred = format!(
        "refresh_token = \"${{TP_RT}}\"\nstate_file = \"{}\"\nclient_secret_file = \"{}\"",
        dir.path().join("state.json").display(),
        secret_file.display()
    );
    let toml = world
        .config("", &cred)
        .replace("client_secret = \"client-secret-value-123\"\n", "");
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let bin = Binary::start(
        &cfg,
        &[
            ("TOKEN_PROXY_LOG", "trace"),
            ("TOKEN_PROXY_LOG_FORMAT", format),
            ("TP_RT", &rt),
        ],
    );

    let mut bodies = Vec::new();
    for i in 0..5 {
        bodies.push(get(&bin.url(&format!("/s/{i}?token=none"))).await.text());
        tokio::time::sleep(Duration::from_millis(400)).await; // crosses refreshes
    }
    world.auth.revoke_all_access();
    bodies.push(get(&bin.url("/after-revoke")).await.text());
    bodies.push(
        send(
            Method::POST,
            &bin.admin_url("/tokens/main/refresh"),
            &[],
            "",
        )
        .await
        .text(),
    );
    world.auth.fail_with(Some(StatusCode::BAD_REQUEST));
    bodies.push(
        send(
            Method::POST,
            &bin.admin_url("/tokens/main/refresh"),
            &[],
            "",
        )
        .await
        .text(),
    );
    world.auth.fail_with(None);
    let login = world.auth.login();
    bodies.push(
        send(
            Method::PUT,
            &bin.admin_url("/tokens/main"),
            &[],
            login.to_string(),
        )
        .await
        .text(),
    );
    bodies.push(
        send(
            Method::PUT,
            &bin.admin_url("/tokens/main"),
            &[],
            "{\"access_token\": 5}",
        )
        .await
        .text(),
    );
    bodies.push(get(&bin.url("/after-install")).await.text());
    bodies.push(get(&bin.admin_url("/tokens")).await.text());
    bodies.push(get(&bin.admin_url("/metrics")).await.text());
    bodies.push(get(&bin.admin_url("/readyz")).await.text());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut secrets = vec![client_secret.to_string(), rt.clone()];
    secrets.push(login["refresh_token"].as_str().unwrap().to_string());
    secrets.push(login["access_token"].as_str().unwrap().to_string());
    for seen in world.api.seen() {
        if let Some(v) = seen.headers.get("authorization") {
            secrets.push(
                v.to_str()
                    .unwrap()
                    .trim_start_matches("Bearer ")
                    .to_string(),
            );
        }
    }
    for req in world.auth.requests() {
        if let Some(rt) = req.params.get("refresh_token") {
            secrets.push(rt.clone());
        }
    }
    assert!(secrets.len() > 8, "the test saw tokens to look for");
    let logs = bin.logs();
    assert!(
        logs.contains("token refreshed"),
        "logs were captured:\n{logs}"
    );
    for secret in &secrets {
        // The opaque part only: a refresh token's "<family>:" prefix is not secret.
        let needle = secret.rsplit([':', '.']).next().unwrap();
        assert!(needle.len() >= 16, "{secret}");
        assert!(
            !logs.contains(needle),
            "a secret reached the logs ({format})"
        );
        for b in &bodies {
            assert!(!b.contains(needle), "a secret reached a response body: {b}");
        }
    }
    // The client secret also travels base64-encoded in Basic auth.
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("cid:{client_secret}"));
    assert!(!logs.contains(&basic));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_text_logs_or_responses() {
    exercise("text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_json_logs_or_responses() {
    exercise("json").await;
}
