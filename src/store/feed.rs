//! The seam's change subscription: the keys changed in one tree, by this process
//! or by any other sharing the database, delivered to a subscriber through a
//! bounded queue.
//!
//! A subscriber that falls behind does not make the writers wait or the queue
//! grow: the changes that do not fit are dropped and the subscriber gets one
//! [`Change::Resync`] instead, which means "re-read whatever you care about". A
//! backend that may have missed changes (a dropped database connection) sends
//! the same marker. So a subscriber never relies on seeing every key, only on
//! hearing about every change either by its key or by a resync after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// Changes one subscription holds before it falls back to a resync. A grant
/// service consumes its feed as fast as it can read grants, so this is only
/// reached by a burst (a sweep expiring thousands of grants at once).
pub const SUBSCRIPTION_CAPACITY: usize = 1024;

/// What a subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The value under this key was written or removed.
    Key(Vec<u8>),
    /// Changes may have been missed (the subscriber lagged, or the backend lost
    /// its feed for a while): re-read everything the subscriber cares about.
    Resync,
}

/// The receiving end: the changes of one tree, in the order they were heard.
pub struct Subscription {
    changes: mpsc::Receiver<Change>,
    lagged: Arc<AtomicBool>,
}

/// The sending end a backend keeps for one subscription.
#[derive(Clone)]
pub struct Sink {
    changes: mpsc::Sender<Change>,
    lagged: Arc<AtomicBool>,
}

/// A new subscription and the sink that feeds it.
pub fn channel() -> (Sink, Subscription) {
    let (sender, receiver) = mpsc::channel(SUBSCRIPTION_CAPACITY);
    let lagged = Arc::new(AtomicBool::new(false));
    (
        Sink {
            changes: sender,
            lagged: lagged.clone(),
        },
        Subscription {
            changes: receiver,
            lagged,
        },
    )
}

impl Subscription {
    /// The next change; `None` once the backend is gone. A lag is reported as
    /// soon as it happened, before the changes still queued (a resync covers
    /// them too).
    pub async fn recv(&mut self) -> Option<Change> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(Change::Resync);
        }
        self.changes.recv().await
    }

    /// [`Subscription::recv`] for a thread outside the runtime (it must not be
    /// called on a tokio worker thread).
    pub fn blocking_recv(&mut self) -> Option<Change> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(Change::Resync);
        }
        self.changes.blocking_recv()
    }
}

impl Sink {
    /// Hands `change` over without waiting. A full queue drops it and marks the
    /// subscription lagged (its next `recv` is a resync: the queue is not empty,
    /// so the subscriber comes back for it). `false`: nobody listens any more.
    pub fn deliver(&self, change: Change) -> bool {
        match self.changes.try_send(change) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the subscription was dropped.
    pub fn is_closed(&self) -> bool {
        self.changes.is_closed()
    }
}

/// The subscriptions of one backend, by tree, for backends that hear every
/// change in one place (PostgreSQL's one LISTEN connection). Bounded by the
/// subscriptions the bastion makes (one per watched tree and service); dropped
/// subscriptions are forgotten at the next delivery.
#[derive(Default)]
pub struct Fanout {
    sinks: Mutex<Vec<(String, Sink)>>,
}

impl Fanout {
    /// A new subscription to `tree`.
    pub fn subscribe(&self, tree: &str) -> Subscription {
        let (sink, subscription) = channel();
        self.lock().push((tree.to_string(), sink));
        subscription
    }

    /// Hands `change` to every subscriber of `tree`.
    pub fn deliver(&self, tree: &str, change: Change) {
        self.lock()
            .retain(|(of, sink)| of != tree || sink.deliver(change.clone()));
    }

    /// Tells every subscriber that changes may have been missed.
    pub fn resync_all(&self) {
        self.lock().retain(|(_, sink)| sink.deliver(Change::Resync));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Sink)>> {
        self.sinks.lock().expect("subscription list lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber that does not keep up gets a resync instead of a queue that
    /// grows, then the changes after it.
    #[tokio::test]
    async fn a_lagging_subscriber_gets_a_resync() {
        let (sink, mut subscription) = channel();
        for n in 0..SUBSCRIPTION_CAPACITY + 5 {
            assert!(sink.deliver(Change::Key(n.to_be_bytes().to_vec())));
        }
        assert_eq!(subscription.recv().await, Some(Change::Resync));
        let mut queued = 0;
        while let Ok(change) = subscription.changes.try_recv() {
            assert!(matches!(change, Change::Key(_)));
            queued += 1;
        }
        assert_eq!(queued, SUBSCRIPTION_CAPACITY);
        sink.deliver(Change::Key(b"later".to_vec()));
        assert_eq!(
            subscription.recv().await,
            Some(Change::Key(b"later".to_vec()))
        );
        drop(subscription);
        assert!(!sink.deliver(Change::Resync), "nobody listens");
    }

    #[tokio::test]
    async fn fanout_delivers_by_tree_and_forgets_dropped_subscriptions() {
        let fanout = Fanout::default();
        let mut a = fanout.subscribe("a");
        let b = fanout.subscribe("b");
        fanout.deliver("a", Change::Key(b"k".to_vec()));
        assert_eq!(a.recv().await, Some(Change::Key(b"k".to_vec())));
        drop(b);
        fanout.resync_all();
        assert_eq!(a.recv().await, Some(Change::Resync));
        assert_eq!(fanout.lock().len(), 1);
    }
}
