//! Where connections run: a few single-threaded runtimes, one per core, each
//! carrying the connections it is given whole, from the handshake to the close.
//!
//! Why not the multi-threaded runtime for them: a keystroke through the bastion
//! wakes the tasks of its session in turn (the client's transport, the relay, the
//! upstream transport, and back). On a work-stealing runtime those wakes move
//! between worker threads, each move a futex wake and often an interrupt to the
//! other core; with 100 sessions typing, that was about a sixth of the bastion's
//! CPU (README, Performance, Load, "One runtime per core"). On a shard, the tasks
//! of a connection wake each other on one thread. Each new connection goes to
//! the shard that carries the fewest. What this gives up: a connection never
//! moves, so one that keeps a core busy (a bulk copy) slows the others on its
//! shard while the other core may idle, where work stealing would have spread
//! them.
//!
//! Nothing on a shard may block: a synchronous store call from a connection's
//! async code goes to the shard's blocking pool (`State::blocking`,
//! `Grants::run`, `spawn_blocking`).
//!
//! The rest of the bastion (accepting, the background jobs, the metrics thread)
//! stays on the runtime `serve` was started on.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long a stopping shard waits for its blocking work (a store write under
/// way) before it lets the process exit without it.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Blocking threads of all shards together: the multi-threaded runtime's
/// default (512), shared out between them. A shard's pool is its own: one whose
/// threads all wait on a slow database does not take the other's.
const BLOCKING_THREADS: usize = 512;

/// The runtimes connections run on.
pub struct Shards {
    shards: Vec<Shard>,
}

struct Shard {
    handle: Handle,
    /// Connections the shard carries now.
    carried: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Shards {
    /// `count` runtimes, each on a thread of its own named `shard-N`. Dropping
    /// them stops them and waits for their threads: do it where blocking is
    /// allowed (`spawn_blocking`).
    pub fn start(count: usize) -> Result<Shards> {
        let count = count.max(1);
        let shards = (0..count)
            .map(|n| Shard::start(n, (BLOCKING_THREADS / count).max(1)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Shards { shards })
    }

    /// One shard per core the process may run on.
    pub fn per_core() -> Result<Shards> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Shards::start(cores)
    }

    /// No shards: connections run on the caller's runtime (a test's bastion on
    /// tokio's paused clock, whose timers must be that runtime's).
    pub fn none() -> Shards {
        Shards { shards: Vec::new() }
    }

    /// Runs `serve` with `stream` on the shard that carries the fewest
    /// connections (or on the caller's runtime when there are none). The stream
    /// moves to that shard's reactor first.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.shards.is_empty() {
            tokio::spawn(serve(stream));
            return;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot hand a connection to a shard; closing it");
                return;
            }
        };
        let shard = (self.shards.iter())
            .min_by_key(|shard| shard.carried.load(Ordering::Relaxed))
            .expect("at least one shard");
        let carried = Carried::new(&shard.carried);
        shard.handle.spawn(async move {
            let _carried = carried;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => {
                    tracing::warn!(%error, "a shard cannot take a connection; closing it")
                }
            }
        });
    }

    /// The shards' runtimes, for their metrics (a handle does not keep a
    /// stopped shard alive).
    pub fn handles(&self) -> Vec<Handle> {
        self.shards
            .iter()
            .map(|shard| shard.handle.clone())
            .collect()
    }
}

/// One connection counted on its shard for as long as its task lives.
struct Carried(Arc<AtomicUsize>);

impl Carried {
    fn new(count: &Arc<AtomicUsize>) -> Carried {
        count.fetch_add(1, Ordering::Relaxed);
        Carried(count.clone())
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Shards {
    /// Stops every shard's runtime (dropping what still runs on it), then waits
    /// for their threads.
    fn drop(&mut self) {
        for shard in &mut self.shards {
            if let Some(stop) = shard.stop.take() {
                let _ = stop.send(());
            }
        }
        for shard in &mut self.shards {
            if let Some(thread) = shard.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Shard {
    fn start(n: usize, blocking_threads: usize) -> Result<Shard> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(blocking_threads)
            .build()
            .context("cannot start a connection runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("shard-{n}"))
            .spawn(move || {
                // A dropped sender stops the shard as well as a sent stop.
                let _ = runtime.block_on(stopped);
                runtime.shutdown_timeout(STOP_GRACE);
            })
            .context("cannot start a connection thread")?;
        Ok(Shard {
            handle,
            carried: Arc::new(AtomicUsize::new(0)),
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connection handed to a shard is served there (its own thread), with its
    /// bytes intact; each goes to the shard that carries the fewest, counting
    /// only the connections still open.
    #[tokio::test]
    async fn connections_go_to_the_shard_that_carries_the_fewest() {
        let shards = Shards::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Each connection answers one byte, then stays open while `open` is
        // true, and ends (its task with it) once the client closes.
        let mut threads = Vec::new();
        let mut clients = Vec::new();
        for open in [true, false, true, true] {
            let mut client = TcpStream::connect(address).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let (tx, rx) = oneshot::channel();
            let (ended_tx, ended) = oneshot::channel::<()>();
            shards.spawn(server, move |mut stream| async move {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                stream.write_all(&[byte[0] + 1]).await.unwrap();
                let _ = tx.send(std::thread::current().name().map(str::to_string));
                let _ = stream.read(&mut byte).await;
                drop(ended_tx);
            });
            client.write_all(&[41]).await.unwrap();
            let mut answer = [0u8; 1];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(answer[0], 42);
            threads.push(rx.await.unwrap());
            if open {
                clients.push(client);
            } else {
                drop(client);
                let _ = ended.await;
                // The count goes with the task, just after the connection's future.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while shards.shards[1].carried.load(Ordering::Relaxed) > 0 {
                    assert!(std::time::Instant::now() < deadline, "never uncounted");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
        // 1st: both empty, shard-0. 2nd: shard-1, closed at once. 3rd: shard-1
        // carries none again. 4th: one each, the first of the equals.
        let expected = ["shard-0", "shard-1", "shard-1", "shard-0"].map(|n| Some(n.to_string()));
        assert_eq!(threads, expected);
        drop(clients);
        tokio::task::spawn_blocking(move || drop(shards))
            .await
            .unwrap();
    }

    /// Without shards a connection runs on the caller's runtime.
    #[tokio::test]
    async fn without_shards_connections_run_here() {
        let shards = Shards::none();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (tx, rx) = oneshot::channel();
        shards.spawn(server, move |_stream| async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        assert_ne!(rx.await.unwrap().as_deref(), Some("shard-0"));
    }
}
