//! Many concurrent interactive sessions through the bastion, against the same
//! sessions straight to sshd.
//!
//! ```text
//! cargo bench --bench load
//! ```
//!
//! For each N (default 100 and 500; `BENCH_SESSIONS=100,500,1000` to choose), a fresh
//! target sshd, a second sshd as an OpenSSH jump host, and a bastion are started, and N
//! sessions are opened on each of three routes to the same target: straight to sshd,
//! through the jump host as `ssh -J` does (an SSH connection to the target tunnelled
//! in a `direct-tcpip` channel of one to the jump host), and through portcullis with
//! recording on. Each session is a pty running `stty raw -echo; cat`, so every byte
//! typed comes back once. The routes then take turns (`BENCH_ROUNDS`, default 3):
//! every session of one route types a byte every 100 ms for `BENCH_SECONDS` (default
//! 10) and times each echo. The table has one row per route and N: echo latency
//! (p50/p99, the median over rounds) and what the route adds over direct, the CPU of
//! the hop in the middle (the bastion, or the jump sshd with its per-connection
//! processes) while its sessions typed, the hop's memory per session (growth of its
//! proportional set size, PSS, so that pages shared between sshd processes count
//! once), the session setup rate, how busy the whole machine and this load generator
//! were while the route typed (the target sshd and the generator share the cores with
//! the hop), and each round's p99 so that a noisy round is visible.
//!
//! `BENCH_STORE=postgres` runs the bastion on PostgreSQL (a server started as the
//! tests start it, but with `fsync` on; `BENCH_PG_SETTINGS` adds server
//! settings) instead of sled.
//!
//! `BENCH_SAMPLES=DIR` also writes every echo of every round to
//! `DIR/ROUTE-N-ROUND.csv` (milliseconds since the round started, latency in ms)
//! and the round's start (`/proc/uptime`) to `DIR/ROUTE-N-ROUND.start`, to tell a
//! stall that hits every session at once (a burst of slow echoes in one window) from
//! a tail spread over the round, and to line a stall up with `perf` records.
//!
//! The clients are russh sessions in this process (N OpenSSH processes with a pty
//! each would measure the machine's process table, not the hop).

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    authenticated, cpu_seconds, login_user, percentile, proc_kib, russh_config, russh_login,
    AnyHostKey, MachineCpu, World, WorldOptions, TARGET,
};
use russh::client;
use russh::keys::PrivateKey;
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
    /// The jump host's port, for the ProxyJump route (same user and key).
    jump: Option<u16>,
}

/// One interactive session, ready to type into.
struct Typist {
    _session: client::Handle<AnyHostKey>,
    /// The connection to the jump host that carries the session, if any.
    _jump: Option<client::Handle<AnyHostKey>>,
    channel: russh::Channel<client::Msg>,
}

