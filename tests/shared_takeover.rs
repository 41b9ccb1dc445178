//! A replica killed (SIGKILL) while it holds the refresh lease, in the middle of its token
//! call: another replica takes over once the lease expires (`lock_ttl`), and the credential
//! keeps working. Real binaries, a real redis-server.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Method;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_taken_over_within_lock_ttl() {
    let world = World::new(Duration::from_secs(300)).await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = world.auth.new_refresh_token();
    let toml = format!(
        "{}\n[shared]\nredis_url = \"{}\"\nlock_ttl = \"2s\"\n",
        world.config("", &format!("refresh_token = \"{rt}\"")),
        redis.url()
    );
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let a = Binary::start(&cfg, &[]);
    let b = Binary::start(&cfg, &[]);
    assert_eq!(get(&a.url("/v1/first")).await.status, 200);
    assert_eq!(get(&b.url("/v1/first")).await.status, 200);
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "the replicas shared one refresh at start");

    // A starts a token call and hangs in it (the provider holds the request)...
    world.auth.set_gate(false);
    let requests = world.auth.requests().len();
    let forced = tokio::spawn({
        let url = a.admin_url("/tokens/main/refresh");
        async move { send(Method::POST, &url, &[], "").await }
    });
    wait_for("A's token call", Duration::from_secs(10), || async {
        world.auth.requests().len() > requests
    })
    .await;
    assert_eq!(
        get(&a.admin_url("/tokens/main")).await.json()["lease_holder"],
        true
    );
    // ...and dies there.
    a.signal("KILL");
    let killed_at = Instant::now();
    forced.abort();
    world.auth.set_gate(true);

    // B's own refresh waits for the dead holder's lease to expire, then goes ahead.
    let r = send(Method::POST, &b.admin_url("/tokens/main/refresh"), &[], "").await;
    let took = killed_at.elapsed();
    eprintln!("takeover after {took:?}: {} {}", r.status, r.text());
    assert!(
        took >= Duration::from_millis(1300) && took < Duration::from_secs(10),
        "B waited for the dead holder's lease (lock_ttl 2 s), no longer: {took:?}"
    );
    let made = world.auth.refresh_calls.load(Ordering::SeqCst) - calls;
    let reused = world.auth.reuse_detected.load(Ordering::SeqCst);
    if made == 1 {
        // The provider dropped A's call with A's connection: nothing rotated, and B's
        // takeover refreshed cleanly.
        assert_eq!(reused, 0);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(get(&b.url("/v1/after")).await.status, 200);
    } else {
        // The provider completed A's call for a client that was gone (real providers may):
        // that rotation died with A, so B presented the rotated-away token and the family
        // was revoked. That is the one case a lease cannot cover (README: Scaling out).
        assert_eq!(made, 2, "A's call and B's takeover call, no more");
        assert_eq!(reused, 1);
        assert_eq!(r.status, 502);
        assert!(r.text().contains("invalid_grant"), "{}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_redis_never_got_survives_a_crash_in_the_state_file() {
    let world = World::new(Duration::from_secs(300)).await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let dir = tempfile::tempdir().unwrap();
    let rt = world.auth.new_refresh_token();
    let toml = format!(
        "{}\n[shared]\nredis_url = \"{}\"\nlock_ttl = \"2s\"\n",
        world.config(
            "",
            &format!(
                "refresh_token = \"{rt}\"\nstate_file = \"{}\"",
                dir.path().join("state/main.json").display()
            )
        ),
        redis.url()
    );
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let a = Binary::start(&cfg, &[]);
    assert_eq!(get(&a.url("/v1/first")).await.status, 200);

    // A rotates (the provider answers) just as Redis goes away: the commit to Redis fails.
    world.auth.set_gate(false);
    let requests = world.auth.requests().len();
    let forced = tokio::spawn({
        let url = a.admin_url("/tokens/main/refresh");
        async move { send(Method::POST, &url, &[], "").await }
    });
    wait_for("A's token call", Duration::from_secs(10), || async {
        world.auth.requests().len() > requests
    })
    .await;
    redis.stop();
    world.auth.set_gate(true);
    wait_for(
        "the failed commit to show",
        Duration::from_secs(10),
        || async { get(&a.admin_url("/tokens/main")).await.json()["persisted"] == false },
    )
    .await;
    forced.abort();
    // A dies before Redis comes back (empty: no persistence). A new replica starts.
    a.signal("KILL");
    let _redis = RedisServer::start_on(port);
    let b = Binary::start(&cfg, &[]);
    let r = send(Method::POST, &b.admin_url("/tokens/main/refresh"), &[], "").await;
    assert_eq!(
        r.status,
        200,
        "B refreshed with the rotated token from state_file: {}",
        r.text()
    );
    assert_eq!(get(&b.url("/v1/after")).await.status, 200);
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "the rotation A could not commit to Redis was not lost"
    );
}
