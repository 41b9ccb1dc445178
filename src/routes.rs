//! The route table (plain data built from config) and the pure request/response rewrites.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use hyper_util::client::legacy::Client;

use crate::body::ProxyBody;
use crate::config::{Config, RouteConfig, UpstreamUrl};
use crate::error::ProxyError;
use crate::upstream::{self, Connector};

pub struct Route {
    pub name: Arc<str>,
    prefix: Option<String>,
    hosts: Vec<String>,
    upstream: UpstreamUrl,
    strip_prefix: bool,
    pub credential: Option<Arc<str>>,
    pub retry_on_401: bool,
    pub max_retry_body: usize,
    pub timeout: Duration,
    /// A body (either way) that makes no progress for this long is abandoned.
    pub idle_timeout: Duration,
    /// Pooled per route (each route may trust its own CA and have its own connect
    /// timeout) and per worker thread: a pooled connection is driven by the thread that
    /// opened it, so each worker keeps its own (index: `workers::current()`).
    clients: Box<[Client<Connector, ProxyBody>]>,
    /// HTTP/1.1 only, for protocol upgrades (WebSocket), which h2 does not carry.
    pub upgrade_client: Client<Connector, ProxyBody>,
    /// For a plain `http://` upstream without an egress proxy: our own HTTP/1.1 client's
    /// connection pools, one per worker thread like `clients` (see `h1`).
    h1_pools: Option<Box<[Arc<crate::h1::Pool>]>>,
    /// This route's request metrics, resolved on its first request.
    metrics: std::sync::OnceLock<Arc<crate::metrics::RouteMetrics>>,
}

impl Route {
    /// The route's request metrics in `metrics` (resolved once per route table).
    pub fn metrics(&self, metrics: &crate::metrics::Metrics) -> Arc<crate::metrics::RouteMetrics> {
        self.metrics
            .get_or_init(|| Arc::new(metrics.route(&self.name)))
            .clone()
    }

    /// This thread's pooled client for the route.
    pub fn client(&self) -> &Client<Connector, ProxyBody> {
        &self.clients[crate::workers::current() % self.clients.len()]
    }

    /// This thread's pool for our own HTTP/1.1 client, when the route's upstream allows it.
    pub fn h1_pool(&self) -> Option<&Arc<crate::h1::Pool>> {
        let pools = self.h1_pools.as_ref()?;
        Some(&pools[crate::workers::current() % pools.len()])
    }

    pub fn from_config(c: &RouteConfig, workers: usize) -> Result<Route, String> {
        let timeouts = upstream::Timeouts {
            connect: c.connect_timeout,
            write_stall: c.idle_timeout,
        };
        let plain_http = c.upstream.scheme == http::uri::Scheme::HTTP && c.egress.is_none();
        let h1_pools = plain_http.then(|| {
            (0..=workers)
                .map(|_| {
                    crate::h1::Pool::new(&c.upstream.authority, c.connect_timeout, c.idle_timeout)
                })
                .collect()
        });
        Ok(Route {
            name: Arc::from(c.name.as_str()),
            prefix: c.prefix.clone(),
            hosts: c.hosts.clone(),
            upstream: c.upstream.clone(),
            strip_prefix: c.strip_prefix,
            credential: c.credential.as_deref().map(Arc::from),
            retry_on_401: c.retry_on_401,
            max_retry_body: c.max_retry_body,
            timeout: c.timeout,
            // Slot 0 serves any thread that is not a proxy worker.
            clients: upstream::clients(
                workers + 1,
                c.ca_file.as_deref(),
                c.client_cert.as_deref(),
                c.egress.as_ref(),
                timeouts,
            )
            .map_err(|e| format!("routes.{}: {e}", c.name))?
            .into_boxed_slice(),
            upgrade_client: upstream::http1_client(
                c.ca_file.as_deref(),
                c.client_cert.as_deref(),
                c.egress.as_ref(),
                timeouts,
            )
            .map_err(|e| format!("routes.{}: {e}", c.name))?,
            h1_pools,
            idle_timeout: c.idle_timeout,
            metrics: std::sync::OnceLock::new(),
        })
    }

    fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, String::len)
    }

    fn matches_path(&self, path: &str) -> bool {
        self.prefix
            .as_deref()
            .is_none_or(|p| prefix_matches(p, path))
    }

    /// The upstream URI for a request to `original` whose normalised path is `path`
    /// (query kept, prefix stripped if configured, upstream base path prepended).
    pub fn upstream_uri(&self, original: &Uri, path: &str) -> Result<Uri, ProxyError> {
        let mut path = path;
        if self.strip_prefix {
            if let Some(p) = &self.prefix {
                path = path.strip_prefix(p.as_str()).unwrap_or(path);
            }
        }
        // The usual case: the app's own path and query go upstream unchanged, and are
        // shared rather than copied and validated again.
        if self.upstream.base_path.is_empty() && path.starts_with('/') && path == original.path() {
            if let Some(pq) = original.path_and_query() {
                return Uri::builder()
                    .scheme(self.upstream.scheme.clone())
                    .authority(self.upstream.authority.clone())
                    .path_and_query(pq.clone())
                    .build()
                    .map_err(|_| ProxyError::BadRequest("invalid path".into()));
            }
        }
        // Exactly the length needed: the string becomes the URI's bytes without a copy, and
        // without the extra allocation a spare capacity would cost.
        let slash = usize::from(!path.starts_with('/'));
        let query = original.query().map_or(0, |q| q.len() + 1);
        let mut pq =
            String::with_capacity(self.upstream.base_path.len() + slash + path.len() + query);
        pq.push_str(&self.upstream.base_path);
        if !path.starts_with('/') {
            pq.push('/');
        }
        pq.push_str(path);
        if let Some(q) = original.query() {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq)
            .map_err(|_| ProxyError::BadRequest("invalid path".into()))?;
        Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid path".into()))
    }
}

pub struct RouteTable {
    /// Longest prefix first, so the first match is the most specific.
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn from_config(config: &Config) -> Result<RouteTable, String> {
        let mut routes = config
            .routes
            .iter()
            .map(|c| Route::from_config(c, config.server.workers).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix_len()));
        Ok(RouteTable { routes })
    }

    /// Reverse mode (origin-form request): the longest `prefix` that starts `path`.
    pub fn by_path(&self, path: &str) -> Result<&Arc<Route>, ProxyError> {
        self.routes
            .iter()
            .find(|r| r.prefix.is_some() && r.matches_path(path))
            .ok_or(ProxyError::NoRoute)
    }

    /// The routes whose `hosts` name this host exactly (case-insensitive; an entry without a
    /// port matches any port), in table order.
    fn naming<'a>(
        &'a self,
        host: &str,
        port: Option<u16>,
    ) -> impl Iterator<Item = &'a Arc<Route>> + 'a {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let with_port = port.map(|p| format!("{host}:{p}"));
        self.routes.iter().filter(move |r| {
            r.hosts
                .iter()
                .any(|h| *h == host || with_port.as_deref() == Some(h.as_str()))
        })
    }

    /// The first route whose `hosts` names this host.
    pub fn naming_host(&self, host: &str, port: Option<u16>) -> Option<&Arc<Route>> {
        self.naming(host, port).next()
    }

    /// Forward mode (absolute-form request, the app uses us as HTTP_PROXY): of the routes
    /// naming this host, the most specific prefix first. A host no route names is refused.
    pub fn by_host(
        &self,
        host: &str,
        port: Option<u16>,
        path: &str,
    ) -> Result<&Arc<Route>, ProxyError> {
        let mut candidates = self.naming(host, port).peekable();
        if candidates.peek().is_none() {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            return Err(ProxyError::HostNotAllowed {
                host: port.map_or_else(|| host.clone(), |p| format!("{host}:{p}")),
            });
        }
        candidates
            .find(|r| r.matches_path(path))
            .ok_or(ProxyError::NoRoute)
    }
}

/// Whether `prefix` (no trailing slash, or "/") covers `path` by whole segments: "/api"
/// covers "/api" and "/api/x", never "/apix" or "/api-internal".
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

/// Why a request path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `..` past the root: nothing legitimate does this.
    AboveRoot,
    /// `..;x`-style segments that some servers read as `..` (Tomcat): refused, not guessed.
    AmbiguousDots,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::AboveRoot => "the path climbs above the root with \"..\"",
            PathError::AmbiguousDots => "the path has a \"..;\" or \".;\" segment",
        })
    }
}

