//! Token responses: RFC 6749 §5.1, Cotter's JSON variant, and what a login SDK hands over.

use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// An access token, kept after a `Bearer ` prefix in one shared buffer, so that the header
/// value requests carry (`Bearer <token>`, or the bare token) is a view of it, not a copy:
/// the writer's set, the state store's and the published header are one allocation (access
/// tokens are often JWTs of a kilobyte or more). `Debug` never shows it. Unlike a
/// `SecretString` it is not zeroed when dropped; neither is the header value made of it.
#[derive(Clone)]
pub struct AccessToken(Bytes);

impl AccessToken {
    const BEARER: &'static str = "Bearer ";

    pub fn new(token: &str) -> AccessToken {
        let mut buf = Vec::with_capacity(Self::BEARER.len() + token.len());
        buf.extend_from_slice(Self::BEARER.as_bytes());
        buf.extend_from_slice(token.as_bytes());
        AccessToken(Bytes::from(buf))
    }

    pub fn expose_secret(&self) -> &str {
        // Always UTF-8: built from a `&str` after an ASCII prefix.
        std::str::from_utf8(&self.0[Self::BEARER.len()..]).unwrap_or_default()
    }

    /// `prefix` followed by the token: this token's own buffer for `Bearer ` and for no
    /// prefix, a new one for any other prefix.
    pub fn with_prefix(&self, prefix: &str) -> Bytes {
        match prefix {
            Self::BEARER => self.0.clone(),
            "" => self.0.slice(Self::BEARER.len()..),
            _ => {
                let token = &self.0[Self::BEARER.len()..];
                let mut buf = Vec::with_capacity(prefix.len() + token.len());
                buf.extend_from_slice(prefix.as_bytes());
                buf.extend_from_slice(token);
                Bytes::from(buf)
            }
        }
    }
}

/// Copied once into its shared buffer; the `SecretString` is zeroed as it drops.
impl From<SecretString> for AccessToken {
    fn from(token: SecretString) -> AccessToken {
        AccessToken::new(token.expose_secret())
    }
}

/// A set of tokens as received (or loaded from the state file).
#[derive(Clone)]
pub struct TokenSet {
    pub access_token: AccessToken,
    /// `None` when the response carried none (keep the old one).
    pub refresh_token: Option<SecretString>,
    /// `None`: valid until the upstream answers 401.
    pub expires_at: Option<SystemTime>,
    pub received_at: SystemTime,
    /// The DPoP key (its RFC 7638 thumbprint) the access token is bound to; `None`: a
    /// bearer token. A token bound to another key than the credential's is never attached.
    pub dpop_jkt: Option<String>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &"...")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "..."))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// `expires_in` arrives as a number or, from some servers, a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(f64),
    Str(String),
}

#[derive(Deserialize)]
struct RawResponse {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<NumOrString>,
    token_type: Option<String>,
}

/// Why a token response was not accepted. Messages never contain token values.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ResponseError {
    #[error("token response is not a JSON object: {0}")]
    NotJson(String),
    #[error("token response has no access_token")]
    MissingAccessToken,
    #[error(
        "token response has token_type {0:?}; only Bearer is supported (DPoP with dpop = true)"
    )]
    UnsupportedTokenType(String),
    #[error("the token endpoint answered token_type {0:?} to a DPoP request: a bearer token can be replayed by whoever holds it, so it is not used (is DPoP enabled for this client at the provider?)")]
    NotDpopBound(String),
    #[error("token response has an invalid expires_in")]
    BadExpiresIn,
    #[error("token is already expired on arrival (check the clocks)")]
    AlreadyExpired,
}

/// Parse a token response body received at `now`.
pub fn parse_token_response(body: &[u8], now: SystemTime) -> Result<TokenSet, ResponseError> {
    parse_token_response_as(body, now, None)
}

/// Parse a token response to a request made with a DPoP proof for the key `dpop_jkt`
/// (`None`: a bearer request). A DPoP request must get `token_type: DPoP` back.
pub fn parse_token_response_as(
    body: &[u8],
    now: SystemTime,
    dpop_jkt: Option<&str>,
) -> Result<TokenSet, ResponseError> {
    parse(
        body,
        now,
        dpop_jkt.map_or(TokenType::Bearer, TokenType::Dpop),
    )
}

