//! Bounds on every wait once a request is under way (`idle_timeout`): a body that stops
//! flowing, or an upstream socket that stops taking our bytes, is abandoned and its
//! connections freed, instead of holding them (and the memory queued behind them) forever.
//!
//! - [`IdleBody`] wraps a body: when its producer (the app's upload, the upstream's
//!   response) has sent nothing for `idle` while we were waiting for it, it fails.
//!   Waiting on the *consumer* (backpressure) does not count: the clock runs only while
//!   the body is being polled and has nothing to give.
//! - [`StallGuard`] wraps an upstream connection: a write that cannot make progress for
//!   `idle` (an upstream that stopped reading an upload, e.g. after we answered 504) fails,
//!   which closes the connection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::time::{Instant, Sleep};

use crate::upstream::BoxError;

/// The error an idle body or stalled connection ends with.
#[derive(Debug, thiserror::Error)]
#[error("no data moved for {0:?} (idle_timeout)")]
pub struct IdleTimeout(pub Duration);

/// Whether `e` (or one of its sources) is an [`IdleTimeout`].
pub fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<IdleTimeout>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<IdleTimeout>()) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// A deadline armed when a wait starts and cleared when progress is made.
struct Watchdog {
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Watchdog {
    fn new(idle: Duration) -> Self {
        Watchdog { idle, sleep: None }
    }

    fn progressed(&mut self) {
        self.sleep = None;
    }

    /// Called when the inner side is pending: `true` once the wait has lasted `idle`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + idle)));
        sleep.as_mut().poll(cx).is_ready()
    }
}

use std::future::Future;

pin_project_lite::pin_project! {
    /// A body that fails with [`IdleTimeout`] when its producer goes quiet.
    pub struct IdleBody<B> {
        #[pin]
        inner: B,
        watchdog: Watchdog,
    }
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleBody {
            inner,
            watchdog: Watchdog::new(idle),
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Pending => {
                if this.watchdog.expired(cx) {
                    let idle = this.watchdog.idle;
                    this.watchdog.progressed();
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout(idle)))));
                }
                Poll::Pending
            }
            Poll::Ready(frame) => {
                this.watchdog.progressed();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream connection whose writes may not stall longer than `idle`.
pub struct StallGuard<T> {
    inner: T,
    watchdog: Watchdog,
}

impl<T> StallGuard<T> {
    pub fn new(inner: T, idle: Duration) -> Self {
        StallGuard {
            inner,
            watchdog: Watchdog::new(idle),
        }
    }

    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match polled {
            Poll::Pending if self.watchdog.expired(cx) => {
                let idle = self.watchdog.idle;
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    IdleTimeout(idle),
                )))
            }
            Poll::Pending => Poll::Pending,
            ready => {
                self.watchdog.progressed();
                ready
            }
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Reads are not guarded: an idle pooled connection waits for reads legitimately,
        // and response bodies are bounded by `IdleBody`.
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, polled)
    }
}

impl<T: Connection> Connection for StallGuard<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that yields one chunk, then never anything again.
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 {
                return Poll::Pending;
            }
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"part")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_idle() {
        let mut body = IdleBody::new(Stalls(false), Duration::from_secs(5));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(is_idle_timeout(&*err), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flowing_body_is_never_cut() {
        let chunks = (0..10)
            .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))));
        let stream = slow_body(chunks);
        let body = IdleBody::new(stream, Duration::from_secs(5));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
    }

    /// Frames that each arrive 4 s after the previous (under the 5 s idle).
    fn slow_body(
        frames: impl Iterator<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Send + 'static,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        struct Slow<I> {
            frames: I,
            sleep: Pin<Box<Sleep>>,
        }
        impl<I: Iterator<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Unpin> Body for Slow<I> {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                if self.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let next = Instant::now() + Duration::from_secs(4);
                self.sleep.as_mut().reset(next);
                Poll::Ready(self.frames.next())
            }
        }
        Slow {
            frames: frames.collect::<Vec<_>>().into_iter(),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(4))),
        }
    }
}
