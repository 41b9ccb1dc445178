//! `grant = "static"`: inline or a file that is re-read when it changes (Kubernetes swaps
//! secret volumes and projected tokens through a `..data` symlink); its JWT `exp` drives
//! readiness.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

fn jwt(exp_in: i64, sub: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let key = jsonwebtoken::EncodingKey::from_secret(b"cluster-signing-key");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": now + exp_in, "iat": now}),
        &key,
    )
    .unwrap()
}

fn bearer(seen: &token_proxy::testkit::SeenRequest) -> String {
    seen.headers["authorization"]
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swapped_token_file_takes_effect() {
    let volume = tempfile::tempdir().unwrap();
    let first = jwt(3600, "first");
    publish(volume.path(), "2026_11_26_a", &first);
    let api = MockUpstream::new("api", None);
    let server = upstream_server(api.clone()).await;
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[[routes]]
prefix = "/"
upstream = "{}"
credential = "k8s"
[credentials.k8s]
grant = "static"
access_token_file = "{}"
"#,
        server.url,
        volume.path().join("token").display()
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/a")).await.status, 200);
    assert_eq!(bearer(&api.seen()[0]), first);

    let second = jwt(3600, "second");
    publish(volume.path(), "2026_11_26_b", &second);
    wait_for(
        "the swapped token to be attached",
        Duration::from_secs(15),
        || async {
            get(&url(&app, "/b")).await.status == 200
                && bearer(api.seen().last().unwrap()) == second
        },
    )
    .await;
    assert!(api
        .seen()
        .iter()
        .all(|s| bearer(s) == first || bearer(s) == second));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_jwt_exp_drives_readiness_and_is_never_attached_expired() {
    let volume = tempfile::tempdir().unwrap();
    publish(volume.path(), "v1", &jwt(3, "short"));
    let api = MockUpstream::new("api", None);
    let server = upstream_server(api.clone()).await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/\"\nupstream = \"{}\"\ncredential = \"k8s\"\n[credentials.k8s]\ngrant = \"static\"\naccess_token_file = \"{}\"\n",
        server.url,
        volume.path().join("token").display()
    );
    let app = start(&toml).await;
    wait_for(
        "ready with the short-lived token",
        Duration::from_secs(5),
        || async { get(&admin(&app, "/readyz")).await.status == 200 },
    )
    .await;
    assert_eq!(get(&url(&app, "/a")).await.status, 200);
    wait_for(
        "not ready once it expires",
        Duration::from_secs(10),
        || async { get(&admin(&app, "/readyz")).await.status == 503 },
    )
    .await;
    let r = get(&url(&app, "/b")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "token_unavailable");
    let before = api.seen().len();

    publish(volume.path(), "v2", &jwt(3600, "renewed"));
    wait_for(
        "ready again after the file is renewed",
        Duration::from_secs(40),
        || async { get(&admin(&app, "/readyz")).await.status == 200 },
    )
    .await;
    assert_eq!(get(&url(&app, "/c")).await.status, 200);
    assert_eq!(
        api.seen().len(),
        before + 1,
        "the expired token was never sent"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_static_token_with_a_custom_header() {
    let api = MockUpstream::new("api", None);
    let server = upstream_server(api.clone()).await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/\"\nupstream = \"{}\"\ncredential = \"key\"\n[credentials.key]\ngrant = \"static\"\naccess_token = \"${{TP_STATIC_KEY}}\"\nheader = \"X-Api-Key\"\nheader_prefix = \"\"\n",
        server.url
    );
    let app = start_with_env(&toml, &[("TP_STATIC_KEY", "static-key-value")]).await;
    let r = send(
        http::Method::GET,
        &url(&app, "/x"),
        &[("x-api-key", "apps-own")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = &api.seen()[0];
    assert_eq!(
        seen.headers.get_all("x-api-key").iter().collect::<Vec<_>>(),
        vec!["static-key-value"]
    );
    app.stop().await;
}
