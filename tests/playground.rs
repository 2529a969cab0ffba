//! The container playgrounds, played without a container engine:
//! `deploy/compose.yaml` (one bastion and two targets) here, and
//! `deploy/cluster/compose.yaml` (two bastions on PostgreSQL behind HAProxy) in
//! [`cluster`].
//!
//! CI has no Docker engine, so these tests take compose's part ([`compose`]):
//! each service runs its image's command with its image's paths and user, in a
//! bubblewrap sandbox over the host's `/usr` and `/etc`, with the same bind
//! mounts and volumes as in the compose file, in a network namespace of its own
//! on a bridge, finding the others by their service names; the published ports
//! are on a namespace that stands for the compose host, where the README's
//! commands run word for word. What this cannot check is the Dockerfiles'
//! build steps: the images' programs are the host's (Debian's).

pub mod common;
// A test crate's root resolves modules beside it, in tests/: these two live in
// tests/playground/.
#[path = "playground/cluster.rs"]
mod cluster;
#[path = "playground/compose.rs"]
mod compose;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};

use common::{assert_failure_mentions, describe, run, text};
use compose::{repository, Project, Sandbox, BASTION_UID, CHECKOUT_OWNER, SSH_PORT};
use serde_json::Value;

/// The playground's targets (compose services).
const TARGETS: [&str; 2] = ["staging", "production"];

/// Where the playground publishes the bastion's metrics (loopback only).
const METRICS_PORT: u16 = 9922;

#[test]
fn the_readme_walkthrough_works_on_the_playground() {
    let playground = playground_up();
    let alice = playground.user("alice");
    let bob = playground.user("bob");

    // The demo keys belong to the checkout's owner, private, and git ignores them.
    for key in ["alice", "bob"] {
        let path = playground.path("playground/keys").join(key);
        let meta = fs::metadata(&path).expect("demo key");
        assert_eq!(
            format!("{}:{}", meta.uid(), meta.gid()),
            CHECKOUT_OWNER,
            "{}",
            path.display()
        );
        assert_eq!(meta.mode() & 0o777, 0o600, "{}", path.display());
    }
    let ignored = run(Command::new("git").arg("-C").arg(repository()).args([
        "check-ignore",
        "-q",
        "deploy/playground/keys/alice",
    ]));
    // 1: not ignored (128: not a git checkout, nothing to say).
    assert_ne!(
        ignored.status.code(),
        Some(1),
        "deploy/playground/keys is not git-ignored"
    );

    says(&alice.ok("root@staging", "uptime"), "load average"); // auto-approved

    let out = alice.ssh("root@production", "uptime");
    assert_failure_mentions(&out, "production before approval", &["no active grant"]);

    alice.ok(
        "portcullis",
        "request production --command uptime --reason 'demo'",
    );
    says(&bob.ok("portcullis", "requests --pending"), "production");
    let id = pending_request(&bob);
    bob.ok("portcullis", &format!("approve {id}"));

    // Approved, and reached with a per-session certificate.
    says(&alice.ok("root@production", "uptime"), "load average");

    let sessions = bob.ok("portcullis", "sessions");
    for target in TARGETS {
        says(&sessions, target);
    }

    let health = playground.on_host(&format!(
        "exec 3<>/dev/tcp/127.0.0.1/{METRICS_PORT}; printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    ));
    says(&health, "200");
}

/// `docker compose -f deploy/compose.yaml up`: the setup service to completion,
/// then the targets, then the bastion once its targets listen, its ports
/// published.
fn playground_up() -> Project {
    // Compose picks a free private subnet for the project's default network.
    let mut project = Project::new(
        "172.30.66",
        &[("bastion", 2), ("staging", 3), ("production", 4)],
    );
    // The image's data dir (install -d -o portcullis -m 0700), which the fresh
    // volume copies.
    let data = project.volume("data", 0o700, BASTION_UID);
    project.volume("shared", 0o755, "0");
    let setup = Sandbox::portcullis_image()
        .bind(&project.path("playground"), "/playground")
        .bind(&data, "/var/lib/portcullis")
        .bind(&project.path("shared"), "/shared");
    project.run_once("setup", setup, &["sh", "/playground/setup.sh"]);
    for name in TARGETS {
        project.start_target(name);
    }
    let bastion = Sandbox::portcullis_image()
        .read_only(
            &project.path("playground/portcullis.toml"),
            "/playground/portcullis.toml",
        )
        .bind(&data, "/var/lib/portcullis")
        .user(BASTION_UID);
    project.start(
        "bastion",
        bastion,
        &[
            "portcullis",
            "serve",
            "--config",
            "/playground/portcullis.toml",
        ],
    );
    project.wait_listening("bastion", SSH_PORT);
    project.publish(&[
        (":2222", "bastion", SSH_PORT),
        ("127.0.0.1:9922", "bastion", METRICS_PORT),
    ]);
    project
}

/// The id of the one pending request, as `requests --pending --json` shows it to
/// the approver.
fn pending_request(approver: &compose::User) -> String {
    let pending: Value = serde_json::from_str(&text(
        &approver
            .ok("portcullis", "requests --pending --json")
            .stdout,
    ))
    .expect("requests --json");
    let id = pending[0]["id"].as_str().expect("a pending request id");
    id.to_string()
}

fn says(out: &Output, needle: &str) {
    assert!(
        text(&out.stdout).contains(needle),
        "expected {needle:?} in the output\n{}",
        describe(out)
    );
}
