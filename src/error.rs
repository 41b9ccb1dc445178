//! Every error the app can receive from the proxy, and its JSON body, in one place.
//!
//! Body shape (INTERFACE.md): `{"error", "message", "route", "credential"}`. Messages are
//! written here or come from the token endpoint's error *code*; they never contain tokens.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("host {host:?} is not named by any route; token-proxy is not an open proxy")]
    HostNotAllowed { host: String },
    #[error(
        "CONNECT tunnels cannot carry a token: give the app an http:// URL for {host} and let the route's upstream be https, or turn on [intercept] (HTTPS interception for the routes' hosts)"
    )]
    ConnectNotSupported { host: String },
    #[error(
        "the interception CA cannot sign for {host}: it is name-constrained to the hosts routes named when it was made; remove intercept.ca_cert_file and ca_key_file to make a new one (apps must then trust the new CA)"
    )]
    CaCannotSign { host: String },
    #[error("this connection was opened (CONNECT) for {expected}, not for {got}")]
    Misdirected { expected: String, got: String },
    #[error("no valid token: {reason}")]
    TokenUnavailable {
        reason: String,
        retry_after: Duration,
    },
    #[error("could not reach the upstream: {0}")]
    UpstreamUnreachable(String),
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the request body stopped arriving: nothing for {0:?} (routes.idle_timeout)")]
    RequestTimeout(Duration),
    /// A web page's request, or a name DNS rebinding could produce (see `access`).
    #[error("{0}")]
    BrowserRequestRefused(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::HostNotAllowed { .. } => StatusCode::FORBIDDEN,
            ProxyError::ConnectNotSupported { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::CaCannotSign { .. } => StatusCode::FORBIDDEN,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BrowserRequestRefused(_) => StatusCode::FORBIDDEN,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::HostNotAllowed { .. } => "host_not_allowed",
            ProxyError::ConnectNotSupported { .. } => "connect_not_supported",
            ProxyError::CaCannotSign { .. } => "host_not_allowed",
            ProxyError::Misdirected { .. } => "misdirected_request",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::BrowserRequestRefused(_) => "browser_request_refused",
        }
    }

    /// The JSON response the app receives.
    pub fn to_response(&self, route: Option<&str>, credential: Option<&str>) -> Response<Bytes> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "route": route,
            "credential": credential,
        });
        let mut resp = Response::new(Bytes::from(body.to_string()));
        *resp.status_mut() = self.status();
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let ProxyError::TokenUnavailable { retry_after, .. } = self {
            let secs = retry_after.as_secs().max(1);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ProxyError::ConnectNotSupported { .. }) {
            resp.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        resp
    }
}

/// An error and its sources on one line (hyper's top-level messages are terse).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_unavailable_has_retry_after_and_json() {
        let e = ProxyError::TokenUnavailable {
            reason: "invalid_grant".into(),
            retry_after: Duration::from_secs(7),
        };
        let r = e.to_response(Some("api"), Some("main"));
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"], "token_unavailable");
        assert_eq!(v["route"], "api");
        assert_eq!(v["credential"], "main");
    }
}
