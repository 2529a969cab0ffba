//! The storage seam's contract, checked against both backends with one test
//! body each: sled in a temp dir, and a fresh database on a real PostgreSQL
//! server (one server for this binary, see `common::postgres`). Then what only
//! PostgreSQL has (migrations, a feed that reconnects, an unreachable server),
//! two bastions' grant services on one database, and the real bastion binary
//! serving from PostgreSQL.

pub mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use chrono::Utc;
use common::*;
use portcullis::grant::notify::Notifier;
use portcullis::grant::{GrantState, Grants, RequestSpec, Scope};
use portcullis::store::{Change, Entry, PgSettings, Settings, Store, Subscription};
use tempfile::TempDir;

/// One database as the contract sees it; [`Database::open`] gives a backend on it.
enum Database {
    /// sled allows one open database per process: every `open` shares it (the
    /// cross-backend tests then check concurrency within one backend). The
    /// directory lives as long as the database.
    Sled(Arc<Store>, #[allow(dead_code)] TempDir),
    /// Every `open` is a backend of its own, as another bastion's would be.
    Postgres(PgSettings),
}

impl Database {
    fn sled() -> Database {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::sled(dir.path()).expect("open sled"));
        Database::Sled(store, dir)
    }

    fn postgres() -> Database {
        Database::Postgres(pg_settings(&postgres().fresh_database()))
    }

    fn open(&self) -> Arc<Store> {
        match self {
            Database::Sled(store, _) => store.clone(),
            Database::Postgres(settings) => Arc::new(
                Store::open(
                    &Settings::Postgres(settings.clone()),
                    Path::new("/nonexistent"),
                )
                .expect("open PostgreSQL"),
            ),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Database::Sled(..) => "sled",
            Database::Postgres(_) => "postgres",
        }
    }
}

/// Settings for the test server's database `url`.
fn pg_settings(url: &str) -> PgSettings {
    PgSettings {
        url: url.to_string(),
        password_file: Some(postgres().password_file().to_path_buf()),
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        ca_file: None,
    }
}

/// Runs `body` on a fresh sled database, then on a fresh PostgreSQL one.
fn on_both(body: impl Fn(&Database)) {
    for database in [Database::sled(), Database::postgres()] {
        eprintln!("--- backend: {}", database.name());
        body(&database);
    }
}

