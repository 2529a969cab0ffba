//! A FIFO of channel messages bounded by the bytes it holds, with an overdraft that
//! breaks russh's cross-direction deadlock.
//!
//! russh renews SSH windows as soon as it *reads* a packet, not when we consume it, so
//! its only backpressure is a per-channel queue that blocks the connection's reader
//! loop when full. That loop also carries the client's window adjustments for the
//! opposite direction. With `cat` on the target: stdin fills the pipe to the target,
//! the client's reader loop blocks, the client's window adjustment for stdout sits
//! unread behind the stdin bytes, our writer to the client waits for it forever, the
//! target's stdout backs up, `cat` stops reading stdin, and nothing moves again (seen
//! with 300 MB).
//!
//! The way out: while the writer of the opposite direction cannot finish a write at
//! once (the peer's window is shut, or the peer's connection loop is busy), this pipe
//! may overdraw beyond [`PIPE_LIMIT`], up to [`OVERDRAFT_LIMIT`], so the loop keeps
//! reading and reaches the window adjustment we wait for. The overdraft is charged to
//! the bastion-wide [`Budget`] (`[limits] relay_memory`): when that is spent, no pipe
//! overdraws until some overdraft is written on. And it is only granted while the
//! other peer makes progress: a write that has waited [`PROGRESS_GRACE`] means a
//! peer that reads nothing, and overdrawing for it would only pin memory (a client
//! that floods its input while never reading output would otherwise hold the whole
//! overdraft for as long as its session lasts).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::{ChannelMsg, ChannelReadHalf, Sig};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::budget::{Account, Budget};

/// Bytes one relay direction holds between its reader and its writer, its own
/// allowance (every message counted with its queue slot, see [`cost_of`]). Small: a pipe only has to cover the moment between a read and the
/// next write, and a session whose client reads nothing pins it (with 4 MiB, 100
/// such sessions took 173 MiB; with 256 KiB, 117 MiB, half of it the sessions'
/// connections themselves; `benches/soak.rs`).
pub const PIPE_LIMIT: usize = 256 * 1024;
/// What a pipe may hold, overdraft included, while the opposite direction's writer
/// is stalled (64 MiB carried `cat` of 300 MB and 1 GB both ways on loopback).
pub const OVERDRAFT_LIMIT: usize = 64 * 1024 * 1024;
/// How long one stalled write keeps the opposite pipe's overdraft open: a healthy
/// peer's window adjustment arrives within a round trip once the loop reads on.
pub const PROGRESS_GRACE: Duration = Duration::from_secs(5);

struct Shared {
    state: Mutex<State>,
    budget: Arc<Budget>,
    /// Wakes the sender: bytes were consumed or the overdraft opened.
    room: Notify,
    /// Wakes the receiver: a message arrived or the sender left.
    ready: Notify,
}

struct State {
    queue: VecDeque<(ChannelMsg, usize)>,
    bytes: usize,
    /// The bytes over [`PIPE_LIMIT`], charged to the budget.
    account: Account,
    /// When the *other* direction's writer began the write it is stalled on.
    stalled_since: Option<Instant>,
    closed: bool,
}

impl State {
    /// Whether `size` more bytes fit: in the pipe's own allowance, or as an
    /// overdraft while the other direction is stalled and still within its grace.
    fn admits(&mut self, size: usize) -> Admits {
        let total = self.bytes + size;
        if self.bytes == 0 || total <= PIPE_LIMIT {
            return Admits::Yes;
        }
        let overdrawing = self
            .stalled_since
            .is_some_and(|since| since.elapsed() < PROGRESS_GRACE);
        if !overdrawing || total > OVERDRAFT_LIMIT {
            Admits::NoRoom
        } else if self.account.hold(total) {
            Admits::Yes
        } else {
            Admits::NoBudget
        }
    }
}

enum Admits {
    Yes,
    NoRoom,
    NoBudget,
}

pub struct PipeTx {
    shared: Arc<Shared>,
}

pub struct PipeRx {
    shared: Arc<Shared>,
}

/// Lets the writer of one direction open the other direction's overdraft.
pub struct Overdraft {
    shared: Arc<Shared>,
}

/// A new empty pipe whose overdraft is charged to `budget`.
pub fn pipe(budget: &Arc<Budget>) -> (PipeTx, PipeRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            bytes: 0,
            account: Account::new(budget.clone(), PIPE_LIMIT),
            stalled_since: None,
            closed: false,
        }),
        budget: budget.clone(),
        room: Notify::new(),
        ready: Notify::new(),
    });
    (
        PipeTx {
            shared: shared.clone(),
        },
        PipeRx { shared },
    )
}

