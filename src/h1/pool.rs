//! Keep-alive connections to one plain-HTTP upstream, for one worker thread: a connection
//! is registered with the event loop of the thread that opened it, and is only ever used
//! there. Idle connections wait in a LIFO (the most recently used is the likeliest alive)
//! and are closed after [`IDLE_TIMEOUT`] by a reaper task that runs only while some wait.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::BytesMut;
use http::uri::Authority;
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// An idle connection is closed after this long (hyper-util's pool: the same).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many idle connections are kept per upstream and worker; more are closed.
pub const MAX_IDLE: usize = 1024;

/// One upstream connection and what has been read from it but not yet used.
pub struct Conn {
    pub io: TcpStream,
    pub buf: BytesMut,
    /// The deadline of the exchange under way. One timer for the connection's life, moved
    /// to each exchange's deadline: moving a registered deadline later is one atomic
    /// operation, where a timer per exchange is a timer-wheel insert and removal.
    pub deadline: Pin<Box<Sleep>>,
}

impl Conn {
    /// A pooled connection the upstream has closed (or written to unasked) is unusable.
    /// Asks the event loop's readiness first: a quiet socket costs no system call.
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct Idles {
    conns: VecDeque<Idle>,
    /// A reaper task is scheduled.
    reaping: bool,
}

pub struct Pool {
    /// Where to connect: the host without IPv6 brackets, and the port.
    host: String,
    port: u16,
    /// The `Host` header the upstream gets (as hyper writes it: port only when not 80).
    pub host_header: HeaderValue,
    pub connect_timeout: Duration,
    /// A write that makes no progress for this long fails (`idle_timeout`).
    pub write_stall: Duration,
    idle: Mutex<Idles>,
    /// For the reaper, which must not keep the pool alive.
    me: Weak<Pool>,
}

impl Pool {
    pub fn new(
        authority: &Authority,
        connect_timeout: Duration,
        write_stall: Duration,
    ) -> Arc<Pool> {
        let port = authority.port_u16().unwrap_or(80);
        let host_header = match authority.port_u16() {
            Some(p) if p != 80 => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        Arc::new_cyclic(|me| Pool {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            host_header: HeaderValue::from_str(&host_header)
                .expect("an authority is a valid header value"),
            connect_timeout,
            write_stall,
            idle: Mutex::new(Idles::default()),
            me: me.clone(),
        })
    }

    fn idles(&self) -> std::sync::MutexGuard<'_, Idles> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open, if any.
    pub fn checkout(&self) -> Option<Conn> {
        let mut idles = self.idles();
        while let Some(idle) = idles.conns.pop_back() {
            if idle.since.elapsed() < IDLE_TIMEOUT && idle.conn.still_open() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Give back a connection whose exchange is complete. One with unread bytes (the
    /// upstream sent more than the response) is closed instead.
    pub fn checkin(&self, mut conn: Conn) {
        if !conn.buf.is_empty() {
            return;
        }
        // An idle connection holds no buffer (its last one may still be shared with body
        // chunks on their way to the app); the next exchange allocates one.
        conn.buf = BytesMut::new();
        let mut idles = self.idles();
        idles.conns.push_back(Idle {
            conn,
            since: Instant::now(),
        });
        if idles.conns.len() > MAX_IDLE {
            idles.conns.pop_front();
        }
        if !idles.reaping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                idles.reaping = true;
                runtime.spawn(reap(self.me.clone()));
            }
        }
    }

    /// A new connection (TCP_NODELAY: heads are written whole, never coalesced).
    pub async fn connect(&self) -> Result<Conn, String> {
        let connecting = TcpStream::connect((self.host.as_str(), self.port));
        let io = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(format!("tcp connect error: {e}")),
            Err(_) => {
                return Err(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                ))
            }
        };
        io.set_nodelay(true)
            .map_err(|e| format!("tcp connect error: {e}"))?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
        })
    }

    /// Close idle connections that timed out or were closed by the upstream. `true` when
    /// none is left (the reaper then stops).
    fn reap(&self) -> bool {
        let mut idles = self.idles();
        idles
            .conns
            .retain(|i| i.since.elapsed() < IDLE_TIMEOUT && i.conn.still_open());
        if idles.conns.is_empty() {
            idles.reaping = false;
            return true;
        }
        false
    }
}

async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        match pool.upgrade() {
            Some(pool) if !pool.reap() => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_for(authority: &str) -> Arc<Pool> {
        let authority: Authority = authority.parse().unwrap();
        Pool::new(&authority, Duration::from_secs(5), Duration::from_secs(5))
    }

    #[test]
    fn the_host_header_carries_the_port_only_when_not_80() {
        assert_eq!(pool_for("api.local").host_header, "api.local");
        assert_eq!(pool_for("api.local:80").host_header, "api.local");
        assert_eq!(pool_for("api.local:8080").host_header, "api.local:8080");
        let v6 = pool_for("[::1]:8080");
        assert_eq!(v6.host_header, "[::1]:8080");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8080));
    }

    #[tokio::test]
    async fn idle_connections_are_reused_until_they_expire_or_the_upstream_closes_them() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pool = pool_for(&listener.local_addr().unwrap().to_string());

        let conn = pool.connect().await.unwrap();
        let (upstream_side, _) = listener.accept().unwrap();
        pool.checkin(conn);
        let again = pool.checkout().expect("a fresh idle connection is reused");
        assert!(pool.checkout().is_none(), "and handed out once");

        // Closed by the upstream while idle: noticed, not reused.
        pool.checkin(again);
        drop(upstream_side);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pool.checkout().is_none());

        // Idle past IDLE_TIMEOUT: closed, not reused.
        let conn = pool.connect().await.unwrap();
        let (_upstream_side, _) = listener.accept().unwrap();
        pool.checkin(conn);
        tokio::time::pause();
        tokio::time::advance(IDLE_TIMEOUT + Duration::from_secs(1)).await;
        assert!(pool.checkout().is_none());
    }

    #[tokio::test]
    async fn a_connection_with_unread_bytes_is_never_pooled() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pool = pool_for(&listener.local_addr().unwrap().to_string());
        let mut conn = pool.connect().await.unwrap();
        let (_upstream_side, _) = listener.accept().unwrap();
        conn.buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        pool.checkin(conn);
        assert!(pool.checkout().is_none());
    }
}
