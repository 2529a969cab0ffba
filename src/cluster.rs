//! One bastion among several sharing a database: who the nodes are, which are
//! alive, and that they all speak with the same keys.
//!
//! Each node writes a heartbeat (`nodes` tree: node id → [`Heartbeat`]) every
//! `[cluster] heartbeat`. A node whose heartbeat is older than `node_timeout` is
//! dead: the first other node to claim it (a compare-and-swap on its heartbeat
//! record, so exactly one node sweeps it) marks the sessions it carried
//! `interrupted`. A node that finds its own record claimed that way was declared
//! dead while it still ran (paused, partitioned): its sessions are on record as
//! interrupted, so it stops rather than carry on serving sessions the cluster
//! considers over ([`Lost`]); the service manager restarts it. To keep that
//! window shut, a node that cannot write its heartbeat for half of `node_timeout`
//! while other nodes run stops by itself (`server::upkeep::keep_heartbeat`).
//!
//! Heartbeats compare wall clocks of different machines: nodes must keep their
//! clocks in sync (NTP), to well within `node_timeout`.
//!
//! The identity check keeps a second node from starting with keys of its own:
//! clients would see a different host key on each node, targets would refuse the
//! other upstream key. The first node records the fingerprints of its keys; every
//! later start compares its own with them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::{self, Store, StoreError, Table};

/// The tree of heartbeats.
const NODES: &str = "nodes";
/// Where the cluster's key fingerprints are recorded (in the `meta` tree).
const IDENTITY: &[u8] = b"cluster/identity";

/// Timing and name of this node (`[cluster]` in the config).
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub id: String,
    /// Where this node runs (host name and data dir): a restart of the same node
    /// takes its id over at once; another machine claiming a live id is refused.
    pub machine: String,
    pub heartbeat: std::time::Duration,
    pub timeout: std::time::Duration,
}

/// One node's heartbeat record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat {
    machine: String,
    started_at: DateTime<Utc>,
    beat_at: DateTime<Utc>,
    /// The node stopped gracefully (its sessions ended before it did).
    #[serde(default)]
    stopped: bool,
    /// The node that declared this one dead and marks its sessions interrupted.
    #[serde(default)]
    swept_by: Option<String>,
}

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "node id {id:?} is in use by a running bastion on {machine} (heartbeat {age}s ago); \
         give each bastion its own `[cluster] node_id`"
    )]
    Taken {
        id: String,
        machine: String,
        age: i64,
    },
    #[error("{0}")]
    Identity(String),
}

/// This node was declared dead by `by` while it was still running.
#[derive(Debug, Error)]
#[error(
    "node {node} was declared dead by node {by} (no heartbeat for longer than node_timeout) \
     and its sessions were marked interrupted; stopping so that it restarts clean"
)]
pub struct Lost {
    pub node: String,
    pub by: String,
}

/// This node's membership of the cluster.
pub struct Cluster {
    nodes: Table<String, Heartbeat>,
    settings: NodeSettings,
    started_at: DateTime<Utc>,
    /// The bytes of the heartbeat this node wrote last: the next one swaps from
    /// them, so a claim by another node is noticed.
    last: std::sync::Mutex<Vec<u8>>,
    /// Whether another node was alive at the last look: only then can this one
    /// be declared dead, and so only then must it fence itself.
    peers: AtomicBool,
    /// A sweep runs: the next heartbeat does not start another.
    sweeping: AtomicBool,
}

/// A dead node this node claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub node: String,
    /// Claimed just now (not a claim of ours from an earlier, unfinished sweep).
    pub fresh: bool,
}

