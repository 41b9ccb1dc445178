//! The per-request log line, written by hand in exactly the shape `tracing`'s fmt layer
//! gives every other line (text or JSON), straight into the same non-blocking writer.
//!
//! Why: through `tracing` the line cost about 15,000 instructions per request (a third of
//! the whole request path; measured with callgrind, benches/HISTORY.md): field visitors,
//! `Debug` formatting, the timestamp. Here it is a few hundred. When the binary has not
//! installed a writer (the library in tests, or an ANSI terminal where looks matter more
//! than speed), the caller falls back to an ordinary `tracing` event.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tracing_appender::non_blocking::NonBlocking;

/// Where request lines go, and in which format.
pub struct AccessLog {
    writer: NonBlocking,
    json: bool,
}

static INSTALLED: OnceLock<AccessLog> = OnceLock::new();

/// Use `writer` (the one the `tracing` subscriber writes to) for request lines.
pub fn install(writer: NonBlocking, json: bool) {
    let _ = INSTALLED.set(AccessLog { writer, json });
}

/// The installed writer, if any.
pub fn get() -> Option<&'static AccessLog> {
    INSTALLED.get()
}

/// One request, as the line reports it.
pub struct Record<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency: Duration,
    pub upstream: Duration,
    pub replayed: bool,
}

/// A batch is handed over once it holds this much, even if its event loop stays busy.
const BATCH_BYTES: usize = 16 * 1024;
/// How long batched lines wait, at most, once their worker's event loop has run out of work.
const FLUSH_AFTER: Duration = Duration::from_millis(20);

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
    /// The request lines of a proxy worker thread not yet handed to the writer thread.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Batched lines; what is left when the thread ends (a panic included) is handed over.
struct Batch {
    lines: Vec<u8>,
    /// A task that hands the batch over [`FLUSH_AFTER`] from now is scheduled.
    flush_scheduled: bool,
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(log) = get() {
            log.hand_over(&mut self.lines);
        }
    }
}

impl AccessLog {
    pub fn write(&self, r: &Record<'_>) {
        let now = SystemTime::now();
        // A proxy worker formats the line straight into its batch.
        let batched = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
            Some(batch) => {
                self.line(&mut batch.lines, r, now);
                if batch.lines.len() >= BATCH_BYTES {
                    self.hand_over(&mut batch.lines);
                }
                true
            }
            None => false,
        });
        if !batched {
            LINE.with(|line| {
                let mut line = line.borrow_mut();
                line.clear();
                self.line(&mut line, r, now);
                // One write, one message: the line is never split or interleaved.
                let _ = self.writer.clone().write_all(&line);
            });
        }
    }

    /// Append `r`'s line, in this log's format.
    fn line(&self, out: &mut Vec<u8>, r: &Record<'_>, now: SystemTime) {
        if self.json {
            json_line(out, r, now);
        } else {
            text_line(out, r, now);
        }
    }

    /// Whole lines, in one message to the writer thread.
    fn hand_over(&self, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            let _ = self.writer.clone().write_all(batch);
            batch.clear();
        }
    }
}

/// From now on, this thread's request lines are batched until [`flush_thread`]. For the
/// proxy workers: handing each line to the writer thread on its own cost a channel message
/// and, as often as not, a wake-up of that thread per request, which at tens of thousands
/// of requests a second was most of what the request log cost (benches/HISTORY.md).
/// Lines reach the writer in order for each worker: at 16 KiB, at most [`FLUSH_AFTER`]
/// after the worker's event loop runs out of work ([`flush_soon`]), and as it ends.
pub fn batch_this_thread() {
    BATCH.with(|batch| {
        *batch.borrow_mut() = Some(Batch {
            lines: Vec::with_capacity(BATCH_BYTES),
            flush_scheduled: false,
        })
    });
}

/// For a worker's event loop that is about to wait: have this thread's batched lines
/// handed over [`FLUSH_AFTER`] from now, by a task on this event loop. Handing them over
/// at every such wait (as often as every few requests under load) cost a wake-up of the
/// writer thread each time. Outside a runtime, they are handed over at once.
pub fn flush_soon() {
    let schedule = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
        Some(batch) if !batch.lines.is_empty() && !batch.flush_scheduled => {
            batch.flush_scheduled = true;
            true
        }
        _ => false,
    });
    if !schedule {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        // Spawned as the loop is about to wait: tokio runs it instead of waiting, and the
        // loop then waits no longer than its timer.
        Ok(runtime) => drop(runtime.spawn(async {
            tokio::time::sleep(FLUSH_AFTER).await;
            flush_thread();
        })),
        Err(_) => flush_thread(),
    }
}