/// `threads` threads, alternating between two backends of `database`, each
/// running `work(store)`; their results in thread order.
fn on_threads<T: Send + 'static>(
    database: &Database,
    threads: usize,
    work: impl Fn(&Store) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let stores = [database.open(), database.open()];
    let work = Arc::new(work);
    let handles: Vec<_> = (0..threads)
        .map(|n| {
            let (store, work) = (stores[n % 2].clone(), work.clone());
            thread::spawn(move || work(&store))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The next change a subscription hears, within `within`.
fn next_change(subscription: &mut Subscription, within: Duration) -> Option<Change> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(async { tokio::time::timeout(within, subscription.recv()).await })
        .ok()
        .flatten()
}

fn be(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

#[test]
fn compare_and_swap_holds_across_backends() {
    on_both(|database| {
        let seam = database.open();
        let seam = seam.backend();
        assert!(
            seam.compare_and_swap("t", b"k", None, None).unwrap(),
            "absent"
        );
        assert!(seam.compare_and_swap("t", b"k", None, Some(b"1")).unwrap());
        assert!(!seam.compare_and_swap("t", b"k", None, Some(b"2")).unwrap());
        assert!(!seam.compare_and_swap("t", b"k", None, None).unwrap());
        assert!(!seam
            .compare_and_swap("t", b"k", Some(b"0"), Some(b"2"))
            .unwrap());
        assert!(seam
            .compare_and_swap("t", b"k", Some(b"1"), Some(b"2"))
            .unwrap());
        assert!(!seam.compare_and_swap("t", b"k", Some(b"1"), None).unwrap());
        assert!(seam.compare_and_swap("t", b"k", Some(b"2"), None).unwrap());
        assert_eq!(seam.get("t", b"k").unwrap(), None);

        // Racing read-swap loops on two backends lose no increment.
        database.open().backend().put("t", b"n", &be(0)).unwrap();
        let swaps = on_threads(database, 4, |store| {
            let mut lost = 0;
            for _ in 0..25 {
                loop {
                    let old = store.backend().get("t", b"n").unwrap().unwrap();
                    let n = u64::from_be_bytes(old.as_slice().try_into().unwrap());
                    if store
                        .backend()
                        .compare_and_swap("t", b"n", Some(&old), Some(&be(n + 1)))
                        .unwrap()
                    {
                        break;
                    }
                    lost += 1;
                }
            }
            lost
        });
        let total = database.open().backend().get("t", b"n").unwrap().unwrap();
        assert_eq!(total, be(100), "lost races retried: {swaps:?}");
    });
}

#[test]
fn ordered_appends_never_fork_across_backends() {
    on_both(|database| {
        on_threads(database, 4, |store| {
            for _ in 0..50 {
                store
                    .append("log", |seq, previous| {
                        let before = previous
                            .map_or(0, |p| u64::from_be_bytes(p.try_into().expect("8 bytes")));
                        assert_eq!(before + 1, seq, "each value links to the one before");
                        Ok(be(seq))
                    })
                    .unwrap();
            }
        });
        let store = database.open();
        let entries: Vec<_> = store
            .backend()
            .scan("log", b"", None)
            .map(|e| e.unwrap())
            .collect();
        let expected: Vec<_> = (1..=200).map(|n| (be(n), be(n))).collect();
        assert_eq!(entries, expected);
    });
}

#[test]
fn counters_are_unique_across_backends() {
    on_both(|database| {
        let handed: Vec<Vec<u64>> = on_threads(database, 4, |store| {
            (0..50).map(|_| store.next_id("c").unwrap()).collect()
        });
        let mut all: Vec<u64> = handed.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all, (1..=200).collect::<Vec<_>>());
        let seam = database.open();
        let seam = seam.backend();
        assert_eq!(seam.counter("c").unwrap(), 200);
        assert_eq!(seam.counter("never").unwrap(), 0);
        seam.seed_counter("c", 7).unwrap();
        assert_eq!(seam.increment("c").unwrap(), 201, "seeding never goes back");
        seam.seed_counter("c", 1000).unwrap();
        assert_eq!(seam.increment("c").unwrap(), 1001);
    });
}

#[test]
fn scans_follow_prefix_from_and_key_order() {
    on_both(|database| {
        let store = database.open();
        let seam = store.backend();
        // More than one page of a PostgreSQL scan, written out of order.
        for n in (0..300u16).rev() {
            let mut key = b"p/".to_vec();
            key.extend_from_slice(&n.to_be_bytes());
            seam.put("s", &key, &n.to_be_bytes()).unwrap();
        }
        let odd: [&[u8]; 6] = [b"\x00", b"\x01\xff", b"\x01\xff\x00", b"\x02", b"o", b"q"];
        for key in odd {
            seam.put("s", key, b"x").unwrap();
        }
        seam.put("other", b"p/\x00\x01", b"elsewhere").unwrap();
        let keys = |prefix: &[u8], from: Option<&[u8]>| -> Vec<Vec<u8>> {
            seam.scan("s", prefix, from).map(|e| e.unwrap().0).collect()
        };
        let under_p = keys(b"p/", None);
        assert_eq!(under_p.len(), 300);
        assert!(under_p.windows(2).all(|w| w[0] < w[1]), "key order");
        let from = b"p/\x00\xc8"; // 200
        assert_eq!(keys(b"p/", Some(from)).len(), 100);
        assert_eq!(keys(b"p/", Some(b"a")).len(), 300, "from before the prefix");
        assert_eq!(keys(b"p/", Some(b"z")).len(), 0, "from after the prefix");
        assert_eq!(
            keys(b"\x01\xff", None),
            [b"\x01\xff".to_vec(), b"\x01\xff\x00".to_vec()]
        );
        let all = keys(b"", None);
        assert_eq!(all.len(), 306);
        assert_eq!(all[0], b"\x00");
        assert!(all.windows(2).all(|w| w[0] < w[1]), "key order");
        assert_eq!(keys(b"", Some(b"q")), [b"q".to_vec()]);
        assert_eq!(seam.last("s").unwrap().unwrap().0, b"q");
        assert_eq!(seam.last("empty").unwrap(), None);
        assert_eq!(seam.remove("s", b"q").unwrap(), Some(b"x".to_vec()));
        assert_eq!(seam.remove("s", b"q").unwrap(), None);
        // Pieces as large as the backend keeps: PostgreSQL's pages end by bytes
        // as well as by rows, and a scan still sees every piece once, in order.
        let piece = vec![7u8; seam.largest_piece()];
        let big: Vec<_> = (0..10u64).map(|n| (be(n), piece.clone())).collect();
        seam.put_all("big", big.clone()).unwrap();
        let scanned: Vec<_> = seam.scan("big", b"", None).map(|e| e.unwrap()).collect();
        assert_eq!(scanned.len(), big.len());
        assert!(scanned == big, "every piece once, in key order");
    });
}

/// A prefix's removal takes exactly the keys under it, in one change, and says
/// how many and how many bytes; an all-`0xff` prefix (no end to its range) too.
#[test]
fn removing_a_prefix_takes_exactly_its_keys() {
    on_both(|database| {
        let store = database.open();
        let seam = store.backend();
        let entries: [(&[u8], &[u8]); 7] = [
            (b"a", b"before"),
            (b"ab", b"1"),
            (b"ab\x00", b"22"),
            (b"ab\xff\xff", b"333"),
            (b"ac", b"after"),
            (b"\xff", b"4444"),
            (b"\xff\xff", b"55555"),
        ];
        for (key, value) in entries {
            seam.put("r", key, value).unwrap();
        }
        seam.put("other", b"ab", b"elsewhere").unwrap();
        let removed = seam.remove_prefix("r", b"ab").unwrap();
        assert_eq!((removed.entries, removed.bytes), (3, 6));
        let removed = seam.remove_prefix("r", b"\xff").unwrap();
        assert_eq!((removed.entries, removed.bytes), (2, 9));
        assert_eq!(seam.remove_prefix("r", b"zz").unwrap().entries, 0);
        let left: Vec<Vec<u8>> = seam.scan("r", b"", None).map(|e| e.unwrap().0).collect();
        assert_eq!(left, [b"a".to_vec(), b"ac".to_vec()]);
        assert_eq!(
            seam.get("other", b"ab").unwrap(),
            Some(b"elsewhere".to_vec())
        );
    });
}

/// Transcript batches on either backend: a batch of many pieces (more than one
/// run of pieces is asked for), one of a single piece and an empty one read
/// back exactly; retention removes every piece and counts its bytes.
#[test]
fn transcript_batches_read_back_whole_and_are_deleted_on_both() {
    on_both(|database| {
        let sessions = portcullis::record::SessionStore::open(database.open()).unwrap();
        let pieces = database.open().backend().piece_bytes();
        let large: Vec<u8> = (0..pieces * 37 + 5).map(|i| (i * 31 % 251) as u8).collect();
        let batches = vec![large.clone(), b"one keystroke".to_vec(), Vec::new()];
        sessions.put_batches(9, 0, batches).unwrap();
        assert_eq!(sessions.batch(9, 0).unwrap(), Some(large.clone()));
        assert_eq!(
            sessions.batch(9, 1).unwrap(),
            Some(b"one keystroke".to_vec())
        );
        assert_eq!(sessions.batch(9, 3).unwrap(), None);
        let freed = sessions.delete_batches(9).unwrap();
        assert_eq!(freed, large.len() as u64 + 13);
        assert_eq!(sessions.batch(9, 0).unwrap(), None);
    });
}

/// PostgreSQL keeps a transcript piece of the size it asks for in the row's
/// own page: nothing goes to the TOAST table, by `COPY` (a large flush of new
/// pieces) or by upsert (a piece written again), while a larger value still
/// does.
#[test]
fn postgres_keeps_a_piece_in_its_row() {
    let (name, store) = fresh_postgres_store();
    let seam = store.backend();
    let toasted = "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'kv'";
    let piece = vec![0x5au8; seam.piece_bytes()];
    // Keys as long as a transcript piece's (session, batch, piece: 16 bytes), in
    // the transcripts' tree.
    let key = |n: u64| [be(7), be(n)].concat();
    let pieces: Vec<Entry> = (0..64u64).map(|n| (key(n), piece.clone())).collect();
    seam.put_all("chunks", pieces.clone()).unwrap();
    seam.put_all("chunks", pieces[..2].to_vec()).unwrap();
    seam.put("chunks", &key(99), &piece).unwrap();
    assert_eq!(postgres().sql(&name, toasted), "0", "no piece was TOASTed");
    seam.put("chunks", &key(100), &vec![1u8; 9000]).unwrap();
    assert_ne!(postgres().sql(&name, toasted), "0", "a larger value is");
    assert_eq!(seam.get("chunks", &key(63)).unwrap(), Some(piece));
}

/// PostgreSQL: rows of a tree nobody watches call no trigger function (a call
/// per transcript piece cost the server about 1 s of CPU per GiB), whether
/// added by `COPY`, written again or removed; a watched tree's rows do. The
/// writes go through one connection (a pool of one), whose calls add up in one
/// pending count per function: once the watched write's call shows, an earlier
/// call would have too.
#[test]
fn postgres_calls_no_trigger_for_trees_nobody_watches() {
    let url = postgres().fresh_database();
    let name = database_of(&url).to_string();
    postgres().sql(
        &name,
        &format!("ALTER DATABASE {name} SET track_functions = 'pl'"),
    );
    let settings = PgSettings {
        pool_size: 1,
        ..pg_settings(&url)
    };
    let store = Database::Postgres(settings).open();
    let seam = store.backend();
    let mut feed = seam.subscribe("watched").unwrap();
    let pieces: Vec<Entry> = (0..100u64).map(|n| (be(n), vec![1; 1000])).collect();
    seam.put_all("unwatched", pieces.clone()).unwrap();
    seam.put_all("unwatched", pieces[..3].to_vec()).unwrap();
    assert_eq!(
        seam.remove_prefix("unwatched", &[0; 7]).unwrap().entries,
        100
    );
    seam.put("watched", b"k", b"v").unwrap();
    assert!(
        next_change(&mut feed, Duration::from_secs(5)).is_some(),
        "the watched write notified"
    );
    let calls = "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions \
                 WHERE funcname = 'portcullis_kv_notify'";
    assert!(
        wait_until(Duration::from_secs(20), || postgres().sql(&name, calls)
            != "0"),
        "the watched write's call is counted"
    );
    assert_eq!(
        postgres().sql(&name, calls),
        "1",
        "one call: the watched write's"
    );
}

#[test]
fn put_all_writes_everything_or_nothing() {
    on_both(|database| {
        let store = database.open();
        let seam = store.backend();
        let batch: Vec<_> = (0..200u64).map(|n| (be(n), be(n * 2))).collect();
        seam.put_all("b", batch.clone()).unwrap();
        let stored: Vec<_> = seam.scan("b", b"", None).map(|e| e.unwrap()).collect();
        assert_eq!(stored, batch);
        // One entry PostgreSQL cannot index (a key past its 2.7 KB row limit;
        // sled takes it): whatever the backend says, the batch lands whole or
        // not at all.
        let mut mixed: Vec<_> = (0..50u64)
            .map(|n| (be(1000 + n), b"new".to_vec()))
            .collect();
        mixed.push((random_bytes(10_000), b"huge".to_vec()));
        let written = seam.put_all("b", mixed).is_ok();
        let new = seam
            .scan("b", b"", None)
            .filter(|e| e.as_ref().unwrap().1 == b"new")
            .count();
        assert_eq!(new, if written { 50 } else { 0 }, "written: {written}");
        if let Database::Postgres(_) = database {
            assert!(!written, "PostgreSQL refuses the oversized key");
        }
        // Large batches (on PostgreSQL added by COPY while their keys are new):
        // all new; one over a key that is there already, which lands whole with
        // the key's new value; one with a key PostgreSQL refuses, which does not
        // land at all there.
        let large = |first: u64| -> Vec<Entry> {
            (first..first + 20)
                .map(|n| (be(n), vec![n as u8; 8192]))
                .collect()
        };
        seam.put_all("large", large(0)).unwrap();
        seam.put("large", &be(25), b"old").unwrap();
        seam.put_all("large", large(20)).unwrap();
        let stored: Vec<_> = seam.scan("large", b"", None).map(|e| e.unwrap()).collect();
        assert_eq!(stored, [large(0), large(20)].concat());
        let mut refused = large(100);
        refused.push((random_bytes(10_000), b"huge".to_vec()));
        let written = seam.put_all("large", refused).is_ok();
        let count = seam.scan("large", b"", None).count();
        assert_eq!(count, if written { 61 } else { 40 }, "written: {written}");
        if let Database::Postgres(_) = database {
            assert!(!written, "PostgreSQL refuses the oversized key");
        }
        // A key twice in one batch: the last value wins, as with puts in a row.
        let twice = vec![(be(7), b"first".to_vec()), (be(7), b"second".to_vec())];
        seam.put_all("twice", twice).unwrap();
        assert_eq!(seam.get("twice", &be(7)).unwrap().unwrap(), b"second");
    });
}

#[test]
fn subscriptions_hear_other_backends_within_a_second() {
    on_both(|database| {
        let (here, there) = (database.open(), database.open());
        let mut changes = here.backend().subscribe("watched").unwrap();
        let mut empty = here.backend().subscribe("quiet").unwrap();
        there.backend().put("unwatched", b"a", b"1").unwrap();
        there.backend().put("watched", b"k1", b"1").unwrap();
        let second = Duration::from_secs(1);
        assert_eq!(
            next_change(&mut changes, second),
            Some(Change::Key(b"k1".to_vec()))
        );
        there
            .backend()
            .compare_and_swap("watched", b"k1", Some(b"1"), None)
            .unwrap();
        there
            .backend()
            .put_all("watched", vec![(b"k2".to_vec(), b"2".to_vec())])
            .unwrap();
        assert_eq!(
            next_change(&mut changes, second),
            Some(Change::Key(b"k1".to_vec()))
        );
        assert_eq!(
            next_change(&mut changes, second),
            Some(Change::Key(b"k2".to_vec()))
        );
        assert_eq!(
            next_change(&mut empty, Duration::from_millis(300)),
            None,
            "another tree's writes are not heard"
        );
    });
}

/// PostgreSQL only: when the LISTEN connection is cut, subscribers get a resync
/// once it is back, and changes after it again.
#[test]
fn a_dropped_feed_reconnects_with_a_resync() {
    let url = postgres().fresh_database();
    let database = Database::Postgres(pg_settings(&url));
    let (here, there) = (database.open(), database.open());
    let mut changes = here.backend().subscribe("watched").unwrap();
    let cut = postgres().sql(
        database_of(&url),
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%' AND datname = current_database()",
    );
    assert_eq!(cut, "2", "both backends' feeds were cut");
    assert_eq!(
        next_change(&mut changes, Duration::from_secs(5)),
        Some(Change::Resync)
    );
    there.backend().put("watched", b"after", b"1").unwrap();
    assert_eq!(
        next_change(&mut changes, Duration::from_secs(1)),
        Some(Change::Key(b"after".to_vec()))
    );
}

/// PostgreSQL only: a database that refuses connections is reported by
/// `failure()` (so `/healthz` turns unhealthy), operations fail with an error,
/// and both recover by themselves once it answers again.
#[test]
fn an_unreachable_database_is_reported_and_recovers() {
    let url = postgres().fresh_database();
    let name = database_of(&url);
    let store = Database::Postgres(pg_settings(&url)).open();
    assert_eq!(store.failure(), None);
    assert!(!store.failure_is_sticky());
    refuse_connections(name);
    assert!(
        wait_until(Duration::from_secs(5), || store.failure().is_some()),
        "failure() reports the database"
    );
    let failure = store.failure().unwrap();
    assert!(failure.contains("cannot reach PostgreSQL"), "{failure}");
    let refused = store
        .backend()
        .put("t", b"k", b"v")
        .unwrap_err()
        .to_string();
    assert!(refused.contains("database error"), "{refused}");
    postgres().sql(
        "postgres",
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || store.failure().is_none()),
        "recovered: {:?}",
        store.failure()
    );
    store.backend().put("t", b"k", b"v").unwrap();
}

