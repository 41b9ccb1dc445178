//! SIGTERM: stop accepting, finish in-flight requests within shutdown_grace, exit 0.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "proxy.toml", &world.config_rt("", ""));
    let mut bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/warm")).await.status, 200);

    let slow = tokio::spawn({
        let u = bin.url("/slow/2000");
        async move { get(&u).await.status }
    });
    wait_for(
        "the slow request to reach the upstream",
        Duration::from_secs(10),
        || async { world.api.seen().len() == 2 },
    )
    .await;
    bin.signal("TERM");
    let proxy = bin.proxy;
    wait_for(
        "new connections to be refused",
        Duration::from_secs(5),
        || async move { tokio::net::TcpStream::connect(proxy).await.is_err() },
    )
    .await;
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request finished");
    let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_stops_cleanly() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "proxy.toml", &world.config("", ""));
    let mut bin = Binary::start(&cfg, &[]);
    bin.signal("INT");
    let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_kubelet_readiness_fails_first_then_the_proxy_drains() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let rt = world.auth.new_refresh_token();
    let toml = world
        .config("", &format!("refresh_token = \"{rt}\""))
        .replace(
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"10s\"\nshutdown_delay = \"3s\"",
        );
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let mut bin = Binary::start(&cfg, &[]);
    wait_for("ready", Duration::from_secs(10), || async {
        get(&bin.admin_url("/readyz")).await.status == 200
    })
    .await;

    let slow = tokio::spawn({
        let u = bin.url("/slow/4000");
        async move { get(&u).await.status }
    });
    wait_for(
        "the slow request in flight",
        Duration::from_secs(10),
        || async { world.api.seen().len() == 1 },
    )
    .await;
    bin.signal("TERM");
    wait_for("readiness to fail", Duration::from_secs(2), || async {
        get(&bin.admin_url("/readyz")).await.status == 503
    })
    .await;
    // Still serving during shutdown_delay: the app may not have stopped yet.
    assert_eq!(get(&bin.url("/during-delay")).await.status, 200);
    let proxy = bin.proxy;
    wait_for(
        "new connections refused after the delay",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(proxy).await.is_err() },
    )
    .await;
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request finished");
    let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(code, Some(0));
}

/// Idle keep-alive connections, and connections that never sent a byte, are closed at
/// once by a shutdown: only requests in flight are waited for, not the whole grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_do_not_hold_up_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = world
        .config_rt("", "")
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\"");
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let mut bin = Binary::start(&cfg, &[]);
    let mut idle = Vec::new();
    for request in [
        &b"GET /kept HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"[..],
        &b"PUT /kept HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(bin.proxy).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = s.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
        idle.push(s);
    }
    let silent = tokio::net::TcpStream::connect(bin.proxy).await.unwrap();
    // Accepted and waiting for its first byte.
    tokio::time::sleep(Duration::from_millis(200)).await;
    idle.push(silent);

    let started = std::time::Instant::now();
    bin.signal("TERM");
    for (i, s) in idle.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "connection {i} was closed by the shutdown");
    }
    let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "exited without waiting out the 60 s grace: {:?}",
        started.elapsed()
    );
}
