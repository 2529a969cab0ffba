//! `deploy/cluster/compose.yaml` played without a container engine, and the
//! README's "Running several bastions" on it: two nodes on one PostgreSQL
//! behind HAProxy, reached through the published port.
//!
//! Played as the single playground is (the crate's doc, [`crate::compose`]),
//! with the example's own files as they are: `setup.sh`, `bastion-a.toml`,
//! `bastion-b.toml` and `haproxy.cfg`, each service at compose.yaml's address
//! (HAProxy at its fixed one, the others from the network's `ip_range`). Two
//! images are Debian's packages here: `postgres` is Debian's PostgreSQL run as
//! the postgres image's entrypoint runs its own (as the image's user, uid 999:
//! initdb with the compose file's user and password file, every address of the
//! network let in with a password, the database created, listening on all
//! addresses), and `haproxy` is Debian's HAProxy as the image's user (uid 99)
//! on the shipped config. Not played: the images' versions (postgres:16 and
//! haproxy:2.8; Debian 12 has 15 and 2.6), Docker's own address allocation and
//! DNS (the test gives the addresses and an `/etc/hosts`), and `restart:
//! unless-stopped`, which a `docker compose kill` (the only stop here) does not
//! act on.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{postgres_bin_dir, text, wait_until, Background, HAPROXY};
use crate::compose::{repository, Project, Sandbox, User, BASTION_UID, SSH_PORT};
use crate::{pending_request, says};

/// compose.yaml's network; the host (Docker's gateway) is `.1`.
const SUBNET: &str = "172.31.77";

/// HAProxy's fixed address on it, which `proxy_protocol_from` trusts.
const HAPROXY_ADDRESS: u8 = 10;

/// The bastion services.
const NODES: [&str; 2] = ["bastion-a", "bastion-b"];

/// The postgres image's user, and its data directory.
const POSTGRES_UID: &str = "999";
const PGDATA: &str = "/var/lib/postgresql/data";

/// The haproxy image's user.
const HAPROXY_UID: &str = "99";

/// How long node b may take to mark a killed node's sessions interrupted: the
/// default node_timeout (10 s), a heartbeat (2 s), and a margin.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often to ask bastion-b meanwhile (each time an SSH connection).
const SWEEP_POLL: Duration = Duration::from_millis(500);

/// The README's commands for the cluster playground, which this test plays
/// (after `docker compose up`).
const README_COMMANDS: [&str; 2] = [
    "ssh -i deploy/playground/keys/alice -p 2222 root@staging@localhost uptime",
    "docker compose -f deploy/cluster/compose.yaml kill bastion-a",
];

#[test]
fn the_readme_walkthrough_works_on_the_cluster_playground() {
    the_example_says_what_this_test_plays();
    let mut cluster = cluster_up();
    let alice = cluster.user("alice");
    let bob = cluster.user("bob");

    // ssh -i deploy/playground/keys/alice -p 2222 root@staging@localhost uptime
    says(&alice.ok("root@staging", "uptime"), "load average");

    // The playground's approval, through the balancer: whichever node takes
    // each connection, the request, its approval and the session are the
    // cluster's.
    alice.ok(
        "portcullis",
        "request production --command uptime --reason 'demo'",
    );
    let id = pending_request(&bob);
    bob.ok("portcullis", &format!("approve {id}"));
    says(&alice.ok("root@production", "uptime"), "load average");

    // Two sessions held open: leastconn sends the second to the other node.
    let mut held: Vec<Background> = (0..2).map(|i| hold(&cluster, &alice, i)).collect();
    let live: Vec<Value> = sessions(&bob)
        .into_iter()
        .filter(|s| s["state"] == "live")
        .collect();
    let mut nodes: Vec<&str> = live.iter().filter_map(|s| s["node"].as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, NODES, "{live:#?}");
    let on_a = live
        .iter()
        .find(|s| s["node"] == "bastion-a")
        .map(|s| s["id"].clone())
        .expect("a session on bastion-a");

    // docker compose -f deploy/cluster/compose.yaml kill bastion-a
    cluster.kill("bastion-a");
    let killed = Instant::now();
    // The session bastion-a carried ends with it; bastion-b's runs on.
    let one_ended = wait_until(Duration::from_secs(10), || {
        held.iter_mut()
            .any(|session| session.wait_exit(Duration::ZERO).is_some())
    });
    let running = held
        .iter_mut()
        .map(|session| session.wait_exit(Duration::ZERO))
        .filter(Option::is_none)
        .count();
    assert!(
        one_ended && running == 1,
        "one held session should end with its node\n{}",
        cluster.logs()
    );
    // ... then connect again. HAProxy has not seen bastion-a fail two health
    // checks yet, and leastconn prefers it now that it carries nothing: the
    // connection is tried there first (refused, or no answer within 2 s), then
    // on bastion-b (`option redispatch`).
    says(&alice.ok("root@staging", "uptime"), "load average");
    eprintln!(
        "connected through HAProxy {:?} after killing bastion-a",
        killed.elapsed()
    );
    let swept = wait_until(SWEEP_TIMEOUT, || {
        thread::sleep(SWEEP_POLL);
        sessions(&bob)
            .iter()
            .any(|s| s["id"] == on_a && s["state"] == "interrupted")
    });
    eprintln!(
        "bastion-b marked bastion-a's session interrupted {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        swept,
        "bastion-a's session never marked interrupted\n{}",
        cluster.logs()
    );
    let lost = audit(&bob, "node.lost");
    assert_eq!(lost.len(), 1, "{lost:#?}");
    assert!(lost[0].to_string().contains("bastion-a"), "{lost:#?}");

    // The audit log names the client as HAProxy saw it (the compose host, as
    // Docker's proxy connects from the network's gateway), never HAProxy.
    let gateway = format!("{SUBNET}.1:");
    let logins = audit(&bob, "auth.success");
    let alices = logins.iter().filter(|e| e["actor"] == "alice").count();
    assert_eq!(alices, 6, "alice connected six times: {logins:#?}");
    for event in &logins {
        let client = event["details"]["client"].as_str().unwrap_or_default();
        assert!(client.starts_with(&gateway), "{event}");
    }
    bob.ok("portcullis", "audit verify --recordings");

    // HAProxy's health checks (a LOCAL header, then a close, every second) cost
    // the nodes nothing.
    for node in NODES {
        let log = cluster.log(node);
        for bad in ["without a valid PROXY header", "locked out"] {
            assert!(!log.contains(bad), "{node}: {bad}\n{log}");
        }
    }
}

