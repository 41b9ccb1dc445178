//! `proxy.toml`: the schema, `${VAR}` expansion, `*_file` secrets and validation.
//!
//! Loading happens in three steps so that every error names the key at fault:
//! 1. parse the text into a `toml::Value` (syntax errors carry line and column);
//! 2. expand `${VAR}` in every string, tracking the key path;
//! 3. deserialize into the raw schema with `serde_path_to_error` (unknown keys and bad
//!    types name their path), then resolve secrets and validate into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use secrecy::SecretString;
use serde::Deserialize;

/// A configuration problem; the message names the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub routes: Vec<RouteConfig>,
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// The file this was loaded from, if any.
    pub source: Option<PathBuf>,
}

impl Config {
    /// Every file whose change should trigger a reload: the config itself, secret files,
    /// initial token files and CA files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.source.iter().cloned().collect();
        files.extend(self.routes.iter().filter_map(|r| r.ca_file.clone()));
        files.extend(
            self.credentials
                .values()
                .flat_map(|c| c.files.iter().cloned()),
        );
        files
    }
}

/// A fingerprint of the contents of `files` (a missing file counts as such), to notice
/// changes by polling. Kubernetes updates mounted secrets by swapping a `..data` symlink,
/// which file-event watchers often miss; reading the contents does not.
pub fn fingerprint_files(files: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// After SIGTERM, keep accepting for this long (readiness already 503) before draining.
    pub shutdown_delay: Duration,
    pub max_header_size: usize,
    /// Log request paths with their query string (off: queries often carry secrets).
    pub log_query: bool,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub prefix: Option<String>,
    /// Lower-cased `host` or `host:port` entries for forward mode.
    pub hosts: Vec<String>,
    pub upstream: UpstreamUrl,
    pub strip_prefix: bool,
    pub credential: Option<String>,
    pub retry_on_401: bool,
    pub max_retry_body: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

/// `scheme://host[:port][/base-path]`, split once at load time.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Base path without a trailing slash ("" when none).
    pub base_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    RefreshToken,
    ClientCredentials,
    Static,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    Basic,
    Body,
    None,
}

#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub name: String,
    pub grant: GrantKind,
    pub token_url: Option<Uri>,
    pub encoding: Encoding,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub client_auth: ClientAuth,
    pub refresh_token: Option<SecretString>,
    /// Raw JSON text of a token response to start from (`initial_tokens_file`).
    pub initial_tokens: Option<SecretString>,
    pub scope: Option<String>,
    /// Extra token request parameters (e.g. Auth0's `audience`, `resource` of RFC 8707).
    pub params: Vec<(String, String)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub state_file: Option<PathBuf>,
    pub refresh_before: Duration,
    pub header: HeaderName,
    pub header_prefix: String,
    pub access_token: Option<SecretString>,
    /// For `grant = "static"`: re-read when its contents change.
    pub access_token_file: Option<PathBuf>,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Verify access tokens (JWTs) against the issuer's keys before attaching them.
    pub verify: Option<JwtVerification>,
    /// Files this credential's config was read from (secrets, initial tokens, CA): a change
    /// to any of them is a config change (watched for reloads). Not `state_file`.
    pub files: Vec<PathBuf>,
}

impl CredentialConfig {
    /// Identifies this exact configuration, secrets included, so a reload can tell an
    /// unchanged credential (keep its token) from a changed one. Never shown anywhere.
    pub fn fingerprint(&self) -> u64 {
        use secrecy::ExposeSecret;
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // Debug covers every non-secret field (secrets and sensitive headers print redacted).
        format!("{self:?}").hash(&mut h);
        let secrets = [
            &self.client_secret,
            &self.refresh_token,
            &self.initial_tokens,
        ];
        for s in secrets {
            s.as_ref()
                .map(|s| s.expose_secret().to_string())
                .hash(&mut h);
        }
        if self.access_token_file.is_none() {
            // An access_token_file is followed by the refresher itself; only inline counts.
            self.access_token
                .as_ref()
                .map(|s| s.expose_secret().to_string())
                .hash(&mut h);
        }
        for (_, v) in &self.headers {
            v.as_bytes().hash(&mut h);
        }
        h.finish()
    }
}

