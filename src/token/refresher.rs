//! One credential, write side: the one writer of its tokens.
//!
//! Only the refresher fetches (that is the single flight), verifies, commits to the state
//! store and publishes; requests and 401s only *wake* it, and admin actions reach it as
//! [`Command`]s, so a refresh and a `PUT /tokens/{name}` never interleave. What to do next
//! is decided by [`schedule::next`], a pure function of its state and the clock. It
//! refreshes ahead of expiry, backs off with jitter on transient failures, and parks in
//! `needs_reauth` on a refusal until a token is installed or an admin forces a refresh.
//!
//! It is not a task of its own: the [`scheduler`](super::scheduler) steps it when it is due
//! or woken. Its state lives behind a mutex in the (shared) `Refresher`, so a step that
//! panics is retried with the refresh token it held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::credential::{ActiveToken, Credential, Phase, RefreshCounts, Snapshot};
use super::grant::{Endpoints, Grant, GrantError};
use super::response::{parse_handed_over_as, TokenSet};
use super::schedule::{self, Action};
use super::scheduler::{Stepper, Wake};
use super::state::{Acquire, BoxFuture, Commit, Loaded, StateStore, Stored};
use super::verify::{Verifier, VerifyError};
use crate::config::CredentialConfig;
use crate::metrics::Metrics;

/// How often a static token file is checked for a new token (Kubernetes swaps it in place).
const FILE_POLL: Duration = Duration::from_secs(2);

