//! One task schedules every credential's refresher: a timer wheel (`DelayQueue`: O(1) to
//! arm, move or cancel a timer) holds each refresher's next due time, and wake-ups (a
//! request needs a token, a 401, an admin command, a shared store's commit) arrive on one
//! channel. A refresher that has work gets a short-lived task for one [`Stepper::step`]
//! (what is due now, then its next due time); between steps it is only a slot in a map and a timer.
//!
//! Ten thousand credentials therefore cost ten thousand timers, not ten thousand tasks
//! (each with its future, its waker registrations and its cancellation token).
//!
//! A step that panics is logged and the refresher is stepped again a second later, with
//! the writer state (and so the refresh token) it held: a credential never goes quietly
//! stale.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use super::state::BoxFuture;

/// What the scheduler steps: a credential's refresher (a fake one in the tests below).
pub trait Stepper: Send + Sync + 'static {
    /// Do what is due now; the time to be stepped again (`None`: only when woken).
    fn step(&self) -> BoxFuture<'_, Option<Instant>>;
    /// The handle its credential wakes it with.
    fn wake_handle(&self) -> &Wake;
    /// For logs.
    fn name(&self) -> &str;
}

/// How long after a panicking step the refresher is stepped again.
const AFTER_PANIC: Duration = Duration::from_secs(1);

/// Steps at once, at most. Token calls are capped at 32 by the token client anyway; this
/// caps the steps waiting their turn, each holding its future: ten thousand credentials
/// starting together peaked at 99.6 MiB without it, 73 MiB with it (the same at 8 as at
/// 64; 83 at 256). Room to spare, because a step may also wait without calling (for
/// another replica's lease, for a JWKS). Credentials a request is waiting for go first.
const MAX_STEPPING: usize = 64;

enum Message {
    /// Schedule this refresher: step it now, then whenever it is due or woken.
    Start(u64, Arc<dyn Stepper>),
    /// Stop scheduling it (a step in flight finishes by itself; see `Refresher::stop`).
    Stop(u64),
    Wake(u64),
    /// A step ended; the refresher is due again at this time (`None`: only when woken).
    Stepped(u64, Option<Instant>),
}

/// The handle the store uses to start and stop refreshers.
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Message>,
    ids: AtomicU64,
}

/// What a credential calls to have its refresher stepped.
pub struct Wake {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
    /// A wake-up is on its way to the scheduler: further ones until it is taken add nothing
    /// (a thousand requests waiting for one token send one message).
    queued: AtomicBool,
}

impl Wake {
    pub fn wake(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(Message::Wake(self.id));
        }
    }

    /// The scheduler took the wake-up: the next one must be sent again.
    fn taken(&self) {
        self.queued.store(false, Ordering::Release);
    }
}

/// A scheduled refresher.
struct Slot {
    stepper: Arc<dyn Stepper>,
    timer: Option<delay_queue::Key>,
    /// Waiting in a queue for a free step.
    queued: bool,
    /// A step task is running.
    stepping: bool,
    /// Woken while stepping: step again as soon as this step ends.
    again: bool,
}

impl Scheduler {
    /// Start the scheduling task; it ends when `shutdown` is cancelled (steps in flight
    /// finish by themselves). Credentials hold its sender, so it does not end before.
    pub fn spawn(shutdown: CancellationToken) -> Scheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, tx.clone(), shutdown));
        Scheduler {
            tx,
            ids: AtomicU64::new(1),
        }
    }

    /// A new id and the wake handle for the credential that will carry it.
    pub fn wake_handle(&self) -> Wake {
        Wake {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            tx: self.tx.clone(),
            queued: AtomicBool::new(false),
        }
    }

    pub fn start(&self, stepper: Arc<dyn Stepper>) {
        let id = stepper.wake_handle().id;
        let _ = self.tx.send(Message::Start(id, stepper));
    }

    /// Step it no more (a step in flight finishes by itself).
    pub fn stop(&self, stepper: &dyn Stepper) {
        let _ = self.tx.send(Message::Stop(stepper.wake_handle().id));
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Message>,
    tx: mpsc::UnboundedSender<Message>,
    shutdown: CancellationToken,
) {
    let mut state = Run {
        slots: HashMap::new(),
        timers: DelayQueue::new(),
        woken: VecDeque::new(),
        due: VecDeque::new(),
        stepping: 0,
        tx,
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            message = rx.recv() => match message {
                // Cannot happen while this loop holds a sender; ends the loop all the same.
                None => return,
                Some(message) => state.on_message(message),
            },
            Some(expired) = state.timers.next() => {
                let id = expired.into_inner();
                if let Some(slot) = state.slots.get_mut(&id) {
                    slot.timer = None;
                    state.enqueue(id, false);
                }
            }
        }
        state.start_steps();
    }
}