#[derive(Debug, Clone)]
pub struct JwtVerification {
    pub jwks_url: Uri,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
}

// ---------------------------------------------------------------- raw schema

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    shutdown_grace: Option<String>,
    shutdown_delay: Option<String>,
    max_header_size: Option<String>,
    log_query: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    prefix: Option<String>,
    hosts: Option<Vec<String>>,
    upstream: Option<String>,
    strip_prefix: Option<bool>,
    credential: Option<String>,
    retry_on_401: Option<bool>,
    max_retry_body: Option<String>,
    timeout: Option<String>,
    connect_timeout: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    grant: Option<GrantKind>,
    token_url: Option<String>,
    encoding: Option<Encoding>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<String>,
    client_auth: Option<ClientAuth>,
    refresh_token: Option<String>,
    refresh_token_file: Option<String>,
    initial_tokens_file: Option<String>,
    scope: Option<String>,
    params: Option<BTreeMap<String, String>>,
    headers: Option<BTreeMap<String, String>>,
    state_file: Option<String>,
    refresh_before: Option<String>,
    header: Option<String>,
    header_prefix: Option<String>,
    access_token: Option<String>,
    access_token_file: Option<String>,
    timeout: Option<String>,
    ca_file: Option<String>,
    jwks_url: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    algorithms: Option<Vec<String>>,
}

// ---------------------------------------------------------------- loading

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// `TOKEN_PROXY_*` variables (see `env_config`).
    Environment,
}

impl ConfigSource {
    /// `--config`, else `$TOKEN_PROXY_CONFIG`, else `./proxy.toml` if it exists, else the
    /// environment if `TOKEN_PROXY_UPSTREAM` is set, else `./proxy.toml` (which then fails
    /// to load with a clear message).
    pub fn resolve(cli: Option<PathBuf>) -> ConfigSource {
        if let Some(p) = cli.or_else(|| std::env::var_os("TOKEN_PROXY_CONFIG").map(PathBuf::from)) {
            return ConfigSource::File(p);
        }
        let default = PathBuf::from("proxy.toml");
        if !default.exists() && crate::env_config::requested(&|k| std::env::var(k).ok()) {
            return ConfigSource::Environment;
        }
        ConfigSource::File(default)
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            ConfigSource::File(p) => Config::load(p),
            ConfigSource::Environment => crate::env_config::from_env(&|k| std::env::var(k).ok()),
        }
    }
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Environment => write!(f, "TOKEN_PROXY_* environment variables"),
        }
    }
}

impl Config {
    /// Read and validate a config file. Relative paths inside it are taken relative to the
    /// current directory, as a user running the binary would expect.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        let mut config = Config::parse(&text, &|name| std::env::var(name).ok())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parse config text; `env` resolves `${VAR}` (and the listen overrides).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Self::parse_with(text, env, true)
    }

    /// Parse config text whose strings are taken literally (no `${VAR}` expansion).
    pub fn parse_literal(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Self::parse_with(text, env, false)
    }

    fn parse_with(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        expand: bool,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigError(format!("invalid TOML: {e}")))?;
        if expand {
            expand_env(&mut value, "", env)?;
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            // toml appends its own "in `key`" line; the path already says where.
            let inner = e.into_inner().to_string();
            let inner = inner
                .split("\nin `")
                .next()
                .unwrap_or_default()
                .trim_end()
                .to_string();
            if path == "." || path.is_empty() {
                ConfigError(inner)
            } else {
                ConfigError(format!("{path}: {inner}"))
            }
        })?;
        build(raw, env)
    }
}

/// Replace `${VAR}` in every string value; a missing variable names its key.
fn expand_env(
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

fn expand_str(
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

fn opt_duration(key: &str, v: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    v.map_or(Ok(default), |s| parse_duration(key, &s))
}

fn opt_size(key: &str, v: Option<String>, default: usize) -> Result<usize, ConfigError> {
    v.map_or(Ok(default), |s| parse_size(key, &s))
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError(format!(
            "{key}: invalid address {s:?}; use e.g. \"127.0.0.1:8080\""
        ))
    })
}

