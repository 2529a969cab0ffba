//! Behaviour under faults and stress: graceful shutdown, a target that dies, clients
//! that vanish, policy reloads under load, odd clients; metrics and health.

pub mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn local() -> String {
    format!("{}@{TARGET}", login_user())
}

/// A world whose bastion serves metrics on a free port; returns it with the port.
fn world_with_metrics(extra: &str) -> (World, u16) {
    let port = free_port();
    let w = World::start_with(WorldOptions {
        extra_config: format!("metrics_listen = \"127.0.0.1:{port}\"\n{extra}"),
        ..WorldOptions::default()
    });
    (w, port)
}

/// `GET path` on the metrics port: (status code, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The metrics as name → value (the last sample of each name).
fn metrics(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metric(port: u16, name: &str) -> f64 {
    *metrics(port)
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

fn sleeping_session(world: &World, seconds: u32) -> Child {
    world
        .alice
        .ssh_command(&local(), &[], &[&format!("echo started; sleep {seconds}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh")
}

fn wait_active(port: u16, n: f64) {
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            port,
            "portcullis_active_sessions"
        ) == n),
        "active sessions never reached {n}: {:?}",
        metrics(port)
    );
}

#[test]
fn metrics_and_health_describe_the_bastion() {
    let (w, port) = world_with_metrics("");
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_string()));
    assert_success(&w.alice.ssh(&local(), &["echo hello"]), "a session");
    let _ = w.mallory.ssh(&local(), &["true"]);
    w.ok(
        &w.alice,
        &["request", "prod", "--shell", "--reason", "INC-1"],
    );
    let m = metrics(port);
    assert_eq!(m["portcullis_sessions_total"], 1.0, "{m:?}");
    assert!(m["portcullis_auth_failures_total"] >= 1.0, "{m:?}");
    assert!(m["portcullis_bytes_from_targets_total"] >= 6.0, "{m:?}");
    assert_eq!(m["portcullis_pending_requests"], 1.0, "{m:?}");
    assert_eq!(m["portcullis_active_sessions"], 0.0, "{m:?}");
    assert_eq!(m["portcullis_upstream_connect_seconds_count"], 1.0, "{m:?}");
    assert!(m.contains_key("portcullis_recording_queue_bytes"), "{m:?}");
    // The session's recording was written; no relay waited for it.
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            port,
            "portcullis_recording_writes_total"
        ) >= 1.0),
        "{:?}",
        metrics(port)
    );
    let m = metrics(port);
    assert!(m["portcullis_recording_write_seconds_total"] > 0.0, "{m:?}");
    assert_eq!(m["portcullis_recording_wait_seconds_total"], 0.0, "{m:?}");
    assert!(
        m["portcullis_tasks_alive"] > 0.0 && m["portcullis_open_fds"] > 0.0,
        "{m:?}"
    );
}

#[test]
fn sigterm_tells_live_sessions_waits_and_exits_cleanly() {
    let (mut w, port) = world_with_metrics("shutdown_grace = \"2s\"\n");
    let session = sleeping_session(&w, 60);
    wait_active(port, 1.0);
    let stopping = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &w.bastion.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        wait_until(Duration::from_secs(2), || http_get(port, "/healthz").0
            == 503),
        "health turns 503 while draining"
    );
    let status = w
        .bastion
        .wait_exit(Duration::from_secs(20))
        .expect("the bastion exits");
    let took = stopping.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        w.bastion.log()
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    let out = session.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("shutting down; this session will be closed within 2s"),
        "{stderr}"
    );
    assert!(stderr.contains("session closed"), "{stderr}");
    assert_ne!(out.status.code(), Some(0));

    w.restart_bastion();
    let sessions: Vec<Value> =
        serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
    assert_eq!(
        sessions[0]["state"], "closed",
        "the recording was finished, not interrupted"
    );
    assert!(w.ok(&w.dave, &["audit"]).contains("bastion.shutdown"));
}

#[test]
fn a_target_that_dies_mid_session_ends_it_with_a_message() {
    let w = World::start();
    let mut session = sleeping_session(&w, 60);
    let mut first = [0u8; 8];
    session
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"started\n");
    // Kill the target: the session's sshd processes, then the listener.
    let listener = w.sshd.pid();
    let mut victims = descendants(listener);
    victims.push(listener);
    for pid in victims {
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    let started = Instant::now();
    let out = session.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("connection to the target was lost"),
        "{}",
        describe(&out)
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            let sessions: Vec<Value> =
                serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
            sessions[0]["state"] == "closed"
        }),
        "the recording is closed"
    );
}

