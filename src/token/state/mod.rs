//! Where a credential's token state lives: the seam between the refresher (the one writer)
//! and storage. It carries what a *shared* store needs, so that replicas sharing a
//! credential (Redis) plug in beside the single-holder stores:
//!
//! - `load`: the newest committed token set and its generation;
//! - a refresh lease (`try_acquire` / `renew` / `release`), fenced by generation: only its
//!   holder calls the token endpoint;
//! - `commit(expected, set)`: compare-and-set on the generation, so a rotation is recorded
//!   durably *before* anyone uses it, and a holder whose lease was lost cannot overwrite a
//!   newer set;
//! - `watch`: generations committed by another holder (the refresher then loads them).
//!
//! `MemoryStateStore` (no `state_file`) and `FileStateStore` are single-holder: the lease is
//! always granted, nobody else commits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use tokio::sync::watch;

use super::response::TokenSet;

mod file;
mod memory;
mod redis;
mod write_ahead;

pub use file::{check_state_dir, FileStateStore};
pub use memory::MemoryStateStore;
pub use redis::{RedisSettings, RedisShared, RedisStateStore};
pub use write_ahead::WriteAheadStore;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A token set with the generation that committed it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub generation: u64,
    pub tokens: TokenSet,
}

/// What `load` found.
#[derive(Clone, Debug)]
pub enum Loaded {
    /// Nothing was ever committed (or a shared store lost its data).
    Empty,
    /// Signed out (`DELETE /tokens/{name}`) at this generation.
    SignedOut {
        generation: u64,
    },
    Tokens(Stored),
}

impl Loaded {
    pub fn generation(&self) -> u64 {
        match self {
            Loaded::Empty => 0,
            Loaded::SignedOut { generation } => *generation,
            Loaded::Tokens(s) => s.generation,
        }
    }
}

/// The outcome of `try_acquire`.
#[derive(Debug, Clone)]
pub enum Acquire {
    Acquired(Lease),
    /// Another holder has the lease (its token call is in flight).
    Busy,
    /// The store is not at the generation asked for: it moved on (load it instead of
    /// fetching), or it fell behind (lost data: write ours back first).
    Stale {
        current: u64,
    },
    /// The provider refused this generation's refresh token (`invalid_grant`) when another
    /// holder presented it: it is dead, do not present it again.
    Refused,
}

/// The outcome of a compare-and-set commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    Committed,
    /// Another holder committed first: the store is at generation `current`.
    Conflict {
        current: u64,
    },
}

/// The right to call the token endpoint, for the set at `generation`.
#[derive(Debug, Clone)]
pub struct Lease {
    pub generation: u64,
}

/// A storage failure; the message names the store and never holds token material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

