//! Throughput and latency of portcullis against OpenSSH's own ProxyJump.
//!
//! ```text
//! cargo bench --bench proxy
//! ```
//!
//! Starts a real sshd as the target, a second sshd as an OpenSSH jump host and the
//! portcullis bastion (release build), then measures with the real `ssh` client, over
//! loopback, for three routes to the same target:
//!
//! - `direct`: `ssh target`
//! - `proxyjump`: `ssh -J jump target`
//! - `portcullis`: `ssh LOGIN@local@bastion`
//!
//! and prints medians: download and upload of 1 GiB (MiB/s) of zeros (terminal-like,
//! compressible) and of random bytes (like compressed archives and git packs), and
//! the wall time of connecting and running `true` (ms), with portcullis/ProxyJump
//! ratios. For portcullis it also prints the bastion's CPU seconds per GiB moved and
//! the bytes its database grew by per byte moved (every transfer is recorded), and
//! at the end, after a restart, the database's size per byte recorded. For every
//! route, the whole machine's busy CPU seconds per GiB and how busy it was, by
//! direction: a route slower for no more CPU waits on something. Runs of the
//! routes are interleaved, and each run starts with the next route, so drift in
//! machine load hits all of them alike and no route always follows the same one;
//! against `sled` and `baseline` it also prints the median of the run-by-run
//! ratios, with their range. For each portcullis route, from the bastion's
//! `/metrics`, by direction: the seconds its relays waited for the recording to
//! be written per GiB moved (the store set the pace then), the seconds the
//! store's writes took per GiB, and the mean store write. Every transfer through
//! portcullis starts once the bastion has written the last transfer's recording
//! (since 2026-11-28: before, the bytes a bastion still held when `ssh` exited,
//! up to 16 MiB on PostgreSQL, were written during the next transfer, an upload
//! after its download), and those writes count for the transfer they recorded.
//!
//! Then it measures what recording costs: the same `scp -O` download through a
//! bastion that stores the transcript (`record_file_transfers = true`) and one that
//! stores metadata only; the bytes stored per MiB of typical terminal output
//! (`ls -lR /usr`); and how long `replay` takes to its first byte.
//!
//! Tunables (environment): `BENCH_MIB` (transfer size, default 1024; the payload
//! files are written to the temp dir), `BENCH_RUNS`
//! (transfers per route and direction, default 5), `BENCH_CONNECTS` (latency samples
//! per route, default 21), `BENCH_ONLY=recording` (only the recording costs),
//! `BENCH_PAYLOADS` (`zeros`, `random` or both, the default, comma-separated),
//! `BENCH_STORE=postgres` (the bastion on a fresh database of a PostgreSQL server
//! the benchmark starts, as the tests do but with `fsync` on, as in production;
//! `BENCH_PG_SETTINGS` adds server settings, `fsync=off` measures as before
//! 2026-11-28; plus route `sled`, the same build on the embedded default; it
//! also prints the database server's CPU; default `sled`),
//! `BENCH_BASELINE=PATH` (also measure another portcullis binary, e.g. a release
//! build of an older commit, as route `baseline`, interleaved with the others, on
//! the same keys, policies, target and backend (on PostgreSQL, a database of its
//! own): a regression shows in one run's `portcullis/baseline` row).

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{
    cpu_seconds, env_number, login_user, text, Sshd, World, WorldOptions, CONTROL_USER, TARGET,
};

/// One way of reaching the target with the plain OpenSSH client.
struct Route {
    name: &'static str,
    /// Everything between `ssh` and the remote command.
    ssh_args: Vec<String>,
    /// A portcullis route's bastion (process id, database directory), whose CPU
    /// time and database growth are measured.
    bastion: Option<(u32, std::path::PathBuf)>,
    /// A portcullis route's metrics port, where its recording's waits and
    /// writes are read.
    metrics: Option<u16>,
}

impl Route {
    fn ssh(&self, remote_command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(&self.ssh_args).arg(remote_command);
        cmd
    }
}

