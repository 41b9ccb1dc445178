//! A token endpoint (RFC 6749 §3.2) and one call to it: the request body (form or
//! Cotter-style JSON), client authentication, and the answer sorted into a token set, a
//! transient failure (retry with backoff) or a refusal (a person must act). Shared by the
//! grants that have an endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT,
};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use secrecy::{ExposeSecret, SecretString};

use super::GrantError;
use crate::config::{ClientAuth, CredentialConfig, Encoding, EndpointConfig};
use crate::error::error_chain;
use crate::redact::Redactor;
use crate::token::response::{
    ensure_not_expired, parse_token_response_as, ResponseError, TokenSet,
};
use crate::upstream;

/// Token responses larger than this are refused (a token endpoint is not a file server).
pub const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// A token endpoint and how to talk to it.
pub struct Endpoint {
    /// The endpoint's settings as configured (URL, client, scope, parameters, headers,
    /// assertion key).
    config: EndpointConfig,
    timeout: Duration,
    client: Arc<upstream::TokenClient>,
    /// `dpop = true`: a proof with every call; tokens must come back DPoP-bound.
    dpop: Option<Arc<crate::dpop::Dpop>>,
}

impl Endpoint {
    fn new(e: &EndpointConfig, c: &CredentialConfig) -> Result<Endpoint, String> {
        Ok(Endpoint {
            config: e.clone(),
            timeout: c.timeout,
            client: upstream::token_client(
                c.ca_file.as_deref(),
                c.client_cert.as_deref(),
                c.egress.as_ref(),
                c.timeout,
            )?,
            dpop: c.dpop.clone(),
        })
    }
}

/// Whether a credential's endpoint may be shared: it has nothing of its own (no signing
/// key, DPoP key, CA file, client certificate or egress proxy), so its token client is the
/// shared one for its timeout.
fn shareable(e: &EndpointConfig, c: &CredentialConfig) -> bool {
    let own_client = c.ca_file.is_some() || c.client_cert.is_some() || c.egress.is_some();
    !own_client && e.assertion.is_none() && c.dpop.is_none()
}

/// The settings that decide a token call (destructured, so a new setting cannot be left out).
#[derive(PartialEq, Eq, Hash)]
struct Shape<'a> {
    url: &'a Uri,
    encoding: Encoding,
    client_id: Option<&'a str>,
    client_secret: Option<&'a str>,
    client_auth: ClientAuth,
    scope: Option<&'a str>,
    params: &'a [(String, String)],
    headers: &'a [(HeaderName, HeaderValue)],
    timeout: Duration,
}

impl<'a> Shape<'a> {
    /// For a shareable endpoint: its assertion key (always `None` here) is left out.
    fn of(e: &'a EndpointConfig, timeout: Duration) -> Shape<'a> {
        let EndpointConfig {
            token_url,
            encoding,
            client_id,
            client_secret,
            client_auth,
            scope,
            params,
            headers,
            assertion: _,
        } = e;
        Shape {
            url: token_url,
            encoding: *encoding,
            client_id: client_id.as_deref(),
            client_secret: client_secret.as_ref().map(|s| s.expose_secret()),
            client_auth: *client_auth,
            scope: scope.as_deref(),
            params,
            headers,
            timeout,
        }
    }

    fn digest(&self) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(self)
    }
}

/// The endpoints of credentials built together (at start, or by one reload): credentials
/// that call the same token endpoint the same way hold one [`Endpoint`] instead of a copy
/// each (ten thousand users of one identity provider: ~250 bytes each). Kept only while
/// they are built, so it costs nothing afterwards.
#[derive(Default)]
pub struct Endpoints {
    by_digest: HashMap<u64, Vec<Arc<Endpoint>>>,
}

impl Endpoints {
    pub fn get(
        &mut self,
        e: &EndpointConfig,
        c: &CredentialConfig,
    ) -> Result<Arc<Endpoint>, String> {
        if !shareable(e, c) {
            return Ok(Arc::new(Endpoint::new(e, c)?));
        }
        let shape = Shape::of(e, c.timeout);
        // Every endpoint here is shareable.
        let same = self.by_digest.entry(shape.digest()).or_default();
        if let Some(found) = same
            .iter()
            .find(|have| Shape::of(&have.config, have.timeout) == shape)
        {
            return Ok(found.clone());
        }
        let built = Arc::new(Endpoint::new(e, c)?);
        same.push(built.clone());
        Ok(built)
    }
}