/// Fails unless the README has the commands this test plays, and compose.yaml
/// the addresses it gives the network and HAProxy.
fn the_example_says_what_this_test_plays() {
    let read = |path: &Path| fs::read_to_string(path).expect("read the example");
    let readme = read(&repository().join("README.md"));
    for command in README_COMMANDS {
        assert!(
            readme.contains(command),
            "the README does not say: {command}"
        );
    }
    let compose = read(&cluster_dir().join("compose.yaml"));
    for setting in [
        format!("subnet: {SUBNET}.0/24,"),
        format!("ip_range: {SUBNET}.128/25,"),
        format!("gateway: {SUBNET}.1 "),
        format!("ipv4_address: {SUBNET}.{HAPROXY_ADDRESS} "),
    ] {
        assert!(compose.contains(&setting), "compose.yaml lacks {setting:?}");
    }
}

/// `docker compose -f deploy/cluster/compose.yaml up`: setup to completion,
/// PostgreSQL until healthy, the targets, both nodes, then HAProxy and its
/// published port.
fn cluster_up() -> Project {
    // Docker's addresses for the others come from the network's ip_range.
    let mut project = Project::new(
        SUBNET,
        &[
            ("postgres", 128),
            ("bastion-a", 129),
            ("bastion-b", 130),
            ("haproxy", HAPROXY_ADDRESS),
            ("staging", 131),
            ("production", 132),
        ],
    );
    // data-a is first mounted on the image's data dir (0700, the image's
    // user's), which the fresh volume copies; the others on paths the images
    // lack.
    project.volume("data-a", 0o700, BASTION_UID);
    for volume in ["data-b", "shared", "secrets"] {
        project.volume(volume, 0o755, "0");
    }
    let setup = Sandbox::portcullis_image()
        .bind(&project.path("playground"), "/playground")
        .read_only(&cluster_dir(), "/cluster")
        .bind(&project.path("data-a"), "/var/lib/portcullis")
        .bind(&project.path("data-b"), "/nodes/bastion-b")
        .bind(&project.path("shared"), "/shared")
        .bind(&project.path("secrets"), "/secrets");
    project.run_once("setup", setup.clone(), &["sh", "/cluster/setup.sh"]);
    // Every `up` runs it again, on the volumes it filled.
    project.run_once("setup (again)", setup, &["sh", "/cluster/setup.sh"]);
    start_postgres(&mut project);
    for name in ["staging", "production"] {
        project.start_target(name);
    }
    for (node, data) in NODES.into_iter().zip(["data-a", "data-b"]) {
        let config = format!("/cluster/{node}.toml");
        let sandbox = Sandbox::portcullis_image()
            .read_only(&cluster_dir(), "/cluster")
            .bind(&project.path(data), "/var/lib/portcullis")
            .read_only(&project.path("secrets"), "/secrets")
            .user(BASTION_UID);
        project.start(node, sandbox, &["portcullis", "serve", "--config", &config]);
    }
    for node in NODES {
        project.wait_listening(node, SSH_PORT);
    }
    let haproxy = Sandbox::new()
        .read_only(
            &cluster_dir().join("haproxy.cfg"),
            "/usr/local/etc/haproxy/haproxy.cfg",
        )
        .user(HAPROXY_UID);
    // The image's command: haproxy -f CFG, which its entrypoint runs as
    // haproxy -W -db -f CFG.
    project.start(
        "haproxy",
        haproxy,
        &[
            HAPROXY,
            "-W",
            "-db",
            "-f",
            "/usr/local/etc/haproxy/haproxy.cfg",
        ],
    );
    project.wait_listening("haproxy", SSH_PORT);
    project.publish(&[(":2222", "haproxy", SSH_PORT)]);
    project
}

