//! Many concurrent interactive sessions through the bastion, against the same
//! sessions straight to sshd.
//!
//! ```text
//! cargo bench --bench load
//! ```
//!
//! For each N (default 100 and 500; `BENCH_SESSIONS=100,500,1000` to choose), a fresh
//! target sshd and bastion are started and N sessions are opened on each route:
//! straight to sshd, and through portcullis with recording on. Each session is a pty
//! running `stty raw -echo; cat`, so every byte typed comes back once. The routes
//! then take turns (`BENCH_ROUNDS`, default 3): every session of one route types a
//! byte every 100 ms for `BENCH_SECONDS` (default 10) and times each echo. The table
//! shows echo latency (p50/p99, the median over rounds) on both routes and what
//! portcullis adds, the bastion's CPU and peak RSS per session, the session setup
//! rate, how busy the whole machine and this load generator were while each route
//! typed (the target sshd and the generator share the cores with the bastion), and
//! each round's p99 so that a noisy round is visible.
//!
//! The clients are russh sessions in this process (N OpenSSH processes with a pty
//! each would measure the machine's process table, not the bastion).

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_seconds, login_user, percentile, status_kib, AnyHostKey, World, TARGET};
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::ChannelMsg;
use tokio::task::JoinSet;

/// Interval between keystrokes in each session.
const TYPING: Duration = Duration::from_millis(100);

/// Sessions opened at once while ramping up.
const RAMP_CONCURRENCY: usize = 25;

/// Where the sessions go.
#[derive(Clone)]
struct Endpoint {
    port: u16,
    user: String,
    key: Arc<PrivateKey>,
}

/// One interactive session, ready to type into.
struct Typist {
    _session: client::Handle<AnyHostKey>,
    channel: russh::Channel<client::Msg>,
}

/// Sessions open to one endpoint, and how fast they were opened.
struct Side {
    typists: Vec<Typist>,
    setup_per_second: f64,
}

/// Echo latency percentiles of one typing round.
#[derive(Clone, Copy)]
struct Round {
    p50: f64,
    p99: f64,
}