/// Every process below `pid` (children, grandchildren …), read from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(ppid) = after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) {
            parent_of.push((child, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (child, ppid) in &parent_of {
            if *ppid == parent && *child != pid {
                found.push(*child);
                frontier.push(*child);
            }
        }
    }
    found
}

#[test]
fn vanished_clients_leave_nothing_behind() {
    let (w, port) = world_with_metrics("");
    // Warm up: one session of everything, so lazily created state is in place.
    assert_success(&w.alice.ssh(&local(), &["true"]), "warm-up");
    std::thread::sleep(Duration::from_millis(500));
    let before = metrics(port);
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let mut batch: Vec<Child> = (0..20).map(|_| sleeping_session(&w, 60)).collect();
        wait_active(port, 20.0);
        for child in &mut batch {
            child.kill().unwrap(); // SIGKILL: no goodbye from the client
        }
        let killed = Instant::now();
        wait_active(port, 0.0);
        slowest = slowest.max(killed.elapsed());
        for mut child in batch {
            let _ = child.wait();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = metrics(port);
    eprintln!(
        "100 killed clients: sessions closed within {slowest:?}; fds {} -> {}, tasks {} -> {}",
        before["portcullis_open_fds"],
        after["portcullis_open_fds"],
        before["portcullis_tasks_alive"],
        after["portcullis_tasks_alive"]
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    assert!(
        after["portcullis_open_fds"] <= before["portcullis_open_fds"] + 2.0,
        "{before:?} {after:?}"
    );
    assert!(
        after["portcullis_tasks_alive"] <= before["portcullis_tasks_alive"] + 2.0,
        "{before:?} {after:?}"
    );
}

#[test]
fn a_policy_reload_under_fifty_live_sessions_keeps_them() {
    let (w, port) = world_with_metrics("");
    let mut sessions: Vec<Child> = (0..50).map(|_| sleeping_session(&w, 60)).collect();
    wait_active(port, 50.0);
    let targets = w.bastion.policies_dir().join("targets.toml");
    let mut policy = std::fs::read_to_string(&targets).unwrap();
    policy.push_str("[targets.added]\naddress = \"127.0.0.1:1\"\nhost_key = \"");
    policy.push_str(w.sshd.host_public_key().trim());
    policy.push_str("\"\nlogins = [\"root\"]\nlabels = { env = \"staging\" }\n");
    std::fs::write(&targets, policy).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &w.bastion.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(wait_until(Duration::from_secs(10), || w
        .bastion
        .log()
        .contains("policy reloaded")));
    assert_eq!(metric(port, "portcullis_active_sessions"), 50.0);
    assert!(
        sessions.iter_mut().all(|s| s.try_wait().unwrap().is_none()),
        "all still running"
    );
    let out = w.alice.ssh("root@added", &["true"]);
    assert!(
        text(&out.stderr).contains("cannot reach target 'added'"),
        "the new policy is in force: {}",
        describe(&out)
    );
    for mut session in sessions {
        session.kill().unwrap();
        let _ = session.wait();
    }
}

#[test]
fn odd_clients_get_clear_answers_and_the_bastion_stays_up() {
    let mut w = World::start();
    // A username and a command that are not UTF-8.
    let out = run(Command::new("ssh")
        .args(w.alice.options())
        .args(["-p", &w.bastion.port().to_string(), "-l"])
        .arg(OsStr::from_bytes(b"root@lo\xffcal"))
        .arg("127.0.0.1")
        .arg("true"));
    assert!(!out.status.success(), "{}", describe(&out));
    let out = run(Command::new("ssh")
        .args(w.alice.options())
        .args([
            "-p",
            &w.bastion.port().to_string(),
            "-l",
            &local(),
            "127.0.0.1",
        ])
        .arg(OsStr::from_bytes(b"echo \xff\xfe")));
    assert!(out.status.code().is_some(), "{}", describe(&out));
    // A 100 KiB command line reaches the target whole (the target's `sh -c` takes
    // it as one argument, which Linux limits to 128 KiB).
    let word = "x".repeat(50 * 1024);
    let out = w.alice.ssh(&local(), &["echo", &word, &word]);
    assert_success(&out, "a long command reaches the target");
    assert_eq!(out.stdout.len(), 2 * (50 * 1024 + 1));
    assert!(w.bastion.is_running(), "the bastion survives");
    assert_success(&w.alice.ssh(&local(), &["true"]), "and still serves");
}

#[test]
fn a_thousand_channels_on_one_connection_are_refused_beyond_a_limit_and_cleaned_up() {
    let (w, port) = world_with_metrics("");
    let before = metrics(port);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let opened = runtime.block_on(open_many_channels(&w, 1000));
    std::thread::sleep(Duration::from_millis(500));
    let after = metrics(port);
    eprintln!(
        "1000 channel opens: {opened} accepted; tasks {} -> {}",
        before["portcullis_tasks_alive"], after["portcullis_tasks_alive"]
    );
    assert_eq!(
        opened, 64,
        "the default limit of session channels per connection"
    );
    assert!(
        after["portcullis_tasks_alive"] <= before["portcullis_tasks_alive"] + 2.0,
        "{before:?} {after:?}"
    );
    assert_success(&w.alice.ssh(&local(), &["true"]), "still serving");
}

/// Opens `n` session channels on one authenticated connection as alice, then
/// disconnects; returns how many the bastion accepted.
async fn open_many_channels(world: &World, n: usize) -> usize {
    let key = russh::keys::load_secret_key(world.alice.key(), None).unwrap();
    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut session =
        russh::client::connect(config, ("127.0.0.1", world.bastion.port()), AnyHostKey)
            .await
            .unwrap();
    let auth = session
        .authenticate_publickey(
            local(),
            russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success());
    let mut channels = Vec::new();
    for _ in 0..n {
        match session.channel_open_session().await {
            Ok(channel) => channels.push(channel),
            Err(_) => break,
        }
    }
    let opened = channels.len();
    if let Some(channel) = channels.first() {
        // Giant window-change values are relayed or ignored, never a crash.
        let _ = channel
            .window_change(u32::MAX, u32::MAX, u32::MAX, u32::MAX)
            .await;
    }
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "bye", "en")
        .await;
    drop(channels);
    opened
}

/// `ssh` as alice to the local target running `command`, output discarded.
fn quiet_session(w: &World, flags: &[&str], command: &str) -> Child {
    w.alice
        .ssh_command(&local(), flags, &[command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A world with some `[limits]` keys set (and the harness's exemption of
/// 127.0.0.1 from address-wide lockouts).
fn world_with_limits(limits: &str) -> World {
    World::start_with(WorldOptions {
        extra_config: format!("[limits]\npenalty_exempt = [\"127.0.0.1\"]\n{limits}"),
        ..WorldOptions::default()
    })
}

/// One user cannot hold more sessions or connections than `[limits]` allows;
/// the refusal says which limit, and places come back when sessions end.
#[test]
fn per_user_caps_on_sessions_and_connections() {
    let w = world_with_limits("sessions_per_user = 2\nconnections_per_user = 2\n");
    let holders: Vec<Child> = (0..2).map(|_| quiet_session(&w, &[], "sleep 4")).collect();
    assert!(wait_until(Duration::from_secs(10), || w
        .bastion
        .log()
        .matches("session started")
        .count()
        == 2));
    let out = w.alice.ssh(&local(), &["true"]);
    assert_failure_mentions(&out, "third connection", &["connections_per_user = 2"]);
    let out = w.dave.ssh(&local(), &["true"]);
    assert_success(&out, "another user is not affected");
    for mut holder in holders {
        holder.wait().unwrap();
    }
    assert_success(&w.alice.ssh(&local(), &["true"]), "places came back");

    let control = w.path("cm");
    let _master = w
        .alice
        .control_master(&local(), &control, &w.path("master.log"));
    let path_opt = format!("ControlPath={}", control.display());
    let through_master: Vec<Child> = (0..2)
        .map(|_| quiet_session(&w, &["-o", &path_opt], "sleep 4"))
        .collect();
    assert!(wait_until(Duration::from_secs(10), || w
        .bastion
        .log()
        .matches("session started")
        .count()
        == 6));
    let out = w.alice.ssh_with(&local(), &["-o", &path_opt], &["true"]);
    assert_failure_mentions(&out, "third session", &["sessions_per_user = 2"]);
    for mut session in through_master {
        session.wait().unwrap();
    }
}

/// A client whose window stays shut (it reads nothing) while the target writes
/// is cut off after `idle_window_timeout`, and its session is closed and sealed.
#[test]
fn a_client_that_reads_nothing_is_cut_off_after_the_idle_window() {
    let w = world_with_limits("idle_window_timeout = \"2s\"\n");
    let mut stalled = w
        .alice
        .ssh_command(&local(), &[], &["cat /dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let closed = wait_until(Duration::from_secs(15), || {
        let sessions: Vec<Value> =
            serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
        sessions
            .iter()
            .any(|s| s["state"] == "closed" && s["user"] == USER)
    });
    let _ = stalled.kill();
    let _ = stalled.wait();
    assert!(closed, "the stalled session was never closed\n{}", w.logs());
    assert!(
        w.bastion.log().contains("idle_window_timeout"),
        "{}",
        w.logs()
    );
}

/// A client that floods its input while reading none of its output overdraws
/// the relay only within `[limits] relay_memory`: the charge shows in the
/// metrics, never passes the budget, and is refunded when the idle-window
/// timeout ends the session.
#[test]
fn a_client_that_floods_without_reading_is_held_to_the_memory_budget() {
    const BUDGET: u64 = 1 << 20;
    let metrics = free_port();
    let w = World::start_with(WorldOptions {
        extra_config: format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n\
             [limits]\npenalty_exempt = [\"127.0.0.1\"]\n\
             relay_memory = \"1MiB\"\nidle_window_timeout = \"8s\"\n"
        ),
        ..WorldOptions::default()
    });
    let held = || -> u64 {
        let (_, body) = http_get(metrics, "/metrics");
        body.lines()
            .find_map(|line| line.strip_prefix("portcullis_relay_memory_bytes "))
            .and_then(|n| n.trim().parse().ok())
            .expect("the metrics name the relay memory")
    };
    let mut flooding = w
        .alice
        .ssh_command(&local(), &[], &["cat"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut most = 0;
    let charged = wait_until(Duration::from_secs(20), || {
        let now = held();
        assert!(
            now <= BUDGET,
            "{now} bytes held over a {BUDGET}-byte budget"
        );
        most = most.max(now);
        now > 0
    });
    let refunded = wait_until(Duration::from_secs(30), || {
        let now = held();
        assert!(
            now <= BUDGET,
            "{now} bytes held over a {BUDGET}-byte budget"
        );
        now == 0 && w.bastion.log().contains("idle_window_timeout")
    });
    let _ = flooding.kill();
    let _ = flooding.wait();
    assert!(
        charged,
        "the overdraft never showed in the metrics\n{}",
        w.logs()
    );
    assert!(refunded, "the budget was not refunded\n{}", w.logs());
}

/// An auditor whose client reads nothing of a `watch` keeps its watch slot only
/// for the idle window: with the per-auditor limit taken by stalled watches, one
/// more is refused with the limit named, and allowed once the idle window has
/// ended them (the watched session goes on).
#[test]
fn stalled_watches_give_their_slots_back_after_the_idle_window() {
    const PER_USER: usize = portcullis::record::WATCHES_PER_USER;
    let w = world_with_limits("idle_window_timeout = \"3s\"\n");
    let writes = "while :; do head -c 200000 /dev/zero | tr '\\0' x; sleep 0.1; done";
    let mut session = quiet_session(&w, &[], writes);
    let mut id = String::new();
    assert!(wait_until(Duration::from_secs(15), || {
        let live: Vec<Value> =
            serde_json::from_str(&w.ok(&w.dave, &["sessions", "--active", "--json"])).unwrap();
        id = live
            .first()
            .map(|s| s["id"].to_string())
            .unwrap_or_default();
        !id.is_empty()
    }));
    let watch = || {
        w.dave
            .ssh_command(CONTROL_USER, &[], &[&quote_words(&["watch", &id])])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()) // never read
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut stalled: Vec<Child> = (0..PER_USER).map(|_| watch()).collect();
    let refused = wait_until(Duration::from_secs(20), || {
        refusal(watch()).is_some_and(|stderr| stderr.contains("your limit"))
    });
    assert!(refused, "a ninth watch was never refused\n{}", w.logs());
    let ended = wait_until(Duration::from_secs(30), || {
        w.bastion
            .log()
            .matches("read nothing for the idle window")
            .count()
            >= PER_USER
    });
    assert!(ended, "the stalled watches were not ended\n{}", w.logs());
    assert_eq!(refusal(watch()), None, "a watch once the slots came back");
    for child in stalled.iter_mut().chain([&mut session]) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What a watch said on stderr if it exited within 3 s (refused); `None` if it
/// was still watching, when it is stopped.
fn refusal(mut watch: Child) -> Option<String> {
    let exited = wait_until(Duration::from_secs(3), || {
        watch.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = watch.kill();
        let _ = watch.wait();
        return None;
    }
    let mut stderr = String::new();
    let _ = watch.stderr.take().unwrap().read_to_string(&mut stderr);
    Some(stderr)
}
