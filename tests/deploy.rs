//! The shipped Kubernetes example carries a config that actually validates.
//! (The manifests themselves are checked against the Kubernetes schemas by `.ci/run`.)

mod support;

use support::*;

/// Run `token-proxy check` on the proxy.toml of `configmap`, with the Secret's files as the
/// volume would provide them; returns what check printed.
fn check_configmap(configmap: &str, secrets: &[(&str, &str)]) -> String {
    let yaml =
        std::fs::read_to_string(format!("{}/deploy/{configmap}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let start = yaml.find("proxy.toml: |\n").expect("proxy.toml key") + "proxy.toml: |\n".len();
    let toml: String = yaml[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in secrets {
        write_file(dir.path(), name, value);
    }
    let toml = toml.replace("/var/run/secrets/token-proxy", dir.path().to_str().unwrap());
    let cfg = write_file(dir.path(), "proxy.toml", &toml);
    let (code, out, err) = run_binary(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{configmap}: {err}");
    out
}

#[test]
fn the_configmap_proxy_toml_is_valid() {
    let out = check_configmap(
        "kubernetes/configmap.yaml",
        &[("client_secret", "s"), ("refresh_token", "r")],
    );
    assert!(
        out.contains("route orders-api") && out.contains("admin=0.0.0.0:9901"),
        "{out}"
    );
}

#[test]
fn the_scaled_out_configmap_shares_its_credential_encrypted() {
    let out = check_configmap(
        "kubernetes-shared/configmap.yaml",
        &[
            ("client_secret", "s"),
            ("refresh_token", "r"),
            ("redis_password", "p"),
            ("state_key", "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="),
        ],
    );
    assert!(
        out.contains("shared: redis_url=*** key_prefix=orders"),
        "{out}"
    );
    assert!(
        out.contains("encryption=on") && out.contains("shared=true"),
        "{out}"
    );
}
