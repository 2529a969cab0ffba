//! What the embedded store costs to keep incompressible transcript bytes, by the
//! size of the pieces they are stored in: the floor under the bastion's own
//! figures for random data (`benches/proxy.rs`, `benches/soak.rs`).
//!
//! ```text
//! cargo bench --bench pieces
//! ```
//!
//! For each piece size in `PIECES_KIB` (default `16,64,256`; 1 KiB to 8 MiB),
//! writes `PIECES_MIB` MiB (default 1024) of incompressible bytes through the
//! store's sled backend, as a recording does (writes of a MiB, four sessions
//! interleaved, the bastion's sled settings and allocator), reads them back one
//! piece at a time, and prints: CPU seconds per GiB written, bytes passed to
//! `write(2)` per byte until the final flush (`wchar`; a lower bound of what sled
//! writes, since its segment cleaner goes on afterwards), the data directory's
//! size per byte once closed, and the RSS after writing and after reading (16
//! MiB of it is the random buffer the pieces are cut from, at rotating offsets:
//! sled compresses nothing, so repeating it changes nothing). Each size runs in a
//! process of its own (this binary, run again), so what one keeps does not count
//! for the next.

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::io::Read;
use std::process::Command;

use common::{cpu_seconds, du_bytes, env_number, status_kib};
use portcullis::store::Store;

/// The tree the pieces go to (a scratch store: nothing else is in it).
const TREE: &str = "pieces";

/// Sessions whose writes interleave, as on a bastion carrying several at once.
const SESSIONS: u64 = 4;

/// Bytes per write, as the recorder writes a flush.
const WRITE: usize = 1024 * 1024;

fn main() {
    if let Ok(kib) = std::env::var("PIECES_ONE") {
        let kib = kib.parse().expect("PIECES_ONE: a size in KiB");
        return measure(kib, env_number("PIECES_MIB", 1024));
    }
    let sizes = std::env::var("PIECES_KIB").unwrap_or_else(|_| "16,64,256".into());
    for kib in sizes.split(',').map(str::trim) {
        let fits = kib
            .parse::<usize>()
            .is_ok_and(|kib| (1..=8 * 1024).contains(&kib));
        if !fits {
            eprintln!(
                "PIECES_KIB: {kib:?} is not a size from 1 to 8192 (KiB); e.g. PIECES_KIB=16,64"
            );
            std::process::exit(2);
        }
    }
    println!("piece | CPU s/GiB | written per byte | on disk per byte | RSS after writing | after reading");
    for kib in sizes.split(',').map(str::trim) {
        let ran = Command::new(std::env::current_exe().expect("this benchmark's path"))
            .env("PIECES_ONE", kib)
            .status()
            .expect("run one piece size");
        assert!(ran.success(), "piece size {kib} KiB failed");
    }
}

fn measure(kib: usize, mib: usize) {
    portcullis::allocator::tune();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let store = Store::sled(dir.path()).expect("open the store");
    let piece = kib * 1024;
    let random = random_bytes(16 * WRITE);
    let pid = std::process::id();
    let (cpu, wrote) = (cpu_seconds(pid), bytes_written());
    let pieces = (mib * 1024 * 1024 / piece) as u64;
    let per_write = (WRITE / piece).max(1) as u64;
    let mut next = 0;
    while next < pieces {
        let session = (next / per_write) % SESSIONS;
        let entries = (next..(next + per_write).min(pieces))
            .map(|n| {
                let at = (n as usize * piece) % (random.len() - piece);
                (key(session, n), random[at..at + piece].to_vec())
            })
            .collect();
        store.backend().put_all(TREE, entries).expect("write");
        next += per_write;
    }
    store.flush().expect("flush");
    let gib = mib as f64 / 1024.0;
    let cpu = (cpu_seconds(pid) - cpu) / gib;
    let written = (bytes_written() - wrote) as f64 / (mib << 20) as f64;
    portcullis::allocator::trim();
    let rss_written = status_kib(pid, "VmRSS:") / 1024;
    for n in 0..pieces {
        let session = (n / per_write) % SESSIONS;
        let value = store.backend().get(TREE, &key(session, n)).expect("read");
        assert_eq!(value.map(|v| v.len()), Some(piece));
    }
    portcullis::allocator::trim();
    let rss_read = status_kib(pid, "VmRSS:") / 1024;
    drop(store);
    let on_disk = du_bytes(dir.path()) as f64 / (mib << 20) as f64;
    println!(
        "{kib:>4} KiB | {cpu:>9.2} | {written:>16.2} | {on_disk:>16.2} | {rss_written:>13} MiB | {rss_read:>9} MiB"
    );
}

/// A piece's key: its session, then its place in the session.
fn key(session: u64, n: u64) -> Vec<u8> {
    [session.to_be_bytes(), n.to_be_bytes()].concat()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

/// Bytes this process has passed to `write` calls so far.
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