impl Endpoint {
    /// RFC 7523 §2.2 client assertion: iss = sub = client_id, aud = the token endpoint (or
    /// `assertion_audience`), a fresh `jti`, valid for 60 s. A new one for every call.
    fn client_assertion(&self) -> Result<Option<String>, GrantError> {
        let Some(a) = &self.config.assertion else {
            return Ok(None);
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let jti: String = {
            use rand::Rng;
            let bytes: [u8; 16] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        let client_id = self.config.client_id.as_deref().unwrap_or_default();
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": a.audience.clone().unwrap_or_else(|| self.config.token_url.to_string()),
            "jti": jti,
            "iat": now,
            "exp": now + 60,
        });
        let mut header = jsonwebtoken::Header::new(a.key.alg);
        header.kid = a.kid.clone();
        jsonwebtoken::encode(&header, &claims, &a.key.key)
            .map(Some)
            .map_err(|e| GrantError::Rejected(format!("cannot sign the client assertion: {e}")))
    }

    fn body(
        &self,
        grant_type: &str,
        refresh_token: Option<&SecretString>,
        assertion: Option<&str>,
    ) -> (Bytes, &'static str) {
        let mut fields: Vec<(&str, &str)> = vec![("grant_type", grant_type)];
        if let Some(rt) = refresh_token {
            fields.push(("refresh_token", rt.expose_secret()));
        }
        if let Some(scope) = &self.config.scope {
            fields.push(("scope", scope));
        }
        for (k, v) in &self.config.params {
            fields.push((k, v));
        }
        if let Some(jwt) = assertion {
            if let Some(id) = &self.config.client_id {
                fields.push(("client_id", id));
            }
            fields.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
            fields.push(("client_assertion", jwt));
        }
        if self.config.client_auth == ClientAuth::Body {
            if let Some(id) = &self.config.client_id {
                fields.push(("client_id", id));
            }
            if let Some(secret) = &self.config.client_secret {
                fields.push(("client_secret", secret.expose_secret()));
            }
        }
        match self.config.encoding {
            Encoding::Form => {
                let mut ser = form_urlencoded::Serializer::new(String::new());
                for (k, v) in &fields {
                    ser.append_pair(k, v);
                }
                (
                    Bytes::from(ser.finish()),
                    "application/x-www-form-urlencoded",
                )
            }
            Encoding::Json => {
                let map: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                    .collect();
                (
                    Bytes::from(serde_json::Value::Object(map).to_string()),
                    "application/json",
                )
            }
        }
    }

    /// Every secret this endpoint is sent, for scrubbing its answers.
    fn redactor(&self, refresh_token: Option<&SecretString>, assertion: Option<&str>) -> Redactor {
        let mut r = Redactor::default();
        if let Some(jwt) = assertion {
            // A signed assertion is a credential for its minute of life.
            r.add(jwt);
        }
        for secret in [refresh_token, self.config.client_secret.as_ref()]
            .into_iter()
            .flatten()
        {
            r.add(secret.expose_secret());
        }
        if let Some(basic) = self.basic_auth() {
            r.add(
                basic
                    .to_str()
                    .unwrap_or_default()
                    .trim_start_matches("Basic "),
            );
        }
        for (_, v) in &self.config.headers {
            r.add(v.to_str().unwrap_or_default());
        }
        r
    }