/// What one queued message costs the pipe: its queue slot plus the heap bytes it
/// carries. Nothing is free: a client can send bodiless messages (window changes,
/// empty data) and signals with long custom names as fast as it likes, and behind a
/// stalled write a pipe that counted only data would queue them without bound.
fn cost_of(msg: &ChannelMsg) -> usize {
    const SLOT: usize = std::mem::size_of::<(ChannelMsg, usize)>();
    let heap = match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len(),
        ChannelMsg::Signal { signal } => signal_bytes(signal),
        ChannelMsg::ExitSignal {
            signal_name,
            error_message,
            lang_tag,
            ..
        } => signal_bytes(signal_name) + error_message.len() + lang_tag.len(),
        ChannelMsg::Exec { command, .. } => command.len(),
        ChannelMsg::RequestSubsystem { name, .. } => name.len(),
        ChannelMsg::SetEnv {
            variable_name,
            variable_value,
            ..
        } => variable_name.len() + variable_value.len(),
        ChannelMsg::RequestPty {
            term,
            terminal_modes,
            ..
        } => term.len() + std::mem::size_of_val(terminal_modes.as_slice()),
        ChannelMsg::RequestX11 {
            x11_authentication_protocol,
            x11_authentication_cookie,
            ..
        } => x11_authentication_protocol.len() + x11_authentication_cookie.len(),
        _ => 0,
    };
    SLOT + heap
}

fn signal_bytes(signal: &Sig) -> usize {
    match signal {
        Sig::Custom(name) => name.len(),
        _ => 0,
    }
}

impl PipeTx {
    /// Queues `msg`, waiting while the pipe is full. False when the receiver is gone.
    pub async fn send(&self, msg: ChannelMsg) -> bool {
        let size = cost_of(&msg);
        let mut msg = Some(msg);
        loop {
            let room = self.shared.room.notified();
            let freed = self.shared.budget.freed();
            let admits = {
                let mut state = self.shared.state.lock().expect("pipe lock poisoned");
                if state.closed {
                    return false;
                }
                let admits = state.admits(size);
                if let Admits::Yes = admits {
                    state.bytes += size;
                    state
                        .queue
                        .push_back((msg.take().expect("sent once"), size));
                }
                admits
            };
            match admits {
                Admits::Yes => {
                    self.shared.ready.notify_one();
                    return true;
                }
                Admits::NoRoom => room.await,
                Admits::NoBudget => tokio::select! {
                    _ = room => {}
                    _ = freed => {}
                },
            }
        }
    }

