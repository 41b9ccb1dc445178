//! No task dies silently. A panic in a task the process cannot do without (a listener's
//! accept loop) is logged at `error` and ends the process with a non-zero exit; a panic in
//! a credential's refresher is logged at `error` and the refresher is restarted, so a
//! credential never goes quietly stale.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Set when an essential task has failed; the binary exits 1 when it fires.
#[derive(Clone, Default)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Fatal {
    pub fn new() -> Fatal {
        Fatal::default()
    }

    fn trip(&self, reason: String) {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.token.cancel();
    }

    /// Completes (with the reason) once an essential task has failed.
    pub async fn failed(&self) -> String {
        self.token.cancelled().await;
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// The panic's message, as far as it can be read.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload_message(payload),
        Err(e) => e.to_string(),
    }
}

fn payload_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Run an essential task; if it panics, log it and trip `fatal`.
pub fn spawn_essential<F>(what: &'static str, task: F, fatal: Fatal) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let inner = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = inner.await {
            if e.is_panic() {
                let message = panic_message(e);
                tracing::error!(task = what, panic = %message, "an essential task panicked; exiting");
                fatal.trip(format!("{what} panicked: {message}"));
            }
        }
    })
}

/// Run the task `make` builds until `cancel` fires; if it panics, log it and build it
/// again after `restart_after`. Returns when the task ends normally or `cancel` fires.
/// The panic is caught in place rather than by spawning the task and watching its handle:
/// one task per credential instead of two (ten thousand credentials, ten thousand tasks).
pub async fn restarting<M, F>(
    what: String,
    cancel: CancellationToken,
    restart_after: Duration,
    mut make: M,
) where
    M: FnMut() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    use futures_util::FutureExt;
    loop {
        match std::panic::AssertUnwindSafe(make()).catch_unwind().await {
            Ok(()) => return,
            Err(payload) => {
                let message = payload_message(payload);
                tracing::error!(task = %what, panic = %message, "task panicked; restarting it");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(restart_after) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_until_it_ends() {
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        restarting(
            "test".into(),
            CancellationToken::new(),
            Duration::from_secs(1),
            move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        panic!("boom {n}");
                    }
                }
            },
        )
        .await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two panics, then a clean run"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_restarts() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        restarting("test".into(), cancel, Duration::from_secs(1), move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { panic!("always") }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_essential_panic_trips_fatal() {
        let fatal = Fatal::new();
        spawn_essential(
            "listener",
            async { panic!("accept loop broke") },
            fatal.clone(),
        );
        let reason = tokio::time::timeout(Duration::from_secs(5), fatal.failed())
            .await
            .expect("fatal fires");
        assert!(
            reason.contains("listener") && reason.contains("accept loop broke"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_clean_end_is_not_fatal() {
        let fatal = Fatal::new();
        spawn_essential("listener", async {}, fatal.clone())
            .await
            .unwrap();
        assert!(!fatal.token.is_cancelled());
    }
}
