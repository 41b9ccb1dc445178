//! Interoperability with a real, OpenID Certified provider: panva's oidc-provider
//! (tests/interop/oidc-provider, version pinned by its package-lock.json), driving the real
//! binary. private_key_jwt with RS256 and ES256 keys; DPoP-bound client_credentials and
//! refresh_token flows with nonce challenges from both the token endpoint and a protected
//! resource that checks every proof and the token's `cnf.jkt`; refresh-token rotation.
//!
//! Needs Node and `npm ci` in that directory (scripts/test does both). Without them the
//! tests print NOT RUN and pass, unless TOKEN_PROXY_INTEROP=1 (as scripts/test sets): then
//! a missing provider fails them.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use support::*;

/// The provider (and its resource server) running under Node; killed when dropped.
struct Op {
    child: Child,
    url: String,
}

impl Drop for Op {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Op {
    /// Start it, or `None` (NOT RUN) when Node or the pinned packages are missing.
    fn start(name: &str, keys: &Keys, env: &[(&str, &str)]) -> Option<Op> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/oidc-provider");
        let required = std::env::var("TOKEN_PROXY_INTEROP").as_deref() == Ok("1");
        let node_ok = Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !node_ok || !dir.join("node_modules/oidc-provider").exists() {
            assert!(
                !required,
                "TOKEN_PROXY_INTEROP=1 but node or {}/node_modules is missing (npm ci)",
                dir.display()
            );
            eprintln!(
                "NOT RUN {name}: needs node and `npm ci` in {}",
                dir.display()
            );
            return None;
        }
        let port = free_port();
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(&dir)
            .env("PORT", port.to_string())
            .env("RS256_KEY", &keys.rsa)
            .env("ES256_KEY", &keys.ec)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        let op = Op {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        rx.recv_timeout(Duration::from_secs(30))
            .expect("oidc-provider did not start");
        Some(op)
    }

    async fn stats(&self) -> serde_json::Value {
        get(&format!("{}/test/stats", self.url)).await.json()
    }
}

/// The private_key_jwt clients' keys, and the proxy's DPoP key.
struct Keys {
    _dir: tempfile::TempDir,
    rsa: PathBuf,
    ec: PathBuf,
    dpop: PathBuf,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let rsa = write_file(
        dir.path(),
        "rsa.pem",
        include_str!("support/rsa_test_key.pem"),
    );
    let ec = write_file(
        dir.path(),
        "ec.pem",
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let dpop = dir.path().join("dpop.pem");
    Keys {
        _dir: dir,
        rsa,
        ec,
        dpop,
    }
}

fn config(op: &Op, credential: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[routes]]
name = "api"
prefix = "/api"
upstream = "{url}"
credential = "main"

[credentials.main]
token_url = "{url}/token"
client_auth = "private_key_jwt"
{credential}
"#,
        url = op.url
    )
}

fn start_binary(keys: &Keys, toml: &str) -> Binary {
    let path = write_file(keys.rsa.parent().unwrap(), "proxy.toml", toml);
    Binary::start(&path, &[("TOKEN_PROXY_LOG", "info")])
}

