//! From the raw schema to a validated [`Config`]: defaults, secrets resolved, cross-checks
//! (a route's credential exists, a grant has what it needs), errors naming the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Uri};

use super::raw::{RawConfig, RawCredential, RawRoute};
use super::values::{opt_duration, opt_size, parse_addr, parse_upstream, read_secret_file, secret};
use super::*;

pub(super) fn build(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
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
        access: crate::access::AccessPolicy {
            allowed_hosts: allowed_hosts(raw.server.allowed_hosts.unwrap_or_default())?,
            allowed_origins: allowed_origins(raw.server.allowed_origins.unwrap_or_default())?,
        },
        max_header_size: opt_size(
            "server.max_header_size",
            raw.server.max_header_size,
            64 * 1024,
        )?,
        keepalive_timeout: opt_duration(
            "server.keepalive_timeout",
            raw.server.keepalive_timeout,
            Duration::from_secs(30),
        )?,
        workers: 1,
    };
    let workers = match env("TOKEN_PROXY_WORKERS") {
        Some(v) => v.trim().parse::<i64>().map_err(|_| {
            ConfigError("TOKEN_PROXY_WORKERS: must be a whole number (server.workers)".into())
        })?,
        None => raw
            .server
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as i64)),
    };
    if !(1..=256).contains(&workers) {
        return err("server.workers: must be between 1 and 256");
    }
    let server = ServerConfig {
        workers: workers as usize,
        ..server
    };
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&server.keepalive_timeout) {
        return err("server.keepalive_timeout: must be between 1s and 1h");
    }
    if server.max_header_size < 1024 {
        return err("server.max_header_size: must be at least 1KiB");
    }

    let shared = build_shared(raw.shared, env)?;
    let mut credentials = BTreeMap::new();
    for (name, c) in raw.credentials {
        let share = c.shared;
        let mut cred = build_credential(&name, c, env)?;
        cred.shared = match (share, &shared) {
            (Some(true), None) => {
                return err(format!(
                    "credentials.{name}.shared: true needs a [shared] section (redis_url)"
                ))
            }
            (Some(s), Some(_)) => s,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        credentials.insert(name, cred);
    }

    if raw.routes.is_empty() {
        return err("routes: at least one [[routes]] entry is required");
    }
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        routes.push(build_route(i, r, &credentials, env)?);
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
    let intercept = match raw.intercept {
        Some(i) => Some(build_intercept(i, &routes)?),
        None => None,
    };
    Ok(Config {
        server,
        routes,
        credentials,
        shared,
        intercept,
        source: None,
    })
}

/// `[intercept]`: both CA files exist (loaded and checked now) or neither does (generated
/// at start, name-constrained to the routes' hosts).
fn build_intercept(
    raw: super::raw::RawIntercept,
    routes: &[RouteConfig],
) -> Result<super::InterceptConfig, ConfigError> {
    let (Some(cert), Some(key)) = (raw.ca_cert_file, raw.ca_key_file) else {
        return err("intercept.ca_cert_file: ca_cert_file and ca_key_file are both required (generated on first start when both are missing)");
    };
    let (cert, key) = (PathBuf::from(cert), PathBuf::from(key));
    let leaf_lifetime = opt_duration(
        "intercept.leaf_lifetime",
        raw.leaf_lifetime,
        Duration::from_secs(24 * 3600),
    )?;
    if leaf_lifetime < Duration::from_secs(60) {
        return err("intercept.leaf_lifetime: at least 1m");
    }
    let ca = match (cert.exists(), key.exists()) {
        (true, true) => Some(std::sync::Arc::new(
            crate::intercept::Ca::load(&cert, &key).map_err(ConfigError)?,
        )),
        (false, false) => None,
        (true, false) => {
            return err(format!(
                "intercept.ca_key_file: {} does not exist but ca_cert_file does; provide both, or remove both to generate a new CA",
                key.display()
            ))
        }
        (false, true) => {
            return err(format!(
                "intercept.ca_cert_file: {} does not exist but ca_key_file does; provide both, or remove both to generate a new CA",
                cert.display()
            ))
        }
    };
    let mut hosts: Vec<String> = Vec::new();
    for r in routes {
        for h in &r.hosts {
            let bare = match h.rsplit_once(':') {
                Some((name, port)) if port.parse::<u16>().is_ok() && !name.ends_with(':') => name,
                _ => h.as_str(),
            };
            let bare = bare.trim_matches(['[', ']']).to_ascii_lowercase();
            if !hosts.contains(&bare) {
                hosts.push(bare);
            }
        }
    }
    if hosts.is_empty() {
        return err(
            "intercept: no route names `hosts`; interception serves only hosts a route names",
        );
    }
    Ok(super::InterceptConfig {
        ca_cert_file: cert,
        ca_key_file: key,
        leaf_lifetime,
        ca,
        hosts,
    })
}

