//! The simple case without a file: one route and one credential from TOKEN_PROXY_* variables.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_only_config_runs_and_checks() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap(); // no proxy.toml here
    let secret = write_file(dir.path(), "client_secret", "env-client-secret-42");
    let rt = world.auth.new_refresh_token();
    let token_url = format!("{}/oauth/token", world.idp.url);
    let env = [
        ("TOKEN_PROXY_LISTEN", "127.0.0.1:0"),
        ("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
        ("TOKEN_PROXY_UPSTREAM", world.api_server.url.as_str()),
        ("TOKEN_PROXY_TOKEN_URL", token_url.as_str()),
        ("TOKEN_PROXY_CLIENT_ID", "cid"),
        ("TOKEN_PROXY_CLIENT_SECRET_FILE", secret.to_str().unwrap()),
        ("TOKEN_PROXY_REFRESH_TOKEN", rt.as_str()),
        ("TOKEN_PROXY_SCOPE", "read"),
    ];

    let out = Command::new(env!("CARGO_BIN_EXE_token-proxy"))
        .arg("check")
        .current_dir(dir.path())
        .env_remove("TOKEN_PROXY_CONFIG")
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("TOKEN_PROXY_* environment variables"),
        "{stdout}"
    );
    assert!(
        stdout.contains("credential main: grant=refresh_token"),
        "{stdout}"
    );
    assert!(
        stdout.contains("client_secret=***") && stdout.contains("refresh_token=***"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("env-client-secret-42") && !stdout.contains(&rt),
        "secrets are masked"
    );

    let bin = Binary::start_in(None, Some(dir.path()), &env);
    let r = get(&bin.url("/v1/from-env")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(world.api.seen()[0].authorized);
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 1);
    assert_eq!(world.auth.requests()[0].params["scope"], "read");
}

#[test]
fn a_bad_environment_config_exits_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_token-proxy"))
        .current_dir(dir.path())
        .env_remove("TOKEN_PROXY_CONFIG")
        .env("TOKEN_PROXY_UPSTREAM", "https://api.example.com")
        .env("TOKEN_PROXY_REFRESH_TOKEN", "rt")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TOKEN_PROXY_TOKEN_URL"), "{stderr}");
}
