//! The memory store: no `state_file`, one holder. Tokens live as long as the process.

use std::sync::Mutex;

use super::{
    Acquire, BoxFuture, Commit, Lease, Loaded, LocalHolder, StateError, StateStore, Stored,
};

#[derive(Default)]
pub struct MemoryStateStore {
    saved: Mutex<Option<Stored>>,
    holder: LocalHolder,
}

impl StateStore for MemoryStateStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StateError>> {
        Box::pin(async move {
            let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Ok(saved.map_or(Loaded::Empty, Loaded::Tokens))
        })
    }

    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Acquire, StateError>> {
        Box::pin(async move { Ok(self.holder.acquire(generation)) })
    }

    fn renew(&self, _lease: &Lease) -> BoxFuture<'_, Result<bool, StateError>> {
        Box::pin(async { Ok(true) })
    }

    fn release(&self, _lease: Lease) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async { Ok(()) })
    }

    fn commit(&self, expected: u64, set: Stored) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async move {
            if let Some(conflict) = self.holder.conflict(expected) {
                return Ok(conflict);
            }
            self.holder.committed(set.generation);
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(set);
            Ok(Commit::Committed)
        })
    }

    fn clear(&self, _generation: u64) -> BoxFuture<'_, Result<u64, StateError>> {
        Box::pin(async move {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.holder.committed(0);
            Ok(0)
        })
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.holder.watch()
    }
}
