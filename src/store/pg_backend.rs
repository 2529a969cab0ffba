//! The seam on PostgreSQL, for several bastions sharing one database.
//!
//! Tables (created by the versioned migrations below, applied at open):
//! - `kv(tree text, key bytea, value bytea, primary key (tree, key))`: every
//!   tree of the seam. `bytea` compares byte by byte, so scans come back in the
//!   same order as sled's.
//! - `counters(name text primary key, value bigint)`: [`Backend::increment`].
//! - `watched_trees(tree text primary key)`: the trees some bastion subscribed
//!   to. For each, a pair of triggers on `kv` (`portcullis_watch`) sends
//!   `pg_notify('portcullis_kv', tree:hexkey)` for writes to that tree only, so
//!   transcript writes cost neither a notification nor a trigger call.
//! - `schema_migrations(version, applied_at)`: which migrations ran.
//!
//! Every atomic operation is one statement, atomic across nodes under
//! PostgreSQL's default isolation (read committed): compare-and-swap is an
//! `INSERT … ON CONFLICT DO NOTHING` or an `UPDATE`/`DELETE … WHERE value = $old`
//! (a concurrent writer makes PostgreSQL re-check the `WHERE` against the row
//! it committed), counters are one upsert with `RETURNING`, and `put_all` is one
//! statement: a `COPY` when its keys are new and it is large (a recording's
//! flush), an upsert otherwise.
//!
//! **Why a runtime of its own.** The seam is synchronous (sled is), and it is
//! called from tokio's blocking pool and, for the background jobs' quick reads,
//! from the main runtime's worker threads (never from a connection's shard,
//! which carries many sessions on one thread). The driver is async. `Handle::block_on` panics on a
//! worker thread, and `block_in_place` stalls the other tasks of that worker and
//! panics on a current-thread runtime. So the backend owns a small runtime
//! (two threads) that runs the driver, its pool and the LISTEN connection; a
//! caller hands it the work and waits for the answer on a channel, which is
//! legal from any thread. A worker thread that calls in waits one database
//! round trip, as it would for a sled read that misses the cache.
//!
//! **Change feed.** One connection per backend does `LISTEN portcullis_kv` and
//! hands each notification to the subscribers of its tree. When that
//! connection drops, it reconnects every second; once listening again, every
//! subscriber gets a resync marker (notifications sent meanwhile are lost).
//!
//! **Health.** [`Backend::failure`] reports the database as unreachable while
//! the LISTEN connection is down, or for a few seconds after an operation
//! failed for want of a connection; both clear by themselves once the server
//! answers again.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use futures_util::SinkExt;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::types::ToSql;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::feed::{Change, Fanout};
use super::{Backend, Entry, Removed, Result, Scan, StoreError, Subscription};

/// Longest one operation may take, waiting for a pooled connection included:
/// past it the caller gets an error instead of hanging on a database that does
/// not answer. (A write whose answer is late is settled instead: a plain write
/// by a second try on the same connection, see [`PgBackend::write_entries`], a
/// compare-and-swap or delete by a cancel, see [`settle_change`].)
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest a write or change that settles its outcome may take: the pool's wait,
/// a first try of [`OPERATION_TIMEOUT`], the settling (a second try, or a cancel
/// and its answer) until twice that, and a margin so that those deadlines, not
/// this one, end it.
const SETTLED_WITHIN: Duration = Duration::from_secs(OPERATION_TIMEOUT.as_secs() * 3 + 5);

/// How long an operation that timed out may keep its connection out of the pool
/// while its statement still runs (see [`PgBackend::attempt`]): past it the
/// connection goes back to the pool regardless.
const LINGER: Duration = Duration::from_secs(OPERATION_TIMEOUT.as_secs() * 2);

/// Rows one page of a scan fetches at most.
const SCAN_PAGE: i64 = 128;

/// Value bytes after which a page of a scan ends (it holds at most this plus one
/// value of at most [`Backend::largest_piece`] when the values are transcript pieces).
const SCAN_PAGE_BYTES: i64 = 4 * 1024 * 1024;

/// From how many bytes `put_all` first tries to add its entries by `COPY`
/// ([`copy_new`]): bulk transcript writes are above it, a grant or an index
/// entry far below (those often overwrite, which `COPY` cannot).
const COPY_FROM_BYTES: usize = 64 * 1024;

/// How long after a failed operation the database still counts as unreachable.
const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// How long the LISTEN connection waits before it reconnects.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// The notification channel of the change feed.
const CHANNEL: &str = "portcullis_kv";

/// The advisory lock that serialises migrations between nodes starting at once.
const MIGRATION_LOCK: i64 = 0x706f_7274_6375_6c6c; // "portcull"

/// The schema, one migration per version, applied in order, each in its own
/// transaction. Never edit one that shipped: add the next.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE kv (
    tree text NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (tree, key)
);
CREATE TABLE counters (
    name text PRIMARY KEY,
    value bigint NOT NULL
);
CREATE TABLE watched_trees (
    tree text PRIMARY KEY
);
-- Notifies the subscribers of a watched tree; a key too long for a
-- notification's 8000 bytes is sent empty, which subscribers take as a resync.
CREATE FUNCTION portcullis_kv_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed kv;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    IF EXISTS (SELECT 1 FROM watched_trees WHERE tree = changed.tree) THEN
        PERFORM pg_notify('portcullis_kv', changed.tree || ':' ||
            CASE WHEN length(changed.key) <= 3000 THEN encode(changed.key, 'hex') ELSE '' END);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER kv_notify AFTER INSERT OR UPDATE OR DELETE ON kv
    FOR EACH ROW EXECUTE FUNCTION portcullis_kv_notify();