/// What the read side asks of the writer.
pub enum Command {
    Install {
        /// Boxed: keeps every command small.
        set: Box<TokenSet>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    SignOut {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Refresh now, even in backoff or needs_reauth.
    Refresh {
        reply: oneshot::Sender<Result<(), String>>,
    },
    RefreshToken {
        reply: oneshot::Sender<Option<SecretString>>,
    },
}

/// Where a credential starts from when it replaces another on reload.
#[derive(Default)]
pub struct Start {
    /// The predecessor's current refresh token: it may have rotated since the config was
    /// written, and the configured one may be dead. Used when the store holds nothing.
    pub carried_refresh_token: Option<SecretString>,
    /// The configured refresh token (or initial tokens) changed: the operator installed a
    /// new one, so it wins over the state store.
    pub prefer_config: bool,
    /// The fetches counted under this name so far (by a predecessor, or before a removal).
    pub counts: RefreshCounts,
}

/// The writer's own state.
struct Writer {
    refresh_token: Option<SecretString>,
    /// The newest generation this writer made or adopted (published or not).
    generation: u64,
    /// The generation the state store holds (the compare-and-set's `expected`).
    committed: u64,
    consecutive_failures: u32,
    /// A fetched token set whose verification could not finish (JWKS unreachable, or a new
    /// `kid` not yet refetchable): verified again on the next attempt instead of fetching
    /// (and rotating) anew.
    unverified: Option<Box<TokenSet>>,
    /// A set whose commit failed; committed again until it lands.
    unsaved: Option<Box<Unsaved>>,
    /// The newest set this writer holds, to write back to a shared store that lost it. Kept
    /// only for a shared store (a local one cannot lose what it committed): boxed, and
    /// `None`, for the others.
    held: Option<Box<TokenSet>>,
    next_file_poll: Instant,
    /// Generations committed by other holders (a shared store).
    others: watch::Receiver<u64>,
}

/// A set whose commit failed, and when to try again (its retry state lives with it: 20
/// bytes less in a writer that has nothing to retry, which is nearly every one).
struct Unsaved {
    stored: Stored,
    /// Commits failed in a row (the backoff grows with them).
    failures: u32,
    retry_at: Instant,
}

/// What the writer keeps of `set` as the newest set it holds ([`Writer::held`]): a copy
/// for a shared store, nothing for a local one.
fn held_copy(store: &dyn StateStore, set: &TokenSet) -> Option<Box<TokenSet>> {
    store.is_shared().then(|| Box::new(set.clone()))
}

pub struct Refresher {
    cred: Arc<Credential>,
    grant: Grant,
    /// Boxed: most credentials verify nothing, and a verifier is large.
    verifier: Option<Box<Verifier>>,
    /// Boxed `str`: 8 bytes less than a `String` in every credential.
    header_prefix: Box<str>,
    /// `refresh_before` in milliseconds (a `u32` holds 49 days; longer saturates): with
    /// the writer's retry state boxed, this keeps `Arc<Refresher>` in mimalloc's 224-byte
    /// size class.
    refresh_before_ms: u32,
    metrics: Arc<Metrics>,
    /// The writer state; held by the step in flight.
    inner: tokio::sync::Mutex<Writer>,
    /// Stopped: steps do nothing (the credential was replaced or removed).
    stopped: AtomicBool,
}

/// Build a credential from its config: the read side and the refresher that owns its
/// writes, starting from what `store` holds (it wins over the config's initial tokens).
pub async fn build(
    config: &CredentialConfig,
    metrics: Arc<Metrics>,
    start: Start,
    store: Arc<dyn StateStore>,
    wake: Wake,
    endpoints: &mut Endpoints,
) -> Result<(Arc<Credential>, Arc<Refresher>), String> {
    let named = |e: String| format!("credentials.{}: {e}", config.name);
    let grant = Grant::from_config(config, endpoints).map_err(named)?;
    let verifier = Verifier::for_credential(config)
        .map_err(named)?
        .map(Box::new);
    let now = SystemTime::now();
    let loaded = match store.load().await {
        Ok(loaded) => loaded,
        // A shared store may be down at start: start without tokens; the refresher takes
        // the lease (and so learns the store's state) once it answers.
        Err(e) if store.is_shared() => {
            tracing::warn!(credential = %config.name, error = %e, "state store unavailable at start");
            Loaded::Empty
        }
        Err(e) if start.prefer_config => {
            tracing::warn!(credential = %config.name, error = %e, "state store unreadable; the new configured token wins");
            Loaded::Empty
        }
        Err(e) => return Err(e.to_string()),
    };
    // The store's generation fences our next commit even when its tokens are not used
    // (a newly configured refresh token wins over the saved one).
    let committed = loaded.generation();
    let loaded = match start.prefer_config {
        true => Loaded::Empty,
        false => loaded,
    };
    let signed_out = matches!(loaded, Loaded::SignedOut { .. });
    let saved = match loaded {
        Loaded::Tokens(stored) => {
            tracing::info!(credential = %config.name, store = store.kind(), "starting from the saved tokens");
            Some(stored)
        }
        _ => None,
    };
    let jkt = config.dpop.as_ref().map(|d| d.jkt.as_str());
    let saved = saved.map(|s| Stored {
        generation: s.generation,
        tokens: fit_to_key(s.tokens, jkt),
    });
    let initial = match (saved.map(|s| s.tokens), config.initial_tokens()) {
        (Some(set), _) => Some(set),
        (None, _) if start.carried_refresh_token.is_some() || signed_out => None,
        (None, Some(json)) => Some(
            parse_handed_over_as(
                json.expose_secret().as_bytes(),
                now,
                config.dpop.as_ref().map(|d| d.jkt.as_str()),
            )
            .map_err(|e| format!("credentials.{}.initial_tokens_file: {e}", config.name))?,
        ),
        (None, None) => None,
    };
    // A sign-out recorded in a shared store holds until a new token is installed.
    let refresh_token = match signed_out {
        true => None,
        false => initial
            .as_ref()
            .and_then(|s| s.refresh_token.clone())
            .or(start.carried_refresh_token)
            .or_else(|| config.refresh_token().cloned()),
    };
    let persisted = (store.kind() != "memory").then_some(true);
    let cred = Arc::new(
        Credential::new(
            &config.name,
            config.header.clone(),
            store.clone(),
            config.timeout + Duration::from_secs(1),
            Snapshot::empty(persisted, start.counts),
            wake,
        )
        .with_dpop(config.dpop.clone()),
    );
    let writer = Writer {
        refresh_token,
        generation: committed,
        committed,
        consecutive_failures: 0,
        unverified: None,
        unsaved: None,
        held: initial.as_ref().and_then(|set| held_copy(&*store, set)),
        next_file_poll: Instant::now() + FILE_POLL,
        others: store.watch(),
    };
    let refresher = Refresher {
        cred: cred.clone(),
        grant,
        verifier,
        header_prefix: config.header_prefix.as_str().into(),
        refresh_before_ms: u32::try_from(config.refresh_before.as_millis()).unwrap_or(u32::MAX),
        metrics,
        inner: tokio::sync::Mutex::new(writer),
        stopped: AtomicBool::new(false),
    };
    // A saved access token still valid is used at once (a restart costs no refresh),
    // unless tokens must be verified: then the refresher fetches and verifies a new one.
    if let Some(set) = initial.filter(|_| refresher.verifier.is_none()) {
        if set.expires_at.is_none_or(|at| at > now) {
            let mut w = refresher.inner.lock().await;
            w.generation = w.generation.max(1);
            if let Ok(active) = refresher.activate(w.generation, &set) {
                cred.snapshot.send_modify(|s| {
                    s.token = Some(Arc::new(active));
                    s.refreshed_at = Some(set.received_at);
                });
            }
        }
    }
    Ok((cred, Arc::new(refresher)))
}

impl Stepper for Refresher {
    fn step(&self) -> BoxFuture<'_, Option<Instant>> {
        Box::pin(self.do_due_work())
    }

    fn wake_handle(&self) -> &Wake {
        &self.cred.wake
    }

    fn name(&self) -> &str {
        &self.cred.name
    }
}

impl Drop for Refresher {
    /// Whoever waits on a command this refresher will never carry out hears so at once.
    fn drop(&mut self) {
        self.cred.close_commands();
    }
}

impl Refresher {
    /// The credential's state store (kept there, not here: one pointer less per refresher).
    fn store(&self) -> &dyn StateStore {
        &*self.cred.store
    }

