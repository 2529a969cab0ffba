//! A live session's feed to its watchers, bounded in bytes per watcher and in
//! watchers per bastion.
//!
//! `watch` shows an auditor a session as it happens. The auditor's client may read
//! slowly or not at all (a window that stays shut, a laptop lid closed), and the
//! session may be a bulk copy. Each watcher therefore has a queue of its own whose
//! bytes are counted, slots included, up to [`WATCH_BYTES`]: a chunk that does not
//! fit is not queued, and the watcher is told how many it missed, in order, before
//! the next chunk that fits. The session never waits for a watcher.
//!
//! Watchers are not charged to `[limits] relay_memory`, which sessions need to make
//! progress: a few stalled watches must not slow every session down. Instead at
//! most [`WATCHES_MAX`] watches of sessions this node carries run at once, at most
//! [`WATCHES_PER_USER`] of them one auditor's, so watchers together hold at most
//! [`WATCHES_MAX`] × [`WATCH_BYTES`] and one auditor cannot take every slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::transcript::Chunk;

/// What one watcher may have queued before it misses chunks.
pub const WATCH_BYTES: usize = 1024 * 1024;

/// Watches of live sessions that may run at once on one bastion.
pub const WATCHES_MAX: usize = 64;

/// Watches of live sessions one auditor may run at once.
pub const WATCHES_PER_USER: usize = 8;

/// What a watcher receives, in the session's order.
#[derive(Debug)]
pub enum Watched {
    Chunk(Chunk),
    /// This many chunks came here that the watcher did not have room for.
    Missed(u64),
}

/// A watch refused for want of a slot.
#[derive(Debug, Error)]
pub enum WatchesFull {
    #[error("{WATCHES_MAX} watches of live sessions are running on this bastion, its limit; try again once one ends, or replay the session")]
    Bastion,
    #[error("you are watching {WATCHES_PER_USER} live sessions, your limit; end one of those watches first, or replay the session")]
    User,
}

/// The bastion's watch slots, shared by every session, and how many each user
/// holds.
#[derive(Clone)]
pub(super) struct Slots {
    bastion: Arc<Semaphore>,
    by_user: Arc<Mutex<HashMap<String, usize>>>,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            bastion: Arc::new(Semaphore::new(WATCHES_MAX)),
            by_user: Arc::default(),
        }
    }
}

impl Slots {
    /// A slot for one watch by `user`, given back when it is dropped.
    pub fn take(&self, user: &str) -> Result<Slot, WatchesFull> {
        let mut by_user = self.by_user.lock().unwrap_or_else(PoisonError::into_inner);
        let held = by_user.entry(user.to_string()).or_default();
        if *held >= WATCHES_PER_USER {
            return Err(WatchesFull::User);
        }
        let permit =
            (self.bastion.clone().try_acquire_owned()).map_err(|_| WatchesFull::Bastion)?;
        *held += 1;
        Ok(Slot {
            _permit: permit,
            slots: self.clone(),
            user: user.to_string(),
        })
    }
}

/// One watch's slot.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: Slots,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_user = (self.slots.by_user.lock()).unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = by_user.get_mut(&self.user) {
            *held -= 1;
            if *held == 0 {
                by_user.remove(&self.user);
            }
        }
    }
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
    /// Bytes queued and not read yet, shared with the watcher's [`Feed`].
    queued: Arc<AtomicUsize>,
    /// Chunks not queued since the last one that was.
    missed: u64,
}

impl Watchers {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.each.is_empty()
    }

    /// A new watcher, holding one of the bastion's watch slots while it watches.
    pub fn join(&mut self, slot: Slot) -> Feed {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.each.push(Watcher {
            sender,
            queued: queued.clone(),
            missed: 0,
        });
        Feed {
            receiver,
            queued,
            _slot: slot,
        }
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
        if self.sender.is_closed() {
            return false;
        }
        // Only this side adds, so what it reads can only have shrunk since.
        let queued = self.queued.load(Ordering::Acquire);
        let marker = if self.missed > 0 { SLOT } else { 0 };
        let cost = cost_of(chunk) + marker;
        if queued + cost > WATCH_BYTES {
            self.missed += 1;
            return true;
        }
        self.queued.fetch_add(cost, Ordering::AcqRel);
        if self.missed > 0 {
            let missed = std::mem::take(&mut self.missed);
            let _ = self.sender.send(Watched::Missed(missed));
        }
        self.sender.send(Watched::Chunk(chunk.clone())).is_ok()
    }
}

impl Drop for Watcher {
    /// The session ended (or the watcher left): what it missed last is still said
    /// (one slot over the bound, once).
    fn drop(&mut self) {
        if self.missed > 0 {
            self.queued.fetch_add(SLOT, Ordering::AcqRel);
            let _ = self.sender.send(Watched::Missed(self.missed));
        }
    }
}

