//! The CLI and proxy.toml: `check`, exit codes, and errors that name the key.

mod support;

use support::*;

fn write(dir: &std::path::Path, text: &str) -> String {
    write_file(dir, "proxy.toml", text)
        .to_str()
        .unwrap()
        .to_string()
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
[[routes]]
name = "api"
prefix = "/"
upstream = "https://api.example.com/v1"
credential = "main"
[credentials.main]
grant = "refresh_token"
token_url = "https://auth.example.com/token"
client_id = "cid"
client_secret = "${TP_TEST_SECRET}"
refresh_token_file = "RT_FILE"
"#;

#[test]
fn check_accepts_a_good_config_and_prints_a_summary_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let rt = write_file(dir.path(), "rt", "  rt-secret-value\n");
    let cfg = write(dir.path(), &GOOD.replace("RT_FILE", rt.to_str().unwrap()));
    let (code, out, err) = run_binary(
        &["check", "--config", &cfg],
        &[("TP_TEST_SECRET", "cs-secret-value")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("route api"), "{out}");
    assert!(out.contains("https://api.example.com/v1"), "{out}");
    assert!(out.contains("credential main"), "{out}");
    assert!(out.contains("allowed_hosts=[(none)]"), "{out}");
    assert!(out.contains("allowed_origins=[(none)]"), "{out}");
    assert!(!out.contains("rt-secret-value") && !out.contains("cs-secret-value"));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml");
    let (code, out, err) = run_binary(
        &["check", "--config", example],
        &[("CLIENT_SECRET", "x"), ("REFRESH_TOKEN", "y")],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn config_path_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let rt = write_file(dir.path(), "rt", "rt");
    let cfg = write(dir.path(), &GOOD.replace("RT_FILE", rt.to_str().unwrap()));
    let (code, _, err) = run_binary(
        &["check"],
        &[("TOKEN_PROXY_CONFIG", &cfg), ("TP_TEST_SECRET", "x")],
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_configs_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let rt = write_file(dir.path(), "rt", "rt");
    let good = GOOD.replace("RT_FILE", rt.to_str().unwrap());
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("prefix = \"/\"", "prefix = \"/\"\nprefx = \"/\""),
            "prefx",
        ),
        (
            good.replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\""),
            "server.listen",
        ),
        (
            good.replace("${TP_TEST_SECRET}", "${TP_TEST_UNSET_VAR}"),
            "TP_TEST_UNSET_VAR",
        ),
        (
            good.replace("credential = \"main\"", "credential = \"missing\""),
            "routes[0].credential",
        ),
        (
            good.replace("grant = \"refresh_token\"", "grant = \"password\""),
            "credentials.main.grant",
        ),
        (
            format!("{good}\n[credentials.x]\ngrant = \"static\"\n"),
            "credentials.x.access_token",
        ),
        (
            good.replace(
                "refresh_token_file",
                "refresh_token = \"a\"\nrefresh_token_file",
            ),
            "not both",
        ),
        (
            good.replace(
                "client_id = \"cid\"",
                "client_id = \"cid\"\ntimeout = \"soon\"",
            ),
            "credentials.main.timeout",
        ),
        (
            good.replace(
                "upstream = \"https://api.example.com/v1\"",
                "upstream = \"api.example.com\"",
            ),
            "routes[0].upstream",
        ),
        (
            good.replace(
                "client_id = \"cid\"",
                "client_id = \"cid\"\nrefresh_before = 60",
            ),
            "credentials.main.refresh_before",
        ),
        ("[[routes]\n".to_string(), "TOML"),
        (
            good.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nallowed_hosts = [\"token-proxy:8080\"]",
            ),
            "server.allowed_hosts[0]",
        ),
        (
            good.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nallowed_origins = [\"https://a.example/app\"]",
            ),
            "server.allowed_origins[0]",
        ),
        (
            good.replace(
                "client_id = \"cid\"",
                "client_id = \"cid\"\nparams = { grant_type = \"password\" }",
            ),
            "credentials.main.params.grant_type",
        ),
    ];
    for (text, key) in cases {
        let cfg = write(dir.path(), &text);
        for args in [vec!["check", "--config", &cfg], vec!["--config", &cfg]] {
            let (code, _, err) = run_binary(&args, &[("TP_TEST_SECRET", "x")]);
            assert_eq!(code, 2, "{args:?} with {key}: {err}");
            assert!(err.contains(key), "error should name {key:?}: {err}");
        }
    }
}

