//! The container image, run as a platform would run it: read-only root filesystem, user
//! 65532, configured by `TOKEN_PROXY_*` variables alone, state on a mounted volume. An app
//! request through the container reaches a mock upstream with the token attached (the
//! token endpoint named `localhost`: name resolution works in the empty image);
//! `/readyz` turns 200; `podman stop` (SIGTERM) exits 0 within the grace; the state file
//! lands in the volume with mode 0600; the image is at most 15 MB.
//!
//! Needs the image: `bash scripts/image token-proxy:test`, then
//! `TOKEN_PROXY_IMAGE=token-proxy:test cargo test --test image` (what `.ci/run` does).
//! Without `TOKEN_PROXY_IMAGE` this test says it did not run; with it, any failure to run
//! podman fails the test — never a silent skip.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;

/// podman as these machines run it (see scripts/image).
fn podman(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("podman");
    if which("runc") {
        cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    }
    let out = cmd
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("TOKEN_PROXY_IMAGE is set but podman cannot be run: {e}"));
    out
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_read_only_as_non_root_from_the_environment() {
    let Ok(image) = std::env::var("TOKEN_PROXY_IMAGE") else {
        eprintln!(
            "NOT RUN: set TOKEN_PROXY_IMAGE (bash scripts/image token-proxy:test) to test the image"
        );
        return;
    };
    let size: u64 = ok(
        podman(&["image", "inspect", "--format", "{{.Size}}", &image]),
        "podman image inspect",
    )
    .parse()
    .unwrap();
    eprintln!("image {image}: {size} bytes");
    assert!(size <= 15_000_000, "image is {size} bytes, over 15 MB");

    let world = World::new(Duration::from_secs(300)).await;
    let rt = world.auth.new_refresh_token();
    let state = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(state.path(), Some(65532), Some(65532)).unwrap();
    let (port, admin) = (free_port(), free_port());
    let name = format!("token-proxy-test-{}", std::process::id());
    let env = [
        format!("TOKEN_PROXY_LISTEN=127.0.0.1:{port}"),
        format!("TOKEN_PROXY_ADMIN_LISTEN=127.0.0.1:{admin}"),
        format!("TOKEN_PROXY_UPSTREAM={}", world.api_server.url),
        // By name: resolved inside the empty image (static glibc, the engine's /etc/hosts).
        format!(
            "TOKEN_PROXY_TOKEN_URL={}/oauth/token",
            world.idp.url.replace("127.0.0.1", "localhost")
        ),
        "TOKEN_PROXY_CLIENT_ID=cid".to_string(),
        "TOKEN_PROXY_CLIENT_SECRET=client-secret-value-123".to_string(),
        format!("TOKEN_PROXY_REFRESH_TOKEN={rt}"),
        "TOKEN_PROXY_STATE_FILE=/var/lib/token-proxy/main.json".to_string(),
        "TOKEN_PROXY_SHUTDOWN_GRACE=5s".to_string(),
    ];
    let volume = format!("{}:/var/lib/token-proxy", state.path().display());
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        &volume,
    ];
    for e in &env {
        args.extend(["-e", e.as_str()]);
    }
    args.push(&image);
    let _ = podman(&["rm", "-f", &name]);
    ok(podman(&args), "podman run");
    let cleanup = scopeguard(name.clone());

    let ready = format!("http://127.0.0.1:{admin}/readyz");
    wait_for("/readyz 200", Duration::from_secs(30), || async {
        let client = client();
        let req = http::Request::get(ready.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        matches!(client.request(req).await, Ok(r) if r.status() == 200)
    })
    .await;

    let r = get(&format!("http://127.0.0.1:{port}/v1/from-the-app")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = world.api.seen();
    let auth = seen.last().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    let token = auth.strip_prefix("Bearer ").expect("a bearer token");
    assert!(world.auth.issued(token), "the IdP's token was attached");
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 1);

    let file = state.path().join("main.json");
    let mode = std::fs::metadata(&file)
        .expect("the state file in the mounted volume")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "state file mode {mode:o}");

    let stopping = Instant::now();
    ok(podman(&["stop", "-t", "10", &name]), "podman stop");
    let took = stopping.elapsed();
    let code = ok(
        podman(&["inspect", "--format", "{{.State.ExitCode}}", &name]),
        "podman inspect",
    );
    let logs = podman(&["logs", &name]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(logs.contains("listening"), "the container's logs: {logs}");
    assert_eq!(code, "0", "exit code after SIGTERM; logs:\n{logs}");
    assert!(
        took < Duration::from_secs(8),
        "stopped within the grace: {took:?}"
    );
    assert!(
        !logs.contains(&rt) && !logs.contains(token),
        "a secret in the logs"
    );
    drop(cleanup);
}

/// Removes the container however the test ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.0]);
    }
}

fn scopeguard(name: String) -> Cleanup {
    Cleanup(name)
}
