//! Recording, replay, export, watch and the audit chain, end to end: real OpenSSH
//! clients, a real sshd target, and the auditor (dave) on the control plane.

pub mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn local() -> String {
    format!("{}@{TARGET}", login_user())
}

fn sessions(world: &World, filters: &[&str]) -> Vec<Value> {
    let mut command = vec!["sessions", "--json"];
    command.extend_from_slice(filters);
    serde_json::from_str(&world.ok(&world.dave, &command)).expect("sessions --json")
}

/// Runs a shell session with a pty, typing `script` on stdin.
fn typed_session(world: &World, script: &str) -> std::process::Output {
    world
        .alice
        .ssh_stdin(&local(), &[], script.as_bytes().to_vec())
}

fn single_session(world: &World) -> Value {
    let all = sessions(world, &[]);
    assert_eq!(all.len(), 1, "{all:?}");
    all[0].clone()
}

#[test]
fn a_session_is_recorded_replayed_and_exported() {
    let w = World::start();
    // -tt on a shell: a pty session whose input is the script below.
    let out = run_with_timeout(
        &mut w.alice.ssh_command(&local(), &["-tt"], &[]),
        Some(b"echo typed-$((2+3))\nexit 3\n".to_vec()),
        COMMAND_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));

    let session = single_session(&w);
    assert_eq!(session["state"], "closed");
    assert_eq!(session["exit_status"], 3);
    assert_eq!(session["user"], USER);
    assert_eq!(session["kind"], "shell");
    assert!(session["bytes_in"].as_u64().unwrap() > 0);
    let id = session["id"].as_u64().unwrap().to_string();

    let started = Instant::now();
    let replayed = w.ok(&w.dave, &["replay", &id, "--speed", "50"]);
    eprintln!("replay of a short session took {:?}", started.elapsed());
    assert!(replayed.contains("typed-5"), "{replayed}");

    let cast = w.ok(&w.dave, &["export", &id]);
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(header["width"].as_u64().unwrap() > 0 && header["height"].as_u64().unwrap() > 0);
    let events: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    let times: Vec<f64> = events.iter().map(|e| e[0].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "events are ordered");
    let of = |code: &str| -> String {
        events
            .iter()
            .filter(|e| e[1] == code)
            .map(|e| e[2].as_str().unwrap())
            .collect()
    };
    assert!(of("o").contains("typed-5"), "{cast}");
    assert!(of("i").contains("echo typed-$((2+3))"), "{cast}");

    let file = w.path("session.cast");
    fs::write(&file, &cast).unwrap();
    let played = Command::new(asciinema())
        .arg("cat")
        .arg(&file)
        .output()
        .unwrap();
    assert_success(&played, "asciinema cat");
    assert!(
        text(&played.stdout).contains("typed-5"),
        "{}",
        describe(&played)
    );
}