pub(super) fn build_route(
    i: usize,
    r: RawRoute,
    credentials: &BTreeMap<String, CredentialConfig>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RouteConfig, ConfigError> {
    let key = format!("routes[{i}]");
    let name = r.name.unwrap_or_else(|| format!("route{i}"));
    if let Some(p) = &r.prefix {
        if !p.starts_with('/') {
            return err(format!("{key}.prefix: {p:?} must start with '/'"));
        }
        if crate::routes::normalize_path(p).ok().as_deref() != Some(p.as_str()) {
            return err(format!(
                "{key}.prefix: {p:?} must not contain dot-segments (\".\", \"..\")"
            ));
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
    let idle_timeout = opt_duration(
        &format!("{key}.idle_timeout"),
        r.idle_timeout,
        Duration::from_secs(60),
    )?;
    if idle_timeout < Duration::from_millis(100) {
        return err(format!("{key}.idle_timeout: must be at least 100ms"));
    }
    let ca_file = r.ca_file.map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return err(format!("{key}.ca_file: {} does not exist", p.display()));
        }
    }
    let client_cert_files: Vec<PathBuf> = [&r.tls_client_cert_file, &r.tls_client_key_file]
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .collect();
    let client_cert = client_cert(&key, r.tls_client_cert_file, r.tls_client_key_file)?;
    let egress = egress(&key, r.egress_proxy, env)?;
    Ok(RouteConfig {
        name,
        // "/api/" and "/api" name the same segment: matching is by whole segments.
        prefix: r.prefix.map(|p| match p.trim_end_matches('/') {
            "" => "/".to_string(),
            trimmed => trimmed.to_string(),
        }),
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
        idle_timeout,
        ca_file,
        client_cert,
        client_cert_files,
        egress,
    })
}

/// `egress_proxy`: a proxy URL, or `env` (HTTPS_PROXY / HTTP_PROXY / NO_PROXY).
fn egress(
    key: &str,
    value: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<std::sync::Arc<crate::egress::Egress>>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) => crate::egress::Egress::from_setting(&format!("{key}.egress_proxy"), &v, env)
            .map_err(ConfigError),
    }
}

/// Both of `tls_client_cert_file` and `tls_client_key_file`, or neither.
fn client_cert(
    key: &str,
    cert: Option<String>,
    private: Option<String>,
) -> Result<Option<std::sync::Arc<super::client_cert::ClientCert>>, ConfigError> {
    match (cert, private) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => super::client_cert::load(key, Path::new(&c), Path::new(&k))
            .map(Some)
            .map_err(ConfigError),
        (Some(_), None) => err(format!(
            "{key}.tls_client_key_file: required with tls_client_cert_file"
        )),
        (None, Some(_)) => err(format!(
            "{key}.tls_client_cert_file: required with tls_client_key_file"
        )),
    }
}

