//! The indexes that session lists read, so that `sessions --user`, `--target`,
//! `--since` and `--active` read the records they list and not every record ever
//! stored.
//!
//! Trees (each entry maps to nothing; the record is in `sessions`):
//! - `sessions_by_user`: `user 0x00 start (ms) ‖ id`;
//! - `sessions_by_target`: `target 0x00 start (ms) ‖ id`;
//! - `sessions_by_start`: `start (ms) ‖ id`;
//! - `sessions_live`: `id`, for every session whose record says `live`.
//!
//! A record's user, target and start never change, so its first three entries are
//! written once and stay. Entries are written before the record they point to and
//! the live entry is removed after the record stops being live, so an index may
//! briefly hold an entry too many but never misses one; readers check every record
//! they read through an index against the whole query. Databases from before the
//! indexes get them built once, at open (schema 1).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::SessionRecord;
use crate::store::table::{millis, name_prefix, trailing_u64};
use crate::store::{self, Backend, Key, Result, Store, StoreError};

const BY_USER: &str = "sessions_by_user";
const BY_TARGET: &str = "sessions_by_target";
const BY_START: &str = "sessions_by_start";
const LIVE: &str = "sessions_live";
/// The schema this module migrates databases to.
pub const SCHEMA: u64 = 1;
/// The module name its schema version is recorded under.
pub const MODULE: &str = "sessions";

/// Which sessions a list wants; every field that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionQuery {
    pub user: Option<String>,
    pub target: Option<String>,
    /// Started at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only sessions that are live now.
    pub live: bool,
}

impl SessionQuery {
    /// Whether `session` is one this query wants: what a full scan would filter
    /// on, and what every record read through an index is checked against.
    pub fn matches(&self, session: &SessionRecord) -> bool {
        self.user.as_ref().is_none_or(|u| &session.user == u)
            && self.target.as_ref().is_none_or(|t| &session.target == t)
            && self.since.is_none_or(|at| session.started_at >= at)
            && (!self.live || session.is_live())
    }

    /// The index to read and where in it, most selective first: the live sessions
    /// are few, one user's or one target's are fewer than all. `None`: the query
    /// wants every session.
    fn plan(&self) -> Option<Range> {
        let from = |index, prefix: Vec<u8>| Range {
            index,
            from: self
                .since
                .map(|at| [&prefix[..], &millis(at).encode()].concat()),
            prefix,
        };
        if self.live {
            Some(Range {
                index: LIVE,
                prefix: Vec::new(),
                from: None,
            })
        } else if let Some(user) = &self.user {
            Some(from(BY_USER, name_prefix(user)))
        } else if let Some(target) = &self.target {
            Some(from(BY_TARGET, name_prefix(target)))
        } else {
            self.since.map(|_| from(BY_START, Vec::new()))
        }
    }
}

/// Where a query reads an index: the keys under `prefix`, from `from` on.
struct Range {
    index: &'static str,
    prefix: Vec<u8>,
    from: Option<Vec<u8>>,
}

/// Writes the entries `session` belongs in (before its record is stored).
pub fn index(seam: &dyn Backend, session: &SessionRecord) -> Result<()> {
    let at = millis(session.started_at).encode();
    let id = session.id.encode();
    seam.put(
        BY_USER,
        &[&name_prefix(&session.user), &at[..], &id].concat(),
        b"",
    )?;
    seam.put(
        BY_TARGET,
        &[&name_prefix(&session.target), &at[..], &id].concat(),
        b"",
    )?;
    seam.put(BY_START, &[&at[..], &id].concat(), b"")?;
    if session.is_live() {
        seam.put(LIVE, &id, b"")?;
    }
    Ok(())
}

/// Removes the entries `session` no longer belongs in (after its record is
/// stored): the live one, once it ended.
pub fn unindex(seam: &dyn Backend, session: &SessionRecord) -> Result<()> {
    if !session.is_live() {
        seam.remove(LIVE, &session.id.encode())?;
    }
    Ok(())
}

/// The ids of the sessions `query` may want, in id order (oldest first), read
/// from an index; `None` when it wants every session.
pub fn candidates(seam: &dyn Backend, query: &SessionQuery) -> Result<Option<BTreeSet<u64>>> {
    let Some(range) = query.plan() else {
        return Ok(None);
    };
    let entries = seam.scan(range.index, &range.prefix, range.from.as_deref());
    ids(entries, range.index, |_| true).map(Some)
}

/// The ids of the sessions that started at or before `at`.
pub fn started_by(seam: &dyn Backend, at: DateTime<Utc>) -> Result<BTreeSet<u64>> {
    let last = millis(at);
    ids(seam.scan(BY_START, b"", None), BY_START, |key| {
        u64::decode(&key[..8]) <= Some(last)
    })
}

/// The ids at the end of an index's keys, while `more` holds for the key.
fn ids(
    entries: store::Scan<'_>,
    index: &'static str,
    more: impl Fn(&[u8]) -> bool,
) -> Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    for entry in entries {
        let (key, _) = entry?;
        let id = trailing_u64(&key).ok_or_else(|| StoreError::Corrupt {
            tree: index,
            detail: format!("a key of {} bytes", key.len()),
        })?;
        if !more(&key) {
            break;
        }
        ids.insert(id);
    }
    Ok(ids)
}

