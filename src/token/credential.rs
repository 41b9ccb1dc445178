//! One credential: its current token, the read path requests use, and the write path
//! (refreshes and installs) that publishes new tokens.
//!
//! Readers never wait on a writer: the current token lives in a `tokio::sync::watch`
//! channel, so the hot path is one borrow and an `Arc` clone. All writes go through one
//! async mutex (`writer`), so a refresh and a `PUT /tokens/{name}` never interleave.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{watch, Notify};

use super::grant::{Grant, GrantError};
use super::response::{parse_handed_over, TokenSet};
use super::state::{FileStateStore, StateStore};
use super::verify::{Verifier, VerifyError};
use crate::config::CredentialConfig;
use crate::metrics::Metrics;

/// A token ready to attach, with what the refresher needs to schedule the next one.
#[derive(Debug)]
pub struct ActiveToken {
    /// Increases with every new token; a 401 invalidates only the generation it saw.
    pub generation: u64,
    /// `header_prefix + access_token`, marked sensitive.
    pub header_value: HeaderValue,
    pub expires_at: Option<SystemTime>,
    /// Never attach after this (a margin before `expires_at` for clock skew and transit).
    usable_until: Option<SystemTime>,
    /// When the background refresh is due.
    pub refresh_at: Option<SystemTime>,
}

impl ActiveToken {
    fn usable(&self, now: SystemTime) -> bool {
        self.usable_until.is_none_or(|u| now < u)
    }
}

/// What the refresher is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Refreshing,
    /// The last attempt failed transiently; the next one is not before `until`.
    Backoff {
        until: SystemTime,
    },
    /// The token endpoint refused (or there is no refresh token): a person must act.
    NeedsReauth,
}

/// Everything readers see, published atomically.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub token: Option<Arc<ActiveToken>>,
    /// The upstream rejected the current token (401): do not attach it again.
    pub invalidated: bool,
    pub phase: Phase,
    pub last_error: Option<String>,
    pub refreshed_at: Option<SystemTime>,
    pub refresh_count: u64,
    /// Completed fetch attempts, successful or not, so waiters can see an outcome.
    pub attempts: u64,
    /// Whether the current tokens are in `state_file` (`None`: no state file). `false`
    /// after a failed write: a restart would present a rotated-away refresh token.
    pub persisted: Option<bool>,
}

impl Snapshot {
    /// The token to attach now, if there is one.
    pub fn usable_token(&self, now: SystemTime) -> Option<&Arc<ActiveToken>> {
        self.token
            .as_ref()
            .filter(|t| !self.invalidated && t.usable(now))
    }

    /// `fresh | refreshing | expired | needs_reauth`, as `/tokens` and metrics show it.
    pub fn state_name(&self, now: SystemTime) -> &'static str {
        match self.phase {
            Phase::NeedsReauth => "needs_reauth",
            Phase::Refreshing => "refreshing",
            _ if self.usable_token(now).is_some() => "fresh",
            _ => "expired",
        }
    }
}

/// Why no token can be had right now (becomes 503 `token_unavailable`).
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
    pub retry_after: Duration,
}

/// Where a credential starts from when it replaces another on reload.
#[derive(Default)]
pub struct Start {
    /// The predecessor's current refresh token: it may have rotated since the config was
    /// written, and the configured one may be dead. Used when there is no state file.
    pub carried_refresh_token: Option<SecretString>,
    /// The configured refresh token (or initial tokens) changed: the operator installed a
    /// new one, so it wins over the state file.
    pub prefer_config: bool,
}

/// State only the writer touches.
struct Writer {
    refresh_token: Option<SecretString>,
    generation: u64,
    consecutive_failures: u32,
    /// A fetched token set whose verification could not finish (JWKS unreachable, or a new
    /// `kid` not yet refetchable): verified again on the next attempt instead of fetching
    /// (and rotating) anew.
    unverified: Option<TokenSet>,
    /// The token set whose write to `state_file` failed; written again until it succeeds.
    unsaved: Option<TokenSet>,
}