    fn basic_auth(&self) -> Option<HeaderValue> {
        if self.config.client_auth != ClientAuth::Basic {
            return None;
        }
        // RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let id = enc(self.config.client_id.as_deref().unwrap_or(""));
        let secret = enc(self
            .config
            .client_secret
            .as_ref()
            .map(|s| s.expose_secret())
            .unwrap_or(""));
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        let mut v = HeaderValue::from_str(&format!("Basic {b64}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// One token request. With DPoP, a `use_dpop_nonce` answer (RFC 9449 §8) is followed
    /// by exactly one more request with the nonce it carried (new proof, new assertion).
    pub async fn call(
        &self,
        grant_type: &str,
        refresh_token: Option<&SecretString>,
    ) -> Result<TokenSet, GrantError> {
        match self.call_once(grant_type, refresh_token).await {
            Ok(set) => Ok(set),
            Err(Failed::NonceChallenge(_)) => {
                tracing::debug!("token endpoint asked for a DPoP nonce; retrying once with it");
                self.call_once(grant_type, refresh_token)
                    .await
                    .map_err(Failed::into_inner)
            }
            Err(Failed::Other(e)) => Err(e),
        }
    }

    async fn call_once(
        &self,
        grant_type: &str,
        refresh_token: Option<&SecretString>,
    ) -> Result<TokenSet, Failed> {
        let assertion = self.client_assertion()?;
        let (body, content_type) = self.body(grant_type, refresh_token, assertion.as_deref());
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.config.token_url.clone())
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("token-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| GrantError::Rejected(format!("cannot build token request: {e}")))?;
        if let Some(auth) = self.basic_auth() {
            req.headers_mut().insert(AUTHORIZATION, auth);
        }
        for (k, v) in &self.config.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        if let Some(dpop) = &self.dpop {
            let proof = dpop.proof(&Method::POST, &self.config.token_url, None);
            req.headers_mut().insert(crate::dpop::DPOP.clone(), proof);
        }
        let transient = |message: String| GrantError::Transient {
            message,
            retry_after: None,
        };
        let exchange = async {
            let (_slot, resp) = self.client.request(req).await;
            let resp = resp.map_err(|e| {
                transient(format!("token endpoint unreachable: {}", error_chain(&e)))
            })?;
            let status = resp.status();
            let new_nonce = self.dpop.as_ref().is_some_and(|d| {
                d.remember_token_endpoint_nonce(&self.config.token_url, resp.headers())
            });
            let retry_after = resp.headers().get(RETRY_AFTER).and_then(parse_retry_after);
            let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|e| transient(format!("reading token response: {e}")))?
                .to_bytes();
            Ok::<_, GrantError>((status, retry_after, body, new_nonce))
        };
        let (status, retry_after, body, new_nonce) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                transient(format!(
                    "token endpoint did not answer within {:?}",
                    self.timeout
                ))
            })??;
        if status.is_success() {
            let jkt = self.dpop.as_ref().map(|d| d.jkt.as_str());
            return Ok(parse_token_response_as(&body, SystemTime::now(), jkt)
                .and_then(ensure_not_expired)
                .map_err(|e| match e {
                    ResponseError::NotJson(_) | ResponseError::AlreadyExpired => {
                        transient(e.to_string())
                    }
                    other => GrantError::Rejected(other.to_string()),
                })?);
        }
        // The endpoint's own words may quote what it was sent: never pass our secrets on.
        let detail = self
            .redactor(refresh_token, assertion.as_deref())
            .scrub(&describe_error_body(&body));
        let message = format!("token endpoint answered {}{}", status.as_u16(), detail);
        if new_nonce && error_code(&body).as_deref() == Some("use_dpop_nonce") {
            return Err(Failed::NonceChallenge(GrantError::Transient {
                message,
                retry_after: None,
            }));
        }
        Err(Failed::Other(
            if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT
            {
                GrantError::Transient {
                    message,
                    retry_after,
                }
            } else if status.is_redirection() {
                GrantError::Rejected(format!(
                    "{message} (redirects are not followed; fix token_url)"
                ))
            } else if error_code(&body).as_deref() == Some("invalid_grant") {
                // The grant itself (the refresh token) is dead, for every client holding
                // it — unlike `invalid_client`, which may be one replica's bad secret.
                GrantError::InvalidGrant(message)
            } else {
                GrantError::Rejected(message)
            },
        ))
    }
}

/// Why one token request failed: a DPoP nonce challenge (answered once, by `call`), or
/// anything else.
enum Failed {
    NonceChallenge(GrantError),
    Other(GrantError),
}

impl Failed {
    fn into_inner(self) -> GrantError {
        match self {
            Failed::NonceChallenge(e) | Failed::Other(e) => e,
        }
    }
}

impl From<GrantError> for Failed {
    fn from(e: GrantError) -> Failed {
        Failed::Other(e)
    }
}

/// The RFC 6749 §5.2 `error` code of a JSON error body.
fn error_code(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("error")?
        .as_str()
        .map(str::to_string)
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date; capped at an hour.
pub fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let text = v.to_str().ok()?.trim();
    let delay = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(text)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(delay.min(Duration::from_secs(3600)))
}

