//! Shared test harness: the mock servers live in `token_proxy::testkit` (the demo uses them
//! too); this adds clients, a proxy launcher (in-process or the real binary) and polling.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use token_proxy::config::Config;
use token_proxy::{App, AppHandle};

pub use token_proxy::testkit::{
    token_server, upstream_server, ErrorStyle, MockAuth, MockServer, MockUpstream,
};

/// An HTTP/1.1 client as an app would use.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    send_with(&client(), method, url, headers, body).await
}

pub async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Reply {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// Poll `cond` until it holds, or panic after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An IdP and an API that trusts it.
pub struct World {
    pub auth: Arc<MockAuth>,
    pub idp: MockServer,
    pub api: Arc<MockUpstream>,
    pub api_server: MockServer,
}

impl World {
    pub async fn new(lifetime: Duration) -> World {
        Self::with_auth(MockAuth::new(lifetime)).await
    }

    pub async fn with_auth(auth: Arc<MockAuth>) -> World {
        let idp = token_server(auth.clone()).await;
        let api = MockUpstream::new("api", Some(auth.clone()));
        let api_server = upstream_server(api.clone()).await;
        World {
            auth,
            idp,
            api,
            api_server,
        }
    }

    /// A config with one route to the API and one refresh_token credential `main`;
    /// `extra_cred` is appended to `[credentials.main]`, `extra_route` to the route.
    pub fn config(&self, extra_route: &str, extra_cred: &str) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[[routes]]
name = "api"
prefix = "/"
upstream = "{api}"
credential = "main"
{extra_route}

[credentials.main]
grant = "refresh_token"
token_url = "{idp}/oauth/token"
client_id = "cid"
client_secret = "client-secret-value-123"
{extra_cred}
"#,
            api = self.api_server.url,
            idp = self.idp.url,
        )
    }
}

impl World {
    /// `config`, with a fresh refresh token of this IdP for `main`.
    pub fn config_rt(&self, extra_route: &str, extra_cred: &str) -> String {
        let rt = self.auth.new_refresh_token();
        self.config(
            extra_route,
            &format!("refresh_token = \"{rt}\"\n{extra_cred}"),
        )
    }
}

/// Run the proxy in-process from config text. `${VAR}` and the listen overrides see an
/// empty environment: tests never read (or write) the process environment, which sibling
/// tests share.
pub async fn start(toml: &str) -> AppHandle {
    start_with_env(toml, &[]).await
}

/// The same, with `vars` as the whole environment `${VAR}` can see.
pub async fn start_with_env(toml: &str, vars: &[(&str, &str)]) -> AppHandle {
    let env = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let config = Config::parse(toml, &env).expect("valid config");
    App::spawn(config).await.expect("proxy starts")
}

pub fn url(app: &AppHandle, path: &str) -> String {
    format!("http://{}{}", app.proxy_addr, path)
}

pub fn admin(app: &AppHandle, path: &str) -> String {
    format!("http://{}{}", app.admin_addr.expect("admin listener"), path)
}

// ------------------------------------------------------------------ the real binary

/// The `token-proxy` binary running as a child process; killed when dropped.
pub struct Binary {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Everything it wrote to stderr so far (its logs).
    pub logs: Arc<Mutex<String>>,
}

