//! A full disk loses nothing silently: the data directory on a small tmpfs is
//! filled from outside while the bastion runs.
//!
//! Below `min_free_disk` the largest live session is ended with a notice and new
//! sessions are refused; once the disk is full, anything whose audit event cannot
//! be written is refused; `/healthz` says why; once space is back the bastion exits
//! non-zero (the test plays systemd and starts it again) and `audit verify` holds.

pub mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{free_port, http_get, text, wait_until, Background, World, WorldOptions};
use portcullis::record::disk::free_bytes;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted over a directory, unmounted when dropped (also when the test
/// fails). Lazily: the bastion may still hold files open in it.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_mib: u64) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros into `path` until `leave` bytes are free on its file system (0:
/// until it is full).
fn fill(path: &Path, leave: u64) {
    let dir = path.parent().expect("filler has a directory");
    let mut file = fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .expect("open filler");
    let block = vec![0u8; 64 * 1024];
    loop {
        let free = free_bytes(dir).expect("statvfs");
        if free <= leave {
            break;
        }
        let n = (free - leave).min(block.len() as u64) as usize;
        if file.write_all(&block[..n]).is_err() {
            break; // full
        }
    }
    let _ = file.sync_all();
}

/// `GET /healthz`: status code and body.
fn healthz(port: u16) -> (u16, String) {
    http_get(port, "/healthz")
}

#[test]
fn a_full_disk_refuses_what_it_cannot_record_and_the_bastion_recovers() {
    let metrics = free_port();
    let mut world = World::start_with(WorldOptions {
        extra_config: format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n\
             [recording]\nmin_free_disk = \"8MiB\"\n"
        ),
        ..WorldOptions::default()
    });
    // Move the data directory onto a 32 MiB tmpfs while the bastion is stopped.
    let saved = world.path("data-saved");
    let mut mounted = None;
    world.restart_bastion_after(true, |data| {
        let copied = Command::new("cp")
            .arg("-a")
            .arg(data)
            .arg(&saved)
            .status()
            .expect("cp");
        assert!(copied.success());
        mounted = Some(Tmpfs::mount(data, 32));
        let restored = Command::new("sh")
            .arg("-c")
            .arg(format!("cp -a {}/. {}", saved.display(), data.display()))
            .status()
            .expect("cp back");
        assert!(restored.success());
    });
    let _tmpfs = mounted.expect("mounted");
    let data = world.bastion.data_dir();
    let filler = data.join("filler");
    let user = world.target_user();
    assert_eq!(healthz(metrics).0, 200);

    // A live session when the disk goes below the watermark is ended with a notice.
    let mut live = Background::spawn(
        world.alice.ssh_command(&user, &[], &["sleep 60"]),
        &world.path("live.log"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || world
            .bastion
            .log()
            .contains("session started")),
        "{}",
        world.logs()
    );
    fill(&filler, 4 * MIB);
    let status = live
        .wait_exit(Duration::from_secs(10))
        .expect("the live session is ended");
    assert_eq!(status.code(), Some(255), "{}", live.output());
    assert!(
        live.output().contains("disk is nearly full"),
        "{}",
        live.output()
    );
    let (code, body) = healthz(metrics);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk nearly full"), "{body}");

    // New sessions are refused before anything runs on the target.
    let marker = world.path("ran");
    let refused = world
        .alice
        .ssh(&user, &[&format!("touch {}", marker.display())]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("disk is nearly full"),
        "{}",
        text(&refused.stderr)
    );
    assert!(!marker.exists(), "a refused session ran");

    // Full: sled still writes into the log segment it has (2 MiB, allocated as it
    // was written), so auditors' searches (each an `auditor.sessions` event naming
    // its 60 KB pattern) go on until one needs new space. That one, and from then on
    // every action, is refused for want of its event.
    fill(&filler, 0);
    let pattern = "x".repeat(60_000);
    let refused = (0..200)
        .map(|_| world.control_as(&world.dave, &["sessions", "--grep", &pattern]))
        .find(|out| !out.status.success())
        .unwrap_or_else(|| {
            let log = world.bastion.log();
            let problems: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("WARN"))
                .collect();
            panic!(
                "the store never failed on a full disk ({} free):\n{}",
                free_bytes(&data).unwrap_or(0),
                problems.join("\n")
            )
        });
    assert!(
        text(&refused.stderr).contains("audit log cannot be written"),
        "{}\n{}",
        text(&refused.stderr),
        world.logs()
    );
    let request = world.control_as(
        &world.alice,
        &["request", "prod", "--shell", "--reason", "INC-full"],
    );
    assert!(!request.status.success());
    assert!(
        text(&request.stderr).contains("audit log cannot be written"),
        "{}",
        text(&request.stderr)
    );
    let (code, body) = healthz(metrics);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store failed"), "{body}");
    assert!(
        world.bastion.is_running(),
        "no restart while the disk is full"
    );

    // Space is back: the bastion exits non-zero with the reason; systemd (here: the
    // test) starts it again on the reopened store.
    fs::remove_file(&filler).expect("free space");
    let exited = world
        .bastion
        .wait_exit(Duration::from_secs(10))
        .expect("the bastion exits once there is room");
    assert!(!exited.success(), "{exited}");
    assert!(
        world
            .bastion
            .log()
            .contains("restarts portcullis with the database reopened"),
        "{}",
        world.logs()
    );
    world.restart_bastion_after(false, |_| {});
    let ok = world.alice.ssh(&user, &["echo", "recorded"]);
    assert!(ok.status.success(), "{}", world.logs());
    assert_eq!(text(&ok.stdout).trim(), "recorded");
    world.ok(&world.dave, &["audit", "verify", "--recordings"]);
    let requests = world.ok(&world.dave, &["requests", "--all"]);
    assert!(!requests.contains("INC-full"), "{requests}");
    let kinds = world.audit_kinds();
    for kind in ["session.disk_full", "session.refused"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
}

#[test]
fn a_session_over_its_recording_quota_is_ended_and_stays_verifiable() {
    let world = World::start_with(WorldOptions {
        extra_config: "[recording]\nsession_quota = \"1MiB\"\n".into(),
        ..WorldOptions::default()
    });
    let user = world.target_user();
    let out = world
        .alice
        .ssh(&user, &["head -c 16777216 /dev/urandom; sleep 5"]);
    assert_eq!(out.status.code(), Some(255), "{}", world.logs());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("recording quota") && stderr.contains("session_quota = 1MiB"),
        "{stderr}"
    );
    assert!(out.stdout.len() < 16 << 20, "the session was cut short");
    world.ok(&world.dave, &["audit", "verify", "--recordings"]);
}