impl Cluster {
    /// Registers this node, refusing an id that a live node on another machine
    /// holds.
    pub fn join(
        store: &Arc<Store>,
        settings: NodeSettings,
        now: DateTime<Utc>,
    ) -> Result<Cluster, ClusterError> {
        let nodes: Table<String, Heartbeat> = Table::new(store, NODES);
        let mut peers = false;
        for id in nodes.keys() {
            let id = id?;
            if let Some(beat) = nodes.get(&id)? {
                peers |=
                    id != settings.id && !beat.stopped && !is_dead(&beat, now, settings.timeout);
            }
        }
        if let Some(other) = nodes.get(&settings.id)? {
            let age = (now - other.beat_at).num_seconds();
            let alive = !other.stopped && !is_dead(&other, now, settings.timeout);
            if alive && other.machine != settings.machine {
                return Err(ClusterError::Taken {
                    id: settings.id.clone(),
                    machine: other.machine,
                    age,
                });
            }
        }
        let beat = Heartbeat {
            machine: settings.machine.clone(),
            started_at: now,
            beat_at: now,
            stopped: false,
            swept_by: None,
        };
        nodes.put(&settings.id, &beat)?;
        Ok(Cluster {
            last: std::sync::Mutex::new(store::table::to_json(&beat)),
            nodes,
            settings,
            started_at: now,
            peers: AtomicBool::new(peers),
            sweeping: AtomicBool::new(false),
        })
    }

    pub fn node(&self) -> &str {
        &self.settings.id
    }

    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// Whether another node was alive when this one last looked.
    pub fn has_peers(&self) -> bool {
        self.peers.load(Ordering::Relaxed)
    }

    /// Marks a sweep as running; false if one already is.
    pub fn start_sweep(&self) -> bool {
        !self.sweeping.swap(true, Ordering::AcqRel)
    }

    pub fn end_sweep(&self) {
        self.sweeping.store(false, Ordering::Release);
    }

    /// Writes this node's heartbeat, unless another node has declared it dead.
    pub fn beat(&self, now: DateTime<Utc>) -> Result<Result<(), Lost>, StoreError> {
        self.write(now, false)
    }

    /// Records a graceful stop: nobody sweeps a node that left.
    pub fn leave(&self, now: DateTime<Utc>) -> Result<Result<(), Lost>, StoreError> {
        self.write(now, true)
    }

    fn write(&self, now: DateTime<Utc>, stopped: bool) -> Result<Result<(), Lost>, StoreError> {
        let beat = Heartbeat {
            machine: self.settings.machine.clone(),
            started_at: self.started_at,
            beat_at: now,
            stopped,
            swept_by: None,
        };
        let mut last = self.last.lock().expect("heartbeat lock poisoned");
        if self.nodes.swap(&self.settings.id, Some(&last), &beat)? {
            *last = store::table::to_json(&beat);
            return Ok(Ok(()));
        }
        let current = self.nodes.get_versioned(&self.settings.id)?;
        // Our own earlier beat whose reply was lost (it committed, we did not
        // hear): still ours, unclaimed; swap from it.
        if let Some((record, bytes)) = &current {
            let ours = record.machine == self.settings.machine
                && record.started_at == self.started_at
                && record.swept_by.is_none()
                && !record.stopped;
            if ours && self.nodes.swap(&self.settings.id, Some(bytes), &beat)? {
                *last = store::table::to_json(&beat);
                return Ok(Ok(()));
            }
        }
        let by = current
            .and_then(|(record, _)| record.swept_by)
            .unwrap_or_else(|| "another bastion with the same node_id".into());
        Ok(Err(Lost {
            node: self.settings.id.clone(),
            by,
        }))
    }