fn main() {
    let sizes: Vec<usize> = env_or("BENCH_SESSIONS", "100,500")
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("BENCH_SESSIONS is a list of numbers")
        })
        .collect();
    let seconds: u64 = env_or("BENCH_SECONDS", "10")
        .parse()
        .expect("BENCH_SECONDS is a number");
    let rounds: usize = env_or("BENCH_ROUNDS", "3")
        .parse()
        .expect("BENCH_ROUNDS is a number");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!(
        "portcullis load benchmark: one keystroke per {TYPING:?} per session, {rounds} rounds of {seconds}s per route, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "\n{:>5} {:>11} {:>11} {:>14} {:>14} {:>10} {:>10} {:>6} {:>12} {:>15} {:>14} {:>14}   p99 by round dir/pc",
        "N",
        "direct p50",
        "direct p99",
        "portcullis p50",
        "portcullis p99",
        "added p50",
        "added p99",
        "CPU %",
        "RSS/session",
        "setup/s dir/pc",
        "machine dir/pc",
        "loadgen dir/pc",
    );
    let duration = Duration::from_secs(seconds);
    for n in sizes {
        let world = World::start();
        let key =
            Arc::new(russh::keys::load_secret_key(world.alice.key(), None).expect("alice's key"));
        let alice_pub = fs::read_to_string(world.alice.key().with_extension("pub")).unwrap();
        world.sshd.authorize_key(&alice_pub);
        let direct = Endpoint {
            port: world.sshd.port(),
            user: login_user().to_string(),
            key: key.clone(),
        };
        let through = Endpoint {
            port: world.bastion.port(),
            user: format!("{}@{TARGET}", login_user()),
            key,
        };
        let pid = world.bastion.pid();
        let rss_before = status_kib(pid, "VmRSS:");
        let mut base = runtime.block_on(open_all(&direct, n));
        let mut ours = runtime.block_on(open_all(&through, n));
        // Both routes are open at once and type in alternating rounds, so both see
        // the same machine; a hiccup of the machine shows in one round, not the result.
        let (mut base_rounds, mut our_rounds) = (Vec::new(), Vec::new());
        let (mut base_cpu, mut our_cpu) = (Usage::default(), Usage::default());
        for _ in 0..rounds {
            base_rounds
                .push(base_cpu.measure(pid, || runtime.block_on(type_round(&mut base, duration))));
            our_rounds
                .push(our_cpu.measure(pid, || runtime.block_on(type_round(&mut ours, duration))));
        }
        let peak = status_kib(pid, "VmHWM:");
        let per_session_kib = peak.saturating_sub(rss_before) as f64 / n as f64;
        let (d50, d99) = medians(&base_rounds);
        let (p50, p99) = medians(&our_rounds);
        let by_round: Vec<String> = base_rounds
            .iter()
            .zip(&our_rounds)
            .map(|(d, p)| format!("{:.1}/{:.1}", d.p99, p.p99))
            .collect();
        println!(
            "{n:>5} {d50:>9.2}ms {d99:>9.2}ms {p50:>12.2}ms {p99:>12.2}ms {:>8.2}ms {:>8.2}ms {:>5.0}% {:>8.0} KiB {:>7.0} / {:<5.0} {:>5.0}% / {:<4.0}% {:>5.0}% / {:<4.0}%   {}",
            p50 - d50,
            p99 - d99,
            our_cpu.bastion_percent(),
            per_session_kib,
            base.setup_per_second,
            ours.setup_per_second,
            base_cpu.machine.busy_percent(),
            our_cpu.machine.busy_percent(),
            base_cpu.generator_percent(),
            our_cpu.generator_percent(),
            by_round.join(" ")
        );
        runtime.block_on(close_all(base));
        runtime.block_on(close_all(ours));
    }
    println!("\nLatencies are medians over the rounds of each round's percentile.");
    println!(
        "CPU % is the bastion's while the portcullis sessions typed; machine is the whole machine's and"
    );
    println!(
        "loadgen this benchmark's own client sessions', while each route typed (100% = one core)."
    );
    println!(
        "targets: 500 sessions with p99 added echo latency < 10 ms and < 1 MiB RSS per session"
    );
}

/// Busy and total CPU time of the whole machine, from `/proc/stat` (clock ticks):
/// the target sshd and this load generator share the machine with the bastion, so
/// a saturated machine explains latency the bastion's own CPU figure does not.
#[derive(Default, Clone, Copy)]
struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    fn now() -> MachineCpu {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|n| n.parse().ok())
            .collect();
        let total: u64 = ticks.iter().sum();
        // The fourth and fifth fields are idle and iowait.
        let idle: u64 = ticks.iter().skip(3).take(2).sum();
        MachineCpu {
            busy: total - idle,
            total,
        }
    }

    fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy - earlier.busy,
            total: self.total - earlier.total,
        }
    }

    fn add(&mut self, other: MachineCpu) {
        self.busy += other.busy;
        self.total += other.total;
    }

    /// Busy share, 100% per core.
    fn busy_percent(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.busy as f64 / self.total.max(1) as f64 * 100.0 * cores as f64
    }
}

/// CPU spent while one route's sessions typed, summed over its rounds.
#[derive(Default)]
struct Usage {
    machine: MachineCpu,
    bastion_seconds: f64,
    generator_seconds: f64,
    wall_seconds: f64,
}

impl Usage {
    /// Runs one typing round and adds what it cost to this route's usage.
    fn measure(&mut self, bastion: u32, round: impl FnOnce() -> Round) -> Round {
        let generator = std::process::id();
        let (machine, bastion_before, generator_before, started) = (
            MachineCpu::now(),
            cpu_seconds(bastion),
            cpu_seconds(generator),
            Instant::now(),
        );
        let result = round();
        self.wall_seconds += started.elapsed().as_secs_f64();
        self.bastion_seconds += cpu_seconds(bastion) - bastion_before;
        self.generator_seconds += cpu_seconds(generator) - generator_before;
        self.machine.add(MachineCpu::now().since(&machine));
        result
    }

    fn bastion_percent(&self) -> f64 {
        self.bastion_seconds / self.wall_seconds * 100.0
    }

