//! Clients nobody here wrote, configured the way users configure them: curl and Python
//! `requests` with HTTP_PROXY pointing at the sidecar. (`.ci/run` installs both.)

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

async fn forward_proxy() -> (World, token_proxy::AppHandle) {
    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let toml = world
        .config("", &format!("refresh_token = \"{rt}\""))
        .replace("prefix = \"/\"", "hosts = [\"api.example.com\"]");
    let app = start(&toml).await;
    (world, app)
}

fn proxy_env(cmd: &mut Command, proxy: &str) {
    cmd.env("http_proxy", proxy)
        .env("HTTP_PROXY", proxy)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY");
}

/// `curl -w '%{http_code}'` through the proxy; returns (status, body).
fn curl(proxy: &str, target: &str) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}", target]);
    proxy_env(&mut cmd, proxy);
    let out = cmd
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

fn python_requests(proxy: &str, target: &str) -> (String, String) {
    let script = "import sys, requests\nr = requests.get(sys.argv[1], timeout=20)\nprint(r.status_code)\nprint(r.text)";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script, target]);
    proxy_env(&mut cmd, proxy);
    let out = cmd.output().expect("python3 must be installed");
    assert!(
        out.status.success(),
        "python requests failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    (code.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_http_proxy() {
    let (world, app) = forward_proxy().await;
    let proxy = format!("http://{}", app.proxy_addr);
    let (code, body) = tokio::task::spawn_blocking({
        let proxy = proxy.clone();
        move || curl(&proxy, "http://api.example.com/v1/me?x=1")
    })
    .await
    .unwrap();
    assert_eq!(code, "200", "{body}");
    let seen = world.api.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].authorized, "the bearer was attached");
    assert_eq!(seen[0].uri, "/v1/me?x=1");
    let (code, body) =
        tokio::task::spawn_blocking(move || curl(&proxy, "http://evil.example.net/steal"))
            .await
            .unwrap();
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("host_not_allowed"));
    assert_eq!(world.api.seen().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_with_http_proxy() {
    let (world, app) = forward_proxy().await;
    let proxy = format!("http://{}", app.proxy_addr);
    let (code, body) = tokio::task::spawn_blocking({
        let proxy = proxy.clone();
        move || python_requests(&proxy, "http://api.example.com/v1/orders")
    })
    .await
    .unwrap();
    assert_eq!(code, "200", "{body}");
    assert!(world.api.seen()[0].authorized);
    let (code, body) = tokio::task::spawn_blocking(move || {
        python_requests(&proxy, "http://api.example.com.evil.test/x")
    })
    .await
    .unwrap();
    assert_eq!(code, "403", "{body}");
    assert_eq!(world.api.seen().len(), 1);
    app.stop().await;
}
