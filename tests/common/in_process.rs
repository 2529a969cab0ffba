//! A bastion running inside the test's own process, through the same
//! `portcullis::server::run` as `portcullis serve`, on a loopback port the kernel
//! picks. Tests use it with tokio's paused clock (`start_paused`): every timer of
//! the bastion is tokio's, and its grant service reads the time from a clock that
//! follows tokio's (`Clock::following_tokio`), so a grant's hour passes, timestamps
//! and expiry sweep included, as fast as the runtime idles.
//!
//! Recordings, audit event times of sessions, TOTP and certificates stay on the
//! wall clock.

use super::*;

use std::sync::Arc;

use portcullis::session::State;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A bastion in this process, on the config and data directory of a world's
/// directory; stopped (drained, database flushed) by [`InProcess::stop`], aborted
/// on drop.
pub struct InProcess {
    pub state: Arc<State>,
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    _lock: portcullis::datadir::Lock,
}

impl InProcess {
    /// Opens the bastion of `dir` (as [`World::prepare`] leaves it) and serves it
    /// on a fresh loopback port.
    pub async fn start(dir: &Path) -> InProcess {
        let config = Bastion::write_config(dir, 0);
        let config = portcullis::config::Config::load(Some(&config)).expect("load the config");
        let clock = portcullis::grant::Clock::following_tokio();
        let (state, lock) =
            portcullis::server::open_with_clock(config, clock).expect("open the bastion");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(portcullis::server::run(listener, state.clone(), async {
            let _ = stopped.await;
        }));
        InProcess {
            state,
            port,
            stop: Some(stop),
            task,
            _lock: lock,
        }
    }

    /// Shuts the bastion down the way SIGTERM does and waits until it stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .expect("the bastion task")
            .expect("the bastion stopped cleanly");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `work` with tokio's paused clock held still, for the steps that wait on
/// processes outside the runtime (the real sshd): auto-advance would otherwise jump
/// to the bastion's next timeout (the 10 s upstream handshake) before they answer.
/// Tokio does not auto-advance while a blocking task runs; one runs until `work` is
/// done.
pub async fn with_clock_held<T>(work: impl std::future::Future<Output = T>) -> T {
    let (release, held) = mpsc::channel::<()>();
    let holder = tokio::task::spawn_blocking(move || {
        let _ = held.recv();
    });
    let out = work.await;
    drop(release);
    holder.await.expect("the clock holder");
    out
}

/// Whether a process with exactly these arguments runs on this machine (the command
/// a test started on the target, with arguments no other test uses).
pub fn process_running(args: &[&str]) -> bool {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == wanted))
}