/// The path with dot-segments removed (RFC 3986 §5.2.4), `%2e` counting as a dot, so that
/// `/api/../admin` is routed (and forwarded) as `/admin`, the path the upstream would
/// serve. Other percent-encodings are left exactly as they came.
pub fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    use std::borrow::Cow;
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(Cow::Borrowed(path)); // "*" (OPTIONS) or empty: nothing to normalise
    };
    // One pass over the bytes decides for most paths: no '.' and no '%' (for "%2e").
    let may_have_dot = path.bytes().any(|b| b == b'.' || b == b'%');
    if !may_have_dot || !(path.contains('.') || path.contains("%2e") || path.contains("%2E")) {
        return Ok(Cow::Borrowed(path));
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut changed = false;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match dot_segment(seg) {
            Some(Dots::One) => {
                changed = true;
                if last {
                    out.push("");
                }
            }
            Some(Dots::Two) => {
                changed = true;
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                if last {
                    out.push("");
                }
            }
            None => {
                let before_params = seg.split(';').next().unwrap_or_default();
                if seg.contains(';') && dot_segment(before_params).is_some() {
                    return Err(PathError::AmbiguousDots);
                }
                out.push(seg);
            }
        }
    }
    if !changed {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(format!("/{}", out.join("/"))))
}

enum Dots {
    One,
    Two,
}

