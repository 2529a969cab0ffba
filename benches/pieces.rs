//! What a store costs to keep incompressible transcript bytes, by the size of
//! the pieces they are stored in: the floor under the bastion's own figures for
//! random data (`benches/proxy.rs`, `benches/soak.rs`).
//!
//! ```text
//! cargo bench --bench pieces
//! PIECES_STORE=postgres cargo bench --bench pieces
//! ```
//!
//! For each piece size in `PIECES_KIB` (KiB from 1 to 8192, or bytes with a `B`
//! after them; default `16,64,256` on sled and `8000B,1024` on PostgreSQL),
//! writes `PIECES_MIB` MiB (default 1024) of incompressible bytes through the
//! store's backend, as a recording does (writes of a MiB, four sessions
//! interleaved, the bastion's settings and allocator), reads them back a MiB of
//! pieces at a time as a replay does (`Backend::get_run`), and prints: CPU
//! seconds per GiB written, this process's and (on PostgreSQL, `PIECES_STORE=
//! postgres`: a server the benchmark starts on loopback, `fsync` on unless
//! `BENCH_PG_SETTINGS=fsync=off`) the server's; bytes passed to `write(2)` per
//! byte until the final flush (`wchar`; sled only: a lower bound of what sled
//! writes, since its segment cleaner goes on afterwards); the store's size per
//! byte once closed (sled: its data
//! directory; PostgreSQL: the table with its TOAST and indexes); and the RSS
//! after writing and after reading (16 MiB of it is the random buffer the
//! pieces are cut from, at rotating offsets: neither store compresses them, so
//! repeating it changes nothing). Each size runs in a process of its own (this
//! binary, run again, with a server of its own), so what one keeps does not
//! count for the next.

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::io::Read;
use std::process::Command;

use common::{bench_postgres, cpu_seconds, database_of, du_bytes, env_number, status_kib};
use portcullis::store::{PgSettings, Settings, Store};

/// The tree the pieces go to (a scratch store: nothing else is in it).
const TREE: &str = "pieces";

/// Sessions whose writes interleave, as on a bastion carrying several at once.
const SESSIONS: u64 = 4;

/// Bytes per write, as the recorder writes a flush.
const WRITE: usize = 1024 * 1024;

fn main() {
    let on_postgres = match std::env::var("PIECES_STORE").as_deref() {
        Err(_) | Ok("sled") => false,
        Ok("postgres") => true,
        Ok(other) => {
            eprintln!("PIECES_STORE: {other:?} is not a store; use sled or postgres");
            std::process::exit(2);
        }
    };
    if let Ok(bytes) = std::env::var("PIECES_ONE") {
        let bytes = bytes.parse().expect("PIECES_ONE: a size in bytes");
        return measure(bytes, env_number("PIECES_MIB", 1024), on_postgres);
    }
    let default = if on_postgres {
        "8000B,1024"
    } else {
        "16,64,256"
    };
    let sizes = std::env::var("PIECES_KIB").unwrap_or_else(|_| default.into());
    let mut bytes = Vec::new();
    for size in sizes.split(',').map(str::trim) {
        match piece_bytes(size) {
            Some(piece) => bytes.push(piece),
            None => {
                eprintln!(
                    "PIECES_KIB: {size:?} is not a size from 1 to 8192 KiB (or bytes with a B \
                     after them); e.g. PIECES_KIB=16,64 or PIECES_KIB=8000B"
                );
                std::process::exit(2);
            }
        }
    }
    println!("piece | CPU s/GiB | server CPU s/GiB | written per byte | stored per byte | RSS after writing | after reading");
    for piece in bytes {
        let ran = Command::new(std::env::current_exe().expect("this benchmark's path"))
            .env("PIECES_ONE", piece.to_string())
            .status()
            .expect("run one piece size");
        assert!(ran.success(), "piece size {piece} bytes failed");
    }
}

