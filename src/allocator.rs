//! glibc's allocator, kept from holding on to what the bastion freed, and from
//! handing back what the bastion is about to take again.
//!
//! Recording moves every byte through short-lived buffers on the runtime's and the
//! blocking pool's threads. glibc gives a thread that finds its arena busy an arena
//! of its own (up to eight per core), keeps what is freed in each arena for that
//! arena's next allocations, and hands back to the system only the top of a heap.
//! The bastion's RSS then stays near the sum of every arena's busiest moment: 190
//! MiB after recording 4 GiB, 435 MiB at the peak of an export that followed
//! (`benches/soak.rs`). Two arenas, and a trim every [`TRIM_EVERY`] that returns
//! the free pages inside them, keep it near what is in use.
//!
//! The opposite waste is as real: glibc maps every allocation above its mmap
//! threshold on its own and unmaps it when freed. The threshold starts at 128 KiB
//! and rises to the size of the largest mapped chunk freed, which should have
//! settled it above sled's 2 MiB log buffers (one segment each), but never does:
//! sled asks for them 8 KiB-aligned, glibc pads such a request by the alignment,
//! and the padded request stays just above the threshold its own last free set (a
//! loop of 2 MiB `posix_memalign` calls maps every one, of `malloc` calls only the
//! first). So every log buffer was a fresh mapping, one page fault per 4 KiB:
//! 750 000 faults and 15 % of the bastion's CPU per GiB of random data recorded
//! (`perf` during `benches/soak.rs`). With the threshold fixed at [`MMAP_ABOVE`],
//! those buffers come from the arenas and reuse their pages until a trim hands them
//! back: the trim's interval trades memory kept for pages taken again (faults per
//! GiB: 40 000 to 90 000 with a trim every 10 s, 110 000 to 140 000 every second,
//! 200 000 every half second). Setting the trim threshold as well (8 MiB) left
//! fewer faults but more memory and no less CPU, so it keeps glibc's default.
//! Other C libraries (musl) return freed memory by themselves: there this is a no-op.

use std::time::Duration;

/// How often free memory inside the allocator is handed back to the system. A trim
/// holds each arena's lock while it walks the free lists and releases pages, so
/// its length is a pause for the threads of that arena: 21 µs (median) and 640 µs
/// at most with 500 sessions typing, but 4.5 ms (median) and 120 ms at most every
/// second while the soak recorded gigabytes; with a trim every 10 s, each took 8 to
/// 240 ms. Trimming often also keeps what recording leaves free from piling up:
/// RSS right after recording 2 GiB was 182 to 201 MiB with a trim every 10 s, 157
/// to 170 MiB with one every 0.5 or 2 s; after 4 GiB with one every second, 167 to
/// 224 MiB (`benches/soak.rs`, where the README has every run).
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Arenas glibc may create, unless `MALLOC_ARENA_MAX` says otherwise: two keep
/// both runtime workers from waiting on one arena's lock.
const ARENAS: i32 = 2;

/// Allocations smaller than this (glibc's own chunk overhead counted) come from
/// the arenas rather than a mapping of their own, unless the operator set
/// glibc's threshold: above sled's log buffer (one segment,
/// `store::sled_backend`), with room for its alignment.
const MMAP_ABOVE: i32 = 4 * 1024 * 1024;

/// How the operator sets glibc's arena cap: its variable, and its name in
/// `GLIBC_TUNABLES` after `glibc.malloc.`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: (&str, &str) = ("MALLOC_ARENA_MAX", "arena_max");

/// How the operator sets glibc's mmap threshold (as [`ARENA_MAX`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "mmap_threshold");

/// Caps glibc's arenas at [`ARENAS`] and fixes its mmap threshold at
/// [`MMAP_ABOVE`]. Call it first thing, before threads start: an arena a thread
/// already has stays.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        set_unless_operator_did(ARENA_MAX, libc::M_ARENA_MAX, ARENAS);
        set_unless_operator_did(MMAP_THRESHOLD, libc::M_MMAP_THRESHOLD, MMAP_ABOVE);
    }
}

/// Sets one of glibc's malloc parameters, unless the operator set it through the
/// environment: `names` are its variable and its tunable (as `GLIBC_TUNABLES`
/// names it after `glibc.malloc.`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_unless_operator_did(names: (&str, &str), parameter: libc::c_int, value: libc::c_int) {
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    if operator_set(names, env) {
        return;
    }
    // SAFETY: mallopt only changes a setting of the allocator, and refuses (returns
    // 0, leaving glibc's default) a value out of its range, such as a threshold
    // above 512 KiB on 32-bit targets. Nothing depends on it taking effect.
    unsafe {
        libc::mallopt(parameter, value);
    }
}

/// Whether a malloc setting is in the environment, as `env` reads it: its
/// `variable`, or its `tunable` in `GLIBC_TUNABLES`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn operator_set((variable, tunable): (&str, &str), env: impl Fn(&str) -> Option<String>) -> bool {
    let setting = format!("glibc.malloc.{tunable}=");
    env(variable).is_some()
        || env("GLIBC_TUNABLES")
            .unwrap_or_default()
            .split(':')
            .any(|each| each.starts_with(&setting))
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

/// Hands the allocator's free pages back to the system now (also for benchmarks
/// that measure what stays resident).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory, under each arena's own lock;
    // it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::{operator_set, ARENA_MAX, MMAP_THRESHOLD};

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        }
    }

    #[test]
    fn an_operators_setting_is_found_in_either_form() {
        let tunables = [(
            "GLIBC_TUNABLES",
            "glibc.malloc.trim_threshold=1:glibc.malloc.arena_max=4",
        )];
        assert!(operator_set(ARENA_MAX, env(&tunables)));
        assert!(!operator_set(MMAP_THRESHOLD, env(&tunables)));
        let variable = [("MALLOC_MMAP_THRESHOLD_", "1048576")];
        assert!(operator_set(MMAP_THRESHOLD, env(&variable)));
        assert!(operator_set(ARENA_MAX, env(&[("MALLOC_ARENA_MAX", "1")])));
        assert!(!operator_set(ARENA_MAX, env(&[])));
        // A setting of another name that merely contains this one is not it.
        let other = [("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold_max=1")];
        assert!(!operator_set(MMAP_THRESHOLD, env(&other)));
    }
}
