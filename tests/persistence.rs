//! Rotation is durable: a proxy killed with SIGKILL and restarted never presents a refresh
//! token the server has already rotated away (which would revoke the whole family).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;

async fn refresh_count(bin: &Binary) -> u64 {
    get(&bin.admin_url("/tokens")).await.json()["main"]["refresh_count"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_keeps_the_rotated_refresh_token() {
    let world = World::new(Duration::from_secs(1)).await;
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
    for i in 0..10 {
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