"#,
    ),
    (
        2,
        // Values come compressed when they compress (transcripts are zstd'd by
        // `record`, the rest is small JSON): PostgreSQL's own TOAST compression
        // would only spend CPU trying again on incompressible bytes.
        r#"
ALTER TABLE kv ALTER COLUMN value SET STORAGE EXTERNAL;
"#,
    ),
    (
        3,
        // A row up to a page (8160 bytes) stays in its page instead of having
        // its value cut into TOAST chunks of 2 KB, each one more row and index
        // entry: transcript pieces of `INLINE_PIECE_BYTES` are one row each.
        r#"
ALTER TABLE kv SET (toast_tuple_target = 8160);
"#,
    ),
    (
        4,
        // One trigger for every row of every tree cost a PL/pgSQL call per row
        // (about 1 s of the server's CPU per GiB of transcript pieces, where the
        // rest of a `COPY` costs 2.3 to 3.1 s); a trigger per watched tree whose
        // `WHEN` names the tree costs the other trees' rows one comparison.
        r#"
DROP TRIGGER kv_notify ON kv;
CREATE OR REPLACE FUNCTION portcullis_kv_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed kv;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    PERFORM pg_notify('portcullis_kv', changed.tree || ':' ||
        CASE WHEN length(changed.key) <= 3000 THEN encode(changed.key, 'hex') ELSE '' END);
    RETURN NULL;
END
$$;
-- Makes every write to `watched` notify, for the whole cluster: its row in
-- watched_trees, and two triggers (PostgreSQL's WHEN sees NEW on writes, OLD on
-- deletes) named after a hash of the tree. Serialised, so that two nodes that
-- subscribe at once do not both create them.
CREATE FUNCTION portcullis_watch(watched text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    name text := 'kv_notify_' || md5(watched);
BEGIN
    PERFORM pg_advisory_xact_lock(8101820099207459939); -- "portwatc"
    INSERT INTO watched_trees (tree) VALUES (watched) ON CONFLICT DO NOTHING;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'kv'::regclass AND tgname = name || '_w') THEN
        BEGIN
            EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE ON kv FOR EACH ROW '
                           'WHEN (NEW.tree = %L) EXECUTE FUNCTION portcullis_kv_notify()',
                           name || '_w', watched);
            EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON kv FOR EACH ROW '
                           'WHEN (OLD.tree = %L) EXECUTE FUNCTION portcullis_kv_notify()',
                           name || '_d', watched);
        EXCEPTION WHEN duplicate_object THEN
            -- Made by another node meanwhile (a snapshot older than its commit,
            -- under an isolation level above read committed).
            NULL;
        END;
    END IF;
END
$$;
SELECT portcullis_watch(tree) FROM watched_trees;
"#,
    ),
];

/// The transcript piece this backend asks for ([`Backend::piece_bytes`]): one
/// row that fits in a heap page with its tree and key (an 8 KiB page holds one
/// row of up to 8160 bytes, with 24 of header), so that PostgreSQL stores it as
/// it is. A larger value is cut into TOAST chunks of about 2 KB, each a row of
/// the TOAST table and an entry of its index: binary `COPY`s of 1 GiB of random
/// pieces, a MiB per statement, cost PostgreSQL 15 4.0 to 5.1 s of CPU in 1 MiB
/// values and 2.3 to 2.6 s in 8000-byte rows (README, Performance, "Pieces that
/// stay in their row").
const INLINE_PIECE_BYTES: usize = 8000;

