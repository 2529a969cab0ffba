//! Bastions as nodes of a cluster (`[cluster]`). One node on sled: the node id in
//! session records, what a crash leaves behind under that id, and the key check
//! every start makes. Two nodes (the real binary twice) on one real PostgreSQL
//! database behind a real HAProxy, driven by real OpenSSH clients: approvals,
//! revocations and TOTP codes seen across nodes (a waiting `request --wait` and
//! a terminal waiting at connect), concurrent approvals, a node
//! killed mid-session, real client addresses, the shared identity, `watch` of
//! another node's session; and `store migrate` from sled into PostgreSQL. One
//! PostgreSQL server for the whole file, a fresh database per test.

pub mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn node_a() -> World {
    World::start_with(WorldOptions {
        node_config: cluster_table("bastion-a", ""),
        ..WorldOptions::default()
    })
}

/// `sessions --json` as the auditor `dave` (on the node his client points at).
fn sessions_seen_by(world: &World, dave: &Client) -> Vec<Value> {
    serde_json::from_str(&world.ok(dave, &["sessions", "--json"])).expect("sessions --json")
}

/// The audit events of `kind`, as the auditor `dave` reads them.
fn audit_events(world: &World, dave: &Client, kind: &str) -> Vec<Value> {
    world
        .ok(dave, &["audit", "--json"])
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
    let session = &sessions_seen_by(&w, &w.dave)[0];
    assert_eq!(session["node"], "bastion-a");
    assert_eq!(session["state"], "interrupted");
    let interrupted = audit_events(&w, &w.dave, "session.interrupted");
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

/// The address HAProxy connects to the bastions from (`source`): the only one the
/// nodes take PROXY headers from, so the tests' direct connections to a node
/// (from 127.0.0.1) need none.
const BALANCER: &str = "127.0.0.5";

/// Short `[cluster]` timing, for the test where a node dies: the shortest the
/// config allows (whole seconds, a timeout of at least 3 heartbeats).
const SHORT_TIMING: &str = "heartbeat = \"1s\"\nnode_timeout = \"3s\"\n";

/// Two bastion nodes on one fresh PostgreSQL database behind a real HAProxy
/// (round robin, PROXY v2 from [`BALANCER`]): `bastion-a` is the world's bastion
/// (the world's clients talk to it directly), `bastion-b` another node with the
/// same keys and policies.
///
/// Fields drop in order: HAProxy, node B, then the world (node A, sshd, the
/// directory node B's lives in).
struct Nodes {
    lb: Haproxy,
    b: Bastion,
    w: World,
}

/// The `[cluster]` table of node `id`, with `timing` lines.
fn cluster_table(id: &str, timing: &str) -> String {
    format!("[cluster]\nnode_id = \"{id}\"\n{timing}")
}

impl Nodes {
    /// Both nodes with the default timing, behind plain HAProxy.
    fn start() -> Nodes {
        Nodes::start_with("", "", "")
    }

    /// Both nodes with `shared` config lines (tables), `[cluster]` `timing`, and
    /// HAProxy with `server_options` after `send-proxy-v2 source BALANCER` (e.g.
    /// health checks).
    fn start_with(shared: &str, timing: &str, server_options: &str) -> Nodes {
        let url = postgres().fresh_database();
        let w = World::start_with(WorldOptions {
            extra_config: format!(
                "proxy_protocol_from = [\"{BALANCER}\"]\n{}\n{shared}",
                postgres().store_config(&url)
            ),
            node_config: cluster_table("bastion-a", timing),
            ..WorldOptions::default()
        });
        let b = w.another_node(
            "b",
            Path::new(Bastion::binary()),
            &cluster_table("bastion-b", timing),
        );
        let lb = Haproxy::start(
            &w.path("haproxy"),
            &[w.bastion.port(), b.port()],
            &format!("send-proxy-v2 source {BALANCER} {server_options}"),
        );
        Nodes { lb, b, w }
    }

    /// `client` talking to node B directly.
    fn on_b(&self, client: &Client) -> Client {
        client.via(self.b.port())
    }

    /// `client` going through HAProxy.
    fn through_lb(&self, client: &Client) -> Client {
        client.via(self.lb.port())
    }

    /// `audit verify --recordings` passes on each node.
    fn assert_audit_verifies(&self) {
        for dave in [self.w.dave.clone(), self.on_b(&self.w.dave)] {
            self.w.ok(&dave, &["audit", "verify", "--recordings"]);
        }
    }
}

impl Drop for Nodes {
    /// The world prints node A's and sshd's logs on a failure; these are the rest.
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- node B log ---\n{}\n--- haproxy log ---\n{}",
                self.b.log(),
                self.lb.log()
            );
        }
    }
}

