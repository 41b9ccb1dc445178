//! DPoP (RFC 9449) through the real proxy: the mock provider requires a proof on every
//! token request and binds what it issues to the proof's key; the mock API accepts a bound
//! token only as `Authorization: DPoP <token>` with a fresh proof by that key for that very
//! request (htm, htu, iat, unique jti, ath), and both can demand nonces.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Method;
use support::*;
use token_proxy::config::Config;

fn refusals(world: &World) -> Vec<String> {
    world.api.dpop_refusals.lock().unwrap().clone()
}

fn client_credentials(world: &World, extra: &str) -> String {
    world.config("", &format!("dpop = true\n{extra}")).replace(
        "grant = \"refresh_token\"",
        "grant = \"client_credentials\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_tokens_are_refreshed_and_proved_on_every_request() {
    let world = World::new(Duration::from_secs(2)).await;
    world.auth.require_dpop(None);
    let app = start(&world.config_rt("", "dpop = true\nrefresh_before = \"500ms\"")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut served = 0;
    while std::time::Instant::now() < deadline {
        let r = send(
            Method::POST,
            &url(&app, "/v1/items?page=2"),
            &[],
            "{\"a\":1}",
        )
        .await;
        assert_eq!(r.status, 200, "{} {:?}", r.text(), refusals(&world));
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        world.auth.refresh_calls.load(Ordering::SeqCst) >= 2,
        "expiry crossed"
    );
    let seen = world.api.seen();
    let proofs: std::collections::HashSet<_> =
        seen.iter().map(|s| s.headers["dpop"].clone()).collect();
    assert_eq!(proofs.len(), seen.len(), "a new proof for every request");
    assert!(seen.len() >= served);
    for s in &seen {
        let auth = s.headers["authorization"].to_str().unwrap();
        assert!(auth.starts_with("DPoP "), "{auth}");
    }
    for r in world.auth.requests() {
        assert!(
            r.headers.contains_key("dpop"),
            "a proof with every token request"
        );
    }
    // A 401 for the token (revoked): refreshed, replayed with the new token and a new proof.
    world.auth.revoke_all_access();
    let r = send(Method::PUT, &url(&app, "/v1/items/1"), &[], "body").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(refusals(&world).is_empty(), "{:?}", refusals(&world));
    let status = get(&admin(&app, "/tokens")).await.json();
    assert_eq!(status["main"]["state"], "fresh");
    // /tokens shows the key's public thumbprint, the one the provider bound the token to.
    let latest = world.api.seen().last().unwrap().headers["authorization"]
        .to_str()
        .unwrap()["DPoP ".len()..]
        .to_string();
    assert_eq!(
        status["main"]["dpop_jkt"].as_str(),
        world.auth.bound_key(&latest).as_deref()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_challenges_from_both_servers_are_answered_once_and_remembered() {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.require_dpop(Some("as-nonce-1"));
    *world.api.dpop_nonce.lock().unwrap() = Some("rs-nonce-1".into());
    let app = start(&client_credentials(&world, "")).await;

    let r = send(Method::POST, &url(&app, "/v1/orders"), &[], "{\"n\":1}").await;
    assert_eq!(r.status, 200, "{} {:?}", r.text(), refusals(&world));
    assert_eq!(r.json()["body_len"], 7, "the body survived the nonce retry");
    assert_eq!(world.auth.dpop_nonce_challenges.load(Ordering::SeqCst), 1);
    assert_eq!(
        world.auth.client_credentials_calls.load(Ordering::SeqCst),
        1
    );
    assert_eq!(world.api.dpop_nonce_challenges.load(Ordering::SeqCst), 1);

    // Remembered: no more challenges.
    for _ in 0..3 {
        assert_eq!(get(&url(&app, "/v1/orders")).await.status, 200);
    }
    assert_eq!(world.api.dpop_nonce_challenges.load(Ordering::SeqCst), 1);

    // A new nonce on a success is used next time, and the success is not replayed.
    *world.api.dpop_next_nonce.lock().unwrap() = Some("rs-nonce-2".into());
    let ok_before = world.api.ok.load(Ordering::SeqCst);
    assert_eq!(get(&url(&app, "/v1/orders")).await.status, 200);
    assert_eq!(
        world.api.ok.load(Ordering::SeqCst),
        ok_before + 1,
        "not replayed"
    );
    assert_eq!(get(&url(&app, "/v1/orders")).await.status, 200);
    assert_eq!(world.api.dpop_nonce_challenges.load(Ordering::SeqCst), 1);

    // A server that keeps refusing the nonce gets exactly one retry per request.
    *world.api.dpop_nonce.lock().unwrap() = Some("rs-nonce-3".into());
    let before = world.api.seen().len();
    let r = get(&url(&app, "/v1/orders")).await;
    assert_eq!(r.status, 200, "the new nonce is taken from the challenge");
    assert_eq!(world.api.seen().len(), before + 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_answered_to_a_dpop_request_is_not_used() {
    // This provider ignores DPoP (as one without support does) and issues bearer tokens.
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&client_credentials(&world, "")).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "token_unavailable");
    assert!(world.api.seen().is_empty(), "nothing reached the API");
    let status = get(&admin(&app, "/tokens")).await.json();
    let last = status["main"]["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("DPoP") && last.contains("Bearer"), "{last}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_file_is_generated_once_kept_across_restarts_and_a_new_key_drops_tokens() {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.require_dpop(None);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys/dpop.pem");
    let state_file = dir.path().join("state/main.json");
    let toml = client_credentials(
        &world,
        &format!(
            "dpop_key_file = \"{}\"\nstate_file = \"{}\"",
            key_file.display(),
            state_file.display()
        ),
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    app.stop().await;
    use std::os::unix::fs::PermissionsExt;
    let pem = std::fs::read_to_string(&key_file).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Restart: same key, so the saved token is used as it is.
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    assert_eq!(
        world.auth.client_credentials_calls.load(Ordering::SeqCst),
        1
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        pem,
        "never rewritten"
    );
    app.stop().await;

    // Replaced key: the saved token is bound to the old one; a new token is fetched.
    let new_key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&key_file, new_key.serialize_pem()).unwrap();
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    assert_eq!(
        world.auth.client_credentials_calls.load(Ordering::SeqCst),
        2
    );
    assert!(refusals(&world).is_empty(), "{:?}", refusals(&world));
    app.stop().await;

    // No key file: a key per start, so saved tokens are fetched anew.
    let ephemeral = toml.replace(&format!("dpop_key_file = \"{}\"\n", key_file.display()), "");
    let app = start(&ephemeral).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    assert_eq!(
        world.auth.client_credentials_calls.load(Ordering::SeqCst),
        3
    );
    app.stop().await;
    assert!(refusals(&world).is_empty(), "{:?}", refusals(&world));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_key_file_is_picked_up_by_a_reload() {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.require_dpop(None);
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(
        dir.path(),
        "dpop.pem",
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let toml = client_credentials(
        &world,
        &format!("dpop_key_file = \"{}\"", key_file.display()),
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    let first = world.api.seen()[0].headers["authorization"].clone();
    std::fs::write(
        &key_file,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let config = Config::parse(&toml, &|_| None).unwrap();
    let report = app.reload(config).await.unwrap();
    assert!(report.contains("replaced=[\"main\"]"), "{report}");
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    let last = world.api.seen().last().unwrap().headers["authorization"].clone();
    assert_ne!(first, last, "a token bound to the new key");
    assert_eq!(
        world.auth.client_credentials_calls.load(Ordering::SeqCst),
        2
    );
    assert!(refusals(&world).is_empty(), "{:?}", refusals(&world));
    app.stop().await;
}

#[test]
fn bad_dpop_settings_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let wrong = write_file(dir.path(), "p384.pem", &p384.serialize_pem());
    let unreadable = dir.path().join("missing-dir-is-fine/but/this/is/a/dir");
    std::fs::create_dir_all(&unreadable).unwrap();
    let base = |extra: &str| {
        format!(
            r#"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:9"
credential = "main"

[credentials.main]
grant = "client_credentials"
token_url = "http://127.0.0.1:9/token"
client_id = "cid"
{extra}
"#
        )
    };
    let error = |extra: &str| {
        Config::parse(&base(extra), &|_| None)
            .unwrap_err()
            .to_string()
    };
    let e = error(&format!(
        "dpop = true\ndpop_key_file = \"{}\"",
        wrong.display()
    ));
    assert!(
        e.contains("credentials.main.dpop_key_file") && e.contains("P-256"),
        "{e}"
    );
    let e = error(&format!(
        "dpop = true\ndpop_key_file = \"{}\"",
        unreadable.display()
    ));
    assert!(
        e.contains("credentials.main.dpop_key_file") && e.contains("cannot read"),
        "{e}"
    );
    let e = error("dpop = true\nheader_prefix = \"Token \"");
    assert!(e.contains("credentials.main.header_prefix"), "{e}");
    let e = error("dpop_key_file = \"/tmp/x.pem\"");
    assert!(
        e.contains("credentials.main.dpop_key_file") && e.contains("dpop = true"),
        "{e}"
    );
    let e = Config::parse(
        &base("").replace(
            "grant = \"client_credentials\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"cid\"",
            "grant = \"static\"\naccess_token = \"t\"\ndpop = true",
        ),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("credentials.main.dpop"), "{e}");
    // `check` names the key and where it comes from; nothing is written by checking.
    let key_file = dir.path().join("new/dpop.pem");
    let config = Config::parse(
        &base(&format!(
            "dpop = true\ndpop_key_file = \"{}\"",
            key_file.display()
        )),
        &|_| None,
    )
    .unwrap();
    assert!(config.credentials["main"].dpop.is_some());
    assert!(!key_file.exists());
}