/// The receiving side: one watcher's feed, and its watch slot.
pub struct Feed {
    receiver: mpsc::UnboundedReceiver<Watched>,
    queued: Arc<AtomicUsize>,
    _slot: Slot,
}

impl Feed {
    /// The next chunk or count of missed chunks; `None` once the session has
    /// ended and everything queued was read. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Watched> {
        let watched = self.receiver.recv().await?;
        self.queued.fetch_sub(held(&watched), Ordering::AcqRel);
        Some(watched)
    }

    /// Bytes queued for this watcher and not read yet, slots included.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// What one queued message holds besides its data.
const SLOT: usize = std::mem::size_of::<Watched>();

/// What a queued chunk holds: its bytes and its slot.
fn cost_of(chunk: &Chunk) -> usize {
    SLOT + chunk.data.len()
}

fn held(watched: &Watched) -> usize {
    match watched {
        Watched::Chunk(chunk) => cost_of(chunk),
        Watched::Missed(_) => SLOT,
    }
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

    fn slot() -> Slot {
        Slots::default().take("auditor").unwrap()
    }

    /// What a feed holds right now, read without waiting.
    fn drain(feed: &mut Feed) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(watched) = feed.receiver.try_recv() {
            feed.queued.fetch_sub(held(&watched), Ordering::AcqRel);
            seen.push(match watched {
                Watched::Chunk(chunk) => format!("chunk {}", chunk.data.len()),
                Watched::Missed(n) => format!("missed {n}"),
            });
        }
        seen
    }

    #[test]
    fn a_watcher_that_reads_nothing_holds_at_most_its_bound() {
        for size in [1, 100, 32 * 1024] {
            let mut watchers = Watchers::default();
            let feed = watchers.join(slot());
            for _ in 0..(2 * WATCH_BYTES / cost_of(&chunk(size)) + 10) {
                watchers.send(&chunk(size));
            }
            let queued = feed.queued();
            assert!(queued <= WATCH_BYTES, "{size}-byte chunks: {queued} queued");
            assert!(
                queued > WATCH_BYTES - cost_of(&chunk(size)),
                "filled its bound"
            );
            drop(feed);
            watchers.send(&chunk(1));
            assert!(watchers.is_empty(), "a watcher that left is forgotten");
        }
    }

    #[test]
    fn missed_chunks_are_reported_in_order_and_at_the_end() {
        let mut watchers = Watchers::default();
        let mut feed = watchers.join(slot());
        let half = WATCH_BYTES / 2 - SLOT; // two fill the bound
        for _ in 0..3 {
            watchers.send(&chunk(half)); // the third does not fit
        }
        assert_eq!(
            drain(&mut feed),
            [format!("chunk {half}"), format!("chunk {half}")]
        );
        watchers.send(&chunk(10));
        watchers.send(&chunk(WATCH_BYTES)); // missed: never fits
        assert_eq!(drain(&mut feed), ["missed 1", "chunk 10"]);
        drop(watchers); // the session ended
        assert_eq!(drain(&mut feed), ["missed 1"]);
        assert_eq!(feed.queued(), 0, "every slot and byte was given back");
    }

    #[tokio::test]
    async fn the_feed_ends_after_what_was_queued() {
        let mut watchers = Watchers::default();
        let mut feed = watchers.join(slot());
        watchers.send(&chunk(3));
        drop(watchers);
        assert!(matches!(feed.recv().await, Some(Watched::Chunk(c)) if c.data.len() == 3));
        assert!(feed.recv().await.is_none());
        assert_eq!(feed.queued(), 0);
    }

    #[test]
    fn watches_beyond_the_limits_are_refused_until_one_ends() {
        let slots = Slots::default();
        let mut watchers = Watchers::default();
        let mut join = |user: &str| slots.take(user).map(|slot| watchers.join(slot));
        let mut mine: Vec<Feed> = (0..WATCHES_PER_USER)
            .map(|_| join("eve").unwrap())
            .collect();
        let refused = join("eve").err().unwrap();
        assert!(refused.to_string().contains("your limit"), "{refused}");
        let others: Vec<Feed> = (WATCHES_PER_USER..WATCHES_MAX)
            .map(|n| join(&format!("auditor{}", n % 7)).unwrap())
            .collect();
        let refused = join("carol").err().unwrap();
        assert!(refused.to_string().contains("on this bastion"), "{refused}");
        mine.pop();
        let carol = join("carol").expect("a slot comes back when its watch ends");
        let refused = join("eve")
            .err()
            .expect("the bastion's are all taken again");
        assert!(refused.to_string().contains("on this bastion"), "{refused}");
        drop((others, carol));
        assert!(join("eve").is_ok(), "eve's own slot came back too");
    }
}
