//! Every credential by name: a `DashMap`, so lookups on the request path never contend, and
//! a reload can replace one entry at a time while requests keep flowing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use secrecy::ExposeSecret;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::credential::{Credential, Start};
use crate::config::{Config, CredentialConfig};
use crate::metrics::Metrics;

pub struct TokenStore {
    credentials: DashMap<Arc<str>, Arc<Credential>>,
    /// The config each credential was built from (fingerprints decide what a reload changes).
    configs: Mutex<HashMap<Arc<str>, CredentialConfig>>,
    /// Each credential's refresher task and the token that stops it.
    refreshers: Mutex<HashMap<Arc<str>, Refresher>>,
    metrics: Arc<Metrics>,
    /// Parent of every refresher's cancellation token.
    shutdown: CancellationToken,
}

/// A running refresher task and the token that stops it.
type Refresher = (CancellationToken, JoinHandle<()>);

/// What a reload did to the credentials.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub kept: Vec<String>,
    pub replaced: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Credentials whose new config could not be built; their old version keeps running.
    pub failed: Vec<(String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenStore {
    /// Build every credential of `config` (loading state files); refreshers are not started.
    pub fn from_config(
        config: &Config,
        metrics: &Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<TokenStore, String> {
        let store = TokenStore {
            credentials: DashMap::new(),
            configs: Mutex::new(HashMap::new()),
            refreshers: Mutex::new(HashMap::new()),
            metrics: metrics.clone(),
            shutdown,
        };
        for c in config.credentials.values() {
            let cred = Credential::new(c, metrics.clone(), Start::default())?;
            lock(&store.configs).insert(cred.name.clone(), c.clone());
            store.credentials.insert(cred.name.clone(), cred);
        }
        Ok(store)
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
    pub fn spawn_refreshers(&self) {
        for cred in self.all() {
            self.spawn_refresher(cred);
        }
    }

    /// A refresher that panics is logged and restarted: a credential never goes stale
    /// silently.
    fn spawn_refresher(&self, cred: Arc<Credential>) {
        let cancel = self.shutdown.child_token();
        let name = cred.name.clone();
        let stop = cancel.clone();
        let task = tokio::spawn(crate::supervise::restarting(
            format!("refresher for credential {name}"),
            cancel.clone(),
            std::time::Duration::from_secs(1),
            move || cred.clone().run_refresher(stop.clone()),
        ));
        lock(&self.refreshers).insert(name, (cancel, task));
    }

    /// Stop a credential's refresher and wait until it has exited. A refresh in flight is
    /// finished (and its rotated token persisted) first: only sleeps are interrupted.
    async fn stop_refresher(&self, name: &str) {
        let entry = lock(&self.refreshers).remove(name);
        if let Some((cancel, task)) = entry {
            cancel.cancel();
            if let Err(e) = task.await {
                tracing::error!(credential = name, error = %e, "refresher supervisor failed");
            }
        }
    }

    /// Apply a new set of credential configs: unchanged ones keep their tokens, changed ones
    /// are rebuilt (carrying over a rotated refresh token), new ones start, removed ones stop.
    pub async fn apply(&self, new: &BTreeMap<String, CredentialConfig>) -> ReloadReport {
        let mut report = ReloadReport::default();
        let old_names: Vec<Arc<str>> = lock(&self.configs).keys().cloned().collect();
        for name in old_names.iter().filter(|n| !new.contains_key(&***n)) {
            self.stop_refresher(name).await;
            self.credentials.remove(name);
            lock(&self.configs).remove(name);
            report.removed.push(name.to_string());
        }
        for (name, config) in new {
            let old_config = lock(&self.configs).get(name.as_str()).cloned();
            let start = match &old_config {
                Some(old) if old.fingerprint() == config.fingerprint() => {
                    report.kept.push(name.clone());
                    continue;
                }
                Some(old) => {
                    self.stop_refresher(name).await;
                    let same_start = same_secret(&old.refresh_token, &config.refresh_token)
                        && same_secret(&old.initial_tokens, &config.initial_tokens);
                    let carried = match (same_start, self.get(name)) {
                        (true, Some(previous)) => previous.refresh_token_now().await,
                        _ => None,
                    };
                    Start {
                        carried_refresh_token: carried,
                        prefer_config: !same_start,
                    }
                }
                None => Start::default(),
            };
            match Credential::new(config, self.metrics.clone(), start) {
                Ok(cred) => {
                    let key = cred.name.clone();
                    lock(&self.configs).insert(key.clone(), config.clone());
                    self.credentials.insert(key, cred.clone());
                    self.spawn_refresher(cred);
                    match old_config {
                        Some(_) => report.replaced.push(name.clone()),
                        None => report.added.push(name.clone()),
                    }
                }
                Err(e) => {
                    if let Some(previous) = self.get(name) {
                        self.spawn_refresher(previous);
                    }
                    report.failed.push((name.clone(), e));
                }
            }
        }
        report
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

fn same_secret(a: &Option<secrecy::SecretString>, b: &Option<secrecy::SecretString>) -> bool {
    a.as_ref().map(|s| s.expose_secret()) == b.as_ref().map(|s| s.expose_secret())
}