/// Hand this thread's batched request lines to the writer thread now.
pub fn flush_thread() {
    let Some(log) = get() else { return };
    BATCH.with(|batch| {
        if let Some(batch) = batch.borrow_mut().as_mut() {
            log.hand_over(&mut batch.lines);
            batch.flush_scheduled = false;
        }
    });
}

/// `2026-11-27T20:59:09.536105Z  INFO token_proxy::proxy: request route="api" method=GET ...`
/// (Numbers are written by hand: through `fmt`, formatting was most of the line's cost.)
fn text_line(out: &mut Vec<u8>, r: &Record<'_>, now: SystemTime) {
    timestamp(out, now);
    out.extend_from_slice(b"  INFO token_proxy::proxy: request route=");
    debug_str(out, r.route);
    out.extend_from_slice(b" method=");
    out.extend_from_slice(r.method.as_bytes());
    out.extend_from_slice(b" path=");
    out.extend_from_slice(r.path.as_bytes());
    out.extend_from_slice(b" status=");
    number(out, u64::from(r.status), 1);
    out.extend_from_slice(b" latency_ms=");
    millis(out, r.latency);
    out.extend_from_slice(b" upstream_ms=");
    millis(out, r.upstream);
    out.extend_from_slice(if r.replayed {
        b" replayed=true\n"
    } else {
        b" replayed=false\n"
    });
}

/// tracing-subscriber's JSON shape: timestamp, level, fields (message first), target.
fn json_line(out: &mut Vec<u8>, r: &Record<'_>, now: SystemTime) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"route\":");
    json_string(out, r.route);
    out.extend_from_slice(b",\"method\":");
    json_string(out, r.method);
    out.extend_from_slice(b",\"path\":");
    json_string(out, r.path);
    out.extend_from_slice(b",\"status\":");
    number(out, u64::from(r.status), 1);
    out.extend_from_slice(b",\"latency_ms\":");
    millis(out, r.latency);
    out.extend_from_slice(b",\"upstream_ms\":");
    millis(out, r.upstream);
    out.extend_from_slice(if r.replayed {
        b",\"replayed\":true},\"target\":\"token_proxy::proxy\"}\n"
    } else {
        b",\"replayed\":false},\"target\":\"token_proxy::proxy\"}\n"
    });
}

/// Milliseconds with microsecond precision: `12.345`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    number(out, us / 1000, 1);
    out.push(b'.');
    number(out, us % 1000, 3);
}

/// `n` in decimal, zero-padded to at least `width` digits.
fn number(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n).as_bytes();
    out.resize(out.len() + width.saturating_sub(digits.len()), b'0');
    out.extend_from_slice(digits);
}

/// `s` as `{:?}` writes it: quoted, with quotes, backslashes and control characters
/// escaped. Plain printable ASCII (every route name in practice) is copied as it is.
fn debug_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b if b < 0x20 => {
                let _ = write!(out, "\\u{:04x}", b);
            }
            // Every other byte as it is: a multi-byte character's bytes stay whole.
            b => out.push(b),
        }
    }
    out.push(b'"');
}

