//! A live session's feed to its watchers, bounded in bytes per watcher.
//!
//! `watch` shows an auditor a session as it happens. The auditor's client may read
//! slowly or not at all (a window that stays shut, a laptop lid closed), and the
//! session may be a bulk copy. Each watcher therefore has a queue of its own whose
//! bytes are counted: up to [`WATCH_ALLOWANCE`] is the watcher's own, more (up to
//! [`WATCH_BYTES`]) is charged to the bastion's memory budget (`[limits]
//! relay_memory`). A chunk that does not fit is not queued; the watcher is told
//! how many it missed, in order, before the next chunk that fits. The session
//! never waits for a watcher.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::transcript::Chunk;
use crate::budget::{Account, Budget};

/// What one watcher may have queued before it misses chunks.
pub const WATCH_BYTES: usize = 4 * 1024 * 1024;

/// What one watcher may have queued without charging the memory budget.
pub const WATCH_ALLOWANCE: usize = 256 * 1024;

/// What a watcher receives, in the session's order.
#[derive(Debug)]
pub enum Watched {
    Chunk(Chunk),
    /// This many chunks came here that the watcher did not have room for.
    Missed(u64),
}

/// The sending side: every watcher of one session (none while nobody watches,
/// which costs nothing).
#[derive(Default)]
pub(super) struct Watchers {
    each: Vec<Watcher>,
}

/// One watcher, as the session sees it.
struct Watcher {
    sender: mpsc::UnboundedSender<Watched>,
    backlog: Arc<Mutex<Backlog>>,
    /// Chunks not queued since the last one that was.
    missed: u64,
}

/// What a watcher has queued and not read yet, shared by both sides.
struct Backlog {
    bytes: usize,
    account: Account,
}

impl Backlog {
    /// Takes `cost` more bytes if they fit under [`WATCH_BYTES`] and the budget.
    fn take(&mut self, cost: usize) -> bool {
        let total = self.bytes + cost;
        let fits = total <= WATCH_BYTES && self.account.hold(total);
        if fits {
            self.bytes = total;
        }
        fits
    }

    fn release(&mut self, cost: usize) {
        self.bytes -= cost;
        self.account.hold(self.bytes);
    }
}

impl Watchers {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.each.is_empty()
    }

    /// A new watcher, charging beyond its allowance to `memory`.
    pub fn join(&mut self, memory: Arc<Budget>) -> Feed {
        let (sender, receiver) = mpsc::unbounded_channel();
        let backlog = Arc::new(Mutex::new(Backlog {
            bytes: 0,
            account: Account::new(memory, WATCH_ALLOWANCE),
        }));
        self.each.push(Watcher {
            sender,
            backlog: backlog.clone(),
            missed: 0,
        });
        Feed { receiver, backlog }
    }

    /// Queues `chunk` for every watcher that has room, counts it as missed for
    /// the others, and forgets the watchers that left.
    pub fn send(&mut self, chunk: &Chunk) {
        self.each.retain_mut(|watcher| watcher.send(chunk));
    }
}

impl Watcher {
    /// False once the watcher has left.
    fn send(&mut self, chunk: &Chunk) -> bool {
        let cost = cost_of(chunk);
        if !self.backlog.lock().expect("watch lock poisoned").take(cost) {
            self.missed += 1;
            return !self.sender.is_closed();
        }
        if self.missed > 0 {
            let missed = std::mem::take(&mut self.missed);
            if self.sender.send(Watched::Missed(missed)).is_err() {
                return false;
            }
        }
        self.sender.send(Watched::Chunk(chunk.clone())).is_ok()
    }
}

impl Drop for Watcher {
    /// The session ended (or the watcher left): what it missed last is still said.
    fn drop(&mut self) {
        if self.missed > 0 {
            let _ = self.sender.send(Watched::Missed(self.missed));
        }
    }
}

/// The receiving side: one watcher's feed.
pub struct Feed {
    receiver: mpsc::UnboundedReceiver<Watched>,
    backlog: Arc<Mutex<Backlog>>,
}

impl Feed {
    /// The next chunk or count of missed chunks; `None` once the session has
    /// ended and everything queued was read. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Watched> {
        let watched = self.receiver.recv().await?;
        if let Watched::Chunk(chunk) = &watched {
            (self.backlog.lock().expect("watch lock poisoned")).release(cost_of(chunk));
        }
        Some(watched)
    }

    /// Bytes queued for this watcher and not read yet.
    pub fn queued(&self) -> usize {
        self.backlog.lock().expect("watch lock poisoned").bytes
    }
}

/// What a queued chunk holds: its bytes and its slot.
fn cost_of(chunk: &Chunk) -> usize {
    std::mem::size_of::<Watched>() + chunk.data.len()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::record::Stream;

    fn chunk(bytes: usize) -> Chunk {
        Chunk {
            offset_us: 0,
            stream: Stream::Stdout,
            data: Bytes::from(vec![b'x'; bytes]),
        }
    }

    /// What a feed holds right now, read without waiting.
    fn drain(feed: &mut Feed) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(watched) = feed.receiver.try_recv() {
            if let Watched::Chunk(chunk) = &watched {
                (feed.backlog.lock().unwrap()).release(cost_of(chunk));
            }
            seen.push(match watched {
                Watched::Chunk(chunk) => format!("chunk {}", chunk.data.len()),
                Watched::Missed(n) => format!("missed {n}"),
            });
        }
        seen
    }

    #[test]
    fn a_watcher_that_reads_nothing_holds_at_most_its_bound() {
        let budget = Budget::new(64 * 1024 * 1024);
        let mut watchers = Watchers::default();
        let feed = watchers.join(budget.clone());
        for _ in 0..1000 {
            watchers.send(&chunk(32 * 1024));
        }
        assert!(feed.queued() <= WATCH_BYTES, "{} queued", feed.queued());
        assert!(
            feed.queued() > WATCH_BYTES - 64 * 1024,
            "it filled its bound"
        );
        assert_eq!(budget.used(), feed.queued() - WATCH_ALLOWANCE);
        drop(feed);
        watchers.send(&chunk(1));
        assert!(watchers.is_empty(), "a watcher that left is forgotten");
        assert_eq!(budget.used(), 0, "and its charge refunded");
    }

    #[test]
    fn missed_chunks_are_reported_in_order_and_at_the_end() {
        let budget = Budget::new(0); // the allowance only
        let mut watchers = Watchers::default();
        let mut feed = watchers.join(budget);
        let big = WATCH_ALLOWANCE / 2 - std::mem::size_of::<Watched>(); // two fill it
        for _ in 0..3 {
            watchers.send(&chunk(big)); // the third does not fit
        }
        assert_eq!(
            drain(&mut feed),
            [format!("chunk {big}"), format!("chunk {big}")]
        );
        watchers.send(&chunk(10));
        watchers.send(&chunk(WATCH_ALLOWANCE)); // missed: 10 bytes still queued
        assert_eq!(drain(&mut feed), ["missed 1", "chunk 10"]);
        drop(watchers); // the session ended
        assert_eq!(drain(&mut feed), ["missed 1"]);
    }

    #[tokio::test]
    async fn the_feed_ends_after_what_was_queued() {
        let mut watchers = Watchers::default();
        let mut feed = watchers.join(Budget::new(0));
        watchers.send(&chunk(3));
        drop(watchers);
        assert!(matches!(feed.recv().await, Some(Watched::Chunk(c)) if c.data.len() == 3));
        assert!(feed.recv().await.is_none());
        assert_eq!(feed.queued(), 0);
    }
}
