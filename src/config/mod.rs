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

mod build;
pub mod client_cert;
pub mod env;
mod raw;
pub mod signing_key;
mod values;

use build::build;
use raw::RawConfig;
use values::expand_env;
pub use values::{parse_duration, parse_size, parse_upstream};

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
    /// `[shared]`: replicas share token state through Redis.
    pub shared: Option<SharedConfig>,
    /// `[intercept]`: TLS interception for `CONNECT` to the routes' hosts.
    pub intercept: Option<InterceptConfig>,
    /// The file this was loaded from, if any.
    pub source: Option<PathBuf>,
}

impl Config {
    /// Every file whose change should trigger a reload: the config itself, secret files,
    /// initial token files and CA files.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.source.iter().cloned().collect();
        files.extend(self.routes.iter().filter_map(|r| r.ca_file.clone()));
        files.extend(self.routes.iter().flat_map(|r| r.client_cert_files.clone()));
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

/// `[intercept]`: a CA (from files, or generated into them at start) for HTTPS_PROXY apps.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    pub ca_cert_file: PathBuf,
    pub ca_key_file: PathBuf,
    pub leaf_lifetime: Duration,
    /// The CA in the files, loaded and checked; `None`: neither file exists yet (a CA is
    /// generated at start).
    pub ca: Option<std::sync::Arc<crate::intercept::Ca>>,
    /// The hosts the routes name (ports stripped): what a generated CA may sign for.
    pub hosts: Vec<String>,
}

/// `[shared]`: where replicas keep one token state per credential.
#[derive(Clone)]
pub struct SharedConfig {
    /// `redis://` or `rediss://` (may carry user:password, so it is a secret).
    pub redis_url: SecretString,
    pub redis_password: Option<SecretString>,
    pub key_prefix: String,
    /// The refresh lease's lifetime; its holder renews it while it works.
    pub lock_ttl: Duration,
    /// AES-256-GCM key for tokens at rest (32 bytes).
    pub encryption_key: Option<std::sync::Arc<[u8; 32]>>,
    /// PEM roots for a `rediss://` server with a private CA (replaces the built-in roots).
    pub ca_pem: Option<Vec<u8>>,
}

impl SharedConfig {
    /// Identifies these settings (secrets included, never shown), to tell a change.
    pub fn fingerprint(&self) -> u64 {
        use secrecy::ExposeSecret;
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.redis_url.expose_secret().hash(&mut h);
        self.redis_password
            .as_ref()
            .map(|p| p.expose_secret().to_string())
            .hash(&mut h);
        self.key_prefix.hash(&mut h);
        self.lock_ttl.hash(&mut h);
        self.encryption_key.as_deref().hash(&mut h);
        self.ca_pem.hash(&mut h);
        h.finish()
    }
}

impl std::fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("key_prefix", &self.key_prefix)
            .field("lock_ttl", &self.lock_ttl)
            .field("encrypted", &self.encryption_key.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// After SIGTERM, keep accepting for this long (readiness already 503) before draining.
    pub shutdown_delay: Duration,
    pub max_header_size: usize,
    /// An app's HTTP/1.1 connection is closed when no complete request head arrives for
    /// this long: idle between requests, or slow to send one.
    pub keepalive_timeout: Duration,
    /// Log request paths with their query string (off: queries often carry secrets).
    pub log_query: bool,
    /// `allowed_hosts` and `allowed_origins`: who besides local apps may use the listeners.
    pub access: crate::access::AccessPolicy,
    /// Threads serving the proxy listener, each with its own event loop (default: cores).
    pub workers: usize,
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
    /// A request or response body (or an upstream socket write) that makes no progress
    /// for this long is abandoned and its connections are freed.
    pub idle_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS to the upstream.
    pub client_cert: Option<std::sync::Arc<client_cert::ClientCert>>,
    /// Outbound connections through this HTTP proxy (CONNECT).
    pub egress: Option<std::sync::Arc<crate::egress::Egress>>,
    /// Its certificate and key files (watched).
    pub client_cert_files: Vec<PathBuf>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    Basic,
    Body,
    None,
    /// RFC 7523: a JWT signed with `signing_key_file` instead of a shared secret.
    PrivateKeyJwt,
}

/// `client_auth = "private_key_jwt"`: how the client assertion is made.
#[derive(Debug, Clone)]
pub struct AssertionConfig {
    pub key: signing_key::SigningKey,
    /// `kid` in the assertion's header.
    pub kid: Option<String>,
    /// `aud`; the token endpoint's URL when unset.
    pub audience: Option<String>,
}

