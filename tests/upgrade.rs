//! Protocol upgrades (WebSocket): the handshake carries our token, and once the upstream
//! switches protocols the proxy splices both connections together.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HANDSHAKE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed during the handshake: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_spliced_with_the_token_on_the_handshake() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    let mut s = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .unwrap();
    s.write_all(HANDSHAKE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    let seen = &world.api.seen()[0];
    assert!(seen.authorized, "the handshake carried our bearer");
    assert_eq!(seen.headers["upgrade"], "websocket");

    // Bytes now flow both ways, untouched.
    for msg in [
        &b"hello"[..],
        &[0x81, 0x05, 1, 2, 3, 4, 5][..],
        &vec![7u8; 100_000][..],
    ] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    drop(s);
    assert_eq!(get(&url(&app, "/after")).await.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_passed_back_and_triggers_a_refresh() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    assert_eq!(get(&url(&app, "/warm")).await.status, 200);
    world.auth.revoke_all_access();
    let mut s = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .unwrap();
    s.write_all(HANDSHAKE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    wait_for(
        "the refresh the 401 triggered",
        Duration::from_secs(10),
        || async {
            world
                .auth
                .refresh_calls
                .load(std::sync::atomic::Ordering::SeqCst)
                == 2
        },
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(app.proxy_addr)
        .await
        .unwrap();
    s.write_all(HANDSHAKE).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
    app.stop().await;
}
