//! The background task that keeps one credential's token fresh.
//!
//! One task per credential, and only it fetches: that is the single flight. Requests and
//! 401s only *wake* it; it decides whether a fetch is due. It refreshes ahead of expiry at
//! `expires_at - min(refresh_before, lifetime/2) - jitter`, backs off with jitter on
//! transient failures, and parks in `needs_reauth` on a refusal until a token is installed
//! or an admin forces a refresh.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::credential::{Credential, Phase, Snapshot};
use super::grant::{Grant, StaticSource};

/// How often a static token file is checked for a new token (Kubernetes swaps it in place).
const FILE_POLL: Duration = Duration::from_secs(2);

/// `(margin, lead)` for a token living `lifetime`: it is not attached within `margin` of
/// its expiry, and its refresh starts `lead` before expiry (including up to 10 % jitter so
/// that many sidecars sharing an identity provider do not refresh in lockstep).
pub fn schedule(lifetime: Duration, refresh_before: Duration) -> (Duration, Duration) {
    let margin = (lifetime / 10).min(Duration::from_secs(2));
    let lead = refresh_before.min(lifetime / 2);
    let jitter = lead.mul_f64(rand::thread_rng().gen_range(0.0..0.1));
    (margin, (lead + jitter).max(margin))
}

/// Delay before retry number `failures` (1-based): 1 s, 2 s, 4 s ... capped at 30 s, with
/// "equal jitter" (half fixed, half random).
pub fn backoff(failures: u32) -> Duration {
    let base =
        Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30));
    base.mul_f64(rand::thread_rng().gen_range(0.5..1.0))
}

impl Credential {
    /// Whether a fetch is due now (ignoring backoff and needs_reauth).
    fn wanted(&self, snap: &Snapshot, now: SystemTime) -> bool {
        match &snap.token {
            None => true,
            Some(t) => snap.invalidated || t.refresh_at.is_some_and(|at| now >= at),
        }
    }

    fn polls_file(&self) -> bool {
        matches!(self.grant, Grant::Static(StaticSource::File(_)))
    }

    /// The refresher loop; returns when `shutdown` is cancelled.
    pub async fn run_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next_poll = tokio::time::Instant::now() + FILE_POLL;
        let mut save_failures = 0u32;
        let mut next_save = tokio::time::Instant::now();
        loop {
            let snap = self.snapshot();
            let now = SystemTime::now();
            let unsaved = snap.persisted == Some(false);
            if !unsaved {
                save_failures = 0;
            } else if tokio::time::Instant::now() >= next_save {
                // A rotation that is not on disk: keep writing it until it is.
                save_failures += 1;
                next_save = tokio::time::Instant::now() + backoff(save_failures);
                self.retry_persist().await;
                continue;
            }
            let forced = self.force.swap(false, Ordering::SeqCst);
            let due = forced
                || match snap.phase {
                    Phase::NeedsReauth => false,
                    Phase::Backoff { until } => now >= until,
                    Phase::Idle | Phase::Refreshing => self.wanted(&snap, now),
                };
            if due {
                self.attempt(false).await;
                continue;
            }
            if self.polls_file() && tokio::time::Instant::now() >= next_poll {
                next_poll = tokio::time::Instant::now() + FILE_POLL;
                self.attempt(true).await;
                continue;
            }
            let wake_at = match snap.phase {
                Phase::NeedsReauth => None,
                Phase::Backoff { until } => Some(until),
                _ => snap.token.as_ref().and_then(|t| t.refresh_at),
            };
            let mut sleep_for = wake_at.map(|at| at.duration_since(now).unwrap_or_default());
            if self.polls_file() {
                let poll_in = next_poll.saturating_duration_since(tokio::time::Instant::now());
                sleep_for = Some(sleep_for.map_or(poll_in, |s| s.min(poll_in)));
            }
            if unsaved {
                let save_in = next_save.saturating_duration_since(tokio::time::Instant::now());
                sleep_for = Some(sleep_for.map_or(save_in, |s| s.min(save_in)));
            }
            let sleep = async {
                match sleep_for {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// `POST /tokens/{name}/refresh`: refresh now, even in backoff or needs_reauth, and wait
    /// for the outcome. `Err` carries the token endpoint's error (no secrets).
    pub async fn force_refresh(&self) -> Result<(), String> {
        let mut rx = self.snapshot.subscribe();
        let (before_attempts, before_count) = {
            let s = rx.borrow_and_update();
            (s.attempts, s.refresh_count)
        };
        self.force.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + self.wait_timeout * 2;
        loop {
            {
                let s = rx.borrow_and_update();
                if s.attempts > before_attempts {
                    return if s.refresh_count > before_count {
                        Ok(())
                    } else {
                        Err(s
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "refresh failed".into()))
                    };
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err("timed out waiting for the token endpoint".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_tokens_refresh_refresh_before_ahead() {
        let (margin, lead) = schedule(Duration::from_secs(3600), Duration::from_secs(60));
        assert_eq!(margin, Duration::from_secs(2));
        assert!(
            lead >= Duration::from_secs(60) && lead <= Duration::from_secs(66),
            "{lead:?}"
        );
    }

    #[test]
    fn short_tokens_refresh_at_half_life() {
        let (margin, lead) = schedule(Duration::from_secs(2), Duration::from_secs(60));
        assert_eq!(margin, Duration::from_millis(200));
        assert!(
            lead >= Duration::from_secs(1) && lead <= Duration::from_millis(1100),
            "{lead:?}"
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= Duration::from_secs(1));
        assert!(backoff(3) >= Duration::from_secs(2) && backoff(3) <= Duration::from_secs(4));
        assert!(backoff(50) <= Duration::from_secs(30));
    }
}
