//! Every wait is bounded (`idle_timeout`): an upstream that stops sending mid-body, an app
//! that stops sending its request body, and an upload the upstream never reads after a 504
//! each end, and free their connections, instead of hanging on forever.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw upstream saw of its one connection.
struct Observed {
    /// The connection was closed by the proxy (EOF or reset) before the test's deadline.
    closed: bool,
}

/// A raw upstream: accepts one connection, reads the request head, runs `then`, and
/// finally reads until the proxy closes the connection (or 30 s pass).
async fn raw_upstream<F, Fut>(then: F) -> (SocketAddr, tokio::task::JoinHandle<Observed>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = TcpStream> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                return Observed { closed: true };
            }
            head.push(byte[0]);
        }
        let mut s = then(s).await;
        let mut buf = vec![0u8; 1 << 16];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Observed { closed: true },
                Ok(Ok(_)) => continue,
                Err(_) => return Observed { closed: false },
            }
        }
    });
    (addr, task)
}

async fn proxy_to(upstream: SocketAddr, route_extra: &str) -> token_proxy::AppHandle {
    start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
[[routes]]
name = "slow"
prefix = "/"
upstream = "http://{upstream}"
idle_timeout = "1s"
{route_extra}
"#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_sending_mid_body_is_cut_off() {
    let (addr, upstream) = raw_upstream(|mut s| async move {
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[b'x'; 1000]).await.unwrap();
        s // then silence
    })
    .await;
    let app = proxy_to(addr, "").await;
    let resp = client()
        .get(url(&app, "/download").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the app is not left hanging");
    assert!(
        body.is_err(),
        "the truncated body ends in an error, not a hang"
    );
    assert!(
        upstream.await.unwrap().closed,
        "the upstream connection was freed"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stops_sending_its_body_gets_408() {
    let (addr, upstream) = raw_upstream(|s| async move { s }).await;
    let app = proxy_to(addr, "").await;
    let mut conn = TcpStream::connect(app.proxy_addr).await.unwrap();
    conn.write_all(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\nonly ten b",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut answer))
        .await
        .expect("the proxy answers instead of waiting forever")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("request_timeout") && text.contains("idle_timeout"),
        "{text}"
    );
    assert!(
        upstream.await.unwrap().closed,
        "the upstream connection was freed"
    );
    app.stop().await;
}

/// The app uploads 256 MiB; the upstream reads the head, then (after `answer`, if any)
/// neither reads the body nor closes for 6 s, then drains its socket, which ends only if
/// the proxy closed the connection. Returns the app's status line.
async fn stalled_upload(answer: Option<&'static [u8]>, route_extra: &str) -> String {
    let (addr, upstream) = raw_upstream(move |mut s| async move {
        if let Some(answer) = answer {
            s.write_all(answer).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        s
    })
    .await;
    let app = proxy_to(addr, route_extra).await;
    let conn = TcpStream::connect(app.proxy_addr).await.unwrap();
    let (mut read_half, mut write_half) = conn.into_split();
    let total: u64 = 256 << 20;
    write_half
        .write_all(
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {total}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    // Keep uploading (as a real client would) until the proxy stops taking bytes or 15 s.
    let uploader = tokio::spawn(async move {
        let chunk = vec![b'u'; 1 << 16];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut sent = 0u64;
        while sent < total {
            match tokio::time::timeout_at(deadline, write_half.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len() as u64,
                _ => break,
            }
        }
        sent
    });
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), read_half.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    let observed = upstream.await.unwrap();
    assert!(
        observed.closed,
        "the stalled upstream connection was closed, not kept with megabytes queued ({text})"
    );
    let sent = uploader.await.unwrap();
    assert!(
        sent < total,
        "the proxy stopped taking the upload ({sent} bytes)"
    );
    app.stop().await;
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_never_reads_is_abandoned_after_the_504() {
    let status = stalled_upload(None, "timeout = \"1s\"").await;
    assert!(status.starts_with("HTTP/1.1 504"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_answered_early_but_never_reads_is_abandoned() {
    // E.g. a 413 sent as soon as the head arrived, the connection left open.
    let status = stalled_upload(
        Some(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"),
        "",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
}
