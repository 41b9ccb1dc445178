//! Who may use the listeners: the defence against web pages on the same machine.
//!
//! A localhost sidecar holds a token for anything that can reach `127.0.0.1:8080`, and a
//! browser on the same host can: a page can POST through it (CSRF) and, by DNS rebinding
//! (`evil.test` resolving to 127.0.0.1), read the answers. Two checks stop that:
//! - **Host.** A reverse-mode request must be addressed to an IP literal, `localhost`, or a
//!   name in `server.allowed_hosts`; a rebound name is none of these.
//! - **Browser context.** A request a browser made for a web page carries `Origin` or a
//!   `Sec-Fetch-Site` other than `none`; it is refused unless its origin is in
//!   `server.allowed_origins`. Apps (curl, SDKs, servers) send neither.
//!
//! Pure functions of the request head, so they are unit-tested and fuzzed without sockets.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HOST, ORIGIN};
use http::Uri;

/// `Sec-Fetch-Site`: browsers say where a request came from (`none` = the user typed it).
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The `server.allowed_hosts` / `server.allowed_origins` settings, normalised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Lower-cased host names (no port) accepted in `Host` besides IP literals and localhost.
    pub allowed_hosts: Vec<String>,
    /// Lower-cased `scheme://host[:port]` origins whose pages may use the proxy.
    pub allowed_origins: Vec<String>,
}

/// Why a request was refused; the message names the setting that would accept it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// The host part of a `Host` value or URI authority: without the port, the IPv6 brackets
/// or a trailing dot; case kept. No allocation (it runs on every request). Anything odd
/// (userinfo, a non-numeric port) stays in, so it matches no accepted name.
pub fn host_part(authority: &str) -> &str {
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let host = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => ip,
            Some((ip, port)) if port.strip_prefix(':').is_some_and(digits) => ip,
            _ => authority,
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) if digits(port) => host,
            _ => authority,
        },
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// The lower-cased host of a valid authority (config validation); `None` when invalid.
pub fn host_name(authority: &str) -> Option<String> {
    authority.parse::<http::uri::Authority>().ok()?;
    Some(host_part(authority).to_ascii_lowercase())
}

/// IP literals and `localhost` cannot be rebound by someone else's DNS.
pub fn is_local_name(host: &str) -> bool {
    let lower_suffix = |s: &str| {
        host.len() >= s.len()
            && host.is_char_boundary(host.len() - s.len())
            && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
    };
    // The usual sidecar address first: parsing an address costs ~200 instructions, and
    // this runs for every request.
    host == "127.0.0.1"
        || host.eq_ignore_ascii_case("localhost")
        || lower_suffix(".localhost")
        || host.parse::<IpAddr>().is_ok()
}

/// The name a request is addressed to: the URI's authority (h2, absolute-form), else `Host`.
pub fn requested_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(a) => Some(a.as_str()),
        None => first(headers, &HOST).and_then(|v| v.to_str().ok()),
    }
}

/// The first value of the field `name`, as `HeaderMap::get` gives it. A request carries a
/// handful of fields: reading their names costs less than hashing `name` (most of all a
/// name `http` does not know, such as `sec-fetch-site`), and these checks run for every
/// request.
pub fn first<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a http::HeaderValue> {
    if headers.len() > 8 {
        return headers.get(name);
    }
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

impl AccessPolicy {
    /// A reverse-mode request (or an admin read) addressed to `host` (a `Host` value).
    /// A request with no host at all (HTTP/1.0) cannot come from a browser: accepted.
    pub fn check_host(&self, host: Option<&str>) -> Result<(), Refusal> {
        let Some(raw) = host else { return Ok(()) };
        let name = host_part(raw);
        let allowed = self
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name));
        match is_local_name(name) || allowed {
            true => Ok(()),
            false => Err(Refusal(format!(
                "requests addressed to Host {:?} are refused (it is not an IP literal, localhost, or a name in server.allowed_hosts); add the name to server.allowed_hosts if this proxy is reached by it",
                shorten(raw)
            ))),
        }
    }

    /// Refuse what a browser sent on behalf of a web page, unless its origin is allowed.
    pub fn check_browser(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if let Some(origin) = first(headers, &ORIGIN) {
            let text = origin.to_str().unwrap_or("(not text)");
            let normalised = text.trim().trim_end_matches('/').to_ascii_lowercase();
            if self.allowed_origins.contains(&normalised) {
                return Ok(());
            }
            return Err(Refusal(format!(
                "a web page (Origin {:?}) may not use this proxy: add that origin to server.allowed_origins to allow it",
                shorten(text)
            )));
        }
        match first(headers, &SEC_FETCH_SITE).map(|v| v.as_bytes()) {
            None | Some(b"none") => Ok(()),
            Some(site) => Err(Refusal(format!(
                "a request a browser made for a web page (Sec-Fetch-Site: {}) is refused; pages whose origin is in server.allowed_origins may use the proxy",
                shorten(&String::from_utf8_lossy(site))
            ))),
        }
    }

    /// Admin writes (token changes): only a local process, addressing us by a local name,
    /// outside any web page. `allowed_hosts` does not widen this.
    pub fn check_admin_write(&self, headers: &HeaderMap, uri: &Uri) -> Result<(), Refusal> {
        let local = requested_host(uri, headers).is_none_or(|h| is_local_name(host_part(h)));
        if !local {
            return Err(Refusal(
                "token changes must be addressed to 127.0.0.1, [::1] or localhost".into(),
            ));
        }
        if headers.contains_key(ORIGIN)
            || headers
                .get(SEC_FETCH_SITE)
                .is_some_and(|v| v.as_bytes() != b"none")
        {
            return Err(Refusal(
                "token changes are never accepted from a web page".into(),
            ));
        }
        Ok(())
    }
}

