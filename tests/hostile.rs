//! Hostile and malformed input: the proxy answers 400 (or closes), never crashes, never
//! forwards garbage, and keeps serving well-formed requests.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_proxy_keeps_serving() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    let garbage: Vec<&[u8]> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS to a plain port\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/9.9\r\nHost: localhost\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nBad Header Name: v\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nX: \x00\x01\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"GET http:///nohost HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
    ];
    // Both Content-Length and Transfer-Encoding: hyper reads it as chunked (RFC 9112 §6.3);
    // it must reach the upstream without the conflicting Content-Length.
    let both = raw(
        app.proxy_addr,
        b"POST /smuggle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    if both.starts_with("HTTP/1.1 200") {
        let seen = world.api.seen();
        let s = seen.iter().find(|s| s.uri == "/smuggle").unwrap();
        assert_eq!(s.body.as_ref(), b"abc");
        assert_ne!(
            s.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"5"[..])
        );
    } else {
        assert!(
            both.is_empty() || both.starts_with("HTTP/1.1 400"),
            "{both}"
        );
    }
    for (i, bytes) in garbage.iter().enumerate() {
        let resp = raw(app.proxy_addr, bytes, Duration::from_secs(5)).await;
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 4"),
            "case {i}: expected a 4xx or a closed connection, got {:?}",
            &resp[..resp.len().min(120)]
        );
    }
    // A body that lies about its length (shorter than promised, then the client goes away).
    let _ = raw(
        app.proxy_addr,
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nonly this",
        Duration::from_millis(500),
    )
    .await;
    assert!(
        world.api.seen().iter().all(|s| s.body_len != 1000),
        "a truncated body is never passed off as complete"
    );
    assert_eq!(get(&url(&app, "/still/alive")).await.status, 200);
    assert_eq!(get(&admin(&app, "/healthz")).await.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_admin_input_is_refused_cleanly() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    let cases: Vec<(http::Method, &str, Vec<u8>)> = vec![
        (http::Method::PUT, "/tokens/main", b"not json".to_vec()),
        (http::Method::PUT, "/tokens/main", b"[1,2,3]".to_vec()),
        (
            http::Method::PUT,
            "/tokens/main",
            br#"{"access_token": "bad\nheader"}"#.to_vec(),
        ),
        (
            http::Method::PUT,
            "/tokens/main",
            br#"{"access_token": "x", "expires_in": 1e308}"#.to_vec(),
        ),
        (http::Method::PUT, "/tokens/main", vec![b'{'; 100 * 1024]),
        (http::Method::PUT, "/tokens/..%2F..%2Fetc", b"{}".to_vec()),
        (http::Method::PATCH, "/tokens/main", Vec::new()),
        (http::Method::DELETE, "/tokens/nope", Vec::new()),
        (http::Method::POST, "/metrics", Vec::new()),
    ];
    for (method, path, body) in cases {
        let r = send(method.clone(), &admin(&app, path), &[], body).await;
        assert!(
            r.status.is_client_error(),
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
    }
    // The credential is untouched and still works.
    assert_eq!(get(&url(&app, "/ok")).await.status, 200);
    assert_eq!(
        get(&admin(&app, "/tokens")).await.json()["main"]["refresh_count"],
        1
    );
    app.stop().await;
}
