//! One bastion as a node of a cluster (`[cluster]`): the node id in session
//! records, what a crash leaves behind under that id, and the key check every start
//! makes against the cluster's recorded identity.

pub mod common;

use std::fs;

use common::*;
use serde_json::Value;

fn node_a() -> World {
    World::start_with(WorldOptions {
        extra_config: "[cluster]\nnode_id = \"bastion-a\"\n".into(),
        ..WorldOptions::default()
    })
}

fn sessions(world: &World) -> Vec<Value> {
    serde_json::from_str(&world.ok(&world.dave, &["sessions", "--json"])).expect("sessions --json")
}

fn audit_events(world: &World, kind: &str) -> Vec<Value> {
    world
        .ok(&world.dave, &["audit", "--json"])
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|event| event["kind"] == kind)
        .collect()
}

/// `sessions` names the node that carries each session, and a crash of that node
/// leaves its live session `interrupted` under the node's name.
#[test]
fn sessions_name_their_node_and_a_crash_interrupts_them_under_it() {
    let mut w = node_a();
    let _tmux = flushed_shell_session(&w);
    let table = w.ok(&w.dave, &["sessions", "--active"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("NODE"), "{table}");
    assert!(table.contains("bastion-a"), "{table}");

    w.restart_bastion();
    let session = &sessions(&w)[0];
    assert_eq!(session["node"], "bastion-a");
    assert_eq!(session["state"], "interrupted");
    let interrupted = audit_events(&w, "session.interrupted");
    assert_eq!(interrupted.len(), 1, "{interrupted:?}");
    assert_eq!(interrupted[0]["details"]["node"], "bastion-a");
    assert_success(
        &w.control_as(&w.dave, &["audit", "verify", "--recordings"]),
        "audit verify after the crash",
    );
}

/// A node alone may come back with new keys (an operator rotated them with the
/// whole cluster stopped): it starts, takes them as the cluster's and says so. With
/// another node running, different keys are refused (see the two-node tests).
#[test]
fn a_lone_node_with_rotated_keys_starts_and_says_so() {
    let mut w = node_a();
    w.restart_bastion_after(true, |data| {
        fs::remove_file(data.join("ca_ed25519")).unwrap();
        fs::remove_file(data.join("ca_ed25519.pub")).unwrap();
    });
    let log = w.bastion.log();
    assert!(
        log.contains("no other node is running: the cluster takes this node's keys (the ca key"),
        "{log}"
    );
    assert_success(
        &w.alice
            .ssh(&format!("{}@{TARGET}", login_user()), &["true"]),
        "a session after the rotation",
    );
}