/// The scheduling task's state.
struct Run {
    slots: HashMap<u64, Slot>,
    timers: DelayQueue<u64>,
    /// Waiting for a free step: woken ones (a request may be waiting) before due ones.
    woken: VecDeque<u64>,
    due: VecDeque<u64>,
    /// Step tasks running now (at most `MAX_STEPPING`).
    stepping: usize,
    tx: mpsc::UnboundedSender<Message>,
}

impl Run {
    fn on_message(&mut self, message: Message) {
        match message {
            Message::Start(id, stepper) => {
                // Wake-ups sent while it was not scheduled reached nobody; this first step
                // looks at everything anyway.
                stepper.wake_handle().taken();
                let slot = Slot {
                    stepper,
                    timer: None,
                    queued: false,
                    stepping: false,
                    again: false,
                };
                if let Some(old) = self.slots.insert(id, slot) {
                    self.forget(old);
                }
                self.enqueue(id, false);
            }
            Message::Stop(id) => {
                if let Some(old) = self.slots.remove(&id) {
                    self.forget(old);
                }
            }
            Message::Wake(id) => {
                if let Some(slot) = self.slots.get(&id) {
                    slot.stepper.wake_handle().taken();
                    self.enqueue(id, true);
                }
            }
            Message::Stepped(id, next) => {
                self.stepping -= 1;
                let Some(slot) = self.slots.get_mut(&id) else {
                    return;
                };
                slot.stepping = false;
                if std::mem::take(&mut slot.again) {
                    self.enqueue(id, true);
                } else if let Some(at) = next {
                    slot.timer = Some(self.timers.insert_at(id, at));
                }
            }
        }
    }

    /// A slot leaves the schedule (stopped, or started anew): its timer goes. (A step of it
    /// in flight ends by itself; steps of one refresher never overlap, its writer lock sees
    /// to that.)
    fn forget(&mut self, old: Slot) {
        if let Some(key) = old.timer {
            self.timers.remove(&key);
        }
    }