/// How a credential obtains its tokens: one variant per grant, each with exactly the
/// settings it uses, so a new grant is a compiler-guided change.
#[derive(Debug, Clone)]
pub enum GrantConfig {
    /// RFC 6749 §6 (form) or Cotter's JSON variant.
    RefreshToken {
        endpoint: EndpointConfig,
        /// The starting refresh token (absent: install one with `PUT /tokens/{name}`).
        refresh_token: Option<SecretString>,
        /// Raw JSON text of a token response to start from (`initial_tokens_file`).
        initial_tokens: Option<SecretString>,
    },
    /// RFC 6749 §4.4.
    ClientCredentials { endpoint: EndpointConfig },
    /// A token handed over as it is.
    Static(StaticTokenConfig),
}

/// A token endpoint and how this client talks to it.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub token_url: Uri,
    pub encoding: Encoding,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    /// Extra token request parameters (e.g. Auth0's `audience`, `resource` of RFC 8707).
    pub params: Vec<(String, String)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Set with `client_auth = "private_key_jwt"` (boxed: most credentials have none).
    pub assertion: Option<Box<AssertionConfig>>,
}

#[derive(Debug, Clone)]
pub enum StaticTokenConfig {
    Inline(SecretString),
    /// Re-read when its contents change.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub name: String,
    pub grant: GrantConfig,
    /// Its state lives in the `[shared]` store (the default when `[shared]` exists).
    pub shared: bool,
    pub state_file: Option<PathBuf>,
    pub refresh_before: Duration,
    pub header: HeaderName,
    pub header_prefix: String,
    /// Token endpoint (and JWKS) call timeout.
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS to the token endpoint (RFC 8705) and JWKS.
    pub client_cert: Option<std::sync::Arc<client_cert::ClientCert>>,
    /// Outbound connections through this HTTP proxy (CONNECT).
    pub egress: Option<std::sync::Arc<crate::egress::Egress>>,
    /// `dpop = true`: DPoP-bound tokens (RFC 9449), with this key.
    pub dpop: Option<std::sync::Arc<crate::dpop::Dpop>>,
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
        let reveal = |s: Option<&SecretString>| s.map(|s| s.expose_secret().to_string());
        let endpoint = self.endpoint();
        reveal(endpoint.and_then(|e| e.client_secret.as_ref())).hash(&mut h);
        reveal(self.refresh_token()).hash(&mut h);
        reveal(self.initial_tokens()).hash(&mut h);
        // An access_token_file is followed by the refresher itself; only inline counts.
        if let GrantConfig::Static(StaticTokenConfig::Inline(token)) = &self.grant {
            reveal(Some(token)).hash(&mut h);
        }
        for (_, v) in endpoint.map_or(&[][..], |e| &e.headers) {
            v.as_bytes().hash(&mut h);
        }
        endpoint
            .and_then(|e| e.assertion.as_ref())
            .map(|a| a.key.digest)
            .hash(&mut h);
        self.client_cert.as_ref().map(|c| c.digest).hash(&mut h);
        // A key from a file counts by its contents (a replaced key is a new credential);
        // a generated one is the running credential's own and survives reloads.
        self.dpop
            .as_ref()
            .filter(|d| d.file.is_some())
            .map(|d| d.digest)
            .hash(&mut h);
        h.finish()
    }

    /// `refresh_token`, `client_credentials` or `static`.
    pub fn grant_name(&self) -> &'static str {
        match self.grant {
            GrantConfig::RefreshToken { .. } => "refresh_token",
            GrantConfig::ClientCredentials { .. } => "client_credentials",
            GrantConfig::Static(_) => "static",
        }
    }

    /// The token endpoint, for the grants that have one.
    pub fn endpoint(&self) -> Option<&EndpointConfig> {
        match &self.grant {
            GrantConfig::RefreshToken { endpoint, .. }
            | GrantConfig::ClientCredentials { endpoint } => Some(endpoint),
            GrantConfig::Static(_) => None,
        }
    }

    /// The configured starting refresh token (refresh_token grant only).
    pub fn refresh_token(&self) -> Option<&SecretString> {
        match &self.grant {
            GrantConfig::RefreshToken { refresh_token, .. } => refresh_token.as_ref(),
            _ => None,
        }
    }

    /// The configured `initial_tokens_file` contents (refresh_token grant only).
    pub fn initial_tokens(&self) -> Option<&SecretString> {
        match &self.grant {
            GrantConfig::RefreshToken { initial_tokens, .. } => initial_tokens.as_ref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct JwtVerification {
    pub jwks_url: Uri,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
}

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// `TOKEN_PROXY_*` variables (see [`crate::config::env`]).
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
        if !default.exists() && crate::config::env::requested(&|k| std::env::var(k).ok()) {
            return ConfigSource::Environment;
        }
        ConfigSource::File(default)
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            ConfigSource::File(p) => Config::load(p),
            ConfigSource::Environment => crate::config::env::from_env(&|k| std::env::var(k).ok()),
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
        let mut value: toml::Value = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        if expand {
            expand_env(&mut value, "", env)?;
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            // toml appends its own "in `key`" line; the path already says where.
            let inner = e.into_inner().to_string();
            let inner = without_values(inner.split("\nin `").next().unwrap_or_default().trim_end());
            if path == "." || path.is_empty() {
                ConfigError(inner)
            } else {
                ConfigError(format!("{path}: {inner}"))
            }
        })?;
        build(raw, env)
    }
}

