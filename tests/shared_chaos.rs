//! Chaos for replicas sharing one credential: real binaries, a real redis-server, the
//! rotating mock provider that revokes the whole family on reuse, and steady load from
//! app clients throughout.
//! - a 30 s soak of 3 replicas × 16 clients with 2 s tokens;
//! - the lease holder SIGKILLed 20 times around its token call, restarted in place;
//! - redis-server killed and restarted empty, then a Redis that stops answering (a paused
//!   TCP relay).
//!
//! The tests take the machine in turn (one lock), so that timing under load is the
//! proxy's and not a sibling test's.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use support::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Replicas in slots: slot `i` runs a real binary with its own config file (so its own
/// `state_file`, as a pod's volume); a killed slot is restarted in place.
struct Fleet {
    configs: Vec<PathBuf>,
    state_files: Vec<PathBuf>,
    slots: Vec<Option<Binary>>,
    addrs: Arc<RwLock<Vec<Option<SocketAddr>>>>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start(world: &World, redis_url: &str, n: usize, cred: &str, lock_ttl: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let rt = world.auth.new_refresh_token();
        let mut configs = Vec::new();
        let mut state_files = Vec::new();
        for i in 0..n {
            let state = dir.path().join(format!("replica-{i}/main.json"));
            let toml = format!(
                "{}\n[shared]\nredis_url = \"{redis_url}\"\nlock_ttl = \"{lock_ttl}\"\n",
                world.config(
                    "",
                    &format!(
                        "refresh_token = \"{rt}\"\nstate_file = \"{}\"\n{cred}",
                        state.display()
                    )
                ),
            );
            configs.push(write_file(dir.path(), &format!("proxy-{i}.toml"), &toml));
            state_files.push(state);
        }
        let mut fleet = Fleet {
            configs,
            state_files,
            slots: (0..n).map(|_| None).collect(),
            addrs: Arc::new(RwLock::new(vec![None; n])),
            _dir: dir,
        };
        for i in 0..n {
            fleet.restart(i);
        }
        fleet
    }

    fn restart(&mut self, i: usize) {
        let b = Binary::start(&self.configs[i], &[("TOKEN_PROXY_LOG", "info")]);
        self.addrs.write().unwrap()[i] = Some(b.proxy);
        self.slots[i] = Some(b);
    }

    fn kill(&mut self, i: usize) {
        self.addrs.write().unwrap()[i] = None;
        if let Some(mut b) = self.slots[i].take() {
            b.kill_now();
        }
    }

    fn live(&self) -> impl Iterator<Item = &Binary> {
        self.slots.iter().flatten()
    }