/// A store on a fresh PostgreSQL database, and that database's name.
fn fresh_postgres_store() -> (String, Arc<Store>) {
    let url = postgres().fresh_database();
    let store = Database::Postgres(pg_settings(&url)).open();
    (database_of(&url).to_string(), store)
}

/// Runs `locks` in a transaction on database `name` that then sleeps for 25 s,
/// past the backend's 15 s timeout, and rolls back; returns once it sleeps, so
/// that it holds what `locks` took.
fn hold_for_25s(name: &str, locks: &str) -> thread::JoinHandle<String> {
    let holder = {
        let (name, sql) = (
            name.to_string(),
            format!("BEGIN; {locks} SELECT pg_sleep(25); ROLLBACK;"),
        );
        thread::spawn(move || postgres().sql(&name, &sql))
    };
    let sleeping = "SELECT count(*) FROM pg_stat_activity \
                    WHERE wait_event = 'PgSleep' AND datname = current_database() \
                    AND pid <> pg_backend_pid()";
    assert!(
        wait_until(Duration::from_secs(10), || postgres().sql(name, sleeping)
            == "1"),
        "the other transaction holds its locks"
    );
    holder
}

/// How many statements on `kv` other than the holder's still run in `name`.
fn statements_running(name: &str) -> String {
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE state <> 'idle' AND query LIKE '%kv%' \
                   AND datname = current_database() \
                   AND query NOT LIKE '%pg_sleep%' AND pid <> pg_backend_pid()";
    postgres().sql(name, running)
}