/// The `postgres` service with `POSTGRES_USER` and `POSTGRES_DB` portcullis and
/// `POSTGRES_PASSWORD_FILE` /secrets/postgres/password, as the image's
/// entrypoint sets it up; returns once compose's healthcheck passes.
fn start_postgres(project: &mut Project) {
    // As root, the entrypoint makes the data directory the image user's, private.
    let pgdata = project.volume("pgdata", 0o700, &format!("{POSTGRES_UID}:{POSTGRES_UID}"));
    // The image knows its user by name (initdb looks the user up).
    let passwd = project.path("postgres-passwd");
    fs::write(
        &passwd,
        format!("root:x:0:0:root:/root:/bin/bash\npostgres:x:{POSTGRES_UID}:{POSTGRES_UID}::/var/lib/postgresql:/bin/bash\n"),
    )
    .expect("write the image's passwd");
    let bin = postgres_bin_dir();
    let program = |name: &str| bin.join(name).to_string_lossy().into_owned();
    let image = || {
        Sandbox::new()
            .bind(&pgdata, PGDATA)
            .read_only(&project.path("secrets"), "/secrets")
            .read_only(&passwd, "/etc/passwd")
            .env("LANG", "C.UTF-8") // the image's: en_US.utf8
            .user(POSTGRES_UID)
    };
    project.run_once(
        "postgres (initdb)",
        image(),
        &[
            &program("initdb"),
            "-D",
            PGDATA,
            "--username=portcullis",
            "--pwfile=/secrets/postgres/password",
        ],
    );
    // The entrypoint lets every other address in with a password.
    let hba = pgdata.join("pg_hba.conf");
    let mut rules = fs::read_to_string(&hba).expect("read pg_hba.conf");
    rules.push_str("\nhost all all all scram-sha-256\n");
    fs::write(&hba, rules).expect("write pg_hba.conf");
    let server = image().directory("/var/run/postgresql", 0o3777);
    project.start(
        "postgres",
        server,
        &[
            &program("postgres"),
            "-D",
            PGDATA,
            "-c",
            "listen_addresses=*",
        ],
    );
    // POSTGRES_DB, which the entrypoint creates before it serves the network
    // (here from the container's own loopback, which initdb trusts).
    let psql = program("psql");
    let created = wait_until(Duration::from_secs(15), || {
        let create = [
            psql.as_str(),
            "-X",
            "-h",
            "127.0.0.1",
            "-U",
            "portcullis",
            "-d",
            "postgres",
            "-c",
            "CREATE DATABASE portcullis",
        ];
        project.in_network_of("postgres", &create).status.success()
    });
    assert!(
        created,
        "CREATE DATABASE portcullis failed\n{}",
        project.logs()
    );
    // compose.yaml's healthcheck.
    let ready = project.in_network_of(
        "postgres",
        &[
            &program("pg_isready"),
            "-h",
            "127.0.0.1",
            "-U",
            "portcullis",
            "-d",
            "portcullis",
        ],
    );
    assert!(ready.status.success(), "{}", project.logs());
}

/// `deploy/cluster`, which compose mounts read-only at `/cluster`.
fn cluster_dir() -> PathBuf {
    repository().join("deploy/cluster")
}

/// Alice's session on staging, held open in the background; returns once it
/// runs.
fn hold(cluster: &Project, alice: &User, index: usize) -> Background {
    let log = cluster.path(&format!("held-{index}.log"));
    let session = Background::spawn(
        alice.ssh_command(
            "root@staging",
            &format!("echo held-{index}; exec sleep 600"),
        ),
        &log,
    );
    let runs = wait_until(Duration::from_secs(15), || {
        session.output().contains(&format!("held-{index}"))
    });
    assert!(
        runs,
        "held session {index}: {}\n{}",
        session.output(),
        cluster.logs()
    );
    session
}

/// `sessions --json`, as the auditor bob reads it.
fn sessions(bob: &User) -> Vec<Value> {
    let out = bob.ok("portcullis", "sessions --json");
    serde_json::from_str(&text(&out.stdout)).expect("sessions --json")
}

/// The audit events of `kind`, as the auditor bob reads them.
fn audit(bob: &User, kind: &str) -> Vec<Value> {
    let out = bob.ok("portcullis", "audit --json");
    text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("audit --json line"))
        .filter(|event| event["kind"] == kind)
        .collect()
}