/// A TOML syntax error by position only: the toml crate's own message quotes the
/// offending line, and that line may hold a secret.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let Some(span) = e.span() else {
        return ConfigError("invalid TOML".into());
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let message = e.message().lines().next().unwrap_or("syntax error");
    ConfigError(format!(
        "invalid TOML at line {line}, column {column}: {}",
        without_values(message)
    ))
}

/// A deserializer message with any quoted value removed: serde says `invalid type: string
/// "s3cret", expected a boolean`, and the value may be a secret put under the wrong key.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        let close = match c {
            '"' => '"',
            '`' => '`',
            _ => {
                out.push(c);
                continue;
            }
        };
        // Keep backticked key and variant names (`grant`, `refresh_token`), which are
        // ours; drop everything double-quoted and any backticked run that looks like data.
        let quoted: String = chars.by_ref().take_while(|&x| x != close).collect();
        let is_name = close == '`'
            && !quoted.is_empty()
            && quoted.len() <= 40
            && quoted
                .chars()
                .all(|x| x.is_ascii_alphanumeric() || x == '_' || x == '-' || x == '.')
            && !quoted
                .chars()
                .all(|x| x.is_ascii_digit() || x == '.' || x == '-');
        if is_name {
            out.push('`');
            out.push_str(&quoted);
            out.push('`');
        } else {
            out.push_str("(value not shown)");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_quote_values() {
        let cases = [
            "[credentials.main]\nclient_secret = \"s3cret-value-42\nx = 1\n",
            "[credentials.main]\nclient_secret = 914265387\n",
            "[[routes]]\nprefix = \"/\"\nretry_on_401 = \"s3cret-value-42\"\nupstream = \"http://a\"\n",
            "[credentials.main]\ngrant = \"refresh_token\" client_secret = \"s3cret-value-42\"\n",
        ];
        for text in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                !e.contains("s3cret-value-42") && !e.contains("914265387"),
                "{e}"
            );
        }
        let e = parse(cases[0]).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse(cases[2]).unwrap_err().to_string();
        assert!(e.contains("retry_on_401"), "{e}");
    }

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
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(30));
        assert_eq!(c.routes[0].upstream.base_path, "/v1");
        assert_eq!(c.routes[0].max_retry_body, 1 << 20);
        assert_eq!(
            c.credentials["main"].endpoint().unwrap().client_auth,
            ClientAuth::Basic
        );
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
            (format!("[server]\nworkers = 0\n{MIN}"), "server.workers"),
            (
                format!("[server]\nkeepalive_timeout = \"0s\"\n{MIN}"),
                "server.keepalive_timeout",
            ),
            (
                format!("[server]\nkeepalive_timeout = \"soon\"\n{MIN}"),
                "server.keepalive_timeout",
            ),
            (format!("[server]\nworkers = \"two\"\n{MIN}"), "workers"),
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
    fn shared_settings_and_their_errors() {
        let with_env = |text: &str, url: Option<&str>| {
            let url = url.map(str::to_string);
            Config::parse(text, &move |name| match name {
                "SECRET" => Some("s3cret".into()),
                "TOKEN_PROXY_REDIS_URL" => url.clone(),
                _ => None,
            })
        };
        // The environment alone creates [shared] with defaults; every credential shares.
        let c = with_env(MIN, Some("redis://127.0.0.1:6379/0")).unwrap();
        let shared = c.shared.as_ref().unwrap();
        assert_eq!(shared.key_prefix, "token-proxy");
        assert_eq!(shared.lock_ttl, Duration::from_secs(10));
        assert!(c.credentials["main"].shared);
        assert!(with_env(MIN, None).unwrap().shared.is_none());
        let opt_out = MIN.replace("grant =", "shared = false\n        grant =");
        let c = with_env(&opt_out, Some("redis://h")).unwrap();
        assert!(!c.credentials["main"].shared);
        let cases = [
            (
                format!("{MIN}\n[shared]\nredis_url = \"redis://h\"\nlock_ttl = \"500ms\""),
                "shared.lock_ttl",
            ),
            (
                format!("{MIN}\n[shared]\nredis_url = \"http://h\""),
                "shared.redis_url",
            ),
            (
                format!("{MIN}\n[shared]\nkey_prefix = \"x\""),
                "shared.redis_url",
            ),
            (
                MIN.replace("grant =", "shared = true\n        grant ="),
                "credentials.main.shared",
            ),
        ];
        for (text, key) in cases {
            let e = with_env(&text, None).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
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