/// PostgreSQL only: a write whose answer does not come in time may still commit
/// afterwards (here it waits for another transaction that holds its key past
/// the backend's 15 s timeout). `put_all` then writes the same entries again on
/// the same connection, which the server runs only after the first, so it
/// returns with the entries stored and no statement of its own still running,
/// instead of an error that a later commit would prove wrong (a transcript
/// sealed without a batch that lands later reads as altered).
#[test]
fn a_write_whose_answer_is_late_is_settled_before_it_returns() {
    let (name, store) = fresh_postgres_store();
    let holder = hold_for_25s(&name, "INSERT INTO kv VALUES ('t', '\\x6b', '\\x00');");
    let started = std::time::Instant::now();
    let value = vec![7u8; 100_000];
    store
        .backend()
        .put_all("t", vec![(b"k".to_vec(), value.clone())])
        .expect("stored once the other transaction is gone");
    assert!(
        started.elapsed() > Duration::from_secs(15),
        "the first try timed out ({:?})",
        started.elapsed()
    );
    assert_eq!(store.backend().get("t", b"k").unwrap(), Some(value));
    assert_eq!(statements_running(&name), "0", "a write still runs");
    holder.join().unwrap();
}

/// PostgreSQL only: a compare-and-swap or a delete whose answer does not come
/// in time is cancelled, and reported as not made: it never lands after the
/// caller took it as failed (a grant changed with no audit event, an audit
/// event for a change that was undone). Here each waits for another
/// transaction that holds its row past the 15 s timeout.
#[test]
fn a_change_whose_answer_is_late_is_cancelled_not_made_later() {
    let (name, store) = fresh_postgres_store();
    let seam = store.backend();
    seam.put("t", b"k", &[1]).unwrap();
    seam.put("t", b"gone", &[1]).unwrap();
    let holder = hold_for_25s(&name, "SELECT * FROM kv WHERE tree = 't' FOR UPDATE;");
    let swap = thread::spawn({
        let store = store.clone();
        move || {
            let started = std::time::Instant::now();
            let swapped = store
                .backend()
                .compare_and_swap("t", b"k", Some(&[1]), Some(&[9]));
            (swapped, started.elapsed())
        }
    });
    let started = std::time::Instant::now();
    let removed = seam.remove("t", b"gone");
    let remove_took = started.elapsed();
    let (swapped, swap_took) = swap.join().unwrap();
    for (what, outcome, took) in [
        ("swap", swapped.map(|_| ()), swap_took),
        ("remove", removed.map(|_| ()), remove_took),
    ] {
        let refused = outcome.expect_err(what).to_string();
        assert!(refused.contains("was not made"), "{what}: {refused}");
        assert!(
            took > Duration::from_secs(15) && took < Duration::from_secs(25),
            "{what} was cancelled after its first try timed out ({took:?})"
        );
    }
    assert_eq!(statements_running(&name), "0", "a change still runs");
    holder.join().unwrap();
    assert_eq!(seam.get("t", b"k").unwrap(), Some(vec![1]), "never swapped");
    assert_eq!(
        seam.get("t", b"gone").unwrap(),
        Some(vec![1]),
        "never removed"
    );
    assert!(seam
        .compare_and_swap("t", b"k", Some(&[1]), Some(&[9]))
        .unwrap());
}