pub struct Credential {
    pub name: Arc<str>,
    pub header: HeaderName,
    header_prefix: String,
    refresh_before: Duration,
    /// How long a request waits for a refresh before it gets 503.
    pub(super) wait_timeout: Duration,
    pub(super) grant: Grant,
    state_store: Option<Arc<dyn StateStore>>,
    verifier: Option<Verifier>,
    pub(super) snapshot: watch::Sender<Snapshot>,
    writer: tokio::sync::Mutex<Writer>,
    /// Wakes the refresher: a request needs a token, a 401 arrived, or an admin forced it.
    pub(super) wake: Notify,
    /// Set by `POST /tokens/{name}/refresh`: refresh even in backoff or needs_reauth.
    pub(super) force: AtomicBool,
    /// Bounds 401-triggered refreshes, so an upstream that answers 401 for other reasons
    /// cannot make us hammer the token endpoint at request rate.
    reject_budget: Mutex<RejectBudget>,
    pub(super) metrics: Arc<Metrics>,
}

impl Credential {
    /// Build from config; loads the state file (which wins over the config's initial tokens).
    pub fn new(
        config: &CredentialConfig,
        metrics: Arc<Metrics>,
        start: Start,
    ) -> Result<Arc<Credential>, String> {
        let grant =
            Grant::from_config(config).map_err(|e| format!("credentials.{}: {e}", config.name))?;
        if let Some(path) = &config.state_file {
            super::state::check_state_dir(path, true)
                .map_err(|e| format!("credentials.{}.state_file: {e}", config.name))?;
        }
        let state_store: Option<Arc<dyn StateStore>> = config
            .state_file
            .clone()
            .map(|p| Arc::new(FileStateStore::new(p)) as Arc<dyn StateStore>);
        let verifier = Verifier::for_credential(config)
            .map_err(|e| format!("credentials.{}: {e}", config.name))?;
        let now = SystemTime::now();
        let saved = match &state_store {
            Some(_) if start.prefer_config => None,
            Some(store) => store.load().map_err(|e| e.to_string())?,
            None => None,
        };
        if saved.is_some() {
            tracing::info!(credential = %config.name, "starting from the tokens in state_file");
        }
        let initial = match (saved, &config.initial_tokens) {
            (Some(set), _) => Some(set),
            (None, _) if start.carried_refresh_token.is_some() => None,
            (None, Some(json)) => Some(
                parse_handed_over(json.expose_secret().as_bytes(), now)
                    .map_err(|e| format!("credentials.{}.initial_tokens_file: {e}", config.name))?,
            ),
            (None, None) => None,
        };
        let refresh_token = initial
            .as_ref()
            .and_then(|s| s.refresh_token.clone())
            .or(start.carried_refresh_token)
            .or_else(|| config.refresh_token.clone());
        let mut credential = Credential {
            name: Arc::from(config.name.as_str()),
            header: config.header.clone(),
            header_prefix: config.header_prefix.clone(),
            refresh_before: config.refresh_before,
            wait_timeout: config.timeout + Duration::from_secs(1),
            grant,
            state_store,
            verifier,
            snapshot: watch::Sender::new(Snapshot {
                token: None,
                invalidated: false,
                phase: Phase::Idle,
                last_error: None,
                refreshed_at: None,
                refresh_count: 0,
                attempts: 0,
                persisted: config.state_file.as_ref().map(|_| true),
            }),
            writer: tokio::sync::Mutex::new(Writer {
                refresh_token,
                generation: 0,
                consecutive_failures: 0,
                unverified: None,
                unsaved: None,
            }),
            wake: Notify::new(),
            force: AtomicBool::new(false),
            reject_budget: Mutex::new(RejectBudget::new()),
            metrics,
        };
        // A saved access token still valid is used at once (a restart costs no refresh),
        // unless tokens must be verified: then the refresher fetches and verifies a new one.
        if let Some(set) = initial.filter(|_| credential.verifier.is_none()) {
            if set.expires_at.is_none_or(|at| at > now) {
                if let Ok(active) = credential.activate(1, &set) {
                    credential.writer.get_mut().generation = 1;
                    credential.snapshot.send_modify(|s| {
                        s.token = Some(Arc::new(active));
                        s.refreshed_at = Some(set.received_at);
                    });
                }
            }
        }
        Ok(Arc::new(credential))
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// The refresh token in use now (waits for an in-flight refresh to finish).
    pub async fn refresh_token_now(&self) -> Option<SecretString> {
        self.writer.lock().await.refresh_token.clone()
    }

    /// Follow every change of this credential (the demo prints refreshes as they happen).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// The token to attach right now, if one is usable (no waiting).
    pub fn current(&self) -> Option<Arc<ActiveToken>> {
        self.snapshot
            .borrow()
            .usable_token(SystemTime::now())
            .cloned()
    }

    /// The token to attach. Fast path: one borrow. Otherwise wake the refresher and wait
    /// (bounded) for the one shared refresh, or fail with `Unavailable`.
    pub async fn lease(&self) -> Result<Arc<ActiveToken>, Unavailable> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        let mut rx = self.snapshot.subscribe();
        let deadline = tokio::time::Instant::now() + self.wait_timeout;
        loop {
            {
                let now = SystemTime::now();
                let snap = rx.borrow_and_update();
                if let Some(t) = snap.usable_token(now) {
                    return Ok(t.clone());
                }
                match snap.phase {
                    Phase::NeedsReauth => {
                        return Err(Unavailable {
                            reason: snap
                                .last_error
                                .clone()
                                .unwrap_or_else(|| "needs re-authentication".into()),
                            retry_after: Duration::from_secs(60),
                        })
                    }
                    Phase::Backoff { until } if until > now => {
                        let wait = until.duration_since(now).unwrap_or_default();
                        return Err(Unavailable {
                            reason: snap
                                .last_error
                                .clone()
                                .unwrap_or_else(|| "token refresh failing".into()),
                            retry_after: wait.max(Duration::from_secs(1)),
                        });
                    }
                    _ => {}
                }
            }
            self.wake.notify_one();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(Unavailable {
                        reason: "timed out waiting for a token refresh".into(),
                        retry_after: Duration::from_secs(5),
                    })
                }
            }
        }
    }

    /// The upstream answered 401 to a request that carried token `generation`. Invalidate
    /// it (only if still current: N concurrent 401s cause one refresh) and wake the
    /// refresher. Returns whether a newer token is coming, i.e. whether a replay makes sense.
    pub fn reject(&self, generation: u64) -> bool {
        let mut newer_coming = false;
        self.snapshot.send_if_modified(|s| {
            let Some(current) = &s.token else { return false };
            if current.generation != generation {
                newer_coming = current.generation > generation;
                return false;
            }
            if s.invalidated {
                newer_coming = true;
                return false;
            }
            if !self.reject_budget.lock().unwrap_or_else(|e| e.into_inner()).take() {
                tracing::warn!(credential = %self.name, "upstream keeps answering 401 to fresh tokens; not refreshing again yet");
                return false;
            }
            s.invalidated = true;
            newer_coming = true;
            true
        });
        if newer_coming {
            self.wake.notify_one();
        }
        newer_coming
    }

    /// Install a token response handed over by a person or an SDK (`PUT /tokens/{name}`).
    /// Everything is checked before anything is replaced: a refused install leaves the
    /// working tokens (memory and state file) exactly as they were.
    pub async fn install(&self, body: &[u8]) -> Result<(), String> {
        let now = SystemTime::now();
        let set = parse_handed_over(body, now)?;
        self.header_value(&set)?;
        if let Some(rt) = &set.refresh_token {
            if rt.expose_secret().chars().any(char::is_control) {
                return Err("refresh_token contains control characters".into());
            }
        }
        // An expired access token is accepted for its refresh token (it is never attached;
        // the refresher fetches a new, verified one at once).
        let live = set.expires_at.is_none_or(|at| at > now);
        if let (Some(verifier), true) = (&self.verifier, live) {
            verifier
                .verify(set.access_token.expose_secret())
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut w = self.writer.lock().await;
        w.unverified = None;
        self.publish_checked(&mut w, set).await?;
        // A handed-over token may already be due (or past) its refresh.
        self.wake.notify_one();
        Ok(())
    }

    /// Sign out (`DELETE /tokens/{name}`): forget the tokens here and in the state file, so
    /// nothing is attached until a new token is installed. (Revoking them at the IdP is the
    /// IdP's business.)
    pub async fn sign_out(&self) -> Result<(), String> {
        let mut w = self.writer.lock().await;
        if let Some(store) = &self.state_store {
            store.clear().map_err(|e| e.to_string())?;
        }
        w.refresh_token = None;
        w.unverified = None;
        w.unsaved = None;
        w.generation += 1;
        self.snapshot.send_modify(|s| {
            s.token = None;
            s.invalidated = false;
            s.phase = Phase::NeedsReauth;
            s.last_error = Some("signed out: install a new token with PUT /tokens/<name>".into());
            s.persisted = s.persisted.map(|_| true);
        });
        tracing::warn!(credential = %self.name, "signed out; tokens forgotten");
        Ok(())
    }

    /// Run one fetch and publish its outcome. Called by the refresher only.
    pub(super) async fn attempt(&self, poll_only: bool) {
        let mut w = self.writer.lock().await;
        if !poll_only {
            self.snapshot.send_modify(|s| s.phase = Phase::Refreshing);
        }
        let held = w
            .unverified
            .take()
            .filter(|set| set.expires_at.is_none_or(|at| at > SystemTime::now()));
        let fetched = match held {
            Some(set) => Ok(set),
            None => self.grant.fetch(w.refresh_token.as_ref()).await,
        };
        let outcome = match fetched {
            Ok(set) => {
                let unchanged = poll_only
                    && self.snapshot.borrow().token.as_ref().is_some_and(|t| {
                        self.header_value(&set).is_ok_and(|v| v == t.header_value)
                    });
                if unchanged {
                    return;
                }
                self.publish_new(&mut w, set).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            self.record_failure(&mut w, e);
        }
    }

    /// Publish a failed fetch or install: backoff for transient errors, else needs_reauth.
    fn record_failure(&self, w: &mut Writer, e: GrantError) {
        self.metrics.refresh(&self.name, false);
        let message = e.to_string();
        let phase = match &e {
            GrantError::Transient { retry_after, .. } => {
                w.consecutive_failures += 1;
                let delay = retry_after
                    .unwrap_or_else(|| super::refresher::backoff(w.consecutive_failures));
                Phase::Backoff {
                    until: SystemTime::now() + delay,
                }
            }
            GrantError::Rejected(_) | GrantError::NoRefreshToken => Phase::NeedsReauth,
        };
        match phase {
            Phase::Backoff { until } => tracing::warn!(
                credential = %self.name,
                outcome = "error",
                error = %message,
                retry_in_ms = until.duration_since(SystemTime::now()).unwrap_or_default().as_millis() as u64,
                "token refresh failed; retrying"
            ),
            _ => tracing::error!(
                credential = %self.name,
                outcome = "error",
                error = %message,
                state = "needs_reauth",
                "token refresh refused; a new login is needed (PUT /tokens/<name>, a new secret, or a restart)"
            ),
        }
        self.snapshot.send_modify(|s| {
            s.phase = phase;
            s.last_error = Some(message);
            s.attempts += 1;
        });
    }

    /// Persist a fetched set (before anything uses it, and before anything can fail: its
    /// refresh token may be the only valid one left), then check and publish it.
    async fn publish_new(&self, w: &mut Writer, mut set: TokenSet) -> Result<(), GrantError> {
        // An absent refresh token in a response means "keep the one you have" (RFC 6749 §6).
        if set.refresh_token.is_none() {
            set.refresh_token = w.refresh_token.clone();
        }
        self.persist(w, &set).await;
        w.refresh_token = set.refresh_token.clone();
        let active = self
            .activate(w.generation + 1, &set)
            .map_err(GrantError::Rejected)?;
        if let Some(verifier) = &self.verifier {
            match verifier.verify(set.access_token.expose_secret()).await {
                Ok(()) => {}
                Err(e @ VerifyError::Jwks(_)) => {
                    w.unverified = Some(set);
                    return Err(GrantError::Transient {
                        message: e.to_string(),
                        retry_after: None,
                    });
                }
                // The grant still works (the refresh token was accepted); the provider may
                // be mid key rotation or mid bad deploy. Never attach this token; fetch again
                // with backoff and recover by itself once good tokens come.
                Err(e @ VerifyError::Invalid(_)) => {
                    return Err(GrantError::Transient {
                        message: e.to_string(),
                        retry_after: None,
                    })
                }
            }
        }
        self.publish(w, &set, active);
        Ok(())
    }

    /// Persist and publish a set that has already passed every check (an install).
    async fn publish_checked(&self, w: &mut Writer, mut set: TokenSet) -> Result<(), String> {
        if set.refresh_token.is_none() {
            set.refresh_token = w.refresh_token.clone();
        }
        let active = self.activate(w.generation + 1, &set)?;
        self.persist(w, &set).await;
        w.refresh_token = set.refresh_token.clone();
        self.publish(w, &set, active);
        Ok(())
    }

    /// Make `active` the token requests get.
    fn publish(&self, w: &mut Writer, set: &TokenSet, active: ActiveToken) {
        w.generation += 1;
        w.consecutive_failures = 0;
        let now = SystemTime::now();
        let next = active.refresh_at;
        let persisted = w.unsaved.is_none();
        self.snapshot.send_modify(|s| {
            s.token = Some(Arc::new(active));
            s.invalidated = false;
            s.phase = Phase::Idle;
            if persisted {
                s.last_error = None; // else keep the save failure persist() reported
            }
            s.refreshed_at = Some(now);
            s.refresh_count += 1;
            s.attempts += 1;
        });
        self.metrics.refresh(&self.name, true);
        tracing::info!(
            credential = %self.name,
            outcome = "ok",
            generation = w.generation,
            expires_in_s = set.expires_at.and_then(|e| e.duration_since(now).ok()).map(|d| d.as_secs()),
            next_refresh_in_s = next.and_then(|n| n.duration_since(now).ok()).map(|d| d.as_secs()),
            "token refreshed"
        );
    }

    /// Save `set` to the state store, if any. A failure is reported everywhere (error log,
    /// `/tokens` `persisted: false`, a metric) and the write is retried by the refresher,
    /// but it is not fatal: the server has already rotated, and losing the new token in
    /// memory too would be worse.
    async fn persist(&self, w: &mut Writer, set: &TokenSet) {
        let Some(store) = self.state_store.clone() else {
            return;
        };
        let to_save = set.clone();
        let failure = match tokio::task::spawn_blocking(move || store.save(&to_save)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("state save panicked: {e}")),
        };
        match failure {
            None => {
                if w.unsaved.take().is_some() {
                    tracing::info!(credential = %self.name, "tokens saved to state_file again");
                }
                self.snapshot.send_modify(|s| s.persisted = Some(true));
            }
            Some(failure) => {
                self.metrics.persist_failed(&self.name);
                tracing::error!(credential = %self.name, error = %failure, "could not save tokens to state_file; retrying; a restart now would need a new login");
                w.unsaved = Some(set.clone());
                self.snapshot.send_modify(|s| {
                    s.persisted = Some(false);
                    s.last_error = Some(format!(
                        "could not save tokens to state_file (retrying): {failure}"
                    ));
                });
            }
        }
    }

    /// Write the set whose save failed again (called by the refresher until it succeeds).
    pub(super) async fn retry_persist(&self) {
        let mut w = self.writer.lock().await;
        if let Some(set) = w.unsaved.clone() {
            self.persist(&mut w, &set).await;
            if w.unsaved.is_none() {
                self.snapshot.send_modify(|s| {
                    if s.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("state_file"))
                    {
                        s.last_error = None;
                    }
                });
            }
        }
    }

    fn header_value(&self, set: &TokenSet) -> Result<HeaderValue, String> {
        let mut v = HeaderValue::from_str(&format!(
            "{}{}",
            self.header_prefix,
            set.access_token.expose_secret()
        ))
        .map_err(|_| {
            "access token contains characters not allowed in an HTTP header".to_string()
        })?;
        v.set_sensitive(true);
        Ok(v)
    }

    fn activate(&self, generation: u64, set: &TokenSet) -> Result<ActiveToken, String> {
        let header_value = self.header_value(set)?;
        let (usable_until, refresh_at) = match set.expires_at {
            Some(exp) => {
                let lifetime = exp.duration_since(set.received_at).unwrap_or_default();
                let (margin, lead) = super::refresher::schedule(lifetime, self.refresh_before);
                (Some(exp - margin), Some(exp - lead))
            }
            None => (None, None),
        };
        Ok(ActiveToken {
            generation,
            header_value,
            expires_at: set.expires_at,
            usable_until,
            refresh_at,
        })
    }
}

/// A small token bucket: 10 rejections at once, then one per second.
struct RejectBudget {
    tokens: f64,
    at: Instant,
}

impl RejectBudget {
    const BURST: f64 = 10.0;
    const PER_SECOND: f64 = 1.0;

    fn new() -> Self {
        RejectBudget {
            tokens: Self::BURST,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * Self::PER_SECOND)
            .min(Self::BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
