//! The door (issue 15 §4): bursts of logins by an authorised user pass, floods of
//! idle connections do not keep others out, and one user's failures do not lock
//! out everyone behind the same address. All with the default `[limits]`, through
//! real OpenSSH clients and raw TCP sockets on loopback (127.0.0.0/8 addresses as
//! sources). The figures are in `cargo bench --bench door`.

pub mod common;

use std::io::Read;
use std::net::{IpAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A world with the default `[limits]` (the harness otherwise exempts 127.0.0.1).
fn default_limits(extra: &str) -> World {
    World::start_with(WorldOptions {
        extra_config: format!("[limits]\n{extra}"),
        ..WorldOptions::default()
    })
}

/// What Ansible with `forks = 100` does through a bastion: 100 `ssh` at once from
/// one address, each running a command on a target. All get in.
#[test]
fn a_burst_of_a_hundred_logins_from_one_address_all_get_in() {
    let w = default_limits("");
    let user = w.target_user();
    // The first connection files the auto-approved grant the others reuse.
    assert_success(&w.alice.ssh(&user, &["true"]), "first login");
    let started = Instant::now();
    let children: Vec<_> = (0..100)
        .map(|_| {
            w.alice
                .ssh_command(&user, &[], &["true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn ssh")
        })
        .collect();
    let failures: Vec<String> = children
        .into_iter()
        .map(|child| child.wait_with_output().expect("wait for ssh"))
        .filter(|out| !out.status.success())
        .map(|out| describe(&out))
        .collect();
    eprintln!(
        "100 concurrent logins: {} failed, {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of 100 failed, e.g. {}\n{}",
        failures.len(),
        failures[0],
        w.logs()
    );
}

/// Holds `per_address` idle TCP connections open from each of `sources` (never
/// sending a byte), reopening each one the bastion closes, until `stop`.
/// `holding` counts the connections open right now.
fn hold_flood(
    port: u16,
    sources: Vec<IpAddr>,
    per_address: usize,
    stop: Arc<AtomicBool>,
    holding: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for source in sources {
                for _ in 0..per_address {
                    let (stop, holding) = (stop.clone(), holding.clone());
                    tasks.spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let socket = tokio::net::TcpSocket::new_v4().unwrap();
                            socket.bind((source, 0).into()).unwrap();
                            let Ok(mut stream) =
                                socket.connect(([127, 0, 0, 1], port).into()).await
                            else {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            };
                            holding.fetch_add(1, Ordering::Relaxed);
                            // Read (the banner, once a slot is free) until closed.
                            let mut buffer = [0u8; 256];
                            loop {
                                let read = tokio::time::timeout(
                                    Duration::from_millis(200),
                                    tokio::io::AsyncReadExt::read(&mut stream, &mut buffer),
                                )
                                .await;
                                match read {
                                    Ok(Ok(0)) | Ok(Err(_)) => break,
                                    _ if stop.load(Ordering::Relaxed) => break,
                                    _ => {}
                                }
                            }
                            holding.fetch_sub(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                }
            }
            while tasks.join_next().await.is_some() {}
        });
    })
}

/// 300 idle connections from 127.0.0.2–.11 (more than the 256 pre-auth slots in
/// all) are held open and reopened; a user from another network logs in 20 times
/// meanwhile, and every login succeeds: one /24 gets at most 64 slots, the rest of
/// its connections wait without taking any.
#[test]
fn a_flood_of_idle_connections_does_not_keep_a_user_out() {
    let w = default_limits("");
    let user = w.target_user();
    assert_success(&w.alice.ssh(&user, &["true"]), "first login");
    let stop = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicUsize::new(0));
    let sources: Vec<IpAddr> = (2..=11).map(|n| IpAddr::from([127, 0, 0, n])).collect();
    let flood = hold_flood(w.bastion.port(), sources, 30, stop.clone(), holding.clone());
    let held = wait_until(Duration::from_secs(10), || {
        holding.load(Ordering::Relaxed) >= 300
    });
    assert!(held, "the flood holds 300 connections");
    let started = Instant::now();
    let mut held_at_first_login = 0;
    for n in 0..20 {
        let out = w.alice.ssh_with(&user, &["-b", "127.0.1.1"], &["true"]);
        assert!(
            out.status.success(),
            "login {n} during the flood: {}\n{}",
            describe(&out),
            w.logs()
        );
        if n == 0 {
            held_at_first_login = holding.load(Ordering::Relaxed);
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    eprintln!(
        "20 logins in {took:?}; the flood held {held_at_first_login} connections at the first"
    );
    assert!(
        held_at_first_login >= 256,
        "the first login happened while the flood held more than all the slots: {held_at_first_login}"
    );
}

/// Reads from `stream` until the bastion closes it; returns what it sent.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut all = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(err) => panic!("not closed: {err}"),
        }
    }
}