impl Binary {
    /// Start with `config` and extra environment; waits for the "listening" log line.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Binary {
        Self::start_in(Some(config), None, env)
    }

    /// Start with no `--config`, in directory `cwd` (for environment-only configs).
    pub fn start_in(config: Option<&Path>, cwd: Option<&Path>, env: &[(&str, &str)]) -> Binary {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-proxy"));
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        cmd.env_remove("TOKEN_PROXY_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        cmd.env_remove("TOKEN_PROXY_LISTEN")
            .env_remove("TOKEN_PROXY_ADMIN_LISTEN");
        if !env.iter().any(|(k, _)| *k == "TOKEN_PROXY_LOG") {
            cmd.env("TOKEN_PROXY_LOG", "debug");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn token-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("token-proxy did not start; logs:\n{}", logs.lock().unwrap());
            }
        };
        let (proxy, admin) = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) => (
                v["fields"]["proxy"].as_str().unwrap().to_string(),
                v["fields"]["admin"].as_str().unwrap().to_string(),
            ),
            Err(_) => (
                field(&line, "proxy=").to_string(),
                field(&line, "admin=").to_string(),
            ),
        };
        let proxy = proxy.parse().expect("proxy addr");
        let admin = admin.parse().ok();
        Binary {
            child,
            proxy,
            admin,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("admin"), path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Wait for exit (bounded) and return the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("token-proxy did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory of the process so far, in KiB (from /proc).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(key)
        .map(|i| i + key.len())
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    let rest = &line[start..];
    rest.split_whitespace().next().unwrap_or(rest)
}

/// Run the binary to completion with args; returns (exit code, stdout, stderr).
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-proxy"));
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("TOKEN_PROXY_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run token-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Send raw bytes on a new connection and read until the peer closes or `timeout`.
pub async fn raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough: stop at the end of a content-length body.
                if let Ok(text) = std::str::from_utf8(&out) {
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end].lines().find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        });
                        if let Some(len) = len {
                            if out.len() >= head_end + 4 + len {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request body of `len` bytes produced chunk by chunk (never held in memory).
pub struct RepeatBody {
    pub remaining: u64,
    pub chunk: Bytes,
}

impl RepeatBody {
    pub fn new(len: u64) -> RepeatBody {
        RepeatBody {
            remaining: len,
            chunk: Bytes::from(vec![b'y'; 64 * 1024]),
        }
    }
}

impl http_body::Body for RepeatBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// Write `text` to a file in `dir` and return its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// A fresh ES256 key: the signer a mock IdP uses, and its public JWK (as Cotter publishes).
pub fn es256_signer(
    kid: &str,
    issuer: &str,
    audience: &str,
) -> (token_proxy::testkit::JwtSigner, serde_json::Value) {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed P-256 point");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    });
    let signer = token_proxy::testkit::JwtSigner {
        key: jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
        algorithm: jsonwebtoken::Algorithm::ES256,
        kid: kid.to_string(),
        issuer: issuer.to_string(),
        audience: audience.to_string(),
    };
    (signer, jwk)
}

/// A JWKS endpoint serving `keys`, with a hit counter.
pub struct Jwks {
    pub doc: Arc<Mutex<serde_json::Value>>,
    pub hits: Arc<std::sync::atomic::AtomicU64>,
    pub server: MockServer,
}

impl Jwks {
    pub async fn serve(keys: Vec<serde_json::Value>) -> Jwks {
        let doc = Arc::new(Mutex::new(serde_json::json!({ "keys": keys })));
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let server = token_proxy::testkit::json_server(doc.clone(), hits.clone()).await;
        Jwks { doc, hits, server }
    }

    pub fn set_keys(&self, keys: Vec<serde_json::Value>) {
        *self.doc.lock().unwrap() = serde_json::json!({ "keys": keys });
    }
}

/// Lay out a Kubernetes-style volume holding one file `token`:
/// `token -> ..data/token`, `..data -> ..<version>`; a new version swaps `..data` atomically.
pub fn publish(volume: &Path, version: &str, token: &str) {
    let dir = volume.join(format!("..{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    let tmp = volume.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap(); // atomic swap
    if !volume.join("token").exists() {
        std::os::unix::fs::symlink("..data/token", volume.join("token")).unwrap();
    }
}

/// A fixed 2048-bit RSA test key (ring cannot generate RSA keys): a signer for `alg`
/// (RS256, PS256...) and its public JWK.
pub fn rsa_signer(
    kid: &str,
    alg: jsonwebtoken::Algorithm,
    issuer: &str,
    audience: &str,
) -> (token_proxy::testkit::JwtSigner, serde_json::Value) {
    let pem = include_bytes!("rsa_test_key.pem");
    let n = include_str!("rsa_test_key.n").trim();
    let jwk = serde_json::json!({
        "kty": "RSA", "use": "sig", "kid": kid, "n": n, "e": "AQAB",
    });
    let signer = token_proxy::testkit::JwtSigner {
        key: jsonwebtoken::EncodingKey::from_rsa_pem(pem).expect("RSA test key"),
        algorithm: alg,
        kid: kid.to_string(),
        issuer: issuer.to_string(),
        audience: audience.to_string(),
    };
    (signer, jwk)
}

/// A private `redis-server` on a free loopback port, without persistence, stopped on drop.
/// (`scripts/test` installs the Debian package when it is missing.)
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// Start (again) on `port`: an empty Redis, as after a restart without persistence.
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &["--port", &port.to_string()])
    }

    /// A TLS-only Redis (`rediss://`) with a certificate from a private CA, requiring
    /// `password`. Returns the server and the CA's PEM file (in `dir`).
    pub fn start_tls(dir: &Path, password: &str) -> (RedisServer, std::path::PathBuf) {
        let ca = TestCa::new("token-proxy test Redis CA");
        let (leaf, leaf_key) = ca.server();
        let ca_path = write_file(dir, "redis-ca.pem", &ca.cert.pem());
        let cert = write_file(dir, "redis.crt", &leaf.pem());
        let key = write_file(dir, "redis.key", &leaf_key.serialize_pem());
        let port = free_port();
        let server = Self::start_with(
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                ca_path.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                password,
            ],
        );
        (server, ca_path)
    }

    fn start_with(port: u16, listen: &[&str]) -> RedisServer {
        let child = std::process::Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Binary {
    /// SIGKILL now (no `kill` process in between, for precise timing) and reap it.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay to `127.0.0.1:target` that can be paused: while paused it keeps every
/// connection open and accepts new ones, but moves no byte in either direction (what a
/// Redis behind a stalled network looks like: no error, no answer). Bytes held while
/// paused are delivered on resume, as TCP would.
pub struct Relay {
    pub port: u16,
    paused: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let paused = tokio::sync::watch::Sender::new(false);
        let gate = paused.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((app, _)) = listener.accept().await else {
                    return;
                };
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (ar, aw) = app.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        Self::pump(ar, sw, gate.subscribe()),
                        Self::pump(sr, aw, gate.subscribe())
                    );
                });
            }
        });
        Relay { port, paused, task }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut paused: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if paused.wait_for(|p| !*p).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if paused.wait_for(|p| !*p).await.is_err() {
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A private CA for TLS tests, and the leaf certificates it signs.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A leaf signed by this CA, with a fresh P-256 key.
    pub fn sign(&self, params: rcgen::CertificateParams) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> (rcgen::Certificate, rcgen::KeyPair) {
        self.sign(
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap(),
        )
    }
}

/// A free port on 127.0.0.1 (bound once, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
