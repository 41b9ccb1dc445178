//! `client_auth = "private_key_jwt"` (RFC 7523): the proxy authenticates to the token
//! endpoint with a JWT signed by its private key instead of a shared secret. The mock
//! provider verifies each assertion (signature, iss = sub = client_id, aud, exp, a jti never
//! seen before) and refuses the call otherwise. Bad keys are config errors naming the key.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Method;
use jsonwebtoken::{Algorithm, DecodingKey};
use support::*;
use token_proxy::testkit::ClientKey;

fn rsa_public() -> DecodingKey {
    DecodingKey::from_rsa_components(include_str!("support/rsa_test_key.n").trim(), "AQAB").unwrap()
}

/// A fresh P-256 key: its PKCS#8 PEM (for the proxy) and public key (for the provider).
fn ec_key() -> (String, DecodingKey) {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let public = DecodingKey::from_ec_components(&b64(&raw[1..33]), &b64(&raw[33..65])).unwrap();
    (key.serialize_pem(), public)
}

fn credential(grant_lines: &str, key_file: &std::path::Path, extra: &str) -> String {
    format!(
        "{grant_lines}\nclient_auth = \"private_key_jwt\"\nsigning_key_file = \"{}\"\n{extra}",
        key_file.display()
    )
}

/// The `[credentials.main]` of `World::config` without its client_secret.
fn config_without_secret(world: &World, cred: &str) -> String {
    world
        .config("", cred)
        .replace("client_secret = \"client-secret-value-123\"\n", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_assertions_authenticate_client_credentials() {
    let world = World::new(Duration::from_secs(300)).await;
    let (pem, public) = ec_key();
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(dir.path(), "client.pem", &pem);
    let token_url = format!("{}/oauth/token", world.idp.url);
    world
        .auth
        .require_client_key(ClientKey::new(public, Algorithm::ES256, "cid", &token_url));
    let toml = config_without_secret(
        &world,
        &credential("", &key_file, "signing_key_id = \"key-2026-11\""),
    )
    .replace(
        "grant = \"refresh_token\"",
        "grant = \"client_credentials\"",
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    // A forced refresh makes a second assertion: a new jti (the provider refuses a replay).
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = world.auth.assertions.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["kid"], "key-2026-11");
    assert_eq!(seen[0]["alg"], "ES256");
    assert_eq!(seen[0]["claims"]["aud"], token_url.as_str());
    assert_ne!(seen[0]["claims"]["jti"], seen[1]["claims"]["jti"]);
    let exp = seen[0]["claims"]["exp"].as_u64().unwrap();
    let iat = seen[0]["claims"]["iat"].as_u64().unwrap();
    assert!(exp > iat && exp - iat <= 300, "short-lived: {iat}..{exp}");
    let request = &world.auth.requests()[0];
    assert!(!request.params.contains_key("client_secret"));
    assert!(
        request.headers.get("authorization").is_none(),
        "no Basic auth"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_ps256_assertions_refresh_with_a_custom_audience() {
    for alg in ["RS256", "PS256"] {
        let world = World::new(Duration::from_secs(300)).await;
        let dir = tempfile::tempdir().unwrap();
        let key_file = write_file(
            dir.path(),
            "client.pem",
            include_str!("support/rsa_test_key.pem"),
        );
        let algorithm = if alg == "RS256" {
            Algorithm::RS256
        } else {
            Algorithm::PS256
        };
        world.auth.require_client_key(ClientKey::new(
            rsa_public(),
            algorithm,
            "cid",
            "https://issuer.example",
        ));
        let rt = world.auth.new_refresh_token();
        let toml = config_without_secret(
            &world,
            &credential(
                &format!("refresh_token = \"{rt}\""),
                &key_file,
                &format!(
                    "signing_alg = \"{alg}\"\nassertion_audience = \"https://issuer.example\""
                ),
            ),
        );
        let app = start(&toml).await;
        let r = get(&url(&app, "/v1/x")).await;
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 1);
        assert_eq!(world.auth.assertions.lock().unwrap()[0]["alg"], alg);
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_provider_does_not_know_is_refused_and_never_echoed() {
    let world = World::new(Duration::from_secs(300)).await;
    let (pem, _) = ec_key();
    let (_, registered) = ec_key();
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(dir.path(), "client.pem", &pem);
    let token_url = format!("{}/oauth/token", world.idp.url);
    world.auth.require_client_key(ClientKey::new(
        registered,
        Algorithm::ES256,
        "cid",
        &token_url,
    ));
    world
        .auth
        .echo_requests_in_errors
        .store(true, Ordering::SeqCst);
    let toml = config_without_secret(&world, &credential("", &key_file, "")).replace(
        "grant = \"refresh_token\"",
        "grant = \"client_credentials\"",
    );
    let app = start(&toml).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("invalid_client"), "{}", r.text());
    let assertion = world.auth.requests()[0].params["client_assertion"].clone();
    let signature = assertion.rsplit('.').next().unwrap();
    let status = get(&admin(&app, "/tokens/main")).await.text();
    for text in [r.text(), status] {
        assert!(
            !text.contains(&signature[..16]),
            "the assertion leaked: {text}"
        );
    }
    app.stop().await;
}

#[test]
fn bad_keys_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = write_file(
        dir.path(),
        "rsa.pem",
        include_str!("support/rsa_test_key.pem"),
    );
    let garbage = write_file(dir.path(), "garbage.pem", "not a key\n");
    let base = |cred: &str| {
        format!(
            "[[routes]]\nprefix = \"/\"\nupstream = \"https://api.example.com\"\ncredential = \"main\"\n\
             [credentials.main]\ngrant = \"client_credentials\"\ntoken_url = \"https://auth.example.com/token\"\n\
             client_id = \"cid\"\n{cred}"
        )
    };
    let cases = [
        (
            "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/nonexistent/key.pem\""
                .to_string(),
            "credentials.main.signing_key_file: cannot read",
        ),
        (
            format!("signing_key_file = \"{}\"", garbage.display()),
            "credentials.main.signing_key_file",
        ),
        (
            format!(
                "signing_key_file = \"{}\"\nsigning_alg = \"ES256\"",
                rsa.display()
            ),
            "credentials.main.signing_alg: ES256 does not fit",
        ),
        (
            format!(
                "signing_key_file = \"{}\"\nsigning_alg = \"HS256\"",
                rsa.display()
            ),
            "credentials.main.signing_alg",
        ),
        (
            format!(
                "signing_key_file = \"{}\"\nclient_secret = \"s3cret\"",
                rsa.display()
            ),
            "credentials.main.client_secret: not used",
        ),
        (
            "client_auth = \"private_key_jwt\"".to_string(),
            "credentials.main.signing_key_file: required",
        ),
    ];
    for (cred, expected) in cases {
        let e = token_proxy::config::Config::parse(&base(&cred), &|_| None).unwrap_err();
        assert!(e.to_string().contains(expected), "{cred}: {e}");
    }
    // The RSA key with its default algorithm is fine.
    let ok = format!("signing_key_file = \"{}\"", rsa.display());
    token_proxy::config::Config::parse(&base(&ok), &|_| None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_picked_up_by_a_reload() {
    let world = World::new(Duration::from_secs(300)).await;
    let (old_pem, old_public) = ec_key();
    let (new_pem, new_public) = ec_key();
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(dir.path(), "client.pem", &old_pem);
    let token_url = format!("{}/oauth/token", world.idp.url);
    world.auth.require_client_key(ClientKey::new(
        old_public,
        Algorithm::ES256,
        "cid",
        &token_url,
    ));
    let toml = config_without_secret(&world, &credential("", &key_file, "")).replace(
        "grant = \"refresh_token\"",
        "grant = \"client_credentials\"",
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    // The key is rotated at the provider and in the file; a reload (the binary reloads on
    // the file's change) rebuilds the credential with the new key.
    world.auth.require_client_key(ClientKey::new(
        new_public,
        Algorithm::ES256,
        "cid",
        &token_url,
    ));
    write_file(dir.path(), "client.pem", &new_pem);
    let config = token_proxy::config::Config::parse(&toml, &|_| None).unwrap();
    assert!(config
        .watched_files()
        .iter()
        .any(|f| f.ends_with("client.pem")));
    let summary = app.reload(config).await.unwrap();
    assert!(summary.contains("replaced=[\"main\"]"), "{summary}");
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(r.status, 200, "signed with the new key: {}", r.text());
    app.stop().await;
}