/// One route to the target, with the process in the middle whose cost is measured.
struct Route {
    name: &'static str,
    endpoint: Endpoint,
    /// The hop's process (its descendants count too); none for the direct route.
    hop: Option<u32>,
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
        "portcullis load benchmark: one keystroke per {TYPING:?} per session, {rounds} rounds of {seconds}s per route, {} cores, store {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::env::var("BENCH_STORE").unwrap_or_else(|_| "sled".into())
    );
    println!(
        "\n{:<10} {:>5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11} {:>8} {:>8} {:>8}   p99 by round",
        "route",
        "N",
        "p50",
        "p99",
        "added p50",
        "added p99",
        "hop CPU",
        "hop mem/ses",
        "setup/s",
        "machine",
        "loadgen",
    );
    let duration = Duration::from_secs(seconds);
    for n in sizes {
        // One user holds all N sessions, each on a connection of its own: above the
        // per-user defaults (128 connections, 256 sessions) for the larger N.
        let (store_config, _) = common::bench_store();
        let world = World::start_with(WorldOptions {
            extra_config: format!(
                "[limits]\nconnections_per_user = {n}\nsessions_per_user = {n}\npenalty_exempt = [\"127.0.0.1\"]\n{store_config}"
            ),
            ..WorldOptions::default()
        });
        let jump = world.jump_host();
        let key =
            Arc::new(russh::keys::load_secret_key(world.alice.key(), None).expect("alice's key"));
        let endpoint = |port: u16, user: String, jump: Option<u16>| Endpoint {
            port,
            user,
            key: key.clone(),
            jump,
        };
        let login = login_user().to_string();
        let routes = [
            Route {
                name: "direct",
                endpoint: endpoint(world.sshd.port(), login.clone(), None),
                hop: None,
            },
            Route {
                name: "proxyjump",
                endpoint: endpoint(world.sshd.port(), login.clone(), Some(jump.port())),
                hop: Some(jump.pid()),
            },
            Route {
                name: "portcullis",
                endpoint: endpoint(world.bastion.port(), format!("{login}@{TARGET}"), None),
                hop: Some(world.bastion.pid()),
            },
        ];
        let memory_before: Vec<u64> = routes
            .iter()
            .map(|r| r.hop.map_or(0, tree_pss_kib))
            .collect();
        let mut sides: Vec<Side> = routes
            .iter()
            .map(|r| runtime.block_on(open_all(&r.endpoint, n)))
            .collect();
        // All routes are open at once and type in alternating rounds, so all see the
        // same machine; a hiccup of the machine shows in one round, not the result.
        let mut results: Vec<Vec<Round>> = routes.iter().map(|_| Vec::new()).collect();
        let mut usage: Vec<Usage> = routes.iter().map(|_| Usage::default()).collect();
        for _ in 0..rounds {
            for (i, route) in routes.iter().enumerate() {
                let side = &mut sides[i];
                let label = format!("{}-{n}-{}", route.name, results[i].len());
                let round = usage[i].measure(route.hop, || {
                    runtime.block_on(type_round(side, duration, &label))
                });
                results[i].push(round);
            }
        }
        let (d50, d99) = medians(&results[0]);
        for (i, route) in routes.iter().enumerate() {
            let (p50, p99) = medians(&results[i]);
            let by_round: Vec<String> =
                results[i].iter().map(|r| format!("{:.1}", r.p99)).collect();
            let (hop_cpu, hop_memory) = match route.hop {
                Some(pid) => (
                    format!("{:.0}%", usage[i].hop_percent()),
                    format!(
                        "{:.0} KiB",
                        tree_pss_kib(pid).saturating_sub(memory_before[i]) as f64 / n as f64
                    ),
                ),
                None => ("-".to_string(), "-".to_string()),
            };
            println!(
                "{:<10} {n:>5} {p50:>7.2}ms {p99:>7.2}ms {:>7.2}ms {:>7.2}ms {hop_cpu:>7} {hop_memory:>11} {:>8.0} {:>7.0}% {:>7.0}%   {}",
                route.name,
                p50 - d50,
                p99 - d99,
                sides[i].setup_per_second,
                usage[i].machine.busy_percent(),
                usage[i].generator_percent(),
                by_round.join(" ")
            );
        }
        for side in sides {
            runtime.block_on(close_all(side));
        }
        drop(jump);
    }
    println!(
        "\nLatencies are medians over the rounds of each round's percentile; added is over direct."
    );
    println!(
        "hop CPU is the bastion's, or the jump sshd's with its per-connection processes', while the route typed;"
    );
    println!(
        "machine is the whole machine's and loadgen this benchmark's own client sessions' (100% = one core)."
    );
    println!(
        "targets: 500 sessions with p99 added echo latency < 10 ms and no worse than proxyjump's, < 1 MiB per session"
    );
}

/// CPU spent while one route's sessions typed, summed over its rounds.
#[derive(Default)]
struct Usage {
    machine: MachineCpu,
    hop_seconds: f64,
    generator_seconds: f64,
    wall_seconds: f64,
}

