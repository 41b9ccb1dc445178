//! No task dies silently. A panic in a task the process cannot do without (a listener's
//! accept loop) is logged at `error` and ends the process with a non-zero exit. (A panic in
//! a credential's refresher is logged and the refresher stepped again: see
//! `token::scheduler`.)

use std::future::Future;
use std::sync::{Arc, Mutex};

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

pub(crate) fn payload_message(payload: Box<dyn std::any::Any + Send>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
