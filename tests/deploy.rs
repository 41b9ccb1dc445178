//! The shipped Kubernetes example carries a config that actually validates.
//! (The manifests themselves are checked against the Kubernetes schemas by `.ci/run`.)

mod support;

use support::*;

#[test]
fn the_configmap_proxy_toml_is_valid() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/configmap.yaml"
    ))
    .unwrap();
    let start = yaml.find("proxy.toml: |\n").expect("proxy.toml key") + "proxy.toml: |\n".len();
    let toml: String = yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    // The Secret's files, as the volume would provide them.
    let dir = tempfile::tempdir().unwrap();
    let secrets = "/var/run/secrets/token-proxy";
    write_file(dir.path(), "client_secret", "s");
    write_file(dir.path(), "refresh_token", "r");
    let toml = toml.replace(secrets, dir.path().to_str().unwrap());
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let (code, out, err) = run_binary(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("route orders-api") && out.contains("admin=0.0.0.0:9901"),
        "{out}"
    );
}
