//! Scale, measured on the real binary (release build), reported in README "Performance":
//!
//! - **Idle connections**: 10,000 app connections, each used once and then held open
//!   (keep-alive, idle). Reports the proxy's resident memory before and after (from /proc).
//! - **Credentials**: 10,000 `refresh_token` credentials with staggered expiries (the mock
//!   provider issues ES256 JWT access tokens, as Cotter does, living 1 h + i s), each
//!   fetched once at start. Reports resident
//!   memory per credential (against a 1-credential baseline), the peak, and the CPU the
//!   process uses while all 10,000 wait for their refresh time: one scheduler task keeps
//!   each credential's due time in a binary heap under one runtime timer, with no
//!   per-credential polling, so an idle process stays idle.
//!
//!   cargo bench --bench scale [-- connections credentials]
//!
//! `TOKEN_PROXY_BIN=path` measures that binary instead of this checkout's (an older build
//! against a newer one, on the same machine in the same hour).
//!
//! Binds 127.0.0.1 only. Needs a file-descriptor limit above 2 × connections (raised here
//! when the hard limit allows).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use token_proxy::testkit::{token_server, upstream_server, MockAuth, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let connections: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let credentials: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    raise_fd_limit(connections.max(credentials) * 2 + 1024);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        idle_connections(connections).await;
        many_credentials(credentials).await;
    });
}

fn raise_fd_limit(want: usize) {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let soft = (want as u64).min(hard);
    let _ = rlimit::Resource::NOFILE.set(soft, hard);
    if soft < want as u64 {
        eprintln!("warning: file descriptor limit {soft} is below {want}; results will be partial");
    }
}

