//! The admin listener. It may listen beyond loopback (Kubernetes probes and scrapes come
//! from outside the pod), but only loopback clients may change tokens (POST, PUT):
//!
//! | method + path                | answer |
//! |------------------------------|--------|
//! | GET  /healthz                | 200 `ok` while the process runs |
//! | GET  /readyz                 | 200 when every credential holds a usable token and we are not shutting down; else 503 JSON naming the credentials that do not |
//! | GET  /metrics                | Prometheus text format |
//! | GET  /tokens                 | per credential `{state, expires_in_s, refreshed_at, refresh_count, last_error, generation}`; never token values |
//! | GET  /tokens/{name}          | the same, for one credential |
//! | POST /tokens/{name}/refresh  | force a refresh now: 200 with the new status, 502 with the token endpoint's error |
//! | PUT  /tokens/{name}          | install a token response JSON (e.g. a login SDK's `oauth_token`); 200 with the status, 400 if unusable |
//! | DELETE /tokens/{name}        | sign out: forget the tokens (memory and state file); requests get 503 until a new PUT |

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::access::{is_loopback, requested_host, AccessPolicy};
use crate::body::{self, AppBody, ProxyBody};
use crate::metrics::Metrics;
use crate::server::PeerAddr;
use crate::token::{Credential, TokenStore};

/// Largest token JSON accepted by `PUT /tokens/{name}`.
const MAX_INSTALL_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct Admin {
    pub store: Arc<TokenStore>,
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM: readiness fails at once so the kubelet stops sending traffic.
    pub draining: CancellationToken,
    /// Which `Host` names reads may use (`server.allowed_hosts`); writes need a local name.
    pub access: AccessPolicy,
}

impl Admin {
    pub async fn handle(&self, req: Request<AppBody>) -> Response<ProxyBody> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        if let Err(message) = self.admit(&req) {
            return json_response(
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "message": message}),
            );
        }
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match (req.method().clone(), segments.as_slice()) {
            (Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
            (Method::GET, ["readyz"]) => self.readyz(),
            (Method::GET, ["metrics"]) => {
                let mut r = text(StatusCode::OK, &self.metrics.encode(&self.store));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (Method::GET, ["tokens"]) => {
                let all: serde_json::Map<String, Value> = self
                    .store
                    .all()
                    .iter()
                    .map(|c| (c.name.to_string(), status(c)))
                    .collect();
                json_response(StatusCode::OK, Value::Object(all))
            }
            (Method::GET, ["tokens", name]) => match self.store.get(name) {
                Some(c) => json_response(StatusCode::OK, status(&c)),
                None => unknown(name),
            },
            (Method::POST, ["tokens", name, "refresh"]) => match self.store.get(name) {
                Some(c) => match c.force_refresh().await {
                    Ok(()) => json_response(StatusCode::OK, status(&c)),
                    Err(e) => json_response(
                        StatusCode::BAD_GATEWAY,
                        json!({"error": "refresh_failed", "message": e, "credential": name, "status": status(&c)}),
                    ),
                },
                None => unknown(name),
            },
            (Method::PUT, ["tokens", name]) => {
                let Some(c) = self.store.get(name) else {
                    return unknown(name);
                };
                let body = match Limited::new(req.into_body(), MAX_INSTALL_BODY)
                    .collect()
                    .await
                {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return bad_request(name, "body unreadable or larger than 64 KiB"),
                };
                match c.install(&body).await {
                    Ok(()) => json_response(StatusCode::OK, status(&c)),
                    Err(e) if e.starts_with("store_unavailable") => store_unavailable(name, &e),
                    Err(e) => bad_request(name, &e),
                }
            }
            (Method::DELETE, ["tokens", name]) => match self.store.get(name) {
                Some(c) => match c.sign_out().await {
                    Ok(()) => json_response(StatusCode::OK, status(&c)),
                    Err(e) if e.starts_with("store_unavailable") => store_unavailable(name, &e),
                    Err(e) => json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({"error": "sign_out_failed", "message": e, "credential": name}),
                    ),
                },
                None => unknown(name),
            },
            (_, ["healthz" | "readyz" | "metrics" | "tokens", ..]) => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed"}),
            ),
            _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
        }
    }

    fn readyz(&self) -> Response<ProxyBody> {
        if self.draining.is_cancelled() {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "shutting down"}),
            );
        }
        let missing = self.store.not_ready();
        if missing.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            let names: Vec<&str> = missing.iter().map(|n| &**n).collect();
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "credentials without a usable token", "credentials": names}),
            )
        }
    }
}

impl Admin {
    /// Probes and scrapes may come from anywhere the listener is reachable, addressed to an
    /// IP literal, localhost or an `allowed_hosts` name (a DNS-rebound name is refused).
    /// Token changes are for this host only (the app's pod, the operator's shell): a
    /// loopback client, addressing us by a local name, outside any web page.
    fn admit(&self, req: &Request<AppBody>) -> Result<(), String> {
        let host = requested_host(req.uri(), req.headers());
        self.access.check_host(host).map_err(|r| r.0)?;
        if is_read(req.method()) {
            return Ok(());
        }
        if !from_loopback(req.extensions().get::<PeerAddr>()) {
            return Err("token changes are accepted from loopback only".into());
        }
        self.access
            .check_admin_write(req.headers(), req.uri())
            .map_err(|r| r.0)
    }
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

fn from_loopback(peer: Option<&PeerAddr>) -> bool {
    peer.is_some_and(|p| is_loopback(p.0.ip()))
}

/// A credential's status as JSON. Built from the snapshot only: no token material in it.
pub fn status(c: &Credential) -> Value {
    let now = SystemTime::now();
    let snap = c.snapshot();
    let expires_in_s =
        snap.token
            .as_ref()
            .and_then(|t| t.expires_at)
            .map(|exp| match exp.duration_since(now) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            });
    let mut status = json!({
        "state": snap.state_name(now),
        "expires_in_s": expires_in_s,
        "refreshed_at": snap.refreshed_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "refresh_count": snap.refreshes.ok,
        "last_error": snap.last_error,
        "generation": snap.token.as_ref().map(|t| t.generation),
        "persisted": snap.persisted,
        "store": c.store_kind(),
        "lease_holder": c.holds_lease(),
    });
    // The DPoP key's public thumbprint (what providers bind tokens to, `cnf.jkt`).
    if let Some(dpop) = &c.dpop {
        status["dpop_jkt"] = dpop.jkt.clone().into();
    }
    status
}

fn unknown(name: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"error": "unknown_credential", "credential": name}),
    )
}

/// The shared store did not take a token change: nothing changed anywhere (503, so
/// scripts retry), rather than one replica diverging from the others.
fn store_unavailable(name: &str, message: &str) -> Response<ProxyBody> {
    let message = message.trim_start_matches("store_unavailable: ");
    let mut r = json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "store_unavailable", "message": message, "credential": name}),
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn bad_request(name: &str, message: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_token_response", "message": message, "credential": name}),
    )
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, value: Value) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_change_tokens() {
        let peer = |a: &str| PeerAddr(a.parse().unwrap());
        for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert!(from_loopback(Some(&peer(local))), "{local}");
        }
        assert!(!from_loopback(Some(&peer("10.1.2.3:5000"))));
        assert!(!from_loopback(Some(&peer("[::ffff:10.1.2.3]:5000"))));
        assert!(!from_loopback(None));
        assert!(is_read(&Method::GET) && !is_read(&Method::DELETE));
    }
}