/// A size of `PIECES_KIB` in bytes: KiB, or bytes with a `B` after them; from 1
/// KiB to 8 MiB.
fn piece_bytes(size: &str) -> Option<usize> {
    let bytes = match size.strip_suffix('B') {
        Some(bytes) => bytes.parse::<usize>().ok()?,
        None => size.parse::<usize>().ok()?.checked_mul(1024)?,
    };
    (1024..=8 * 1024 * 1024).contains(&bytes).then_some(bytes)
}

/// The store to measure, and how to read its size and its server's CPU.
struct Measured {
    store: Store,
    /// The scratch directory (sled's data; PostgreSQL's is the server's).
    dir: tempfile::TempDir,
    /// The database's name on the benchmarks' server, on PostgreSQL.
    database: Option<String>,
}

impl Measured {
    fn open(on_postgres: bool) -> Measured {
        let dir = tempfile::tempdir().expect("a scratch directory");
        if !on_postgres {
            let store = Store::sled(dir.path()).expect("open the store");
            return Measured {
                store,
                dir,
                database: None,
            };
        }
        let url = bench_postgres().fresh_database();
        let settings = Settings::Postgres(PgSettings {
            url: url.clone(),
            password_file: Some(bench_postgres().password_file().to_path_buf()),
            pool_size: portcullis::store::DEFAULT_POOL_SIZE,
            connect_timeout: portcullis::store::DEFAULT_CONNECT_TIMEOUT,
            ca_file: None,
        });
        let store = Store::open(&settings, dir.path()).expect("open the store");
        let database = Some(database_of(&url).to_string());
        Measured {
            store,
            dir,
            database,
        }
    }

    /// The server's CPU seconds so far (0 on sled: the store is this process).
    fn server_cpu(&self) -> f64 {
        self.database
            .as_ref()
            .map_or(0.0, |_| bench_postgres().cpu_seconds())
    }

    /// What the store takes, closed.
    fn stored_bytes(self) -> u64 {
        let Measured {
            store,
            dir,
            database,
        } = self;
        drop(store);
        match database {
            None => du_bytes(dir.path()),
            Some(name) => bench_postgres()
                .sql(&name, "SELECT pg_total_relation_size('kv')")
                .parse()
                .expect("the table's size"),
        }
    }
}

fn measure(piece: usize, mib: usize, on_postgres: bool) {
    portcullis::allocator::tune();
    let measured = Measured::open(on_postgres);
    let seam = measured.store.backend();
    let random = random_bytes(16 * WRITE);
    let pid = std::process::id();
    let (cpu, server_cpu, wrote) = (cpu_seconds(pid), measured.server_cpu(), bytes_written());
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
        seam.put_all(TREE, entries).expect("write");
        next += per_write;
    }
    measured.store.flush().expect("flush");
    let gib = mib as f64 / 1024.0;
    let cpu = (cpu_seconds(pid) - cpu) / gib;
    let server_cpu = (measured.server_cpu() - server_cpu) / gib;
    let written = (bytes_written() - wrote) as f64 / (mib << 20) as f64;
    portcullis::allocator::trim();
    let rss_written = status_kib(pid, "VmRSS:") / 1024;
    for first in (0..pieces).step_by(per_write as usize) {
        let session = (first / per_write) % SESSIONS;
        let keys: Vec<Vec<u8>> = (first..(first + per_write).min(pieces))
            .map(|n| key(session, n))
            .collect();
        let values = seam.get_run(TREE, &keys).expect("read");
        assert_eq!(values.len(), keys.len());
        assert!(values.iter().all(|value| value.len() == piece));
    }
    portcullis::allocator::trim();
    let rss_read = status_kib(pid, "VmRSS:") / 1024;
    let stored = measured.stored_bytes() as f64 / (mib << 20) as f64;
    let (server_cpu, written) = if on_postgres {
        (format!("{server_cpu:.2}"), "-".to_string())
    } else {
        ("-".to_string(), format!("{written:.2}"))
    };
    println!(
        "{piece:>7} B | {cpu:>9.2} | {server_cpu:>16} | {written:>16} | {stored:>15.2} | {rss_written:>13} MiB | {rss_read:>9} MiB"
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
