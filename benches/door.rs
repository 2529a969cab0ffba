//! The door under bursts and floods (issue 15 §4): portcullis with its default
//! `[limits]` against a stock sshd started with its defaults, on loopback.
//!
//! ```text
//! cargo bench --bench door
//! ```
//!
//! 1. Bursts of concurrent logins by one authorised user from one address
//!    (`BENCH_BURSTS`, default `100,1000`): russh clients in this process, each
//!    connecting, authenticating with alice's key and disconnecting. Reports how
//!    many got in and the time from TCP connect to authenticated (p50/p99). To
//!    portcullis this is the door only (`LOGIN@local` authenticates without
//!    touching the target); to sshd it is its whole pre-auth path.
//! 2. A burst of 100 real OpenSSH `ssh … true` processes (Ansible with
//!    `forks = 100`): through portcullis to the target, and straight to the stock
//!    sshd.
//! 3. A flood: 300 idle TCP connections from 127.0.0.2–.11 held open and reopened
//!    while alice, from 127.0.1.1, logs in 20 times with `ssh … true` through
//!    portcullis.
//!
//! The stock sshd is the OpenSSH installed here, with the harness config plus
//! `MaxStartups 10:30:100` (its default, which the harness otherwise raises).
//! Everything runs on loopback, bounded in count and time, and is cleaned up
//! with the worlds' temporary directories.

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    login_user, percentile, public_key_of, AnyHostKey, Client, Sshd, World, WorldOptions,
};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};