/// "." or ".." (each dot possibly written `%2e`).
fn dot_segment(seg: &str) -> Option<Dots> {
    let decoded = seg.replace("%2e", ".").replace("%2E", ".");
    match decoded.as_str() {
        "." => Some(Dots::One),
        ".." => Some(Dots::Two),
        _ => None,
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and the
/// non-standard `Proxy-Connection` old clients send: the one list, kept by
/// [`crate::h1::wire::field_kind`] (which our client reads upstream heads with).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    use crate::h1::wire::{field_kind, Kind};
    !matches!(
        field_kind(name.as_str().as_bytes()),
        Kind::EndToEnd | Kind::ContentLength
    )
}

/// Remove hop-by-hop headers, including any the `Connection` header names. A message that
/// came with `Transfer-Encoding` also loses `Content-Length` (RFC 9112 §6.3: a sender must
/// remove it before forwarding; keeping both is how requests are smuggled).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names says so, instead of a
    // hashed removal per listed name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // Only the names present are removed (usually just `Connection: keep-alive`).
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .collect();
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
    );
    for name in doomed {
        headers.remove(name);
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade`).
pub fn requested_upgrade(version: http::Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let protocol = crate::access::first(headers, &header::UPGRADE)?;
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| protocol.clone())
}

/// Prepare request headers for the upstream: hop-by-hop and `Host` removed (the client
/// sets `Host` from the upstream URI), several `Cookie` fields joined into one, and the
/// app's own copy of our header replaced by ours.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    token: Option<(&HeaderName, &HeaderValue)>,
) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    join_cookies(headers);
    if let Some((name, value)) = token {
        // `insert` drops every value the app sent under that name.
        headers.insert(name.clone(), value.clone());
    }
}

/// HTTP/2 carries each cookie pair in its own `Cookie` field; on HTTP/1.1 they must be one
/// field, joined with "; " (RFC 9113 §8.2.3). Every upstream request goes out as HTTP/1.1
/// or may (h2 upstreams accept the joined form too).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for (i, value) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(mut value) = HeaderValue::from_bytes(&joined) {
        value.set_sensitive(true);
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_are_exactly_rfc_9110s_and_the_old_proxy_ones() {
        for name in [
            "connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "content-length",
            "content-type",
            "date",
            "tf",
            "trailers",
            "upgrade-insecure-requests",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn cookie_fields_are_joined_for_http_1_1() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        rewrite_request_headers(&mut h, None);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        rewrite_request_headers(&mut one, None);
        assert_eq!(one[header::COOKIE], "a=1; b=2");
    }

    fn table(toml: &str) -> RouteTable {
        let config = Config::parse(toml, &|_| None).unwrap();
        RouteTable::from_config(&config).unwrap()
    }

    const ROUTES: &str = r#"
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
        [[routes]]
        name = "fwd"
        hosts = ["Other.example.com:8443"]
        upstream = "https://other.example.com"
    "#;

    #[test]
    fn prefixes_match_whole_segments() {
        let t = table(ROUTES);
        assert_eq!(&*t.by_path("/api").unwrap().name, "api");
        assert_eq!(&*t.by_path("/api/").unwrap().name, "api");
        assert_eq!(&*t.by_path("/api/x/y").unwrap().name, "api");
        for other in ["/apix", "/api-internal", "/ap", "/API/x"] {
            assert_eq!(&*t.by_path(other).unwrap().name, "root", "{other}");
        }
        assert!(prefix_matches("/", "/anything"));
        assert!(!prefix_matches("/api", "/apix"));
    }

    #[test]
    fn dot_segments_are_removed_or_refused() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/api/../admin").unwrap(), "/admin");
        assert_eq!(n("/api/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(n("/api/./x/.").unwrap(), "/api/x/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a//../b").unwrap(), "/a/b");
        assert_eq!(n("/v1.2/file.json").unwrap(), "/v1.2/file.json");
        assert_eq!(n("/a/...").unwrap(), "/a/...");
        assert_eq!(n("/a%2fb/x").unwrap(), "/a%2fb/x");
        assert_eq!(n("*").unwrap(), "*");
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/api/../../etc").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/api/..;/admin").unwrap_err(), PathError::AmbiguousDots);
        assert_eq!(n("/api/%2e;x/admin").unwrap_err(), PathError::AmbiguousDots);
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(ROUTES);
        assert_eq!(&*t.by_path("/api/x").unwrap().name, "api");
        assert_eq!(&*t.by_path("/other").unwrap().name, "root");
    }

    #[test]
    fn upstream_uri_strips_prefix_and_adds_base_path() {
        let t = table(ROUTES);
        let api = t.by_path("/api/x").unwrap();
        let uri: Uri = "/api/users?id=1".parse().unwrap();
        assert_eq!(
            api.upstream_uri(&uri, uri.path()).unwrap().to_string(),
            "https://api.example.com/v2/users?id=1"
        );
        let uri: Uri = "/api".parse().unwrap();
        assert_eq!(
            api.upstream_uri(&uri, uri.path()).unwrap().to_string(),
            "https://api.example.com/v2/"
        );
        let root = t.by_path("/x").unwrap();
        let uri: Uri = "/a/b".parse().unwrap();
        assert_eq!(
            root.upstream_uri(&uri, uri.path()).unwrap().to_string(),
            "http://127.0.0.1:1/a/b"
        );
        // The app's path and query as they came (shared), or as normalised (rebuilt); an
        // absolute-form request's own scheme and host are replaced either way.
        for (target, path, expected) in [
            ("/a/b?q=1&r", "/a/b", "http://127.0.0.1:1/a/b?q=1&r"),
            ("/a/b?", "/a/b", "http://127.0.0.1:1/a/b?"),
            ("/a/./b?q=1", "/a/b", "http://127.0.0.1:1/a/b?q=1"),
            ("http://x.test:81/a?q", "/a", "http://127.0.0.1:1/a?q"),
        ] {
            let uri: Uri = target.parse().unwrap();
            let got = root.upstream_uri(&uri, path).unwrap().to_string();
            assert_eq!(got, expected, "{target}");
        }
    }

    #[test]
    fn hosts_match_exactly() {
        let t = table(ROUTES);
        assert_eq!(
            &*t.by_host("API.example.com", None, "/api/x").unwrap().name,
            "api"
        );
        assert!(matches!(
            t.by_host("api.example.com.evil.test", None, "/"),
            Err(ProxyError::HostNotAllowed { .. })
        ));
        assert!(matches!(
            t.by_host("evil.api.example.com", None, "/"),
            Err(ProxyError::HostNotAllowed { .. })
        ));
        assert_eq!(
            &*t.by_host("other.example.com", Some(8443), "/")
                .unwrap()
                .name,
            "fwd"
        );
        assert!(matches!(
            t.by_host("other.example.com", Some(80), "/"),
            Err(ProxyError::HostNotAllowed { .. })
        ));
        assert!(matches!(
            t.by_host("api.example.com", None, "/nope"),
            Err(ProxyError::NoRoute)
        ));
    }

    #[test]
    fn headers_rewritten() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app-own"),
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        let ours = HeaderValue::from_static("Bearer ours");
        rewrite_request_headers(&mut h, Some((&header::AUTHORIZATION, &ours)));
        assert_eq!(
            h.get_all(header::AUTHORIZATION).iter().collect::<Vec<_>>(),
            vec!["Bearer ours"]
        );
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::HOST).is_none());
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn content_length_is_dropped_when_transfer_encoding_came_too() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h);
        assert!(
            h.get(header::CONTENT_LENGTH).is_none() && h.get(header::TRANSFER_ENCODING).is_none()
        );
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
    }
}
