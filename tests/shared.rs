//! Replicas sharing one credential through a real redis-server: one token call per token
//! lifetime across all of them, no refresh-token reuse, admin changes applied everywhere,
//! and Redis going away handled without forking the token family.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Method;
use support::*;

/// `n` in-process replicas of one proxy config, sharing `redis`, all starting from the
/// same configured refresh token.
async fn replicas(
    world: &World,
    redis: &RedisServer,
    rt: &str,
    n: usize,
) -> Vec<token_proxy::AppHandle> {
    let toml = format!(
        "{}\n[shared]\nredis_url = \"{}\"\nlock_ttl = \"2s\"\n",
        world.config("", &format!("refresh_token = \"{rt}\"")),
        redis.url()
    );
    let mut apps = Vec::new();
    for _ in 0..n {
        apps.push(start(&toml).await);
    }
    apps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_make_one_token_call_per_lifetime_and_never_reuse() {
    let world = World::new(Duration::from_secs(2)).await;
    let redis = RedisServer::start();
    let rt = world.auth.new_refresh_token();
    let apps = replicas(&world, &redis, &rt, 3).await;
    let started = std::time::Instant::now();
    let mut failures = 0;
    let mut total = 0;
    while started.elapsed() < Duration::from_secs(8) {
        for app in &apps {
            let r = get(&url(app, "/v1/x")).await;
            total += 1;
            if r.status != 200 {
                failures += 1;
                eprintln!("{}: {}", r.status, r.text());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    assert_eq!(failures, 0, "of {total} requests");
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "no rotation was lost"
    );
    // 2 s tokens refreshed at half-life: ~8 calls in 8 s for all replicas together
    // (three independent replicas would make ~24).
    assert!(calls <= 12, "{calls} token calls for 3 replicas in 8 s");
    let status = get(&admin(&apps[0], "/tokens/main")).await.json();
    assert_eq!(status["store"], "redis", "{status}");
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_delete_on_one_replica_apply_to_all() {
    let world = World::new(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let rt = world.auth.new_refresh_token();
    let apps = replicas(&world, &redis, &rt, 3).await;
    for app in &apps {
        assert_eq!(get(&url(app, "/v1/before")).await.status, 200);
    }
    let login = world.auth.login();
    let new_access = login["access_token"].as_str().unwrap().to_string();
    let r = send(
        Method::PUT,
        &admin(&apps[0], "/tokens/main"),
        &[],
        login.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for(
        "replica C to use the installed token",
        Duration::from_secs(1),
        || async {
            assert_eq!(get(&url(&apps[2], "/v1/after-put")).await.status, 200);
            let seen = world.api.seen();
            let last = seen.last().unwrap();
            last.headers["authorization"] == format!("Bearer {new_access}").as_str()
        },
    )
    .await;

    let r = send(Method::DELETE, &admin(&apps[1], "/tokens/main"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    for app in &apps {
        wait_for(
            "every replica to sign out",
            Duration::from_secs(3),
            || async { get(&url(app, "/v1/after-delete")).await.status == 503 },
        )
        .await;
    }
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_held_tokens_serve_then_rotating_credentials_fail_closed() {
    let world = World::new(Duration::from_secs(3)).await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let rt = world.auth.new_refresh_token();
    let apps = replicas(&world, &redis, &rt, 2).await;
    for app in &apps {
        assert_eq!(get(&url(app, "/v1/x")).await.status, 200);
    }
    redis.stop();
    let calls_before = world.auth.refresh_calls.load(Ordering::SeqCst);
    // The held token keeps serving while valid...
    assert_eq!(get(&url(&apps[0], "/v1/held")).await.status, 200);
    // ...and at expiry the rotating refresh token is not used without the lease: 503.
    wait_for("fail closed at expiry", Duration::from_secs(10), || async {
        get(&url(&apps[0], "/v1/expired")).await.status == 503
    })
    .await;
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        calls_before,
        "no token call without the lease"
    );
    let metrics = get(&admin(&apps[0], "/metrics")).await.text();
    assert!(metrics.contains("token_proxy_store_up 0"), "{metrics}");
    // Redis comes back empty (no persistence): the replicas write back what they hold and
    // converge on one generation, without reseeding from config.
    let _redis = RedisServer::start_on(port);
    for app in &apps {
        wait_for("recovery", Duration::from_secs(20), || async {
            let r = get(&url(app, "/v1/back")).await;
            if r.status != 200 {
                eprintln!(
                    "{}: {}",
                    r.status,
                    get(&admin(app, "/tokens/main")).await.text()
                );
            }
            r.status == 200
        })
        .await;
    }
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "no rotation was lost"
    );
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_at_rest_are_encrypted_and_key_names_hold_no_secret() {
    use base64::Engine;
    let world = World::new(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    let key_file = write_file(dir.path(), "state.key", &key);
    let rt = world.auth.new_refresh_token();
    let toml = format!(
        "{}\n[shared]\nredis_url = \"{}\"\nencryption_key_file = \"{}\"\n",
        world.config("", &format!("refresh_token = \"{rt}\"")),
        redis.url(),
        key_file.display()
    );
    let app = start(&toml).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    let seen = world.api.seen();
    let access = seen[0].headers["authorization"]
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string();
    let rotated = world.auth.requests()[0].params["refresh_token"].clone();

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let mut everything = keys.join("\n");
    for k in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        if kind == "hash" {
            let fields: Vec<String> = redis::cmd("HGETALL")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            everything.push_str(&fields.join("\n"));
        }
    }
    for secret in [&access, &rotated, &rt] {
        let opaque = secret.rsplit([':', '.']).next().unwrap();
        assert!(!everything.contains(opaque), "a token is readable in Redis");
    }
    assert!(
        keys.iter().all(|k| k.starts_with("token-proxy:main:")),
        "{keys:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_says_shared_settings_need_a_restart() {
    let world = World::new(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let rt = world.auth.new_refresh_token();
    let base = world.config("", &format!("refresh_token = \"{rt}\""));
    let with = |prefix: &str| {
        format!(
            "{base}\n[shared]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n",
            redis.url()
        )
    };
    let app = start(&with("one")).await;
    let same = token_proxy::config::Config::parse(&with("one"), &|_| None).unwrap();
    let summary = app.reload(same).await.unwrap();
    assert!(!summary.contains("[shared]"), "{summary}");
    let changed = token_proxy::config::Config::parse(&with("two"), &|_| None).unwrap();
    let summary = app.reload(changed).await.unwrap();
    assert!(
        summary.contains("[shared] changes take effect after a restart"),
        "{summary}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_password_file() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let (redis, ca) = RedisServer::start_tls(dir.path(), "s3cret-redis-pass");
    let password = write_file(dir.path(), "redis-password", "s3cret-redis-pass\n");
    let rt = world.auth.new_refresh_token();
    let base = world.config("", &format!("refresh_token = \"{rt}\""));
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let trusted = format!(
        "{base}\n[shared]\nredis_url = \"{url}\"\nredis_password_file = \"{}\"\nca_file = \"{}\"\n",
        password.display(),
        ca.display()
    );
    let a = start(&trusted).await;
    let b = start(&trusted).await;
    let mut leases = 0;
    for app in [&a, &b] {
        assert_eq!(get(&url_of(app)).await.status, 200);
        let metrics = get(&admin(app, "/metrics")).await.text();
        assert!(metrics.contains("token_proxy_store_up 1"), "{metrics}");
        leases += metrics
            .lines()
            .filter(|l| l.starts_with("token_proxy_lease_acquired_total{credential=\"main\"} 1"))
            .count();
    }
    assert_eq!(leases, 1, "the replica that refreshed counts its lease");
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        1,
        "the replicas shared one token set over TLS"
    );

    // Without the private CA the server's certificate is not trusted: the store is down,
    // and the rotating refresh token is not used without the lease.
    let untrusted = format!(
        "{base}\n[shared]\nredis_url = \"{url}\"\nredis_password_file = \"{}\"\n",
        password.display()
    );
    let c = start(&untrusted).await;
    let r = get(&url_of(&c)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let metrics = get(&admin(&c, "/metrics")).await.text();
    assert!(metrics.contains("token_proxy_store_up 0"), "{metrics}");
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 1);

    // ca_file makes sense only with TLS.
    let plain = format!(
        "{base}\n[shared]\nredis_url = \"redis://127.0.0.1:1/0\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let e = token_proxy::config::Config::parse(&plain, &|_| None).unwrap_err();
    assert!(e.to_string().contains("shared.ca_file"), "{e}");
    for app in [a, b, c] {
        app.stop().await;
    }
}

fn url_of(app: &token_proxy::AppHandle) -> String {
    url(app, "/v1/tls")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_refused_on_one_replica_is_not_presented_by_the_others() {
    let world = World::new(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let rt = world.auth.new_refresh_token();
    let apps = replicas(&world, &redis, &rt, 3).await;
    for app in &apps {
        assert_eq!(get(&url(app, "/v1/x")).await.status, 200);
    }
    world.auth.revoke_all_refresh();
    let r = send(
        Method::POST,
        &admin(&apps[0], "/tokens/main/refresh"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("invalid_grant"), "{}", r.text());
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    for app in &apps[1..] {
        let r = send(Method::POST, &admin(app, "/tokens/main/refresh"), &[], "").await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("seen by another replica"), "{}", r.text());
        let status = get(&admin(app, "/tokens/main")).await.json();
        assert_eq!(status["state"], "needs_reauth", "{status}");
    }
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        calls,
        "the dead refresh token was presented once, by one replica"
    );
    // A new login on any replica clears it for all.
    let r = send(
        Method::PUT,
        &admin(&apps[2], "/tokens/main"),
        &[],
        world.auth.login().to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        Method::POST,
        &admin(&apps[1], "/tokens/main/refresh"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_401s_across_three_replicas_cause_one_refresh() {
    let world = World::new(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let rt = world.auth.new_refresh_token();
    let apps = replicas(&world, &redis, &rt, 3).await;
    for app in &apps {
        assert_eq!(get(&url(app, "/v1/warm")).await.status, 200);
    }
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    // The API stops accepting the shared token (revoked at the provider).
    world.auth.revoke_all_access();
    let mut requests = Vec::new();
    for i in 0..50 {
        let target = url(&apps[i % 3], &format!("/v1/after-revoke/{i}"));
        requests.push(tokio::spawn(async move { get(&target).await.status }));
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), 200, "replayed once with the new token");
    }
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst) - calls,
        1,
        "one refresh for the whole fleet"
    );
    assert_eq!(world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    for app in apps {
        app.stop().await;
    }
}