pub trait StateStore: Send + Sync + 'static {
    /// `memory`, `file` or `redis` (shown in `/tokens`).
    fn kind(&self) -> &'static str;
    /// The newest committed state.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StateError>>;
    /// Take the refresh lease, if the store is still at `generation`.
    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Acquire, StateError>>;
    /// Extend a held lease while its token call runs; `false` when it was lost.
    fn renew(&self, lease: &Lease) -> BoxFuture<'_, Result<bool, StateError>>;
    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<(), StateError>>;
    /// Record `set` durably if the store is still at generation `expected`.
    fn commit(&self, expected: u64, set: Stored) -> BoxFuture<'_, Result<Commit, StateError>>;
    /// Forget the tokens (sign-out), recording it as generation `generation` where the
    /// store is shared (so other holders sign out too, rather than write theirs back).
    /// Returns the store's generation afterwards.
    fn clear(&self, generation: u64) -> BoxFuture<'_, Result<u64, StateError>>;
    /// Generations committed by other holders.
    fn watch(&self) -> watch::Receiver<u64>;
    /// Shared with other replicas: a change must land here first or not at all (an install
    /// that cannot be committed is refused rather than kept locally), and it may be
    /// unreachable at start without that being fatal.
    fn is_shared(&self) -> bool {
        false
    }
    /// Whether this replica holds the refresh lease right now (`/tokens` `lease_holder`).
    fn holds_lease(&self) -> bool {
        false
    }
    /// A set committed by another holder and adopted here (a write-ahead copy keeps it).
    fn adopted<'a>(&'a self, _set: &'a Stored) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// How long a lease lives unless renewed (`None`: it cannot expire).
    fn lease_ttl(&self) -> Option<std::time::Duration> {
        None
    }
    /// The provider refused `generation`'s refresh token (`invalid_grant`): tell the other
    /// holders, so `try_acquire` at that generation answers `Refused` until a new commit.
    /// Best effort (a failure here costs one more refused call elsewhere).
    fn refused(&self, _generation: u64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The bookkeeping of a single-holder store: its committed generation (for the
/// compare-and-set). Nobody else writes to it, so its watch never fires.
#[derive(Default)]
pub(crate) struct LocalHolder {
    generation: Mutex<u64>,
}

/// The one watch every single-holder store hands out: nothing is ever sent on it. Shared,
/// so that ten thousand credentials do not each keep a channel that never speaks.
static NOBODY_ELSE: std::sync::LazyLock<watch::Sender<u64>> =
    std::sync::LazyLock::new(|| watch::Sender::new(0));

impl LocalHolder {
    fn current(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn loaded(&self, generation: u64) {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner()) = generation;
    }

    pub(crate) fn committed(&self, generation: u64) {
        self.loaded(generation);
    }

    pub(crate) fn acquire(&self, generation: u64) -> Acquire {
        match self.current() {
            current if current != generation => Acquire::Stale { current },
            _ => Acquire::Acquired(Lease { generation }),
        }
    }

    /// `Some(Conflict)` when the store is not at `expected`.
    pub(crate) fn conflict(&self, expected: u64) -> Option<Commit> {
        let current = self.current();
        (current != expected).then_some(Commit::Conflict { current })
    }

    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        nobody_else()
    }
}

/// A watch on which nothing is ever sent (a single-holder store's).
pub(crate) fn nobody_else() -> watch::Receiver<u64> {
    NOBODY_ELSE.subscribe()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::sync::Arc;
    use std::time::SystemTime;

    fn set(rt: &str) -> TokenSet {
        TokenSet {
            access_token: SecretString::from("at".to_string()).into(),
            refresh_token: Some(SecretString::from(rt.to_string())),
            expires_at: None,
            received_at: SystemTime::now(),
            dpop_jkt: None,
        }
    }

    /// The contract every single-holder store keeps.
    async fn single_holder_contract(store: &dyn StateStore) {
        assert!(matches!(store.load().await.unwrap(), Loaded::Empty));
        let Acquire::Acquired(lease) = store.try_acquire(0).await.unwrap() else {
            panic!("a single holder always gets the lease")
        };
        assert!(store.renew(&lease).await.unwrap());
        let first = Stored {
            generation: 1,
            tokens: set("rt1"),
        };
        assert_eq!(store.commit(0, first).await.unwrap(), Commit::Committed);
        store.release(lease).await.unwrap();
        // A commit fenced on a stale generation is refused.
        let stale = Stored {
            generation: 2,
            tokens: set("rt-stale"),
        };
        assert_eq!(
            store.commit(0, stale).await.unwrap(),
            Commit::Conflict { current: 1 }
        );
        let second = Stored {
            generation: 2,
            tokens: set("rt2"),
        };
        assert_eq!(store.commit(1, second).await.unwrap(), Commit::Committed);
        let Loaded::Tokens(back) = store.load().await.unwrap() else {
            panic!("tokens were committed")
        };
        assert_eq!(back.generation, 2);
        use secrecy::ExposeSecret;
        assert_eq!(back.tokens.refresh_token.unwrap().expose_secret(), "rt2");
        store.clear(3).await.unwrap();
        assert!(matches!(store.load().await.unwrap(), Loaded::Empty));
        assert!(!store.watch().has_changed().unwrap());
    }

    /// The memory store keeps nothing (the refresher holds the tokens): it loads empty
    /// even after a commit, grants every lease, lands every commit, and never signals.
    #[tokio::test]
    async fn memory_store_keeps_nothing_and_refuses_nothing() {
        let store = MemoryStateStore::shared();
        assert_eq!(store.kind(), "memory");
        let Acquire::Acquired(lease) = store.try_acquire(7).await.unwrap() else {
            panic!("a single holder always gets the lease")
        };
        assert_eq!(lease.generation, 7);
        let stored = Stored {
            generation: 8,
            tokens: set("rt8"),
        };
        assert_eq!(store.commit(7, stored).await.unwrap(), Commit::Committed);
        store.release(lease).await.unwrap();
        assert!(matches!(store.load().await.unwrap(), Loaded::Empty));
        assert_eq!(store.clear(9).await.unwrap(), 0);
        assert!(!store.watch().has_changed().unwrap());
        // One instance for every credential: no allocation per credential.
        assert!(Arc::ptr_eq(&store, &MemoryStateStore::shared()));
    }

    #[tokio::test]
    async fn file_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        single_holder_contract(&FileStateStore::new(dir.path().join("s.json"))).await;
    }
}
