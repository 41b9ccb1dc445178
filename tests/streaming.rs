//! Bodies stream through: 200 MiB each way with the proxy's memory bounded.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const SIZE: u64 = 200 * 1024 * 1024;
/// Far below what buffering 200 MiB would take, far above the proxy's working set.
const MAX_PEAK_RSS_KIB: u64 = 96 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mib_each_way_with_bounded_memory() {
    let world = World::new(Duration::from_secs(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "proxy.toml", &world.config_rt("", ""));
    let bin = Binary::start(&cfg, &[("TOKEN_PROXY_LOG", "info")]);

    // Download: count bytes as they arrive.
    let resp = client()
        .get(bin.url(&format!("/big/{SIZE}")).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            received += d.len() as u64;
        }
    }
    assert_eq!(received, SIZE);

    // Upload on a route that replays on 401: the replay buffer gives up past max_retry_body.
    let uploader: Client<_, RepeatBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(bin.url("/upload"))
        .body(RepeatBody::new(SIZE))
        .unwrap();
    let resp = uploader.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let echoed: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echoed["body_len"], SIZE);

    let peak = bin.peak_rss_kib();
    eprintln!("proxy peak RSS: {peak} KiB");
    assert!(
        peak < MAX_PEAK_RSS_KIB,
        "proxy peak RSS {peak} KiB for 2 x 200 MiB"
    );
}