    /// `id` has work: step it when a step is free (again after the current one, if it is
    /// stepping now).
    fn enqueue(&mut self, id: u64, woken: bool) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.stepping {
            slot.again = true;
            return;
        }
        if let Some(key) = slot.timer.take() {
            self.timers.remove(&key);
        }
        if woken {
            // Also when it already waits among the due ones: the first pop steps it.
            self.woken.push_back(id);
        } else if !slot.queued {
            self.due.push_back(id);
        }
        slot.queued = true;
    }

    fn start_steps(&mut self) {
        while self.stepping < MAX_STEPPING {
            let Some(id) = self.woken.pop_front().or_else(|| self.due.pop_front()) else {
                return;
            };
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if !std::mem::take(&mut slot.queued) {
                continue; // already stepped from the other queue
            }
            slot.stepping = true;
            self.stepping += 1;
            let (stepper, done) = (slot.stepper.clone(), self.tx.clone());
            tokio::spawn(async move {
                let next = match std::panic::AssertUnwindSafe(stepper.step())
                    .catch_unwind()
                    .await
                {
                    Ok(next) => next,
                    Err(payload) => {
                        let message = crate::supervise::payload_message(payload);
                        tracing::error!(credential = %stepper.name(), panic = %message, "the refresher panicked; it runs again in a second");
                        Some(Instant::now() + AFTER_PANIC)
                    }
                };
                let _ = done.send(Message::Stepped(id, next));
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A stepper that records when it is stepped; each step takes `busy` and asks to be
    /// stepped again `every` later (`None`: only when woken). Its first `panics` steps panic.
    struct Fake {
        wake: Wake,
        steps: Mutex<Vec<Instant>>,
        busy: Duration,
        every: Option<Duration>,
        panics: AtomicU64,
        /// Steps running now and the most seen at once, shared by a test's fakes.
        gauge: Arc<Gauge>,
    }

    #[derive(Default)]
    struct Gauge {
        now: AtomicU64,
        most: AtomicU64,
    }

    impl Fake {
        fn start(scheduler: &Scheduler, busy: u64, every: Option<u64>, panics: u64) -> Arc<Fake> {
            Fake::start_on(scheduler, busy, every, panics, Arc::default())
        }

        fn start_on(
            scheduler: &Scheduler,
            busy: u64,
            every: Option<u64>,
            panics: u64,
            gauge: Arc<Gauge>,
        ) -> Arc<Fake> {
            let fake = Arc::new(Fake {
                wake: scheduler.wake_handle(),
                steps: Mutex::new(Vec::new()),
                busy: Duration::from_secs(busy),
                every: every.map(Duration::from_secs),
                panics: AtomicU64::new(panics),
                gauge,
            });
            scheduler.start(fake.clone());
            fake
        }

        /// Seconds since `t0` of each step so far.
        fn steps(&self, t0: Instant) -> Vec<u64> {
            let steps = self.steps.lock().unwrap();
            steps.iter().map(|at| (*at - t0).as_secs()).collect()
        }
    }

    impl Stepper for Fake {
        fn step(&self) -> BoxFuture<'_, Option<Instant>> {
            Box::pin(async move {
                self.steps.lock().unwrap().push(Instant::now());
                if self
                    .panics
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    panic!("a step went wrong");
                }
                let now = self.gauge.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.gauge.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(self.busy).await;
                self.gauge.now.fetch_sub(1, Ordering::SeqCst);
                self.every.map(|every| Instant::now() + every)
            })
        }

        fn wake_handle(&self) -> &Wake {
            &self.wake
        }

        fn name(&self) -> &str {
            "fake"
        }
    }

    /// The paused clock's start, and a scheduler running from it.
    fn started() -> (Instant, Scheduler) {
        (Instant::now(), Scheduler::spawn(CancellationToken::new()))
    }

    async fn secs(n: u64) {
        tokio::time::sleep(Duration::from_secs(n)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stepper_is_stepped_at_start_then_whenever_it_is_due() {
        let (t0, scheduler) = started();
        let fake = Fake::start(&scheduler, 0, Some(10), 0);
        secs(35).await;
        assert_eq!(fake.steps(t0), [0, 10, 20, 30]);
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_while_stepping_give_one_more_step_and_none_is_lost() {
        let (t0, scheduler) = started();
        let fake = Fake::start(&scheduler, 2, None, 0);
        secs(1).await;
        for _ in 0..100 {
            fake.wake.wake();
        }
        secs(10).await;
        assert_eq!(
            fake.steps(t0),
            [0, 2],
            "one step more, right after the first"
        );
        fake.wake.wake();
        secs(10).await;
        assert_eq!(fake.steps(t0), [0, 2, 11]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_comes_before_the_timer() {
        let (t0, scheduler) = started();
        let fake = Fake::start(&scheduler, 0, Some(60), 0);
        secs(5).await;
        fake.wake.wake();
        secs(1).await;
        // Woken at 5 s; the next step is 60 s after that one, not at 60 s.
        secs(60).await;
        assert_eq!(fake.steps(t0), [0, 5, 65]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_step_is_retried_a_second_later() {
        let (t0, scheduler) = started();
        let fake = Fake::start(&scheduler, 0, Some(30), 2);
        secs(40).await;
        assert_eq!(fake.steps(t0), [0, 1, 2, 32]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_stepper_is_not_stepped_until_started_again() {
        let (t0, scheduler) = started();
        let fake = Fake::start(&scheduler, 0, Some(10), 0);
        secs(1).await;
        scheduler.stop(&*fake);
        fake.wake.wake();
        secs(30).await;
        assert_eq!(fake.steps(t0), [0]);
        scheduler.start(fake.clone());
        secs(5).await;
        assert_eq!(fake.steps(t0), [0, 31]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_scheduling() {
        let t0 = Instant::now();
        let shutdown = CancellationToken::new();
        let scheduler = Scheduler::spawn(shutdown.clone());
        let fake = Fake::start(&scheduler, 0, Some(10), 0);
        secs(15).await;
        shutdown.cancel();
        fake.wake.wake();
        secs(60).await;
        assert_eq!(fake.steps(t0), [0, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_staggered_timers_each_fire_on_time() {
        let (t0, scheduler) = started();
        // The i-th stepper is due every 100 + i % 50 seconds.
        let fakes: Vec<_> = (0..10_000u64)
            .map(|i| Fake::start(&scheduler, 0, Some(100 + i % 50), 0))
            .collect();
        secs(160).await;
        for (i, fake) in fakes.iter().enumerate() {
            assert_eq!(fake.steps(t0), [0, 100 + i as u64 % 50], "stepper {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_stepping_steps_run_at_once_and_woken_ones_go_first() {
        let (t0, scheduler) = started();
        let gauge = Arc::new(Gauge::default());
        // Three rounds' worth of steppers, each step taking 10 s.
        let fakes: Vec<_> = (0..3 * MAX_STEPPING)
            .map(|_| Fake::start_on(&scheduler, 10, None, 0, gauge.clone()))
            .collect();
        secs(1).await;
        // The last one started is woken: it goes in the second round, not the third.
        let last = fakes.last().unwrap();
        last.wake.wake();
        secs(40).await;
        assert_eq!(gauge.most.load(Ordering::SeqCst), MAX_STEPPING as u64);
        let first_steps: Vec<u64> = fakes.iter().map(|f| f.steps(t0)[0]).collect();
        assert!(first_steps[..MAX_STEPPING].iter().all(|&s| s == 0));
        assert_eq!(last.steps(t0), [10], "woken: in the second round");
        assert_eq!(
            first_steps[2 * MAX_STEPPING - 1],
            20,
            "pushed to the third round"
        );
        assert!(fakes.iter().all(|f| f.steps(t0).len() == 1));
    }
}