/// The `token_type` a response must have, and the DPoP key the token is then bound to.
#[derive(Clone, Copy)]
enum TokenType<'a> {
    Bearer,
    Dpop(&'a str),
    /// Handed over to a DPoP credential: either type, taken as bound to this key.
    Either(&'a str),
}

fn parse(body: &[u8], now: SystemTime, expect: TokenType<'_>) -> Result<TokenSet, ResponseError> {
    let raw: RawResponse =
        serde_json::from_slice(body).map_err(|e| ResponseError::NotJson(e.classify_str()))?;
    let access = raw
        .access_token
        .filter(|s| !s.is_empty())
        .ok_or(ResponseError::MissingAccessToken)?;
    let shown = |tt: &str| tt.chars().take(32).collect::<String>();
    let is = |t: &str| {
        raw.token_type
            .as_deref()
            .is_some_and(|tt| tt.eq_ignore_ascii_case(t))
    };
    let (ok, dpop_jkt) = match expect {
        // RFC 6749 §7.1: a client must not use a token whose type it does not understand.
        TokenType::Bearer => (raw.token_type.is_none() || is("bearer"), None),
        TokenType::Dpop(jkt) => (is("dpop"), Some(jkt)),
        TokenType::Either(jkt) => (
            raw.token_type.is_none() || is("bearer") || is("dpop"),
            Some(jkt),
        ),
    };
    if !ok {
        let tt = raw
            .token_type
            .as_deref()
            .map_or_else(|| "(none)".into(), shown);
        return Err(match expect {
            TokenType::Dpop(_) => ResponseError::NotDpopBound(tt),
            _ => ResponseError::UnsupportedTokenType(tt),
        });
    }
    let expires_in = match raw.expires_in {
        None => None,
        Some(NumOrString::Num(n)) => Some(n),
        Some(NumOrString::Str(s)) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| ResponseError::BadExpiresIn)?,
        ),
    };
    let expires_at = match expires_in {
        Some(n) if !(0.0..1e10).contains(&n) => return Err(ResponseError::BadExpiresIn),
        Some(n) if n > 0.0 => Some(now + Duration::from_secs_f64(n)),
        // Absent or zero: fall back to the JWT's own `exp`, if it is a JWT.
        _ => jwt_expiry(&access),
    };
    Ok(TokenSet {
        access_token: SecretString::from(access).into(),
        refresh_token: raw
            .refresh_token
            .filter(|s| !s.is_empty())
            .map(SecretString::from),
        expires_at,
        received_at: now,
        dpop_jkt: dpop_jkt.map(str::to_string),
    })
}

/// Parse a token response handed over from elsewhere (`PUT /tokens/{name}`,
/// `initial_tokens_file`): a bare token response, or a whole login response carrying it as
/// `oauth_token` (as Cotter's SDKs return). It may be old: a JWT `exp` earlier than
/// `expires_in` suggests wins, and an already-expired access token is accepted for its
/// refresh token (the refresher then refreshes at once).
pub fn parse_handed_over(body: &[u8], now: SystemTime) -> Result<TokenSet, String> {
    parse_handed_over_as(body, now, None)
}

/// [`parse_handed_over`] for a DPoP credential: a token handed over is taken as bound to
/// its key `dpop_jkt` whether it says `DPoP` or `Bearer` (an upstream 401 then gets a
/// bound one through the refresh token).
pub fn parse_handed_over_as(
    body: &[u8],
    now: SystemTime,
    dpop_jkt: Option<&str>,
) -> Result<TokenSet, String> {
    let expect = dpop_jkt.map_or(TokenType::Bearer, TokenType::Either);
    let nested = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(|v| v.get("access_token").is_none())
        .and_then(|v| v.get("oauth_token").filter(|t| t.is_object()).cloned());
    let parsed = match nested {
        Some(inner) => parse(inner.to_string().as_bytes(), now, expect),
        None => parse(body, now, expect),
    };
    let mut set = parsed.map_err(|e| e.to_string())?;
    if let Some(jwt_exp) = jwt_expiry(set.access_token.expose_secret()) {
        set.expires_at = Some(set.expires_at.map_or(jwt_exp, |e| e.min(jwt_exp)));
    }
    Ok(set)
}

/// A token fresh from an endpoint must not be dead on arrival (clock skew, or a server
/// bug): such a token is refused, never attached.
pub fn ensure_not_expired(set: TokenSet) -> Result<TokenSet, ResponseError> {
    match set.expires_at {
        Some(at) if at <= set.received_at => Err(ResponseError::AlreadyExpired),
        _ => Ok(set),
    }
}

trait ClassifyStr {
    fn classify_str(&self) -> String;
}

impl ClassifyStr for serde_json::Error {
    /// The category and position only: serde_json messages can quote input (a token).
    fn classify_str(&self) -> String {
        format!(
            "{:?} error at line {} column {}",
            self.classify(),
            self.line(),
            self.column()
        )
    }
}