pub(super) fn build_credential(
    name: &str,
    c: RawCredential,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CredentialConfig, ConfigError> {
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
        &c.signing_key_file,
        &c.tls_client_cert_file,
        &c.tls_client_key_file,
        &c.dpop_key_file,
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
    let client_auth = c.client_auth.unwrap_or(if c.signing_key_file.is_some() {
        ClientAuth::PrivateKeyJwt
    } else if client_secret.is_some() {
        ClientAuth::Basic
    } else if c.client_id.is_some() {
        ClientAuth::Body
    } else {
        ClientAuth::None
    });
    if client_auth == ClientAuth::Basic && c.client_id.is_none() {
        return err(format!("{key}.client_auth: \"basic\" needs client_id"));
    }
    let assertion = match (client_auth, &c.signing_key_file) {
        (ClientAuth::PrivateKeyJwt, None) => {
            return err(format!(
                "{key}.signing_key_file: required for client_auth = \"private_key_jwt\""
            ))
        }
        (ClientAuth::PrivateKeyJwt, Some(path)) => {
            if c.client_id.is_none() {
                return err(format!(
                    "{key}.client_id: required for client_auth = \"private_key_jwt\" (the assertion's iss and sub)"
                ));
            }
            if client_secret.is_some() {
                return err(format!(
                    "{key}.client_secret: not used with client_auth = \"private_key_jwt\""
                ));
            }
            let signing = super::signing_key::load(
                &key,
                std::path::Path::new(path),
                c.signing_alg.as_deref(),
            )
            .map_err(ConfigError)?;
            Some(Box::new(super::AssertionConfig {
                // INTERFACE.md: `signing_key_id`, else the key's RFC 7638 thumbprint.
                kid: Some(
                    c.signing_key_id
                        .clone()
                        .unwrap_or_else(|| signing.thumbprint.clone()),
                ),
                key: signing,
                audience: c.assertion_audience.clone(),
            }))
        }
        (_, Some(_)) => {
            return err(format!(
                "{key}.signing_key_file: only used with client_auth = \"private_key_jwt\""
            ))
        }
        (_, None) => {
            if c.signing_alg.is_some()
                || c.signing_key_id.is_some()
                || c.assertion_audience.is_some()
            {
                return err(format!(
                    "{key}.signing_alg: signing_alg, signing_key_id and assertion_audience need client_auth = \"private_key_jwt\""
                ));
            }
            None
        }
    };

    let mut params = Vec::new();
    for (k, v) in c.params.unwrap_or_default() {
        const RESERVED: [&str; 7] = [
            "grant_type",
            "refresh_token",
            "client_id",
            "client_secret",
            "scope",
            "client_assertion",
            "client_assertion_type",
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
    let dpop = match (c.dpop.unwrap_or(false), c.dpop_key_file) {
        (true, _) if grant == GrantKind::Static => {
            return err(format!(
                "{key}.dpop: needs a token endpoint (grant = \"refresh_token\" or \"client_credentials\"); a static token is not bound to our key"
            ))
        }
        (true, _) if c.header.as_deref().is_some_and(|h| !h.eq_ignore_ascii_case("authorization"))
            || c.header_prefix.is_some() =>
        {
            return err(format!(
                "{key}.header_prefix: not used with dpop = true (the token goes in `Authorization: DPoP ...`)"
            ))
        }
        (true, file) => Some(std::sync::Arc::new(
            crate::dpop::Dpop::load(&key, file.as_deref().map(std::path::Path::new))
                .map_err(ConfigError)?,
        )),
        (false, Some(_)) => {
            return err(format!("{key}.dpop_key_file: only used with dpop = true"))
        }
        (false, None) => None,
    };
    let header_s = c.header.unwrap_or_else(|| "Authorization".into());
    let header = HeaderName::from_bytes(header_s.as_bytes()).map_err(|_| {
        ConfigError(format!(
            "{key}.header: {header_s:?} is not a valid header name"
        ))
    })?;
    let header_prefix = match &dpop {
        Some(_) => "DPoP ".to_string(),
        None => c.header_prefix.unwrap_or_else(|| "Bearer ".into()),
    };
    if HeaderValue::from_str(&header_prefix).is_err() {
        return err(format!("{key}.header_prefix: not a valid header value"));
    }
    let ca_file = c.ca_file.map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return err(format!("{key}.ca_file: {} does not exist", p.display()));
        }
    }
    let client_cert = client_cert(&key, c.tls_client_cert_file, c.tls_client_key_file)?;
    let egress = egress(&key, c.egress_proxy, env)?;
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
    let endpoint = token_url.map(|token_url| EndpointConfig {
        token_url,
        encoding: c.encoding.unwrap_or(Encoding::Form),
        client_id: c.client_id,
        client_secret,
        client_auth,
        scope: c.scope,
        params,
        headers,
        assertion,
    });
    let grant = match (grant, endpoint) {
        (GrantKind::RefreshToken, Some(endpoint)) => GrantConfig::RefreshToken {
            endpoint,
            refresh_token,
            initial_tokens,
        },
        (GrantKind::ClientCredentials, Some(endpoint)) => {
            GrantConfig::ClientCredentials { endpoint }
        }
        (GrantKind::Static, _) => GrantConfig::Static(match (access_token_file, access_token) {
            (Some(path), _) => StaticTokenConfig::File(path),
            (None, Some(token)) => StaticTokenConfig::Inline(token),
            (None, None) => return err(format!("{key}.access_token: required")),
        }),
        (_, None) => return err(format!("{key}.token_url: required")),
    };
    Ok(CredentialConfig {
        name: name.to_string(),
        grant,
        shared: false,
        state_file: c.state_file.map(PathBuf::from),
        refresh_before,
        header,
        header_prefix,
        timeout,
        ca_file,
        client_cert,
        egress,
        dpop,
        verify,
        files,
    })
}

pub(super) fn build_verification(
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
    // Every asymmetric algorithm by default: each token is checked against a key of its own
    // family (an RSA key never verifies an ES256 token), so the list only narrows policy.
    let names =
        algorithms.unwrap_or_else(|| DEFAULT_ALGORITHMS.iter().map(|a| a.to_string()).collect());
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

/// `algorithms` when the config names none: the asymmetric JWS algorithms ring verifies.
pub const DEFAULT_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// `server.allowed_hosts`: bare host names (no scheme, port or path), lower-cased.
fn allowed_hosts(names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let key = format!("server.allowed_hosts[{i}]");
            let host = crate::access::host_name(name.trim())
                .filter(|h| !h.is_empty() && !name.contains(['/', '@']))
                .ok_or_else(|| ConfigError(format!("{key}: {name:?} is not a host name")))?;
            if name.trim().trim_end_matches('.').len() != host.len() {
                return err(format!(
                    "{key}: {name:?}: give the host name alone (any port is accepted)"
                ));
            }
            Ok(host)
        })
        .collect()
}

