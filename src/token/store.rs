//! Every credential by name: a `DashMap`, so lookups on the request path never contend, and
//! a reload can replace one entry at a time while requests keep flowing. It also builds
//! each credential's state store (the seam is injected here, not inside the credential)
//! and hands each credential's refresher to the one scheduler task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::credential::Credential;
use super::grant::Endpoints;
use super::refresher::{self, Refresher, Start};
use super::scheduler::Scheduler;
use super::state::{
    check_state_dir, FileStateStore, MemoryStateStore, RedisSettings, RedisShared, StateStore,
    WriteAheadStore,
};
use crate::config::{Config, CredentialConfig};
use crate::metrics::Metrics;

pub struct TokenStore {
    /// Every credential by name, with its refresher and what it was built from. One map,
    /// not one per part: at ten thousand credentials each more map by name cost ~50 bytes
    /// per credential.
    entries: DashMap<Arc<str>, Entry>,
    /// The one task that steps every refresher when it is due or woken.
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
    /// Parent of every shared store's watcher.
    shutdown: CancellationToken,
    /// The `[shared]` Redis client, when replicas share token state.
    redis: Option<RedisShared>,
}

/// A credential (the read side, for requests), the refresher that writes its tokens, and
/// what its config was.
struct Entry {
    credential: Arc<Credential>,
    running: Running,
    built: Built,
}

/// A credential's refresher, and for a shared store the token that stops its watcher
/// (cancelled when the credential is removed or replaced, not when it is only paused).
struct Running {
    refresher: Arc<Refresher>,
    watcher: Option<CancellationToken>,
}

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

