//! `grant_type=client_credentials` (RFC 6749 §4.4): the client's own credentials, nothing
//! that rotates.

use super::{Endpoint, GrantError};
use crate::config::{CredentialConfig, EndpointConfig};
use crate::token::response::TokenSet;

pub struct ClientCredentialsGrant {
    endpoint: Endpoint,
}

impl ClientCredentialsGrant {
    pub fn new(e: &EndpointConfig, c: &CredentialConfig) -> Result<Self, String> {
        Ok(ClientCredentialsGrant {
            endpoint: Endpoint::new(e, c)?,
        })
    }

    pub async fn fetch(&self) -> Result<TokenSet, GrantError> {
        self.endpoint.call("client_credentials", None).await
    }
}
