//! Many routes over many credentials, mixed grants, each on its own refresh schedule: a
//! token only ever reaches its own route's upstream.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_routes_five_credentials_each_upstream_sees_only_its_own_token() {
    // Five credentials: two refresh_token, two client_credentials, one static; each OAuth
    // one has its own identity provider so every token can be traced to its credential.
    let lifetimes = [2u64, 3, 2, 4];
    let mut idps = Vec::new();
    for secs in lifetimes {
        let auth = MockAuth::new(Duration::from_secs(secs));
        let server = token_server(auth.clone()).await;
        idps.push((auth, server));
    }
    let mut toml =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n");
    for (i, (auth, server)) in idps.iter().enumerate() {
        let grant = if i < 2 {
            format!(
                "grant = \"refresh_token\"\nrefresh_token = \"{}\"",
                auth.new_refresh_token()
            )
        } else {
            format!(
                "grant = \"client_credentials\"\nclient_id = \"c{i}\"\nclient_secret = \"s{i}\""
            )
        };
        toml.push_str(&format!(
            "[credentials.c{i}]\n{grant}\ntoken_url = \"{}/token\"\n",
            server.url
        ));
    }
    toml.push_str("[credentials.c4]\ngrant = \"static\"\naccess_token = \"static-token-for-c4\"\n");

    let mut upstreams = Vec::new();
    for r in 0..20 {
        let api = MockUpstream::new(&format!("u{r}"), None);
        let server = upstream_server(api.clone()).await;
        toml.push_str(&format!(
            "[[routes]]\nname = \"r{r}\"\nprefix = \"/r{r}/\"\nstrip_prefix = true\nupstream = \"{}\"\ncredential = \"c{}\"\n",
            server.url,
            r % 5
        ));
        upstreams.push((api, server));
    }
    let app = start(&toml).await;

    // Cross several expiries, hitting every route each round.
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let mut tasks = Vec::new();
        for r in 0..20 {
            let u = url(&app, &format!("/r{r}/item"));
            tasks.push(tokio::spawn(async move { get(&u).await.status }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let owner = |token: &str| -> Option<usize> {
        if token == "static-token-for-c4" {
            return Some(4);
        }
        idps.iter().position(|(auth, _)| auth.issued(token))
    };
    for (r, (api, _)) in upstreams.iter().enumerate() {
        let seen = api.seen();
        assert_eq!(seen.len(), rounds, "route r{r} got every request");
        for s in &seen {
            assert_eq!(s.uri, "/item");
            let auths: Vec<_> = s.headers.get_all("authorization").iter().collect();
            assert_eq!(auths.len(), 1);
            let token = auths[0].to_str().unwrap().trim_start_matches("Bearer ");
            assert_eq!(
                owner(token),
                Some(r % 5),
                "route r{r} received a token of another credential"
            );
        }
    }
    for (i, (auth, _)) in idps.iter().enumerate() {
        let calls = auth.refresh_calls.load(std::sync::atomic::Ordering::SeqCst)
            + auth
                .client_credentials_calls
                .load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            calls >= 2,
            "credential c{i} refreshed on its own schedule ({calls} fetches)"
        );
    }
    app.stop().await;
}