/// PostgreSQL only: an operation that timed out keeps its connection until its
/// statement answers, so the next operation gets another connection instead of
/// queueing behind it on the one the pool would hand out first (here an
/// increment waits for another transaction's row past the 15 s timeout; the
/// pool holds that one connection, so without lingering the read would get it
/// and wait about 10 s).
#[test]
fn an_operation_that_timed_out_does_not_hold_up_the_next() {
    let (name, store) = fresh_postgres_store();
    let seam = store.backend();
    seam.put("t", b"k", b"v").unwrap();
    let holder = hold_for_25s(&name, "INSERT INTO counters VALUES ('x', 1);");
    let late = seam
        .increment("x")
        .expect_err("no answer in 15 s")
        .to_string();
    assert!(late.contains("no answer"), "{late}");
    let started = std::time::Instant::now();
    assert_eq!(seam.get("t", b"k").unwrap(), Some(b"v".to_vec()));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the read waited {:?} behind the increment",
        started.elapsed()
    );
    holder.join().unwrap();
}

/// PostgreSQL only: once a grant's change is stored, a store that refuses to
/// tidy the grant's index entries (here: a removal cancelled after waiting
/// 15 s for another transaction) does not fail the change, which would leave
/// it stored without its audit event. The entry left behind is skipped.
#[test]
fn a_revocation_whose_index_cannot_be_tidied_is_still_audited() {
    let (name, store) = fresh_postgres_store();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path());
    let grants = Grants::new(store.clone(), Notifier::new(None)).unwrap();
    let spec = shell_request();
    let grant = grants.file(&policy, USER, spec, Utc::now()).unwrap();
    grants
        .approve(&policy, &grant.id, "bob", None, Utc::now())
        .unwrap();
    let holder = hold_for_25s(
        &name,
        "SELECT * FROM kv WHERE tree = 'grants_live' FOR UPDATE;",
    );
    let started = std::time::Instant::now();
    grants
        .revoke(&policy, &grant.id, "bob", Some("done".into()), Utc::now())
        .expect("revoked although its live index entry stays");
    assert!(
        started.elapsed() > Duration::from_secs(15),
        "the removal waited"
    );
    holder.join().unwrap();
    assert!(
        grants.live().unwrap().is_empty(),
        "the stale entry is skipped"
    );
    let audit = portcullis::audit::AuditLog::open(&store).unwrap();
    let kinds: Vec<String> = audit
        .events()
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("request.revoked"),
        "{kinds:?}"
    );
}

