//! One credential, read side: the current token for requests, its status for admin, and
//! the requests a person or a 401 can make of the writer.
//!
//! Readers never wait on a writer: the current token is [`Published`], so the hot path is
//! one read lock and an `Arc` clone. Every token *write* (fetch,
//! verify, persist, publish; installs and sign-outs) belongs to the credential's
//! [`Refresher`](super::refresher::Refresher); this side only sends it commands. The one
//! mark a reader makes is `reject`: "the upstream refused generation N", which the
//! refresher then acts on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderName, HeaderValue};
use secrecy::SecretString;
use tokio::sync::oneshot;

use super::published::Published;
use super::refresher::Command;
use super::response::parse_handed_over_as;
use super::scheduler::Wake;
use super::state::StateStore;

/// A token ready to attach, with what the refresher needs to schedule the next one.
#[derive(Debug)]
pub struct ActiveToken {
    /// Increases with every new token; a 401 invalidates only the generation it saw.
    pub generation: u64,
    /// `header_prefix + access_token`, marked sensitive.
    pub header_value: HeaderValue,
    /// DPoP: the token's hash for the proofs' `ath` claim, computed once per token.
    pub ath: Option<Box<str>>,
    pub expires_at: Option<SystemTime>,
    /// Not attached within this many milliseconds of `expires_at` (clock skew and transit;
    /// at most 2 s). Offsets, not two more `SystemTime`s: 24 bytes less, which keeps the
    /// `Arc` in mimalloc's 112-byte size class (one per credential).
    pub(super) margin_ms: u32,
    /// The background refresh is due this many milliseconds before `expires_at`.
    pub(super) lead_ms: u64,
}

impl ActiveToken {
    /// Never attach after this (`None`: no expiry known).
    pub(super) fn usable_until(&self) -> Option<SystemTime> {
        self.before_expiry(self.margin_ms.into())
    }

    /// When the background refresh is due (`None`: only when a 401 says so).
    pub fn refresh_at(&self) -> Option<SystemTime> {
        self.before_expiry(self.lead_ms)
    }

    fn before_expiry(&self, ms: u64) -> Option<SystemTime> {
        let exp = self.expires_at?;
        Some(exp.checked_sub(Duration::from_millis(ms)).unwrap_or(exp))
    }

    fn usable(&self, now: SystemTime) -> bool {
        self.usable_until().is_none_or(|u| now < u)
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

/// A credential's token fetches so far by outcome. They outlive the credential's rebuilds
/// and removal (see `TokenStore::apply`): `token_proxy_token_refresh_total` is a counter for
/// the life of the process, as Prometheus expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshCounts {
    pub ok: u32,
    pub error: u32,
}

impl RefreshCounts {
    pub fn plus(self, other: RefreshCounts) -> RefreshCounts {
        RefreshCounts {
            ok: self.ok.saturating_add(other.ok),
            error: self.error.saturating_add(other.error),
        }
    }
}

/// Everything readers see, published atomically by the refresher.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub token: Option<Arc<ActiveToken>>,
    /// The upstream rejected the current token (401): do not attach it again.
    pub invalidated: bool,
    pub phase: Phase,
    /// Boxed `str`, not `String`: 8 bytes less in every credential.
    pub last_error: Option<Box<str>>,
    pub refreshed_at: Option<SystemTime>,
    /// Fetches and installs so far, for `/tokens` and the refresh counter in `/metrics`
    /// (kept here rather than in a metric series of its own: ~100 bytes a credential less).
    pub refreshes: RefreshCounts,
    /// Whether the current tokens are committed to the state store (`None`: a memory
    /// store). `false` after a failed write: a restart would present a rotated-away token.
    pub persisted: Option<bool>,
}

impl Snapshot {
    pub(super) fn empty(persisted: Option<bool>, counts: RefreshCounts) -> Snapshot {
        Snapshot {
            token: None,
            invalidated: false,
            phase: Phase::Idle,
            last_error: None,
            refreshed_at: None,
            refreshes: counts,
            persisted,
        }
    }

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

/// The header nearly every credential's tokens go in.
static AUTHORIZATION: HeaderName = http::header::AUTHORIZATION;

/// Ten thousand credentials cost ten thousand of these: `Arc<Credential>` is kept in
/// mimalloc's 256-byte size class (a unit test in `refresher` checks it).
pub struct Credential {
    pub name: Arc<str>,
    /// The header tokens go in; `None`: `Authorization` (24 bytes less than a `HeaderName`
    /// in nearly every credential). Read it with [`Credential::header`].
    header: Option<Box<HeaderName>>,
    /// `dpop = true`: the key every request's proof is signed with (and its nonces).
    pub dpop: Option<Arc<crate::dpop::Dpop>>,
    /// Where this credential's tokens are committed (`/tokens` shows its kind and whether
    /// this replica holds its refresh lease).
    pub(super) store: Arc<dyn StateStore>,
    /// How long a request waits for a refresh before it gets 503, in milliseconds (a `u32`
    /// holds 49 days; 8 bytes less than a `Duration` in every credential).
    wait_timeout_ms: u32,
    /// Written by the refresher only (and `reject`'s mark).
    pub(super) snapshot: Published<Snapshot>,
    /// Wakes the refresher: a request needs a token, a 401 arrived, or a command waits.
    pub(super) wake: Wake,
    /// Installs, sign-outs and forced refreshes, for the refresher to carry out.
    commands: Mutex<Commands>,
    /// Bounds 401-triggered refreshes, so an upstream that answers 401 for other reasons
    /// cannot make us hammer the token endpoint at request rate.
    reject_budget: RejectBudget,
}

impl Credential {
    pub(super) fn new(
        name: &str,
        header: HeaderName,
        store: Arc<dyn StateStore>,
        wait_timeout: Duration,
        snapshot: Snapshot,
        wake: Wake,
    ) -> Credential {
        Credential {
            name: Arc::from(name),
            header: (header != AUTHORIZATION).then(|| Box::new(header)),
            dpop: None,
            store,
            wait_timeout_ms: u32::try_from(wait_timeout.as_millis()).unwrap_or(u32::MAX),
            snapshot: Published::new(snapshot),
            wake,
            commands: Mutex::default(),
            reject_budget: RejectBudget::new(),
        }
    }

