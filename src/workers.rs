//! The proxy listener served nginx-style: `server.workers` threads, each with its own
//! single-threaded event loop and its own `SO_REUSEPORT` socket on the same address. The
//! kernel spreads connections over the sockets, and a connection lives its whole life on
//! one thread: no work stealing, no cross-thread wake-ups on the request path (measured:
//! benches/compare_nginx.sh, README "Performance"). Token state is shared across threads
//! as before (the refreshers and the admin listener stay on the main runtime).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

thread_local! {
    /// This thread's worker number (1-based); 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The current thread's worker number: 1..=workers on a proxy worker, 0 elsewhere.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Bind `n` listening sockets to `addr` with `SO_REUSEPORT`, so that the kernel spreads
/// new connections evenly over the workers. First the address is bound once *without*
/// `SO_REUSEPORT`: if anything already listens there (another token-proxy included), that
/// fails as a plain bind would, instead of our sockets silently joining its port. A port
/// of 0 is chosen by that first bind. Returned as std listeners, to be registered on each
/// worker's runtime.
pub fn bind(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let new_socket = || {
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    let probe = new_socket()?;
    probe.set_reuseaddr(true)?;
    probe.bind(addr)?;
    let bound = probe.local_addr()?;
    drop(probe);
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = new_socket()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(bound)?;
        listeners.push(socket.listen(1024)?.into_std()?);
    }
    Ok((bound, listeners))
}

/// Tells the supervisor a worker ended, and whether by a panic (sent while unwinding).
struct Ended {
    worker: usize,
    tx: tokio::sync::mpsc::UnboundedSender<(usize, bool)>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.tx.send((self.worker, std::thread::panicking()));
    }
}

/// Run `serve` on each listener, each on its own thread and single-threaded runtime.
/// The returned future completes when every worker has finished, and panics (so that the
/// caller's supervisor reports it) as soon as a worker panics.
pub fn run<F, Fut>(listeners: Vec<std::net::TcpListener>, serve: F) -> impl Future<Output = ()>
where
    F: Fn(TcpListener) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let mut started = 0;
    let mut spawn_error = None;
    for (i, listener) in listeners.into_iter().enumerate() {
        let worker = i + 1;
        let serve = serve.clone();
        let guard = Ended {
            worker,
            tx: tx.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-worker-{worker}"))
            .spawn(move || {
                let _guard = guard;
                WORKER.with(|w| w.set(worker));
                // Request lines are handed to the log writer in batches, shortly after
                // the event loop has nothing left to do (and once more as the worker ends).
                crate::access_log::batch_this_thread();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(crate::access_log::flush_soon)
                    .build()
                    .expect("a worker's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("register the listener");
                    serve(listener).await;
                });
                drop(runtime);
                crate::access_log::flush_thread();
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => spawn_error = Some(e.to_string()),
        }
    }
    async move {
        if let Some(e) = spawn_error {
            panic!("cannot start a proxy worker thread: {e}");
        }
        for _ in 0..started {
            match ended.recv().await {
                Some((worker, true)) => panic!("proxy worker {worker} panicked"),
                Some((_, false)) => {}
                None => return,
            }
        }
    }
}
