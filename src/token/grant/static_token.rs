//! `grant = "static"`: a token handed over as it is, inline or in a file re-read on every
//! fetch (so a rotated file, e.g. a Kubernetes symlink swap, takes effect).

use std::path::PathBuf;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};

use super::GrantError;
use crate::config::StaticTokenConfig;
use crate::token::response::{jwt_expiry, TokenSet};

pub enum StaticSource {
    Inline(SecretString),
    File(PathBuf),
}

impl StaticSource {
    pub fn new(c: &StaticTokenConfig) -> StaticSource {
        match c {
            StaticTokenConfig::Inline(token) => StaticSource::Inline(token.clone()),
            StaticTokenConfig::File(path) => StaticSource::File(path.clone()),
        }
    }

    pub fn read(&self) -> Result<TokenSet, GrantError> {
        let token = match self {
            StaticSource::Inline(t) => t.expose_secret().to_string(),
            StaticSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| GrantError::Transient {
                    message: format!("cannot read access_token_file {}: {e}", path.display()),
                    retry_after: None,
                })?
                .trim()
                .to_string(),
        };
        if token.is_empty() {
            return Err(GrantError::Transient {
                message: "access token file is empty".into(),
                retry_after: None,
            });
        }
        let now = SystemTime::now();
        let expires_at = jwt_expiry(&token);
        if expires_at.is_some_and(|at| at <= now) {
            return Err(GrantError::Transient {
                message: "static token's JWT exp has passed".into(),
                retry_after: None,
            });
        }
        Ok(TokenSet {
            access_token: SecretString::from(token).into(),
            refresh_token: None,
            expires_at,
            received_at: now,
            dpop_jkt: None,
        })
    }
}
