//! How a credential obtains a token: one file per grant, each built from its own
//! `GrantConfig` variant, behind one `Grant::fetch`. A new grant (token exchange, JWT
//! bearer, private_key_jwt client auth) is a new variant here and in the config.

use std::time::Duration;

use secrecy::SecretString;

use super::response::TokenSet;
use crate::config::{CredentialConfig, GrantConfig};

mod client_credentials;
mod endpoint;
mod refresh_token;
mod static_token;

pub use endpoint::{parse_retry_after, Endpoint, Endpoints, MAX_TOKEN_RESPONSE};
pub use static_token::StaticSource;

/// Why a fetch failed, and so what the refresher does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GrantError {
    /// Worth retrying with backoff: network trouble, 5xx, 429.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Retrying will not help (invalid_grant, revoked token, bad client): re-authentication needed.
    #[error("{0}")]
    Rejected(String),
    /// The provider said `invalid_grant`: the refresh token is dead for every holder (a
    /// shared store tells the other replicas, so they do not present it again).
    #[error("{0}")]
    InvalidGrant(String),
    /// No refresh token to present: install one with `PUT /tokens/{name}`.
    #[error("no refresh token: install one with PUT /tokens/{{name}}")]
    NoRefreshToken,
}

pub enum Grant {
    RefreshToken(refresh_token::RefreshTokenGrant),
    ClientCredentials(client_credentials::ClientCredentialsGrant),
    Static(StaticSource),
}

impl Grant {
    /// `endpoints`: the credentials built along with this one, whose endpoint it may share.
    pub fn from_config(c: &CredentialConfig, endpoints: &mut Endpoints) -> Result<Grant, String> {
        Ok(match &c.grant {
            GrantConfig::RefreshToken { endpoint, .. } => Grant::RefreshToken(
                refresh_token::RefreshTokenGrant::new(endpoint, c, endpoints)?,
            ),
            GrantConfig::ClientCredentials { endpoint } => Grant::ClientCredentials(
                client_credentials::ClientCredentialsGrant::new(endpoint, c, endpoints)?,
            ),
            GrantConfig::Static(source) => Grant::Static(StaticSource::new(source)),
        })
    }

    /// Obtain a new token set. `refresh_token` is the current one, for the refresh grant.
    pub async fn fetch(
        &self,
        refresh_token: Option<&SecretString>,
    ) -> Result<TokenSet, GrantError> {
        match self {
            Grant::RefreshToken(g) => g.fetch(refresh_token).await,
            Grant::ClientCredentials(g) => g.fetch().await,
            Grant::Static(source) => source.read(),
        }
    }

    /// Whether a fetch replaces the credential the next fetch needs (a rotating refresh
    /// token): such a fetch must never run twice at once, even across replicas.
    pub fn rotates(&self) -> bool {
        matches!(self, Grant::RefreshToken(_))
    }

    /// A static token read from a file (polled for changes).
    pub fn polls_file(&self) -> bool {
        matches!(self, Grant::Static(StaticSource::File(_)))
    }
}
