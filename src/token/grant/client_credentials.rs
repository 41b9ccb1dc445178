//! `grant_type=client_credentials` (RFC 6749 §4.4): the client's own credentials, nothing
//! that rotates.

use std::sync::Arc;

use super::{Endpoint, Endpoints, GrantError};
use crate::config::{CredentialConfig, EndpointConfig};
use crate::token::response::TokenSet;

pub struct ClientCredentialsGrant {
    endpoint: Arc<Endpoint>,
}

impl ClientCredentialsGrant {
    pub fn new(
        e: &EndpointConfig,
        c: &CredentialConfig,
        endpoints: &mut Endpoints,
    ) -> Result<Self, String> {
        Ok(ClientCredentialsGrant {
            endpoint: endpoints.get(e, c)?,
        })
    }

    pub async fn fetch(&self) -> Result<TokenSet, GrantError> {
        self.endpoint.call("client_credentials", None).await
    }
}
