//! `grant_type=refresh_token` (RFC 6749 §6): present the refresh token held now; the
//! answer may rotate it.

use secrecy::SecretString;

use super::{Endpoint, GrantError};
use crate::config::{CredentialConfig, EndpointConfig};
use crate::token::response::TokenSet;

pub struct RefreshTokenGrant {
    endpoint: Endpoint,
}

impl RefreshTokenGrant {
    pub fn new(e: &EndpointConfig, c: &CredentialConfig) -> Result<Self, String> {
        Ok(RefreshTokenGrant {
            endpoint: Endpoint::new(e, c)?,
        })
    }

    pub async fn fetch(
        &self,
        refresh_token: Option<&SecretString>,
    ) -> Result<TokenSet, GrantError> {
        let rt = refresh_token.ok_or(GrantError::NoRefreshToken)?;
        self.endpoint.call("refresh_token", Some(rt)).await
    }
}
