//! `grant_type=refresh_token` (RFC 6749 §6): present the refresh token held now; the
//! answer may rotate it.

use secrecy::SecretString;

use std::sync::Arc;

use super::{Endpoint, Endpoints, GrantError};
use crate::config::{CredentialConfig, EndpointConfig};
use crate::token::response::TokenSet;

pub struct RefreshTokenGrant {
    endpoint: Arc<Endpoint>,
}

impl RefreshTokenGrant {
    pub fn new(
        e: &EndpointConfig,
        c: &CredentialConfig,
        endpoints: &mut Endpoints,
    ) -> Result<Self, String> {
        Ok(RefreshTokenGrant {
            endpoint: endpoints.get(e, c)?,
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
