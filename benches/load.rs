//! Many concurrent interactive sessions through the bastion, against the same
//! sessions straight to sshd.
//!
//! ```text
//! cargo bench --bench load
//! ```
//!
//! For each N (default 100 and 500; `BENCH_SESSIONS=100,500,1000` to choose), a fresh
//! target sshd and bastion are started. N sessions are opened (a pty running
//! `stty raw -echo; cat`, so every byte typed comes back once), first straight to
//! sshd, then through portcullis with recording on; each session types one byte every
//! 100 ms for `BENCH_SECONDS` (default 10) and times its echo. The table shows echo
//! latency (p50/p99) direct and through portcullis, the latency portcullis adds,
//! the bastion's CPU and peak RSS per session, and the session setup rate.
//!
//! The clients are russh sessions in this process (N OpenSSH processes with a pty
//! each would measure the machine's process table, not the bastion).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_seconds, login_user, status_kib, World, TARGET};
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::ChannelMsg;
use tokio::task::JoinSet;

/// Interval between keystrokes in each session.
const TYPING: Duration = Duration::from_millis(100);

/// Sessions opened at once while ramping up.
const RAMP_CONCURRENCY: usize = 25;

struct AnyHostKey;

impl client::Handler for AnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true) // loopback benchmark against servers this program started
    }
}

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

/// What one run measured.
struct Run {
    latencies_ms: Vec<f64>,
    setup_per_second: f64,
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SESSIONS")
        .unwrap_or_else(|_| "100,500".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("BENCH_SESSIONS is a list of numbers")
        })
        .collect();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .map(|s| s.parse().expect("BENCH_SECONDS is a number"))
        .unwrap_or(10);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!(
        "portcullis load benchmark: one keystroke per {TYPING:?} per session, {seconds}s per run, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "\n{:>5} {:>11} {:>11} {:>14} {:>14} {:>10} {:>10} {:>6} {:>12} {:>15}",
        "N",
        "direct p50",
        "direct p99",
        "portcullis p50",
        "portcullis p99",
        "added p50",
        "added p99",
        "CPU %",
        "RSS/session",
        "setup/s dir/pc"
    );
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
        let duration = Duration::from_secs(seconds);
        let mut base = runtime.block_on(run(&direct, n, duration));
        let pid = world.bastion.pid();
        let rss_before = status_kib(pid, "VmRSS:");
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let mut ours = runtime.block_on(run(&through, n, duration));
        let cpu = (cpu_seconds(pid) - cpu_before) / started.elapsed().as_secs_f64() * 100.0;
        let peak = status_kib(pid, "VmHWM:");
        let per_session_kib = peak.saturating_sub(rss_before) as f64 / n as f64;
        let (d50, d99) = (
            percentile(&mut base.latencies_ms, 50.0),
            percentile(&mut base.latencies_ms, 99.0),
        );
        let (p50, p99) = (
            percentile(&mut ours.latencies_ms, 50.0),
            percentile(&mut ours.latencies_ms, 99.0),
        );
        println!(
            "{n:>5} {d50:>9.2}ms {d99:>9.2}ms {p50:>12.2}ms {p99:>12.2}ms {:>8.2}ms {:>8.2}ms {cpu:>5.0}% {:>8.0} KiB {:>7.0} / {:<5.0}",
            p50 - d50,
            p99 - d99,
            per_session_kib,
            base.setup_per_second,
            ours.setup_per_second
        );
    }
    println!("\nCPU % is the bastion's (100% = one core) while the portcullis sessions ran.");
    println!(
        "targets: 500 sessions with p99 added echo latency < 10 ms and < 1 MiB RSS per session"
    );
}

/// Opens `n` typing sessions to `endpoint`, lets them type for `duration`, and
/// returns every echo latency.
async fn run(endpoint: &Endpoint, n: usize, duration: Duration) -> Run {
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
    let setup_per_second = n as f64 / ramp.elapsed().as_secs_f64();
    let deadline = Instant::now() + duration;
    let mut typing = JoinSet::new();
    for (i, typist) in typists.into_iter().enumerate() {
        // Spread the keystrokes over the interval, as real typists are.
        let offset = TYPING.mul_f64(i as f64 / n as f64);
        typing.spawn(type_until(typist, deadline, offset));
    }
    let mut latencies_ms = Vec::new();
    while let Some(samples) = typing.join_next().await {
        latencies_ms.extend(samples.unwrap());
    }
    Run {
        latencies_ms,
        setup_per_second,
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

/// Types a byte every [`TYPING`] until `deadline` and times each echo.
async fn type_until(mut typist: Typist, deadline: Instant, offset: Duration) -> Vec<f64> {
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
                None => return samples,
            }
        }
        samples.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = typist.channel.eof().await;
    samples
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank]
}
