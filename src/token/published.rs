//! A value that one writer publishes and many read, with a way to wait for its next change:
//! the part of `tokio::sync::watch` a credential uses. A watch channel is a separate
//! allocation of ~420 bytes (its eight-way notifier serves many receivers); this is ~140
//! bytes inside the credential, which matters at ten thousand credentials.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use tokio::sync::Notify;

pub struct Published<T> {
    value: RwLock<T>,
    /// Bumped by every change (under the write lock).
    version: AtomicU64,
    changed: Notify,
}

impl<T> Published<T> {
    pub fn new(value: T) -> Published<T> {
        Published {
            value: RwLock::new(value),
            version: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// The current value (hold the guard briefly: the writer waits for it).
    pub fn borrow(&self) -> RwLockReadGuard<'_, T> {
        self.value.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes so far: pass it to `changed_since` to wait for the next one.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn send_modify(&self, modify: impl FnOnce(&mut T)) {
        self.send_if_modified(|value| {
            modify(value);
            true
        });
    }

    /// Change the value in place; waiters are woken only when `modify` says it changed.
    pub fn send_if_modified(&self, modify: impl FnOnce(&mut T) -> bool) -> bool {
        let mut value = self.value.write().unwrap_or_else(|e| e.into_inner());
        let modified = modify(&mut value);
        if modified {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        drop(value);
        if modified {
            self.changed.notify_waiters();
        }
        modified
    }

    /// Wait until the value has changed since `version`; returns the version now.
    pub async fn changed_since(&self, version: u64) -> u64 {
        loop {
            // Registered before the check, so a change between the two is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.version();
            if now != version {
                return now;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_see_every_change_and_only_changes() {
        let p = Arc::new(Published::new(0u32));
        let v0 = p.version();
        assert!(!p.send_if_modified(|_| false));
        assert_eq!(p.version(), v0, "no change, no new version");
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.changed_since(v0).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        p.send_modify(|v| *v = 7);
        let v1 = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_ne!(v1, v0);
        assert_eq!(*p.borrow(), 7);
        // A change made before the wait starts is not missed.
        p.send_modify(|v| *v = 8);
        let v2 = tokio::time::timeout(Duration::from_secs(1), p.changed_since(v1))
            .await
            .expect("already changed");
        assert_ne!(v2, v1);
    }
}