impl Usage {
    /// Runs one typing round and adds what it cost to this route's usage.
    fn measure(&mut self, hop: Option<u32>, round: impl FnOnce() -> Round) -> Round {
        let generator = std::process::id();
        let hop_cpu = || hop.map_or(0.0, tree_cpu_seconds);
        let (machine, hop_before, generator_before, started) = (
            MachineCpu::now(),
            hop_cpu(),
            cpu_seconds(generator),
            Instant::now(),
        );
        let result = round();
        self.wall_seconds += started.elapsed().as_secs_f64();
        self.hop_seconds += hop_cpu() - hop_before;
        self.generator_seconds += cpu_seconds(generator) - generator_before;
        self.machine.add(MachineCpu::now().since(&machine));
        result
    }

    fn hop_percent(&self) -> f64 {
        self.hop_seconds / self.wall_seconds * 100.0
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
async fn type_round(side: &mut Side, duration: Duration, label: &str) -> Round {
    let n = side.typists.len();
    let samples_dir = std::env::var("BENCH_SAMPLES").ok();
    if let Some(dir) = &samples_dir {
        let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
        fs::write(format!("{dir}/{label}.start"), uptime).expect("write the start");
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut typing = JoinSet::new();
    for (i, typist) in side.typists.drain(..).enumerate() {
        // Spread the keystrokes over the interval, as real typists are.
        let offset = TYPING.mul_f64(i as f64 / n as f64);
        typing.spawn(type_until(typist, deadline, offset));
    }
    let mut latencies_ms = Vec::new();
    let mut timeline = String::new();
    while let Some(finished) = typing.join_next().await {
        let (typist, samples) = finished.unwrap();
        for (sent, latency) in samples {
            if samples_dir.is_some() {
                let at = (sent - start).as_secs_f64() * 1000.0;
                timeline += &format!("{at:.3},{latency:.3}\n");
            }
            latencies_ms.push(latency);
        }
        side.typists.push(typist);
    }
    if let Some(dir) = samples_dir {
        fs::write(format!("{dir}/{label}.csv"), timeline).expect("write the samples");
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

/// Connects (through the jump host when the endpoint has one, as `ssh -J` does),
/// authenticates, and starts `stty raw -echo; cat` on a pty; returns once the
/// session echoes.
async fn open(endpoint: Endpoint) -> Typist {
    let (session, jump) = match endpoint.jump {
        None => (
            russh_login(endpoint.port, &endpoint.user, &endpoint.key).await,
            None,
        ),
        Some(jump_port) => {
            let hop = russh_login(jump_port, &endpoint.user, &endpoint.key).await;
            let tunnel = hop
                .channel_open_direct_tcpip("127.0.0.1", endpoint.port.into(), "127.0.0.1", 0)
                .await
                .expect("direct-tcpip through the jump host");
            let session = client::connect_stream(russh_config(), tunnel.into_stream(), AnyHostKey)
                .await
                .expect("connect through the jump host");
            (
                authenticated(session, &endpoint.user, &endpoint.key).await,
                Some(hop),
            )
        }
    };
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
        _jump: jump,
        channel,
    }
}

/// Types a byte every [`TYPING`] until `deadline` and times each echo; hands the
/// session back for the next round.
async fn type_until(
    mut typist: Typist,
    deadline: Instant,
    offset: Duration,
) -> (Typist, Vec<(Instant, f64)>) {
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
        samples.push((sent, sent.elapsed().as_secs_f64() * 1000.0));
    }
    (typist, samples)
}

/// CPU seconds used so far by `pid` and the processes below it.
fn tree_cpu_seconds(pid: u32) -> f64 {
    common::process_tree(pid).into_iter().map(cpu_seconds).sum()
}

/// Proportional set size of `pid` and the processes below it, in KiB: memory
/// shared between them (sshd's processes share most of theirs) counts once.
fn tree_pss_kib(pid: u32) -> u64 {
    common::process_tree(pid)
        .into_iter()
        .map(|p| proc_kib(p, "smaps_rollup", "Pss:"))
        .sum()
}
