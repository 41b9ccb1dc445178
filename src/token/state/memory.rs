//! The memory store: no `state_file`, one holder. It keeps nothing: the refresher (the one
//! writer) holds the tokens for the life of the process, and every build of a credential
//! makes its store anew, so nothing committed here would ever be loaded again. Holding a
//! copy cost ~240 bytes per credential (a token set and a second refresh token) for nothing.
//! Without state there is nobody to fence out either: the lease is always granted and every
//! commit lands. One instance serves every credential ([`MemoryStateStore::shared`]).

use std::sync::{Arc, LazyLock};

use super::{
    nobody_else, Acquire, BoxFuture, Commit, Lease, Loaded, StateError, StateStore, Stored,
};

#[derive(Default)]
pub struct MemoryStateStore;

impl MemoryStateStore {
    /// The one memory store every credential without a `state_file` is built with.
    pub fn shared() -> Arc<dyn StateStore> {
        static ONE: LazyLock<Arc<MemoryStateStore>> = LazyLock::new(Arc::default);
        ONE.clone()
    }
}

impl StateStore for MemoryStateStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// Nothing survives a build: a credential starts from its config.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StateError>> {
        Box::pin(async { Ok(Loaded::Empty) })
    }

    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Acquire, StateError>> {
        Box::pin(async move { Ok(Acquire::Acquired(Lease { generation })) })
    }

    fn renew(&self, _lease: &Lease) -> BoxFuture<'_, Result<bool, StateError>> {
        Box::pin(async { Ok(true) })
    }

    fn release(&self, _lease: Lease) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async { Ok(()) })
    }

    fn commit(&self, _expected: u64, _set: Stored) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async { Ok(Commit::Committed) })
    }

    fn clear(&self, _generation: u64) -> BoxFuture<'_, Result<u64, StateError>> {
        Box::pin(async { Ok(0) })
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        nobody_else()
    }
}