#[test]
fn missing_config_file_and_bad_usage_exit_2() {
    let (code, _, err) = run_binary(&["check", "--config", "/nonexistent/proxy.toml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/proxy.toml"), "{err}");
    let (code, _, _) = run_binary(&["--no-such-flag"], &[]);
    assert_eq!(code, 2);
}

#[test]
fn listen_addresses_can_be_overridden_by_environment() {
    let dir = tempfile::tempdir().unwrap();
    let rt = write_file(dir.path(), "rt", "rt");
    let cfg = write(dir.path(), &GOOD.replace("RT_FILE", rt.to_str().unwrap()));
    let (code, out, err) = run_binary(
        &["check", "--config", &cfg],
        &[
            ("TP_TEST_SECRET", "x"),
            ("TOKEN_PROXY_LISTEN", "127.0.0.1:18080"),
            ("TOKEN_PROXY_ADMIN_LISTEN", "127.0.0.1:19901"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("127.0.0.1:18080") && out.contains("127.0.0.1:19901"),
        "{out}"
    );
}

#[test]
fn the_commented_cotter_example_is_valid_when_uncommented() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml")).unwrap();
    let start = example
        .find("# [[routes]]\n# name = \"my-backend\"")
        .expect("Cotter example");
    let end = start + example[start..].find("\n# ----").unwrap();
    let block: String = example[start..end]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_file(
        dir.path(),
        "cottertoken.json",
        r#"{"access_token":"a","refresh_token":"1:r","expires_in":3600}"#,
    );
    let block = block.replace(
        "\"cottertoken.json\"",
        &format!("{:?}", tokens.display().to_string()),
    );
    let text = format!(
        "{}\n{block}\n",
        &example[..example.find("# -----").unwrap()]
    );
    let cfg = write(dir.path(), &text);
    let (code, out, err) = run_binary(
        &["check", "--config", &cfg],
        &[
            ("CLIENT_SECRET", "x"),
            ("REFRESH_TOKEN", "y"),
            ("COTTER_API_KEY_ID", "key-id"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("route my-backend") && out.contains("credential cotter"),
        "{out}"
    );
}

#[test]
fn unusable_files_named_by_the_config_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let rt = write_file(dir.path(), "rt", "rt");
    let not_pem = write_file(dir.path(), "ca.pem", "this is not a certificate");
    let not_tokens = write_file(dir.path(), "tokens.json", "{\"token_type\": \"Bearer\"}");
    let good = GOOD.replace("RT_FILE", rt.to_str().unwrap());
    let cases = [
        (
            good.replace(
                "credential = \"main\"",
                &format!("credential = \"main\"\nca_file = \"{}\"", not_pem.display()),
            ),
            "no PEM certificates",
        ),
        (
            good.replace(
                "refresh_token_file",
                &format!(
                    "initial_tokens_file = \"{}\"\nrefresh_token_file",
                    not_tokens.display()
                ),
            ),
            "credentials.main.initial_tokens_file",
        ),
    ];
    for (text, want) in cases {
        let cfg = write(dir.path(), &text);
        for args in [vec!["check", "--config", &cfg], vec!["--config", &cfg]] {
            let (code, _, err) = run_binary(&args, &[("TP_TEST_SECRET", "x")]);
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(err.contains(want), "{err}");
        }
    }
}
