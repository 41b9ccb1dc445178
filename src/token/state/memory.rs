//! The memory store: no `state_file`, one holder. Tokens live as long as the process.

use std::sync::Mutex;

use super::{BoxFuture, Commit, Lease, LocalHolder, StateError, StateStore, Stored};

#[derive(Default)]
pub struct MemoryStateStore {
    saved: Mutex<Option<Stored>>,
    holder: LocalHolder,
}

impl StateStore for MemoryStateStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<Stored>, StateError>> {
        Box::pin(async move { Ok(self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone()) })
    }

    fn try_acquire(&self, generation: u64) -> BoxFuture<'_, Result<Option<Lease>, StateError>> {
        Box::pin(async move { Ok(Some(self.holder.lease(generation))) })
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

    fn clear(&self) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.holder.committed(0);
            Ok(())
        })
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.holder.watch()
    }
}
