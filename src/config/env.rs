//! Configuration from environment variables alone, for the simple case (one route, one
//! credential) where writing a file is overkill: a container with `TOKEN_PROXY_UPSTREAM`,
//! `TOKEN_PROXY_TOKEN_URL` and a secret or two. The variables are turned into the same TOML
//! document a file would hold and go through the same validation, so every rule and error
//! is shared; errors name the variable.

use crate::config::{Config, ConfigError};

/// `(variable, section, key, kind)`; section `server` is `[server]`, `route` the one route,
/// `cred` the one credential (`[credentials.main]`).
#[rustfmt::skip]
const VARS: &[(&str, &str, &str, Kind)] = &[
    ("TOKEN_PROXY_SHUTDOWN_GRACE", "server", "shutdown_grace", Kind::Str),
    ("TOKEN_PROXY_SHUTDOWN_DELAY", "server", "shutdown_delay", Kind::Str),
    ("TOKEN_PROXY_MAX_HEADER_SIZE", "server", "max_header_size", Kind::Str),
    ("TOKEN_PROXY_KEEPALIVE_TIMEOUT", "server", "keepalive_timeout", Kind::Str),
    ("TOKEN_PROXY_LOG_QUERY", "server", "log_query", Kind::Bool),
    ("TOKEN_PROXY_ALLOWED_HOSTS", "server", "allowed_hosts", Kind::List),
    ("TOKEN_PROXY_ALLOWED_ORIGINS", "server", "allowed_origins", Kind::List),
    ("TOKEN_PROXY_UPSTREAM", "route", "upstream", Kind::Str),
    ("TOKEN_PROXY_PREFIX", "route", "prefix", Kind::Str),
    ("TOKEN_PROXY_HOSTS", "route", "hosts", Kind::List),
    ("TOKEN_PROXY_STRIP_PREFIX", "route", "strip_prefix", Kind::Bool),
    ("TOKEN_PROXY_RETRY_ON_401", "route", "retry_on_401", Kind::Bool),
    ("TOKEN_PROXY_MAX_RETRY_BODY", "route", "max_retry_body", Kind::Str),
    ("TOKEN_PROXY_UPSTREAM_TIMEOUT", "route", "timeout", Kind::Str),
    ("TOKEN_PROXY_CONNECT_TIMEOUT", "route", "connect_timeout", Kind::Str),
    ("TOKEN_PROXY_IDLE_TIMEOUT", "route", "idle_timeout", Kind::Str),
    ("TOKEN_PROXY_UPSTREAM_CA_FILE", "route", "ca_file", Kind::Str),
    ("TOKEN_PROXY_GRANT", "cred", "grant", Kind::Str),
    ("TOKEN_PROXY_TOKEN_URL", "cred", "token_url", Kind::Str),
    ("TOKEN_PROXY_ENCODING", "cred", "encoding", Kind::Str),
    ("TOKEN_PROXY_CLIENT_ID", "cred", "client_id", Kind::Str),
    ("TOKEN_PROXY_CLIENT_SECRET", "cred", "client_secret", Kind::Str),
    ("TOKEN_PROXY_CLIENT_SECRET_FILE", "cred", "client_secret_file", Kind::Str),
    ("TOKEN_PROXY_CLIENT_AUTH", "cred", "client_auth", Kind::Str),
    ("TOKEN_PROXY_REFRESH_TOKEN", "cred", "refresh_token", Kind::Str),
    ("TOKEN_PROXY_REFRESH_TOKEN_FILE", "cred", "refresh_token_file", Kind::Str),
    ("TOKEN_PROXY_INITIAL_TOKENS_FILE", "cred", "initial_tokens_file", Kind::Str),
    ("TOKEN_PROXY_SCOPE", "cred", "scope", Kind::Str),
    ("TOKEN_PROXY_TOKEN_HEADERS", "cred", "headers", Kind::Map),
    ("TOKEN_PROXY_TOKEN_PARAMS", "cred", "params", Kind::Map),
    ("TOKEN_PROXY_STATE_FILE", "cred", "state_file", Kind::Str),
    ("TOKEN_PROXY_REFRESH_BEFORE", "cred", "refresh_before", Kind::Str),
    ("TOKEN_PROXY_HEADER", "cred", "header", Kind::Str),
    ("TOKEN_PROXY_HEADER_PREFIX", "cred", "header_prefix", Kind::Str),
    ("TOKEN_PROXY_ACCESS_TOKEN", "cred", "access_token", Kind::Str),
    ("TOKEN_PROXY_ACCESS_TOKEN_FILE", "cred", "access_token_file", Kind::Str),
    ("TOKEN_PROXY_TOKEN_TIMEOUT", "cred", "timeout", Kind::Str),
    ("TOKEN_PROXY_TOKEN_CA_FILE", "cred", "ca_file", Kind::Str),
    ("TOKEN_PROXY_JWKS_URL", "cred", "jwks_url", Kind::Str),
    ("TOKEN_PROXY_ISSUER", "cred", "issuer", Kind::Str),
    ("TOKEN_PROXY_AUDIENCE", "cred", "audience", Kind::Str),
    ("TOKEN_PROXY_ALGORITHMS", "cred", "algorithms", Kind::List),
    ("TOKEN_PROXY_SIGNING_KEY_FILE", "cred", "signing_key_file", Kind::Str),
    ("TOKEN_PROXY_SIGNING_KEY_ID", "cred", "signing_key_id", Kind::Str),
    ("TOKEN_PROXY_SIGNING_ALG", "cred", "signing_alg", Kind::Str),
    ("TOKEN_PROXY_ASSERTION_AUDIENCE", "cred", "assertion_audience", Kind::Str),
    ("TOKEN_PROXY_TLS_CLIENT_CERT_FILE", "cred", "tls_client_cert_file", Kind::Str),
    ("TOKEN_PROXY_TLS_CLIENT_KEY_FILE", "cred", "tls_client_key_file", Kind::Str),
    ("TOKEN_PROXY_EGRESS_PROXY", "cred", "egress_proxy", Kind::Str),
    ("TOKEN_PROXY_DPOP", "cred", "dpop", Kind::Bool),
    ("TOKEN_PROXY_DPOP_KEY_FILE", "cred", "dpop_key_file", Kind::Str),
    ("TOKEN_PROXY_UPSTREAM_TLS_CLIENT_CERT_FILE", "route", "tls_client_cert_file", Kind::Str),
    ("TOKEN_PROXY_UPSTREAM_TLS_CLIENT_KEY_FILE", "route", "tls_client_key_file", Kind::Str),
    ("TOKEN_PROXY_UPSTREAM_EGRESS_PROXY", "route", "egress_proxy", Kind::Str),
    ("TOKEN_PROXY_INTERCEPT_CA_CERT_FILE", "intercept", "ca_cert_file", Kind::Str),
    ("TOKEN_PROXY_INTERCEPT_CA_KEY_FILE", "intercept", "ca_key_file", Kind::Str),
    ("TOKEN_PROXY_INTERCEPT_LEAF_LIFETIME", "intercept", "leaf_lifetime", Kind::Str),
];

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bool,
    /// Comma-separated.
    List,
    /// `K=V,K2=V2`.
    Map,
}