impl TokenStore {
    /// Build every credential of `config` (loading saved tokens); refreshers are not
    /// started.
    pub async fn from_config(
        config: &Config,
        metrics: &Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<TokenStore, String> {
        let store = TokenStore {
            entries: DashMap::new(),
            scheduler: Scheduler::spawn(shutdown.clone()),
            metrics: metrics.clone(),
            redis: match &config.shared {
                Some(shared) => Some(RedisShared::new(
                    RedisSettings {
                        url: shared.redis_url.clone(),
                        password: shared.redis_password.clone(),
                        key_prefix: shared.key_prefix.clone(),
                        lock_ttl: shared.lock_ttl,
                        encryption_key: shared.encryption_key.clone(),
                        ca_pem: shared.ca_pem.clone(),
                    },
                    metrics.clone(),
                )?),
                None => None,
            },
            shutdown,
        };
        let mut endpoints = Endpoints::default();
        for c in config.credentials.values() {
            let running = store.build(c, Start::default(), &mut endpoints).await?;
            let entry = Entry::new(running, Built::of(c));
            store.entries.insert(entry.credential.name.clone(), entry);
        }
        Ok(store)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Credential>> {
        self.entries.get(name).map(|e| e.credential.clone())
    }

    /// All credentials, sorted by name (for stable admin output).
    pub fn all(&self) -> Vec<Arc<Credential>> {
        let mut v: Vec<_> = self.entries.iter().map(|e| e.credential.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Start scheduling every credential's refresher (once, after `from_config`).
    pub fn spawn_refreshers(&self) {
        let built: Vec<Arc<Refresher>> = self
            .entries
            .iter()
            .map(|e| e.running.refresher.clone())
            .collect();
        for refresher in built {
            self.start_refresher(refresher);
        }
    }

    fn start_refresher(&self, refresher: Arc<Refresher>) {
        refresher.resume();
        self.scheduler.start(refresher);
    }

    /// Stop a credential's refresher and wait until no step of it is in flight. A refresh
    /// in flight is finished (and its rotated token committed) first: only waits are
    /// interrupted. The credential stays in the map, and its shared store's watcher keeps
    /// running (see `retire`): a failed rebuild starts the same refresher again.
    async fn stop_refresher(&self, name: &str) -> Option<Arc<Refresher>> {
        let refresher = self.entries.get(name)?.running.refresher.clone();
        self.scheduler.stop(&*refresher);
        refresher.stop().await;
        Some(refresher)
    }

    /// A stopped refresher is gone for good: stop its shared store's watcher too.
    fn retire(running: Running) {
        if let Some(watcher) = running.watcher {
            watcher.cancel();
        }
    }

    /// Apply a new set of credential configs: unchanged ones keep their tokens, changed ones
    /// are rebuilt (carrying over a rotated refresh token), new ones start, removed ones stop.
    pub async fn apply(&self, new: &BTreeMap<String, CredentialConfig>) -> ReloadReport {
        let mut report = ReloadReport::default();
        let mut endpoints = Endpoints::default();
        let old_names: Vec<Arc<str>> = self.entries.iter().map(|e| e.key().clone()).collect();
        for name in old_names.iter().filter(|n| !new.contains_key(&***n)) {
            self.stop_refresher(name).await;
            if let Some((_, entry)) = self.entries.remove(name) {
                let counts = entry.credential.snapshot().refreshes;
                self.metrics.retire_refreshes(name, counts);
                Self::retire(entry.running);
            }
            report.removed.push(name.to_string());
        }
        for (name, config) in new {
            let old_built = self.entries.get(name.as_str()).map(|e| e.built);
            let built = Built::of(config);
            let (start, previous) = match &old_built {
                Some(old) if old.fingerprint == built.fingerprint => {
                    report.kept.push(name.clone());
                    continue;
                }
                Some(old) => {
                    let previous = self.stop_refresher(name).await;
                    let same_start = old.start == built.start;
                    let carried = match (same_start, &previous) {
                        (true, Some(previous)) => previous.refresh_token().await,
                        _ => None,
                    };
                    let counts = self
                        .entries
                        .get(name.as_str())
                        .map(|e| e.credential.snapshot().refreshes)
                        .unwrap_or_default();
                    let start = Start {
                        carried_refresh_token: carried,
                        prefer_config: !same_start,
                        counts,
                    };
                    (start, previous)
                }
                None => {
                    let counts = self.metrics.take_retired_refreshes(name);
                    let start = Start {
                        counts,
                        ..Start::default()
                    };
                    (start, None)
                }
            };
            let counts = start.counts;
            match self.build(config, start, &mut endpoints).await {
                Ok(running) => {
                    let entry = Entry::new(running, built);
                    let refresher = entry.running.refresher.clone();
                    if let Some(old) = self.entries.insert(entry.credential.name.clone(), entry) {
                        Self::retire(old.running);
                    }
                    self.start_refresher(refresher);
                    match old_built {
                        Some(_) => report.replaced.push(name.clone()),
                        None => report.added.push(name.clone()),
                    }
                }
                Err(e) => {
                    match previous {
                        Some(previous) => self.start_refresher(previous),
                        // Not built: what its namesake counted stays retired.
                        None => self
                            .metrics
                            .retire_refreshes(&Arc::from(name.as_str()), counts),
                    }
                    report.failed.push((name.clone(), e));
                }
            }
        }
        report
    }

    /// Build a credential with the state store its config asks for: Redis when it is
    /// shared, the file store with a `state_file` (its directory checked first), else
    /// memory. The store is made here and handed in: the credential never picks its own.
    async fn build(
        &self,
        config: &CredentialConfig,
        start: Start,
        endpoints: &mut Endpoints,
    ) -> Result<Running, String> {
        let watcher = match (&self.redis, config.shared) {
            (Some(_), true) => Some(self.shutdown.child_token()),
            _ => None,
        };
        // A build that fails after the shared store started watching stops it again.
        let stop_watcher_on_error = watcher.clone().map(CancellationToken::drop_guard);
        let state: Arc<dyn StateStore> = match (&self.redis, config.shared, &config.state_file) {
            (Some(redis), true, state_file) => {
                let endpoint = config.endpoint();
                let shared = redis.store_for(
                    &config.name,
                    &endpoint
                        .map(|e| e.token_url.to_string())
                        .unwrap_or_default(),
                    endpoint
                        .and_then(|e| e.client_id.as_deref())
                        .unwrap_or_default(),
                    watcher.clone().unwrap_or_default(),
                );
                match state_file {
                    // The file is the write-ahead copy of what goes to Redis.
                    Some(path) => {
                        check_state_dir(path, true)
                            .map_err(|e| format!("credentials.{}.state_file: {e}", config.name))?;
                        Arc::new(WriteAheadStore::new(
                            FileStateStore::new(path.clone()),
                            shared,
                        ))
                    }
                    None => shared,
                }
            }
            (_, _, Some(path)) => {
                check_state_dir(path, true)
                    .map_err(|e| format!("credentials.{}.state_file: {e}", config.name))?;
                Arc::new(FileStateStore::new(path.clone()))
            }
            _ => MemoryStateStore::shared(),
        };
        // A DPoP key generated for `dpop_key_file` is on disk before any token is bound to it.
        if let Some(dpop) = &config.dpop {
            dpop.persist()
                .map_err(|e| format!("credentials.{}.{e}", config.name))?;
        }
        let wake = self.scheduler.wake_handle();
        let (cred, refresher) = refresher::build(
            config,
            self.metrics.clone(),
            start,
            state.clone(),
            wake,
            endpoints,
        )
        .await?;
        if let Some(watcher) = &watcher {
            tokio::spawn(wake_on_commits(cred, state, watcher.clone()));
        }
        if let Some(guard) = stop_watcher_on_error {
            guard.disarm();
        }
        Ok(Running { refresher, watcher })
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

/// A shared store's commits by other holders wake the credential's refresher (which then
/// follows them), until `stop` is cancelled.
async fn wake_on_commits(
    cred: Arc<Credential>,
    state: Arc<dyn StateStore>,
    stop: CancellationToken,
) {
    let mut others = state.watch();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = others.changed() => match changed {
                Ok(()) => cred.wake.wake(),
                // The store stopped watching: nothing more will come.
                Err(_) => return,
            },
        }
    }
}

impl Entry {
    fn new(running: Running, built: Built) -> Entry {
        Entry {
            credential: running.refresher.credential().clone(),
            running,
            built,
        }
    }
}

/// What a reload must remember of the config a credential was built from. Not the config
/// itself: with ten thousand credentials, keeping every config would cost more memory than
/// the credentials do.
#[derive(Clone, Copy)]
struct Built {
    /// [`CredentialConfig::fingerprint`]: equal means unchanged.
    fingerprint: u64,
    /// A digest of where the credential starts from (the configured refresh token and
    /// initial tokens): when it changes, the operator handed over new ones and they win.
    start: u64,
}

impl Built {
    fn of(c: &CredentialConfig) -> Built {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.refresh_token().map(|s| s.expose_secret()).hash(&mut h);
        c.initial_tokens().map(|s| s.expose_secret()).hash(&mut h);
        Built {
            fingerprint: c.fingerprint(),
            start: h.finish(),
        }
    }
}
