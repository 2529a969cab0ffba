//! glibc's allocator, kept from holding on to what the bastion freed.
//!
//! Recording moves every byte through short-lived buffers on the runtime's and the
//! blocking pool's threads. glibc gives a thread that finds its arena busy an arena
//! of its own (up to eight per core), keeps what is freed in each arena for that
//! arena's next allocations, and hands back to the system only the top of a heap.
//! The bastion's RSS then stays near the sum of every arena's busiest moment: 190
//! MiB after recording 4 GiB, 435 MiB at the peak of an export that followed
//! (`benches/soak.rs`). Two arenas, and a trim every [`TRIM_EVERY`] that returns
//! the free pages inside them, keep it near what is in use (157 and 202 MiB).
//! Other C libraries (musl) return freed memory by themselves: there this is a no-op.

use std::time::Duration;

/// How often free memory inside the allocator is handed back to the system.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Arenas glibc may create, unless `MALLOC_ARENA_MAX` says otherwise: two keep
/// both runtime workers from waiting on one arena's lock.
const ARENAS: i32 = 2;

/// Caps glibc's arenas at [`ARENAS`]. Call it first thing, before threads start:
/// an arena a thread already has stays.
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return; // the operator's choice
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a setting of the allocator; M_ARENA_MAX with a
    // positive value is always valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns the allocator's free pages to the system every [`TRIM_EVERY`], for as
/// long as the bastion runs. A trim walks the free lists under each arena's lock,
/// so it runs on the blocking pool.
pub async fn trim_periodically() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory, under each arena's own lock;
    // it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