    /// The dead nodes this one has claimed and not yet [`Cluster::swept`], to mark
    /// their live sessions interrupted. A node is claimed once: the claim is a
    /// compare-and-swap, and a claimed node is passed over while its sweeper lives
    /// (a claim by a node that died itself is taken over).
    pub fn claim_dead(&self, now: DateTime<Utc>) -> Result<Vec<Claim>, StoreError> {
        let all: Vec<(String, Heartbeat, Vec<u8>)> = self.records()?;
        let alive = |id: &str| {
            all.iter()
                .any(|(other, beat, _)| other == id && !is_dead(beat, now, self.settings.timeout))
        };
        let peers = all.iter().any(|(id, beat, _)| {
            id != self.node() && !beat.stopped && !is_dead(beat, now, self.settings.timeout)
        });
        self.peers.store(peers, Ordering::Relaxed);
        let mut claimed = Vec::new();
        for (id, beat, bytes) in &all {
            if id == self.node() || beat.stopped || !is_dead(beat, now, self.settings.timeout) {
                continue;
            }
            match beat.swept_by.as_deref() {
                // Ours, and not finished (a failed sweep is retried).
                Some(sweeper) if sweeper == self.node() => {
                    claimed.push(Claim {
                        node: id.clone(),
                        fresh: false,
                    });
                    continue;
                }
                Some(sweeper) if alive(sweeper) => continue,
                _ => {}
            }
            let claim = Heartbeat {
                swept_by: Some(self.node().to_string()),
                ..beat.clone()
            };
            if self.nodes.swap(id, Some(bytes), &claim)? {
                claimed.push(Claim {
                    node: id.clone(),
                    fresh: true,
                });
            }
        }
        Ok(claimed)
    }

    /// Records that the sessions of `dead` are all marked: it is never swept again
    /// (unless it comes back and dies again).
    pub fn swept(&self, dead: &str) -> Result<(), StoreError> {
        if let Some((beat, bytes)) = self.nodes.get_versioned(&dead.to_string())? {
            // Restarted meanwhile (its fresh record has no claim): not ours to end.
            if beat.swept_by.as_deref() != Some(self.node()) {
                return Ok(());
            }
            let done = Heartbeat {
                stopped: true,
                ..beat
            };
            self.nodes.swap(&dead.to_string(), Some(&bytes), &done)?;
        }
        Ok(())
    }

    fn records(&self) -> Result<Vec<(String, Heartbeat, Vec<u8>)>, StoreError> {
        let mut all = Vec::new();
        for id in self.nodes.keys() {
            let id = id?;
            if let Some((beat, bytes)) = self.nodes.get_versioned(&id)? {
                all.push((id, beat, bytes));
            }
        }
        Ok(all)
    }

