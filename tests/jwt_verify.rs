//! JWT verification against a JWKS as certified providers use it: RSA (RS256, PS256) and EC
//! (ES256) keys under the default `algorithms`, JWKS documents that also carry encryption
//! keys and key types we cannot use, and recovery from a provider issuing bad tokens.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use support::*;

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "my-api";

/// Keys a real provider publishes beside its signing key: an encryption key and a key
/// type/curve this verifier does not support. Neither may break verification.
fn noise() -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({"kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "kid": "enc-1",
                           "n": include_str!("support/rsa_test_key.n").trim(), "e": "AQAB"}),
        serde_json::json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
        serde_json::json!({"kty": "weird", "kid": "w"}),
    ]
}

async fn world_signing_with(
    signer: token_proxy::testkit::JwtSigner,
    jwk: serde_json::Value,
) -> (World, Jwks) {
    let world = World::new(Duration::from_secs(300)).await;
    world.auth.set_jwt_signer(Some(signer));
    let mut keys = noise();
    keys.push(jwk);
    let jwks = Jwks::serve(keys).await;
    (world, jwks)
}

fn verify_keys(jwks: &Jwks, algorithms: Option<&str>) -> String {
    format!(
        "jwks_url = \"{}/jwks\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n{}",
        jwks.server.url,
        algorithms
            .map(|a| format!("algorithms = {a}\n"))
            .unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_algorithms_accept_rs256_ps256_and_es256_tokens() {
    let cases = [
        (
            "RS256",
            rsa_signer("rsa-1", Algorithm::RS256, ISSUER, AUDIENCE),
        ),
        (
            "PS256",
            rsa_signer("rsa-1", Algorithm::PS256, ISSUER, AUDIENCE),
        ),
        ("ES256", es256_signer("ec-1", ISSUER, AUDIENCE)),
    ];
    for (name, (signer, jwk)) in cases {
        let (world, jwks) = world_signing_with(signer, jwk).await;
        let app = start(&world.config_rt("", &verify_keys(&jwks, None))).await;
        let r = get(&url(&app, "/v1/x")).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(world.api.seen().len(), 1, "{name}: reached the upstream");
        let status = get(&admin(&app, "/tokens/main")).await.json();
        assert_eq!(status["state"], "fresh", "{name}: {status}");
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_mixing_rsa_and_ec_accepts_both_families() {
    for (signer, jwk) in [
        rsa_signer("rsa-1", Algorithm::RS256, ISSUER, AUDIENCE),
        es256_signer("ec-1", ISSUER, AUDIENCE),
    ] {
        let (world, jwks) = world_signing_with(signer, jwk).await;
        let keys = verify_keys(&jwks, Some(r#"["ES256", "RS256"]"#));
        let app = start(&world.config_rt("", &keys)).await;
        let r = get(&url(&app, "/v1/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_algorithm_outside_the_list_or_the_key_family_is_refused() {
    // PS256 token, but the operator allows RS256 only.
    let (signer, jwk) = rsa_signer("rsa-1", Algorithm::PS256, ISSUER, AUDIENCE);
    let (world, jwks) = world_signing_with(signer, jwk).await;
    let app = start(&world.config_rt("", &verify_keys(&jwks, Some(r#"["RS256"]"#)))).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 503);
    let last = get(&admin(&app, "/tokens/main")).await.json()["last_error"].to_string();
    assert!(
        last.contains("PS256") && last.contains("algorithms"),
        "{last}"
    );
    app.stop().await;

    // An RS256 token whose kid names an EC key: the key does not fit the algorithm.
    let (signer, _) = rsa_signer("shared-kid", Algorithm::RS256, ISSUER, AUDIENCE);
    let (_, ec_jwk) = es256_signer("shared-kid", ISSUER, AUDIENCE);
    let (world, jwks) = world_signing_with(signer, ec_jwk).await;
    let app = start(&world.config_rt("", &verify_keys(&jwks, None))).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 503);
    let last = get(&admin(&app, "/tokens/main")).await.json()["last_error"].to_string();
    assert!(last.contains("no RS256 key"), "{last}");
    assert_eq!(world.api.seen().len(), 0, "nothing reached the upstream");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_from_the_provider_back_off_and_recover_by_themselves() {
    let (good, jwk) = es256_signer("ec-1", ISSUER, AUDIENCE);
    let (wrong_audience, _) = es256_signer("ec-1", ISSUER, "someone-else");
    // Same key, wrong audience: a provider mid bad deploy.
    let wrong_audience = token_proxy::testkit::JwtSigner {
        key: good.key.clone(),
        ..wrong_audience
    };
    let (world, jwks) = world_signing_with(wrong_audience, jwk).await;
    let app = start(&world.config_rt("", &verify_keys(&jwks, None))).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    let status = get(&admin(&app, "/tokens/main")).await.json();
    assert_ne!(
        status["state"], "needs_reauth",
        "the refresh token still works: {status}"
    );
    assert!(
        status["last_error"].to_string().contains("Audience"),
        "{status}"
    );
    // The refresher keeps trying with backoff (each attempt fetches anew)...
    wait_for("a second attempt", Duration::from_secs(20), || async {
        world.auth.refresh_calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(world.api.seen().len(), 0, "a bad token is never attached");
    // ...and once the provider is fixed, recovers without anyone doing anything.
    world.auth.set_jwt_signer(Some(good));
    wait_for("recovery", Duration::from_secs(40), || async {
        get(&url(&app, "/v1/x")).await.status == 200
    })
    .await;
    assert_eq!(world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    app.stop().await;
}