/// Client-supplied text quoted in an error: bounded.
fn shorten(s: &str) -> String {
    s.chars().take(100).collect()
}

/// Whether a peer address is this host (an IPv4 client of a `[::]` listener arrives as
/// `::ffff:127.0.0.1`).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_are_ip_literals_and_localhost() {
        for local in [
            "127.0.0.1",
            "10.1.2.3",
            "::1",
            "localhost",
            "LocalHost",
            "app.localhost",
        ] {
            assert!(is_local_name(local), "{local}");
        }
        for not in [
            "127.0.0.1.evil.example",
            "example.com",
            "127.0.0.1x",
            "localhost.evil",
        ] {
            assert!(!is_local_name(not), "{not}");
        }
    }

    #[test]
    fn first_reads_as_get_does_in_small_and_large_maps() {
        for extra in [0, 3, 12] {
            let mut h = HeaderMap::new();
            for i in 0..extra {
                h.insert(
                    HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                    "v".parse().unwrap(),
                );
            }
            h.append(ORIGIN, "https://a.test".parse().unwrap());
            h.append(SEC_FETCH_SITE, "cross-site".parse().unwrap());
            h.append(ORIGIN, "https://b.test".parse().unwrap());
            for name in [ORIGIN, SEC_FETCH_SITE, HOST] {
                assert_eq!(
                    first(&h, &name),
                    h.get(&name),
                    "{name} with {extra} more fields"
                );
            }
        }
    }
    use http::HeaderValue;

    fn policy() -> AccessPolicy {
        AccessPolicy {
            allowed_hosts: vec!["token-proxy".into()],
            allowed_origins: vec!["https://app.example.com".into()],
        }
    }

    #[test]
    fn hosts() {
        let p = policy();
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST.",
            "10.1.2.3:9901",
            "token-proxy:8080",
            "Token-Proxy",
        ] {
            assert!(p.check_host(Some(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "evil.test",
            "evil.test:8080",
            "127.0.0.1.nip.io",
            "token-proxy.evil.test",
            "",
            "a b",
        ] {
            let e = p.check_host(Some(bad)).unwrap_err();
            assert!(e.0.contains("server.allowed_hosts"), "{bad}: {e:?}");
        }
        assert!(p.check_host(None).is_ok());
    }

    #[test]
    fn browsers() {
        let p = policy();
        let with = |k: &'static str, v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(k, HeaderValue::from_static(v));
            h
        };
        assert!(p.check_browser(&HeaderMap::new()).is_ok());
        assert!(p.check_browser(&with("sec-fetch-site", "none")).is_ok());
        assert!(p
            .check_browser(&with("origin", "https://App.example.com/"))
            .is_ok());
        for (k, v) in [
            ("origin", "https://evil.test"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-origin"),
        ] {
            let e = p.check_browser(&with(k, v)).unwrap_err();
            assert!(e.0.contains("server.allowed_origins"), "{k}: {v}: {e:?}");
        }
    }

    #[test]
    fn admin_writes() {
        let p = policy();
        let uri: Uri = "/tokens/main".parse().unwrap();
        let host = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static(v));
            h
        };
        assert!(p.check_admin_write(&host("127.0.0.1:9901"), &uri).is_ok());
        assert!(p.check_admin_write(&host("localhost:9901"), &uri).is_ok());
        assert!(p.check_admin_write(&host("evil.test:9901"), &uri).is_err());
        assert!(p.check_admin_write(&host("token-proxy"), &uri).is_err());
        let mut h = host("127.0.0.1:9901");
        h.insert(ORIGIN, HeaderValue::from_static("https://app.example.com"));
        assert!(p.check_admin_write(&h, &uri).is_err());
    }

    #[test]
    fn mapped_loopback_is_loopback() {
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("127.0.0.2".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
    }
}