    /// Records `fingerprints` (role, fingerprint) as the cluster's identity when
    /// none is recorded. Keys that differ from it are refused, each named, on a
    /// shared database; a bastion alone on its own database (sled) takes its new
    /// keys as the identity (they were rotated) and returns the differences, to
    /// log.
    pub fn check_identity(
        &self,
        fingerprints: &[(&str, String)],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, ClusterError> {
        let seam = self.nodes.store().backend();
        let mine = store::table::to_json(&Identity {
            recorded_by: self.node().to_string(),
            keys: fingerprints
                .iter()
                .map(|(role, fp)| (role.to_string(), fp.clone()))
                .collect(),
        });
        let Some(bytes) = seam.get(store::META, IDENTITY)? else {
            if seam.compare_and_swap(store::META, IDENTITY, None, Some(&mine))? {
                return Ok(Vec::new());
            }
            // Another node recorded it first: check against theirs.
            return self.check_identity(fingerprints, now);
        };
        let recorded: Identity =
            serde_json::from_slice(&bytes).map_err(|err| StoreError::Corrupt {
                tree: store::META,
                detail: format!("cluster identity: {err}"),
            })?;
        let differences: Vec<String> = fingerprints
            .iter()
            .filter_map(|(role, fp)| {
                let theirs = recorded.keys.get(*role)?;
                (theirs != fp)
                    .then(|| format!("the {role} key ({fp}) differs from the cluster's ({theirs})"))
            })
            .collect();
        if differences.is_empty() {
            return Ok(differences);
        }
        let others_alive = self.records()?.iter().any(|(id, beat, _)| {
            id != self.node() && !beat.stopped && !is_dead(beat, now, self.settings.timeout)
        });
        // On a shared database, a node with keys of its own (one whose empty key
        // directory made fresh ones) must never become the cluster's identity,
        // even while the others are down.
        if others_alive || seam.is_shared() {
            return Err(ClusterError::Identity(format!(
                "this node's keys are not the cluster's (recorded by node {}): {}; copy the key \
                 files from a running node (README: \"Running several bastions\", which also says \
                 how to change the cluster's keys) and start again",
                recorded.recorded_by,
                differences.join("; ")
            )));
        }
        if !seam.compare_and_swap(store::META, IDENTITY, Some(&bytes), Some(&mine))? {
            return self.check_identity(fingerprints, now);
        }
        Ok(differences)
    }
}

/// The nodes of `store` whose heartbeat is fresh and who did not stop: a
/// database they write to cannot be copied consistently (`store migrate`).
pub fn live_nodes(
    store: &Arc<Store>,
    now: DateTime<Utc>,
    timeout: std::time::Duration,
) -> Result<Vec<String>, StoreError> {
    let nodes: Table<String, Heartbeat> = Table::new(store, NODES);
    let mut live = Vec::new();
    for entry in nodes.iter() {
        let (id, beat) = entry?;
        if !beat.stopped && !is_dead(&beat, now, timeout) {
            live.push(id);
        }
    }
    Ok(live)
}

/// The fingerprints every node must share.
#[derive(Serialize, Deserialize)]
struct Identity {
    recorded_by: String,
    keys: std::collections::BTreeMap<String, String>,
}

fn is_dead(beat: &Heartbeat, now: DateTime<Utc>, timeout: std::time::Duration) -> bool {
    let timeout = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    now - beat.beat_at > timeout
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(id: &str, machine: &str) -> NodeSettings {
        NodeSettings {
            id: id.into(),
            machine: machine.into(),
            heartbeat: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        (dir, store)
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn a_live_id_on_another_machine_is_refused_and_a_restart_is_not() {
        let (_dir, store) = store();
        Cluster::join(&store, settings("a", "host1:/d"), at(0)).unwrap();
        let taken = Cluster::join(&store, settings("a", "host2:/d"), at(5))
            .err()
            .unwrap();
        assert!(
            taken.to_string().contains("give each bastion its own"),
            "{taken}"
        );
        Cluster::join(&store, settings("a", "host1:/d"), at(5)).unwrap();
        // Once dead, the id is free for anyone.
        Cluster::join(&store, settings("a", "host2:/d"), at(30)).unwrap();
    }

    #[test]
    fn exactly_one_node_claims_a_dead_one_and_the_dead_one_then_stops() {
        let (_dir, store) = store();
        let a = Cluster::join(&store, settings("a", "h1"), at(0)).unwrap();
        let b = Cluster::join(&store, settings("b", "h2"), at(0)).unwrap();
        let c = Cluster::join(&store, settings("c", "h3"), at(0)).unwrap();
        for second in [2, 4, 6, 8, 10, 12] {
            b.beat(at(second)).unwrap().unwrap();
            c.beat(at(second)).unwrap().unwrap();
        }
        assert!(b.claim_dead(at(9)).unwrap().is_empty(), "a is not dead yet");
        let by_b = b.claim_dead(at(12)).unwrap();
        let by_c = c.claim_dead(at(12)).unwrap();
        assert_eq!([by_b, by_c].concat(), vec![fresh("a")]);
        assert!(b.has_peers(), "c is alive");
        // Until b has swept it, a stays b's claim, no longer a fresh one.
        assert_eq!(
            b.claim_dead(at(13)).unwrap(),
            vec![Claim {
                node: "a".into(),
                fresh: false
            }]
        );
        // a wakes up: it must not go on as if nothing happened.
        let lost = a.beat(at(13)).unwrap().unwrap_err();
        assert_eq!(lost.by, "b");
        b.swept("a").unwrap();
        assert!(
            b.claim_dead(at(20)).unwrap().is_empty(),
            "swept nodes stay swept"
        );
        assert!(c.claim_dead(at(20)).unwrap().is_empty());
    }

    #[test]
    fn a_claim_by_a_sweeper_that_died_is_taken_over() {
        let (_dir, store) = store();
        Cluster::join(&store, settings("a", "h1"), at(0)).unwrap();
        let b = Cluster::join(&store, settings("b", "h2"), at(0)).unwrap();
        let c = Cluster::join(&store, settings("c", "h3"), at(0)).unwrap();
        b.beat(at(11)).unwrap().unwrap();
        c.beat(at(11)).unwrap().unwrap();
        assert_eq!(b.claim_dead(at(11)).unwrap(), vec![fresh("a")]);
        // b dies before it is done; c takes both over.
        c.beat(at(30)).unwrap().unwrap();
        let mut claimed: Vec<String> = c
            .claim_dead(at(30))
            .unwrap()
            .into_iter()
            .map(|c| c.node)
            .collect();
        claimed.sort();
        assert_eq!(claimed, vec!["a", "b"]);
        // A sweep that finds the node restarted leaves its new record alone.
        let a = Cluster::join(&store, settings("a", "h1"), at(31)).unwrap();
        c.swept("a").unwrap();
        a.beat(at(32)).unwrap().unwrap();
    }

    fn fresh(node: &str) -> Claim {
        Claim {
            node: node.into(),
            fresh: true,
        }
    }

    /// A beat that committed but whose answer was lost is recognised as ours.
    #[test]
    fn a_lost_answer_to_a_beat_does_not_stop_the_node() {
        let (_dir, store) = store();
        let a = Cluster::join(&store, settings("a", "h1"), at(0)).unwrap();
        // What a committed beat with a lost reply leaves: the record moved on,
        // our `last` did not.
        let moved = Heartbeat {
            machine: "h1".into(),
            started_at: at(0),
            beat_at: at(2),
            stopped: false,
            swept_by: None,
        };
        a.nodes.put(&"a".to_string(), &moved).unwrap();
        a.beat(at(4)).unwrap().unwrap();
    }

    #[test]
    fn a_stopped_node_is_never_swept() {
        let (_dir, store) = store();
        let a = Cluster::join(&store, settings("a", "h1"), at(0)).unwrap();
        let b = Cluster::join(&store, settings("b", "h2"), at(0)).unwrap();
        a.leave(at(1)).unwrap().unwrap();
        b.beat(at(60)).unwrap().unwrap();
        assert!(b.claim_dead(at(60)).unwrap().is_empty());
    }

    #[test]
    fn keys_that_differ_from_the_cluster_are_named() {
        let (_dir, store) = store();
        let a = Cluster::join(&store, settings("a", "h1"), at(0)).unwrap();
        let b = Cluster::join(&store, settings("b", "h2"), at(0)).unwrap();
        let keys = |host: &str| vec![("host", host.to_string()), ("ca", "SHA256:ca".to_string())];
        assert!(a
            .check_identity(&keys("SHA256:one"), at(0))
            .unwrap()
            .is_empty());
        assert!(a
            .check_identity(&keys("SHA256:one"), at(0))
            .unwrap()
            .is_empty());
        assert!(b
            .check_identity(&keys("SHA256:one"), at(0))
            .unwrap()
            .is_empty());
        let refused = b
            .check_identity(&keys("SHA256:two"), at(1))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("the host key (SHA256:two) differs from the cluster's (SHA256:one)")
                && refused.contains("recorded by node a")
                && !refused.contains("ca key"),
            "{refused}"
        );
        // The whole cluster stopped: the first node back may bring new keys.
        a.leave(at(2)).unwrap().unwrap();
        let changed = b.check_identity(&keys("SHA256:two"), at(3)).unwrap();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(b
            .check_identity(&keys("SHA256:two"), at(3))
            .unwrap()
            .is_empty());
    }
}