/// PostgreSQL only: nodes starting at once on an empty database apply each
/// migration once; opening again changes nothing; a database from a newer
/// build is refused with a message that says so.
#[test]
fn migrations_are_idempotent_and_safe_at_concurrent_start() {
    let url = postgres().fresh_database();
    let name = database_of(&url);
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let settings = Settings::Postgres(pg_settings(&url));
            thread::spawn(move || Store::open(&settings, Path::new("/nonexistent")).map(drop))
        })
        .collect();
    for start in starts {
        start.join().unwrap().expect("every node starts");
    }
    let versions = || {
        postgres().sql(
            name,
            "SELECT string_agg(version::text, ',') FROM schema_migrations",
        )
    };
    let applied = versions();
    let expected: Vec<String> = (1..=portcullis::store::SCHEMA_VERSION)
        .map(|v| v.to_string())
        .collect();
    assert_eq!(applied, expected.join(","));
    Database::Postgres(pg_settings(&url)).open();
    assert_eq!(versions(), applied, "a second start applies nothing");

    postgres().sql(name, "INSERT INTO schema_migrations (version) VALUES (999)");
    let refused = Store::open(
        &Settings::Postgres(pg_settings(&url)),
        Path::new("/nonexistent"),
    )
    .err()
    .expect("a newer schema is refused")
    .to_string();
    assert!(
        refused.contains("schema version 999") && refused.contains("newer"),
        "{refused}"
    );
}

/// PostgreSQL only: a database as schema version 2 left it (one notify trigger
/// for every row, a watched tree, 1 MiB pieces TOASTed) is brought to the
/// current schema at the next start: the watched tree gets its own pair of
/// triggers and keeps notifying, the all-rows trigger is gone, and pieces
/// written before still read. Nodes subscribing to a new tree at once all
/// start, and the tree gets one pair.
#[test]
fn an_older_schema_is_upgraded_and_keeps_notifying() {
    let url = postgres().fresh_database();
    let name = database_of(&url);
    let store = Database::Postgres(pg_settings(&url)).open();
    let old_piece = vec![3u8; 1024 * 1024];
    store.backend().put("chunks", &be(1), &old_piece).unwrap();
    drop(store);
    // Back to what version 2 left (its trigger function, called for every row,
    // looked the tree up itself; which body it has does not matter here).
    postgres().sql(
        name,
        "INSERT INTO watched_trees (tree) VALUES ('requests'); \
         DO $$ DECLARE t text; BEGIN \
           FOR t IN SELECT tgname FROM pg_trigger \
                    WHERE tgrelid = 'kv'::regclass AND NOT tgisinternal LOOP \
             EXECUTE format('DROP TRIGGER %I ON kv', t); \
           END LOOP; END $$; \
         DROP FUNCTION portcullis_watch(text); \
         ALTER TABLE kv RESET (toast_tuple_target); \
         CREATE TRIGGER kv_notify AFTER INSERT OR UPDATE OR DELETE ON kv \
           FOR EACH ROW EXECUTE FUNCTION portcullis_kv_notify(); \
         DELETE FROM schema_migrations WHERE version > 2;",
    );
    let triggers = || {
        postgres().sql(
            name,
            "SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger \
             WHERE tgrelid = 'kv'::regclass AND NOT tgisinternal",
        )
    };
    assert_eq!(triggers(), "kv_notify");
    let (listener, writer) = (
        Database::Postgres(pg_settings(&url)).open(),
        Database::Postgres(pg_settings(&url)).open(),
    );
    let pair = |tree: &str| {
        let hash = postgres().sql(name, &format!("SELECT md5('{tree}')"));
        format!("kv_notify_{hash}_d,kv_notify_{hash}_w")
    };
    assert_eq!(triggers(), pair("requests"), "the watched tree's pair only");
    assert_eq!(
        listener.backend().get("chunks", &be(1)).unwrap(),
        Some(old_piece)
    );
    let mut feed = listener.backend().subscribe("requests").unwrap();
    writer.backend().put("requests", b"k", b"v").unwrap();
    assert_eq!(
        next_change(&mut feed, Duration::from_secs(5)),
        Some(Change::Key(b"k".to_vec()))
    );

    let subscribed = on_threads(&Database::Postgres(pg_settings(&url)), 6, |store| {
        store.backend().subscribe("grants").map(drop)
    });
    assert!(subscribed.iter().all(Result::is_ok), "{subscribed:?}");
    let expected = [pair("grants"), pair("requests")];
    let mut expected: Vec<&str> = expected.iter().flat_map(|p| p.split(',')).collect();
    expected.sort();
    assert_eq!(triggers(), expected.join(","));
}