/// Whether the environment asks for an env-only config (`TOKEN_PROXY_UPSTREAM` is set).
pub fn requested(env: &dyn Fn(&str) -> Option<String>) -> bool {
    env("TOKEN_PROXY_UPSTREAM").is_some()
}

/// Build the config from `TOKEN_PROXY_*` variables. The route is named `default` and
/// the credential `main`.
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut server = toml::Table::new();
    let mut route = toml::Table::new();
    let mut cred = toml::Table::new();
    let mut intercept = toml::Table::new();
    route.insert("name".into(), "default".into());
    route.insert("prefix".into(), "/".into());
    for (var, section, key, kind) in VARS {
        let Some(raw) = env(var) else { continue };
        let value = match kind {
            Kind::Str => toml::Value::String(raw),
            Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => toml::Value::Boolean(true),
                "0" | "false" | "no" => toml::Value::Boolean(false),
                _ => {
                    return Err(ConfigError(format!(
                        "{var}: expected true or false, got {raw:?}"
                    )))
                }
            },
            Kind::List => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.into())
                    .collect(),
            ),
            Kind::Map => {
                let mut map = toml::Table::new();
                for pair in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let Some((k, v)) = pair.split_once('=') else {
                        return Err(ConfigError(format!(
                            "{var}: expected NAME=value pairs, got {pair:?}"
                        )));
                    };
                    map.insert(k.trim().to_string(), v.trim().into());
                }
                toml::Value::Table(map)
            }
        };
        let target = match *section {
            "server" => &mut server,
            "route" => &mut route,
            "intercept" => &mut intercept,
            _ => &mut cred,
        };
        target.insert(key.to_string(), value);
    }
    if !cred.is_empty() {
        if !cred.contains_key("grant") {
            cred.insert("grant".into(), default_grant(&cred).into());
        }
        route.insert("credential".into(), "main".into());
    }
    let mut doc = toml::Table::new();
    doc.insert("server".into(), toml::Value::Table(server));
    doc.insert(
        "routes".into(),
        toml::Value::Array(vec![toml::Value::Table(route)]),
    );
    if !intercept.is_empty() {
        doc.insert("intercept".into(), toml::Value::Table(intercept));
    }
    if !cred.is_empty() {
        let mut creds = toml::Table::new();
        creds.insert("main".into(), toml::Value::Table(cred));
        doc.insert("credentials".into(), toml::Value::Table(creds));
    }
    // `${VAR}` is not expanded in environment values: they are taken literally.
    let text = toml::to_string(&doc).map_err(|e| ConfigError(e.to_string()))?;
    Config::parse_literal(&text, env).map_err(|e| ConfigError(name_the_variable(&e.0)))
}