    /// DPoP-bound tokens, proved with `dpop`'s key on every request.
    pub(super) fn with_dpop(mut self, dpop: Option<Arc<crate::dpop::Dpop>>) -> Credential {
        self.dpop = dpop;
        self
    }

    /// The header this credential's tokens go in.
    pub fn header(&self) -> &HeaderName {
        self.header.as_deref().unwrap_or(&AUTHORIZATION)
    }

    fn wait_timeout(&self) -> Duration {
        Duration::from_millis(self.wait_timeout_ms.into())
    }

    /// Whether this replica holds the shared refresh lease right now (during a token call).
    pub fn holds_lease(&self) -> bool {
        self.store.holds_lease()
    }

    /// `memory`, `file` or `redis`: where this credential's tokens are committed.
    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// Changes so far; with `changed_since`, follow every change of this credential (the
    /// demo prints refreshes as they happen).
    pub fn version(&self) -> u64 {
        self.snapshot.version()
    }

    /// Wait for a change after `version`; returns the version now.
    pub async fn changed_since(&self, version: u64) -> u64 {
        self.snapshot.changed_since(version).await
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
        let deadline = tokio::time::Instant::now() + self.wait_timeout();
        loop {
            // Read before the snapshot: a change in between only means one more look.
            let seen = self.snapshot.version();
            {
                let now = SystemTime::now();
                let snap = self.snapshot.borrow();
                if let Some(t) = snap.usable_token(now) {
                    return Ok(t.clone());
                }
                match snap.phase {
                    Phase::NeedsReauth => {
                        return Err(Unavailable {
                            reason: snap
                                .last_error
                                .as_deref()
                                .unwrap_or("needs re-authentication")
                                .to_string(),
                            retry_after: Duration::from_secs(60),
                        })
                    }
                    Phase::Backoff { until } if until > now => {
                        let wait = until.duration_since(now).unwrap_or_default();
                        return Err(Unavailable {
                            reason: snap
                                .last_error
                                .as_deref()
                                .unwrap_or("token refresh failing")
                                .to_string(),
                            retry_after: wait.max(Duration::from_secs(1)),
                        });
                    }
                    _ => {}
                }
            }
            self.wake.wake();
            match tokio::time::timeout_at(deadline, self.snapshot.changed_since(seen)).await {
                Ok(_) => continue,
                Err(_) => {
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
            if !self.reject_budget.take() {
                tracing::warn!(credential = %self.name, "upstream keeps answering 401 to fresh tokens; not refreshing again yet");
                return false;
            }
            s.invalidated = true;
            newer_coming = true;
            true
        });
        if newer_coming {
            self.wake.wake();
        }
        newer_coming
    }

    /// Install a token response handed over by a person or an SDK (`PUT /tokens/{name}`).
    /// The refresher checks everything before anything is replaced: a refused install
    /// leaves the working tokens (memory and state store) exactly as they were.
    pub async fn install(&self, body: &[u8]) -> Result<(), String> {
        let jkt = self.dpop.as_ref().map(|d| d.jkt.as_str());
        let set = parse_handed_over_as(body, SystemTime::now(), jkt)?;
        self.ask(|reply| Command::Install {
            set: Box::new(set),
            reply,
        })
        .await?
    }

    /// Sign out (`DELETE /tokens/{name}`): forget the tokens here and in the state store,
    /// so nothing is attached until a new token is installed. (Revoking them at the IdP is
    /// the IdP's business.)
    pub async fn sign_out(&self) -> Result<(), String> {
        self.ask(|reply| Command::SignOut { reply }).await?
    }

    /// `POST /tokens/{name}/refresh`: refresh now, even in backoff or needs_reauth, and wait
    /// for the outcome. `Err` carries the token endpoint's error (no secrets).
    pub async fn force_refresh(&self) -> Result<(), String> {
        self.ask(|reply| Command::Refresh { reply }).await?
    }

    /// The refresh token in use now (after any refresh in flight).
    pub async fn refresh_token_now(&self) -> Option<SecretString> {
        self.ask(|reply| Command::RefreshToken { reply })
            .await
            .ok()
            .flatten()
    }

    /// Send a command to the refresher and wait for its answer (bounded: a token call
    /// in flight finishes first).
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        let gone = || "the credential is being replaced or stopped; try again".to_string();
        {
            let mut commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
            if commands.closed {
                return Err(gone());
            }
            let queue = commands.queue.get_or_insert_with(Box::default);
            if queue.len() >= Commands::MAX_QUEUED {
                return Err("too many requests for this credential in progress; try again".into());
            }
            queue.push(command(reply));
        }
        self.wake.wake();
        match tokio::time::timeout(self.wait_timeout() * 2, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err("timed out waiting for the token endpoint".into()),
        }
    }
}

/// Commands waiting for the refresher, which takes them when it wakes. A plain queue, not
/// a channel: a channel allocates a block of slots for every credential, and commands are
/// rare (admin actions), while credentials may number ten thousand.
#[derive(Default)]
struct Commands {
    /// At most `MAX_QUEUED` commands, so taking the first moves at most 15. Boxed, made by
    /// the first command and dropped when emptied: most credentials never get one, and
    /// `None` is 16 bytes less than an empty `Vec` in every credential.
    #[allow(clippy::box_collection)] // the point: a pointer, not a `Vec`'s three words
    queue: Option<Box<Vec<Command>>>,
    /// The refresher is gone: queued commands were dropped (their askers hear so).
    closed: bool,
}

impl Commands {
    const MAX_QUEUED: usize = 16;
}

impl Credential {
    /// The next command for the refresher, if any.
    pub(super) fn next_command(&self) -> Option<Command> {
        let mut commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        let queue = commands.queue.as_mut().filter(|q| !q.is_empty())?;
        let next = queue.remove(0);
        if queue.is_empty() {
            commands.queue = None;
        }
        Some(next)
    }