    fn generator_percent(&self) -> f64 {
        self.generator_seconds / self.wall_seconds * 100.0
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The median over rounds of p50 and of p99.
fn medians(rounds: &[Round]) -> (f64, f64) {
    let mut p50: Vec<f64> = rounds.iter().map(|r| r.p50).collect();
    let mut p99: Vec<f64> = rounds.iter().map(|r| r.p99).collect();
    (percentile(&mut p50, 50.0), percentile(&mut p99, 50.0))
}

/// Opens `n` typing sessions to `endpoint`, a few at a time.
async fn open_all(endpoint: &Endpoint, n: usize) -> Side {
    let ramp = Instant::now();
    let mut typists = Vec::with_capacity(n);
    let mut opening = JoinSet::new();
    for _ in 0..n {
        if opening.len() >= RAMP_CONCURRENCY {
            typists.push(opening.join_next().await.unwrap().unwrap());
        }
        opening.spawn(open(endpoint.clone()));
    }
    while let Some(typist) = opening.join_next().await {
        typists.push(typist.unwrap());
    }
    Side {
        typists,
        setup_per_second: n as f64 / ramp.elapsed().as_secs_f64(),
    }
}

/// Every session of `side` types for `duration`; returns the echo percentiles.
async fn type_round(side: &mut Side, duration: Duration) -> Round {
    let n = side.typists.len();
    let deadline = Instant::now() + duration;
    let mut typing = JoinSet::new();
    for (i, typist) in side.typists.drain(..).enumerate() {
        // Spread the keystrokes over the interval, as real typists are.
        let offset = TYPING.mul_f64(i as f64 / n as f64);
        typing.spawn(type_until(typist, deadline, offset));
    }
    let mut latencies_ms = Vec::new();
    while let Some(finished) = typing.join_next().await {
        let (typist, samples) = finished.unwrap();
        latencies_ms.extend(samples);
        side.typists.push(typist);
    }
    Round {
        p50: percentile(&mut latencies_ms, 50.0),
        p99: percentile(&mut latencies_ms, 99.0),
    }
}

async fn close_all(side: Side) {
    for typist in &side.typists {
        let _ = typist.channel.eof().await;
    }
}

/// Connects, authenticates, and starts `stty raw -echo; cat` on a pty; returns
/// once the session echoes.
async fn open(endpoint: Endpoint) -> Typist {
    let config = Arc::new(client::Config {
        nodelay: true,
        ..Default::default()
    });
    let mut session = client::connect(config, ("127.0.0.1", endpoint.port), AnyHostKey)
        .await
        .expect("connect");
    let auth = session
        .authenticate_publickey(
            endpoint.user.clone(),
            PrivateKeyWithHashAlg::new(endpoint.key.clone(), None),
        )
        .await
        .expect("authenticate");
    assert!(auth.success(), "authentication refused");
    let mut channel = session.channel_open_session().await.expect("open channel");
    channel
        .request_pty(false, "xterm", 80, 24, 0, 0, &[])
        .await
        .expect("pty");
    channel
        .exec(false, "stty raw -echo; echo ready; exec cat")
        .await
        .expect("exec");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        match channel.wait().await {
            Some(ChannelMsg::Data { data }) => seen.extend_from_slice(&data),
            Some(_) => {}
            None => panic!("session ended before it was ready"),
        }
    }
    Typist {
        _session: session,
        channel,
    }
}

/// Types a byte every [`TYPING`] until `deadline` and times each echo; hands the
/// session back for the next round.
async fn type_until(mut typist: Typist, deadline: Instant, offset: Duration) -> (Typist, Vec<f64>) {
    tokio::time::sleep(offset).await;
    let mut ticks = tokio::time::interval(TYPING);
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        ticks.tick().await;
        let sent = Instant::now();
        typist.channel.data(&b"x"[..]).await.expect("type");
        loop {
            match typist.channel.wait().await {
                Some(ChannelMsg::Data { data }) if data.contains(&b'x') => break,
                Some(_) => {}
                None => panic!("a session ended while typing"),
            }
        }
        samples.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    (typist, samples)
}
