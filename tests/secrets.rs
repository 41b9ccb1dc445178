//! No secret (access token, refresh token, client secret) appears in any log line at any
//! level, in either log format, in error bodies, `/tokens` or `/metrics`.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

async fn exercise(format: &str) {
    let world = World::new(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    // Characters that URL encoding changes, so the encoded shapes differ from the raw one.
    let client_secret = "cs-very+secret/7f3a9&xq=z";
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
    // A careless token endpoint quoting the whole request back: the refresh token
    // URL-encoded, the client secret inside Basic base64, JSON-escaped copies, a fragment.
    world
        .auth
        .echo_requests_in_errors
        .store(true, std::sync::atomic::Ordering::SeqCst);
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
    bodies.push(get(&bin.url("/while-refused")).await.text());
    bodies.push(get(&bin.admin_url("/tokens")).await.text());
    let echoed = bodies
        .iter()
        .rev()
        .take(3)
        .any(|b| b.contains("could not process"));
    assert!(
        echoed,
        "the endpoint's echo reached last_error (scrubbed): {bodies:?}"
    );
    world.auth.fail_with(None);
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
    // The client secret also travels form-encoded inside Basic auth's base64 (RFC 6749
    // §2.3.1), and every secret may come back URL-encoded or JSON-escaped.
    use base64::Engine;
    let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("cid:{}", form(client_secret)));
    let mut shapes = vec![basic];
    for secret in &secrets {
        // The opaque part only: a refresh token's "<family>:" prefix is not secret.
        let needle = secret.rsplit([':', '.']).next().unwrap();
        assert!(needle.len() >= 16, "{secret}");
        shapes.push(needle.to_string());
        shapes.push(form(secret));
        shapes.push(
            serde_json::to_string(secret)
                .unwrap()
                .trim_matches('"')
                .to_string(),
        );
    }
    for shape in &shapes {
        // Not even a 10-character fragment of any shape of any secret.
        for fragment in shape.as_bytes().windows(10) {
            let fragment = std::str::from_utf8(fragment).unwrap();
            assert!(
                !logs.contains(fragment),
                "a fragment {fragment:?} of a secret reached the logs ({format})"
            );
            for b in &bodies {
                assert!(
                    !b.contains(fragment),
                    "a fragment {fragment:?} of a secret reached a response body: {b}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_text_logs_or_responses() {
    exercise("text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_json_logs_or_responses() {
    exercise("json").await;
}