    /// The refresher is gone for good: fail what is queued and whatever is asked later.
    pub(super) fn close_commands(&self) {
        let mut commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        commands.closed = true;
        commands.queue = None;
    }
}

/// A small token bucket: 10 rejections at once, then one per second. One atomic word
/// (the second of the last refill since the process started, and the tokens left), not a
/// mutex around a float and an `Instant`: 24 bytes less in every credential. Refilled by
/// whole seconds, one token each second boundary crossed: one a second, as before.
struct RejectBudget(AtomicU64);

impl RejectBudget {
    const BURST: u32 = 10;

    fn new() -> Self {
        RejectBudget(AtomicU64::new(Self::pack(Self::second_now(), Self::BURST)))
    }

    fn pack(second: u32, tokens: u32) -> u64 {
        (u64::from(second) << 32) | u64::from(tokens)
    }

    /// Whole seconds since the first budget was made (136 years fit a `u32`).
    fn second_now() -> u32 {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let since = EPOCH.get_or_init(Instant::now).elapsed().as_secs();
        u32::try_from(since).unwrap_or(u32::MAX)
    }

    fn take(&self) -> bool {
        let now = Self::second_now();
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |packed| {
                Self::taken(packed, now)
            })
            .is_ok()
    }

    /// The budget after taking one at second `now`, or `None` when none is left.
    fn taken(packed: u64, now: u32) -> Option<u64> {
        let (at, tokens) = ((packed >> 32) as u32, packed as u32);
        let tokens = tokens
            .saturating_add(now.saturating_sub(at))
            .min(Self::BURST);
        (tokens >= 1).then(|| Self::pack(now.max(at), tokens - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::RejectBudget;

    #[test]
    fn the_reject_budget_allows_a_burst_of_ten_then_one_a_second() {
        let mut budget = RejectBudget::pack(100, RejectBudget::BURST);
        for _ in 0..10 {
            budget = RejectBudget::taken(budget, 100).expect("within the burst");
        }
        assert_eq!(RejectBudget::taken(budget, 100), None, "burst spent");
        budget = RejectBudget::taken(budget, 101).expect("a second later, one more");
        assert_eq!(RejectBudget::taken(budget, 101), None);
        // Three seconds: three; an hour refills only the burst.
        for _ in 0..3 {
            budget = RejectBudget::taken(budget, 104).expect("refilled by three");
        }
        assert_eq!(RejectBudget::taken(budget, 104), None);
        for _ in 0..10 {
            budget = RejectBudget::taken(budget, 3704).expect("full again");
        }
        assert_eq!(
            RejectBudget::taken(budget, 3704),
            None,
            "never more than the burst"
        );
        // The real one starts full (one more only if a second boundary passes meanwhile).
        let real = RejectBudget::new();
        let took = (0..12).filter(|_| real.take()).count();
        assert!((10..=11).contains(&took), "took {took}");
    }
}
