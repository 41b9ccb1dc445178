//! Every credential by name: a `DashMap`, so lookups on the request path never contend
//! with each other, and so a future config reload can swap one entry at a time.

use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::credential::Credential;
use crate::config::Config;
use crate::metrics::Metrics;

pub struct TokenStore {
    credentials: DashMap<Arc<str>, Arc<Credential>>,
}

impl TokenStore {
    /// Build every credential of `config` (loading state files); refreshers are not started.
    pub fn from_config(config: &Config, metrics: &Arc<Metrics>) -> Result<TokenStore, String> {
        let credentials = DashMap::new();
        for c in config.credentials.values() {
            let cred = Credential::new(c, metrics.clone())?;
            credentials.insert(cred.name.clone(), cred);
        }
        Ok(TokenStore { credentials })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Credential>> {
        self.credentials.get(name).map(|c| c.value().clone())
    }

    /// All credentials, sorted by name (for stable admin output).
    pub fn all(&self) -> Vec<Arc<Credential>> {
        let mut v: Vec<_> = self.credentials.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Start one refresher task per credential.
    pub fn spawn_refreshers(&self, shutdown: &CancellationToken) {
        for cred in self.all() {
            tokio::spawn(cred.run_refresher(shutdown.clone()));
        }
    }

    /// Names of credentials that hold no usable token right now.
    pub fn not_ready(&self) -> Vec<Arc<str>> {
        let now = SystemTime::now();
        self.all()
            .into_iter()
            .filter(|c| c.snapshot().usable_token(now).is_none())
            .map(|c| c.name.clone())
            .collect()
    }
}
