//! Our own HTTP/1.1 code, driven from outside. The client (plain-HTTP upstreams), against a
//! scripted upstream that writes exactly the bytes each test needs: keep-alive reuse, every
//! body framing, interim responses, upstreams that close pooled connections, and malformed
//! responses (502, and the proxy keeps serving). The server (the app's side), from a raw
//! app connection: pipelining, bodies arriving after their heads, `Connection: close`,
//! HEAD, chunked responses, and requests handed to hyper's server mid-connection.

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
        field(&self.headers, name)
    }
}

/// The first field named `name` (case-insensitive) of a head as read off the wire.
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
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

/// An app connection speaking raw HTTP/1.1 to the proxy.
struct AppConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// One response as the app read it (a chunked body decoded).
#[derive(Debug)]
struct AppResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl AppResponse {
    fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }
}

impl AppConn {
    async fn open(app: &token_proxy::AppHandle) -> AppConn {
        AppConn {
            stream: tokio::net::TcpStream::connect(app.proxy_addr)
                .await
                .unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
            .await
            .expect("the proxy answers within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "the proxy closed the connection mid-response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Read one response (`head_request`: it has no body, whatever its length says).
    async fn response(&mut self, head_request: bool) -> AppResponse {
        let (status, headers, used) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf).unwrap() {
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (resp.code.unwrap(), headers, n);
            }
            self.fill().await;
        };
        self.buf.drain(..used);
        let mut response = AppResponse {
            status,
            headers,
            body: Vec::new(),
            chunked: false,
        };
        if head_request || status == 100 || status == 204 || status == 304 {
            return response;
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                self.fill().await;
            }
            response.body = self.buf.drain(..len).collect();
            return response;
        }
        assert_eq!(
            response.header("transfer-encoding"),
            Some("chunked"),
            "{response:?}"
        );
        response.chunked = true;
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16)
                    .unwrap();
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                self.fill().await;
            }
            if size == 0 {
                assert_eq!(&self.buf[..2], b"\r\n", "no trailers were asked for");
                self.buf.drain(..2);
                return response;
            }
            response.body.extend(self.buf.drain(..size));
            assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
        }
    }

    /// The proxy closes the connection (within 5 s), having sent nothing more.
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) && self.buf.is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = Scripted::start(|s| {
        Answer::Send(vec![match s.target.as_str() {
            "/base/a" => b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            _ => b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nb",
        }])
    })
    .await;
    let app = proxy_to(&up).await;
    let mut conn = AppConn::open(&app).await;
    conn.send(b"GET /a HTTP/1.1\r\nhost: localhost\r\n\r\nPOST /b HTTP/1.1\r\nhost: localhost\r\ncontent-length: 3\r\n\r\nxyzGET /a HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let (a, b, c) = (
        conn.response(false).await,
        conn.response(false).await,
        conn.response(false).await,
    );
    assert_eq!((a.status, a.body.as_slice()), (200, &b"a"[..]));
    assert_eq!((b.status, b.body.as_slice()), (201, &b"b"[..]));
    assert_eq!((c.status, c.body.as_slice()), (200, &b"a"[..]));
    let date = a
        .header("date")
        .expect("a Date field, as hyper's server wrote");
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    let seen = up.seen();
    let targets: Vec<_> = seen.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(targets, ["/base/a", "/base/b", "/base/a"]);
    assert_eq!(seen[1].body, b"xyz");
    // Still open for more.
    conn.send(b"GET /a HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_our_server_does_not_take_is_served_by_hyper_on_the_same_connection() {
    let up = Scripted::start(|_| Answer::Send(vec![OK])).await;
    let app = proxy_to(&up).await;
    let mut conn = AppConn::open(&app).await;
    conn.send(b"GET /plain HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.body, b"ok");
    // Expect: 100-continue is hyper's to answer; the body follows the interim response.
    conn.send(b"POST /expect HTTP/1.1\r\nhost: localhost\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.status, 100);
    conn.send(b"abc").await;
    let r = conn.response(false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    // The connection goes on (now with hyper), in HTTP/1.0 too.
    conn.send(b"GET /after HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.status, 200);
    conn.send(b"GET /old HTTP/1.0\r\nhost: localhost\r\nconnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.status, 200);
    let seen = up.seen();
    let targets: Vec<_> = seen.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/base/plain", "/base/expect", "/base/after", "/base/old"]
    );
    assert_eq!(seen[1].body, b"abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_its_head_arrives_whole_however_late() {
    let up = Scripted::start(|_| Answer::Send(vec![OK])).await;
    let app = proxy_to(&up).await;
    let mut conn = AppConn::open(&app).await;
    // Soon after (our server waits for it), then 1.5 s after (past its wait: hyper streams
    // it), then split across three writes.
    for (pause, path) in [(200, "/soon"), (1500, "/late")] {
        conn.send(
            format!("PUT {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\n\r\n")
                .as_bytes(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        conn.send(b"hello").await;
        assert_eq!(conn.response(false).await.status, 200);
    }
    let mut conn = AppConn::open(&app).await;
    conn.send(b"POST /split HTTP/1.1\r\nhost: local").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.send(b"host\r\ncontent-length: 6\r\n\r\nhel").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.send(b"lo!").await;
    assert_eq!(conn.response(false).await.status, 200);
    let seen = up.seen();
    let bodies: Vec<_> = seen
        .iter()
        .map(|s| (s.target.as_str(), s.body.as_slice()))
        .collect();
    assert_eq!(
        bodies,
        [
            ("/base/soon", &b"hello"[..]),
            ("/base/late", b"hello"),
            ("/base/split", b"hello!")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_answered_and_then_the_connection_closes() {
    let up = Scripted::start(|_| Answer::Send(vec![OK])).await;
    let app = proxy_to(&up).await;
    let mut conn = AppConn::open(&app).await;
    conn.send(b"GET /bye HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await;
    let r = conn.response(false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(conn.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_gets_the_length_without_a_body_and_the_connection_goes_on() {
    let up = Scripted::start(|s| {
        Answer::Send(vec![match s.method.as_str() {
            "HEAD" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
        }])
    })
    .await;
    let app = proxy_to(&up).await;
    let mut conn = AppConn::open(&app).await;
    conn.send(b"HEAD /h HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let head = conn.response(true).await;
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("10"))
    );
    // Had the proxy sent a body, it would be read here as the next response's head.
    conn.send(b"GET /g HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.body, b"0123456789");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_of_unknown_length_reaches_the_app_chunked() {
    let up = Scripted::start(|s| match s.target.as_str() {
        "/base/chunked" => Answer::Send(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"6\r\n world\r\n0\r\n\r\n",
        ]),
        _ => Answer::SendThenClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the upstream closes"),
    })
    .await;
    let app = proxy_to(&up).await;
    let mut conn = AppConn::open(&app).await;
    for (path, body) in [
        ("/chunked", &b"hello world"[..]),
        ("/close", b"until the upstream closes"),
    ] {
        conn.send(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
            .await;
        let r = conn.response(false).await;
        assert_eq!(
            (r.status, r.chunked, r.body.as_slice()),
            (200, true, body),
            "{path}"
        );
    }
}

/// An upstream head with repeated, hop-by-hop, `Connection`-named and date fields.
const FIELDS: &[u8] = b"HTTP/1.1 200 OK\r\nX-One: 1\r\nSet-Cookie: a=1\r\nConnection: keep-alive, X-Hop\r\n\
X-Hop: secret\r\nKeep-Alive: timeout=5\r\nSet-Cookie: b=2\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\
Content-Length: 2\r\n\r\nok";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_fields_reach_the_app_whichever_server_writes_them() {
    let up = Scripted::start(|_| Answer::Send(vec![FIELDS])).await;
    let app = proxy_to(&up).await;
    let expect = |who: &str, fields: Vec<(String, String)>| {
        let all = |name: &str| -> Vec<&str> {
            fields
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(all("x-one"), ["1"], "{who}: {fields:?}");
        assert_eq!(all("set-cookie"), ["a=1", "b=2"], "{who}: in order");
        assert_eq!(
            all("date"),
            ["Mon, 01 Jan 2024 00:00:00 GMT"],
            "{who}: theirs, once"
        );
        assert_eq!(all("content-length"), ["2"], "{who}");
        for hop in ["x-hop", "keep-alive"] {
            assert!(all(hop).is_empty(), "{who}: {hop} is hop-by-hop");
        }
    };
    // Our own server, then hyper's on the same connection (from a request ours hands over).
    let mut conn = AppConn::open(&app).await;
    conn.send(b"GET /ours HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let r = conn.response(false).await;
    assert_eq!(r.body, b"ok");
    for name in ["X-One", "Set-Cookie", "Date"] {
        assert!(
            r.headers.iter().any(|(k, _)| k == name),
            "our server writes {name} as the upstream did: {:?}",
            r.headers
        );
    }
    expect("our server", r.headers);
    conn.send(b"HEAD /ours-head HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    expect("our server, HEAD", conn.response(true).await.headers);
    conn.send(b"GET /hyper HTTP/1.0\r\nhost: localhost\r\nconnection: keep-alive\r\n\r\n")
        .await;
    let r = conn.response(false).await;
    assert_eq!(r.body, b"ok");
    expect("hyper's HTTP/1 server", r.headers);
    // hyper's h2 server.
    let r = send_with(
        &h2c_client(),
        Method::GET,
        &url(&app, "/h2"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let fields = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    expect("h2", fields);
}
