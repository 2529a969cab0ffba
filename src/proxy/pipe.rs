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
//! may take up to [`OVERDRAFT_LIMIT`] bytes instead of [`PIPE_LIMIT`], so the loop keeps
//! reading and keeps sending our output. The overdraft is bounded: a peer that floods
//! us while never reading what we send is held at the limit. 64 MiB carried `cat` of
//! 300 MB and 1 GB on loopback without a stall (peak RSS 140 MB); this is the price of
//! russh's read-time windows, written down in the README.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use russh::{ChannelMsg, ChannelReadHalf};
use tokio::sync::Notify;

/// Bytes one relay direction holds between its reader and its writer.
pub const PIPE_LIMIT: usize = 4 * 1024 * 1024;
/// What a pipe may hold while the opposite direction's writer is stalled.
pub const OVERDRAFT_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the sender: bytes were consumed or the overdraft opened.
    room: Notify,
    /// Wakes the receiver: a message arrived or the sender left.
    ready: Notify,
    /// Set while the *other* direction's writer cannot finish a write at once.
    overdraft: AtomicBool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(ChannelMsg, usize)>,
    bytes: usize,
    closed: bool,
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

/// A new empty pipe.
pub fn pipe() -> (PipeTx, PipeRx) {
    let shared = Arc::new(Shared::default());
    (
        PipeTx {
            shared: shared.clone(),
        },
        PipeRx { shared },
    )
}

fn size_of(msg: &ChannelMsg) -> usize {
    match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len(),
        _ => 0,
    }
}

impl PipeTx {
    /// Queues `msg`, waiting while the pipe is full. False when the receiver is gone.
    pub async fn send(&self, msg: ChannelMsg) -> bool {
        let size = size_of(&msg);
        let mut msg = Some(msg);
        loop {
            let room = self.shared.room.notified();
            {
                let mut state = self.shared.state.lock().expect("pipe lock poisoned");
                if state.closed {
                    return false;
                }
                let limit = if self.shared.overdraft.load(Ordering::Acquire) {
                    OVERDRAFT_LIMIT
                } else {
                    PIPE_LIMIT
                };
                if state.bytes == 0 || state.bytes + size <= limit {
                    state.bytes += size;
                    state
                        .queue
                        .push_back((msg.take().expect("sent once"), size));
                    drop(state);
                    self.shared.ready.notify_one();
                    return true;
                }
            }
            room.await;
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
            self.shared.state.lock().expect("pipe lock poisoned").bytes -= size;
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
    pub fn open(&self) {
        self.shared.overdraft.store(true, Ordering::Release);
        self.shared.room.notify_one();
    }

    pub fn close(&self) {
        self.shared.overdraft.store(false, Ordering::Release);
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
    use std::time::Duration;

    fn data(n: usize) -> ChannelMsg {
        ChannelMsg::Data {
            data: Bytes::from(vec![0u8; n]),
        }
    }

    async fn blocks(tx: &PipeTx, msg: ChannelMsg) -> bool {
        tokio::time::timeout(Duration::from_millis(50), tx.send(msg))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_full_pipe_makes_the_sender_wait_until_bytes_are_written_on() {
        let (tx, mut rx) = pipe();
        assert!(tx.send(data(PIPE_LIMIT - 10)).await);
        assert!(tx.send(ChannelMsg::Eof).await, "control messages are free");
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
    async fn the_overdraft_admits_more_until_its_own_limit() {
        let (tx, _rx) = pipe();
        assert!(tx.send(data(PIPE_LIMIT)).await);
        assert!(blocks(&tx, data(1024)).await);
        tx.overdraft().open();
        assert!(tx.send(data(OVERDRAFT_LIMIT - PIPE_LIMIT)).await);
        assert!(blocks(&tx, data(1)).await, "the overdraft is bounded too");
    }

    #[tokio::test]
    async fn ends_when_either_side_leaves() {
        let (tx, mut rx) = pipe();
        assert!(tx.send(data(3)).await);
        drop(tx);
        let mut held = 0;
        assert!(
            rx.recv(&mut held).await.is_some(),
            "queued messages are still delivered"
        );
        assert!(rx.recv(&mut held).await.is_none());
        let (tx, rx) = pipe();
        drop(rx);
        assert!(!tx.send(data(3)).await);
    }
}
