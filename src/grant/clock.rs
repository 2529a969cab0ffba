//! The time the grant rules read: when a request is filed, decided, due to expire,
//! and whether a grant is still active. One [`Clock`] per bastion, in the grant
//! service, so that every one of those readings comes from the same place.
//!
//! A bastion runs on the wall clock. A bastion in a test's own process may run on
//! [`Clock::following_tokio`] instead: then tokio's paused clock, which already
//! moves every timer the bastion schedules, moves the grants' timestamps and the
//! expiry sweep's "now" with it, so a grant's hour passes in virtual time from end
//! to end. TOTP codes and SSH certificates keep the wall clock: authenticator apps
//! and targets read that one.

use chrono::{DateTime, Utc};

/// Where "now" comes from for the grant rules.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    Wall,
    /// `start`, plus however far tokio's clock has moved since `origin`: pausing
    /// and advancing tokio's clock moves this one too.
    FollowingTokio {
        start: DateTime<Utc>,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that starts at the wall clock's now and from then on moves as
    /// tokio's clock does. Call it inside the runtime whose clock it follows.
    pub fn following_tokio() -> Clock {
        Clock::FollowingTokio {
            start: Utc::now(),
            origin: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::Wall => Utc::now(),
            Clock::FollowingTokio { start, origin } => {
                // An elapsed time past chrono's range (hundreds of millions of
                // years) saturates instead of panicking.
                let elapsed =
                    chrono::Duration::from_std(origin.elapsed()).unwrap_or(chrono::Duration::MAX);
                start
                    .checked_add_signed(elapsed)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// With tokio's clock paused, the clock moves exactly as far as tokio's does,
    /// and not with the wall clock.
    #[tokio::test(start_paused = true)]
    async fn a_clock_following_tokio_moves_with_the_paused_clock() {
        let clock = Clock::following_tokio();
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            clock.now(),
            before,
            "the wall clock moved, this one did not"
        );
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now() - before, chrono::Duration::hours(1));
    }
}
