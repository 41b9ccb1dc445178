//! One task schedules every credential's refresher: a binary heap of due times (O(log n)
//! to arm; a moved or cancelled timer is left in the heap and skipped when it comes up)
//! under one runtime timer for the earliest, and wake-ups (a request needs a token, a 401,
//! an admin command, a shared store's commit) arrive on one channel. A refresher that has
//! work gets a short-lived task for one [`Stepper::step`] (what is due now, then its next
//! due time); between steps it is only a slot in a map and 16 bytes in the heap.
//!
//! Ten thousand credentials therefore cost ten thousand heap entries, not ten thousand
//! tasks (each with its future, its waker registrations and its cancellation token).
//! A heap entry is 16 bytes where a timer-wheel entry (`tokio_util`'s `DelayQueue`, used
//! before) was ~64 plus a key in the slot: ~90 bytes a credential less at ten thousand.
//!
//! A step that panics is logged and the refresher is stepped again a second later, with
//! the writer state (and so the refresh token) it held: a credential never goes quietly
//! stale.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// When it is due, in [`Clock`] ticks; `NOT_DUE`: only when woken. The heap may hold
    /// other, stale times for it: only this one counts.
    due: u64,
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
    let mut state = Run::new(tx);
    // One runtime timer, set to the earliest time in the heap.
    let alarm = tokio::time::sleep_until(state.clock.instant(NOT_DUE));
    tokio::pin!(alarm);
    let mut alarm_at = NOT_DUE;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            message = rx.recv() => match message {
                // Cannot happen while this loop holds a sender; ends the loop all the same.
                None => return,
                Some(message) => state.on_message(message),
            },
            () = &mut alarm, if alarm_at != NOT_DUE => {
                alarm_at = NOT_DUE;
                state.fire_due();
            }
        }
        state.start_steps();
        let next = state.next_due();
        if next != alarm_at {
            alarm_at = next;
            alarm.as_mut().reset(state.clock.instant(next));
        }
    }
}

/// A due time as the scheduler keeps it: whole milliseconds since it started, rounded up
/// (never early), so that a heap entry is two words.
#[derive(Clone, Copy)]
struct Clock(Instant);

/// A slot's `due` when only a wake-up steps it.
const NOT_DUE: u64 = u64::MAX;

impl Clock {
    fn ticks(self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.0);
        let ms = since.as_millis() + u128::from(since.subsec_nanos() % 1_000_000 != 0);
        u64::try_from(ms).unwrap_or(NOT_DUE - 1).min(NOT_DUE - 1)
    }

    /// Now, rounded down: a time is due once `due <= now()`.
    fn now(self) -> u64 {
        let ms = Instant::now().saturating_duration_since(self.0).as_millis();
        u64::try_from(ms).unwrap_or(NOT_DUE - 1)
    }

    fn instant(self, ticks: u64) -> Instant {
        // `NOT_DUE` (the alarm unset): a year on, far enough never to come.
        let ticks = ticks.min(365 * 24 * 3600 * 1000);
        self.0 + Duration::from_millis(ticks)
    }
}

/// The scheduling task's state.
struct Run {
    slots: HashMap<u64, Slot>,
    clock: Clock,
    /// (due, id), earliest first; entries whose slot now says another time (or is gone)
    /// are stale and skipped.
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    /// Waiting for a free step: woken ones (a request may be waiting) before due ones.
    woken: VecDeque<u64>,
    due: VecDeque<u64>,
    /// Step tasks running now (at most `MAX_STEPPING`).
    stepping: usize,
    tx: mpsc::UnboundedSender<Message>,
}

impl Run {
    fn new(tx: mpsc::UnboundedSender<Message>) -> Run {
        Run {
            slots: HashMap::new(),
            clock: Clock(Instant::now()),
            timers: BinaryHeap::new(),
            woken: VecDeque::new(),
            due: VecDeque::new(),
            stepping: 0,
            tx,
        }
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Start(id, stepper) => {
                // Wake-ups sent while it was not scheduled reached nobody; this first step
                // looks at everything anyway.
                stepper.wake_handle().taken();
                let slot = Slot {
                    stepper,
                    due: NOT_DUE,
                    queued: false,
                    stepping: false,
                    again: false,
                };
                // A slot started anew (or stopped) leaves its heap entry stale: skipped.
                self.slots.insert(id, slot);
                self.enqueue(id, false);
            }
            Message::Stop(id) => {
                self.slots.remove(&id);
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
                    slot.due = self.clock.ticks(at);
                    self.timers.push(Reverse((slot.due, id)));
                    self.compact();
                }
            }
        }
    }

    /// Every slot whose time has come goes to the due queue; stale entries on the way go.
    fn fire_due(&mut self) {
        let now = self.clock.now();
        while let Some(&Reverse((due, id))) = self.timers.peek() {
            if due > now {
                return;
            }
            self.timers.pop();
            if self.slots.get(&id).is_some_and(|slot| slot.due == due) {
                self.enqueue(id, false);
            }
        }
    }

    /// The earliest time in the heap that still counts (stale ones on top go).
    fn next_due(&mut self) -> u64 {
        while let Some(&Reverse((due, id))) = self.timers.peek() {
            if self.slots.get(&id).is_some_and(|slot| slot.due == due) {
                return due;
            }
            self.timers.pop();
        }
        NOT_DUE
    }

    /// Stale entries (a refresher woken early, stopped or restarted) stay until their time
    /// comes; once they outnumber the live ones the heap is rebuilt without them, so it
    /// stays within twice the credentials (amortised O(1) a push).
    fn compact(&mut self) {
        if self.timers.len() <= 2 * self.slots.len() + 64 {
            return;
        }
        let slots = &self.slots;
        self.timers
            .retain(|Reverse((due, id))| slots.get(id).is_some_and(|slot| slot.due == *due));
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
        // Its heap entry, if any, is stale from now on.
        slot.due = NOT_DUE;
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
    async fn timers_moved_by_wake_ups_do_not_pile_up() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let scheduler = Scheduler {
            tx: tx.clone(),
            ids: AtomicU64::new(1),
        };
        let mut run = Run::new(tx);
        let fake = Fake::start(&scheduler, 0, None, 0);
        let _other = Fake::start(&scheduler, 0, None, 0);
        while let Ok(message) = rx.try_recv() {
            run.on_message(message);
        }
        run.stepping = usize::MAX / 2; // steps are not started here; Stepped counts down
        let id = fake.wake.id;
        let mut last = 0;
        // Ten thousand times: due in an hour, then woken early (the timer goes stale).
        for i in 0..10_000u64 {
            let at = Instant::now() + Duration::from_secs(3600 + i);
            run.on_message(Message::Stepped(id, Some(at)));
            last = run.clock.ticks(at);
            if i < 9_999 {
                run.enqueue(id, true);
            }
        }
        assert!(
            run.timers.len() <= 2 * 2 + 64 + 1,
            "{} entries",
            run.timers.len()
        );
        assert_eq!(
            run.next_due(),
            last,
            "the one live timer is the earliest that counts"
        );
        tokio::time::advance(Duration::from_secs(3600 + 9_999)).await;
        // As if the queued wake-ups had been stepped.
        run.woken.clear();
        run.due.clear();
        run.slots.get_mut(&id).unwrap().queued = false;
        run.fire_due();
        assert_eq!(Vec::from(run.due.clone()), [id], "fired once");
        assert_eq!(run.next_due(), NOT_DUE);
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