/// Whether the indexes still have to be built from the records (an older database).
pub fn missing(store: &Store) -> Result<bool> {
    Ok(store::schema_version(store, MODULE)? < SCHEMA)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;
    use proptest::prelude::*;

    use super::*;
    use crate::record::check::tests::record;
    use crate::record::{SessionState, SessionStore};

    const USERS: [&str; 3] = ["alice", "bob", "alice\0x"];
    const TARGETS: [&str; 2] = ["db", "db2"];

    fn base() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    /// A session as a property test makes it: who, where, when (ms after
    /// [`base`]), and whether it ended (re-saved, as the recorder does).
    fn session(
        id: u64,
        (user, target, at, ended): (usize, usize, i64, bool),
    ) -> (SessionRecord, bool) {
        let mut session = record(id, SessionState::Live);
        session.user = USERS[user].to_string();
        session.target = TARGETS[target].to_string();
        session.started_at = base() + Duration::milliseconds(at);
        (session, ended)
    }

    /// The queries a test asks, with a few hostile names.
    fn queries() -> Vec<SessionQuery> {
        let users = [
            None,
            Some("alice"),
            Some("bob"),
            Some("al"),
            Some("alice\0"),
        ];
        let targets = [None, Some("db"), Some("d")];
        let since = [
            None,
            Some(0),
            Some(1),
            Some(1500),
            Some(-5000),
            Some(10_000),
        ];
        let mut queries = Vec::new();
        for user in users {
            for target in targets {
                for at in since {
                    for live in [false, true] {
                        queries.push(SessionQuery {
                            user: user.map(str::to_string),
                            target: target.map(str::to_string),
                            since: at.map(|ms| base() + Duration::milliseconds(ms)),
                            live,
                        });
                    }
                }
            }
        }
        queries
    }

    fn open(dir: &std::path::Path) -> (Arc<Store>, SessionStore) {
        let store = Arc::new(Store::sled(dir).unwrap());
        (store.clone(), SessionStore::open(store).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever sessions were stored, every query read through an index
        /// returns what a full scan filtered in Rust would, in the same order.
        #[test]
        fn index_queries_agree_with_a_full_scan(
            made in proptest::collection::vec((0..3usize, 0..2usize, 0..3000i64, any::<bool>()), 0..30)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (_, sessions) = open(dir.path());
            for (n, spec) in made.into_iter().enumerate() {
                let (mut session, ended) = session(n as u64 + 1, spec);
                sessions.save_session(&session).unwrap();
                if ended {
                    session.state = SessionState::Closed;
                    sessions.save_session(&session).unwrap();
                }
            }
            let all = sessions.sessions().unwrap();
            for query in queries() {
                let scanned: Vec<_> = all.iter().filter(|s| query.matches(s)).cloned().collect();
                prop_assert_eq!(sessions.find(&query).unwrap(), scanned, "{:?}", query);
            }
            for ms in [-1, 0, 1499, 1500, 5000] {
                let at = base() + Duration::milliseconds(ms);
                let scanned: Vec<_> = all.iter().filter(|s| s.started_at <= at).cloned().collect();
                prop_assert_eq!(sessions.started_by(at).unwrap(), scanned);
            }
        }
    }

    /// A database from before the indexes (records only) gets them at open, once;
    /// from then on the recorder keeps them.
    #[test]
    fn indexes_are_built_for_an_old_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let old = [(0, 0, 10, false), (1, 1, 20, true), (0, 1, 30, false)];
        for (n, spec) in old.into_iter().enumerate() {
            let (mut session, ended) = session(n as u64 + 1, spec);
            if ended {
                session.state = SessionState::Interrupted;
            }
            let json = serde_json::to_vec(&session).unwrap();
            store
                .backend()
                .put("sessions", &session.id.encode(), &json)
                .unwrap();
        }
        assert!(missing(&store).unwrap());
        let sessions = SessionStore::open(store.clone()).unwrap();
        assert_eq!(store::schema_version(&store, MODULE).unwrap(), SCHEMA);
        let ids = |query: SessionQuery| -> Vec<u64> {
            sessions
                .find(&query)
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect()
        };
        let live = || SessionQuery {
            live: true,
            ..SessionQuery::default()
        };
        assert_eq!(ids(live()), [1, 3]);
        let alice = SessionQuery {
            user: Some("alice".into()),
            ..SessionQuery::default()
        };
        assert_eq!(ids(alice), [1, 3]);
        let on_db2_late = SessionQuery {
            target: Some("db2".into()),
            since: Some(base() + Duration::milliseconds(25)),
            ..SessionQuery::default()
        };
        assert_eq!(ids(on_db2_late), [3]);
        let mut ended = sessions.session(3).unwrap().unwrap();
        ended.state = SessionState::Closed;
        sessions.save_session(&ended).unwrap();
        assert_eq!(ids(live()), [1]);
        // A second open builds nothing again: the indexes are the kept ones.
        drop(sessions);
        let reopened = SessionStore::open(store).unwrap();
        assert_eq!(reopened.find(&live()).unwrap().len(), 1);
    }
}