/// GETs through the proxy for `run`; every one must be served. Returns the bodies.
async fn serve_for(proxy: &Binary, run: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + run;
    let mut bodies = Vec::new();
    while Instant::now() < deadline {
        let r = send(Method::GET, &proxy.url("/api/items?page=1"), &[], "").await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.logs());
        bodies.push(r.json());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_with_rs256_and_es256_keys() {
    let keys = keys();
    let Some(op) = Op::start("private_key_jwt", &keys, &[]) else {
        return;
    };
    for (client, key) in [("rs256-client", &keys.rsa), ("es256-client", &keys.ec)] {
        let toml = config(
            &op,
            &format!(
                "grant = \"client_credentials\"\nclient_id = \"{client}\"\nsigning_key_file = \"{}\"\nscope = \"api\"",
                key.display()
            ),
        );
        let proxy = start_binary(&keys, &toml);
        let r = get(&proxy.url("/api/hello")).await;
        assert_eq!(r.status, 200, "{}\n{}", r.text(), proxy.logs());
        assert_eq!(r.json()["client_id"], client);
        assert_eq!(r.json()["bound"], false, "a bearer token without dpop");
        // A forced refresh is a second assertion, with a new jti (the provider refuses replays).
        let forced = send(
            Method::POST,
            &proxy.admin_url("/tokens/main/refresh"),
            &[],
            "",
        )
        .await;
        assert_eq!(forced.status, 200, "{}", forced.text());
    }
    let stats = op.stats().await;
    assert_eq!(stats["grants"]["client_credentials"], 4, "{stats}");
    assert_eq!(stats["errors"], serde_json::json!([]), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_client_credentials_with_nonces_from_the_token_endpoint_and_the_resource() {
    let keys = keys();
    let env = [("ACCESS_TTL", "2"), ("AS_NONCE", "1"), ("RS_NONCE", "1")];
    let Some(op) = Op::start("dpop client_credentials", &keys, &env) else {
        return;
    };
    let toml = config(
        &op,
        &format!(
            "grant = \"client_credentials\"\nclient_id = \"es256-dpop-client\"\nsigning_key_file = \"{}\"\nscope = \"api\"\ndpop = true\ndpop_key_file = \"{}\"\nrefresh_before = \"500ms\"",
            keys.ec.display(),
            keys.dpop.display()
        ),
    );
    let proxy = start_binary(&keys, &toml);
    let bodies = serve_for(&proxy, Duration::from_secs(6)).await;
    // A rotated resource nonce is met by one challenge and one retry.
    get(&format!("{}/test/rotate-rs-nonce", op.url)).await;
    let r = get(&proxy.url("/api/after-rotation")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    assert!(bodies.iter().all(|b| b["bound"] == true), "{bodies:?}");
    let jkts: std::collections::HashSet<_> = bodies.iter().map(|b| b["jkt"].clone()).collect();
    assert_eq!(
        jkts.len(),
        1,
        "every token bound to the one key in dpop_key_file"
    );
    let stats = op.stats().await;
    let grants = stats["grants"]["client_credentials"].as_u64().unwrap();
    assert!(grants >= 3, "2 s tokens over 6 s: {stats}");
    assert_eq!(
        stats["rsNonceChallenges"], 2,
        "first request and after rotation: {stats}"
    );
    // Token endpoint nonce challenges surface as grant errors; every other error is a defect.
    let errors: Vec<_> = stats["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e.as_str().unwrap_or_default().starts_with("use_dpop_nonce"))
        .collect();
    assert!(errors.is_empty(), "{stats}");
    assert!(
        !proxy.logs().contains("eyJ"),
        "no JWT (token or proof) in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_refresh_tokens_rotate_without_reuse() {
    let keys = keys();
    let env = [("ACCESS_TTL", "2"), ("AS_NONCE", "1")];
    let Some(op) = Op::start("dpop refresh_token", &keys, &env) else {
        return;
    };
    let minted = send(
        Method::POST,
        &format!("{}/test/refresh-token?client_id=es256-dpop-client", op.url),
        &[],
        "",
    )
    .await
    .json();
    let rt = minted["refresh_token"].as_str().unwrap();
    let toml = config(
        &op,
        &format!(
            "grant = \"refresh_token\"\nrefresh_token = \"{rt}\"\nclient_id = \"es256-dpop-client\"\nsigning_key_file = \"{}\"\ndpop = true\nrefresh_before = \"500ms\"",
            keys.ec.display(),
        ),
    );
    let proxy = start_binary(&keys, &toml);
    let bodies = serve_for(&proxy, Duration::from_secs(7)).await;
    assert!(
        bodies
            .iter()
            .all(|b| b["bound"] == true && b["sub"] == "user-1"),
        "{bodies:?}"
    );
    let stats = op.stats().await;
    let refreshes = stats["grants"]["refresh_token"].as_u64().unwrap();
    assert!(refreshes >= 3, "2 s tokens over 7 s: {stats}");
    assert_eq!(
        stats["rotations"].as_u64().unwrap(),
        refreshes,
        "every refresh rotated: {stats}"
    );
    assert_eq!(
        stats["reuse"], 0,
        "a rotated refresh token is never presented again: {stats}"
    );
    // With 2 s tokens a refresh is in flight a good part of the time: wait it out.
    let mut status = get(&proxy.admin_url("/tokens")).await.json();
    for _ in 0..50 {
        if status["main"]["state"] != "refreshing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = get(&proxy.admin_url("/tokens")).await.json();
    }
    assert_eq!(status["main"]["state"], "fresh", "{status}");
    assert!(
        !proxy.logs().contains(rt),
        "the refresh token never reaches the logs"
    );
}