/// Read a secret file: its trimmed contents are the secret.
fn read_secret_file(key: &str, path: &str) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{key}: cannot read {path:?}: {e}")))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return err(format!("{key}: file {path:?} is empty"));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// `x` or `x_file`, never both.
fn secret(
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

fn build(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let listen_s = env("TOKEN_PROXY_LISTEN")
        .or(raw.server.listen)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let admin_s = env("TOKEN_PROXY_ADMIN_LISTEN").or(raw.server.admin_listen);
    let server = ServerConfig {
        listen: parse_addr("server.listen", &listen_s)?,
        admin_listen: admin_s
            .map(|s| parse_addr("server.admin_listen", &s))
            .transpose()?,
        shutdown_grace: opt_duration(
            "server.shutdown_grace",
            raw.server.shutdown_grace,
            Duration::from_secs(10),
        )?,
        shutdown_delay: opt_duration(
            "server.shutdown_delay",
            raw.server.shutdown_delay,
            Duration::ZERO,
        )?,
        log_query: raw.server.log_query.unwrap_or(false),
        max_header_size: opt_size(
            "server.max_header_size",
            raw.server.max_header_size,
            64 * 1024,
        )?,
    };
    if server.max_header_size < 1024 {
        return err("server.max_header_size: must be at least 1KiB");
    }

    let mut credentials = BTreeMap::new();
    for (name, c) in raw.credentials {
        let cred = build_credential(&name, c)?;
        credentials.insert(name, cred);
    }

    if raw.routes.is_empty() {
        return err("routes: at least one [[routes]] entry is required");
    }
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        routes.push(build_route(i, r, &credentials)?);
    }
    let mut seen = std::collections::HashSet::new();
    for r in &routes {
        if !seen.insert(r.name.clone()) {
            return err(format!(
                "routes: two routes are named {:?}; names must be unique",
                r.name
            ));
        }
    }
    Ok(Config {
        server,
        routes,
        credentials,
        source: None,
    })
}

fn build_route(
    i: usize,
    r: RawRoute,
    credentials: &BTreeMap<String, CredentialConfig>,
) -> Result<RouteConfig, ConfigError> {
    let key = format!("routes[{i}]");
    let name = r.name.unwrap_or_else(|| format!("route{i}"));
    if let Some(p) = &r.prefix {
        if !p.starts_with('/') {
            return err(format!("{key}.prefix: {p:?} must start with '/'"));
        }
    }
    let mut hosts = Vec::new();
    for (j, h) in r.hosts.unwrap_or_default().into_iter().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        if h.is_empty() || h.parse::<Authority>().is_err() || h.contains('@') || h.contains('/') {
            return err(format!(
                "{key}.hosts[{j}]: {h:?} is not a host or host:port"
            ));
        }
        hosts.push(h);
    }
    if r.prefix.is_none() && hosts.is_empty() {
        return err(format!(
            "{key} ({name}): a route needs `prefix`, `hosts`, or both"
        ));
    }
    let Some(upstream_s) = r.upstream else {
        return err(format!(
            "{key}.upstream: missing (e.g. \"https://api.example.com\")"
        ));
    };
    let upstream = parse_upstream(&format!("{key}.upstream"), &upstream_s)?;
    if let Some(c) = &r.credential {
        if !credentials.contains_key(c) {
            return err(format!("{key}.credential: no [credentials.{c}] is defined"));
        }
    }
    let ca_file = r.ca_file.map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return err(format!("{key}.ca_file: {} does not exist", p.display()));
        }
    }
    Ok(RouteConfig {
        name,
        prefix: r.prefix,
        hosts,
        upstream,
        strip_prefix: r.strip_prefix.unwrap_or(false),
        credential: r.credential,
        retry_on_401: r.retry_on_401.unwrap_or(true),
        max_retry_body: opt_size(&format!("{key}.max_retry_body"), r.max_retry_body, 1 << 20)?,
        timeout: opt_duration(
            &format!("{key}.timeout"),
            r.timeout,
            Duration::from_secs(30),
        )?,
        connect_timeout: opt_duration(
            &format!("{key}.connect_timeout"),
            r.connect_timeout,
            Duration::from_secs(5),
        )?,
        ca_file,
    })
}