/// TLS by default: a URL without `sslmode` gets `require`, and the server's
/// certificate must chain to `ca_file` (or the system's roots, which do not know
/// the test CA) and name the host.
#[test]
fn tls_is_required_and_verified_unless_turned_off() {
    let url = postgres().fresh_database();
    let tls_url = url.replace("?sslmode=disable", "");
    let open = |url: &str, ca_file: Option<&Path>| {
        let settings = PgSettings {
            ca_file: ca_file.map(Path::to_path_buf),
            ..pg_settings(url)
        };
        Store::open(&Settings::Postgres(settings), Path::new("/nonexistent"))
    };
    let store = open(&tls_url, Some(postgres().ca_file())).expect("TLS with the test CA");
    store.backend().put("t", b"k", b"v").unwrap();
    let encrypted = postgres().sql(
        database_of(&url),
        "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE datname = current_database() AND application_name = 'portcullis'",
    );
    assert_eq!(encrypted, "t", "every connection of the backend uses TLS");
    let unknown = open(&tls_url, None)
        .err()
        .expect("an unknown CA is refused");
    assert!(unknown.to_string().contains("certificate"), "{unknown}");
    // The same server under a name its certificate does not carry.
    let wrong_name = tls_url.replace("@127.0.0.1:", "@not-the-server:") + "?hostaddr=127.0.0.1";
    let refused = open(&wrong_name, Some(postgres().ca_file()))
        .err()
        .expect("a certificate for another name is refused");
    assert!(refused.to_string().contains("certificate"), "{refused}");
    let not_pem = postgres().password_file();
    let err = open(&tls_url, Some(not_pem))
        .err()
        .expect("a CA file that is no PEM");
    assert!(err.to_string().contains("ca_file"), "{err}");
}

/// The test policies (as `World` writes them) in `dir`, with throwaway keys.
fn policy(dir: &Path) -> portcullis::policy::Policy {
    let users = [(USER, GROUP), ("bob", "sre-leads")]
        .map(|(name, group)| {
            let key = keygen(&dir.join(name), name);
            (name.to_string(), key, vec![group.to_string()])
        })
        .to_vec();
    Policies {
        users,
        cert_target: None,
        target_address: "127.0.0.1:1".into(),
        target_host_key: keygen(&dir.join("host"), "host"),
        logins: default_logins(),
    }
    .write(&dir.join("policies"));
    portcullis::policy::load_dir(&dir.join("policies")).expect("test policies load")
}

/// A request for a shell on `prod` (see [`policy`]).
fn shell_request() -> RequestSpec {
    RequestSpec {
        target: "prod".into(),
        login: None,
        scope: Scope {
            shell: true,
            ..Scope::default()
        },
        ttl: None,
        reason: "INC-1".into(),
    }
}

/// Two bastions on one database: a grant approved through one and revoked
/// through the other wakes the watch of a session on the first within a
/// second, the changed grant in hand (sled: two grant services on one store).
#[test]
fn a_revocation_on_one_bastion_wakes_a_watch_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Arc::new(policy(dir.path()));
    on_both(|database| {
        let node_a = Grants::new(database.open(), Notifier::new(None)).unwrap();
        let node_b = Grants::new(database.open(), Notifier::new(None)).unwrap();
        let spec = shell_request();
        let grant = node_a.file(&policy, USER, spec, Utc::now()).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut session = node_a.watch(&grant.id).unwrap();
            assert_eq!(session.borrow_and_update().state, GrantState::Pending);
            for (change, state) in [
                ("approve", GrantState::Approved),
                ("revoke", GrantState::Revoked),
            ] {
                let (node_b, policy, id) = (node_b.clone(), policy.clone(), grant.id.clone());
                let decide = move || match change {
                    "approve" => node_b.approve(&policy, &id, "bob", None, Utc::now()),
                    _ => node_b.revoke(&policy, &id, "bob", Some("done".into()), Utc::now()),
                };
                tokio::task::spawn_blocking(decide).await.unwrap().unwrap();
                tokio::time::timeout(Duration::from_secs(1), session.changed())
                    .await
                    .unwrap_or_else(|_| panic!("node A heard node B {change} within a second"))
                    .unwrap();
                assert_eq!(session.borrow_and_update().state, state);
            }
        });
    });
}