    pub fn credential(&self) -> &Arc<Credential> {
        &self.cred
    }

    /// The refresh token held now (the task must be stopped, or between actions).
    pub async fn refresh_token(&self) -> Option<SecretString> {
        self.inner.lock().await.refresh_token.clone()
    }

    fn polls_file(&self) -> bool {
        self.grant.polls_file()
    }

    /// Do what is due now, then say when to be stepped again (`None`: only when woken).
    /// The scheduler runs one step at a time per refresher; a stopped refresher does
    /// nothing. A step holds the writer state throughout, so `stop` (which takes it) waits
    /// for the step in flight: a refresh in progress is finished and committed first.
    async fn do_due_work(&self) -> Option<Instant> {
        let mut guard = self.inner.lock().await;
        let w = &mut *guard;
        if self.stopped.load(Ordering::Acquire) {
            return None;
        }
        // Another holder committed (a shared store): follow it. A store that answers again
        // after an outage also says so here, so a backoff that waited for it ends.
        if w.others.has_changed().unwrap_or(false) {
            let seen = *w.others.borrow_and_update();
            if seen != w.committed {
                self.follow_store(w).await;
            }
            self.retry_now_if_waiting_for_the_store(w);
        }
        loop {
            match schedule::next(&self.schedule_state(w), Instant::now()) {
                Action::SaveAgain => self.save_again(w).await,
                Action::Fetch => self.attempt(w, false).await,
                Action::PollFile => {
                    w.next_file_poll = Instant::now() + FILE_POLL;
                    self.attempt(w, true).await;
                }
                Action::Wait(until) => {
                    if self.stopped.load(Ordering::Acquire) {
                        return None;
                    }
                    match self.cred.next_command() {
                        Some(command) => self.handle(w, command).await,
                        None => return until,
                    }
                }
            }
        }
    }

    /// Stop for good (or until `resume`): once this returns, no step is in flight and none
    /// will act.
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        drop(self.inner.lock().await);
    }

    /// Undo `stop` (a replacement could not be built: the old credential carries on).
    pub fn resume(&self) {
        self.stopped.store(false, Ordering::Release);
    }

