//! Many clients across many expiries and revocations at once: every request gets 200, no
//! refresh token is ever presented twice, and each expiry or revocation costs one refresh.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_through_expiries_and_revocations() {
    let world = World::new(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let app = start(&world.config_rt("", &format!("state_file = \"{}\"", state.display()))).await;
    let failures = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(8);
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..50 {
        let u = url(&app, &format!("/soak/{c}"));
        let (failures, sent) = (failures.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            let client = support::client();
            let mut i = 0u32;
            while started.elapsed() < run_for {
                let method = if i % 3 == 0 {
                    Method::POST
                } else {
                    Method::GET
                };
                let r =
                    send_with(&client, method, &u, &[], vec![b'x'; (i % 7) as usize * 100]).await;
                if r.status != 200 {
                    eprintln!("client {c} request {i}: {} {}", r.status, r.text());
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                sent.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    let mut revocations = 0;
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Spaced out so that no replay is in flight when the next revocation lands: a replay
        // refused again goes back to the app, by contract (one replay only).
        world.auth.revoke_all_access();
        revocations += 1;
    }
    for c in clients {
        c.await.unwrap();
    }
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent > 500, "the load ran ({sent} requests)");
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no client-visible failure in {sent} requests"
    );
    assert_eq!(world.auth.reuse_detected.load(Ordering::SeqCst), 0);
    assert_eq!(world.auth.rejected_calls.load(Ordering::SeqCst), 0);
    // 1 s tokens refresh about twice a second, plus one per revocation; a stampede would be
    // hundreds.
    let refreshes = world.auth.refresh_calls.load(Ordering::SeqCst);
    assert!(
        refreshes <= 8 * 3 + revocations + 2,
        "{refreshes} refreshes for {revocations} revocations"
    );
    app.stop().await;
}