/// `LOGIN@target` with the current user as the login.
fn on(target: &str) -> String {
    format!("{}@{target}", login_user())
}

/// Files a request as `client` with `args` and returns its id.
fn request(w: &World, client: &Client, args: &[&str]) -> String {
    let mut command = vec!["request"];
    command.extend_from_slice(args);
    command.push("--json");
    let doc: Value = serde_json::from_str(&w.ok(client, &command)).expect("request --json");
    doc["id"].as_str().expect("id").to_string()
}

/// `show ID --json` as `client`.
fn show(w: &World, client: &Client, id: &str) -> Value {
    serde_json::from_str(&w.ok(client, &["show", id, "--json"])).expect("show --json")
}

/// The `node` of every session `dave` sees, sorted, without repeats.
fn nodes_of_sessions(w: &World, dave: &Client) -> Vec<String> {
    let mut nodes: Vec<String> = sessions_seen_by(w, dave)
        .iter()
        .map(|s| s["node"].as_str().unwrap_or_default().to_string())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Spawns `ssh` as `client` running `command` on `target`, output captured.
fn spawn_ssh(client: &Client, user: &str, command: &[&str]) -> std::process::Child {
    client
        .ssh_command(user, &[], command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh")
}

/// Point 1 of issue 19: a request filed through the balancer is approved on the
/// node that did not file it and serves sessions on both; a `request --wait` on
/// node A wakes when node B records the approval.
#[test]
fn an_approval_on_one_node_serves_and_wakes_the_other() {
    let n = Nodes::start();
    let w = &n.w;
    let id = request(
        w,
        &n.through_lb(&w.alice),
        &["prod", "--shell", "--reason", "INC-1"],
    );
    let filed = |log: String| {
        log.lines()
            .any(|l| l.contains("control command") && l.contains("command=\"request\""))
    };
    let filed_on_a = filed(w.bastion.log());
    assert_ne!(filed_on_a, filed(n.b.log()), "exactly one node filed it");
    let approver = if filed_on_a {
        n.on_b(&w.bob)
    } else {
        w.bob.clone()
    };
    w.ok(&approver, &["approve", &id]);
    // Round robin: two connections, one on each node.
    for round in 0..2 {
        let out = n
            .through_lb(&w.alice)
            .ssh(&on("prod"), &["echo", &format!("through-{round}")]);
        assert_success(&out, "a session through the balancer");
        assert!(text(&out.stdout).contains(&format!("through-{round}")));
    }
    assert_eq!(nodes_of_sessions(w, &w.dave), ["bastion-a", "bastion-b"]);

    let waiting = spawn_ssh(
        &w.alice,
        CONTROL_USER,
        &[&quote_words(&[
            "request", "prod", "--shell", "--reason", "INC-2", "--wait",
        ])],
    );
    let bob_b = n.on_b(&w.bob);
    let mut pending = None;
    let seen = wait_until(Duration::from_secs(10), || {
        let list: Vec<Value> =
            serde_json::from_str(&w.ok(&bob_b, &["requests", "--pending", "--json"])).unwrap();
        pending = list
            .iter()
            .find(|r| r["reason"] == "INC-2")
            .map(|r| r["id"].as_str().unwrap().to_string());
        pending.is_some()
    });
    assert!(seen, "node B never saw the request filed on node A");
    let approving = Instant::now();
    w.ok(&bob_b, &["approve", &pending.unwrap()]);
    let approve_took = approving.elapsed();
    let (out, woke_after) = wait_output(waiting, Duration::from_secs(10));
    let latency = approving.elapsed();
    eprintln!(
        "approval on B → request --wait on A woke: {latency:?} from the start of `approve` \
         (which took {approve_took:?}; the waiter exited {woke_after:?} after it returned)"
    );
    assert_success(&out, "request --wait on node A");
    assert!(
        text(&out.stdout).contains("approved by bob"),
        "{}",
        describe(&out)
    );
    assert!(latency < Duration::from_secs(5), "took {latency:?}");
    n.assert_audit_verifies();
}

/// Request-on-connect across nodes: alice's terminal on node A files the request
/// and waits; bob's approval on node B lets her session on A continue.
#[test]
fn an_approval_on_one_node_continues_a_terminal_waiting_on_the_other() {
    let n = Nodes::start();
    let w = &n.w;
    let tmux = request_at_the_terminal(w, &on("prod"), "INC-3 on node A");
    let bob_b = n.on_b(&w.bob);
    let list: Vec<Value> =
        serde_json::from_str(&w.ok(&bob_b, &["requests", "--pending", "--json"])).unwrap();
    let id = list[0]["id"].as_str().expect("the request, seen on node B");
    let approving = Instant::now();
    w.ok(&bob_b, &["approve", id]);
    let approved = tmux.wait_for("approved by bob", Duration::from_secs(10));
    eprintln!(
        "approval on B → terminal on A continued: {:?} from the start of `approve`",
        approving.elapsed()
    );
    assert!(approved, "{}\n{}", tmux.screen(), w.logs());
    tmux.send("echo through-$((40+3))", true);
    tmux.send("Enter", false);
    let through = tmux.wait_for("through-43", Duration::from_secs(10));
    assert!(through, "{}\n{}", tmux.screen(), w.logs());
    assert_eq!(nodes_of_sessions(w, &w.dave), ["bastion-a"]);
}

/// Point 2: a revocation on node B ends the live session node A carries within a
/// second.
#[test]
fn a_revocation_on_one_node_ends_a_session_on_the_other_within_a_second() {
    let n = Nodes::start();
    let w = &n.w;
    let id = request(
        w,
        &w.alice,
        &["prod", "--command", "sleep *", "--reason", "INC-3"],
    );
    w.ok(&w.bob, &["approve", &id]);
    let session = spawn_ssh(&w.alice, &on("prod"), &["sleep 60"]);
    let needle = format!("grant={id}");
    assert!(
        wait_until(Duration::from_secs(10), || w
            .bastion
            .log()
            .lines()
            .any(|l| l.contains("session started") && l.contains(&needle))),
        "the session never started on node A"
    );
    w.ok(
        &n.on_b(&w.bob),
        &["revoke", &id, "--reason", "incident over"],
    );
    assert_revoked_within_a_second(session, &id, "incident over");
}

/// Point 3: two approvers deciding one `approvals = 2` request at the same moment
/// on different nodes, many times: always both approvals, two distinct approvers,
/// exactly one of them the last. The same approver on both nodes at once counts
/// once. The chain the racing nodes appended to verifies on both (point 4).
#[test]
fn concurrent_approvals_on_both_nodes_count_exactly_once_each() {
    // 25 requests in a few seconds: more than a user may file by default.
    let n = Nodes::start_with(
        "[limits]\npenalty_exempt = [\"127.0.0.1\"]\nrequests_per_user = 100\n",
        "",
        "",
    );
    let w = &n.w;
    let (bob_a, carol_b, bob_b) = (w.bob.clone(), n.on_b(&w.carol), n.on_b(&w.bob));
    let race = |id: &str, first: &Client, second: &Client| {
        thread::scope(|s| {
            let one = s.spawn(|| w.control_as(first, &["approve", id]));
            let two = s.spawn(|| w.control_as(second, &["approve", id]));
            [one.join().unwrap(), two.join().unwrap()]
        })
    };
    for round in 0..20 {
        let id = request(
            w,
            &w.alice,
            &["crit", "--shell", "--reason", &format!("race-{round}")],
        );
        let outs = race(&id, &bob_a, &carol_b);
        for out in &outs {
            assert_success(out, "approve");
        }
        let last = outs
            .iter()
            .filter(|out| !text(&out.stdout).contains("still pending"))
            .count();
        assert_eq!(last, 1, "round {round}: {outs:?}");
        let grant = show(w, &bob_b, &id);
        assert_eq!(grant["state"], "approved", "round {round}: {grant}");
        let mut by: Vec<&str> = grant["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["by"].as_str().unwrap())
            .collect();
        by.sort();
        assert_eq!(by, ["bob", "carol"], "round {round}: {grant}");
    }
    for round in 0..5 {
        let id = request(
            w,
            &w.alice,
            &["crit", "--shell", "--reason", &format!("same-{round}")],
        );
        let outs = race(&id, &bob_a, &bob_b);
        let (accepted, refused): (Vec<_>, Vec<_>) = outs.iter().partition(|o| o.status.success());
        assert_eq!(accepted.len(), 1, "round {round}: {outs:?}");
        assert_failure_mentions(
            refused[0],
            "the second approval by bob",
            &["you already approved"],
        );
        let grant = show(w, &w.bob, &id);
        assert_eq!(grant["state"], "pending", "round {round}: {grant}");
        assert_eq!(grant["approvals"].as_array().unwrap().len(), 1, "{grant}");
    }
    n.assert_audit_verifies();
}

/// Point 5: a TOTP code accepted on node A is refused on node B, which accepts a
/// newer one.
#[test]
fn a_totp_code_used_on_one_node_is_refused_on_the_other() {
    let n = Nodes::start();
    let w = &n.w;
    // Enrolment uses the previous step, so this one and the next are unused.
    let (secret, out) = enroll_with(w, &w.alice, USER, Code::PreviousStep, "");
    assert_success(&out, "totp enroll on node A");
    let now = chrono::Utc::now();
    let code = |step: i64| {
        let at = now + chrono::Duration::seconds(30 * step);
        portcullis::totp::code_at(&secret, USER, at).unwrap()
    };
    let used = fixed_askpass(w.dir.path(), "askpass-used", &code(0));
    let out = w
        .alice
        .with_askpass(&used)
        .ssh(&on("secure"), &["echo on-a"]);
    assert_success(&out, "step-up on node A");
    let out = n
        .on_b(&w.alice)
        .with_askpass(&used)
        .ssh(&on("secure"), &["echo on-b"]);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        describe(&out)
    );
    let fresh = fixed_askpass(w.dir.path(), "askpass-fresh", &code(1));
    let out = n
        .on_b(&w.alice)
        .with_askpass(&fresh)
        .ssh(&on("secure"), &["echo on-b"]);
    assert_success(&out, "a newer code on node B");
}

/// Point 6: node A killed mid-session. Node B marks the session `interrupted`
/// (with a `node.lost` event) within the node timeout and a margin; what A had
/// flushed replays from B; the user reconnects through the balancer and lands
/// on B.
#[test]
fn a_killed_node_s_sessions_are_interrupted_by_the_other() {
    // Health checks (with a PROXY header, as the bastions want) take A out of
    // HAProxy's rotation once it is dead.
    let n = Nodes::start_with(
        "",
        SHORT_TIMING,
        "check check-send-proxy inter 200ms fall 2",
    );
    let w = &n.w;
    let _tmux = flushed_shell_session(w);
    let dave_b = n.on_b(&w.dave);
    let live = sessions_seen_by(w, &dave_b);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["node"], "bastion-a");
    let id = live[0]["id"].to_string();

    let killed = Command::new("kill")
        .args(["-KILL", &w.bastion.pid().to_string()])
        .status()
        .expect("kill -KILL");
    assert!(killed.success());
    let at = Instant::now();
    let interrupted = wait_until(Duration::from_secs(10), || {
        sessions_seen_by(w, &dave_b)[0]["state"] == "interrupted"
    });
    let took = at.elapsed();
    eprintln!("SIGKILL of A → session marked interrupted by B in {took:?} (node_timeout 3s)");
    assert!(interrupted, "still not interrupted after {took:?}");
    // node_timeout, then at most one heartbeat of B until it looks, and a margin.
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let lost = audit_events(w, &dave_b, "node.lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].to_string().contains("bastion-a"), "{lost:?}");
    let replay = w.ok(&dave_b, &["replay", &id]);
    assert!(replay.contains("survived-9"), "{replay}");

    assert!(
        wait_until(Duration::from_secs(10), || n
            .lb
            .log()
            .contains("b0 is DOWN")),
        "HAProxy never noticed node A is gone"
    );
    for round in 0..2 {
        let out = n
            .through_lb(&w.alice)
            .ssh(&on(TARGET), &["echo", &format!("back-{round}")]);
        assert_success(&out, "reconnect through the balancer");
    }
    let nodes: Vec<Value> = sessions_seen_by(w, &dave_b)
        .into_iter()
        .filter(|s| s["state"] != "interrupted")
        .map(|s| s["node"].clone())
        .collect();
    assert_eq!(nodes, ["bastion-b", "bastion-b"]);
    w.ok(&dave_b, &["audit", "verify", "--recordings"]);
}

/// Point 7: the audit log shows the address of the real client behind HAProxy
/// (`ssh -b 127.0.0.2`) in the events of sessions on both nodes; after that
/// activity on both nodes the chain verifies on both (point 4).
#[test]
fn both_nodes_audit_the_real_client_address() {
    let n = Nodes::start();
    let w = &n.w;
    for _ in 0..2 {
        let out =
            n.through_lb(&w.alice)
                .ssh_with(&on(TARGET), &["-b", "127.0.0.2"], &["echo", "hi"]);
        assert_success(&out, "a session from 127.0.0.2 through the balancer");
    }
    assert_eq!(nodes_of_sessions(w, &w.dave), ["bastion-a", "bastion-b"]);
    for kind in ["auth.success", "session.start"] {
        let events: Vec<Value> = audit_events(w, &w.dave, kind)
            .into_iter()
            .filter(|e| e["actor"] == USER)
            .collect();
        assert_eq!(events.len(), 2, "{kind}: {events:#?}");
        for event in events {
            let client = event["details"]["client"].as_str().unwrap_or_default();
            assert!(client.starts_with("127.0.0.2:"), "{kind}: {event}");
        }
    }
    n.assert_audit_verifies();
}

/// Point 8: `portcullis store migrate` copies a sled data dir with a grant, a
/// recorded session and the audit chain into PostgreSQL; a bastion on the copy
/// lists and replays the session and verifies the chain with the recordings; a
/// second migration into the now non-empty database is refused.
#[test]
fn store_migrate_moves_a_sled_deployment_into_postgres() {
    let mut w = World::start();
    let id = request(&w, &w.alice, &["prod", "--shell", "--reason", "INC-8"]);
    w.ok(&w.bob, &["approve", &id]);
    let out = w.alice.ssh(&on("prod"), &["echo", "before-the-move"]);
    assert_success(&out, "a session on sled");
    let before = sessions_seen_by(&w, &w.dave);
    assert_eq!(before.len(), 1, "{before:?}");
    let session = before[0]["id"].to_string();
    // Stopped gracefully: the migration needs the data dir unlocked.
    let stopped = Command::new("kill")
        .args(["-TERM", &w.bastion.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(stopped.success());
    assert!(
        w.bastion.wait_exit(STARTUP_TIMEOUT).is_some(),
        "{}",
        w.logs()
    );

    let url = postgres().fresh_database();
    let store = postgres().store_config(&url);
    let to = w.node_dir("pg", &store);
    Bastion::write_config(&to, free_port());
    let from = Bastion::config_path(w.dir.path());
    let migrate = |to: &Path| {
        run_with_timeout(
            Command::new(Bastion::binary())
                .args(["store", "migrate", "--from"])
                .arg(&from)
                .arg("--to")
                .arg(Bastion::config_path(to)),
            None,
            COMMAND_TIMEOUT,
        )
    };
    let out = migrate(&to);
    assert_success(&out, "store migrate");
    assert!(
        text(&out.stdout).contains("the copy matches"),
        "{}",
        describe(&out)
    );

    let node = w.another_node("pg", Path::new(Bastion::binary()), &store);
    w.follow(node.port());
    let after = sessions_seen_by(&w, &w.dave);
    assert_eq!(after, before);
    assert!(w
        .ok(&w.dave, &["replay", &session])
        .contains("before-the-move"));
    assert_eq!(show(&w, &w.bob, &id)["state"], "approved");
    w.ok(&w.dave, &["audit", "verify", "--recordings"]);
    let again = w.dir.path().join("again");
    fs::create_dir_all(&again).unwrap();
    fs::copy(Bastion::config_path(&to), Bastion::config_path(&again)).unwrap();
    drop(node);
    let out = migrate(&again);
    assert_failure_mentions(
        &out,
        "a migration into a used database",
        &["already holds data"],
    );
}

/// Point 9: a third node with keys of its own is refused at start while the
/// others run, naming the keys that differ; node B lists node A's live session
/// under NODE `bastion-a` and `watch` on B follows it.
#[test]
fn nodes_share_identity_and_see_each_other_s_sessions() {
    let n = Nodes::start();
    let w = &n.w;
    let stranger = w.node_dir("c", &cluster_table("bastion-c", ""));
    Bastion::write_config(&stranger, free_port());
    let out = run_with_timeout(
        Command::new(Bastion::binary())
            .args(["serve", "--config"])
            .arg(Bastion::config_path(&stranger)),
        None,
        COMMAND_TIMEOUT,
    );
    assert_failure_mentions(
        &out,
        "a node with keys of its own",
        &[
            "this node's keys are not the cluster's (recorded by node bastion-a)",
            "the host key",
            "the upstream key",
            "copy the key files from a running node",
        ],
    );

    let tmux = flushed_shell_session(w);
    let dave_b = n.on_b(&w.dave);
    let table = w.ok(&dave_b, &["sessions", "--active"]);
    assert!(
        table.lines().next().unwrap_or_default().contains("NODE"),
        "{table}"
    );
    assert!(table.contains("bastion-a"), "{table}");
    let live = sessions_seen_by(w, &dave_b);
    assert_eq!(live[0]["node"], "bastion-a", "{live:?}");
    let id = live[0]["id"].to_string();
    // Node B reads what node A flushes.
    assert_watch_follows(w, &dave_b, &tmux, &id, "survived-9");
}