    /// The decision's inputs, wall-clock times turned into tokio instants.
    fn schedule_state(&self, w: &Writer) -> schedule::State {
        let snap = self.cred.snapshot();
        let (now_wall, now) = (SystemTime::now(), Instant::now());
        let at = |t: SystemTime| now + t.duration_since(now_wall).unwrap_or_default();
        schedule::State {
            has_token: snap.token.is_some(),
            invalidated: snap.invalidated,
            refresh_at: snap.token.as_ref().and_then(|t| t.refresh_at()).map(at),
            backoff_until: match snap.phase {
                Phase::Backoff { until } => Some(at(until)),
                _ => None,
            },
            parked: snap.phase == Phase::NeedsReauth,
            save_retry_at: w.unsaved.as_ref().map(|u| u.retry_at),
            file_poll_at: self.polls_file().then_some(w.next_file_poll),
        }
    }

    async fn handle(&self, w: &mut Writer, command: Command) {
        match command {
            Command::Install { set, reply } => {
                let outcome = self.install(w, *set).await;
                let _ = reply.send(outcome);
            }
            Command::SignOut { reply } => {
                let _ = reply.send(self.sign_out(w).await);
            }
            Command::Refresh { reply } => {
                let before = self.cred.snapshot().refreshes.ok;
                self.attempt(w, false).await;
                let snap = self.cred.snapshot();
                let outcome = if snap.refreshes.ok > before {
                    Ok(())
                } else {
                    Err(snap
                        .last_error
                        .map_or_else(|| "refresh failed".into(), String::from))
                };
                let _ = reply.send(outcome);
            }
            Command::RefreshToken { reply } => {
                let _ = reply.send(w.refresh_token.clone());
            }
        }
    }

    /// Run one fetch (under the store's refresh lease) and publish its outcome.
    async fn attempt(&self, w: &mut Writer, poll_only: bool) {
        if !poll_only {
            self.cred
                .snapshot
                .send_modify(|s| s.phase = Phase::Refreshing);
        }
        let held = w
            .unverified
            .take()
            .filter(|set| set.expires_at.is_none_or(|at| at > SystemTime::now()));
        let held = held.map(|set| *set);
        let outcome = match held {
            // Already committed when it was fetched: only the verification is retried.
            Some(set) => self.verify_and_publish(w, set, w.generation).await,
            None => self.fetch_and_publish(w, poll_only).await,
        };
        match outcome {
            Err(e) => self.record_failure(w, e),
            // Nothing new to publish (another replica's commit was adopted, or a polled
            // file had not changed): the refresh is over all the same.
            Ok(()) => {
                self.cred.snapshot.send_if_modified(|s| {
                    let refreshing = s.phase == Phase::Refreshing;
                    if refreshing {
                        s.phase = Phase::Idle;
                    }
                    refreshing
                });
            }
        }
    }

