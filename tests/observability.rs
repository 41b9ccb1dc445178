//! Metrics checked with a real Prometheus text-format parser, and the log lines operators
//! rely on (one per request, one per refresh; no query strings; text or JSON).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_the_official_python_parser() {
    let world = World::new(Duration::from_secs(300)).await;
    let app = start(&world.config_rt("", "")).await;
    for i in 0..3 {
        assert_eq!(get(&url(&app, &format!("/m/{i}"))).await.status, 200);
    }
    world.auth.revoke_all_access();
    assert_eq!(get(&url(&app, "/m/replay")).await.status, 200);
    let text = get(&admin(&app, "/metrics")).await.text();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "metrics.txt", &text);
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the exposition must parse (.ci/run installs prometheus_client): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expect = [
        ("token_proxy_requests", "counter"),
        ("token_proxy_request_duration_seconds", "histogram"),
        ("token_proxy_upstream_retries", "counter"),
        ("token_proxy_token_refresh", "counter"),
        ("token_proxy_token_expires_in_seconds", "gauge"),
        ("token_proxy_token_seconds_since_refresh", "gauge"),
        ("token_proxy_token_state", "gauge"),
        ("token_proxy_build", "info"),
    ];
    for (name, kind) in expect {
        assert_eq!(families[name]["type"], kind, "{name} in {families}");
    }
    let samples = |name: &str| families[name]["samples"].as_array().unwrap().clone();
    let ok = samples("token_proxy_requests")
        .into_iter()
        .find(|s| s[0] == "token_proxy_requests_total" && s[1]["status"] == "200")
        .unwrap();
    assert_eq!(ok[1]["class"], "2xx");
    assert_eq!(ok[2], 4.0);
    let buckets: Vec<f64> = samples("token_proxy_request_duration_seconds")
        .iter()
        .filter(|s| s[0] == "token_proxy_request_duration_seconds_bucket")
        .filter_map(|s| s[1]["le"].as_str().and_then(|le| le.parse().ok()))
        .collect();
    assert_eq!(buckets.first(), Some(&0.001));
    assert!(buckets.contains(&10.0));
    let fresh = samples("token_proxy_token_state")
        .into_iter()
        .find(|s| s[1]["state"] == "fresh")
        .unwrap();
    assert_eq!(fresh[2], 1.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_line_per_request_and_refresh_in_json() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "proxy.toml", &world.config_rt("", ""));
    let bin = Binary::start(
        &cfg,
        &[
            ("TOKEN_PROXY_LOG", "info"),
            ("TOKEN_PROXY_LOG_FORMAT", "json"),
        ],
    );
    assert_eq!(
        get(&bin.url("/v1/orders?customer=secret-query-value"))
            .await
            .status,
        200
    );
    world.auth.revoke_all_access();
    assert_eq!(get(&bin.url("/v1/replayed")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = bin.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let requests: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 2, "{logs}");
    let first = &requests[0]["fields"];
    assert_eq!(first["route"], "api");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/v1/orders");
    assert_eq!(first["status"], 200);
    assert!(first["latency_ms"].is_number() && first["upstream_ms"].is_number());
    assert_eq!(first["replayed"], false);
    assert_eq!(requests[1]["fields"]["replayed"], true);
    assert!(
        !logs.contains("secret-query-value"),
        "no query strings in logs"
    );
    let refreshes: Vec<_> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "token refreshed")
        .collect();
    assert_eq!(refreshes.len(), 2);
    assert_eq!(refreshes[0]["fields"]["credential"], "main");
    assert_eq!(refreshes[0]["fields"]["outcome"], "ok");
    assert!(refreshes[0]["fields"]["next_refresh_in_s"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refreshes_log_the_outcome_and_query_logging_is_opt_in() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = world.config_rt("", "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nlog_query = true",
    );
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let bin = Binary::start(&cfg, &[("TOKEN_PROXY_LOG", "info")]);
    assert_eq!(get(&bin.url("/v1/search?q=visible")).await.status, 200);
    world
        .auth
        .fail_with(Some(http::StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(
        send(
            http::Method::POST,
            &bin.admin_url("/tokens/main/refresh"),
            &[],
            ""
        )
        .await
        .status,
        502
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = bin.logs();
    assert!(logs.contains("path=/v1/search?q=visible"), "{logs}");
    let failed = logs
        .lines()
        .find(|l| l.contains("token refresh failed"))
        .expect("a failure line");
    assert!(
        failed.contains("outcome=\"error\"") || failed.contains("outcome=error"),
        "{failed}"
    );
    assert!(failed.contains("retry_in_ms="), "{failed}");
}
