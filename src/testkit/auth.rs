//! The mock identity provider: a strict token endpoint (rotation, family revocation on
//! reuse, RFC 6749 or Cotter error bodies, optional JWT access tokens) with fault injection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::watch;

use super::{json, random_hex, spawn, MockServer};
use crate::body::{self, ProxyBody};

/// Error body style of the token server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStyle {
    /// RFC 6749 §5.2: `{"error": "invalid_grant"}`.
    Rfc6749,
    /// Cotter: `{"msg": "...", "type": "..."}`.
    Cotter,
}

struct Access {
    expires: Instant,
    family: u64,
    revoked: bool,
    /// DPoP: the key (thumbprint) the token is bound to.
    jkt: Option<String>,
}

struct Refresh {
    family: u64,
    used: bool,
    jkt: Option<String>,
}

/// RFC 9449 at the token endpoint: proofs required, tokens bound to their key.
struct DpopPolicy {
    /// When set, proofs must carry this nonce (else `use_dpop_nonce`).
    nonce: Option<String>,
    seen_jti: HashSet<String>,
}

/// What a refresh does with the refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshMode {
    /// Issue a new one and invalidate the old (reuse revokes the family).
    Rotate,
    /// Return the same one again.
    Keep,
    /// Leave `refresh_token` out of the response (older Cotter endpoint).
    Omit,
    /// Send `"refresh_token": ""`.
    Empty,
}

/// Makes access tokens ES256/RS256/HS256 JWTs, as a real IdP (e.g. Cotter) does.
#[derive(Clone)]
pub struct JwtSigner {
    pub key: jsonwebtoken::EncodingKey,
    pub algorithm: jsonwebtoken::Algorithm,
    pub kid: String,
    pub issuer: String,
    pub audience: String,
}

/// A canned answer that replaces normal behaviour (for robustness tests).
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

struct AuthState {
    lifetime: Duration,
    refresh_mode: RefreshMode,
    signer: Option<JwtSigner>,
    canned: Option<Canned>,
    /// When set, the next token responses use these lifetimes first (one each).
    next_lifetimes: Vec<Duration>,
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    revoked_families: HashSet<u64>,
    next_family: u64,
    fail_with: Option<StatusCode>,
    requests: Vec<TokenRequest>,
    dpop: Option<DpopPolicy>,
}

/// One request the token server received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub headers: HeaderMap,
    pub content_type: String,
    pub params: HashMap<String, String>,
}

/// The identity provider's state, shared by the token server and the upstream.
pub struct MockAuth {
    state: Mutex<AuthState>,
    pub error_style: ErrorStyle,
    /// While `false`, token requests wait (to hold a refresh "in flight").
    gate: watch::Sender<bool>,
    pub refresh_calls: AtomicU64,
    pub client_credentials_calls: AtomicU64,
    /// A refresh token presented a second time (a client lost a rotation).
    pub reuse_detected: AtomicU64,
    pub rejected_calls: AtomicU64,
    /// While set, failures quote the request they answer (body, Authorization, JSON-escaped
    /// body, a fragment): what careless real servers do, for the redaction tests.
    pub echo_requests_in_errors: std::sync::atomic::AtomicBool,
    /// Token requests being handled right now.
    pub in_flight: AtomicU64,
    /// The most requests it ever had in flight at once.
    pub max_in_flight: AtomicU64,
    /// private_key_jwt: the client's public key; assertions are verified when set.
    client_key: Mutex<Option<ClientKey>>,
    /// Verified client assertions (header and claims), in order.
    pub assertions: Mutex<Vec<serde_json::Value>>,
    /// Token requests answered `use_dpop_nonce`.
    pub dpop_nonce_challenges: AtomicU64,
    /// Held after a request is processed (a rotation is final) and before it is answered:
    /// the worst provider for a client that dies mid-call.
    response_delay: Mutex<Duration>,
}