fn connect_from(source: [u8; 4], port: u16) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// A connection that never finishes its key exchange is closed after the handshake
/// timeout (well before the login grace) and charged to its address: two of them
/// lock the address out, with sshd's "Not allowed at this time", and only it.
#[test]
fn connections_that_never_authenticate_time_out_and_are_penalised() {
    let w = default_limits("handshake_timeout = \"1s\"\n");
    let port = w.bastion.port();
    for _ in 0..2 {
        let started = Instant::now();
        let mut silent = connect_from([127, 0, 0, 3], port);
        let sent = read_to_close(&mut silent);
        let took = started.elapsed();
        assert!(
            text(&sent).starts_with("SSH-2.0-portcullis"),
            "{}",
            text(&sent)
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
    }
    // 10 s of penalty each: 20 s reach the 15 s threshold.
    let mut refused = connect_from([127, 0, 0, 3], port);
    assert_eq!(
        text(&read_to_close(&mut refused)),
        "Not allowed at this time\r\n"
    );
    assert_success(
        &w.alice
            .ssh_with(&w.target_user(), &["-b", "127.0.0.4"], &["true"]),
        "another address is not affected",
    );
    let audit = w.ok(&w.dave, &["audit"]);
    assert!(audit.contains("preauth.lockout"), "{audit}");
    assert!(audit.contains("127.0.0.3"), "{audit}");
}

/// Behind one address (a NAT), mallory's unknown key fails again and again; alice
/// from the same address still gets in. The failures do lock out mallory's key
/// from that address: once an admin adds the key, it works from elsewhere at once,
/// but from that address only after the lockout.
#[test]
fn one_users_failures_lock_their_key_not_everyone_behind_the_address() {
    let w = default_limits("");
    let nat = ["-b", "127.0.0.4"];
    for _ in 0..5 {
        let out = w.mallory.ssh_with(CONTROL_USER, &nat, &["whoami"]);
        assert_failure_mentions(&out, "mallory's key", &["Permission denied"]);
    }
    assert_success(
        &w.alice.ssh_with(CONTROL_USER, &nat, &["whoami"]),
        "alice behind the same address",
    );
    let key = public_key_of(w.mallory.key());
    w.edit_policy("users.toml", |users| {
        format!("{users}[users.mallory]\nkeys = [\"{key}\"]\ngroups = [\"engineers\"]\n")
    });
    let elsewhere = w
        .mallory
        .ssh_with(CONTROL_USER, &["-b", "127.0.0.5"], &["whoami"]);
    assert_success(&elsewhere, "mallory's key from another address");
    assert!(text(&elsewhere.stdout).contains("mallory"));
    let locked = w.mallory.ssh_with(CONTROL_USER, &nat, &["whoami"]);
    assert_failure_mentions(
        &locked,
        "mallory's key from the address it failed from",
        &["Permission denied"],
    );
    let fp = fingerprint(&w.mallory.key().with_extension("pub"));
    let audit = w.ok(&w.dave, &["audit", "--json"]);
    let lockouts: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("preauth.lockout"))
        .collect();
    assert!(
        lockouts
            .iter()
            .any(|l| l.contains(&fp) && l.contains("127.0.0.4")),
        "the key's lockout is audited: {lockouts:?}"
    );
    assert!(
        !lockouts.iter().any(|l| l.contains("\"any\"")),
        "no address-wide lockout: {lockouts:?}"
    );
}
