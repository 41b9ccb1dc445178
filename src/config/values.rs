//! Values inside `proxy.toml`: `${VAR}` expansion, durations, sizes, addresses, URLs and
//! secrets read from files. Every error names the key it came from.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Scheme, Uri};
use secrecy::SecretString;

use super::{err, ConfigError, UpstreamUrl};

/// Replace `${VAR}` in every string value; a missing variable names its key.
pub(super) fn expand_env(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand_str(s, path, env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{path}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                expand_env(v, &sub, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

pub(super) fn expand_str(
    s: &str,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return err(format!("{path}: unterminated `${{` in value"));
        };
        let name = &after[..end];
        if name.is_empty() {
            return err(format!("{path}: empty variable name in `${{}}`"));
        }
        match env(name) {
            Some(v) => out.push_str(&v),
            None => {
                return err(format!("{path}: environment variable `{name}` is not set"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse "500ms", "60s", "5m", "1h30m".
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        ConfigError(format!(
            "{key}: invalid duration {s:?} ({e}); use e.g. \"500ms\", \"60s\", \"5m\""
        ))
    })
}

/// Parse "64KiB", "1MiB", "512", "10kb".
pub fn parse_size(key: &str, s: &str) -> Result<usize, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        ConfigError(format!(
            "{key}: invalid size {s:?}; use e.g. \"64KiB\", \"1MiB\""
        ))
    };
    let n: usize = num.parse().map_err(|_| bad())?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

pub(super) fn opt_duration(
    key: &str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    v.map_or(Ok(default), |s| parse_duration(key, &s))
}

pub(super) fn opt_size(key: &str, v: Option<String>, default: usize) -> Result<usize, ConfigError> {
    v.map_or(Ok(default), |s| parse_size(key, &s))
}

pub(super) fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError(format!(
            "{key}: invalid address {s:?}; use e.g. \"127.0.0.1:8080\""
        ))
    })
}

/// Read a secret file: its trimmed contents are the secret.
pub(super) fn read_secret_file(key: &str, path: &str) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{key}: cannot read {path:?}: {e}")))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return err(format!("{key}: file {path:?} is empty"));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// `x` or `x_file`, never both.
pub(super) fn secret(
    prefix: &str,
    key: &str,
    inline: Option<String>,
    file: Option<String>,
) -> Result<Option<SecretString>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => err(format!(
            "{prefix}.{key}: set either `{key}` or `{key}_file`, not both"
        )),
        (Some(v), None) if v.is_empty() => err(format!("{prefix}.{key}: is empty")),
        (Some(v), None) => Ok(Some(SecretString::from(v))),
        (None, Some(path)) => read_secret_file(&format!("{prefix}.{key}_file"), &path).map(Some),
        (None, None) => Ok(None),
    }
}

pub fn parse_upstream(key: &str, s: &str) -> Result<UpstreamUrl, ConfigError> {
    let uri: Uri = s
        .parse()
        .map_err(|_| ConfigError(format!("{key}: invalid URL {s:?}")))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return err(format!("{key}: {s:?} must start with http:// or https://")),
    };
    let Some(authority) = uri.authority().cloned() else {
        return err(format!("{key}: {s:?} has no host"));
    };
    if authority.as_str().contains('@') {
        return err(format!("{key}: {s:?} must not contain user info"));
    }
    if uri.query().is_some() {
        return err(format!("{key}: {s:?} must not contain a query string"));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path,
    })
}
