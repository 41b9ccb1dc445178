//! `token-proxy demo`: the whole product on one screen, with no network and no setup.
//!
//! Starts the mock token server (5 s tokens, rotating refresh tokens, family revocation on
//! reuse), an upstream that checks every bearer, and the real proxy in front of it; then
//! plays a legacy app that sends plain requests for ~20 s. Halfway through, the upstream
//! revokes the token in use, so a 401 is replayed. Ends with a summary.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;
use crate::testkit::{token_server, upstream_server, MockAuth, MockUpstream};
use crate::App;

const TOKEN_LIFETIME: Duration = Duration::from_secs(5);
const RUN_FOR: Duration = Duration::from_secs(20);
const EVERY: Duration = Duration::from_millis(500);

pub async fn run() -> ExitCode {
    match run_inner().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run_inner() -> Result<bool, String> {
    let auth = MockAuth::new(TOKEN_LIFETIME);
    let idp = token_server(auth.clone()).await;
    let api = MockUpstream::new("demo-api", Some(auth.clone()));
    let api_server = upstream_server(api.clone()).await;
    let state_dir = std::env::temp_dir().join(format!("token-proxy-demo-{}", std::process::id()));
    let toml = format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        [[routes]]
        name = "api"
        prefix = "/"
        upstream = "{api}"
        credential = "demo"
        [credentials.demo]
        grant = "refresh_token"
        token_url = "{idp}/oauth/token"
        client_id = "demo-client"
        refresh_token = "{rt}"
        state_file = "{state}"
        "#,
        api = api_server.url,
        idp = idp.url,
        rt = auth.new_refresh_token(),
        state = state_dir.join("demo.json").display(),
    );
    let config = Config::parse(&toml, &|_| None).map_err(|e| e.to_string())?;
    let app = App::spawn(config).await.map_err(|e| e.to_string())?;
    let proxy = app.proxy_addr;
    println!("token-proxy demo");
    println!(
        "  token server  {}   (tokens live {}s, refresh tokens rotate)",
        idp.url,
        TOKEN_LIFETIME.as_secs()
    );
    println!(
        "  upstream API  {}   (answers 401 unless the bearer is valid)",
        api_server.url
    );
    println!(
        "  proxy         http://{proxy}   admin http://{}",
        app.admin_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    println!("  the app below sends plain requests with no Authorization header\n");

    // Print each refresh as it happens.
    let credential = app.store.get("demo").ok_or("credential missing")?;
    let mut seen = credential.version();
    let started = Instant::now();
    let watcher = tokio::spawn(async move {
        let mut last_gen = 0;
        loop {
            seen = credential.changed_since(seen).await;
            let snap = credential.snapshot();
            let generation = snap.token.as_ref().map_or(0, |t| t.generation);
            if generation != last_gen {
                last_gen = generation;
                println!(
                    "[{:>5.1}s] refresh   new token #{generation} (refresh token rotated and saved to the state file first)",
                    started.elapsed().as_secs_f64()
                );
            } else if snap.invalidated {
                println!("[{:>5.1}s] 401       upstream refused token #{generation}: one shared refresh, then replay", started.elapsed().as_secs_f64());
            }
        }
    });

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (mut sent, mut ok, mut failed) = (0u32, 0u32, 0u32);
    let mut revoked = false;
    while started.elapsed() < RUN_FOR {
        if !revoked && started.elapsed() >= RUN_FOR / 2 {
            revoked = true;
            println!(
                "[{:>5.1}s] revoke    the upstream revokes the token in use",
                started.elapsed().as_secs_f64()
            );
            auth.revoke_all_access();
        }
        sent += 1;
        let uri = format!("http://{proxy}/v1/orders/{sent}");
        let t0 = Instant::now();
        let outcome = match client.get(uri.parse().map_err(|e| format!("{e}"))?).await {
            Ok(resp) => {
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                status.as_u16()
            }
            Err(_) => 0,
        };
        if outcome == 200 {
            ok += 1;
        } else {
            failed += 1;
        }
        println!(
            "[{:>5.1}s] request   GET /v1/orders/{sent} -> {outcome} in {:.1} ms",
            started.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        tokio::time::sleep(EVERY).await;
    }
    watcher.abort();
    let refreshes = auth.refresh_calls.load(Ordering::SeqCst);
    let replays = api.unauthorized.load(Ordering::SeqCst);
    let reuse = auth.reuse_detected.load(Ordering::SeqCst);
    println!("\nsummary");
    println!("  requests sent by the app        {sent}");
    println!("  answered 200                    {ok}");
    println!("  token refreshes (single flight) {refreshes}");
    println!("  401s replayed by the proxy      {replays}");
    println!("  refresh tokens reused           {reuse}");
    println!("  client-visible failures         {failed}");
    app.stop().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(failed == 0 && reuse == 0)
}