fn build_credential(name: &str, c: RawCredential) -> Result<CredentialConfig, ConfigError> {
    let key = format!("credentials.{name}");
    let Some(grant) = c.grant else {
        return err(format!(
            "{key}.grant: missing (refresh_token | client_credentials | static)"
        ));
    };
    let verify = build_verification(&key, c.jwks_url, c.issuer, c.audience, c.algorithms)?;
    let token_url = match c.token_url {
        Some(u) => {
            parse_upstream(&format!("{key}.token_url"), &u)?;
            Some(
                u.parse::<Uri>()
                    .map_err(|_| ConfigError(format!("{key}.token_url: invalid URL {u:?}")))?,
            )
        }
        None => None,
    };
    let files: Vec<PathBuf> = [
        &c.client_secret_file,
        &c.refresh_token_file,
        &c.initial_tokens_file,
        &c.ca_file,
    ]
    .into_iter()
    .flatten()
    .map(PathBuf::from)
    .collect();
    let client_secret = secret(&key, "client_secret", c.client_secret, c.client_secret_file)?;
    let refresh_token = secret(&key, "refresh_token", c.refresh_token, c.refresh_token_file)?;
    let access_token_file = c.access_token_file.clone().map(PathBuf::from);
    let access_token = secret(&key, "access_token", c.access_token, c.access_token_file)?;
    let initial_tokens = match c.initial_tokens_file {
        Some(p) => Some(read_secret_file(&format!("{key}.initial_tokens_file"), &p)?),
        None => None,
    };

    match grant {
        GrantKind::RefreshToken | GrantKind::ClientCredentials => {
            if token_url.is_none() {
                return err(format!("{key}.token_url: required for grant = {grant:?}"));
            }
            if access_token.is_some() {
                return err(format!(
                    "{key}.access_token: only allowed with grant = \"static\""
                ));
            }
        }
        GrantKind::Static => {
            if access_token.is_none() {
                return err(format!(
                    "{key}.access_token: required for grant = \"static\" (or access_token_file)"
                ));
            }
            if refresh_token.is_some() || initial_tokens.is_some() || token_url.is_some() {
                return err(format!(
                    "{key}.grant: \"static\" takes no token_url, refresh_token or initial_tokens_file"
                ));
            }
        }
    }
    if grant == GrantKind::ClientCredentials && c.client_id.is_none() {
        return err(format!(
            "{key}.client_id: required for grant = \"client_credentials\""
        ));
    }
    if grant == GrantKind::ClientCredentials
        && (refresh_token.is_some() || initial_tokens.is_some())
    {
        return err(format!(
            "{key}.refresh_token: not used by grant = \"client_credentials\""
        ));
    }
    let client_auth = c.client_auth.unwrap_or(if client_secret.is_some() {
        ClientAuth::Basic
    } else if c.client_id.is_some() {
        ClientAuth::Body
    } else {
        ClientAuth::None
    });
    if client_auth == ClientAuth::Basic && c.client_id.is_none() {
        return err(format!("{key}.client_auth: \"basic\" needs client_id"));
    }

    let mut params = Vec::new();
    for (k, v) in c.params.unwrap_or_default() {
        const RESERVED: [&str; 5] = [
            "grant_type",
            "refresh_token",
            "client_id",
            "client_secret",
            "scope",
        ];
        if RESERVED.contains(&k.as_str()) {
            return err(format!(
                "{key}.params.{k}: set by token-proxy itself; use the credential's own key"
            ));
        }
        params.push((k, v));
    }
    let mut headers = Vec::new();
    for (k, v) in c.headers.unwrap_or_default() {
        let hn = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| ConfigError(format!("{key}.headers.{k}: not a valid header name")))?;
        let mut hv = HeaderValue::from_str(&v)
            .map_err(|_| ConfigError(format!("{key}.headers.{k}: not a valid header value")))?;
        hv.set_sensitive(true);
        headers.push((hn, hv));
    }
    let header_s = c.header.unwrap_or_else(|| "Authorization".into());
    let header = HeaderName::from_bytes(header_s.as_bytes()).map_err(|_| {
        ConfigError(format!(
            "{key}.header: {header_s:?} is not a valid header name"
        ))
    })?;
    let header_prefix = c.header_prefix.unwrap_or_else(|| "Bearer ".into());
    if HeaderValue::from_str(&header_prefix).is_err() {
        return err(format!("{key}.header_prefix: not a valid header value"));
    }
    let ca_file = c.ca_file.map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return err(format!("{key}.ca_file: {} does not exist", p.display()));
        }
    }
    let refresh_before = opt_duration(
        &format!("{key}.refresh_before"),
        c.refresh_before,
        Duration::from_secs(60),
    )?;
    let timeout = opt_duration(
        &format!("{key}.timeout"),
        c.timeout,
        Duration::from_secs(10),
    )?;
    if timeout.is_zero() {
        return err(format!("{key}.timeout: must be greater than zero"));
    }
    Ok(CredentialConfig {
        name: name.to_string(),
        grant,
        token_url,
        encoding: c.encoding.unwrap_or(Encoding::Form),
        client_id: c.client_id,
        client_secret,
        client_auth,
        refresh_token,
        initial_tokens,
        scope: c.scope,
        params,
        headers,
        state_file: c.state_file.map(PathBuf::from),
        refresh_before,
        header,
        header_prefix,
        access_token,
        access_token_file,
        timeout,
        ca_file,
        verify,
        files,
    })
}