    /// The slot whose replica holds the refresh lease now, if any.
    async fn lease_holder(&self) -> Option<usize> {
        for (i, b) in self.slots.iter().enumerate() {
            if let Some(b) = b {
                if get(&b.admin_url("/tokens/main")).await.json()["lease_holder"] == true {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Every live replica answers an app request with 200.
    async fn all_serving(&self) -> bool {
        for b in self.live() {
            if get(&b.url("/v1/probe")).await.status != 200 {
                return false;
            }
        }
        true
    }
}

/// What the app clients saw.
#[derive(Default, Debug)]
struct Seen {
    by_status: BTreeMap<u16, u64>,
    /// Connection refused or reset: a replica that was just killed (not an answer).
    connection_errors: u64,
    /// A few non-2xx bodies, to explain a failure.
    samples: Vec<String>,
    slowest: Duration,
}

impl Seen {
    fn non_2xx(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }
    fn total(&self) -> u64 {
        self.by_status.values().sum()
    }
}

/// `per_replica` app clients per slot, each sending requests (keep-alive, a short pause
/// between them) to its slot's current replica until stopped.
struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addrs: &Arc<RwLock<Vec<Option<SocketAddr>>>>, per_replica: usize) -> Load {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let slots = addrs.read().unwrap().len();
        let mut tasks = Vec::new();
        for slot in 0..slots {
            for _ in 0..per_replica {
                let (addrs, seen, stop) = (addrs.clone(), seen.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let client = client();
                    while !stop.load(Ordering::Relaxed) {
                        let Some(addr) = addrs.read().unwrap()[slot] else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        let req = Request::builder()
                            .method(Method::GET)
                            .uri(format!("http://{addr}/v1/load"))
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        let sent = Instant::now();
                        let answer = tokio::time::timeout(Duration::from_secs(30), async {
                            let resp = client.request(req).await?;
                            let status = resp.status().as_u16();
                            let body = resp.into_body().collect().await?.to_bytes();
                            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
                        })
                        .await;
                        let took = sent.elapsed();
                        {
                            let mut s = seen.lock().unwrap();
                            s.slowest = s.slowest.max(took);
                            match answer {
                                Ok(Ok((status, body))) => {
                                    *s.by_status.entry(status).or_default() += 1;
                                    if !(200..300).contains(&status) && s.samples.len() < 5 {
                                        s.samples.push(String::from_utf8_lossy(&body).into_owned());
                                    }
                                }
                                Ok(Err(_)) => s.connection_errors += 1,
                                Err(_) => *s.by_status.entry(0).or_default() += 1,
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
            }
        }
        Load { seen, stop, tasks }
    }

    /// What was seen since the last call (and reset).
    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    async fn stop(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.take()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_three_replicas_sixteen_clients_each_thirty_seconds() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let lifetime = Duration::from_secs(2);
    let world = World::new(lifetime).await;
    let redis = RedisServer::start();
    // Refresh 300 ms before expiry (the default would refresh at half-life, two calls per
    // lifetime): the claim is about calls per lifetime across replicas.
    let fleet = Fleet::start(&world, &redis.url(), 3, "refresh_before = \"300ms\"", "2s");
    let calls_at_start = world.auth.refresh_calls.load(Ordering::SeqCst);
    let load = Load::start(&fleet.addrs, 16);
    let run = Duration::from_secs(30);
    tokio::time::sleep(run).await;
    let seen = load.stop().await;
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst) - calls_at_start;
    let lifetimes = run.as_secs_f64() / lifetime.as_secs_f64();
    eprintln!(
        "soak: {} requests, {seen:?}; {calls} token calls in {lifetimes} lifetimes ({:.2} per lifetime)",
        seen.total(),
        calls as f64 / lifetimes
    );
    assert!(seen.total() > 1000, "the load ran: {seen:?}");
    assert_eq!(seen.non_2xx(), 0, "{seen:?}");
    assert_eq!(seen.connection_errors, 0, "{seen:?}");
    assert_eq!(world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    assert!(
        calls as f64 <= 1.3 * lifetimes,
        "{calls} token calls for {lifetimes} lifetimes across all replicas"
    );
}

/// Is the provider's current refresh token held anywhere a replica can recover it from
/// (Redis, or a replica's write-ahead `state_file`)? If not, a rotation was lost.
async fn rotation_is_durable(world: &World, fleet: &Fleet, redis: &RedisServer) -> bool {
    let live = world.auth.live_refresh_tokens();
    let mut held = String::new();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("token-proxy:main:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys {
        let fields: Vec<String> = redis::cmd("HGETALL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        held.push_str(&fields.join("\n"));
    }
    for f in &fleet.state_files {
        held.push_str(&std::fs::read_to_string(f).unwrap_or_default());
    }
    live.iter().any(|rt| held.contains(rt.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_killed_twenty_times_under_load() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let lock_ttl = Duration::from_secs(1);
    let world = World::new(Duration::from_secs(2)).await;
    // The worst provider for a client that dies: the rotation is final before the answer
    // is written, and the answer takes 300 ms.
    world.auth.set_response_delay(Duration::from_millis(300));
    let redis = RedisServer::start();
    let mut fleet = Fleet::start(&world, &redis.url(), 3, "", "1s");
    let load = Load::start(&fleet.addrs, 4);
    let mut rng = rand::thread_rng();
    let (mut kills, mut in_call, mut lost_after_answer, mut after_durable) = (0, 0, 0, 0);
    let mut slowest_takeover = Duration::ZERO;
    let mut attempts = 0;
    while kills < 20 {
        attempts += 1;
        assert!(
            attempts < 80,
            "could not catch the lease holder in 80 token calls"
        );
        // A token call arrives at the provider...
        let before = world.auth.requests().len();
        wait_for("a token call", Duration::from_secs(15), || async {
            world.auth.requests().len() > before
        })
        .await;
        let arrived = Instant::now();
        // ...from the lease holder, which dies somewhere between 0 and 450 ms into it
        // (the provider answers at 300 ms; commit follows within a few ms).
        let Some(holder) = fleet.lease_holder().await else {
            continue;
        };
        let offset = Duration::from_millis(rand::Rng::gen_range(&mut rng, 0..450));
        tokio::time::sleep_until((arrived + offset).into()).await;
        let reuse_before = world.auth.reuse_detected.load(Ordering::SeqCst);
        let was_in_call = world.auth.in_flight.load(Ordering::SeqCst) > 0;
        fleet.kill(holder);
        let killed_at = Instant::now();
        kills += 1;
        wait_for("the provider to finish", Duration::from_secs(5), || async {
            world.auth.in_flight.load(Ordering::SeqCst) == 0
        })
        .await;
        let durable = rotation_is_durable(&world, &fleet, &redis).await;
        let calls_at_kill = world.auth.requests().len();
        match (was_in_call, durable) {
            (true, _) => in_call += 1,
            (false, false) => lost_after_answer += 1,
            (false, true) => after_durable += 1,
        }
        // The pod's container restarts in place (same state_file).
        tokio::task::block_in_place(|| fleet.restart(holder));

        // The next token call is made by another process: within lock_ttl when the dead
        // holder left its call unfinished.
        wait_for("the next token call", Duration::from_secs(15), || async {
            world.auth.requests().len() > calls_at_kill
        })
        .await;
        let takeover = killed_at.elapsed();
        if was_in_call {
            slowest_takeover = slowest_takeover.max(takeover);
        }
        wait_for("that call to finish", Duration::from_secs(5), || async {
            world.auth.in_flight.load(Ordering::SeqCst) == 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reused = world.auth.reuse_detected.load(Ordering::SeqCst) - reuse_before;
        eprintln!(
            "kill {kills}: {offset:?} into the call, in call: {was_in_call}, durable: {durable}, \
             takeover after {takeover:?}, reuse revocations: {reused}"
        );
        if durable {
            assert_eq!(
                reused, 0,
                "kill {kills}: the rotation was durable, yet a refresh token was reused"
            );
        } else {
            // The rotation died with the holder (the provider rotated, the answer never
            // reached disk or Redis): the family is revoked. Sign in again, as a person
            // would (PUT on any replica), and go on.
            // Exactly once: the replica told `invalid_grant` tells the others, who do not
            // present the dead token again.
            assert_eq!(
                reused, 1,
                "kill {kills}: one refused call for a lost rotation"
            );
            let login = world.auth.login();
            let admin = fleet.live().next().unwrap().admin_url("/tokens/main");
            let r = send(Method::PUT, &admin, &[], login.to_string()).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        wait_for(
            "every replica serving again",
            Duration::from_secs(15),
            || async { fleet.all_serving().await },
        )
        .await;
    }
    let seen = load.stop().await;
    eprintln!(
        "20 kills: {in_call} inside the token call, {lost_after_answer} after the answer \
         but before it was durable, {after_durable} after it was durable; slowest takeover \
         {slowest_takeover:?}; reuse revocations {} in all; load {seen:?}",
        world.auth.reuse_detected.load(Ordering::SeqCst)
    );
    assert!(
        slowest_takeover <= lock_ttl + Duration::from_millis(1500),
        "another replica took over within lock_ttl: {slowest_takeover:?}"
    );
    assert!(
        in_call > 0 && after_durable > 0,
        "kills landed on both sides"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_stalled_under_load() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let world = World::new(Duration::from_secs(3)).await;
    let mut redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let fleet = Fleet::start(&world, &relay.url(), 3, "", "2s");
    let load = Load::start(&fleet.addrs, 4);

    // Healthy.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.take();
    assert_eq!(seen.non_2xx(), 0, "healthy: {seen:?}");

    // Phases in which Redis is gone (killed, then stalled): held tokens serve, nobody
    // uses the rotating refresh token without the lease, and at expiry requests fail
    // closed with 503 token_unavailable — never another error.
    let outage = |name: &'static str, seen: Seen, calls: u64| {
        eprintln!("{name}: {seen:?}, {calls} token calls");
        assert_eq!(calls, 0, "{name}: no token call without the lease");
        assert!(
            seen.by_status.get(&200).copied().unwrap_or(0) > 0,
            "{name}: {seen:?}"
        );
        assert!(
            seen.by_status.get(&503).copied().unwrap_or(0) > 0,
            "{name}: failed closed at expiry: {seen:?}"
        );
        assert_eq!(
            seen.non_2xx(),
            seen.by_status[&503],
            "{name}: only 503: {seen:?}"
        );
        assert!(
            seen.samples.iter().all(|s| s.contains("token_unavailable")),
            "{name}: {seen:?}"
        );
        assert!(seen.slowest < Duration::from_secs(10), "{name}: {seen:?}");
    };
    let recover = |name: &'static str| {
        let fleet = &fleet;
        async move {
            wait_for(name, Duration::from_secs(20), || async {
                fleet.all_serving().await
            })
            .await;
        }
    };

    // 1. redis-server killed.
    let port = redis.port;
    redis.stop();
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    load.take();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seen = load.take();
    outage(
        "redis killed",
        seen,
        world.auth.refresh_calls.load(Ordering::SeqCst) - calls,
    );
    // It comes back empty (no persistence): the replicas write back and converge.
    let _redis = RedisServer::start_on(port);
    recover("recovery after the restart").await;
    load.take();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.take();
    assert_eq!(seen.non_2xx(), 0, "after the restart: {seen:?}");

    // 2. Redis stops answering: connections stay open, nothing comes back.
    relay.pause();
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    load.take();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seen = load.take();
    outage(
        "redis stalled",
        seen,
        world.auth.refresh_calls.load(Ordering::SeqCst) - calls,
    );
    relay.resume();
    recover("recovery after the stall").await;
    load.take();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = load.stop().await;
    assert_eq!(seen.non_2xx(), 0, "after the stall: {seen:?}");
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "no rotation was lost"
    );
    for b in fleet.live() {
        let metrics = get(&b.admin_url("/metrics")).await.text();
        assert!(metrics.contains("token_proxy_store_up 1"), "{metrics}");
    }
}
