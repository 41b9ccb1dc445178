//! Request bodies on their way upstream: streamed, and teed into a bounded replay buffer so
//! a request can be replayed once after a 401 without ever holding a large body in memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

use crate::upstream::BoxError;

/// The body of every request the proxy and admin listeners receive: streamed by hyper's
/// server, or read whole by our own HTTP/1.1 server (`h1::app`).
pub type AppBody = http_body_util::Either<hyper::body::Incoming, Full<Bytes>>;

/// The body type of every request and response the proxy produces.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// What was sent of a request body, kept only while it fits in `limit`.
#[derive(Debug)]
pub struct ReplayBuffer {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    /// The body was larger than `limit` (or had trailers): it cannot be replayed.
    given_up: bool,
    /// The whole body has been read.
    complete: bool,
}

impl ReplayBuffer {
    /// A shared buffer for a body whose size is hinted by `hint`.
    pub fn new(limit: usize, hint: &SizeHint) -> Arc<Mutex<ReplayBuffer>> {
        let too_big = hint.lower() > limit as u64;
        Arc::new(Mutex::new(ReplayBuffer {
            chunks: Vec::new(),
            len: 0,
            limit,
            given_up: too_big,
            complete: false,
        }))
    }

    fn record(&mut self, data: &Bytes) {
        if self.given_up {
            return;
        }
        self.len += data.len();
        if self.len > self.limit {
            self.given_up = true;
            self.chunks = Vec::new();
        } else {
            self.chunks.push(data.clone());
        }
    }

    /// The whole body, if it was read to the end and fits; `None` otherwise.
    pub fn replayable(&self) -> Option<Bytes> {
        if !self.complete || self.given_up {
            return None;
        }
        let mut out = BytesMut::with_capacity(self.len);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        Some(out.freeze())
    }
}

pin_project_lite::pin_project! {
    /// Passes `inner` through unchanged while recording it into a `ReplayBuffer`.
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        buffer: Arc<Mutex<ReplayBuffer>>,
    }
}

impl<B: Body> TeeBody<B> {
    pub fn new(inner: B, buffer: Arc<Mutex<ReplayBuffer>>) -> Self {
        if inner.is_end_stream() {
            lock(&buffer).complete = true;
        }
        TeeBody { inner, buffer }
    }
}

fn lock(buffer: &Mutex<ReplayBuffer>) -> std::sync::MutexGuard<'_, ReplayBuffer> {
    buffer.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut buf = lock(this.buffer);
                match frame.data_ref() {
                    Some(data) => buf.record(data),
                    None => buf.given_up = true, // trailers: not worth replaying
                }
                // hyper stops polling once a sized body reports its end; it may never see `None`.
                if this.inner.is_end_stream() {
                    buf.complete = true;
                }
            }
            Poll::Ready(None) => lock(this.buffer).complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A body that yields the given chunks, one frame each.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn small_body_is_replayable_byte_for_byte() {
        let buf = ReplayBuffer::new(10, &SizeHint::default());
        let body = TeeBody::new(chunks(&["abc", "def"]), buf.clone());
        assert!(
            buf.lock().unwrap().replayable().is_none(),
            "not complete before it is read"
        );
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(read, "abcdef");
        assert_eq!(buf.lock().unwrap().replayable().unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn large_body_is_not_kept() {
        let buf = ReplayBuffer::new(4, &SizeHint::default());
        let body = TeeBody::new(chunks(&["abc", "def"]), buf.clone());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdef");
        let b = buf.lock().unwrap();
        assert!(b.replayable().is_none());
        assert!(b.chunks.is_empty());
    }
}