struct Proxy {
    child: Child,
    addr: String,
    /// `server.admin_listen`, when the config sets one.
    admin_addr: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(toml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, toml).unwrap();
        let bin = std::env::var_os("TOKEN_PROXY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_token-proxy").into());
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .env("TOKEN_PROXY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("token-proxy");
        let addr = listen_addr(toml, "listen");
        let admin_addr = listen_addr(toml, "admin_listen");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "token-proxy did not start");
            if let Ok(Some(status)) = child.try_wait() {
                panic!("token-proxy exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Proxy {
            child,
            addr,
            admin_addr,
            _dir: dir,
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn rss_mib(&self) -> f64 {
        self.status_kib("VmRSS:") as f64 / 1024.0
    }

    /// utime + stime so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address `key = "..."` sets in `toml` (empty when it sets none).
fn listen_addr(toml: &str, key: &str) -> String {
    toml.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(" = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_default()
        .to_string()
}

/// GET `path` from `addr` (HTTP/1.1, one request); the body.
fn scrape(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("admin listener");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request on a fresh connection; the connection is returned open (keep-alive).
async fn used_connection(addr: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /v1/idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if got.len() >= end + 4 + len {
                return Ok(s);
            }
        }
    }
}

async fn idle_connections(n: usize) {
    let auth = MockAuth::new(Duration::from_secs(3600));
    let idp = token_server(auth.clone()).await;
    let api = MockUpstream::new("api", Some(auth.clone()));
    let api_server = upstream_server(api.clone()).await;
    let port = free_port();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"{}\"\ncredential = \"main\"\n\
         [credentials.main]\ngrant = \"client_credentials\"\ntoken_url = \"{}/oauth/token\"\n\
         client_id = \"cid\"\nclient_secret = \"client-secret-value\"\n",
        api_server.url, idp.url
    );
    let proxy = Proxy::start(&toml);
    let addr = Arc::new(proxy.addr.clone());
    // Warm: the token is fetched and one upstream connection pooled.
    drop(used_connection(&addr).await.expect("first request"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.rss_mib();
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    // In batches, as apps open connections: 200 at a time.
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut batch = Vec::new();
        for _ in chunk {
            let addr = addr.clone();
            batch.push(tokio::spawn(async move { used_connection(&addr).await }));
        }
        for b in batch {
            match b.await.unwrap() {
                Ok(s) => held.push(s),
                Err(_) => failed += 1,
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = proxy.rss_mib();
    let peak = proxy.status_kib("VmHWM:") as f64 / 1024.0;
    println!(
        "idle connections: {} held open after one request each ({failed} failed); \
         proxy RSS {before:.1} MiB before, {after:.1} MiB with them ({:.1} KiB per connection), \
         peak {peak:.1} MiB",
        held.len(),
        (after - before) * 1024.0 / held.len().max(1) as f64
    );
    drop(held);
}

async fn many_credentials(n: usize) {
    let auth = MockAuth::new(Duration::from_secs(3600));
    // Staggered expiries: the i-th token issued lives 1 h + i s.
    let lifetimes: Vec<Duration> = (0..n as u64 + 1)
        .map(|i| Duration::from_secs(3600 + i))
        .collect();
    auth.queue_lifetimes(&lifetimes);
    // Access tokens as Cotter issues them: ES256 JWTs (~330 bytes here).
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    auth.set_jwt_signer(Some(token_proxy::testkit::JwtSigner {
        key: jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
        algorithm: jsonwebtoken::Algorithm::ES256,
        kid: "scale".into(),
        issuer: "https://scale.example".into(),
        audience: "scale-api".into(),
    }));
    let idp = token_server(auth.clone()).await;
    let config = |count: usize| {
        let port = free_port();
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\ncredential = \"c0\"\n",
            free_port()
        );
        for i in 0..count {
            toml.push_str(&format!(
                "[credentials.c{i}]\ngrant = \"refresh_token\"\ntoken_url = \"{}/oauth/token\"\n\
                 client_id = \"cid\"\nrefresh_token = \"{}\"\n",
                idp.url,
                auth.new_refresh_token()
            ));
        }
        toml
    };
    let fetched = |calls: u64| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while auth.refresh_calls.load(std::sync::atomic::Ordering::SeqCst) < calls {
            assert!(Instant::now() < deadline, "credentials did not all fetch");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // mimalloc returns freed pages a second or two after they are freed.
    let settled_rss = |proxy: &Proxy| {
        std::thread::sleep(Duration::from_secs(3));
        proxy.rss_mib()
    };
    let one = Proxy::start(&config(1));
    tokio::task::block_in_place(|| fetched(1));
    let one_rss = tokio::task::block_in_place(|| settled_rss(&one));
    drop(one);
    let started = Instant::now();
    let many = Proxy::start(&config(n));
    tokio::task::block_in_place(|| fetched(1 + n as u64));
    let loaded_in = started.elapsed();
    let many_rss = tokio::task::block_in_place(|| settled_rss(&many));
    let many_peak = many.status_kib("VmHWM:") as f64 / 1024.0;
    // Idle: every credential waits for its own refresh time.
    let cpu_before = many.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = many.cpu_seconds() - cpu_before;
    // Prometheus scrapes /metrics: what does answering it leave behind?
    let metrics = tokio::task::block_in_place(|| scrape(&many.admin_addr, "/metrics"));
    assert!(metrics.contains("token_proxy_token_state"), "{metrics}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scraped_rss = many.rss_mib();
    println!(
        "credentials: {n} refresh_token credentials fetched and scheduled in {:.1} s; \
         RSS {one_rss:.1} MiB with 1, {many_rss:.1} MiB with {n} ({:.2} KiB per credential, \
         peak {many_peak:.1} MiB); CPU while all wait for their refresh: {:.2} s over 10 s; \
         after one /metrics scrape ({:.1} MB of text) RSS {scraped_rss:.1} MiB ({:.2} KiB per \
         credential)",
        loaded_in.as_secs_f64(),
        (many_rss - one_rss) * 1024.0 / n as f64,
        idle_cpu,
        metrics.len() as f64 / 1e6,
        (scraped_rss - one_rss) * 1024.0 / n as f64,
    );
}
