//! `egress_proxy`: token-proxy's own outbound connections (token endpoints, JWKS, upstreams)
//! through an HTTP proxy, for sidecars in networks that reach the outside only that way.
//! Every proxied connection is a `CONNECT host:port` tunnel (TLS then runs end to end
//! inside it; plain HTTP rides it too), so the proxy never sees a token.
//!
//! `egress_proxy = "http://[user:password@]proxy:3128"` sends everything through that proxy;
//! `egress_proxy = "env"` follows `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` (or their
//! lower-case forms), read when the config is loaded.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::BoxError;

/// One proxy: where it is and, if its URL carried credentials, its `Proxy-Authorization`.
#[derive(Clone)]
pub struct ProxyTarget {
    /// `http://host:port` (credentials removed).
    pub uri: Uri,
    authorization: Option<String>,
}

impl std::fmt::Debug for ProxyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.uri)?;
        if self.authorization.is_some() {
            write!(f, " (with credentials)")?;
        }
        Ok(())
    }
}

/// Which proxy (if any) a destination goes through.
#[derive(Clone, Debug, Default)]
pub struct Egress {
    pub https: Option<ProxyTarget>,
    pub http: Option<ProxyTarget>,
    /// `NO_PROXY` entries: `*`, a host, `.domain` / `domain` (and its subdomains), an IP.
    pub no_proxy: Vec<String>,
}

impl Egress {
    /// Parse the `egress_proxy` setting named `key`; `env` reads the process environment
    /// (through the config loader's closure).
    pub fn from_setting(
        key: &str,
        value: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Arc<Egress>>, String> {
        if value == "env" {
            let var = |upper: &str| {
                env(upper)
                    .or_else(|| env(&upper.to_ascii_lowercase()))
                    .filter(|v| !v.trim().is_empty())
            };
            let target = |name: &str| -> Result<Option<ProxyTarget>, String> {
                var(name)
                    .map(|v| parse_target(&format!("{key} (from {name})"), &v))
                    .transpose()
            };
            let egress = Egress {
                https: target("HTTPS_PROXY")?,
                http: target("HTTP_PROXY")?,
                no_proxy: var("NO_PROXY")
                    .map(|v| {
                        v.split(',')
                            .map(|e| e.trim().to_ascii_lowercase())
                            .filter(|e| !e.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            return Ok((egress.https.is_some() || egress.http.is_some()).then(|| Arc::new(egress)));
        }
        let target = parse_target(key, value)?;
        Ok(Some(Arc::new(Egress {
            https: Some(target.clone()),
            http: Some(target),
            no_proxy: Vec::new(),
        })))
    }

    /// The proxy for `dst`, unless `NO_PROXY` exempts its host.
    fn target_for(&self, dst: &Uri) -> Option<&ProxyTarget> {
        let host = dst.host()?.trim_start_matches('[').trim_end_matches(']');
        let host = host.to_ascii_lowercase();
        let exempt = self.no_proxy.iter().any(|entry| {
            let entry = entry.split(':').next().unwrap_or(entry);
            let entry = entry.trim_start_matches("*.");
            entry == "*"
                || host == entry.trim_start_matches('.')
                || host.ends_with(&format!(".{}", entry.trim_start_matches('.')))
        });
        if exempt {
            return None;
        }
        match dst.scheme_str() {
            Some("https") => self.https.as_ref(),
            _ => self.http.as_ref(),
        }
    }
}

fn parse_target(key: &str, value: &str) -> Result<ProxyTarget, String> {
    let with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|_| format!("{key}: not a proxy URL (http://host:port)"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{key}: only http:// proxies are supported (the tunnel to the destination is TLS)"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{key}: not a proxy URL (http://host:port)"))?;
    let (userinfo, hostport) = match authority.as_str().rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority.as_str()),
    };
    let authorization = userinfo.map(|u| {
        let decoded: String = percent_decode(u);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(decoded)
        )
    });
    let port = uri.port_u16().unwrap_or(80);
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let uri = format!("http://{host}:{port}")
        .parse()
        .map_err(|_| format!("{key}: not a proxy URL (http://host:port)"))?;
    Ok(ProxyTarget { uri, authorization })
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `HttpConnector`, through a `CONNECT` tunnel when an egress proxy applies.
#[derive(Clone)]
pub struct EgressConnector {
    pub http: HttpConnector,
    pub egress: Option<Arc<Egress>>,
}

impl tower_service::Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let target = self
            .egress
            .as_ref()
            .and_then(|e| e.target_for(&dst))
            .cloned();
        let Some(proxy) = target else {
            let connecting = self.http.call(dst);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let connecting = self.http.call(proxy.uri.clone());
        Box::pin(async move {
            let stream = connecting
                .await
                .map_err(|e| format!("egress proxy {} unreachable: {e}", proxy.uri))?;
            tunnel(stream.into_inner(), &proxy, &dst).await
        })
    }
}

/// `CONNECT host:port` and wait for a 2xx; the stream is then the destination's.
async fn tunnel(
    mut stream: TcpStream,
    proxy: &ProxyTarget,
    dst: &Uri,
) -> Result<TokioIo<TcpStream>, BoxError> {
    let host = dst.host().ok_or("destination without a host")?;
    let port = dst
        .port_u16()
        .unwrap_or(if dst.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let target = format!("{host}:{port}");
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    // Read the answer head byte by byte up to its blank line, so that nothing of the
    // tunnelled stream is consumed.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(format!("egress proxy {}: answer head too large", proxy.uri).into());
        }
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(format!(
                "egress proxy {} closed the connection before answering CONNECT {target}",
                proxy.uri
            )
            .into());
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') {
        let shown: String = status_line
            .chars()
            .filter(|c| matches!(c, ' '..='~'))
            .take(100)
            .collect();
        return Err(format!(
            "egress proxy {} refused CONNECT {target}: {shown}",
            proxy.uri
        )
        .into());
    }
    Ok(TokioIo::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_and_scheme_choose_the_proxy() {
        let env = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://user:p%40ss@proxy.corp:3128".to_string()),
            "no_proxy" => Some("localhost, .internal.example,10.0.0.1".to_string()),
            _ => None,
        };
        let e = Egress::from_setting("k", "env", &env).unwrap().unwrap();
        let via = |u: &str| e.target_for(&u.parse().unwrap()).map(|t| t.uri.to_string());
        assert_eq!(
            via("https://api.example.com/x").as_deref(),
            Some("http://proxy.corp:3128/")
        );
        assert_eq!(via("http://api.example.com/x"), None, "no HTTP_PROXY");
        assert_eq!(via("https://localhost:8443/"), None);
        assert_eq!(via("https://a.internal.example/"), None);
        assert_eq!(via("https://internal.example/"), None);
        assert_eq!(via("https://10.0.0.1/"), None);
        assert_eq!(
            e.https.as_ref().unwrap().authorization.as_deref(),
            Some("Basic dXNlcjpwQHNz")
        );
        assert!(Egress::from_setting("k", "https://proxy:1", &|_| None).is_err());
        assert!(Egress::from_setting("k", "env", &|_| None)
            .unwrap()
            .is_none());
    }
}