/// The pieces of builds before schema version 3 (1 MiB, TOASTed), which a
/// database may still hold; a scan page is sized for them ([`SCAN_PAGE_BYTES`]).
const LARGEST_PIECE_BYTES: usize = 1024 * 1024;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// How to reach the database (`[store]` with `backend = "postgres"`).
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/db?sslmode=…`, without a password.
    pub url: String,
    /// Where the password is; [`PASSWORD_ENV`] when `None`. Read when the
    /// database is opened, so that commands that only read the config (`reload`,
    /// `policy check`) need no access to it.
    pub password_file: Option<PathBuf>,
    /// Connections the pool keeps at most (the LISTEN connection is one more).
    pub pool_size: usize,
    /// How long opening one connection may take.
    pub connect_timeout: Duration,
    /// PEM file of the certificate authorities that sign the server's
    /// certificate; the system's roots when `None`.
    pub ca_file: Option<PathBuf>,
}

/// The environment variable that holds the database password when
/// `password_file` is not set.
pub const PASSWORD_ENV: &str = "PORTCULLIS_STORE_PASSWORD";

/// `pool_size` when the config does not say.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// `connect_timeout` when the config does not say.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl PgSettings {
    /// The URL parsed. Refuses a URL that holds a password (it belongs in
    /// `password_file`), without repeating it. A URL that names no `sslmode`
    /// gets `require` (the driver's own default, `prefer`, lets anyone on the
    /// path turn TLS off by answering that the server has none).
    pub fn parse_url(&self) -> Result<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self.url.parse().map_err(|err| {
            StoreError::Backend(format!(
                "[store] url is not a PostgreSQL URL ({err}); write it as postgres://USER@HOST:PORT/DATABASE, with sslmode=disable, prefer or require"
            ))
        })?;
        if config.get_password().is_some() {
            return Err(StoreError::Backend(format!(
                "[store] url holds a password; remove it from the url and put it in password_file (or the {PASSWORD_ENV} environment variable)"
            )));
        }
        if !self.url.contains("sslmode") {
            config.ssl_mode(SslMode::Require);
        }
        Ok(config)
    }

    /// The driver's settings: the URL parsed, the password added, keepalives
    /// short enough that a dead server is noticed within half a minute.
    fn driver_config(&self) -> Result<tokio_postgres::Config> {
        let mut config = self.parse_url()?;
        if let Some(password) = self.password()? {
            config.password(password);
        }
        config
            .connect_timeout(self.connect_timeout)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .application_name("portcullis");
        Ok(config)
    }

    /// The first line of `password_file`, or [`PASSWORD_ENV`].
    fn password(&self) -> Result<Option<String>> {
        let Some(path) = &self.password_file else {
            return Ok(std::env::var(PASSWORD_ENV).ok());
        };
        let unreadable = |err: std::io::Error| {
            StoreError::Backend(format!("[store] password_file {}: {err}", path.display()))
        };
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(path).map_err(unreadable)?.permissions(),
        );
        if mode & 0o077 != 0 {
            return Err(StoreError::Backend(format!(
                "[store] password_file {} is open to other users (mode {:o}); it holds the database password. Run: chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(unreadable)?;
        match text.lines().next() {
            Some(line) if !line.is_empty() => Ok(Some(line.to_string())),
            _ => Err(StoreError::Backend(format!(
                "[store] password_file {} is empty; write the database password on its first line",
                path.display()
            ))),
        }
    }
}

/// Why an operation failed, and whether that means the server cannot be reached.
struct PgError {
    message: String,
    unreachable: bool,
}

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> PgError {
        match err.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                PgError {
                    message: format!("{} (SQLSTATE {code})", db.message()),
                    // Connection exceptions, out of resources, shutting down.
                    unreachable: ["08", "53", "57"].iter().any(|c| code.starts_with(c)),
                }
            }
            None => PgError {
                message: chain(&err),
                unreachable: true,
            },
        }
    }
}

impl From<PgError> for StoreError {
    fn from(err: PgError) -> StoreError {
        StoreError::Backend(err.message)
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(err: deadpool_postgres::PoolError) -> PgError {
        match err {
            deadpool_postgres::PoolError::Backend(err) => err.into(),
            other => PgError {
                message: format!("no database connection: {}", chain(&other)),
                unreachable: true,
            },
        }
    }
}

/// An error and its causes, on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

type PgResult<T> = std::result::Result<T, PgError>;

/// What the backend's runtime shares with its tasks.
struct Shared {
    pool: Pool,
    subscribers: Fanout,
    health: Health,
    /// How the pool connects, for the cancel requests of [`settle_change`].
    tls: MakeRustlsConnect,
}

impl Shared {
    /// A pooled connection, within [`OPERATION_TIMEOUT`] whatever the pool's
    /// wait and connect timeouts add up to, so that the deadlines of a write or
    /// change that settles its outcome come before [`SETTLED_WITHIN`].
    async fn client(&self) -> PgResult<deadpool_postgres::Object> {
        match tokio::time::timeout(OPERATION_TIMEOUT, self.pool.get()).await {
            Ok(client) => Ok(client?),
            Err(_) => Err(no_answer(OPERATION_TIMEOUT)),
        }
    }
}

/// Whether the database answers, as the LISTEN connection and the last failed
/// operation saw it.
#[derive(Default)]
struct Health {
    /// Why the LISTEN connection is down, and whether connecting again has
    /// failed since (then the server is taken as unreachable).
    listener_down: Mutex<Option<(String, bool)>>,
    failed: Mutex<Option<(Instant, String)>>,
}

impl Health {
    fn note<T>(&self, result: &PgResult<T>) {
        let mut failed = self.failed.lock().expect("health lock poisoned");
        match result {
            Ok(_) => *failed = None,
            Err(err) if err.unreachable => *failed = Some((Instant::now(), err.message.clone())),
            Err(_) => {}
        }
    }

    fn listener(&self, down: Option<(String, bool)>) {
        *self.listener_down.lock().expect("health lock poisoned") = down;
    }

    /// Why the LISTEN connection is down, if it is; with `unreachable`, only
    /// when connecting again has failed too.
    fn listener_down(&self, unreachable: bool) -> Option<String> {
        let down = self.listener_down.lock().expect("health lock poisoned");
        match &*down {
            Some((why, failed_again)) if *failed_again || !unreachable => {
                Some(format!("cannot reach PostgreSQL: {why}"))
            }
            _ => None,
        }
    }

    fn failure(&self) -> Option<String> {
        if let Some(down) = self.listener_down(false) {
            return Some(down);
        }
        let failed = self.failed.lock().expect("health lock poisoned");
        match &*failed {
            Some((at, message)) if at.elapsed() < FAILURE_HOLD => {
                Some(format!("cannot reach PostgreSQL: {message}"))
            }
            _ => None,
        }
    }
}

pub struct PgBackend {
    shared: Arc<Shared>,
    /// `Some` until drop, which shuts it down without waiting (dropping a
    /// runtime inside another one would panic).
    runtime: Option<tokio::runtime::Runtime>,
}

impl PgBackend {
    /// Connects, applies the migrations this database lacks (refusing one whose
    /// schema is newer than this build) and starts the change feed.
    pub fn open(settings: &PgSettings) -> Result<PgBackend> {
        let config = settings.driver_config()?;
        let tls = tls(config.get_ssl_mode(), settings)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("portcullis-pg")
            .enable_all()
            .build()
            .map_err(|err| {
                StoreError::Backend(format!("cannot start the database runtime: {err}"))
            })?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(OPERATION_TIMEOUT))
            .create_timeout(Some(settings.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|err| {
                StoreError::Backend(format!("cannot build the connection pool: {err}"))
            })?;
        let backend = PgBackend {
            shared: Arc::new(Shared {
                pool,
                subscribers: Fanout::default(),
                health: Health::default(),
                tls: tls.clone(),
            }),
            runtime: Some(runtime),
        };
        backend
            .call(|shared| async move { migrate(&mut shared.client().await?).await })
            .map_err(|err| {
                StoreError::Backend(format!(
                    "PostgreSQL at {}: {}",
                    settings.url,
                    err.to_string().trim_start_matches("database error: ")
                ))
            })?;
        // Subscriptions made once `open` returns hear every change after them.
        let (ready, listening) = std::sync::mpsc::sync_channel(1);
        let shared = backend.shared.clone();
        backend.runtime().spawn(listen(shared, config, tls, ready));
        listening
            .recv_timeout(settings.connect_timeout + OPERATION_TIMEOUT)
            .map_err(|_| {
                StoreError::Backend(format!(
                    "PostgreSQL at {}: the change feed could not LISTEN: {}",
                    settings.url,
                    backend.failure().unwrap_or_else(|| "no answer".into())
                ))
            })?;
        Ok(backend)
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    /// Runs `work` on the backend's runtime and waits for its answer (see the
    /// module comment: safe from any thread).
    fn call<T, F>(&self, work: impl FnOnce(Arc<Shared>) -> F + Send + 'static) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = PgResult<T>> + Send + 'static,
    {
        Ok(self.attempt(OPERATION_TIMEOUT, work)?)
    }

    /// [`PgBackend::call`] with a timeout of its own, keeping the driver's error.
    fn attempt<T, F>(
        &self,
        timeout: Duration,
        work: impl FnOnce(Arc<Shared>) -> F + Send + 'static,
    ) -> PgResult<T>
    where
        T: Send + 'static,
        F: Future<Output = PgResult<T>> + Send + 'static,
    {
        // While the feed cannot connect, the server is unreachable: fail now
        // rather than hold the caller (perhaps a runtime worker thread) for the
        // whole operation timeout.
        if let Some(down) = self.shared.health.listener_down(true) {
            return Err(PgError {
                message: down,
                unreachable: true,
            });
        }
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let shared = self.shared.clone();
        self.runtime().spawn(async move {
            let mut work = std::pin::pin!(work(shared.clone()));
            let (result, timed_out) = match tokio::time::timeout(timeout, &mut work).await {
                Ok(result) => (result, false),
                Err(_) => (Err(no_answer(timeout)), true),
            };
            shared.health.note(&result);
            let _ = answer.send(result);
            if timed_out {
                // The caller has its answer. The work keeps its connection until
                // the statement on it answers, so that the pool does not hand the
                // next operation a connection busy with it (where a cancel sent
                // for the next one could end this one instead).
                let _ = tokio::time::timeout(LINGER, work).await;
            }
        });
        answered.recv().unwrap_or_else(|_| {
            Err(PgError {
                message: "the database runtime stopped".into(),
                unreachable: true,
            })
        })
    }

    /// Writes `keys` and `values` (see [`Backend::put_all`]) and settles the
    /// outcome when the answer is late: a statement that did not answer within
    /// [`OPERATION_TIMEOUT`] may still commit, so the same entries are written
    /// again by upsert on the same connection, where the server runs it only
    /// once it is done with the first (committed or not). When that answers,
    /// the entries are stored and nothing of the first try can land later. If it
    /// fails or does not answer either, the write fails with its outcome
    /// unknown, and an unanswered connection is closed rather than pooled with
    /// statements still queued on it. Counted from when the connection is in
    /// hand, the first try has [`OPERATION_TIMEOUT`], the second until twice that.
    fn write_entries(&self, tree: &str, keys: Vec<Vec<u8>>, values: Vec<Bytes>) -> PgResult<()> {
        let tree = tree.to_string();
        self.attempt(SETTLED_WITHIN, move |shared| async move {
            let client = shared.client().await?;
            let started = tokio::time::Instant::now();
            // A `let` of its own: the first try (a `COPY` still streaming
            // included) is dropped before anything else goes on the connection.
            let first = tokio::time::timeout_at(
                started + OPERATION_TIMEOUT,
                write_on(&client, &tree, &keys, &values, true),
            )
            .await;
            if let Ok(written) = first {
                return written;
            }
            tracing::warn!(
                tree,
                "no answer to a write yet; writing it again to settle it"
            );
            let settled = tokio::time::timeout_at(
                started + OPERATION_TIMEOUT * 2,
                write_on(&client, &tree, &keys, &values, false),
            )
            .await;
            settled.unwrap_or_else(|_| {
                drop(deadpool_postgres::Object::take(client));
                Err(no_answer(OPERATION_TIMEOUT * 2))
            })
        })
    }

    /// One page of a scan: up to [`SCAN_PAGE`] entries of `tree` from `from`
    /// (inclusive) and below `until`.
    fn page(&self, tree: &str, from: Vec<u8>, until: Option<Vec<u8>>) -> Result<Vec<Entry>> {
        let tree = tree.to_string();
        self.call(move |shared| async move {
            let client = shared.client().await?;
            // Two statements rather than `($3 IS NULL OR key < $3)`: in the
            // generic plan PostgreSQL settles on after a few runs, that would
            // filter rows instead of bounding the index scan, and a short prefix
            // scan would walk the rest of the tree.
            let statement = client.prepare_cached(page_query(until.is_some())).await?;
            let mut params: Vec<&(dyn ToSql + Sync)> =
                vec![&tree, &from, &SCAN_PAGE, &SCAN_PAGE_BYTES];
            if let Some(until) = &until {
                params.push(until);
            }
            let rows = client.query(&statement, &params).await?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The roots the server's certificate must chain to: `ca_file`, or the
/// system's. Certificates and names are always verified when TLS is used.
fn tls(mode: SslMode, settings: &PgSettings) -> Result<MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &settings.ca_file {
        let bad = |err: &dyn std::fmt::Display| {
            StoreError::Backend(format!("[store] ca_file {}: {err}", path.display()))
        };
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))?;
        for cert in certs {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        if roots.is_empty() {
            return Err(bad(&"holds no PEM certificate"));
        }
    } else if mode != SslMode::Disable {
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system root rustls cannot parse is one the server cannot use.
            let _ = roots.add(cert);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| StoreError::Backend(format!("TLS settings: {err}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Applies the migrations the database lacks, each in a transaction that holds
/// the migration lock, so two nodes starting together apply each one once.
async fn migrate(client: &mut deadpool_postgres::Client) -> PgResult<()> {
    for (version, sql) in MIGRATIONS {
        let transaction = client.transaction().await?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (\
                 version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        let applied: i64 = transaction
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .get(0);
        if applied > SCHEMA_VERSION {
            return Err(PgError {
                message: format!(
                    "the database has schema version {applied}, newer than this portcullis knows ({SCHEMA_VERSION}); run the newer portcullis that wrote it"
                ),
                unreachable: false,
            });
        }
        if applied >= *version {
            continue;
        }
        transaction.batch_execute(sql).await?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
        transaction.commit().await?;
        tracing::info!(version, "applied a database migration");
    }
    Ok(())
}

/// The change feed: keeps one connection listening, reconnecting after a drop.
async fn listen(
    shared: Arc<Shared>,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    ready: std::sync::mpsc::SyncSender<()>,
) {
    loop {
        let (down, connected) = listen_once(&shared, &config, tls.clone(), &ready).await;
        tracing::warn!(reason = %down, "the database change feed is down; reconnecting");
        shared.health.listener(Some((down, !connected)));
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}

/// One LISTEN connection, until it fails: why, and whether it had connected.
async fn listen_once(
    shared: &Shared,
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    ready_signal: &std::sync::mpsc::SyncSender<()>,
) -> (String, bool) {
    let (client, mut connection) = match config.connect(tls).await {
        Ok(pair) => pair,
        Err(err) => return (PgError::from(err).message, false),
    };
    (
        run_listener(shared, &client, &mut connection, ready_signal).await,
        true,
    )
}

/// Listens on a connected client until the connection fails; returns why.
async fn run_listener<S, T>(
    shared: &Shared,
    client: &tokio_postgres::Client,
    connection: &mut tokio_postgres::Connection<S, T>,
    ready_signal: &std::sync::mpsc::SyncSender<()>,
) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let statement = format!("LISTEN {CHANNEL}");
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    let mut ready = false;
    loop {
        tokio::select! {
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(note))) => deliver(shared, note.payload()),
                Some(Ok(_)) => {}
                Some(Err(err)) => return PgError::from(err).message,
                None => return "the server closed the connection".into(),
            },
            listened = &mut listening, if !ready => {
                if let Err(err) = listened {
                    return PgError::from(err).message;
                }
                ready = true;
                shared.health.listener(None);
                // Whatever changed while nobody listened is unknown.
                shared.subscribers.resync_all();
                // Only the first time counts (`open` waits for it); later, nobody reads.
                let _ = ready_signal.try_send(());
            }
        }
    }
}

/// Hands a notification (`tree:hexkey`) to the subscribers of its tree; a key
/// that did not fit (or does not parse) becomes a resync of that tree.
fn deliver(shared: &Shared, payload: &str) {
    let Some((tree, key)) = payload.rsplit_once(':') else {
        return;
    };
    let change = match hex::decode(key) {
        Ok(key) if !key.is_empty() => Change::Key(key),
        _ => Change::Resync,
    };
    shared.subscribers.deliver(tree, change);
}

/// The statement of [`Backend::remove_prefix`]: with `bounded`, keys from `$2`
/// below `$3`; else every key from `$2` on (a prefix of `0xff` bytes has no end).
/// It answers how many entries it removed and their bytes.
fn remove_query(bounded: bool) -> &'static str {
    if bounded {
        "WITH removed AS (DELETE FROM kv WHERE tree = $1 AND key >= $2 AND key < $3 \
           RETURNING octet_length(value) AS bytes) \
         SELECT count(*), coalesce(sum(bytes), 0)::bigint FROM removed"
    } else {
        "WITH removed AS (DELETE FROM kv WHERE tree = $1 AND key >= $2 \
           RETURNING octet_length(value) AS bytes) \
         SELECT count(*), coalesce(sum(bytes), 0)::bigint FROM removed"
    }
}

/// One page of a scan of tree `$1` from key `$2`: at most `$3` rows, ending once
/// `$4` bytes of values are in (the first row always comes, however large),
/// below key `$5` when `bounded`. `octet_length` reads a TOASTed value's size
/// from its pointer, so values past the budget are never fetched.
fn page_query(bounded: bool) -> &'static str {
    if bounded {
        "SELECT key, value FROM (\
           SELECT key, value, sum(octet_length(value)) OVER (ORDER BY key) \
             - octet_length(value) AS before \
           FROM kv WHERE tree = $1 AND key >= $2 AND key < $5 ORDER BY key LIMIT $3\
         ) AS page WHERE before < $4 ORDER BY key"
    } else {
        "SELECT key, value FROM (\
           SELECT key, value, sum(octet_length(value)) OVER (ORDER BY key) \
             - octet_length(value) AS before \
           FROM kv WHERE tree = $1 AND key >= $2 ORDER BY key LIMIT $3\
         ) AS page WHERE before < $4 ORDER BY key"
    }
}

/// The statement of a compare-and-swap (see [`Backend::compare_and_swap`]): the
/// number of rows it changed (1 when it swapped), or for `old` and `new` both
/// absent, 1 when the key is absent.
async fn swap_on(
    client: &deadpool_postgres::Object,
    tree: &str,
    key: &[u8],
    old: Option<&[u8]>,
    new: Option<&[u8]>,
) -> std::result::Result<u64, tokio_postgres::Error> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tree, &key];
    let sql = match (&old, &new) {
        (None, Some(new)) => {
            params.push(new);
            "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (tree, key) DO NOTHING"
        }
        (Some(old), Some(new)) => {
            params.extend([old as &(dyn ToSql + Sync), new]);
            "UPDATE kv SET value = $4 WHERE tree = $1 AND key = $2 AND value = $3"
        }
        (Some(old), None) => {
            params.push(old);
            "DELETE FROM kv WHERE tree = $1 AND key = $2 AND value = $3"
        }
        // Asked for absence: a row found is a refusal.
        (None, None) => "SELECT 1 FROM kv WHERE tree = $1 AND key = $2",
    };
    let statement = client.prepare_cached(sql).await?;
    let rows = client.execute(&statement, &params).await?;
    Ok(if old.is_none() && new.is_none() {
        u64::from(rows == 0)
    } else {
        rows
    })
}

/// Runs `change`, a statement on `client` that is not idempotent (a
/// compare-and-swap, a delete), so that its outcome is known when it returns.
/// A statement with no answer within [`OPERATION_TIMEOUT`] may still be running
/// (waiting for a row lock, or on a slow server) and commit after the caller
/// took it as failed: a grant changed with no audit event, or an audit event for
/// a change that was undone. Writing it again would not tell whether the first
/// try or another writer made the change, so the server is asked to cancel it,
/// and its answer is awaited until twice the timeout: a statement that failed
/// or was cancelled changed nothing, one that completed is reported as it is.
/// Only when no answer comes at all (the server or the network is gone, or the
/// cancel did not reach the statement) is the outcome unknown.
///
/// `cancel` asks for the cancel ([`cancel_on`]); it is spawned once the first
/// try is late, and is not waited for. Also returns whether the connection may
/// go back to the pool: not once a cancel was sent (a cancel that arrives late
/// would end the connection's next statement), nor with a statement still
/// unanswered on it.
async fn settle_change<T>(
    change: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    cancel: impl Future<Output = ()> + Send + 'static,
) -> (PgResult<T>, bool) {
    let started = tokio::time::Instant::now();
    let mut change = std::pin::pin!(change);
    if let Ok(answer) = tokio::time::timeout_at(started + OPERATION_TIMEOUT, &mut change).await {
        return (answer.map_err(PgError::from), true);
    }
    tracing::warn!("no answer to a change yet; asking the database to cancel it");
    // On a task of its own: the answer counts, not how long the cancel takes.
    tokio::spawn(cancel);
    let answer = tokio::time::timeout_at(started + OPERATION_TIMEOUT * 2, &mut change).await;
    let settled = match answer {
        Ok(Ok(done)) => Ok(done),
        // An error from the server ends its statement's transaction: nothing of
        // it is kept, cancelled or not. (A PANIC may come after a commit.)
        Ok(Err(err)) if severity(&err) == Some(Severity::Error) => Err(PgError {
            message: format!(
                "no answer within {}s; the change was cancelled or failed, and was not made ({})",
                OPERATION_TIMEOUT.as_secs(),
                PgError::from(err).message
            ),
            unreachable: false,
        }),
        Ok(Err(err)) => Err(PgError {
            message: format!(
                "no answer within {}s, and then no answer the change can be judged by; \
                 whether it was made is unknown: {}",
                OPERATION_TIMEOUT.as_secs(),
                PgError::from(err).message
            ),
            unreachable: true,
        }),
        Err(_) => Err(PgError {
            message: format!(
                "no answer within {}s, even to a cancel; whether the change was made is unknown",
                OPERATION_TIMEOUT.as_secs() * 2
            ),
            unreachable: true,
        }),
    };
    (settled, false)
}

/// Returns `client` to the pool when [`settle_change`] says it may go back, and
/// closes it otherwise.
fn put_back_or_close(client: deadpool_postgres::Object, reusable: bool) {
    if !reusable {
        drop(deadpool_postgres::Object::take(client));
    }
}

/// A change that is not idempotent, on a pooled connection: `change` makes its
/// statement's future on the connection, [`settle_change`] settles it (with a
/// cancel over [`cancel_on`]), and the connection goes back to the pool only if
/// that left it reusable.
async fn settled<T>(
    shared: &Shared,
    change: impl for<'c> FnOnce(
        &'c deadpool_postgres::Object,
    ) -> BoxFuture<'c, std::result::Result<T, tokio_postgres::Error>>,
) -> PgResult<T> {
    let client = shared.client().await?;
    let cancel = cancel_on(shared, &client);
    let (outcome, reusable) = settle_change(change(&client), cancel).await;
    put_back_or_close(client, reusable);
    outcome
}

/// Asks the server to cancel what runs on `client`'s connection, over a
/// connection of its own (within the connection's connect timeout); a cancel
/// that cannot be sent is logged.
fn cancel_on(
    shared: &Shared,
    client: &tokio_postgres::Client,
) -> impl Future<Output = ()> + Send + 'static {
    let (token, tls) = (client.cancel_token(), shared.tls.clone());
    async move {
        if let Err(err) = token.cancel_query(tls).await {
            tracing::warn!(error = %chain(&err), "cannot send the database a cancel");
        }
    }
}

/// One statement that writes `keys` and `values` on `client`: with `copy`, by
/// `COPY` while they are large and their keys new ([`copy_new`]), else (or when
/// a key exists) by an upsert over two arrays.
async fn write_on(
    client: &deadpool_postgres::Object,
    tree: &str,
    keys: &Vec<Vec<u8>>,
    values: &[Bytes],
    copy: bool,
) -> PgResult<()> {
    let bytes: usize = values.iter().map(Bytes::len).sum();
    if copy && bytes >= COPY_FROM_BYTES && fits_copy(keys, values) {
        match copy_new(client, tree, keys, values).await {
            // A key is there already: the upsert below overwrites it.
            Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            copied => return Ok(copied.map(|_| ())?),
        }
    }
    let statement = client
        .prepare_cached(
            "INSERT INTO kv (tree, key, value) \
             SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS batch(k, v) \
             ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
        )
        .await?;
    let values: Vec<&[u8]> = values.iter().map(|value| &value[..]).collect();
    client.execute(&statement, &[&tree, keys, &values]).await?;
    Ok(())
}

/// The severity of a server's error, if `err` is one.
fn severity(err: &tokio_postgres::Error) -> Option<Severity> {
    err.as_db_error().and_then(|db| db.parsed_severity())
}

/// An operation that got no answer within `timeout`.
fn no_answer(timeout: Duration) -> PgError {
    PgError {
        message: format!("no answer within {}s", timeout.as_secs()),
        unreachable: true,
    }
}

/// Adds rows whose keys are all new with one binary `COPY`: one statement, so
/// atomic like the upsert, and cheaper for the server. For 1 GiB of 16 KiB
/// transcript pieces PostgreSQL 15 spent 3.96 s of CPU by `COPY` against 5.52 s
/// by `INSERT … SELECT unnest(…) ON CONFLICT DO UPDATE`. A key that exists fails
/// the whole copy with a unique violation, and nothing is written.
async fn copy_new(
    client: &deadpool_postgres::Object,
    tree: &str,
    keys: &[Vec<u8>],
    values: &[Bytes],
) -> std::result::Result<u64, tokio_postgres::Error> {
    let statement = client
        .prepare_cached("COPY kv (tree, key, value) FROM STDIN (FORMAT binary)")
        .await?;
    let sink = client.copy_in::<_, Bytes>(&statement).await?;
    let mut sink = std::pin::pin!(sink);
    let mut message = BytesMut::with_capacity(COPY_MESSAGE_BYTES);
    message.put_slice(COPY_SIGNATURE);
    message.put_i32(0); // flags
    message.put_i32(0); // header extension length
    for (key, value) in keys.iter().zip(values) {
        message.put_i16(3);
        put_field(&mut message, tree.as_bytes());
        put_field(&mut message, key);
        put_field(&mut message, value);
        if message.len() >= COPY_MESSAGE_BYTES {
            let full = std::mem::replace(&mut message, BytesMut::with_capacity(COPY_MESSAGE_BYTES));
            sink.feed(full.freeze()).await?;
        }
    }
    message.put_i16(-1); // end of data
    sink.feed(message.freeze()).await?;
    // Flushes what is gathered and ends the copy.
    sink.as_mut().finish().await
}

/// How many bytes of rows [`copy_new`] gathers into one `CopyData` message.
/// The driver flushes its connection (through TLS, one `send`) once it holds
/// 8 KiB, so a message per transcript piece of 8000 bytes made a flush every
/// two rows; gathered, a MiB of pieces goes in four messages, for one more
/// copy of the bytes.
const COPY_MESSAGE_BYTES: usize = 256 * 1024;

/// The start of every binary `COPY` stream.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// One field of a binary `COPY` row: its length, then its bytes.
fn put_field(framing: &mut BytesMut, field: &[u8]) {
    framing.put_i32(copy_len(field.len()));
    framing.put_slice(field);
}

/// A field's length in a binary `COPY` row ([`fits_copy`] checked it fits).
fn copy_len(len: usize) -> i32 {
    i32::try_from(len).expect("fits_copy checked every field's length")
}

/// Whether every key and value fits a binary `COPY` field (under 2 GiB). Pieces
/// are far smaller; anything else goes by the upsert, whose error the server
/// gives.
fn fits_copy(keys: &[Vec<u8>], values: &[Bytes]) -> bool {
    keys.iter()
        .map(Vec::len)
        .chain(values.iter().map(Bytes::len))
        .all(|len| i32::try_from(len).is_ok())
}

/// The first key after every key that starts with `prefix` (`None`: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A scan read page by page, so memory holds one page.
struct PagedScan<'a> {
    backend: &'a PgBackend,
    tree: String,
    /// Where the next page starts (inclusive); `None` once the scan is over.
    next: Option<Vec<u8>>,
    until: Option<Vec<u8>>,
    page: VecDeque<Entry>,
}

impl Iterator for PagedScan<'_> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        if self.page.is_empty() {
            let from = self.next.take()?;
            match self.backend.page(&self.tree, from, self.until.clone()) {
                Ok(page) => {
                    let bytes: usize = page.iter().map(|(_, value)| value.len()).sum();
                    if page.len() as i64 == SCAN_PAGE || bytes as i64 >= SCAN_PAGE_BYTES {
                        // The least key after the last one: the same key plus a 0 byte.
                        let mut after = page[page.len() - 1].0.clone();
                        after.push(0);
                        self.next = Some(after);
                    }
                    self.page = page.into();
                }
                Err(err) => return Some(Err(err)),
            }
        }
        self.page.pop_front().map(Ok)
    }
}

impl Backend for PgBackend {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (tree, key) = (tree.to_string(), key.to_vec());
        self.call(move |shared| async move {
            let client = shared.client().await?;
            let statement = client
                .prepare_cached("SELECT value FROM kv WHERE tree = $1 AND key = $2")
                .await?;
            let row = client.query_opt(&statement, &[&tree, &key]).await?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    /// One `SELECT` for all of `keys`; the run is cut at the first one missing.
    fn get_run(&self, tree: &str, keys: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        let (tree, wanted) = (tree.to_string(), keys.to_vec());
        let rows: Vec<Entry> = self.call(move |shared| async move {
            let client = shared.client().await?;
            let statement = client
                .prepare_cached("SELECT key, value FROM kv WHERE tree = $1 AND key = ANY($2)")
                .await?;
            let rows = client.query(&statement, &[&tree, &wanted]).await?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })?;
        let mut found: std::collections::HashMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
        Ok(keys.iter().map_while(|key| found.remove(key)).collect())
    }

    fn scan<'a>(&'a self, tree: &str, prefix: &[u8], from: Option<&[u8]>) -> Scan<'a> {
        let start = match from {
            Some(from) if from > prefix => from.to_vec(),
            _ => prefix.to_vec(),
        };
        Box::new(PagedScan {
            backend: self,
            tree: tree.to_string(),
            next: Some(start),
            until: prefix_end(prefix),
            page: VecDeque::new(),
        })
    }

    fn last(&self, tree: &str) -> Result<Option<Entry>> {
        let tree = tree.to_string();
        self.call(move |shared| async move {
            let client = shared.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT key, value FROM kv WHERE tree = $1 ORDER BY key DESC LIMIT 1",
                )
                .await?;
            let row = client.query_opt(&statement, &[&tree]).await?;
            Ok(row.map(|row| (row.get(0), row.get(1))))
        })
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.put_all(tree, vec![(key.to_vec(), value.to_vec())])
    }

    /// One statement: a binary `COPY` when the entries are large and their keys
    /// new ([`copy_new`]), else an upsert over two arrays; one round trip for a
    /// whole write, atomic as any single statement is.
    ///
    /// A write whose answer is late may still commit afterwards, and a caller
    /// that took it as failed would then be wrong about the store (a transcript
    /// sealed without a batch that lands later reads as altered in `audit
    /// verify`); [`PgBackend::write_entries`] settles it first.
    fn put_all(&self, tree: &str, entries: Vec<Entry>) -> Result<()> {
        // A key twice in one statement is an error in PostgreSQL; as with puts one
        // after the other, the last value wins.
        let mut last: std::collections::HashMap<Vec<u8>, Vec<u8>> =
            std::collections::HashMap::new();
        let mut order = Vec::new();
        for (key, value) in entries {
            if last.insert(key.clone(), value).is_none() {
                order.push(key);
            }
        }
        let values = order
            .iter()
            .map(|key| Bytes::from(last.remove(key).unwrap_or_default()))
            .collect::<Vec<_>>();
        Ok(self.write_entries(tree, order, values)?)
    }

    /// See [`INLINE_PIECE_BYTES`]. Scans page by bytes as well as rows
    /// ([`SCAN_PAGE_BYTES`]), so a batch of pieces is read in a round trip or two.
    fn piece_bytes(&self) -> usize {
        INLINE_PIECE_BYTES
    }

    fn largest_piece(&self) -> usize {
        LARGEST_PIECE_BYTES
    }

    /// 4 MiB: a quarter of the statements, commits and round trips of writes of
    /// a MiB. A bulk session's relay waited for the store half as long
    /// downloading and a fifth less uploading, and moved 1.08 to 1.21× as fast
    /// down and 1.03 to 1.12× up (`benches/proxy.rs`, the server with `fsync`
    /// on; README, Performance, "Writes of 4 MiB on PostgreSQL").
    fn write_bytes(&self) -> usize {
        4 * 1024 * 1024
    }

    /// Two, each a statement and a commit on a pooled connection of its own:
    /// with the server syncing its log (`fsync` on), a write spends part of its
    /// time waiting for the disk, which a second write fills. Against the build
    /// before (one write at a time), bulk sessions moved 1.05 to 1.17× as fast
    /// down and 1.06 to 1.12× up; a third write was not clearly better (README,
    /// Performance, "Two writes at once on PostgreSQL").
    fn concurrent_writes(&self) -> usize {
        2
    }

    fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (tree, key) = (tree.to_string(), key.to_vec());
        let removed = self.attempt(SETTLED_WITHIN, move |shared| async move {
            settled(&shared, move |client| {
                Box::pin(async move {
                    let statement = client
                        .prepare_cached(
                            "DELETE FROM kv WHERE tree = $1 AND key = $2 RETURNING value",
                        )
                        .await?;
                    let row = client.query_opt(&statement, &[&tree, &key]).await?;
                    Ok(row.map(|row| row.get(0)))
                })
            })
            .await
        })?;
        Ok(removed)
    }

    /// One `DELETE` of the prefix's key range, settled as [`Backend::remove`]'s.
    fn remove_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Removed> {
        let (tree, from, until) = (tree.to_string(), prefix.to_vec(), prefix_end(prefix));
        let removed = self.attempt(SETTLED_WITHIN, move |shared| async move {
            settled(&shared, move |client| {
                Box::pin(async move {
                    let statement = client.prepare_cached(remove_query(until.is_some())).await?;
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tree, &from];
                    if let Some(until) = &until {
                        params.push(until);
                    }
                    let row = client.query_one(&statement, &params).await?;
                    let (entries, bytes): (i64, i64) = (row.get(0), row.get(1));
                    Ok(Removed {
                        entries: entries as u64,
                        bytes: bytes as u64,
                    })
                })
            })
            .await
        })?;
        Ok(removed)
    }

    fn compare_and_swap(
        &self,
        tree: &str,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        let (tree, key) = (tree.to_string(), key.to_vec());
        let (old, new) = (old.map(<[u8]>::to_vec), new.map(<[u8]>::to_vec));
        // Time for the pool's wait and for the change to settle.
        let changed = self.attempt(SETTLED_WITHIN, move |shared| async move {
            settled(&shared, move |client| {
                Box::pin(async move {
                    swap_on(client, &tree, &key, old.as_deref(), new.as_deref()).await
                })
            })
            .await
        })?;
        Ok(changed == 1)
    }

    fn increment(&self, name: &str) -> Result<u64> {
        let name = name.to_string();
        let value: i64 = self.call(move |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_one(
                    "INSERT INTO counters (name, value) VALUES ($1, 1) \
                     ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value",
                    &[&name],
                )
                .await?;
            Ok(row.get(0))
        })?;
        Ok(value.unsigned_abs())
    }

    fn counter(&self, name: &str) -> Result<u64> {
        let name = name.to_string();
        let value: Option<i64> = self.call(move |shared| async move {
            let client = shared.client().await?;
            let row = client
                .query_opt("SELECT value FROM counters WHERE name = $1", &[&name])
                .await?;
            Ok(row.map(|row| row.get(0)))
        })?;
        Ok(value.map_or(0, i64::unsigned_abs))
    }

    fn seed_counter(&self, name: &str, value: u64) -> Result<()> {
        let name = name.to_string();
        let value = i64::try_from(value).map_err(|_| {
            StoreError::Backend(format!(
                "counter {name}: {value} is past PostgreSQL's bigint"
            ))
        })?;
        self.call(move |shared| async move {
            let client = shared.client().await?;
            client
                .execute(
                    "INSERT INTO counters (name, value) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET value = greatest(counters.value, EXCLUDED.value)",
                    &[&name, &value],
                )
                .await?;
            Ok(())
        })
    }

    /// Every statement commits durably already (`synchronous_commit`).
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trees(&self) -> Result<Vec<String>> {
        self.call(move |shared| async move {
            let client = shared.client().await?;
            let rows = client
                .query("SELECT DISTINCT tree FROM kv ORDER BY tree", &[])
                .await?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn counters(&self) -> Result<Vec<(String, u64)>> {
        self.call(move |shared| async move {
            let client = shared.client().await?;
            let rows = client
                .query("SELECT name, value FROM counters ORDER BY name", &[])
                .await?;
            Ok(rows
                .iter()
                .map(|row| (row.get(0), row.get::<_, i64>(1).max(0) as u64))
                .collect())
        })
    }

    /// Marks `tree` as watched for the whole cluster (its writes notify from now
    /// on) and subscribes to the feed of it.
    fn subscribe(&self, tree: &str) -> Result<Subscription> {
        let name = tree.to_string();
        self.call(move |shared| async move {
            let client = shared.client().await?;
            client
                .execute("SELECT portcullis_watch($1)", &[&name])
                .await?;
            Ok(())
        })?;
        Ok(self.shared.subscribers.subscribe(tree))
    }

    fn failure(&self) -> Option<String> {
        self.shared.health.failure()
    }

    fn failure_is_sticky(&self) -> bool {
        false
    }

    fn is_shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that answers in time is reported as it is and keeps its
    /// connection; one that answers after the cancel went out is reported as
    /// made, and its connection is closed; one that never answers, even to the
    /// cancel, is reported as unknown once twice the timeout has passed.
    #[tokio::test(start_paused = true)]
    async fn a_late_change_is_settled_by_its_answer_to_a_cancel() {
        let cancelled_at = Arc::new(Mutex::new(None));
        let cancel = || {
            let cancelled_at = cancelled_at.clone();
            async move { *cancelled_at.lock().unwrap() = Some(tokio::time::Instant::now()) }
        };
        let answer_after = |secs| async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok::<u64, tokio_postgres::Error>(1)
        };
        // When the cancel of the last change went out, counted from `started`.
        let cancelled_after = |started: tokio::time::Instant| {
            cancelled_at.lock().unwrap().take().map(|at| at - started)
        };

        let started = tokio::time::Instant::now();
        let (answer, reusable) = settle_change(answer_after(14), cancel()).await;
        assert!(matches!(answer, Ok(1)) && reusable);
        tokio::task::yield_now().await;
        assert_eq!(
            cancelled_after(started),
            None,
            "no cancel for a timely answer"
        );

        let started = tokio::time::Instant::now();
        let (answer, reusable) = settle_change(answer_after(16), cancel()).await;
        assert!(matches!(answer, Ok(1)), "made, after the cancel went out");
        assert!(!reusable);
        assert_eq!(started.elapsed(), Duration::from_secs(16));
        assert_eq!(cancelled_after(started), Some(OPERATION_TIMEOUT));

        let started = tokio::time::Instant::now();
        let never = std::future::pending::<std::result::Result<u64, tokio_postgres::Error>>();
        let (answer, reusable) = settle_change(never, cancel()).await;
        let unknown = answer.expect_err("no answer").message;
        assert!(unknown.contains("unknown"), "{unknown}");
        assert!(!reusable);
        assert_eq!(started.elapsed(), OPERATION_TIMEOUT * 2);
        assert_eq!(cancelled_after(started), Some(OPERATION_TIMEOUT));
    }

    #[test]
    fn prefix_ends_bound_exactly_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    fn settings(url: &str, password_file: Option<PathBuf>) -> PgSettings {
        PgSettings {
            url: url.into(),
            password_file,
            pool_size: 1,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ca_file: None,
        }
    }

    /// A password in the URL is refused without being repeated; a bad URL says
    /// what one looks like; the password file's first line is the password.
    #[test]
    fn urls_are_checked_and_passwords_come_from_the_file() {
        let err = settings("postgres://u:hunter2@db/x", None)
            .parse_url()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("password_file") && !err.contains("hunter2"),
            "{err}"
        );
        let err = settings("postgres://u@db/x?sslmode=sometimes", None)
            .parse_url()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode=disable, prefer or require"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let chmod = |mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        chmod(0o644);
        let err = settings("postgres://u@db/x", Some(file.clone()))
            .driver_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("open to other users") && err.contains("chmod 600"),
            "{err}"
        );
        chmod(0o600);
        let config = settings("postgres://u@db:5433/x?sslmode=require", Some(file.clone()))
            .driver_config()
            .unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
        let mode = |url| settings(url, None).parse_url().unwrap().get_ssl_mode();
        assert_eq!(
            mode("postgres://u@db/x"),
            SslMode::Require,
            "TLS unless turned off"
        );
        assert_eq!(mode("postgres://u@db/x?sslmode=prefer"), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@127.0.0.1/x?sslmode=disable"),
            SslMode::Disable
        );
        std::fs::write(&file, "\n").unwrap();
        let err = settings("postgres://u@db/x", Some(file))
            .driver_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty"), "{err}");
    }
}
