//! Rotation is durable: a proxy killed with SIGKILL and restarted never presents a refresh
//! token the server has already rotated away (which would revoke the whole family).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Method;
use support::*;

async fn refresh_count(bin: &Binary) -> u64 {
    get(&bin.admin_url("/tokens")).await.json()["main"]["refresh_count"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_keeps_the_rotated_refresh_token() {
    // Tokens live 2 s, so the next rotation is ~1 s after the one the kill follows: a kill
    // that lands while a rotation is in flight (the provider has rotated, the proxy has not
    // yet saved the answer) would lose the session with any client, and is not what this
    // tests. With 1 s tokens a loaded machine sometimes took that long to kill.
    let world = World::new(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state/main.json");
    let rt = world.auth.new_refresh_token();
    let cfg = write_file(
        dir.path(),
        "proxy.toml",
        &world.config(
            "",
            &format!(
                "refresh_token = \"{rt}\"\nstate_file = \"{}\"",
                state.display()
            ),
        ),
    );
    let mut bin = Binary::start(&cfg, &[]);
    for round in 0..3 {
        for i in 0..5 {
            let r = get(&bin.url(&format!("/round/{round}/{i}"))).await;
            assert_eq!(r.status, 200, "round {round}: {}", r.text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Kill right after a rotation has been published (and so persisted).
        let before = refresh_count(&bin).await;
        wait_for("a rotation", Duration::from_secs(10), || async {
            refresh_count(&bin).await > before
        })
        .await;
        bin.child.kill().unwrap();
        bin.child.wait().unwrap();
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Restart with the very same config, whose refresh_token is long dead.
        bin = Binary::start(&cfg, &[]);
        let r = get(&bin.url(&format!("/after-restart/{round}"))).await;
        assert_eq!(r.status, 200, "after restart {round}: {}", r.text());
    }
    // Keep going across a few more rotations.
    for i in 0..20 {
        assert_eq!(get(&bin.url(&format!("/tail/{i}"))).await.status, 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "no rotated refresh token was ever presented again"
    );
    assert!(world.auth.refresh_calls.load(Ordering::SeqCst) >= 6);
    assert_eq!(world.auth.rejected_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_access_token_still_valid_is_used_without_a_refresh() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("main.json");
    let rt = world.auth.new_refresh_token();
    let cfg = write_file(
        dir.path(),
        "proxy.toml",
        &world.config(
            "",
            &format!(
                "refresh_token = \"{rt}\"\nstate_file = \"{}\"",
                state.display()
            ),
        ),
    );
    let bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/a")).await.status, 200);
    drop(bin);
    let bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/b")).await.status, 200);
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        1,
        "the restart reused the saved token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_startup_instead_of_being_overwritten() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = write_file(dir.path(), "main.json", "{half a file");
    let cfg = write_file(
        dir.path(),
        "proxy.toml",
        &world.config(
            "",
            &format!(
                "refresh_token = \"x\"\nstate_file = \"{}\"",
                state.display()
            ),
        ),
    );
    let (code, _, stderr) = run_binary(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("state file"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{half a file",
        "left untouched for the user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_cannot_be_saved_is_reported_and_written_once_it_can() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let state = state_dir.join("main.json");
    let app = start(&world.config_rt("", &format!("state_file = \"{}\"", state.display()))).await;
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200);
    assert_eq!(
        get(&admin(&app, "/tokens/main")).await.json()["persisted"],
        true
    );

    // The volume goes bad (root ignores modes, so the directory is swapped for a file).
    let aside = dir.path().join("state.aside");
    std::fs::rename(&state_dir, &aside).unwrap();
    std::fs::write(&state_dir, "not a directory").unwrap();
    let r = send(Method::POST, &admin(&app, "/tokens/main/refresh"), &[], "").await;
    assert_eq!(
        r.status,
        200,
        "the rotation is kept in memory: {}",
        r.text()
    );
    assert_eq!(get(&url(&app, "/v1/x")).await.status, 200, "still serving");
    let status = get(&admin(&app, "/tokens/main")).await.json();
    assert_eq!(status["persisted"], false, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("state_file"),
        "{status}"
    );
    let metrics = get(&admin(&app, "/metrics")).await.text();
    assert!(
        metrics.contains("token_proxy_state_persisted{credential=\"main\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("token_proxy_state_write_failures_total{credential=\"main\"}"),
        "{metrics}"
    );

    // The volume comes back: the write is retried until it lands, unprompted.
    std::fs::remove_file(&state_dir).unwrap();
    std::fs::rename(&aside, &state_dir).unwrap();
    wait_for(
        "the state file to be written",
        Duration::from_secs(30),
        || async { get(&admin(&app, "/tokens/main")).await.json()["persisted"] == true },
    )
    .await;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let current = app
        .store
        .get("main")
        .unwrap()
        .refresh_token_now()
        .await
        .unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        saved["refresh_token"],
        current.expose_secret(),
        "the rotated token is on disk"
    );
    let metrics = get(&admin(&app, "/metrics")).await.text();
    assert!(metrics.contains("token_proxy_state_persisted{credential=\"main\"} 1"));
    app.stop().await;
}

#[test]
fn an_unsafe_or_unwritable_state_directory_is_refused_at_start_and_by_check() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let not_a_dir = write_file(dir.path(), "file", "x");
    let linked = dir.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", linked.join("main.json")).unwrap();
    let cases = [
        (shared.join("main.json"), "writable by other users"),
        (not_a_dir.join("main.json"), "state"),
        (linked.join("main.json"), "symbolic link"),
    ];
    for (state, why) in cases {
        let toml = format!(
            r#"[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:1"
credential = "main"
[credentials.main]
grant = "refresh_token"
token_url = "http://127.0.0.1:1/token"
refresh_token = "rt"
state_file = "{}"
"#,
            state.display()
        );
        let cfg = write_file(dir.path(), "proxy.toml", &toml);
        for args in [
            vec!["check", "--config", cfg.to_str().unwrap()],
            vec!["--config", cfg.to_str().unwrap()],
        ] {
            let (code, _, stderr) = run_binary(&args, &[]);
            assert_eq!(code, 2, "{args:?} {state:?}: {stderr}");
            assert!(
                stderr.contains("credentials.main.state_file") && stderr.contains(why),
                "{stderr}"
            );
        }
    }
    // A sticky world-writable directory we own is fine (like a private /tmp).
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let toml = std::fs::read_to_string(dir.path().join("proxy.toml"))
        .unwrap()
        .replace(linked.to_str().unwrap(), shared.to_str().unwrap());
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let (code, _, stderr) = run_binary(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stderr}");
}