/// `server.allowed_origins`: `scheme://host[:port]` exactly as browsers send `Origin`.
fn allowed_origins(origins: Vec<String>) -> Result<Vec<String>, ConfigError> {
    origins
        .iter()
        .enumerate()
        .map(|(i, origin)| {
            let key = format!("server.allowed_origins[{i}]");
            let normalised = origin.trim().trim_end_matches('/').to_ascii_lowercase();
            let uri: Uri = normalised
                .parse()
                .map_err(|_| ConfigError(format!("{key}: {origin:?} is not an origin")))?;
            let shaped = matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.authority().is_some()
                && uri.path_and_query().is_none_or(|pq| pq.as_str() == "/")
                && !normalised.contains('@');
            if !shaped {
                return err(format!(
                    "{key}: {origin:?} must be scheme://host[:port], as a browser sends in Origin"
                ));
            }
            Ok(normalised)
        })
        .collect()
}

/// `[shared]`, created with defaults when only `TOKEN_PROXY_REDIS_URL` is set.
fn build_shared(
    raw: Option<super::raw::RawShared>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SharedConfig>, ConfigError> {
    let from_env = env("TOKEN_PROXY_REDIS_URL");
    let raw = match (raw, from_env.is_some()) {
        (Some(raw), _) => raw,
        (None, true) => super::raw::RawShared::default(),
        (None, false) => return Ok(None),
    };
    let url = match from_env {
        Some(url) => Some(SecretString::from(url)),
        None => secret("shared", "redis_url", raw.redis_url, raw.redis_url_file)?,
    };
    let Some(url) = url else {
        return err("shared.redis_url: required (redis://host:6379/0 or rediss://...)");
    };
    {
        use secrecy::ExposeSecret;
        let u = url.expose_secret();
        if !(u.starts_with("redis://") || u.starts_with("rediss://"))
            || redis::IntoConnectionInfo::into_connection_info(u).is_err()
        {
            return err("shared.redis_url: must be redis://[user:password@]host[:port][/db] or rediss://...");
        }
    }
    let redis_password = match raw.redis_password_file {
        Some(p) => Some(read_secret_file("shared.redis_password_file", &p)?),
        None => None,
    };
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "token-proxy".into());
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return err("shared.key_prefix: must be non-empty, without spaces");
    }
    let lock_ttl = opt_duration("shared.lock_ttl", raw.lock_ttl, Duration::from_secs(10))?;
    if lock_ttl < Duration::from_secs(1) {
        return err("shared.lock_ttl: must be at least 1s");
    }
    let encryption_key = match raw.encryption_key_file {
        None => None,
        Some(p) => {
            use base64::Engine;
            use secrecy::ExposeSecret;
            let text = read_secret_file("shared.encryption_key_file", &p)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.expose_secret())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    ConfigError(
                        "shared.encryption_key_file: must hold 32 bytes, base64 (head -c 32 /dev/urandom | base64)".into(),
                    )
                })?;
            Some(std::sync::Arc::new(bytes))
        }
    };
    let ca_pem = match raw.ca_file.or_else(|| env("TOKEN_PROXY_REDIS_CA_FILE")) {
        None => None,
        Some(p) => {
            use secrecy::ExposeSecret;
            if !url.expose_secret().starts_with("rediss://") {
                return err("shared.ca_file: needs a rediss:// redis_url (TLS)");
            }
            let pem = std::fs::read(&p)
                .map_err(|e| ConfigError(format!("shared.ca_file: cannot read {p:?}: {e}")))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| ConfigError(format!("shared.ca_file: {p:?} is not valid PEM")))?;
            if certs.is_empty() {
                return err(format!("shared.ca_file: {p:?} holds no certificate"));
            }
            Some(pem)
        }
    };
    Ok(Some(SharedConfig {
        redis_url: url,
        redis_password,
        key_prefix,
        lock_ttl,
        encryption_key,
        ca_pem,
    }))
}
