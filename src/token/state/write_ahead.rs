//! A shared store with a local `state_file` in front of it, as a write-ahead log: every set
//! is written to the file *before* it is committed to Redis. A replica that rotated a
//! refresh token and then could not commit it (Redis gone) and then died still has it on
//! disk; on start, a file newer than Redis is written back to Redis (healing it) instead of
//! being lost.
//!
//! Why no sequence of kills loses a rotation, except a kill inside the token call itself:
//! a rotation exists only after the token endpoint answered, and the first thing done with
//! the answer is this file write (fsync, rename, fsync). Killed before the write: the
//! process was still inside the call. Killed after it: the file has the set, and whichever
//! of Redis and the file is newer (by generation) wins on the next start. Redis and the
//! file never disagree about a generation's contents, because only the lease holder makes
//! new generations and it writes both. Sets adopted from other replicas are written to the
//! file too, so a stale file can never look newer than what Redis lost.

use std::sync::Arc;

use super::{Acquire, BoxFuture, Commit, FileStateStore, Lease, Loaded, RedisStateStore};
use super::{StateError, StateStore, Stored};

pub struct WriteAheadStore {
    local: FileStateStore,
    shared: Arc<RedisStateStore>,
}

impl WriteAheadStore {
    pub fn new(local: FileStateStore, shared: Arc<RedisStateStore>) -> Self {
        WriteAheadStore { local, shared }
    }
}

impl StateStore for WriteAheadStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StateError>> {
        Box::pin(async move {
            let shared = self.shared.load().await?;
            let local = self.local.load().await?;
            match local {
                Loaded::Tokens(ours) if ours.generation > shared.generation() => {
                    tracing::warn!("state_file holds tokens newer than Redis; writing them back");
                    match self
                        .shared
                        .commit(shared.generation(), ours.clone())
                        .await?
                    {
                        Commit::Committed => Ok(Loaded::Tokens(ours)),
                        Commit::Conflict { .. } => self.shared.load().await,
                    }
                }
                _ => Ok(shared),
            }
        })
    }

    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Acquire, StateError>> {
        self.shared.try_acquire(generation)
    }

    fn renew(&self, lease: &Lease) -> BoxFuture<'_, Result<bool, StateError>> {
        self.shared.renew(lease)
    }

    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<(), StateError>> {
        self.shared.release(lease)
    }

    fn commit(&self, expected: u64, set: Stored) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async move {
            if let Err(e) = self.local.save(set.clone()).await {
                tracing::error!(error = %e, "could not write the state_file write-ahead copy");
            }
            self.shared.commit(expected, set).await
        })
    }

    fn clear(&self, generation: u64) -> BoxFuture<'_, Result<u64, StateError>> {
        Box::pin(async move {
            let generation = self.shared.clear(generation).await?;
            self.local.clear(generation).await?;
            Ok(generation)
        })
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.watch()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn holds_lease(&self) -> bool {
        self.shared.holds_lease()
    }

    fn lease_ttl(&self) -> Option<std::time::Duration> {
        self.shared.lease_ttl()
    }

    fn refused(&self, generation: u64) -> BoxFuture<'_, ()> {
        self.shared.refused(generation)
    }

    fn adopted<'a>(&'a self, set: &'a Stored) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.local.save(set.clone()).await {
                tracing::error!(error = %e, "could not write the state_file write-ahead copy");
            }
        })
    }
}