    /// Take the lease, call the token endpoint (renewing the lease meanwhile), commit and
    /// publish, release the lease. When the store has moved on (another holder refreshed),
    /// follow it instead of fetching.
    async fn fetch_and_publish(&self, w: &mut Writer, poll_only: bool) -> Result<(), GrantError> {
        // A live holder commits within its token call; a dead one's lease expires within
        // `lock_ttl` (counted from its last renewal): two waits of `lock_ttl` cover both.
        let mut waits_for_holder = 0;
        let lease = loop {
            match self.store().try_acquire(w.committed).await {
                Ok(Acquire::Acquired(lease)) => {
                    // A lease counts between replicas; a local store's is a formality (and
                    // a series per credential would be memory for nothing).
                    if self.store().is_shared() {
                        self.metrics.lease_acquired(&self.cred.name);
                    }
                    break Some(lease);
                }
                Ok(Acquire::Stale { .. }) => {
                    self.follow_store(w).await;
                    return Ok(());
                }
                // Another replica presented this very refresh token and was told it is
                // dead: presenting it again would only count as reuse at the provider.
                Ok(Acquire::Refused) => {
                    return Err(GrantError::InvalidGrant(
                        "the provider refused this refresh token (invalid_grant, seen by another replica)".into(),
                    ));
                }
                // Another replica's token call is in flight: wait for its commit (at most
                // one lease lifetime: a dead holder's lease expires by then), then try again.
                Ok(Acquire::Busy) if waits_for_holder < 2 => {
                    waits_for_holder += 1;
                    let before = w.committed;
                    let mut others = self.store().watch();
                    let wait = self.store().lease_ttl().unwrap_or(Duration::from_secs(1));
                    let _ = tokio::time::timeout(wait, others.changed()).await;
                    self.follow_store(w).await;
                    if w.committed != before {
                        return Ok(());
                    }
                }
                Ok(Acquire::Busy) => {
                    return Err(GrantError::Transient {
                        message: "another replica is refreshing this credential".into(),
                        retry_after: Some(Duration::from_millis(500)),
                    });
                }
                // A rotating refresh token is never used without the lease: that would fork
                // the token family. Other grants rotate nothing: fetch locally.
                Err(e) if self.grant.rotates() => {
                    return Err(GrantError::Transient {
                        message: format!("state store unavailable: {e}"),
                        retry_after: None,
                    })
                }
                Err(e) => {
                    tracing::warn!(credential = %self.cred.name, error = %e, "state store unavailable; fetching locally");
                    break None;
                }
            }
        };
        let renew_every = self.store().lease_ttl().map(|ttl| ttl / 3);
        let result = async {
            let fetch = self.grant.fetch(w.refresh_token.as_ref());
            let set = match (&lease, renew_every) {
                (Some(lease), Some(every)) => {
                    let renew = async {
                        loop {
                            tokio::time::sleep(every).await;
                            if !self.store().renew(lease).await.unwrap_or(false) {
                                tracing::warn!(credential = %self.cred.name, "refresh lease lost during the token call");
                            }
                        }
                    };
                    tokio::select! {
                        set = fetch => set?,
                        never = renew => never,
                    }
                }
                _ => fetch.await?,
            };
            let unchanged = poll_only
                && self.cred.snapshot.borrow().token.as_ref().is_some_and(|t| {
                    self.header_value(&set).is_ok_and(|v| v == t.header_value)
                });
            if unchanged {
                return Ok(());
            }
            self.publish_new(w, set).await
        }
        .await;
        if let (Err(GrantError::InvalidGrant(_)), Some(lease)) = (&result, &lease) {
            self.store().refused(lease.generation).await;
        }
        if let Some(lease) = lease {
            if let Err(e) = self.store().release(lease).await {
                tracing::warn!(credential = %self.cred.name, error = %e, "could not release the refresh lease");
            }
        }
        result
    }