/// Medians of one route.
#[derive(Default)]
struct Figures {
    download_mib_s: Vec<f64>,
    upload_mib_s: Vec<f64>,
    connect_ms: Vec<f64>,
    /// portcullis routes only: bastion CPU seconds per GiB moved, and database
    /// growth per byte moved.
    cpu_s_per_gib: Vec<f64>,
    stored_per_byte: Vec<f64>,
    /// On PostgreSQL: the database server's CPU seconds per GiB moved.
    db_cpu_s_per_gib: Vec<f64>,
    /// Every route, download and upload: the whole machine's busy CPU seconds per
    /// GiB moved (clients, hops, target, database), and how busy it was (100 % per
    /// core). A route that is slower for no more CPU per GiB waits on something
    /// other than the CPU. (Work that goes on after a transfer, such as a
    /// bastion's last flush, counts in the next window.)
    machine_s_per_gib: [Vec<f64>; 2],
    machine_busy: [Vec<f64>; 2],
    /// portcullis routes, download and upload: seconds the relay waited for the
    /// recording to be written and seconds the store's writes took, per GiB
    /// moved, and the mean store write (ms; its size depends on the backend and
    /// on how far behind the store was).
    store_wait_s_per_gib: [Vec<f64>; 2],
    write_s_per_gib: [Vec<f64>; 2],
    write_ms: [Vec<f64>; 2],
}

impl Figures {
    /// Adds what the machine spent since `before` on a transfer of `mib` in
    /// `direction` (0 down, 1 up); returns now.
    fn add_machine(
        &mut self,
        direction: usize,
        before: common::MachineCpu,
        mib: u64,
    ) -> common::MachineCpu {
        let now = common::MachineCpu::now();
        let spent = now.since(&before);
        self.machine_s_per_gib[direction].push(spent.busy_seconds() * 1024.0 / mib as f64);
        self.machine_busy[direction].push(spent.busy_percent());
        now
    }

    /// Adds what `route`'s recording waited and wrote since `before` during a
    /// transfer of `mib` in `direction`; returns the totals now.
    fn add_recording(
        &mut self,
        direction: usize,
        route: &Route,
        before: Option<Recording>,
        mib: u64,
    ) -> Option<Recording> {
        let now = route.metrics.and_then(recording);
        if let (Some(now), Some(before)) = (now, before) {
            let per_gib = |seconds: f64| seconds * 1024.0 / mib as f64;
            let waited = now.wait_seconds - before.wait_seconds;
            self.store_wait_s_per_gib[direction].push(per_gib(waited));
            let took = now.write_seconds - before.write_seconds;
            self.write_s_per_gib[direction].push(per_gib(took));
            let writes = now.writes - before.writes;
            if writes > 0.0 {
                self.write_ms[direction].push(took * 1000.0 / writes);
            }
        }
        now
    }
}

/// A bastion's recording totals, from its `/metrics`.
#[derive(Clone, Copy)]
struct Recording {
    wait_seconds: f64,
    writes: f64,
    write_seconds: f64,
}