/// The asciinema CLI that `scripts/test` installs (in `target/pytools`), or one on PATH.
fn asciinema() -> String {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pytools/bin/asciinema");
    if local.exists() {
        return local.display().to_string();
    }
    let found = Command::new("sh")
        .args(["-c", "command -v asciinema"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "asciinema is missing: run scripts/test, which installs it"
    );
    text(&found.stdout).trim().to_string()
}

#[test]
fn watch_follows_a_live_session_from_what_it_showed_so_far() {
    let w = World::start();
    let line = w.alice.ssh_shell_line(&local(), &["-tt"], &[]);
    let tmux = Tmux::start(w.dir.path(), 100, 30, &line);
    tmux.send("echo before-$((1+1))", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("before-2", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    let live = sessions(&w, &["--active"]);
    assert_eq!(live.len(), 1, "{live:?}");
    let id = live[0]["id"].as_u64().unwrap().to_string();

    assert_watch_follows(&w, &w.dave, &tmux, &id, "before-2");
    let err = w.control_as(&w.dave, &["watch", &id]);
    assert!(text(&err.stderr).contains("not live"), "{}", describe(&err));
}

#[test]
fn sessions_filter_by_user_target_time_activity_and_output() {
    let w = World::start();
    assert_success(&typed_session(&w, "echo needle-abc\n"), "alice");
    assert_success(
        &w.dave.ssh(&local(), &["echo haystack"]),
        "dave's own session",
    );
    assert_eq!(sessions(&w, &[]).len(), 2);
    assert_eq!(sessions(&w, &["--user", USER]).len(), 1);
    assert_eq!(sessions(&w, &["--user", "carol"]).len(), 0);
    assert_eq!(sessions(&w, &["--target", TARGET]).len(), 2);
    assert_eq!(sessions(&w, &["--target", "prod"]).len(), 0);
    assert_eq!(sessions(&w, &["--since", "1h"]).len(), 2);
    assert_eq!(sessions(&w, &["--active"]).len(), 0);
    let found = sessions(&w, &["--grep", "needle-abc"]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["user"], USER);
    let table = w.ok(&w.dave, &["sessions"]);
    assert!(table.starts_with("ID  USER"), "{table}");
    assert!(table.contains("closed"), "{table}");

    for command in [
        vec!["sessions"],
        vec!["replay", "1"],
        vec!["export", "1"],
        vec!["watch", "1"],
        vec!["audit"],
        vec!["audit", "verify"],
    ] {
        let out = w.control_as(&w.alice, &command);
        assert_failure_mentions(&out, "non-auditor", &["only auditors"]);
    }
    let err = w.control_as(&w.dave, &["replay", "x; id"]);
    assert_failure_mentions(&err, "bad id", &["is not a session id"]);
    let kinds = w.audit_kinds();
    for kind in [
        "auth.success",
        "request.created",
        "session.start",
        "session.end",
        "auditor.sessions",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
}

/// Only sftp forced to `internal-sftp` by a session certificate keeps a
/// metadata-only recording: everything that starts through the login shell
/// (`scp -O`, rsync, sftp on a key-mode target, and anything that merely starts
/// like them) could be a shell in disguise, so it is recorded in full.
#[test]
fn only_provable_file_transfers_skip_the_transcript() {
    let w = World::start_with(WorldOptions {
        certificate_target: true,
        ..WorldOptions::default()
    });
    let file = w.path("payload");
    random_file(&file, 64 * 1024);
    let dest = w.path("uploads");
    fs::create_dir_all(&dest).unwrap();
    let to = remote_path(&local(), &dest);
    assert_success(
        &w.alice.scp(&["-O"], &file.display().to_string(), &to),
        "scp -O",
    );
    assert_success(
        &w.alice
            .rsync(&file.display().to_string(), &format!("{to}/by-rsync")),
        "rsync",
    );
    assert_eq!(sha256_file(&dest.join("by-rsync")), sha256_file(&file));
    let batch = w.path("batch");
    fs::write(
        &batch,
        format!(
            "put {} {}\n",
            file.display(),
            dest.join("by-sftp").display()
        ),
    )
    .unwrap();
    assert_success(&w.alice.sftp_batch(&local(), &batch), "sftp, key mode");

    let out = run_with_timeout(
        &mut w
            .alice
            .ssh_command(&local(), &["-tt"], &["rsync --server; exec bash -i"]),
        Some(b"echo disguised-$((6*7))\nexit\n".to_vec()),
        COMMAND_TIMEOUT,
    );
    assert!(
        text(&out.stdout).contains("disguised-42"),
        "{}",
        describe(&out)
    );
    let out = w
        .alice
        .ssh(&local(), &["scp -f /etc/hostname; echo appended-$((2*3))"]);
    assert!(
        text(&out.stdout).contains("appended-6"),
        "{}",
        describe(&out)
    );

    // sftp to a certificate-mode target, under a shell grant: internal-sftp.
    let doc: Value = serde_json::from_str(&w.ok(
        &w.alice,
        &["request", "certs", "--shell", "--reason", "CHG-7", "--json"],
    ))
    .unwrap();
    w.ok(&w.bob, &["approve", doc["id"].as_str().unwrap()]);
    fs::write(
        &batch,
        format!(
            "put {} {}\n",
            file.display(),
            dest.join("by-cert-sftp").display()
        ),
    )
    .unwrap();
    let certs = format!("{}@certs", login_user());
    assert_success(
        &w.alice.sftp_batch(&certs, &batch),
        "sftp, certificate mode",
    );
    assert_eq!(sha256_file(&dest.join("by-cert-sftp")), sha256_file(&file));

    let recorded: Vec<(String, String, bool)> = sessions(&w, &[])
        .iter()
        .map(|s| {
            (
                s["target"].as_str().unwrap().to_string(),
                s["command"].as_str().unwrap_or_default().to_string(),
                s["full_transcript"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(recorded.len(), 6, "{recorded:?}");
    let (metadata_only, full): (Vec<_>, Vec<_>) = recorded.iter().partition(|(_, _, full)| !full);
    assert_eq!(
        metadata_only,
        [&("certs".to_string(), "sftp".to_string(), false)],
        "{recorded:?}"
    );
    assert_eq!(full.len(), 5, "{recorded:?}");
    assert!(
        recorded_certificate_forces(&w, "internal-sftp"),
        "the sftp session's certificate forces internal-sftp"
    );
    assert_eq!(sessions(&w, &["--grep", "disguised-42"]).len(), 1);
    assert_eq!(sessions(&w, &["--grep", "appended-6"]).len(), 1);
}

/// Whether the last session's certificate carries `force-command COMMAND`.
fn recorded_certificate_forces(world: &World, command: &str) -> bool {
    let all = sessions(world, &[]);
    let cert = all
        .last()
        .and_then(|s| s["certificate"].as_str())
        .expect("a certificate-mode session records its certificate");
    let file = world.path("last-cert.pub");
    fs::write(&file, format!("{cert}\n")).unwrap();
    let out = run(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&file));
    assert_success(&out, "ssh-keygen -L");
    text(&out.stdout).contains(&format!("force-command {command}"))
}

/// Commands fed on stdin never show in the output, yet auditors find, replay and
/// spot them.
#[test]
fn piped_input_is_searched_replayed_and_marked() {
    let w = World::start();
    let out = w.alice.ssh_stdin(
        &local(),
        &["bash -s"],
        b"echo piped-needle-7 > /dev/null\n".to_vec(),
    );
    assert_success(&out, "bash -s");
    assert_success(&w.alice.ssh(&local(), &["true"]), "a session without input");

    let found = sessions(&w, &["--grep", "piped-needle-7"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["command"], "bash -s");
    assert_eq!(found[0]["received_input"], true);
    let id = found[0]["id"].as_u64().unwrap().to_string();
    let replayed = w.ok(&w.dave, &["replay", &id, "--speed", "100"]);
    assert!(replayed.contains("echo piped-needle-7"), "{replayed}");

    let table = w.ok(&w.dave, &["sessions"]);
    let marks: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|line| if line.contains("piped") { "piped" } else { "-" })
        .collect();
    assert!(table.lines().next().unwrap().contains("INPUT"), "{table}");
    assert_eq!(marks, ["piped", "-"], "{table}");
}

/// Rewrites the audit tree of the (stopped) bastion's database.
fn with_audit_tree(data: &Path, change: impl FnOnce(&sled::Tree)) {
    let db = portcullis::store::sled_config(&data.join("db"))
        .open()
        .expect("open the bastion's database");
    let tree = db.open_tree("audit").unwrap();
    change(&tree);
    db.flush().unwrap();
}

fn verify(world: &World, flags: &[&str]) -> std::process::Output {
    let mut command = vec!["audit", "verify"];
    command.extend_from_slice(flags);
    world.control_as(&world.dave, &command)
}

#[test]
fn audit_verify_finds_edited_and_removed_events() {
    let mut w = World::start();
    assert_success(&w.alice.ssh(&local(), &["true"]), "some history");
    assert_success(&verify(&w, &[]), "an untouched chain verifies");
    let key = |seq: u64| seq.to_be_bytes();

    let mut original = None;
    w.restart_bastion_after(true, |data| {
        with_audit_tree(data, |tree| {
            let value = tree.get(key(3)).unwrap().unwrap();
            original = Some(value.clone());
            let mut event: Value = serde_json::from_slice(&value).unwrap();
            event["actor"] = "mallory".into();
            tree.insert(key(3), serde_json::to_vec(&event).unwrap())
                .unwrap();
        })
    });
    let out = verify(&w, &[]);
    assert_failure_mentions(&out, "edited", &["broken at event 3", "altered"]);

    let original = original.unwrap();
    w.restart_bastion_after(true, |data| {
        with_audit_tree(data, |tree| {
            tree.insert(key(3), original.clone()).unwrap();
            tree.remove(key(2)).unwrap();
        })
    });
    let out = verify(&w, &[]);
    assert_failure_mentions(&out, "removed", &["broken at event 2", "missing"]);
}

#[test]
fn audit_verify_finds_reordered_events() {
    let mut w = World::start();
    assert_success(&w.alice.ssh(&local(), &["true"]), "some history");
    w.restart_bastion_after(true, |data| {
        with_audit_tree(data, |tree| {
            let four = tree.get(4u64.to_be_bytes()).unwrap().unwrap();
            let five = tree.get(5u64.to_be_bytes()).unwrap().unwrap();
            tree.insert(4u64.to_be_bytes(), five).unwrap();
            tree.insert(5u64.to_be_bytes(), four).unwrap();
        })
    });
    let out = verify(&w, &[]);
    assert_failure_mentions(&out, "swapped", &["broken at event 4", "reordered"]);
}

#[test]
fn audit_verify_recordings_finds_an_edited_transcript() {
    let mut w = World::start();
    assert_success(&typed_session(&w, "echo secret-output\n"), "a session");
    let out = verify(&w, &["--recordings"]);
    assert_success(&out, "untouched recordings verify");
    assert!(
        text(&out.stdout).contains("recordings OK: 1"),
        "{}",
        describe(&out)
    );
    w.restart_bastion_after(true, |data| {
        let db = portcullis::store::sled_config(&data.join("db"))
            .open()
            .unwrap();
        let chunks = db.open_tree("chunks").unwrap();
        let (key, value) = chunks.first().unwrap().expect("a stored batch");
        let shout = |batch: &mut [u8]| {
            let at = batch
                .windows(6)
                .position(|w| w == b"secret")
                .expect("the output is in the batch");
            batch[at..at + 6].copy_from_slice(b"SECRET");
        };
        // A short batch is stored as it is, behind a zero tag byte; others are zstd.
        let edited = if value[0] == 0 {
            let mut batch = value.to_vec();
            shout(&mut batch);
            batch
        } else {
            let mut batch = zstd::bulk::decompress(&value, 1 << 26).unwrap();
            shout(&mut batch);
            zstd::bulk::compress(&batch, 3).unwrap()
        };
        chunks.insert(key, edited).unwrap();
        db.flush().unwrap();
    });
    assert_success(&verify(&w, &[]), "the chain itself is intact");
    let out = verify(&w, &["--recordings"]);
    assert_failure_mentions(
        &out,
        "edited transcript",
        &["recording of session 1 was altered"],
    );
}

#[test]
fn a_bastion_crash_leaves_an_interrupted_but_replayable_session() {
    let mut w = World::start();
    let _tmux = flushed_shell_session(&w);
    w.restart_bastion(); // SIGKILL
    let session = single_session(&w);
    assert_eq!(session["state"], "interrupted");
    let id = session["id"].as_u64().unwrap().to_string();
    let replayed = w.ok(&w.dave, &["replay", &id, "--speed", "100"]);
    assert!(replayed.contains("survived-9"), "{replayed}");
    assert!(w.ok(&w.dave, &["audit"]).contains("session.interrupted"));
    assert_success(
        &verify(&w, &["--recordings"]),
        "interrupted recordings verify",
    );
}

#[test]
fn large_output_is_recorded_with_bounded_memory() {
    let w = World::start();
    const MIB: u64 = 256;
    let mut child = w
        .alice
        .ssh_command(
            &local(),
            &[],
            &[&format!(
                "yes 'a line of terminal output 0123456789' | head -c {}",
                MIB << 20
            )],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let received = std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(received, MIB << 20);
    let peak_kib = status_kib(w.bastion.pid(), "VmHWM:");
    assert!(peak_kib > 0, "cannot read the bastion's peak RSS");
    assert!(
        wait_until(Duration::from_secs(10), || single_session(&w)["state"]
            == "closed"),
        "the recording was never closed"
    );
    let session = single_session(&w);
    eprintln!(
        "{MIB} MiB session: bastion peak RSS {} MiB; transcript {} bytes stored as {} ({} batches)",
        peak_kib / 1024,
        session["transcript_bytes"],
        session["stored_bytes"],
        session["batches"]
    );
    assert_eq!(session["transcript_bytes"].as_u64().unwrap(), MIB << 20);
    assert!(peak_kib < 200 * 1024, "peak RSS {peak_kib} KiB");
}

/// Export, replay and search read a transcript one batch at a time: their peak
/// memory does not grow with the size of the session.
#[test]
fn reading_a_large_recording_holds_one_batch_at_a_time() {
    let w = World::start();
    const MIB: u64 = 48;
    let out = w
        .alice
        .ssh(&local(), &[&format!("head -c {} /dev/urandom", MIB << 20)]);
    assert_success(&out, "random output");
    assert!(wait_until(Duration::from_secs(10), || single_session(&w)
        ["state"]
        == "closed"));
    let id = single_session(&w)["id"].as_u64().unwrap().to_string();
    let pid = w.bastion.pid();
    for command in [
        vec!["export", id.as_str()],
        vec!["replay", id.as_str(), "--speed", "1000", "--raw"],
        vec!["sessions", "--grep", "never-in-random-bytes"],
    ] {
        // Reset the peak (VmHWM) to what is resident now, then read the session.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        let before = status_kib(pid, "VmRSS:");
        let mut reading = w
            .dave
            .ssh_command(CONTROL_USER, &[], &[&quote_words(&command)]);
        let out = reading.stdout(Stdio::piped()).output().unwrap();
        assert!(out.status.success(), "{command:?}: {}", describe(&out));
        let grown_mib = status_kib(pid, "VmHWM:").saturating_sub(before) / 1024;
        eprintln!("{command:?} of a {MIB} MiB session: peak grew {grown_mib} MiB");
        // A whole-transcript read would grow it by several times the session.
        assert!(
            grown_mib < 64,
            "{command:?} grew the bastion by {grown_mib} MiB"
        );
    }
}

#[test]
fn retention_prunes_old_transcripts_and_says_so_in_the_audit_log() {
    let mut w = World::start_with(WorldOptions {
        extra_config: "[retention]\nrecordings = \"1s\"\n".into(),
        ..WorldOptions::default()
    });
    assert_success(&typed_session(&w, "echo old-news\n"), "a session");
    let id = single_session(&w)["id"].as_u64().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    // Retention runs at start and then hourly.
    w.restart_bastion_after(true, |_| {});
    assert!(
        wait_until(Duration::from_secs(10), || single_session(&w)["pruned"]
            == true),
        "never pruned"
    );
    let out = w.control_as(&w.dave, &["replay", &id]);
    assert_failure_mentions(&out, "pruned", &["pruned by retention"]);
    let audit = w.ok(&w.dave, &["audit"]);
    assert!(audit.contains("recordings.pruned"), "{audit}");
    assert_success(
        &verify(&w, &["--recordings"]),
        "pruned sessions are accounted for",
    );
    assert_eq!(sessions(&w, &[]).len(), 1, "metadata stays");
}

/// An OSC 52 sequence, as a recorded program prints it: "set the clipboard to
/// `curl x|sh`".
const OSC52: &str = "\x1b]52;c;Y3VybCB4fHNo\x07";

#[test]
fn replay_and_watch_drop_sequences_that_act_outside_the_screen() {
    let w = World::start();
    let out = w.alice.ssh(
        &local(),
        &[r"printf '\033]52;c;Y3VybCB4fHNo\007visible \033[1mbold\033[0m\n'"],
    );
    assert_success(&out, "printing OSC 52");
    assert!(
        text(&out.stdout).contains(OSC52),
        "the session itself is untouched"
    );
    let id = single_session(&w)["id"].as_u64().unwrap().to_string();

    let replayed = w.ok(&w.dave, &["replay", &id, "--speed", "50"]);
    assert!(
        replayed.contains("visible \x1b[1mbold\x1b[0m"),
        "{replayed:?}"
    );
    assert!(!replayed.contains("\x1b]52"), "{replayed:?}");
    let raw = w.ok(&w.dave, &["replay", &id, "--speed", "50", "--raw"]);
    assert!(raw.contains(OSC52), "{raw:?}");
    let replays: Vec<Value> = w
        .ok(&w.dave, &["audit", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|event: &Value| event["kind"] == "auditor.replay")
        .collect();
    let raw_flags: Vec<&Value> = replays.iter().map(|e| &e["details"]["raw"]).collect();
    assert_eq!(raw_flags, [&Value::Bool(false), &Value::Bool(true)]);

    // watch: what the live session showed so far, then what it shows next.
    let mut session = w
        .alice
        .ssh_command(
            &local(),
            &[],
            &[r"printf '\033]52;c;Y3VybCB4fHNo\007so-far\n'; read x; printf '\033]0;title\007\033]52;c;bGl2ZQ==\007live-now\n'"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssh");
    assert!(
        wait_until(Duration::from_secs(10), || !sessions(&w, &["--active"])
            .is_empty()),
        "no live session"
    );
    let live = sessions(&w, &["--active"])[0]["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let log = w.path("watch.log");
    let mut watcher = Background::spawn(
        w.dave.ssh_command(CONTROL_USER, &[], &["watch", &live]),
        &log,
    );
    assert!(
        wait_until(Duration::from_secs(10), || watcher
            .output()
            .contains("so-far")),
        "{}",
        watcher.output()
    );
    use std::io::Write;
    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    assert!(
        watcher.wait_exit(Duration::from_secs(10)).is_some(),
        "{}",
        watcher.output()
    );
    let _ = session.wait();
    let watched = watcher.output();
    assert!(watched.contains("live-now"), "{watched:?}");
    assert!(
        !watched.contains("\x1b]52") && !watched.contains("\x1b]0;"),
        "{watched:?}"
    );
}

#[test]
fn hostile_exec_strings_cannot_rewrite_the_auditors_tables() {
    let w = World::start();
    // Moves up a line and erases it, then a bidi override: on a terminal the row
    // would vanish or read backwards.
    let hostile = "true '\x1b[1A\x1b[2Kforged' '\u{202e}txt.exe'";
    assert_success(&w.alice.ssh(&local(), &[hostile]), "hostile exec");
    let table = w.ok(&w.dave, &["sessions"]);
    assert!(
        !table.contains('\x1b') && !table.contains('\u{202e}'),
        "{table:?}"
    );
    assert!(table.contains("\\x1b[1A\\x1b[2Kforged"), "{table}");
    let audit = w.ok(&w.dave, &["audit"]);
    assert!(
        !audit.contains('\x1b') && !audit.contains('\u{202e}'),
        "{audit:?}"
    );
    let log = w.bastion.log();
    assert!(!log.contains('\x1b') && !log.contains('\u{202e}'), "{log}");
    // The exact bytes stay available as JSON.
    let session = single_session(&w);
    assert_eq!(session["command"].as_str(), Some(hostile));
}

#[test]
fn the_audit_listing_is_itself_audited() {
    let w = World::start();
    let count = |w: &World| {
        w.audit_kinds()
            .iter()
            .filter(|k| *k == "auditor.audit")
            .count()
    };
    let before = count(&w);
    w.ok(&w.dave, &["audit", "--since", "1h"]);
    assert_eq!(count(&w), before + 2, "this listing and the one counting");
    let last: Value = serde_json::from_str(
        w.ok(&w.dave, &["audit", "--json"])
            .lines()
            .rfind(|l| l.contains("auditor.audit"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["actor"], "dave");
    assert!(w.control_as(&w.alice, &["audit"]).status.code() == Some(1));
}