    /// The store answers again: a backoff that was only waiting for it ends now.
    fn retry_now_if_waiting_for_the_store(&self, w: &mut Writer) {
        let waiting = self.cred.snapshot.send_if_modified(|s| {
            let store_error = s
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("state store unavailable"));
            if matches!(s.phase, Phase::Backoff { .. }) && store_error {
                s.phase = Phase::Idle;
                return true;
            }
            false
        });
        if waiting {
            w.consecutive_failures = 0;
        }
    }

    /// Catch up with what another holder committed (a shared store): adopt a newer token
    /// set without calling the token endpoint, follow a sign-out, or write our newest set
    /// back to a store that lost its data (never reseed from config).
    async fn follow_store(&self, w: &mut Writer) {
        let loaded = match self.store().load().await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(credential = %self.cred.name, error = %e, "could not read the state store");
                return;
            }
        };
        match loaded {
            Loaded::Tokens(mut stored) if stored.generation > w.committed => {
                let jkt = self.cred.dpop.as_ref().map(|d| d.jkt.as_str());
                stored.tokens = fit_to_key(stored.tokens, jkt);
                self.store().adopted(&stored).await;
                w.committed = stored.generation;
                w.generation = w.generation.max(stored.generation);
                w.refresh_token = stored.tokens.refresh_token.clone();
                w.held = held_copy(self.store(), &stored.tokens);
                w.unverified = None;
                w.unsaved = None;
                let generation = w.generation;
                if let Err(e) = self.verify_and_publish(w, stored.tokens, generation).await {
                    self.record_failure(w, e);
                }
            }
            Loaded::SignedOut { generation } if generation > w.committed => {
                w.committed = generation;
                self.forget(w);
            }
            // Behind us (Redis restarted without persistence, or restored an old snapshot):
            // write back the newest set we hold, never reseed from config. Until it is
            // back, nobody may take the lease at our generation and rotate.
            behind if behind.generation() < w.committed => {
                let Some(held) = w.held.as_deref().cloned() else {
                    return;
                };
                tracing::warn!(credential = %self.cred.name, "the state store lost our tokens; writing back the newest set held");
                let stored = Stored {
                    generation: w.generation,
                    tokens: held,
                };
                w.committed = behind.generation();
                self.commit(w, stored).await;
            }
            _ => {}
        }
    }

    /// Publish a failed fetch or install: backoff for transient errors, else needs_reauth.
    fn record_failure(&self, w: &mut Writer, e: GrantError) {
        let message = e.to_string();
        let phase = match &e {
            GrantError::Transient { retry_after, .. } => {
                w.consecutive_failures += 1;
                let delay =
                    retry_after.unwrap_or_else(|| schedule::backoff(w.consecutive_failures));
                Phase::Backoff {
                    until: SystemTime::now() + delay,
                }
            }
            GrantError::Rejected(_) | GrantError::InvalidGrant(_) | GrantError::NoRefreshToken => {
                Phase::NeedsReauth
            }
        };
        match phase {
            Phase::Backoff { until } => tracing::warn!(
                credential = %self.cred.name,
                outcome = "error",
                error = %message,
                retry_in_ms = until.duration_since(SystemTime::now()).unwrap_or_default().as_millis() as u64,
                "token refresh failed; retrying"
            ),
            _ => tracing::error!(
                credential = %self.cred.name,
                outcome = "error",
                error = %message,
                state = "needs_reauth",
                "token refresh refused; a new login is needed (PUT /tokens/<name>, a new secret, or a restart)"
            ),
        }
        self.cred.snapshot.send_modify(|s| {
            s.phase = phase;
            s.last_error = Some(message.into());
            s.refreshes.error = s.refreshes.error.saturating_add(1);
        });
    }

    /// Commit a fetched set (before anything uses it, and before anything can fail: its
    /// refresh token may be the only valid one left), then verify and publish it.
    async fn publish_new(&self, w: &mut Writer, mut set: TokenSet) -> Result<(), GrantError> {
        // An absent refresh token in a response means "keep the one you have" (RFC 6749 §6).
        if set.refresh_token.is_none() {
            set.refresh_token = w.refresh_token.clone();
        }
        let generation = self.commit_new(w, &set).await;
        self.verify_and_publish(w, set, generation).await
    }

    /// Verify (when configured) and publish a committed set.
    async fn verify_and_publish(
        &self,
        w: &mut Writer,
        set: TokenSet,
        generation: u64,
    ) -> Result<(), GrantError> {
        let active = self
            .activate(generation, &set)
            .map_err(GrantError::Rejected)?;
        if let Some(verifier) = &self.verifier {
            match verifier.verify(set.access_token.expose_secret()).await {
                Ok(()) => {}
                Err(e @ VerifyError::Jwks(_)) => {
                    w.unverified = Some(Box::new(set));
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

    /// An install: checked whole (header-safe, verified when configured) before anything
    /// is replaced, then committed and published.
    async fn install(&self, w: &mut Writer, mut set: TokenSet) -> Result<(), String> {
        let now = SystemTime::now();
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
        if set.refresh_token.is_none() {
            set.refresh_token = w.refresh_token.clone();
        }
        w.unverified = None;
        let active = self.activate(w.generation + 1, &set)?;
        if self.store().is_shared() {
            // Shared: the install lands in the store first, or not at all (no replica
            // may diverge); the others pick it up from there.
            let stored = Stored {
                generation: w.generation + 1,
                tokens: set.clone(),
            };
            match self.store().commit(w.committed, stored).await {
                Ok(Commit::Committed) => {}
                Ok(Commit::Conflict { .. }) => {
                    return Err(
                        "store_unavailable: the shared token state changed meanwhile; try again"
                            .into(),
                    )
                }
                Err(e) => return Err(format!("store_unavailable: {e}")),
            }
            w.generation += 1;
            w.committed = w.generation;
            w.refresh_token = set.refresh_token.clone();
            w.held = held_copy(self.store(), &set);
            w.unsaved = None;
        } else {
            self.commit_new(w, &set).await;
        }
        self.publish(w, &set, active);
        Ok(())
    }

    /// Sign out: forget the tokens here and in the store.
    async fn sign_out(&self, w: &mut Writer) -> Result<(), String> {
        w.committed = self
            .store()
            .clear(w.generation + 1)
            .await
            .map_err(|e| format!("store_unavailable: {e}"))?;
        w.generation += 1;
        self.forget(w);
        tracing::warn!(credential = %self.cred.name, "signed out; tokens forgotten");
        Ok(())
    }

    /// Drop every token held; `needs_reauth` until a new one is installed.
    fn forget(&self, w: &mut Writer) {
        w.refresh_token = None;
        w.unverified = None;
        w.unsaved = None;
        w.held = None;
        self.cred.snapshot.send_modify(|s| {
            s.token = None;
            s.invalidated = false;
            s.phase = Phase::NeedsReauth;
            s.last_error = Some("signed out: install a new token with PUT /tokens/<name>".into());
            s.persisted = s.persisted.map(|_| true);
        });
    }

    /// Give `set` the next generation, take its refresh token as ours, and commit it to
    /// the store. A failed commit is reported everywhere (error log, `/tokens`
    /// `persisted: false`, a metric) and retried until it lands, but it is not fatal: the
    /// server has already rotated, and losing the new token in memory too would be worse.
    async fn commit_new(&self, w: &mut Writer, set: &TokenSet) -> u64 {
        w.generation += 1;
        w.refresh_token = set.refresh_token.clone();
        w.held = held_copy(self.store(), set);
        let stored = Stored {
            generation: w.generation,
            tokens: set.clone(),
        };
        self.commit(w, stored).await;
        w.generation
    }

    async fn commit(&self, w: &mut Writer, stored: Stored) {
        let generation = stored.generation;
        let failure = match self.store().commit(w.committed, stored.clone()).await {
            Ok(Commit::Committed) => None,
            Ok(Commit::Conflict { current }) => Some(format!(
                "the store moved to generation {current} (expected {})",
                w.committed
            )),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                w.committed = generation;
                if w.unsaved.take().is_some() {
                    tracing::info!(credential = %self.cred.name, "tokens saved again");
                }
                self.cred.snapshot.send_modify(|s| {
                    s.persisted = s.persisted.map(|_| true);
                    if s.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("could not save"))
                    {
                        s.last_error = None;
                    }
                });
            }
            Some(failure) => {
                self.metrics.persist_failed(&self.cred.name);
                tracing::error!(credential = %self.cred.name, error = %failure, "could not save tokens to the state store; retrying; a restart now would need a new login");
                let failures = w.unsaved.as_ref().map_or(0, |u| u.failures) + 1;
                w.unsaved = Some(Box::new(Unsaved {
                    stored,
                    failures,
                    retry_at: Instant::now() + schedule::backoff(failures),
                }));
                self.cred.snapshot.send_modify(|s| {
                    s.persisted = Some(false);
                    s.last_error = Some(
                        format!("could not save tokens to state_file (retrying): {failure}").into(),
                    );
                });
            }
        }
    }

    /// Commit the set whose commit failed, again.
    async fn save_again(&self, w: &mut Writer) {
        if let Some(stored) = w.unsaved.as_ref().map(|u| u.stored.clone()) {
            self.commit(w, stored).await;
        }
    }

    /// Make `active` the token requests get.
    fn publish(&self, w: &mut Writer, set: &TokenSet, active: ActiveToken) {
        w.consecutive_failures = 0;
        let now = SystemTime::now();
        let next = active.refresh_at();
        let persisted = w.unsaved.is_none();
        self.cred.snapshot.send_modify(|s| {
            s.token = Some(Arc::new(active));
            s.invalidated = false;
            s.phase = Phase::Idle;
            if persisted {
                s.last_error = None; // else keep the save failure commit() reported
            }
            s.refreshed_at = Some(now);
            s.refreshes.ok = s.refreshes.ok.saturating_add(1);
        });
        tracing::info!(
            credential = %self.cred.name,
            outcome = "ok",
            generation = w.generation,
            expires_in_s = set.expires_at.and_then(|e| e.duration_since(now).ok()).map(|d| d.as_secs()),
            next_refresh_in_s = next.and_then(|n| n.duration_since(now).ok()).map(|d| d.as_secs()),
            "token refreshed"
        );
    }

    fn header_value(&self, set: &TokenSet) -> Result<HeaderValue, String> {
        let mut v =
            HeaderValue::from_maybe_shared(set.access_token.with_prefix(&self.header_prefix))
                .map_err(|_| {
                    "access token contains characters not allowed in an HTTP header".to_string()
                })?;
        v.set_sensitive(true);
        Ok(v)
    }

    fn activate(&self, generation: u64, set: &TokenSet) -> Result<ActiveToken, String> {
        let header_value = self.header_value(set)?;
        let (margin_ms, lead_ms) = match set.expires_at {
            Some(exp) => {
                let lifetime = exp.duration_since(set.received_at).unwrap_or_default();
                let (margin, lead) = schedule::schedule(
                    lifetime,
                    Duration::from_millis(self.refresh_before_ms.into()),
                );
                // Rounded up: never attached inside the margin, never refreshed late.
                let ms = |d: Duration| {
                    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
                };
                (u32::try_from(ms(margin)).unwrap_or(u32::MAX), ms(lead))
            }
            None => (0, 0),
        };
        let ath = self
            .cred
            .dpop
            .as_ref()
            .map(|_| crate::dpop::ath(set.access_token.expose_secret()).into_boxed_str());
        Ok(ActiveToken {
            generation,
            header_value,
            ath,
            expires_at: set.expires_at,
            margin_ms,
            lead_ms,
        })
    }
}

/// A saved access token bound to another DPoP key than ours (`jkt`; `None`: we send
/// bearer tokens) cannot be attached: it is kept only for its refresh token, as expired,
/// so a new one is fetched. (The key was replaced, or a replica has another key.)
fn fit_to_key(mut set: TokenSet, jkt: Option<&str>) -> TokenSet {
    match (set.dpop_jkt.as_deref(), jkt) {
        (saved, ours) if saved == ours => return set,
        (Some(_), Some(_)) => tracing::warn!(
            "the saved access token is bound to another DPoP key (a replaced dpop_key_file, or a replica with its own key: replicas sharing a credential must share dpop_key_file); fetching a new one"
        ),
        _ => tracing::info!(
            "the saved access token was issued for another token type (bearer vs DPoP); fetching a new one"
        ),
    }
    set.expires_at = Some(set.received_at);
    set
}

/// Ten thousand credentials cost ten thousand of each: the `Arc` of a credential, of its
/// refresher and of its published token each fit an allocator size class (mimalloc's 256,
/// 224 and 112 bytes; they were 320, 256 and 128 before session 14), README
/// "Performance", Scale.
#[cfg(all(test, target_pointer_width = "64"))]
mod footprint {
    /// An `Arc`'s two counts.
    const ARC_COUNTS: usize = 16;

    #[test]
    fn a_credential_its_refresher_and_its_token_fit_their_size_classes() {
        let credential = std::mem::size_of::<super::Credential>() + ARC_COUNTS;
        let refresher = std::mem::size_of::<super::Refresher>() + ARC_COUNTS;
        let token = std::mem::size_of::<super::ActiveToken>() + ARC_COUNTS;
        assert!(credential <= 256, "Arc<Credential> is {credential} bytes");
        assert!(refresher <= 224, "Arc<Refresher> is {refresher} bytes");
        assert!(token <= 112, "Arc<ActiveToken> is {token} bytes");
    }
}
