//! Paths and hosts as apps (and attackers) send them: normalisation, route selection by
//! whole segments, upstream URI building and the Host/Origin checks never panic; a
//! normalised path has no dot-segments left, and a route only matches under its prefix.
#![no_main]

use std::sync::OnceLock;

use http::Uri;
use libfuzzer_sys::fuzz_target;
use token_proxy::access::{host_part, AccessPolicy};
use token_proxy::config::Config;
use token_proxy::routes::{normalize_path, prefix_matches, RouteTable};

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config = Config::parse(
            r#"
            [[routes]]
            name = "root"
            prefix = "/"
            upstream = "http://127.0.0.1:1"
            [[routes]]
            name = "api"
            prefix = "/api"
            strip_prefix = true
            upstream = "https://api.example.com/v2"
            hosts = ["api.example.com"]
            "#,
            &|_| None,
        )
        .unwrap();
        RouteTable::from_config(&config).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(path) = normalize_path(text) {
        let again = normalize_path(&path).expect("normal paths stay normal");
        assert_eq!(again, path, "normalising is idempotent");
        if path.starts_with('/') {
            for seg in path.split('/') {
                let decoded = seg.replace("%2e", ".").replace("%2E", ".");
                assert!(decoded != "." && decoded != "..", "{path:?}");
            }
        }
        if let Ok(route) = table().by_path(&path) {
            if &*route.name == "api" {
                assert!(prefix_matches("/api", &path), "{path:?}");
            }
            if let Ok(uri) = text.parse::<Uri>() {
                let _ = route.upstream_uri(&uri, &path);
            }
        }
        let _ = table().by_host(text, Some(80), &path);
    }
    let policy = AccessPolicy {
        allowed_hosts: vec!["token-proxy".into()],
        allowed_origins: vec![],
    };
    if policy.check_host(Some(text)).is_ok() {
        let name = host_part(text).to_ascii_lowercase();
        assert!(
            name == "token-proxy"
                || name == "localhost"
                || name.ends_with(".localhost")
                || name.parse::<std::net::IpAddr>().is_ok(),
            "{text:?} accepted as {name:?}"
        );
    }
});