/// RFC 3339 UTC with microseconds, as tracing-subscriber writes it. The part up to the
/// second is formatted once a second (per thread), not for every line.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    thread_local! {
        /// The second last formatted, and `YYYY-MM-DDTHH:MM:SS.` for it.
        static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        let mut text = Vec::with_capacity(20);
        let (y, m, d) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        number(&mut text, y.clamp(0, 9999) as u64, 4);
        text.push(b'-');
        number(&mut text, u64::from(m), 2);
        text.push(b'-');
        number(&mut text, u64::from(d), 2);
        text.push(b'T');
        number(&mut text, rem / 3600, 2);
        text.push(b':');
        number(&mut text, rem / 60 % 60, 2);
        text.push(b':');
        number(&mut text, rem % 60, 2);
        text.push(b'.');
        prefix.copy_from_slice(&text);
        SECOND.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    number(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            route: "api",
            method: "GET",
            path: "/v1/x%22y",
            status: 200,
            latency: Duration::from_micros(1_234),
            upstream: Duration::from_nanos(94_811),
            replayed: false,
        }
    }

    /// The lines this thread has batched but not handed over, and whether a hand-over is
    /// scheduled.
    fn batched() -> (usize, bool) {
        BATCH.with(|b| {
            b.borrow()
                .as_ref()
                .map_or((0, false), |b| (b.lines.len(), b.flush_scheduled))
        })
    }

    #[test]
    fn a_workers_lines_are_handed_over_shortly_after_its_loop_runs_out_of_work() {
        #[derive(Clone, Default)]
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let written = Capture::default();
        let (writer, guard) = tracing_appender::non_blocking(written.clone());
        install(writer, false);
        let log = get().expect("installed");
        std::thread::spawn(move || {
            batch_this_thread();
            // A worker's loop, as src/workers.rs builds it; paused time advances only when
            // the loop waits, so what happens when is exact.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .on_thread_park(flush_soon)
                .build()
                .unwrap();
            runtime.block_on(async {
                log.write(&record());
                log.write(&record());
                let two_lines = batched().0;
                assert!(two_lines > 0);
                // The loop waits: a hand-over is scheduled, not done.
                tokio::time::sleep(FLUSH_AFTER / 2).await;
                assert_eq!(batched(), (two_lines, true));
                // FLUSH_AFTER later, both lines are handed over, at once.
                tokio::time::sleep(FLUSH_AFTER).await;
                assert_eq!(batched(), (0, false));
                // A line after that waits for the next idle moment, as before.
                log.write(&record());
                assert!(batched().0 > 0);
            });
            drop(runtime);
            // As the worker ends, what is left is handed over.
            flush_thread();
            assert_eq!(batched().0, 0);
        })
        .join()
        .unwrap();
        drop(guard); // flushes the writer thread
        let written = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written.matches("route=\"api\"").count(), 3, "{written}");
    }

    #[test]
    fn text_lines_look_like_tracings() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_813_149_536_105);
        let mut s = Vec::new();
        text_line(&mut s, &record(), at);
        assert_eq!(
            String::from_utf8(s).unwrap(),
            "2026-11-27T20:59:09.536105Z  INFO token_proxy::proxy: request route=\"api\" method=GET path=/v1/x%22y status=200 latency_ms=1.234 upstream_ms=0.094 replayed=false\n"
        );
    }

    #[test]
    fn each_line_has_its_own_time_though_the_second_is_cached() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_813_149_536_105);
        for (later, expected) in [
            (Duration::ZERO, "2026-11-27T20:59:09.536105Z"),
            (Duration::from_micros(1), "2026-11-27T20:59:09.536106Z"),
            (Duration::from_secs(1), "2026-11-27T20:59:10.536105Z"),
            (
                Duration::from_secs(86_400 * 35),
                "2027-01-01T20:59:09.536105Z",
            ),
            (Duration::ZERO, "2026-11-27T20:59:09.536105Z"),
        ] {
            let mut s = Vec::new();
            timestamp(&mut s, at + later);
            assert_eq!(String::from_utf8(s).unwrap(), expected);
        }
    }

    #[test]
    fn json_lines_parse_with_tracings_shape() {
        let mut s = Vec::new();
        let mut r = record();
        r.route = "we\"ird\\\n caf\u{e9}";
        json_line(&mut s, &r, SystemTime::now());
        let v: serde_json::Value = serde_json::from_slice(&s).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "token_proxy::proxy");
        assert_eq!(v["fields"]["message"], "request");
        assert_eq!(v["fields"]["route"], "we\"ird\\\n caf\u{e9}");
        assert_eq!(v["fields"]["status"], 200);
        assert_eq!(v["fields"]["latency_ms"], 1.234);
        assert_eq!(v["fields"]["replayed"], false);
    }

    #[test]
    fn hand_written_numbers_and_strings_read_as_fmt_writes_them() {
        for (n, width) in [
            (0, 1),
            (7, 3),
            (12, 2),
            (999, 3),
            (1000, 3),
            (42, 6),
            (u64::MAX, 1),
        ] {
            let mut s = Vec::new();
            number(&mut s, n, width);
            assert_eq!(s, format!("{n:0width$}").as_bytes());
        }
        for name in [
            "api",
            "we\"ird",
            "back\\slash",
            "tab\there",
            "caf\u{e9}",
            "",
        ] {
            let mut s = Vec::new();
            debug_str(&mut s, name);
            assert_eq!(s, format!("{name:?}").as_bytes());
        }
        for us in [0, 5, 1_234, 94_811, 60_000_000] {
            let mut s = Vec::new();
            millis(&mut s, Duration::from_micros(us));
            assert_eq!(s, format!("{}.{:03}", us / 1000, us % 1000).as_bytes());
        }
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }
}
