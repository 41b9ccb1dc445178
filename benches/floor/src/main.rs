//! An experiment, not product code: how much CPU per request a forwarding hop costs on
//! tokio when it is built three ways, to tell where token-proxy's gap to nginx lies
//! (benches/HISTORY.md, issue 9). Each mode is the same server side (httparse, one task
//! per app connection, the response head written by hand) with a different upstream side:
//!
//! - `raw`: one upstream connection pinned per app connection, the request head written and
//!   the response read (httparse, Content-Length bodies only) in the same task;
//! - `hyper-conn`: hyper's low-level `client::conn::http1`, pinned per app connection;
//! - `hyper-client`: hyper-util's pooled legacy client (what token-proxy uses).
//!
//! GET only, no error handling worth the name: a measuring tool for a fixed workload.
//!
//!   cargo run --release --manifest-path benches/floor/Cargo.toml -- MODE LISTEN UPSTREAM
//!   (e.g. raw 127.0.0.1:18070 127.0.0.1:18081), then wrk against LISTEN.
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &[u8] = b"authorization: Bearer bench-access-token\r\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_else(|| "raw".into());
    let listen: SocketAddr = args
        .get(1)
        .map_or("127.0.0.1:18070", |a| a)
        .parse()
        .unwrap();
    let up: SocketAddr = args
        .get(2)
        .map_or("127.0.0.1:18081", |a| a)
        .parse()
        .unwrap();
    let workers = 2;
    let mut handles = vec![];
    for _ in 0..workers {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_reuse_port(true).unwrap();
        sock.set_reuse_address(true).unwrap();
        sock.bind(&listen.into()).unwrap();
        sock.listen(1024).unwrap();
        sock.set_nonblocking(true).unwrap();
        let std_l: std::net::TcpListener = sock.into();
        let mode = mode.clone();
        handles.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = TcpListener::from_std(std_l).unwrap();
                loop {
                    let (s, _) = l.accept().await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let pooled = (mode == "hyper-client").then(|| CLIENT.with(|c| c.clone()));
                    let pinned = mode == "hyper-conn";
                    tokio::spawn(async move {
                        let _ = match (pooled, pinned) {
                            (Some(client), _) => {
                                conn_hyper(s, HyperUpstream::Pooled(client, up)).await
                            }
                            (None, true) => match HyperUpstream::pinned(up).await {
                                Ok(upstream) => conn_hyper(s, upstream).await,
                                Err(e) => Err(e),
                            },
                            (None, false) => conn(s, up).await,
                        };
                    });
                }
            });
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

async fn conn(mut app: TcpStream, up: SocketAddr) -> std::io::Result<()> {
    let mut upstream = TcpStream::connect(up).await?;
    upstream.set_nodelay(true)?;
    let mut inb = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(8192);
    let mut resp = Vec::with_capacity(8192);
    loop {
        // read a request head
        let head_len = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req
                .parse(&inb)
                .map_err(|_| std::io::ErrorKind::InvalidData)?
            {
                // rewrite: request line + headers except authorization/connection, + token
                out.clear();
                out.extend_from_slice(req.method.unwrap().as_bytes());
                out.push(b' ');
                out.extend_from_slice(req.path.unwrap().as_bytes());
                out.extend_from_slice(b" HTTP/1.1\r\n");
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("authorization")
                        || h.name.eq_ignore_ascii_case("connection")
                    {
                        continue;
                    }
                    out.extend_from_slice(h.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(TOKEN);
                out.extend_from_slice(b"\r\n");
                break n;
            }
            if inb.capacity() - inb.len() < 1024 {
                inb.reserve(8192);
            }
            let n = app.read_buf(&mut inb).await?;
            if n == 0 {
                return Ok(());
            }
        };
        inb.drain(..head_len);
        upstream.write_all(&out).await?;
        // read the response head + content-length body
        resp.clear();
        let total = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = r
                .parse(&resp)
                .map_err(|_| std::io::ErrorKind::InvalidData)?
            {
                let len = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                break n + len;
            }
            let n = upstream.read_buf(&mut resp).await?;
            if n == 0 {
                return Ok(());
            }
        };
        while resp.len() < total {
            let n = upstream.read_buf(&mut resp).await?;
            if n == 0 {
                return Ok(());
            }
        }
        app.write_all(&resp[..total]).await?;
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;
thread_local! {
    static CLIENT: Client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
}

/// The upstream side of the two hyper modes.
enum HyperUpstream {
    /// hyper-util's legacy client (per-worker pool); requests carry absolute URIs.
    Pooled(Client, SocketAddr),
    /// hyper's low-level client connection, pinned per app connection (its own task drives
    /// the connection; requests go over its dispatch channel).
    Pinned(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>),
}

impl HyperUpstream {
    async fn pinned(up: SocketAddr) -> std::io::Result<HyperUpstream> {
        let upstream = TcpStream::connect(up).await?;
        upstream.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(upstream))
                .await
                .map_err(|_| std::io::ErrorKind::Other)?;
        tokio::spawn(conn);
        Ok(HyperUpstream::Pinned(send))
    }

    async fn send(
        &mut self,
        req: http::Request<http_body_util::Empty<bytes::Bytes>>,
    ) -> std::io::Result<http::Response<hyper::body::Incoming>> {
        let sent = match self {
            HyperUpstream::Pooled(client, _) => client.request(req).await.ok(),
            HyperUpstream::Pinned(send) => match send.ready().await {
                Ok(()) => send.send_request(req).await.ok(),
                Err(_) => None,
            },
        };
        sent.ok_or_else(|| std::io::ErrorKind::Other.into())
    }
}

/// Same server side, upstream through hyper (see [`HyperUpstream`]); the response is
/// collected and written with a Content-Length.
async fn conn_hyper(mut app: TcpStream, mut upstream: HyperUpstream) -> std::io::Result<()> {
    use http_body_util::BodyExt;
    let authority = match &upstream {
        HyperUpstream::Pooled(_, up) => format!("http://{up}"),
        HyperUpstream::Pinned(_) => String::new(),
    };
    let mut inb = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(8192);
    loop {
        let (req, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req
                .parse(&inb)
                .map_err(|_| std::io::ErrorKind::InvalidData)?
            {
                let mut b = http::Request::builder()
                    .method(req.method.unwrap())
                    .uri(format!("{authority}{}", req.path.unwrap()));
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("authorization")
                        || h.name.eq_ignore_ascii_case("connection")
                    {
                        continue;
                    }
                    b = b.header(h.name, h.value);
                }
                b = b.header("authorization", "Bearer bench-access-token");
                break (b.body(http_body_util::Empty::new()).unwrap(), n);
            }
            if inb.capacity() - inb.len() < 1024 {
                inb.reserve(8192);
            }
            let n = app.read_buf(&mut inb).await?;
            if n == 0 {
                return Ok(());
            }
        };
        inb.drain(..head_len);
        let (parts, body) = upstream.send(req).await?.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|_| std::io::ErrorKind::Other)?
            .to_bytes();
        out.clear();
        out.extend_from_slice(format!("HTTP/1.1 {}\r\n", parts.status.as_u16()).as_bytes());
        for (k, v) in parts.headers.iter() {
            if k == "content-length" || k == "connection" {
                continue;
            }
            out.extend_from_slice(k.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        app.write_all(&out).await?;
    }
}
