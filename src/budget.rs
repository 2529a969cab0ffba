//! One memory budget for the session bytes the bastion holds between reading and
//! writing, across all sessions: relay pipes beyond their own allowance, and
//! recording batches waiting for the disk beyond theirs.
//!
//! Every holder has a small allowance of its own, so every session can always make
//! progress however the budget is used; only what a holder keeps beyond it is
//! charged here. When the budget is spent, holders stay at their allowance: a pipe
//! gets no overdraft, a recording waits for its flush. Many sessions whose clients
//! read nothing can then pin their allowances and no more, which is what keeps the
//! bastion's memory bounded by `[limits] relay_memory` plus a small sum per session.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// `[limits] relay_memory` unless configured.
pub const DEFAULT_LIMIT: usize = 256 << 20;

/// The bytes all holders together may keep beyond their own allowances.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// Wakes holders waiting for room: some charge was refunded.
    freed: Notify,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    /// Bytes charged right now (for metrics and tests).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Charges `bytes` if they fit; never waits.
    fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn refund(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    /// Resolves after the next refund; create it before checking, as with
    /// [`Notify::notified`], so that no refund is missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

/// One holder's standing with the budget: what it holds beyond its allowance is
/// charged, and refunded as it shrinks or when the account is dropped.
#[derive(Debug)]
pub struct Account {
    budget: Arc<Budget>,
    allowance: usize,
    charged: usize,
}

impl Account {
    pub fn new(budget: Arc<Budget>, allowance: usize) -> Account {
        Account {
            budget,
            allowance,
            charged: 0,
        }
    }

    /// Whether the holder may hold `total` bytes: within its allowance, or with the
    /// excess charged to the budget. Growing fails (and charges nothing) when the
    /// budget cannot cover it; shrinking always succeeds and refunds.
    pub fn hold(&mut self, total: usize) -> bool {
        let excess = total.saturating_sub(self.allowance);
        if excess <= self.charged {
            self.budget.refund(self.charged - excess);
            self.charged = excess;
            return true;
        }
        if self.budget.try_charge(excess - self.charged) {
            self.charged = excess;
            return true;
        }
        false
    }

    /// Bytes this holder has charged to the budget.
    pub fn charged(&self) -> usize {
        self.charged
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.budget.refund(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holding_within_the_allowance_charges_nothing() {
        let budget = Budget::new(0);
        let mut account = Account::new(budget.clone(), 100);
        assert!(account.hold(100));
        assert!(!account.hold(101), "an empty budget admits no excess");
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_excess_is_charged_shared_and_refunded() {
        let budget = Budget::new(50);
        let mut first = Account::new(budget.clone(), 10);
        let mut second = Account::new(budget.clone(), 10);
        assert!(first.hold(40));
        assert_eq!(budget.used(), 30);
        assert!(!second.hold(31), "only 20 are left");
        assert!(second.hold(30));
        assert_eq!(budget.used(), 50);
        assert!(first.hold(15), "shrinking always succeeds");
        assert_eq!(budget.used(), 25);
        drop(second);
        assert_eq!(budget.used(), 5, "a dropped account refunds its charge");
        assert!(first.hold(0));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_failed_growth_keeps_the_earlier_charge() {
        let budget = Budget::new(10);
        let mut account = Account::new(budget.clone(), 0);
        assert!(account.hold(8));
        assert!(!account.hold(11));
        assert_eq!((account.charged(), budget.used()), (8, 8));
    }
}