/// The error code of an RFC 6749 §5.2 body (and a bounded `error_description`), or the
/// `msg`/`type` of Cotter's. Nothing else of the body is ever quoted, and what is quoted
/// is cut to printable ASCII (RFC 6749 §5.2's own character set) and bounded.
fn describe_error_body(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let field = |k: &str, max: usize| {
        v.get(k).and_then(|x| x.as_str()).map(|s| {
            s.chars()
                .filter(|c| matches!(c, ' '..='~'))
                .take(max)
                .collect::<String>()
        })
    };
    if let Some(code) = field("error", 64) {
        match field("error_description", 200) {
            Some(d) => format!(": {code}: {d}"),
            None => format!(": {code}"),
        }
    } else if let Some(msg) = field("msg", 200) {
        match field("type", 64) {
            Some(t) => format!(": {msg} ({t})"),
            None => format!(": {msg}"),
        }
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, GrantConfig};

    /// Each credential's endpoint, built together as a start builds them.
    fn built(credentials: &[&str]) -> Vec<Arc<Endpoint>> {
        let mut toml = String::from(
            "[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\ncredential = \"c0\"\n",
        );
        let defaults = [
            ("token_url", "\"http://127.0.0.1:9/oauth/token\""),
            ("client_id", "\"cid\""),
            ("client_secret", "\"s1\""),
        ];
        for (i, extra) in credentials.iter().enumerate() {
            toml.push_str(&format!(
                "[credentials.c{i}]\ngrant = \"client_credentials\"\n{extra}\n"
            ));
            for (key, value) in defaults {
                if !extra.starts_with(&format!("{key} =")) {
                    toml.push_str(&format!("{key} = {value}\n"));
                }
            }
        }
        let config = Config::parse(&toml, &|_| None).expect("valid config");
        let mut endpoints = Endpoints::default();
        (0..credentials.len())
            .map(|i| {
                let c = &config.credentials[&format!("c{i}")];
                let GrantConfig::ClientCredentials { endpoint } = &c.grant else {
                    unreachable!()
                };
                endpoints.get(endpoint, c).unwrap()
            })
            .collect()
    }

    #[test]
    fn credentials_that_call_an_endpoint_the_same_way_share_it() {
        let same = built(&["", "", "scope = \"a b\"", "scope = \"a b\""]);
        assert!(Arc::ptr_eq(&same[0], &same[1]));
        assert!(Arc::ptr_eq(&same[2], &same[3]));
        assert!(!Arc::ptr_eq(&same[0], &same[2]));
    }

    #[test]
    fn any_difference_in_the_call_keeps_endpoints_apart() {
        let variants = [
            "",
            "client_secret = \"s2\"",
            "client_id = \"other\"",
            "token_url = \"http://127.0.0.1:9/other\"",
            "scope = \"x\"",
            "encoding = \"json\"",
            "client_auth = \"body\"",
            "timeout = \"5s\"",
            "params = { audience = \"a\" }",
            "params = { audience = \"b\" }",
            "headers = { API_KEY_ID = \"k1\" }",
            "headers = { API_KEY_ID = \"k2\" }",
        ];
        let eps = built(&variants);
        for (i, a) in eps.iter().enumerate() {
            for (j, b) in eps.iter().enumerate().skip(i + 1) {
                assert!(
                    !Arc::ptr_eq(a, b),
                    "{:?} and {:?} share an endpoint",
                    variants[i],
                    variants[j]
                );
            }
        }
    }

    #[test]
    fn an_endpoint_with_a_key_or_a_proxy_of_its_own_is_never_shared() {
        for own in ["dpop = true", "egress_proxy = \"http://127.0.0.1:3128\""] {
            let eps = built(&[own, own]);
            assert!(!Arc::ptr_eq(&eps[0], &eps[1]), "{own}");
        }
    }

    #[test]
    fn retry_after_in_both_forms() {
        let secs = HeaderValue::from_static("120");
        assert_eq!(parse_retry_after(&secs), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(90));
        let date = parse_retry_after(&HeaderValue::from_str(&later).unwrap()).unwrap();
        assert!(
            date > Duration::from_secs(80) && date <= Duration::from_secs(90),
            "{date:?}"
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("999999")),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn secrets_quoted_by_the_endpoint_are_redacted() {
        let r = Redactor::new(["235:s3kjlwkg035"]);
        let body = br#"{"error":"invalid_grant","error_description":"refresh token 235:s3kjlwkg035 is revoked"}"#;
        let text = r.scrub(&describe_error_body(body));
        assert_eq!(text, ": invalid_grant: refresh token [redacted] is revoked");
    }

    #[test]
    fn only_bounded_printable_fields_are_quoted() {
        let long = "x".repeat(5000);
        let body = serde_json::json!({"error": "invalid_grant\n\u{1b}[31m", "error_description": long, "echo": "secret"});
        let text = describe_error_body(body.to_string().as_bytes());
        assert!(text.len() < 300, "{}", text.len());
        assert!(!text.contains('\u{1b}') && !text.contains('\n') && !text.contains("secret"));
    }

    #[test]
    fn error_bodies_are_described() {
        assert_eq!(
            describe_error_body(br#"{"error":"invalid_grant","error_description":"revoked"}"#),
            ": invalid_grant: revoked"
        );
        assert_eq!(
            describe_error_body(br#"{"msg":"refresh token is not valid","type":"auth"}"#),
            ": refresh token is not valid (auth)"
        );
        assert_eq!(describe_error_body(b"<html>"), "");
    }
}
