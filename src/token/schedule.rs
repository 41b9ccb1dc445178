//! The refresher's "what next?", as pure functions of its state and the time: when to
//! refresh a token, how long to back off, and what to do now. No sockets, no sleeps, so
//! every rule is unit-tested on tokio's paused clock.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

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

/// Where the refresher stands, as the decision needs it (all times on the tokio clock).
#[derive(Debug, Clone, Default)]
pub struct State {
    /// A token is held (usable or not).
    pub has_token: bool,
    /// The upstream refused the held token (401).
    pub invalidated: bool,
    /// When the held token's background refresh is due (`None`: no expiry known).
    pub refresh_at: Option<Instant>,
    /// The last attempt failed transiently: no new attempt before this.
    pub backoff_until: Option<Instant>,
    /// The provider refused the grant: wait for a person (install, forced refresh).
    pub parked: bool,
    /// A committed-set write failed: write it again at this time.
    pub save_retry_at: Option<Instant>,
    /// A static token file is re-read at this time.
    pub file_poll_at: Option<Instant>,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the set whose commit failed, again.
    SaveAgain,
    /// Fetch a new token (single flight: only the refresher does).
    Fetch,
    /// Re-read a static token file (a fetch that publishes only when the token changed).
    PollFile,
    /// Nothing now: sleep until `Some(instant)`, or until woken (`None`).
    Wait(Option<Instant>),
}

/// The decision. Durability first (a rotated token not yet on disk), then a fetch when one
/// is due, then a static file poll; otherwise the earliest time anything becomes due.
pub fn next(s: &State, now: Instant) -> Action {
    if s.save_retry_at.is_some_and(|at| now >= at) {
        return Action::SaveAgain;
    }
    let fetch_at = if s.parked {
        None
    } else if let Some(until) = s.backoff_until {
        Some(until)
    } else if !s.has_token || s.invalidated {
        Some(now)
    } else {
        s.refresh_at
    };
    if fetch_at.is_some_and(|at| now >= at) {
        return Action::Fetch;
    }
    if s.file_poll_at.is_some_and(|at| now >= at) {
        return Action::PollFile;
    }
    let earliest = [fetch_at, s.save_retry_at, s.file_poll_at]
        .into_iter()
        .flatten()
        .min();
    Action::Wait(earliest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn long_tokens_refresh_refresh_before_ahead() {
        let (margin, lead) = schedule(secs(3600), secs(60));
        assert_eq!(margin, secs(2));
        assert!(lead >= secs(60) && lead <= secs(66), "{lead:?}");
    }

    #[test]
    fn short_tokens_refresh_at_half_life() {
        let (margin, lead) = schedule(secs(2), secs(60));
        assert_eq!(margin, Duration::from_millis(200));
        assert!(
            lead >= secs(1) && lead <= Duration::from_millis(1100),
            "{lead:?}"
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= secs(1));
        assert!(backoff(3) >= secs(2) && backoff(3) <= secs(4));
        assert!(backoff(50) <= secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn no_token_means_fetch_now() {
        let now = Instant::now();
        assert_eq!(next(&State::default(), now), Action::Fetch);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_token_waits_for_its_refresh_time() {
        let start = Instant::now();
        let s = State {
            has_token: true,
            refresh_at: Some(start + secs(50)),
            ..State::default()
        };
        assert_eq!(
            next(&s, Instant::now()),
            Action::Wait(Some(start + secs(50)))
        );
        tokio::time::advance(secs(49)).await;
        assert!(matches!(next(&s, Instant::now()), Action::Wait(_)));
        tokio::time::advance(secs(1)).await;
        assert_eq!(next(&s, Instant::now()), Action::Fetch);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_without_expiry_waits_to_be_woken() {
        let s = State {
            has_token: true,
            ..State::default()
        };
        assert_eq!(next(&s, Instant::now()), Action::Wait(None));
        let refused = State {
            invalidated: true,
            ..s
        };
        assert_eq!(next(&refused, Instant::now()), Action::Fetch);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_holds_even_a_refused_token_until_it_ends() {
        let start = Instant::now();
        let s = State {
            has_token: true,
            invalidated: true,
            backoff_until: Some(start + secs(4)),
            ..State::default()
        };
        assert_eq!(
            next(&s, Instant::now()),
            Action::Wait(Some(start + secs(4)))
        );
        tokio::time::advance(secs(4)).await;
        assert_eq!(next(&s, Instant::now()), Action::Fetch);
    }

    #[tokio::test(start_paused = true)]
    async fn parked_credentials_never_fetch_by_themselves() {
        let s = State {
            parked: true,
            ..State::default()
        };
        assert_eq!(next(&s, Instant::now()), Action::Wait(None));
        tokio::time::advance(secs(3600)).await;
        assert_eq!(next(&s, Instant::now()), Action::Wait(None));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsaved_rotation_is_written_before_anything_else() {
        let start = Instant::now();
        let s = State {
            invalidated: true,
            has_token: true,
            save_retry_at: Some(start + secs(2)),
            ..State::default()
        };
        assert_eq!(next(&s, Instant::now()), Action::Fetch);
        tokio::time::advance(secs(2)).await;
        assert_eq!(next(&s, Instant::now()), Action::SaveAgain);
    }

    #[tokio::test(start_paused = true)]
    async fn static_files_are_polled_between_refreshes() {
        let start = Instant::now();
        let s = State {
            has_token: true,
            refresh_at: Some(start + secs(60)),
            file_poll_at: Some(start + secs(2)),
            ..State::default()
        };
        assert_eq!(
            next(&s, Instant::now()),
            Action::Wait(Some(start + secs(2)))
        );
        tokio::time::advance(secs(2)).await;
        assert_eq!(next(&s, Instant::now()), Action::PollFile);
    }
}
