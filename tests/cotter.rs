//! Cotter's wire format end to end: JSON refresh body, API_KEY_ID header, rotating refresh
//! tokens, `{"msg": ...}` errors, ES256 JWT access tokens verified against a JWKS.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use token_proxy::testkit::RefreshMode;

const ISSUER: &str = "https://www.cotter.app";
const API_KEY_ID: &str = "0f9a1c2e-api-key-id";

struct Cotter {
    world: World,
    jwks: Jwks,
    dir: tempfile::TempDir,
}

async fn cotter(lifetime: Duration) -> Cotter {
    let auth = MockAuth::with_style(lifetime, ErrorStyle::Cotter);
    let (signer, jwk) = es256_signer("cotter-key-1", ISSUER, API_KEY_ID);
    auth.set_jwt_signer(Some(signer));
    let world = World::with_auth(auth).await;
    let jwks = Jwks::serve(vec![jwk]).await;
    Cotter {
        world,
        jwks,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Cotter {
    /// Config as the README's Cotter example, starting from a cottertoken.json file.
    fn config(&self, extra: &str) -> String {
        let login = self.world.auth.login();
        let tokens = write_file(self.dir.path(), "cottertoken.json", &login.to_string());
        let cred = format!(
            r#"encoding = "json"
client_auth = "none"
headers = {{ API_KEY_ID = "{API_KEY_ID}" }}
initial_tokens_file = "{tokens}"
state_file = "{state}"
jwks_url = "{jwks}/api/v0/token/jwks"
issuer = "{ISSUER}"
audience = "{API_KEY_ID}"
algorithms = ["ES256"]
{extra}"#,
            tokens = tokens.display(),
            state = self.dir.path().join("cotter-state.json").display(),
            jwks = self.jwks.server.url,
        );
        self.world
            .config("", &cred)
            .replace(
                "client_id = \"cid\"\nclient_secret = \"client-secret-value-123\"\n",
                "",
            )
            .replace("/oauth/token", &format!("/api/v0/token/{API_KEY_ID}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cotter_refresh_wire_format_and_rotation() {
    let c = cotter(Duration::from_secs(2)).await;
    let app = start(&c.config("")).await;
    for i in 0..12 {
        let r = get(&url(&app, &format!("/v1/cotter/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let requests = c.world.auth.requests();
    assert!(requests.len() >= 2, "refreshed several times");
    let mut presented = Vec::new();
    for req in &requests {
        assert_eq!(req.content_type, "application/json");
        let keys: Vec<&String> = req.params.keys().collect();
        assert_eq!(
            keys.len(),
            2,
            "exactly grant_type and refresh_token: {keys:?}"
        );
        assert_eq!(req.params["grant_type"], "refresh_token");
        assert_eq!(
            req.headers["api_key_id"], API_KEY_ID,
            "API_KEY_ID sent with its underscores"
        );
        assert!(
            req.headers.get("authorization").is_none(),
            "no client auth for Cotter"
        );
        presented.push(req.params["refresh_token"].clone());
    }
    presented.dedup();
    assert_eq!(
        presented.len(),
        requests.len(),
        "each refresh presented the newly rotated token"
    );
    assert_eq!(c.world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    assert_eq!(c.world.api.unauthorized.load(Ordering::SeqCst), 0);
    assert!(
        c.jwks.hits.load(Ordering::SeqCst) >= 1,
        "tokens were verified against the JWKS"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_or_empty_refresh_token_in_a_response_keeps_the_old_one() {
    for mode in [RefreshMode::Omit, RefreshMode::Empty] {
        let c = cotter(Duration::from_secs(2)).await;
        c.world.auth.set_refresh_mode(mode);
        let app = start(&c.config("")).await;
        let first_rt = {
            wait_for("a first refresh", Duration::from_secs(10), || async {
                !c.world.auth.requests().is_empty()
            })
            .await;
            c.world.auth.requests()[0].params["refresh_token"].clone()
        };
        wait_for("three refreshes", Duration::from_secs(20), || async {
            c.world.auth.refresh_calls.load(Ordering::SeqCst) >= 3
        })
        .await;
        assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
        for req in c.world.auth.requests() {
            assert_eq!(
                req.params["refresh_token"], first_rt,
                "{mode:?}: the old refresh token is kept"
            );
        }
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_never_attached() {
    let c = cotter(Duration::from_secs(300)).await;
    let (wrong, jwk) = es256_signer("cotter-key-1", ISSUER, "some-other-api-key");
    c.jwks.set_keys(vec![jwk]);
    c.world.auth.set_jwt_signer(Some(wrong));
    let app = start(&c.config("")).await;
    let r = get(&url(&app, "/v1/x")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "token_unavailable");
    let tokens = get(&admin(&app, "/tokens")).await.json();
    let last = tokens["main"]["last_error"].as_str().unwrap();
    assert!(
        last.contains("verification") && last.contains("Audience"),
        "{last}"
    );
    // The refresh token still works: retried with backoff, not parked for a human.
    assert_eq!(tokens["main"]["state"], "expired");
    assert_eq!(c.world.api.seen().len(), 0, "nothing reached the upstream");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_signature_is_rejected() {
    let c = cotter(Duration::from_secs(300)).await;
    // Same kid and claims, different private key: the JWKS still has the real public key.
    let (forger, _) = es256_signer("cotter-key-1", ISSUER, API_KEY_ID);
    c.world.auth.set_jwt_signer(Some(forger));
    let app = start(&c.config("")).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 503);
    let last = get(&admin(&app, "/tokens")).await.json()["main"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(last.contains("InvalidSignature"), "{last}");
    assert_eq!(c.world.api.seen().len(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_is_picked_up_by_refetching_the_jwks() {
    let c = cotter(Duration::from_secs(300)).await;
    let app = start(&c.config("")).await;
    assert_eq!(get(&url(&app, "/v1/before")).await.status, 200);
    assert_eq!(c.jwks.hits.load(Ordering::SeqCst), 1);

    // The IdP rotates to a new key (published alongside the old one) and signs with it.
    let (new_signer, new_jwk) = es256_signer("cotter-key-2", ISSUER, API_KEY_ID);
    let old_jwk = c.jwks.doc.lock().unwrap()["keys"][0].clone();
    c.jwks.set_keys(vec![old_jwk, new_jwk]);
    c.world.auth.set_jwt_signer(Some(new_signer));
    c.world.auth.revoke_all_access();
    // The unknown kid is retried (backoff) until the refetch window opens, then accepted.
    wait_for(
        "a request with a token signed by the new key",
        Duration::from_secs(40),
        || async { get(&url(&app, "/v1/after")).await.status == 200 },
    )
    .await;
    let hits = c.jwks.hits.load(Ordering::SeqCst);
    assert_eq!(hits, 2, "one refetch for the new kid, not one per attempt");
    // The token fetched with the new kid was held and verified again, not refetched:
    // one refresh at start, one after the revocation.
    assert_eq!(c.world.auth.refresh_calls.load(Ordering::SeqCst), 2);
    app.stop().await;
}