/// With no TOKEN_PROXY_GRANT: static if an access token is given, client_credentials if a
/// client secret is given without a refresh token, else refresh_token.
fn default_grant(cred: &toml::Table) -> &'static str {
    let has = |k: &str| cred.contains_key(k);
    if has("access_token") || has("access_token_file") {
        "static"
    } else if (has("client_secret") || has("client_secret_file"))
        && !(has("refresh_token") || has("refresh_token_file") || has("initial_tokens_file"))
    {
        "client_credentials"
    } else {
        "refresh_token"
    }
}

/// Rewrite `credentials.main.token_url: ...` as `TOKEN_PROXY_TOKEN_URL (credentials.main.token_url): ...`.
fn name_the_variable(message: &str) -> String {
    for (var, section, key, _) in VARS {
        let path = match *section {
            "server" => format!("server.{key}"),
            "route" => format!("routes[0].{key}"),
            "intercept" => format!("intercept.{key}"),
            _ => format!("credentials.main.{key}"),
        };
        if message.contains(&path) {
            return format!("{var}: {message}");
        }
    }
    format!("environment configuration: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn a_route_and_a_credential_from_the_environment() {
        let e = env(&[
            ("TOKEN_PROXY_UPSTREAM", "https://api.example.com/v1"),
            ("TOKEN_PROXY_TOKEN_URL", "https://auth.example.com/token"),
            ("TOKEN_PROXY_CLIENT_ID", "cid"),
            ("TOKEN_PROXY_CLIENT_SECRET", "s3cret-${NOT_EXPANDED}"),
            ("TOKEN_PROXY_HOSTS", "api.example.com, other.example.com"),
            ("TOKEN_PROXY_TOKEN_HEADERS", "API_KEY_ID=abc"),
        ]);
        let c = from_env(&e).unwrap();
        assert_eq!(c.routes[0].upstream.base_path, "/v1");
        assert_eq!(
            c.routes[0].hosts,
            vec!["api.example.com", "other.example.com"]
        );
        assert_eq!(c.routes[0].credential.as_deref(), Some("main"));
        let cred = &c.credentials["main"];
        assert_eq!(cred.grant_name(), "client_credentials");
        assert_eq!(cred.endpoint().unwrap().headers[0].0.as_str(), "api_key_id");
    }

    #[test]
    fn errors_name_the_variable() {
        let e = env(&[
            ("TOKEN_PROXY_UPSTREAM", "https://api.example.com"),
            ("TOKEN_PROXY_REFRESH_TOKEN", "rt"),
        ]);
        let msg = from_env(&e).unwrap_err().to_string();
        assert!(msg.contains("TOKEN_PROXY_TOKEN_URL"), "{msg}");
        let e = env(&[("TOKEN_PROXY_UPSTREAM", "api.example.com")]);
        assert!(from_env(&e)
            .unwrap_err()
            .to_string()
            .contains("TOKEN_PROXY_UPSTREAM"));
        let e = env(&[
            ("TOKEN_PROXY_UPSTREAM", "http://x"),
            ("TOKEN_PROXY_STRIP_PREFIX", "maybe"),
        ]);
        assert!(from_env(&e)
            .unwrap_err()
            .to_string()
            .contains("TOKEN_PROXY_STRIP_PREFIX"));
    }

    #[test]
    fn enterprise_keys_and_interception_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let vars = [
            ("TOKEN_PROXY_UPSTREAM", "https://api.example.com"),
            ("TOKEN_PROXY_HOSTS", "api.example.com"),
            ("TOKEN_PROXY_GRANT", "client_credentials"),
            ("TOKEN_PROXY_TOKEN_URL", "https://idp.example.com/token"),
            ("TOKEN_PROXY_CLIENT_ID", "cid"),
            ("TOKEN_PROXY_DPOP", "true"),
        ];
        let key = dir.path().join("dpop.pem");
        let cert = dir.path().join("ca.crt");
        let ca_key = dir.path().join("ca.key");
        let (key, cert, ca_key) = (
            key.to_str().unwrap(),
            cert.to_str().unwrap(),
            ca_key.to_str().unwrap(),
        );
        let mut all = vars.to_vec();
        all.extend([
            ("TOKEN_PROXY_DPOP_KEY_FILE", key),
            ("TOKEN_PROXY_INTERCEPT_CA_CERT_FILE", cert),
            ("TOKEN_PROXY_INTERCEPT_CA_KEY_FILE", ca_key),
        ]);
        let config = from_env(&env(&all)).unwrap();
        assert!(config.credentials["main"].dpop.is_some());
        let intercept = config.intercept.expect("[intercept] from the environment");
        assert_eq!(intercept.hosts, vec!["api.example.com".to_string()]);
        let mut bad = all.clone();
        bad.push(("TOKEN_PROXY_INTERCEPT_LEAF_LIFETIME", "5s"));
        let e = from_env(&env(&bad)).unwrap_err().0;
        assert!(e.starts_with("TOKEN_PROXY_INTERCEPT_LEAF_LIFETIME"), "{e}");
    }
}