fn build_verification(
    key: &str,
    jwks_url: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    algorithms: Option<Vec<String>>,
) -> Result<Option<JwtVerification>, ConfigError> {
    let Some(url) = jwks_url else {
        if issuer.is_some() || audience.is_some() || algorithms.is_some() {
            return err(format!(
                "{key}.jwks_url: required when issuer, audience or algorithms is set"
            ));
        }
        return Ok(None);
    };
    parse_upstream(&format!("{key}.jwks_url"), &url)?;
    let jwks_url = url
        .parse::<Uri>()
        .map_err(|_| ConfigError(format!("{key}.jwks_url: invalid URL {url:?}")))?;
    let names = algorithms.unwrap_or_else(|| vec!["RS256".into(), "ES256".into()]);
    if names.is_empty() {
        return err(format!("{key}.algorithms: must not be empty"));
    }
    let mut parsed = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let alg: jsonwebtoken::Algorithm = name.parse().map_err(|_| {
            ConfigError(format!("{key}.algorithms[{i}]: unknown algorithm {name:?}"))
        })?;
        if name.starts_with("HS") {
            return err(format!(
                "{key}.algorithms[{i}]: {name} is symmetric; a JWKS needs RS*, PS*, ES* or EdDSA"
            ));
        }
        parsed.push(alg);
    }
    Ok(Some(JwtVerification {
        jwks_url,
        issuer,
        audience,
        algorithms: parsed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &|name| match name {
            "SECRET" => Some("s3cret".into()),
            _ => None,
        })
    }

    const MIN: &str = r#"
        [[routes]]
        prefix = "/"
        upstream = "https://api.example.com/v1/"
        credential = "main"
        [credentials.main]
        grant = "client_credentials"
        token_url = "https://auth.example.com/token"
        client_id = "id"
        client_secret = "${SECRET}"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_header_size, 65536);
        assert_eq!(c.routes[0].upstream.base_path, "/v1");
        assert_eq!(c.routes[0].max_retry_body, 1 << 20);
        assert_eq!(c.credentials["main"].client_auth, ClientAuth::Basic);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (MIN.replace("prefix", "prefx"), "prefx"),
            (
                MIN.replace("${SECRET}", "${NOPE}"),
                "credentials.main.client_secret: environment variable `NOPE`",
            ),
            (
                format!("[server]\nshutdown_grace = \"ten\"\n{MIN}"),
                "server.shutdown_grace",
            ),
            (
                format!("[server]\nmax_header_size = \"64XB\"\n{MIN}"),
                "server.max_header_size",
            ),
            (
                MIN.replace("credential = \"main\"", "credential = \"other\""),
                "routes[0].credential",
            ),
            (
                MIN.replace("https://api", "ftp://api"),
                "routes[0].upstream",
            ),
            (MIN.replace("prefix = \"/\"", ""), "needs `prefix`, `hosts`"),
            (
                MIN.replace("\"client_credentials\"", "\"password\""),
                "credentials.main.grant",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "error {e:?} should contain {want:?}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("k", "64KiB").unwrap(), 65536);
        assert_eq!(parse_size("k", "1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("k", "10").unwrap(), 10);
        assert!(parse_size("k", "x").is_err());
        assert_eq!(
            parse_duration("k", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("k", "5m").unwrap(), Duration::from_secs(300));
    }
}