/// Each login of a burst gives up after this long (the bastion's login grace).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let bursts: Vec<usize> = std::env::var("BENCH_BURSTS")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("BENCH_BURSTS is a list of numbers"))
        .collect();
    let world = World::start_with(WorldOptions {
        extra_config: "[limits]\n".into(),
        ..WorldOptions::default()
    });
    let alice_public = public_key_of(world.alice.key());
    let stock = Sshd::start_with(
        &world.dir.path().join("stock-sshd"),
        &[alice_public],
        "MaxStartups 10:30:100\n",
    );
    let key = Arc::new(russh::keys::load_secret_key(world.alice.key(), None).expect("alice's key"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let target_user = world.target_user();
    // Files the auto-approved grant that every later session reuses.
    assert!(world.alice.ssh(&target_user, &["true"]).status.success());

    println!("door benchmark: {} cores", cores());
    println!();
    println!(
        "burst of concurrent logins from one address (russh clients, connect → authenticated)"
    );
    println!(
        "{:<12} {:>6} {:>8} {:>10} {:>10} {:>9}",
        "server", "N", "got in", "p50 ms", "p99 ms", "wall s"
    );
    for &n in &bursts {
        for (name, port, user) in [
            ("portcullis", world.bastion.port(), target_user.as_str()),
            ("stock sshd", stock.port(), login_user()),
        ] {
            let burst = runtime.block_on(russh_burst(port, user, key.clone(), n));
            burst.print(name, n);
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    println!();
    println!(
        "burst of 100 OpenSSH `ssh … true` processes from one address (connect → command done)"
    );
    println!(
        "{:<12} {:>6} {:>8} {:>10} {:>10} {:>9}",
        "server", "N", "got in", "p50 ms", "p99 ms", "wall s"
    );
    let direct = Client::new(world.alice.key(), stock.port());
    ssh_burst(
        || world.alice.ssh_command(&target_user, &[], &["true"]),
        100,
    )
    .print("portcullis", 100);
    std::thread::sleep(Duration::from_secs(2));
    ssh_burst(|| direct.ssh_command(login_user(), &[], &["true"]), 100).print("stock sshd", 100);

    println!();
    println!("20 logins (`ssh -b 127.0.1.1 … true`) during a flood of 300 idle connections from 127.0.0.2–.11");
    let flood = flood(world.bastion.port());
    let mut logins = Burst::default();
    let started = Instant::now();
    for _ in 0..20 {
        let begun = Instant::now();
        let out = world
            .alice
            .ssh_with(&target_user, &["-b", "127.0.1.1"], &["true"]);
        logins.record(out.status.success(), begun);
    }
    logins.wall = started.elapsed();
    println!(
        "flood held {} connections; {} of 20 logins got in; p50 {:.0} ms, p99 {:.0} ms, {:.1} s in all",
        flood.peak.load(Ordering::Relaxed),
        logins.ok,
        percentile(&mut logins.millis.clone(), 50.0),
        percentile(&mut logins.millis.clone(), 99.0),
        logins.wall.as_secs_f64()
    );
    flood.stop();
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Outcome of a burst.
#[derive(Default)]
struct Burst {
    ok: usize,
    millis: Vec<f64>,
    wall: Duration,
}

impl Burst {
    fn record(&mut self, ok: bool, begun: Instant) {
        if ok {
            self.ok += 1;
            self.millis.push(begun.elapsed().as_secs_f64() * 1000.0);
        }
    }

    fn print(mut self, server: &str, n: usize) {
        println!(
            "{:<12} {:>6} {:>8} {:>10.0} {:>10.0} {:>9.1}",
            server,
            n,
            self.ok,
            percentile(&mut self.millis, 50.0),
            percentile(&mut self.millis, 99.0),
            self.wall.as_secs_f64()
        );
    }
}

/// `n` russh clients at once: connect, authenticate, disconnect.
async fn russh_burst(port: u16, user: &str, key: Arc<PrivateKey>, n: usize) -> Burst {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (user, key) = (user.to_string(), key.clone());
        tasks.spawn(async move {
            let begun = Instant::now();
            let login = async {
                let config = Arc::new(russh::client::Config::default());
                let mut session = russh::client::connect(config, ("127.0.0.1", port), AnyHostKey)
                    .await
                    .ok()?;
                let key = PrivateKeyWithHashAlg::new(key, None);
                let ok = session
                    .authenticate_publickey(user, key)
                    .await
                    .ok()?
                    .success();
                let took = begun.elapsed();
                let _ = session
                    .disconnect(russh::Disconnect::ByApplication, "", "")
                    .await;
                ok.then_some(took)
            };
            tokio::time::timeout(LOGIN_TIMEOUT, login)
                .await
                .ok()
                .flatten()
        });
    }
    let mut burst = Burst::default();
    while let Some(done) = tasks.join_next().await {
        if let Some(took) = done.expect("login task") {
            burst.ok += 1;
            burst.millis.push(took.as_secs_f64() * 1000.0);
        }
    }
    burst.wall = started.elapsed();
    burst
}

/// `n` OpenSSH processes at once, each until its command is done.
fn ssh_burst(command: impl Fn() -> Command, n: usize) -> Burst {
    let started = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            command()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn ssh")
        })
        .collect();
    let mut burst = Burst::default();
    // Polled, so each one's time is its own and not the one before it.
    let mut running: Vec<_> = children.into_iter().collect();
    while !running.is_empty() && started.elapsed() < LOGIN_TIMEOUT * 2 {
        running.retain_mut(|child| match child.try_wait().expect("poll ssh") {
            Some(status) => {
                burst.record(status.success(), started);
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    for mut child in running {
        let _ = child.kill();
        let _ = child.wait();
    }
    burst.wall = started.elapsed();
    burst
}

/// A flood of idle connections held open and reopened in a thread of its own.
struct Flood {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Flood {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

fn flood(port: u16) -> Flood {
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let (stop2, peak2) = (stop.clone(), peak.clone());
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for n in 2..=11u8 {
                let source = IpAddr::from([127, 0, 0, n]);
                for _ in 0..30 {
                    let (stop, peak, holding) = (stop2.clone(), peak2.clone(), holding.clone());
                    tasks.spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let socket = tokio::net::TcpSocket::new_v4().unwrap();
                            socket.bind((source, 0).into()).unwrap();
                            if let Ok(mut stream) =
                                socket.connect(([127, 0, 0, 1], port).into()).await
                            {
                                let now = holding.fetch_add(1, Ordering::Relaxed) + 1;
                                peak.fetch_max(now, Ordering::Relaxed);
                                let mut buffer = [0u8; 256];
                                while !stop.load(Ordering::Relaxed) {
                                    let read = tokio::time::timeout(
                                        Duration::from_millis(200),
                                        tokio::io::AsyncReadExt::read(&mut stream, &mut buffer),
                                    )
                                    .await;
                                    if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                                        break;
                                    }
                                }
                                holding.fetch_sub(1, Ordering::Relaxed);
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                }
            }
            while tasks.join_next().await.is_some() {}
        });
    });
    // Let it fill up before anyone logs in.
    let started = Instant::now();
    while peak.load(Ordering::Relaxed) < 300 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Flood { stop, peak, thread }
}