/// The key a private_key_jwt client signs with, as the provider registered it.
pub struct ClientKey {
    pub key: jsonwebtoken::DecodingKey,
    pub algorithm: jsonwebtoken::Algorithm,
    pub client_id: String,
    /// The `aud` the provider accepts.
    pub audience: String,
    seen_jti: HashSet<String>,
}

impl ClientKey {
    pub fn new(
        key: jsonwebtoken::DecodingKey,
        algorithm: jsonwebtoken::Algorithm,
        client_id: &str,
        audience: &str,
    ) -> ClientKey {
        ClientKey {
            key,
            algorithm,
            client_id: client_id.to_string(),
            audience: audience.to_string(),
            seen_jti: HashSet::new(),
        }
    }
}

/// Counts a request in `in_flight` until it is answered or dropped.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MockAuth {
    pub fn new(lifetime: Duration) -> Arc<MockAuth> {
        Self::with_style(lifetime, ErrorStyle::Rfc6749)
    }

    pub fn with_style(lifetime: Duration, error_style: ErrorStyle) -> Arc<MockAuth> {
        Arc::new(MockAuth {
            state: Mutex::new(AuthState {
                lifetime,
                refresh_mode: RefreshMode::Rotate,
                signer: None,
                canned: None,
                next_lifetimes: Vec::new(),
                access: HashMap::new(),
                refresh: HashMap::new(),
                revoked_families: HashSet::new(),
                next_family: 1,
                fail_with: None,
                requests: Vec::new(),
                dpop: None,
            }),
            error_style,
            gate: watch::Sender::new(true),
            refresh_calls: AtomicU64::new(0),
            client_credentials_calls: AtomicU64::new(0),
            reuse_detected: AtomicU64::new(0),
            rejected_calls: AtomicU64::new(0),
            echo_requests_in_errors: std::sync::atomic::AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            client_key: Mutex::new(None),
            assertions: Mutex::new(Vec::new()),
            dpop_nonce_challenges: AtomicU64::new(0),
            response_delay: Mutex::new(Duration::ZERO),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lock().lifetime = lifetime;
    }

    /// The next responses use these lifetimes, in order, before falling back to the default.
    pub fn queue_lifetimes(&self, lifetimes: &[Duration]) {
        self.lock().next_lifetimes.extend_from_slice(lifetimes);
    }

    pub fn set_refresh_mode(&self, mode: RefreshMode) {
        self.lock().refresh_mode = mode;
    }

    /// Issue JWT access tokens signed by `signer` from now on.
    pub fn set_jwt_signer(&self, signer: Option<JwtSigner>) {
        self.lock().signer = signer;
    }

    /// Answer every token request with exactly this (`None`: behave normally).
    pub fn set_canned(&self, canned: Option<Canned>) {
        self.lock().canned = canned;
    }

    /// Answer every token request with this status (`None`: behave normally).
    pub fn fail_with(&self, status: Option<StatusCode>) {
        self.lock().fail_with = status;
    }

    /// Answer each token request `delay` after processing it (the rotation already done).
    pub fn set_response_delay(&self, delay: Duration) {
        *self
            .response_delay
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Require DPoP proofs at the token endpoint and bind tokens to their key (RFC 9449);
    /// with `nonce`, proofs must carry it.
    pub fn require_dpop(&self, nonce: Option<&str>) {
        self.lock().dpop = Some(DpopPolicy {
            nonce: nonce.map(str::to_string),
            seen_jti: HashSet::new(),
        });
    }

    /// The DPoP key (thumbprint) `token` is bound to, if any.
    pub fn bound_key(&self, token: &str) -> Option<String> {
        self.lock().access.get(token).and_then(|a| a.jkt.clone())
    }

    /// RFC 9449 §5: the proof of a token request, when DPoP is required. `Ok(None)`: not
    /// required (a server without DPoP ignores the header and issues bearer tokens).
    fn check_dpop(
        &self,
        parts: &http::request::Parts,
    ) -> Result<Option<String>, Box<Response<ProxyBody>>> {
        let mut s = self.lock();
        let Some(policy) = s.dpop.as_mut() else {
            return Ok(None);
        };
        let proofs: Vec<&HeaderValue> = parts.headers.get_all("dpop").iter().collect();
        let [proof] = proofs[..] else {
            drop(s);
            return Err(Box::new(self.error(
                StatusCode::BAD_REQUEST,
                "invalid_dpop_proof",
                "exactly one DPoP header is required",
            )));
        };
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let path = parts.uri.path();
        let htu = [
            format!("http://{host}{path}"),
            format!("https://{host}{path}"),
        ];
        let expect = super::dpop::Expect {
            method: "POST",
            htu: &htu,
            ath: None,
            nonce: policy.nonce.as_deref(),
        };
        let nonce = policy.nonce.clone();
        match super::dpop::verify(proof.to_str().unwrap_or(""), &expect, &mut policy.seen_jti) {
            Ok(jkt) => Ok(Some(jkt)),
            Err(super::dpop::Refused::Nonce) => {
                drop(s);
                self.dpop_nonce_challenges.fetch_add(1, Ordering::SeqCst);
                let mut r = self.error(
                    StatusCode::BAD_REQUEST,
                    "use_dpop_nonce",
                    "Authorization server requires nonce in DPoP proof",
                );
                if let Some(n) = nonce.and_then(|n| HeaderValue::from_str(&n).ok()) {
                    r.headers_mut().insert("dpop-nonce", n);
                }
                Err(Box::new(r))
            }
            Err(super::dpop::Refused::Invalid(why)) => {
                drop(s);
                Err(Box::new(self.error(
                    StatusCode::BAD_REQUEST,
                    "invalid_dpop_proof",
                    &why,
                )))
            }
        }
    }

    /// Require private_key_jwt client authentication with this key (RFC 7523).
    pub fn require_client_key(&self, key: ClientKey) {
        *self.client_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// RFC 7523 §3: signature, iss = sub = client_id, aud, exp, a jti never seen before.
    fn check_assertion(&self, params: &HashMap<String, String>) -> Result<(), &'static str> {
        let mut guard = self.client_key.lock().unwrap_or_else(|e| e.into_inner());
        let Some(key) = guard.as_mut() else {
            return Ok(());
        };
        if params.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err("client_assertion_type missing or wrong");
        }
        let jwt = params
            .get("client_assertion")
            .ok_or("client_assertion missing")?;
        let mut validation = jsonwebtoken::Validation::new(key.algorithm);
        validation.set_audience(&[&key.audience]);
        validation.set_issuer(&[&key.client_id]);
        validation.sub = Some(key.client_id.clone());
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(jwt, &key.key, &validation)
            .map_err(|_| "client assertion does not verify")?;
        let jti = data.claims["jti"]
            .as_str()
            .ok_or("jti missing")?
            .to_string();
        if !key.seen_jti.insert(jti) {
            return Err("client assertion replayed (jti seen before)");
        }
        self.assertions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(serde_json::json!({
                "kid": data.header.kid,
                "alg": format!("{:?}", data.header.alg),
                "claims": data.claims,
            }));
        Ok(())
    }

    /// Refresh tokens that would be accepted now (issued, not yet rotated, not revoked).
    pub fn live_refresh_tokens(&self) -> Vec<String> {
        let s = self.lock();
        s.refresh
            .iter()
            .filter(|(_, r)| !r.used && !s.revoked_families.contains(&r.family))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Close (`false`) or open (`true`) the gate token requests wait at.
    pub fn set_gate(&self, open: bool) {
        self.gate.send_replace(open);
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    /// A fresh login: a new token family, returned as the token response JSON a login SDK
    /// hands over (`{access_token, refresh_token, expires_in, ...}`).
    pub fn login(&self) -> serde_json::Value {
        let mut s = self.lock();
        let family = s.next_family;
        s.next_family += 1;
        self.issue(&mut s, family, true, None)
    }

    /// Just a refresh token of a fresh family.
    pub fn new_refresh_token(&self) -> String {
        self.login()["refresh_token"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn issue(
        &self,
        s: &mut AuthState,
        family: u64,
        with_refresh: bool,
        jkt: Option<&str>,
    ) -> serde_json::Value {
        let lifetime = if s.next_lifetimes.is_empty() {
            s.lifetime
        } else {
            s.next_lifetimes.remove(0)
        };
        let access = match &s.signer {
            Some(signer) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let mut header = jsonwebtoken::Header::new(signer.algorithm);
                header.kid = Some(signer.kid.clone());
                let claims = serde_json::json!({
                    "sub": format!("user-{family}"),
                    "aud": signer.audience,
                    "iss": signer.issuer,
                    "iat": now,
                    "exp": now + lifetime.as_secs().max(1),
                    "jti": random_hex(16),
                    "scope": "access",
                    "type": "access_token",
                });
                jsonwebtoken::encode(&header, &claims, &signer.key).unwrap_or_default()
            }
            None => format!("at{family}.{}", random_hex(24)),
        };
        s.access.insert(
            access.clone(),
            Access {
                expires: Instant::now() + lifetime,
                family,
                revoked: false,
                jkt: jkt.map(str::to_string),
            },
        );
        let mut resp = serde_json::json!({
            "access_token": access,
            "token_type": if jkt.is_some() { "DPoP" } else { "Bearer" },
            "expires_in": lifetime.as_secs_f64().ceil() as u64,
        });
        if with_refresh {
            let refresh = format!("{family}:{}", random_hex(24));
            s.refresh.insert(
                refresh.clone(),
                Refresh {
                    family,
                    used: false,
                    jkt: jkt.map(str::to_string),
                },
            );
            resp["refresh_token"] = refresh.into();
        }
        if self.error_style == ErrorStyle::Cotter {
            resp["id_token"] = format!("id.{}", random_hex(8)).into();
            resp["auth_method"] = "OTP".into();
        }
        resp
    }

    /// Did this server issue `token` (valid or not)?
    pub fn issued(&self, token: &str) -> bool {
        self.lock().access.contains_key(token)
    }

    /// Is this bearer token currently valid?
    pub fn check(&self, token: &str) -> Result<(), &'static str> {
        let s = self.lock();
        match s.access.get(token) {
            None => Err("unknown token"),
            Some(a) if a.revoked || s.revoked_families.contains(&a.family) => Err("revoked token"),
            Some(a) if Instant::now() >= a.expires => Err("expired token"),
            Some(_) => Ok(()),
        }
    }

    /// Revoke every access token issued so far (the upstream will answer 401).
    pub fn revoke_all_access(&self) {
        for a in self.lock().access.values_mut() {
            a.revoked = true;
        }
    }

    /// Revoke every refresh token (the next refresh gets invalid_grant).
    pub fn revoke_all_refresh(&self) {
        let mut s = self.lock();
        let families: Vec<u64> = s.refresh.values().map(|r| r.family).collect();
        s.revoked_families.extend(families);
    }

    fn error(&self, status: StatusCode, code: &str, description: &str) -> Response<ProxyBody> {
        self.rejected_calls.fetch_add(1, Ordering::SeqCst);
        let body = match self.error_style {
            ErrorStyle::Rfc6749 => {
                serde_json::json!({"error": code, "error_description": description})
            }
            ErrorStyle::Cotter => serde_json::json!({"msg": description, "type": code}),
        };
        json(status, body)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _counted = InFlight(&self.in_flight);
        let response = self.clone().respond(req).await;
        let delay = *self
            .response_delay
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        response
    }

    async fn respond(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let params: HashMap<String, String> = if content_type.starts_with("application/json") {
            serde_json::from_slice::<HashMap<String, serde_json::Value>>(&body)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        } else {
            form_urlencoded::parse(&body).into_owned().collect()
        };
        self.lock().requests.push(TokenRequest {
            headers: parts.headers.clone(),
            content_type,
            params: params.clone(),
        });
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        if parts.method != Method::POST {
            return self.error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "use POST",
            );
        }
        let canned = self.lock().canned.clone();
        if let Some(c) = canned {
            let mut r = Response::new(body::full(c.body));
            *r.status_mut() = c.status;
            for (k, v) in &c.headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    r.headers_mut().insert(k, v);
                }
            }
            return r;
        }
        let fail = self.lock().fail_with;
        if let Some(status) = fail {
            if self.echo_requests_in_errors.load(Ordering::SeqCst) {
                let sent = String::from_utf8_lossy(&body);
                let auth = parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let rt = params.get("refresh_token").cloned().unwrap_or_default();
                let fragment: String = rt.chars().skip(3).take(10).collect();
                let echo = format!(
                    "could not process {sent} with {auth}; json {}; near {fragment}",
                    serde_json::to_string(&*sent).unwrap_or_default()
                );
                return self.error(status, "invalid_request", &echo);
            }
            return self.error(
                status,
                "temporarily_unavailable",
                "the token service is down",
            );
        }
        if let Err(why) = self.check_assertion(&params) {
            return self.error(StatusCode::UNAUTHORIZED, "invalid_client", why);
        }
        let jkt = match self.check_dpop(&parts) {
            Ok(jkt) => jkt,
            Err(refusal) => return *refusal,
        };
        match params.get("grant_type").map(String::as_str) {
            Some("refresh_token") => {
                self.refresh_calls.fetch_add(1, Ordering::SeqCst);
                let presented = params.get("refresh_token").cloned().unwrap_or_default();
                let mut s = self.lock();
                let Some(entry) = s.refresh.get(&presented) else {
                    drop(s);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is not valid",
                    );
                };
                let (family, used) = (entry.family, entry.used);
                if entry.jkt.is_some() && entry.jkt != jkt {
                    drop(s);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is bound to another DPoP key",
                    );
                }
                if used {
                    // Reuse of a rotated token: revoke the whole family, as real servers do.
                    s.revoked_families.insert(family);
                    drop(s);
                    self.reuse_detected.fetch_add(1, Ordering::SeqCst);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is not valid (reused)",
                    );
                }
                if s.revoked_families.contains(&family) {
                    drop(s);
                    return self.error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "refresh token is not valid (revoked)",
                    );
                }
                let mode = s.refresh_mode;
                if mode == RefreshMode::Rotate {
                    if let Some(entry) = s.refresh.get_mut(&presented) {
                        entry.used = true;
                    }
                }
                let mut resp =
                    self.issue(&mut s, family, mode == RefreshMode::Rotate, jkt.as_deref());
                match mode {
                    RefreshMode::Rotate => {}
                    RefreshMode::Keep => resp["refresh_token"] = presented.into(),
                    RefreshMode::Omit => {}
                    RefreshMode::Empty => resp["refresh_token"] = "".into(),
                }
                json(StatusCode::OK, resp)
            }
            Some("client_credentials") => {
                self.client_credentials_calls.fetch_add(1, Ordering::SeqCst);
                let mut s = self.lock();
                let resp = self.issue(&mut s, 0, false, jkt.as_deref());
                json(StatusCode::OK, resp)
            }
            _ => self.error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type not supported",
            ),
        }
    }
}

/// Start the token endpoint for `auth` (any path; POST).
pub async fn token_server(auth: Arc<MockAuth>) -> MockServer {
    spawn(
        None,
        Arc::new(move |req| Box::pin(auth.clone().handle(req))),
    )
    .await
}

/// The token server over TLS (`tls` may require client certificates: RFC 8705).
pub async fn token_server_tls(auth: Arc<MockAuth>, tls: rustls::ServerConfig) -> MockServer {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    spawn(
        Some(acceptor),
        Arc::new(move |req| Box::pin(auth.clone().handle(req))),
    )
    .await
}