/// The recording totals of the bastion whose metrics are on `port`; `None` for
/// a build without them (an older `baseline`).
fn recording(port: u16) -> Option<Recording> {
    let (_, body) = common::http_get(port, "/metrics");
    let value = |name: &str| {
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    Some(Recording {
        wait_seconds: value("portcullis_recording_wait_seconds_total")?,
        writes: value("portcullis_recording_writes_total")?,
        write_seconds: value("portcullis_recording_write_seconds_total")?,
    })
}

/// Waits until a portcullis route's bastion holds no unwritten recording (its
/// `portcullis_recording_queue_bytes` is 0), so that every transfer starts with
/// the store idle: `ssh` exits before the bastion has written the last bytes it
/// holds (up to 8 MiB a session on sled, 16 MiB on PostgreSQL), and those
/// writes would otherwise be timed as part of the next transfer.
fn wait_until_recorded(route: &Route) {
    let Some(port) = route.metrics else {
        return;
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (_, body) = common::http_get(port, "/metrics");
        let queued = body.lines().find_map(|line| {
            line.strip_prefix("portcullis_recording_queue_bytes ")?
                .parse::<f64>()
                .ok()
        });
        // A build without the gauge (before 2026-11-24) is not waited for.
        if queued.is_none_or(|bytes| bytes == 0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: recording still queued after 2 minutes ({queued:?} bytes)",
            route.name
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What the transfers carry: a file on the (local) target, read from page cache.
struct Payload {
    name: &'static str,
    path: std::path::PathBuf,
}

fn main() {
    let mib: u64 = env_number("BENCH_MIB", 1024);
    let runs: usize = env_number("BENCH_RUNS", 5);
    let connects: usize = env_number("BENCH_CONNECTS", 21);

    if std::env::var("BENCH_ONLY").as_deref() == Ok("recording") {
        recording_costs(mib, runs);
        return;
    }
    let (store_config, backend) = common::bench_store();
    // The store is this bastion's own setting, so that the `sled` route below (same
    // build, embedded default) can run next to it in the same run.
    let metrics = common::free_port();
    let world = World::start_with(WorldOptions {
        node_config: format!("{}{store_config}", metrics_listen(metrics)),
        ..WorldOptions::default()
    });
    // Direct ssh and ProxyJump log in to the target with alice's own key; portcullis
    // uses its upstream key, which the target already trusts.
    let jump = world.jump_host();
    let client_config = write_client_config(&world.path("ssh_config"), world.alice.key());
    let baseline = std::env::var_os("BENCH_BASELINE").map(|bin| baseline_bastion(&world, &bin));
    // On PostgreSQL, the same build on sled runs as route `sled`: the backend's
    // cost is the `portcullis/sled` row of one run.
    let on_sled = (backend == "postgres").then(|| {
        let metrics = common::free_port();
        let binary = Path::new(common::Bastion::binary());
        (
            world.another_node("sled", binary, &metrics_listen(metrics)),
            metrics,
        )
    });
    let mut routes = routes(&client_config, &world, &jump, metrics);
    for (name, other) in [("baseline", &baseline), ("sled", &on_sled)] {
        if let Some(other) = other {
            routes.push(other_bastion_route(name, other, &client_config, &world));
        }
    }

    for route in &routes {
        let out = route.ssh("true").output().expect("run ssh");
        assert!(
            out.status.success(),
            "{} does not work: {}\n{}",
            route.name,
            String::from_utf8_lossy(&out.stderr),
            world.logs()
        );
    }

    let bytes = mib * 1024 * 1024;
    println!(
        "portcullis proxy benchmark: {mib} MiB transfers x {runs}, {connects} connects, \
         loopback, {} cores, store {backend}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let wanted = std::env::var("BENCH_PAYLOADS").unwrap_or_else(|_| "zeros,random".into());
    let payloads: Vec<Payload> = [("zeros", "/dev/zero"), ("random", "/dev/urandom")]
        .into_iter()
        .filter(|(name, _)| wanted.split(',').any(|w| w.trim() == *name))
        .map(|(name, source)| payload(&world, name, source, bytes))
        .collect();
    for payload in &payloads {
        let mut figures: Vec<Figures> = routes.iter().map(|_| Figures::default()).collect();
        for run in 0..runs {
            for (route, fig) in rotated(routes.iter().zip(&mut figures), run) {
                let before = route
                    .bastion
                    .as_ref()
                    .map(|(pid, db)| (cpu_seconds(*pid), dir_size(db)));
                let db_before = database_cpu(backend);
                let machine = common::MachineCpu::now();
                let recorded = route.metrics.and_then(recording);
                fig.download_mib_s
                    .push(mib as f64 / download(route, &payload.path, bytes));
                let machine = fig.add_machine(0, machine, mib);
                wait_until_recorded(route);
                let recorded = fig.add_recording(0, route, recorded, mib);
                fig.upload_mib_s
                    .push(mib as f64 / upload(route, &payload.path, bytes));
                fig.add_machine(1, machine, mib);
                wait_until_recorded(route);
                fig.add_recording(1, route, recorded, mib);
                if let (Some((pid, db)), Some((cpu, size))) = (&route.bastion, before) {
                    // Sessions are sealed once their recording is written; sled
                    // syncs within 200 ms.
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let cpu = cpu_seconds(*pid) - cpu;
                    fig.cpu_s_per_gib.push(cpu * 1024.0 / (2 * mib) as f64);
                    if db.exists() {
                        // (On PostgreSQL there is no database directory of its own.)
                        let grown = dir_size(db).saturating_sub(size);
                        fig.stored_per_byte.push(grown as f64 / (2 * bytes) as f64);
                    }
                    if let (Some(after), Some(before)) = (database_cpu(backend), db_before) {
                        fig.db_cpu_s_per_gib
                            .push((after - before) * 1024.0 / (2 * mib) as f64);
                    }
                }
            }
        }
        if payload.name == "zeros" {
            for run in 0..connects {
                for (route, fig) in rotated(routes.iter().zip(&mut figures), run) {
                    fig.connect_ms.push(connect_and_run_true(route) * 1000.0);
                }
            }
        }
        println!("\n{} ({mib} MiB of {})", payload.name, payload.name);
        print_paired(&routes, &figures);
        print_table(&routes, &mut figures);
        print_recording(&routes, &mut figures);
    }
    let mut world = world;
    world.restart_bastion_after(true, |_| {});
    let recorded: f64 = sessions_json(&world)
        .iter()
        .map(|s| s["transcript_bytes"].as_f64().unwrap_or(0.0))
        .sum();
    let size = match database_url(&store_config) {
        Some(url) => {
            let database = common::database_of(url);
            let sql = "SELECT pg_database_size(current_database())";
            common::bench_postgres()
                .sql(database, sql)
                .parse()
                .unwrap_or(0)
        }
        None => dir_size(&world.bastion.data_dir().join("db")),
    };
    let mix = match payloads.iter().map(|p| p.name).collect::<Vec<_>>()[..] {
        ["zeros"] => "all of it zeros, stored compressed",
        ["random"] => "all of it random",
        _ => "half of it zeros, stored compressed",
    };
    println!(
        "\nafter a restart: database {:.1} MiB for {:.1} MiB recorded ({:.2} bytes per byte; {mix})",
        size as f64 / 1048576.0,
        recorded / 1048576.0,
        size as f64 / recorded
    );
    println!("\ntargets: throughput ratios >= 1.0, latency ratio <= 1.0 (lower latency is better)");
    drop(jump);
    drop(baseline);
    drop(on_sled);
    drop(world);
    recording_costs(mib, runs);
}

/// The items of `routes` starting at the `run`-th, then the others in order: each
/// run starts with another route, so that no route always follows the same one.
fn rotated<T>(routes: impl Iterator<Item = T>, run: usize) -> impl Iterator<Item = T> {
    let mut routes: Vec<T> = routes.collect();
    let len = routes.len().max(1);
    routes.rotate_left(run % len);
    routes.into_iter()
}

/// `metrics_listen` on `port`, a line for the top of a bastion's config.
fn metrics_listen(port: u16) -> String {
    format!("metrics_listen = \"127.0.0.1:{port}\"\n")
}

/// The route through `bastion`, another portcullis process on this world's keys,
/// with its metrics on `metrics`.
fn other_bastion_route(
    name: &'static str,
    (bastion, metrics): &(common::Bastion, u16),
    client_config: &Path,
    world: &World,
) -> Route {
    Route {
        name,
        ssh_args: with_host(vec![
            "-F".into(),
            client_config.display().to_string(),
            "-p".into(),
            bastion.port().to_string(),
            "-l".into(),
            world.target_user(),
        ]),
        bastion: Some((bastion.pid(), bastion.data_dir().join("db"))),
        metrics: Some(*metrics),
    }
}

/// The database URL in `[store]` lines from [`common::bench_store`], if any.
fn database_url(store_config: &str) -> Option<&str> {
    let line = store_config.lines().find(|l| l.starts_with("url = \""))?;
    line.strip_prefix("url = \"")?.strip_suffix('"')
}

/// The PostgreSQL server's CPU seconds so far, when the bastion is on it.
fn database_cpu(backend: &str) -> Option<f64> {
    (backend == "postgres").then(|| common::bench_postgres().cpu_seconds())
}

/// A second bastion running `binary`, on this world's keys, policies, target and
/// backend (a fresh database of its own on PostgreSQL).
fn baseline_bastion(world: &World, binary: &std::ffi::OsStr) -> (common::Bastion, u16) {
    println!(
        "baseline: {} (route `baseline`)",
        Path::new(binary).display()
    );
    let (store_config, _) = common::bench_store();
    let metrics = common::free_port();
    let config = format!("{}{store_config}", metrics_listen(metrics));
    (
        world.another_node("baseline", Path::new(binary), &config),
        metrics,
    )
}

/// A payload file of `bytes` from `source`, in the world's directory.
fn payload(world: &World, name: &'static str, source: &str, bytes: u64) -> Payload {
    let path = world.path(&format!("payload-{name}"));
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {bytes} {source} > {}", path.display()))
        .status()
        .expect("run head");
    assert!(made.success(), "cannot write {}", path.display());
    Payload { name, path }
}

/// Bytes of all files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn sessions_json(world: &World) -> Vec<serde_json::Value> {
    let listing: serde_json::Value = serde_json::from_str(&text(
        &world
            .control_as(&world.dave, &["sessions", "--json"])
            .stdout,
    ))
    .expect("sessions --json");
    listing.as_array().cloned().unwrap_or_default()
}

/// Recording on vs off for the same transfer, storage per MiB, replay latency.
fn recording_costs(mib: u64, runs: usize) {
    let metadata_only = World::start();
    let recorded = World::start_with(WorldOptions {
        extra_config: "record_file_transfers = true\n".into(),
        ..WorldOptions::default()
    });
    let file = metadata_only.path("payload");
    let sized = Command::new("truncate")
        .args(["-s", &(mib << 20).to_string()])
        .arg(&file)
        .status()
        .expect("run truncate");
    assert!(sized.success());
    let source = format!("{}@{TARGET}@127.0.0.1:{}", login_user(), file.display());
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut off_cpu, mut on_cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (rate, cpu) = measured_download(&metadata_only, &source, mib);
        off.push(rate);
        off_cpu.push(cpu);
        let (rate, cpu) = measured_download(&recorded, &source, mib);
        on.push(rate);
        on_cpu.push(cpu);
    }
    let (off, on) = (median(&mut off), median(&mut on));
    let (off_cpu, on_cpu) = (median(&mut off_cpu), median(&mut on_cpu));
    println!(
        "\nrecording cost ({mib} MiB `scp -O` download through portcullis, median of {runs}):"
    );
    println!("  {:<31} {:>10} {:>18}", "", "MiB/s", "bastion CPU s/GiB");
    println!(
        "  {:<31} {off:>10.1} {off_cpu:>18.2}",
        "transcript off (metadata only)"
    );
    println!("  {:<31} {on:>10.1} {on_cpu:>18.2}", "transcript on");
    println!(
        "  {:<31} {:>9.1}% {:>17.1}%",
        "overhead",
        (1.0 - on / off) * 100.0,
        (on_cpu / off_cpu - 1.0) * 100.0
    );

    let listing = recorded.alice.ssh(
        &recorded.target_user(),
        &["ls -lR /usr 2>/dev/null | head -c 16777216"],
    );
    assert!(
        listing.status.success(),
        "ls -lR through the bastion failed"
    );
    let sessions: serde_json::Value = serde_json::from_str(&text(
        &recorded
            .control_as(&recorded.dave, &["sessions", "--json"])
            .stdout,
    ))
    .expect("sessions --json");
    let last = sessions
        .as_array()
        .and_then(|a| a.last())
        .expect("a session");
    let plain = last["transcript_bytes"].as_f64().unwrap_or(0.0);
    let stored = last["stored_bytes"].as_f64().unwrap_or(0.0);
    println!(
        "  storage: `ls -lR /usr` output, {:.1} MiB recorded as {:.1} KiB: {:.0} KiB per MiB ({:.1}x)",
        plain / 1048576.0,
        stored / 1024.0,
        stored / 1024.0 / (plain / 1048576.0),
        plain / stored
    );
    let id = last["id"].to_string();
    let mut first_byte = Vec::new();
    for _ in 0..5 {
        first_byte.push(time_to_first_byte(
            &recorded,
            &["replay", &id, "--speed", "1000"],
        ));
    }
    let mut round_trip = Vec::new();
    for _ in 0..5 {
        round_trip.push(time_to_first_byte(&recorded, &["whoami"]));
    }
    println!(
        "  replay start: first byte after {:.1} ms (a `whoami` round trip: {:.1} ms)",
        median(&mut first_byte),
        median(&mut round_trip)
    );
}

/// Throughput (MiB/s) of one download and the bastion's CPU seconds per GiB for it.
fn measured_download(world: &World, source: &str, mib: u64) -> (f64, f64) {
    let before = cpu_seconds(world.bastion.pid());
    let seconds = scp_download(world, source);
    let cpu = cpu_seconds(world.bastion.pid()) - before;
    (mib as f64 / seconds, cpu * 1024.0 / mib as f64)
}

/// Seconds for `scp -O` to fetch `source` through the world's bastion to /dev/null.
fn scp_download(world: &World, source: &str) -> f64 {
    let started = Instant::now();
    let out = world.alice.scp(&["-O"], source, "/dev/null");
    assert!(
        out.status.success(),
        "scp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

/// Milliseconds from starting a control command as dave to its first byte of output.
fn time_to_first_byte(world: &World, command: &[&str]) -> f64 {
    let started = Instant::now();
    let mut child = world
        .dave
        .ssh_command(CONTROL_USER, &[], &[&common::quote_words(command)])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    let read = stdout.read(&mut byte).expect("read");
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(read, 1, "{command:?} printed nothing");
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    let _ = child.wait();
    elapsed
}

/// The three routes to the same target sshd (the bastion's metrics on
/// `metrics`).
fn routes(config: &Path, world: &World, jump: &Sshd, metrics: u16) -> Vec<Route> {
    let login = login_user();
    let base = |port: u16, user: &str| -> Vec<String> {
        vec![
            "-F".into(),
            config.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-l".into(),
            user.to_string(),
        ]
    };
    let mut proxyjump = base(world.sshd.port(), login);
    proxyjump.extend(["-J".into(), format!("{login}@127.0.0.1:{}", jump.port())]);
    vec![
        Route {
            name: "direct",
            ssh_args: with_host(base(world.sshd.port(), login)),
            bastion: None,
            metrics: None,
        },
        Route {
            name: "proxyjump",
            ssh_args: with_host(proxyjump),
            bastion: None,
            metrics: None,
        },
        Route {
            name: "portcullis",
            ssh_args: with_host(base(world.bastion.port(), &world.target_user())),
            bastion: Some((world.bastion.pid(), world.bastion.data_dir().join("db"))),
            metrics: Some(metrics),
        },
    ]
}

fn with_host(mut args: Vec<String>) -> Vec<String> {
    args.push("127.0.0.1".into());
    args
}

/// An ssh_config for every hop (ProxyJump passes `-F` on to the jump connection).
fn write_client_config(path: &Path, key: &Path) -> std::path::PathBuf {
    let config = format!(
        "Host *\n\
         \tIdentityFile {}\n\
         \tIdentitiesOnly yes\n\
         \tStrictHostKeyChecking no\n\
         \tUserKnownHostsFile /dev/null\n\
         \tBatchMode yes\n\
         \tLogLevel ERROR\n",
        key.display()
    );
    fs::write(path, config).expect("write ssh_config");
    path.to_path_buf()
}

/// Seconds to receive the payload `file` (`bytes` long) from the target; checks
/// that every byte arrived.
fn download(route: &Route, file: &Path, bytes: u64) -> f64 {
    let started = Instant::now();
    let mut child = route
        .ssh(&format!("cat {}", file.display()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut stdout = child.stdout.take().expect("ssh stdout");
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = stdout.read(&mut buf).expect("read ssh stdout");
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let status = child.wait().expect("wait for ssh");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(status.success(), "{} download failed: {status}", route.name);
    assert_eq!(received, bytes, "{} download lost bytes", route.name);
    elapsed
}

/// Seconds to send the payload `file` (`bytes` long) to the target; the target
/// counts what it received.
fn upload(route: &Route, file: &Path, bytes: u64) -> f64 {
    let started = Instant::now();
    let mut source = Command::new("cat")
        .arg(file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn head");
    let out = route
        .ssh("wc -c")
        .stdin(Stdio::from(source.stdout.take().expect("head stdout")))
        .output()
        .expect("run ssh");
    let elapsed = started.elapsed().as_secs_f64();
    source.wait().expect("wait for cat");
    assert!(out.status.success(), "{} upload failed", route.name);
    let counted: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("wc -c prints a number");
    assert_eq!(counted, bytes, "{} upload lost bytes", route.name);
    elapsed
}

/// Seconds from starting `ssh … true` to its exit: TCP, key exchange,
/// authentication (twice for the two-hop routes), channel, command.
fn connect_and_run_true(route: &Route) -> f64 {
    let started = Instant::now();
    let status = route
        .ssh("true")
        .stdout(Stdio::null())
        .status()
        .expect("run ssh");
    assert!(status.success(), "{} ssh true failed", route.name);
    started.elapsed().as_secs_f64()
}

/// portcullis against the `sled` and `baseline` routes run by run: each run's
/// ratio compares two transfers made minutes apart at most, so a machine whose
/// load drifts over the benchmark (other work on it) moves both alike. Prints
/// the median ratio and its range, by direction.
fn print_paired(routes: &[Route], figures: &[Figures]) {
    let of = |name: &str| {
        let at = routes.iter().position(|r| r.name == name)?;
        Some(&figures[at])
    };
    let Some(ours) = of("portcullis") else {
        return;
    };
    for other_name in ["sled", "baseline"] {
        let Some(other) = of(other_name) else {
            continue;
        };
        let paired = |a: &[f64], b: &[f64]| -> String {
            let mut ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            if ratios.is_empty() {
                return "-".into();
            }
            let (low, high) = ratios
                .iter()
                .fold((f64::INFINITY, 0f64), |(l, h), r| (l.min(*r), h.max(*r)));
            format!("{:.2}x ({low:.2} to {high:.2})", median(&mut ratios))
        };
        println!(
            "portcullis/{other_name} run by run: download {}, upload {}",
            paired(&ours.download_mib_s, &other.download_mib_s),
            paired(&ours.upload_mib_s, &other.upload_mib_s)
        );
    }
}

fn print_table(routes: &[Route], figures: &mut [Figures]) {
    println!(
        "{:<22} {:>16} {:>16} {:>18} {:>14} {:>16} {:>17} {:>23} {:>18}",
        "route (median)",
        "download MiB/s",
        "upload MiB/s",
        "connect+true ms",
        "CPU s per GiB",
        "stored per byte",
        "DB CPU s per GiB",
        "machine s/GiB down/up",
        "busy down/up"
    );
    let mut medians = Vec::new();
    for (route, fig) in routes.iter().zip(figures.iter_mut()) {
        let row = [
            median(&mut fig.download_mib_s),
            median(&mut fig.upload_mib_s),
            median(&mut fig.connect_ms),
        ];
        let optional = |samples: &mut Vec<f64>, width: usize| {
            if samples.is_empty() {
                format!("{:>width$}", "-")
            } else {
                format!("{:>width$.2}", median(samples))
            }
        };
        println!(
            "{:<22} {:>16.1} {:>16.1} {:>18} {} {} {} {:>23} {:>18}",
            route.name,
            row[0],
            row[1],
            if fig.connect_ms.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", row[2])
            },
            optional(&mut fig.cpu_s_per_gib, 14),
            optional(&mut fig.stored_per_byte, 16),
            optional(&mut fig.db_cpu_s_per_gib, 17),
            format!(
                "{:.2} / {:.2}",
                median(&mut fig.machine_s_per_gib[0]),
                median(&mut fig.machine_s_per_gib[1])
            ),
            format!(
                "{:.0} / {:.0} %",
                median(&mut fig.machine_busy[0]),
                median(&mut fig.machine_busy[1])
            ),
        );
        medians.push(row);
    }
    let by_name = |name: &str| {
        routes
            .iter()
            .position(|r| r.name == name)
            .map(|i| medians[i])
            .expect("route measured")
    };
    let ours = by_name("portcullis");
    let ratio = |label: &str, other: [f64; 3]| {
        println!(
            "{:<22} {:>15.2}x {:>15.2}x {:>17.2}x",
            label,
            ours[0] / other[0],
            ours[1] / other[1],
            ours[2] / other[2]
        )
    };
    ratio("portcullis/proxyjump", by_name("proxyjump"));
    for other in ["baseline", "sled"] {
        if routes.iter().any(|r| r.name == other) {
            ratio(&format!("portcullis/{other}"), by_name(other));
        }
    }
}

/// What the portcullis routes' relays waited for their recordings and what the
/// store's writes took, per GiB, and the mean write (medians over the transfers).
fn print_recording(routes: &[Route], figures: &mut [Figures]) {
    println!(
        "{:<22} {:>28} {:>28} {:>24}",
        "recording (median)",
        "store wait s/GiB down/up",
        "store write s/GiB down/up",
        "mean write ms down/up"
    );
    for (route, fig) in routes.iter().zip(figures.iter_mut()) {
        if fig.store_wait_s_per_gib[0].is_empty() {
            continue;
        }
        let pair = |[down, up]: &mut [Vec<f64>; 2], decimals: usize| {
            format!("{:.decimals$} / {:.decimals$}", median(down), median(up))
        };
        println!(
            "{:<22} {:>28} {:>28} {:>24}",
            route.name,
            pair(&mut fig.store_wait_s_per_gib, 2),
            pair(&mut fig.write_s_per_gib, 2),
            pair(&mut fig.write_ms, 1),
        );
    }
}

fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let mid = samples.len() / 2;
    if samples.len().is_multiple_of(2) {
        (samples[mid - 1] + samples[mid]) / 2.0
    } else {
        samples[mid]
    }
}
