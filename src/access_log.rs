//! The per-request log line, written by hand in exactly the shape `tracing`'s fmt layer
//! gives every other line (text or JSON), straight into the same non-blocking writer.
//!
//! Why: through `tracing` the line cost about 15,000 instructions per request (a third of
//! the whole request path; measured with callgrind, README "Performance"): field visitors,
//! `Debug` formatting, the timestamp. Here it is a few hundred. When the binary has not
//! installed a writer (the library in tests, or an ANSI terminal where looks matter more
//! than speed), the caller falls back to an ordinary `tracing` event.

use std::cell::RefCell;
use std::fmt::Write as _;
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

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(256));
}

impl AccessLog {
    pub fn write(&self, r: &Record<'_>) {
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            if self.json {
                json_line(&mut line, r, SystemTime::now());
            } else {
                text_line(&mut line, r, SystemTime::now());
            }
            // One write, one message: the line is never split or interleaved.
            let _ = self.writer.clone().write_all(line.as_bytes());
        });
    }
}

/// `2026-11-27T20:59:09.536105Z  INFO token_proxy::proxy: request route="api" method=GET ...`
fn text_line(out: &mut String, r: &Record<'_>, now: SystemTime) {
    timestamp(out, now);
    let _ = write!(
        out,
        "  INFO token_proxy::proxy: request route={:?} method={} path={} status={} latency_ms=",
        r.route, r.method, r.path, r.status
    );
    millis(out, r.latency);
    out.push_str(" upstream_ms=");
    millis(out, r.upstream);
    out.push_str(if r.replayed {
        " replayed=true\n"
    } else {
        " replayed=false\n"
    });
}

/// tracing-subscriber's JSON shape: timestamp, level, fields (message first), target.
fn json_line(out: &mut String, r: &Record<'_>, now: SystemTime) {
    out.push_str("{\"timestamp\":\"");
    timestamp(out, now);
    out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"route\":");
    json_string(out, r.route);
    out.push_str(",\"method\":");
    json_string(out, r.method);
    out.push_str(",\"path\":");
    json_string(out, r.path);
    let _ = write!(out, ",\"status\":{},\"latency_ms\":", r.status);
    millis(out, r.latency);
    out.push_str(",\"upstream_ms\":");
    millis(out, r.upstream);
    out.push_str(if r.replayed {
        ",\"replayed\":true},\"target\":\"token_proxy::proxy\"}\n"
    } else {
        ",\"replayed\":false},\"target\":\"token_proxy::proxy\"}\n"
    });
}

/// Milliseconds with microsecond precision: `12.345`.
fn millis(out: &mut String, d: Duration) {
    let us = d.as_micros();
    let _ = write!(out, "{}.{:03}", us / 1000, us % 1000);
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// RFC 3339 UTC with microseconds, as tracing-subscriber writes it.
fn timestamp(out: &mut String, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    );
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

    #[test]
    fn text_lines_look_like_tracings() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_813_149_536_105);
        let mut s = String::new();
        text_line(&mut s, &record(), at);
        assert_eq!(
            s,
            "2026-11-27T20:59:09.536105Z  INFO token_proxy::proxy: request route=\"api\" method=GET path=/v1/x%22y status=200 latency_ms=1.234 upstream_ms=0.094 replayed=false\n"
        );
    }

    #[test]
    fn json_lines_parse_with_tracings_shape() {
        let mut s = String::new();
        let mut r = record();
        r.route = "we\"ird\\\n";
        json_line(&mut s, &r, SystemTime::now());
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "token_proxy::proxy");
        assert_eq!(v["fields"]["message"], "request");
        assert_eq!(v["fields"]["route"], "we\"ird\\\n");
        assert_eq!(v["fields"]["status"], 200);
        assert_eq!(v["fields"]["latency_ms"], 1.234);
        assert_eq!(v["fields"]["replayed"], false);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }
}