/// The real bastion on PostgreSQL: a request, its approval, a real ssh session
/// through it, and an audit chain that verifies; nothing lands in sled.
#[test]
fn the_bastion_serves_from_postgres() {
    let url = postgres().fresh_database();
    let world = World::start_with(WorldOptions {
        extra_config: postgres().store_config(&url),
        ..WorldOptions::default()
    });
    let out = world.ok(
        &world.alice,
        &["request", "prod", "--shell", "--reason", "INC-7", "--json"],
    );
    let request: serde_json::Value = serde_json::from_str(&out).expect("json");
    let id = request["id"].as_str().expect("id");
    world.ok(&world.bob, &["approve", id]);
    // Output that does not compress, so its batches are stored in pieces, in
    // several writes (a `COPY` of several messages each), all of which
    // verifying reads back.
    let session = world.alice.ssh(
        &format!("{}@prod", login_user()),
        &["echo from-pg; head -c 10000000 /dev/urandom"],
    );
    assert_success(&session, "ssh through the bastion on PostgreSQL");
    assert!(text(&session.stdout).contains("from-pg"));
    assert!(session.stdout.len() > 10_000_000);
    // `ok` asserts that it exits 0: the chain and the recordings verify.
    world.ok(&world.dave, &["audit", "verify", "--recordings"]);
    let pieces = postgres().sql(
        database_of(&url),
        "SELECT count(*) FROM kv WHERE tree = 'chunks' AND octet_length(value) > 7000",
    );
    assert!(
        pieces.parse::<u32>().unwrap() >= 1_200,
        "the output went in pieces: {pieces}"
    );
    assert!(
        !world.bastion.data_dir().join("db").exists(),
        "no sled database"
    );
    let grants = postgres().sql(
        database_of(&url),
        "SELECT count(*) FROM kv WHERE tree = 'requests'",
    );
    assert_eq!(grants, "1");
}

/// The real bastion while its database refuses connections: `/healthz` says
/// so (503), a request is refused with an error rather than left hanging, and
/// once the database answers again the same bastion (not restarted) is
/// healthy and files requests.
#[test]
fn the_bastion_waits_out_an_unreachable_database() {
    let url = postgres().fresh_database();
    let name = database_of(&url);
    let metrics = free_port();
    let mut world = World::start_with(WorldOptions {
        extra_config: format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n{}",
            postgres().store_config(&url)
        ),
        ..WorldOptions::default()
    });
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    refuse_connections(name);
    let mut health = (0, String::new());
    assert!(
        wait_until(Duration::from_secs(5), || {
            health = http_get(metrics, "/healthz");
            health.0 == 503
        }),
        "healthz: {health:?}"
    );
    assert!(health.1.contains("cannot reach PostgreSQL"), "{health:?}");
    let request = ["request", "prod", "--shell", "--reason", "INC-9"];
    let refused = world.control_as(&world.alice, &request);
    assert_failure_mentions(&refused, "a request", &["cannot reach PostgreSQL"]);
    postgres().sql(
        "postgres",
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || http_get(metrics, "/healthz").0
            == 200),
        "healthy again\n{}",
        world.logs()
    );
    assert!(world.bastion.is_running(), "waited out, not restarted");
    world.ok(&world.alice, &request);
}

/// A bastion whose database cannot be reached does not start, and says where
/// it tried; a password in the URL is refused before anything is opened.
#[test]
fn a_bad_store_config_stops_the_bastion_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    policy(dir.path());
    let closed = free_port();
    for (store, expected) in [
        (
            format!("url = \"postgres://portcullis@127.0.0.1:{closed}/x?sslmode=disable\"\nconnect_timeout = \"1s\""),
            format!("PostgreSQL at postgres://portcullis@127.0.0.1:{closed}/x"),
        ),
        (
            "url = \"postgres://portcullis:hunter2@127.0.0.1/x\"".to_string(),
            "put it in password_file".to_string(),
        ),
    ] {
        let config = dir.path().join("portcullis.toml");
        fs::write(
            &config,
            format!("listen = \"127.0.0.1:{}\"\ndata_dir = \"data\"\npolicies = \"policies\"\n[store]\nbackend = \"postgres\"\n{store}\n", free_port()),
        )
        .unwrap();
        let out = run_with_timeout(
            Command::new(Bastion::binary()).args(["serve", "--config"]).arg(&config),
            None,
            COMMAND_TIMEOUT,
        );
        assert_failure_mentions(&out, "serve on a bad [store]", &[&expected]);
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("hunter2") && !stderr.contains("panicked"), "{stderr}");
    }
}

/// Makes database `name` refuse new connections and ends those it has: an
/// unreachable database, as the bastion sees it.
fn refuse_connections(name: &str) {
    postgres().sql(
        "postgres",
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
    );
    postgres().sql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    );
}

/// `store migrate` copies values as they are, so it refuses to move PostgreSQL's
/// 1 MiB transcript pieces into sled (which keeps large values in memory), and
/// says which way works; nothing is written.
#[test]
fn migrating_from_postgres_back_to_sled_is_refused() {
    let (pg, sled) = (Database::postgres(), Database::sled());
    let (from, to) = (pg.open(), sled.open());
    from.backend().put("t", b"k", b"v").unwrap();
    let refused = portcullis::store::migrate::copy(from.backend(), to.backend(), |_| {})
        .expect_err("PostgreSQL's pieces do not suit sled");
    assert!(
        refused.to_string().contains("from sled into PostgreSQL"),
        "{refused}"
    );
    assert!(to.backend().trees().unwrap().is_empty(), "nothing written");
}
