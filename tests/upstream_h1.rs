//! Our own HTTP/1.1 client (plain-HTTP upstreams): driven from outside against a scripted
//! upstream that writes exactly the bytes each test needs — keep-alive reuse, every body
//! framing, interim responses, upstreams that close pooled connections, and malformed
//! responses (502, and the proxy keeps serving).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the scripted upstream read it.
#[derive(Clone, Debug)]
struct Seen {
    /// Which connection (0-based, in accept order) and which request on it.
    conn: usize,
    nth: usize,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the scripted upstream does with a request.
enum Answer {
    /// Write these bytes (in pieces, with a pause between) and keep the connection.
    Send(Vec<&'static [u8]>),
    /// Write these bytes, then close.
    SendThenClose(&'static [u8]),
    /// Close without answering.
    Close,
}

struct Scripted {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(answer: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (seen2, accepted2) = (seen.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let conn = accepted2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, conn, seen2.clone(), answer.clone()));
            }
        });
        Scripted {
            url,
            seen,
            accepted,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<dyn Fn(&Seen) -> Answer + Send + Sync>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    for nth in 0.. {
        // Read one request: head, then a Content-Length body.
        let request = loop {
            if let Some(req) = parse_request(&buf, conn, nth) {
                break req;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let (req, used) = request;
        buf.drain(..used);
        seen.lock().unwrap().push(req.clone());
        match answer(&req) {
            Answer::Send(pieces) => {
                for (i, piece) in pieces.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                }
            }
            Answer::SendThenClose(bytes) => {
                let _ = stream.write_all(bytes).await;
                return;
            }
            Answer::Close => return,
        }
    }
}

fn parse_request(buf: &[u8], conn: usize, nth: usize) -> Option<(Seen, usize)> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    let head = match req.parse(buf).expect("the proxy writes valid requests") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
    if buf.len() < head + len {
        return None;
    }
    let seen = Seen {
        conn,
        nth,
        method: req.method.unwrap().to_string(),
        target: req.path.unwrap().to_string(),
        headers,
        body: buf[head..head + len].to_vec(),
    };
    Some((seen, head + len))
}

async fn proxy_to(upstream: &Scripted) -> token_proxy::AppHandle {
    start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 1

[[routes]]
name = "api"
prefix = "/"
upstream = "{}/base"
timeout = "5s"
idle_timeout = "2s"
"#,
        upstream.url
    ))
    .await
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_reused_and_requests_arrive_as_sent() {
    let up = Scripted::start(|_| Answer::Send(vec![OK])).await;
    let app = proxy_to(&up).await;
    let client = client();
    for i in 0..20 {
        let r = send_with(
            &client,
            Method::POST,
            &url(&app, &format!("/items/{i}?q=a%20b")),
            &[("x-trace", "t1"), ("content-type", "text/plain")],
            format!("body {i}"),
        )
        .await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    }
    let empty = get(&url(&app, "/empty")).await;
    assert_eq!(empty.status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 21);
    // One request at a time: one upstream connection carries them all.
    assert_eq!(up.connections(), 1, "{seen:?}");
    assert!(seen
        .iter()
        .enumerate()
        .all(|(i, s)| s.conn == 0 && s.nth == i));
    let first = &seen[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.target, "/base/items/0?q=a%20b");
    assert_eq!(first.body, b"body 0");
    assert_eq!(first.header("content-length"), Some("6"));
    assert_eq!(first.header("x-trace"), Some("t1"));
    let host = up.url.trim_start_matches("http://");
    assert_eq!(first.header("host"), Some(host));
    // An empty GET carries no length, as hyper would send it.
    assert_eq!(seen[20].method, "GET");
    assert_eq!(seen[20].header("content-length"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_framing_reaches_the_app_whole() {
    let up = Scripted::start(|req| match req.target.as_str() {
        // Chunked, split mid-size-line and mid-data, with extensions and trailers.
        "/base/chunked" => Answer::Send(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhel",
            b"lo\r\n6\r\n world\r",
            b"\n0\r\nX-Checksum: 9\r\n\r\n",
        ]),
        // A length-delimited body in pieces.
        "/base/length" => Answer::Send(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello",
            b" world",
        ]),
        // No length: the body runs to the close.
        "/base/close" => Answer::SendThenClose(b"HTTP/1.1 200 OK\r\n\r\nhello world"),
        // Interim responses are read and dropped.
        "/base/interim" => Answer::Send(vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        ]),
        "/base/nocontent" => Answer::Send(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]),
        "/base/notmodified" => {
            Answer::Send(vec![b"HTTP/1.1 304 Not Modified\r\nContent-Length: 11\r\n\r\n"])
        }
        "/base/head" => Answer::Send(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"]),
        _ => Answer::Send(vec![OK]),
    })
    .await;
    let app = proxy_to(&up).await;
    let client = client();
    for path in ["/chunked", "/length", "/close", "/interim"] {
        let r = send_with(&client, Method::GET, &url(&app, path), &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.text(), "hello world", "{path}");
    }
    for (path, status) in [("/nocontent", 204), ("/notmodified", 304)] {
        let r = send_with(&client, Method::GET, &url(&app, path), &[], Bytes::new()).await;
        assert_eq!((r.status.as_u16(), r.body.len()), (status, 0), "{path}");
    }
    let r = send_with(
        &client,
        Method::HEAD,
        &url(&app, "/head"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "11");
    assert!(r.body.is_empty());
    // Everything after the close-delimited body shared connections: the chunked and
    // length bodies, the interim answer and the bodiless ones left theirs reusable.
    let last = send_with(
        &client,
        Method::GET,
        &url(&app, "/after"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(last.status, 200);
    assert_eq!(up.connections(), 2, "{:?}", up.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    // The upstream closes every connection after one response, without saying so.
    let up = Scripted::start(|_| Answer::SendThenClose(OK)).await;
    let app = proxy_to(&up).await;
    for method in [Method::GET, Method::POST, Method::PUT, Method::POST] {
        let r = send(method.clone(), &url(&app, "/x"), &[], "data").await;
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        // Give the close time to arrive: the pool sees it and does not reuse the socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.connections(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_to_a_closing_connection_is_resent_only_if_idempotent() {
    // The second request on each connection is read and then the connection is closed
    // unanswered: the race between reuse and an upstream's keep-alive timeout.
    let up = Scripted::start(|req| match req.nth {
        0 => Answer::Send(vec![OK]),
        _ => Answer::Close,
    })
    .await;
    let app = proxy_to(&up).await;
    let client = client();
    let first = send_with(&client, Method::GET, &url(&app, "/a"), &[], Bytes::new()).await;
    assert_eq!(first.status, 200);
    // GET: sent again on a new connection, and answered there.
    let again = send_with(&client, Method::GET, &url(&app, "/b"), &[], Bytes::new()).await;
    assert_eq!(again.status, 200, "{}", again.text());
    let gets: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|s| s.target == "/base/b")
        .collect();
    assert_eq!(gets.len(), 2, "one lost, one answered");
    assert_ne!(gets[0].conn, gets[1].conn, "resent on a new connection");
    // POST: it reached the upstream once; sending it again could do it twice. 502.
    let post = send_with(&client, Method::POST, &url(&app, "/c"), &[], "pay").await;
    assert_eq!(post.status, 502, "{}", post.text());
    assert_eq!(post.json()["error"], "upstream_unreachable");
    let posts = up
        .seen()
        .into_iter()
        .filter(|s| s.target == "/base/c")
        .count();
    assert_eq!(posts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_responses_are_502_and_the_proxy_keeps_serving() {
    let up = Scripted::start(|req| match req.target.as_str() {
        "/base/garbage" => Answer::SendThenClose(b"SMTP ready\r\n\r\n"),
        "/base/two-lengths" => Answer::Send(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        ]),
        "/base/bad-header" => Answer::Send(vec![
            b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        ]),
        "/base/upgrade" => Answer::Send(vec![
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        ]),
        "/base/huge-head" => Answer::Send(vec![HUGE_HEAD.as_bytes()]),
        "/base/nothing" => Answer::Close,
        _ => Answer::Send(vec![OK]),
    })
    .await;
    let app = proxy_to(&up).await;
    for path in [
        "/garbage",
        "/two-lengths",
        "/bad-header",
        "/upgrade",
        "/huge-head",
        "/nothing",
    ] {
        let r = get(&url(&app, path)).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream_unreachable", "{path}");
        assert_eq!(get(&url(&app, "/fine")).await.status, 200, "after {path}");
    }
}

static HUGE_HEAD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
        "a".repeat(70 * 1024)
    )
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cut_short_or_badly_chunked_fail_the_app_response_not_the_proxy() {
    let up = Scripted::start(|req| match req.target.as_str() {
        "/base/short" => {
            Answer::SendThenClose(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        }
        "/base/bad-chunk" => Answer::Send(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXXzz\r\n",
        ]),
        _ => Answer::Send(vec![OK]),
    })
    .await;
    let app = proxy_to(&up).await;
    for path in ["/short", "/bad-chunk"] {
        let req = http::Request::get(url(&app, path))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        // The head (and what data there was) reaches the app, then the body breaks off:
        // never a complete-looking response, never a hang.
        let resp = client().request(req).await.expect("the head arrives");
        assert_eq!(resp.status(), 200, "{path}");
        let body = tokio::time::timeout(Duration::from_secs(10), {
            use http_body_util::BodyExt;
            resp.into_body().collect()
        })
        .await
        .expect("the app is not left waiting");
        assert!(
            body.is_err(),
            "{path}: a truncated body must not look complete"
        );
    }
    assert_eq!(get(&url(&app, "/fine")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_504_and_a_large_upload_still_streams() {
    let up = Scripted::start(|req| match req.target.as_str() {
        "/base/silent" => Answer::Send(vec![]),
        _ => Answer::Send(vec![OK]),
    })
    .await;
    let app = proxy_to(&up).await;
    let r = get(&url(&app, "/silent")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    // A body over the buffered limit (64 KiB) goes through hyper's client, streamed.
    let big = vec![b'z'; 300 * 1024];
    let r = send(Method::PUT, &url(&app, "/upload"), &[], big.clone()).await;
    assert_eq!(r.status, 200);
    let upload = up
        .seen()
        .into_iter()
        .find(|s| s.target == "/base/upload")
        .unwrap();
    assert_eq!(upload.body.len(), big.len());
    assert_eq!(upload.header("content-length"), Some("307200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_apps_cookie_fields_arrive_as_one_http_1_1_field() {
    let up = Scripted::start(|_| Answer::Send(vec![OK])).await;
    let app = proxy_to(&up).await;
    let r = send_with(
        &h2c_client(),
        Method::GET,
        &url(&app, "/c"),
        &[("cookie", "a=1"), ("cookie", "b=2")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.seen();
    let cookies: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1; b=2"], "RFC 9113 §8.2.3");
}
