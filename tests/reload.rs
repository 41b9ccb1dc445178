//! Reload without restart: SIGHUP, or a change to the config or a secret file it names.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use token_proxy::config::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_routes_and_keeps_unchanged_credentials() {
    let world = World::new(Duration::from_secs(300)).await;
    let other = MockUpstream::new("other", Some(world.auth.clone()));
    let other_server = upstream_server(other.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let base = world.config_rt("", "");
    let cfg = write_file(dir.path(), "proxy.toml", &base);
    let bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/other/x")).await.json()["upstream"], "api");
    assert_eq!(world.auth.refresh_calls.load(Ordering::SeqCst), 1);

    let extra = format!(
        "\n[[routes]]\nname = \"other\"\nprefix = \"/other\"\nupstream = \"{}\"\ncredential = \"main\"\n",
        other_server.url
    );
    std::fs::write(&cfg, format!("{base}{extra}")).unwrap();
    bin.signal("HUP");
    wait_for("the new route", Duration::from_secs(10), || async {
        get(&bin.url("/other/x")).await.json()["upstream"] == "other"
    })
    .await;
    assert!(other.seen()[0].authorized);
    assert_eq!(
        world.auth.refresh_calls.load(Ordering::SeqCst),
        1,
        "the unchanged credential kept its token"
    );
    // The route swaps inside the reload; its log line follows a moment later.
    wait_for(
        "the reload to be logged",
        Duration::from_secs(10),
        || async { bin.logs().contains("config reloaded") },
    )
    .await;

    // A broken config is refused; the running one keeps serving.
    std::fs::write(&cfg, "[[routes]]\nprefix = 7\n").unwrap();
    bin.signal("HUP");
    wait_for(
        "the rejection to be logged",
        Duration::from_secs(10),
        || async { bin.logs().contains("reload rejected") },
    )
    .await;
    assert_eq!(get(&bin.url("/other/y")).await.status, 200);
    assert_eq!(get(&bin.url("/z")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_credential_carries_its_rotated_refresh_token() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let rt = world.auth.new_refresh_token();
    let base = world.config("", &format!("refresh_token = \"{rt}\"\nscope = \"read\""));
    let cfg = write_file(dir.path(), "proxy.toml", &base);
    let bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/a")).await.status, 200);
    // The configured refresh token has been rotated away by now; no state file either.
    std::fs::write(
        &cfg,
        base.replace("scope = \"read\"", "scope = \"read write\""),
    )
    .unwrap();
    bin.signal("HUP");
    wait_for(
        "the changed credential to fetch with the new scope",
        Duration::from_secs(10),
        || async {
            world
                .auth
                .requests()
                .iter()
                .any(|r| r.params.get("scope").map(String::as_str) == Some("read write"))
        },
    )
    .await;
    assert_eq!(get(&bin.url("/b")).await.status, 200);
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "the rotated token was carried over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_refresh_token_in_a_watched_secret_file_revives_the_credential() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    // A Secret volume: the file is `token` behind Kubernetes' `..data` symlink.
    publish(dir.path(), "v1", &world.auth.new_refresh_token());
    let secret = dir.path().join("token");
    let state = dir.path().join("state.json");
    let cred = format!(
        "refresh_token_file = \"{}\"\nstate_file = \"{}\"",
        secret.display(),
        state.display()
    );
    let cfg = write_file(dir.path(), "proxy.toml", &world.config("", &cred));
    let bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/a")).await.status, 200);

    // The session is revoked: the credential needs re-authentication.
    world.auth.revoke_all_refresh();
    world.auth.revoke_all_access();
    assert_eq!(get(&bin.url("/b")).await.status, 503);
    // The operator updates the Secret (no signal): the new refresh token wins over the state file.
    publish(dir.path(), "v2", &world.auth.new_refresh_token());
    wait_for(
        "the credential to recover",
        Duration::from_secs(15),
        || async { get(&bin.url("/c")).await.status == 200 },
    )
    .await;
    assert!(bin.logs().contains("a watched file changed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_credential_leaves_only_its_refresh_counter_which_counts_on_when_it_returns() {
    let world = World::new(Duration::from_secs(300)).await;
    let base = world.config_rt("", "");
    let spare = format!(
        "\n[credentials.spare]\ngrant = \"refresh_token\"\ntoken_url = \"{}/oauth/token\"\nclient_id = \"cid\"\nrefresh_token = \"{}\"\n",
        world.idp.url,
        world.auth.new_refresh_token()
    );
    let app = start(&format!("{base}{spare}")).await;
    let series = |text: &str, credential: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("credential=\"{credential}\"")))
            .count()
    };
    wait_for("spare's token", Duration::from_secs(10), || async {
        get(&admin(&app, "/metrics"))
            .await
            .text()
            .contains("token_proxy_token_state{credential=\"spare\",state=\"fresh\"} 1")
    })
    .await;
    let before = get(&admin(&app, "/metrics")).await.text();
    assert!(series(&before, "spare") >= 6, "{before}");

    let config = Config::parse(&base, &|_| None).expect("valid config");
    app.reload(config).await.expect("reload");
    let after = get(&admin(&app, "/metrics")).await.text();
    // Its counter stays (a total of refreshes); its token gauges go with it. (A memory
    // store counts no leases: they exist between replicas.)
    let left: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("credential=\"spare\""))
        .collect();
    assert!(
        left.iter()
            .all(|l| l.starts_with("token_proxy_token_refresh_total")),
        "{left:?}"
    );
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(series(&after, "main") >= 6, "{after}");

    // Added again, and then rebuilt with a changed config: the counter counts on from what
    // its namesake counted (a counter never goes back), one fetch each time.
    let fetches = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("token_proxy_token_refresh_total{credential=\"spare\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(fetches(&after), 1, "{after}");
    let spare = spare.replace(
        "refresh_token = ",
        &format!("refresh_token = \"{}\"\n#", world.auth.new_refresh_token()),
    );
    for (round, extra) in [(2, ""), (3, "scope = \"more\"\n")] {
        let config = Config::parse(&format!("{base}{spare}{extra}"), &|_| None).expect("valid");
        app.reload(config).await.expect("reload");
        wait_for(
            "spare's next fetch counted",
            Duration::from_secs(10),
            || async { fetches(&get(&admin(&app, "/metrics")).await.text()) == round },
        )
        .await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_whose_new_config_cannot_be_built_keeps_running_the_old_one() {
    // Tokens live 2 s: the old refresher must go on refreshing after the failed rebuild.
    let world = World::new(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let rt = world.auth.new_refresh_token();
    let base = world.config("", &format!("refresh_token = \"{rt}\""));
    let cfg = write_file(dir.path(), "proxy.toml", &base);
    let bin = Binary::start(&cfg, &[]);
    assert_eq!(get(&bin.url("/a")).await.status, 200);
    // The new config puts the state file under a regular file: it cannot be built.
    let not_a_dir = write_file(dir.path(), "plain", "x");
    std::fs::write(
        &cfg,
        base.replace(
            &format!("refresh_token = \"{rt}\""),
            &format!(
                "refresh_token = \"{rt}\"\nstate_file = \"{}/state.json\"",
                not_a_dir.display()
            ),
        ),
    )
    .unwrap();
    bin.signal("HUP");
    wait_for(
        "the failed rebuild to be logged",
        Duration::from_secs(10),
        || async { bin.logs().contains("kept its old config") },
    )
    .await;
    let calls = world.auth.refresh_calls.load(Ordering::SeqCst);
    wait_for(
        "the old refresher to refresh again",
        Duration::from_secs(10),
        || async { world.auth.refresh_calls.load(Ordering::SeqCst) >= calls + 2 },
    )
    .await;
    assert_eq!(get(&bin.url("/b")).await.status, 200);
    assert_eq!(
        world.auth.reuse_detected.load(Ordering::SeqCst),
        0,
        "one refresher, holding the rotated token"
    );
}