/// The `exp` claim of a JWT access token, read without verifying the signature: it only
/// schedules refreshes; verification (when configured) is a separate step.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<f64>,
    }
    let header = jsonwebtoken::decode_header(token).ok()?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.insecure_disable_signature_validation();
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(&[]),
        &validation,
    )
    .ok()?;
    let exp = data.claims.exp?;
    if !(exp.is_finite() && exp > 0.0 && exp < 1e11) {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_secs_f64(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn the_header_value_shares_the_access_tokens_buffer() {
        let token = AccessToken::new("eyJ.a-b.c");
        let clone = token.clone();
        assert_eq!(clone.expose_secret(), "eyJ.a-b.c");
        let bearer = token.with_prefix("Bearer ");
        assert_eq!(&bearer[..], b"Bearer eyJ.a-b.c");
        assert_eq!(bearer.as_ptr(), token.0.as_ptr(), "shared, not copied");
        let bare = token.with_prefix("");
        assert_eq!(&bare[..], b"eyJ.a-b.c");
        assert_eq!(bare.as_ptr(), token.expose_secret().as_ptr());
        let other = token.with_prefix("Token ");
        assert_eq!(&other[..], b"Token eyJ.a-b.c");
        let from_secret = AccessToken::from(SecretString::from("s3cr3t".to_string()));
        assert_eq!(from_secret.expose_secret(), "s3cr3t");
        let set = parse_token_response(br#"{"access_token":"hidden-value"}"#, now()).unwrap();
        assert!(!format!("{set:?}").contains("hidden-value"));
    }

    #[test]
    fn cotter_response() {
        let body = br#"{"access_token":"a.b.c","id_token":"x","refresh_token":"235:abc","expires_in":3600,"token_type":"Bearer","auth_method":"OTP"}"#;
        let t = parse_token_response(body, now()).unwrap();
        assert_eq!(t.access_token.expose_secret(), "a.b.c");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "235:abc");
        assert_eq!(t.expires_at, Some(now() + Duration::from_secs(3600)));
    }

    #[test]
    fn expires_in_as_string_and_missing_refresh_token() {
        let t = parse_token_response(
            br#"{"access_token":"x","expires_in":"60","refresh_token":""}"#,
            now(),
        )
        .unwrap();
        assert_eq!(t.expires_at, Some(now() + Duration::from_secs(60)));
        assert!(t.refresh_token.is_none());
    }

    #[test]
    fn rejects_bad_responses() {
        assert_eq!(
            parse_token_response(br#"{"token_type":"Bearer"}"#, now()).unwrap_err(),
            ResponseError::MissingAccessToken
        );
        assert!(matches!(
            parse_token_response(br#"{"access_token":"x","token_type":"mac"}"#, now()).unwrap_err(),
            ResponseError::UnsupportedTokenType(_)
        ));
        assert_eq!(
            parse_token_response(br#"{"access_token":"x","expires_in":-5}"#, now()).unwrap_err(),
            ResponseError::BadExpiresIn
        );
        let e = parse_token_response(b"<html>secret-token</html>", now())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret-token"), "{e}");
    }

    #[test]
    fn a_whole_cotter_login_response_is_accepted() {
        let body = br#"{"approved":true,"method":"TRUSTED_DEVICE","oauth_token":{"access_token":"at","expires_in":3600,"refresh_token":"96:rt","token_type":"Bearer","id_token":"x","auth_method":"TRUSTED_DEVICE"}}"#;
        let t = parse_handed_over(body, now()).unwrap();
        assert_eq!(t.access_token.expose_secret(), "at");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "96:rt");
        assert!(parse_handed_over(br#"{"oauth_token": 5}"#, now()).is_err());
    }

    #[test]
    fn expiry_from_jwt_exp() {
        let key = jsonwebtoken::EncodingKey::from_secret(b"k");
        let exp = 1_800_000_100u64;
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"exp": exp, "sub": "u"}),
            &key,
        )
        .unwrap();
        let body = serde_json::json!({"access_token": jwt}).to_string();
        let t = parse_token_response(body.as_bytes(), now()).unwrap();
        assert_eq!(t.expires_at, Some(UNIX_EPOCH + Duration::from_secs(exp)));
        // A JWT already expired on arrival is refused, not attached.
        let old = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"exp": 1_700_000_000u64}),
            &key,
        )
        .unwrap();
        let body = serde_json::json!({"access_token": old}).to_string();
        let set = parse_token_response(body.as_bytes(), now()).unwrap();
        assert_eq!(
            ensure_not_expired(set).unwrap_err(),
            ResponseError::AlreadyExpired
        );
        // Opaque tokens without expires_in live until a 401.
        assert_eq!(
            parse_token_response(br#"{"access_token":"opaque"}"#, now())
                .unwrap()
                .expires_at,
            None
        );
    }

    #[test]
    fn token_types_follow_the_request() {
        let dpop = br#"{"access_token":"a","token_type":"DPoP","expires_in":60}"#;
        let bearer = br#"{"access_token":"a","token_type":"Bearer","expires_in":60}"#;
        assert_eq!(
            parse_token_response_as(dpop, now(), Some("k"))
                .unwrap()
                .dpop_jkt
                .as_deref(),
            Some("k")
        );
        assert!(matches!(
            parse_token_response_as(bearer, now(), Some("k")),
            Err(ResponseError::NotDpopBound(_))
        ));
        assert!(matches!(
            parse_token_response(dpop, now()),
            Err(ResponseError::UnsupportedTokenType(_))
        ));
        // Handed over to a DPoP credential: either type, bound to its key.
        for body in [&dpop[..], &bearer[..]] {
            let set = parse_handed_over_as(body, now(), Some("k")).unwrap();
            assert_eq!(set.dpop_jkt.as_deref(), Some("k"));
        }
        let nested = br#"{"oauth_token":{"access_token":"a","token_type":"DPoP"}}"#;
        assert!(parse_handed_over_as(nested, now(), Some("k")).is_ok());
        assert!(parse_handed_over(nested, now()).is_err());
    }
}
