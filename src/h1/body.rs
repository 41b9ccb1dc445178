//! A response body read straight off the upstream connection, in whichever task polls it
//! (the app connection's own: no channel, no second task). When the body is complete the
//! connection goes back to its pool, before the last frame is handed on: hyper stops
//! polling a body as soon as it reports its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::pool::{Conn, Pool};
use super::wire::{Chunked, Decoded, Framing, WireError};

pub struct ResponseBody {
    /// `None` once the body is complete.
    conn: Option<Conn>,
    pool: Arc<Pool>,
    framing: State,
    /// The connection may carry another request once the body is read.
    keep_alive: bool,
    /// A failure held back for one poll (see [`ResponseBody::fail`]).
    failed: Option<BodyError>,
}

enum State {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream closed the connection before the end of the response body")]
    Truncated,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("reading the response body: {0}")]
    Io(#[from] std::io::Error),
}

impl ResponseBody {
    /// The body framed by `framing` on `conn` (whose buffer may hold its first bytes).
    pub fn new(conn: Conn, pool: Arc<Pool>, framing: Framing, keep_alive: bool) -> ResponseBody {
        let state = match framing {
            Framing::Empty => State::Length(0),
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::default()),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = ResponseBody {
            conn: Some(conn),
            pool,
            framing: state,
            keep_alive,
            failed: None,
        };
        if matches!(body.framing, State::Length(0)) {
            body.complete();
        }
        body
    }

    /// The body is read to its end: the connection is reusable (if the upstream agreed).
    fn complete(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive {
                self.pool.checkin(conn);
            }
        }
    }

    /// End the body with `error`, but only on the next poll: hyper's server sends what it
    /// has buffered (the head, the data so far) when a body is pending, and would drop it
    /// if the error came at once. The app then sees the response start and break off, as
    /// it happened, rather than a connection that closed with no response at all.
    fn fail(
        &mut self,
        cx: &mut Context<'_>,
        error: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None; // closed, never reused
        self.failed = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Read more from the connection; `false` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<bool, BodyError>> {
        let conn = self.conn.as_mut().expect("filled only while incomplete");
        conn.buf.reserve(want.clamp(1, super::READ_SIZE));
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.io),
            cx,
            &mut conn.buf
        ));
        Poll::Ready(read.map(|n| n > 0).map_err(BodyError::from))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let take = (conn.buf.len() as u64).min(*left) as usize;
                        let data = conn.buf.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.complete();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = (*left).min(usize::MAX as u64) as usize;
                    match ready!(this.poll_fill(cx, want)) {
                        Ok(true) => {}
                        Ok(false) => return this.fail(cx, BodyError::Truncated),
                        Err(e) => return this.fail(cx, e),
                    }
                }
                State::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Trailers(t)) => {
                        this.complete();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::End) => {
                        this.complete();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => match ready!(this.poll_fill(cx, super::READ_SIZE)) {
                        Ok(true) => {}
                        Ok(false) => return this.fail(cx, BodyError::Truncated),
                        Err(e) => return this.fail(cx, e),
                    },
                    Err(e) => return this.fail(cx, e.into()),
                },
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx, super::READ_SIZE)) {
                        Ok(true) => {}
                        Ok(false) => {
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Err(e) => return this.fail(cx, e),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.framing) {
            (None, _) if self.failed.is_some() => SizeHint::default(),
            (None, _) => SizeHint::with_exact(0),
            (Some(_), State::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    /// A body dropped unread (a 401 about to be replayed, say) still frees its connection
    /// for reuse when what is left of it is already buffered.
    fn drop(&mut self) {
        if let (Some(conn), State::Length(left)) = (&mut self.conn, &self.framing) {
            if conn.buf.len() as u64 == *left {
                conn.buf.clear();
                self.complete();
            }
        }
    }
}