    /// The switch the opposite direction's writer uses to open this pipe's overdraft.
    pub fn overdraft(&self) -> Overdraft {
        Overdraft {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for PipeTx {
    fn drop(&mut self) {
        self.shared.state.lock().expect("pipe lock poisoned").closed = true;
        self.shared.ready.notify_one();
    }
}

impl PipeRx {
    /// The next message; None once the sender has finished and the pipe is empty.
    /// The message's bytes count against the pipe until the next call, i.e. until the
    /// caller has written it on.
    pub async fn recv(&mut self, previous_size: &mut usize) -> Option<ChannelMsg> {
        self.release(std::mem::take(previous_size));
        loop {
            let ready = self.shared.ready.notified();
            {
                let mut state = self.shared.state.lock().expect("pipe lock poisoned");
                if let Some((msg, size)) = state.queue.pop_front() {
                    *previous_size = size;
                    return Some(msg);
                }
                if state.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    fn release(&self, size: usize) {
        if size > 0 {
            let mut state = self.shared.state.lock().expect("pipe lock poisoned");
            state.bytes -= size;
            let total = state.bytes;
            state.account.hold(total); // shrinking: refunds any overdraft written on
            drop(state);
            self.shared.room.notify_one();
        }
    }
}

impl Drop for PipeRx {
    fn drop(&mut self) {
        self.shared.state.lock().expect("pipe lock poisoned").closed = true;
        self.shared.room.notify_one();
    }
}

impl Overdraft {
    /// The other direction's writer is stalled from now on.
    pub fn open(&self) {
        self.shared
            .state
            .lock()
            .expect("pipe lock poisoned")
            .stalled_since = Some(Instant::now());
        self.shared.room.notify_one();
    }

    /// The stalled write finished: the peer made progress.
    pub fn close(&self) {
        self.shared
            .state
            .lock()
            .expect("pipe lock poisoned")
            .stalled_since = None;
    }
}

/// Moves everything from a russh channel queue into `pipe` until the channel closes.
/// `on_eof` runs as soon as the peer's EOF is read, ahead of any data still queued.
pub async fn drain(mut reader: ChannelReadHalf, pipe: PipeTx, on_eof: impl Fn()) -> Drained {
    while let Some(msg) = reader.wait().await {
        if matches!(msg, ChannelMsg::Eof) {
            on_eof();
        }
        let last = matches!(msg, ChannelMsg::Close);
        if !pipe.send(msg).await || last {
            return Drained::Closed;
        }
    }
    Drained::Gone
}

/// How a drained channel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The peer closed the channel (or the other side stopped listening).
    Closed,
    /// The channel vanished without a close: its connection is gone.
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn data(n: usize) -> ChannelMsg {
        ChannelMsg::Data {
            data: Bytes::from(vec![0u8; n]),
        }
    }

    fn plenty() -> Arc<Budget> {
        Budget::new(usize::MAX / 2)
    }

    async fn blocks(tx: &PipeTx, msg: ChannelMsg) -> bool {
        tokio::time::timeout(Duration::from_millis(50), tx.send(msg))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_full_pipe_makes_the_sender_wait_until_bytes_are_written_on() {
        let (tx, mut rx) = pipe(&plenty());
        let slot = cost_of(&ChannelMsg::Eof);
        assert!(tx.send(data(PIPE_LIMIT - 2 * slot)).await);
        assert!(tx.send(ChannelMsg::Eof).await, "a control message fits");
        assert!(blocks(&tx, data(20)).await, "over the limit");
        let mut held = 0;
        assert!(matches!(
            rx.recv(&mut held).await,
            Some(ChannelMsg::Data { .. })
        ));
        assert!(
            blocks(&tx, data(20)).await,
            "still counted while being written"
        );
        assert!(
            matches!(rx.recv(&mut held).await, Some(ChannelMsg::Eof)),
            "order is kept"
        );
        assert!(
            tx.send(data(20)).await,
            "room again once the chunk was written"
        );
    }

    #[tokio::test]
    async fn bodiless_messages_and_signal_names_count_against_the_pipe() {
        // Behind a write the target never lets finish, a client may send window
        // changes, empty data and signals with long custom names at wire speed.
        let (tx, _rx) = pipe(&plenty());
        let name = "X".repeat(32 * 1024);
        let signal = || ChannelMsg::Signal {
            signal: Sig::Custom(name.clone()),
        };
        let mut queued = 0;
        while !blocks(&tx, signal()).await {
            queued += 1;
            assert!(
                queued <= PIPE_LIMIT / name.len(),
                "{queued} signals of {} bytes queued past the pipe's limit",
                name.len()
            );
        }
        let (tx, _rx) = pipe(&plenty());
        let mut queued = 0;
        while !blocks(&tx, data(0)).await {
            queued += 1;
            assert!(queued <= PIPE_LIMIT, "{queued} empty messages queued");
        }
    }

    #[tokio::test]
    async fn the_overdraft_admits_more_until_its_own_limit() {
        let (tx, _rx) = pipe(&plenty());
        let slot = cost_of(&ChannelMsg::Eof);
        assert!(tx.send(data(PIPE_LIMIT - slot)).await);
        assert!(blocks(&tx, data(1024)).await);
        tx.overdraft().open();
        assert!(tx.send(data(OVERDRAFT_LIMIT - PIPE_LIMIT - slot)).await);
        assert!(blocks(&tx, data(1)).await, "the overdraft is bounded too");
    }

    #[tokio::test(start_paused = true)]
    async fn no_overdraft_once_the_other_peer_stopped_making_progress() {
        let (tx, _rx) = pipe(&plenty());
        assert!(tx.send(data(PIPE_LIMIT)).await);
        let overdraft = tx.overdraft();
        overdraft.open();
        assert!(tx.send(data(1024)).await, "a fresh stall may overdraw");
        tokio::time::advance(PROGRESS_GRACE).await;
        assert!(
            blocks(&tx, data(1024)).await,
            "a write stalled for the whole grace means a peer that reads nothing"
        );
        overdraft.close();
        overdraft.open();
        assert!(
            tx.send(data(1024)).await,
            "progress (the write finished) opens it again"
        );
    }

    #[tokio::test]
    async fn overdrafts_share_one_budget_and_refund_it_when_written_on() {
        let budget = Budget::new(1024 * 1024);
        let (first, mut first_rx) = pipe(&budget);
        let (second, _second_rx) = pipe(&budget);
        let slot = cost_of(&ChannelMsg::Eof);
        for pipe in [&first, &second] {
            assert!(pipe.send(data(PIPE_LIMIT - slot)).await);
            pipe.overdraft().open();
        }
        assert!(first.send(data(1024 * 1024 - slot)).await);
        assert_eq!(budget.used(), 1024 * 1024);
        assert!(
            blocks(&second, data(1)).await,
            "the budget is spent: no other pipe overdraws"
        );
        let waiting = tokio::spawn(async move { second.send(data(4096)).await });
        let mut held = 0;
        first_rx.recv(&mut held).await;
        first_rx.recv(&mut held).await; // the first chunk is written on
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the refund wakes the waiting pipe")
            .unwrap());
        drop((first, first_rx));
        assert_eq!(
            budget.used(),
            4096 + slot,
            "only the second pipe's overdraft is left"
        );
    }

    #[tokio::test]
    async fn ends_when_either_side_leaves() {
        let (tx, mut rx) = pipe(&plenty());
        assert!(tx.send(data(3)).await);
        drop(tx);
        let mut held = 0;
        assert!(
            rx.recv(&mut held).await.is_some(),
            "queued messages are still delivered"
        );
        assert!(rx.recv(&mut held).await.is_none());
        let (tx, rx) = pipe(&plenty());
        drop(rx);
        assert!(!tx.send(data(3)).await);
    }
}
