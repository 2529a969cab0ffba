//! Running and watching processes: commands with a deadline, daemons and
//! background clients that die with the test, and small helpers for their output.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use super::*;

/// The unix user the tests run as; it is the login used on the target
/// (`root` in CI), because sshd can only log in as an existing account.
pub fn login_user() -> &'static str {
    static LOGIN: OnceLock<String> = OnceLock::new();
    LOGIN.get_or_init(|| {
        let out = Command::new("id").arg("-un").output().expect("run id -un");
        assert!(out.status.success(), "id -un failed: {}", describe(&out));
        text(&out.stdout).trim().to_string()
    })
}

/// A loopback port that was free a moment ago, and that this test binary has
/// not handed out before. Another process may take it before our daemon binds
/// it, which is why daemon start-up retries. It comes from below the kernel's
/// ephemeral range (`ip_local_port_range`), from which the kernel also gives
/// every outgoing connection (each `ssh`, the bastion's own connections
/// upstream) its local port: a port picked there was taken by one of those
/// before a bastion could bind it for its metrics, a port that no retry picks
/// again. Never twice in one binary: two tests that started at once picked the
/// same random port, one daemon failed to bind it, and the other's answered
/// its start-up probe in its place.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_from = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    const LOWEST: u16 = 10_000;
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let mut fresh = |port: u16| {
        !handed_out.contains(&port)
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && handed_out.insert(port)
    };
    if ephemeral_from > LOWEST + 1_000 {
        for _ in 0..100 {
            let port = rand::random_range(LOWEST..ephemeral_from);
            if fresh(port) {
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral loopback port")
            .port();
        if fresh(port) {
            return port;
        }
    }
}

/// `GET path` from an HTTP server on loopback `port` (the bastion's metrics
/// listener): status code and body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP server");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .expect("send request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Lossy UTF-8, for assertions on process output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit status, stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        printable(&out.stdout),
        printable(&out.stderr)
    )
}

/// Text output as is (shortened); binary output by its size and digest only.
fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => truncate(s, 4000),
        Err(_) => format!(
            "[{} bytes of binary data, sha256 {}]",
            bytes.len(),
            sha256(bytes)
        ),
    }
}

/// Keeps assertion messages readable when a command prints megabytes.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes]", &s[..end], s.len() - end)
}

/// Panics with the command's output unless it exited 0.
pub fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", describe(out));
}

/// Panics unless the command failed and its stderr contains every needle
/// (case-insensitively: the assertion is about the content of the message,
/// not its capitalisation).
pub fn assert_failure_mentions(out: &Output, what: &str, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "{what} unexpectedly succeeded:\n{}",
        describe(out)
    );
    let stderr = text(&out.stderr).to_lowercase();
    for needle in needles {
        assert!(
            stderr.contains(&needle.to_lowercase()),
            "{what}: stderr does not mention {needle:?}:\n{}",
            describe(out)
        );
    }
}

/// Quotes `s` for a POSIX shell, for command lines handed to tmux or `rsync -e`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `n` bytes from the kernel's CSPRNG: incompressible, so transfers cannot
/// pass by accident.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(n);
    File::open("/dev/urandom")
        .expect("open /dev/urandom")
        .take(n as u64)
        .read_to_end(&mut bytes)
        .expect("read /dev/urandom");
    assert_eq!(bytes.len(), n);
    bytes
}

/// Writes `size` random bytes to `path` (creating parent directories).
pub fn random_file(path: &Path, size: usize) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parent directory");
    }
    fs::write(path, random_bytes(size)).expect("write random file");
}

/// Hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    sha256(&bytes)
}

/// Relative path → content digest (or `dir`) of everything under `root`, to
/// compare whole trees after a transfer.
pub fn tree_digest(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("entry under root")
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                out.insert(rel, "dir".to_string());
                walk(root, &path, out);
            } else {
                out.insert(rel, sha256_file(&path));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Runs `cmd` to completion with `input` on stdin (or /dev/null), capturing
/// stdout and stderr. Panics after `timeout`, killing the command's whole
/// process group (rsync and scp start ssh children).
pub fn run_with_timeout(cmd: &mut Command, input: Option<Vec<u8>>, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A broken pipe is the command's business (e.g. it exited early); the
        // test asserts on its output and status instead.
        thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let stdout = read_in_background(child.stdout.take().expect("piped stdout"));
    let stderr = read_in_background(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;

    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for command") {
            break status;
        }
        if Instant::now() >= deadline {
            kill_process_group(child.id());
            let partial = Output {
                status: child.wait().expect("reap timed-out command"),
                stdout: stdout
                    .recv_timeout(Duration::from_secs(1))
                    .unwrap_or_default(),
                stderr: stderr
                    .recv_timeout(Duration::from_secs(1))
                    .unwrap_or_default(),
            };
            panic!(
                "timed out after {timeout:?}: {desc}\n{}",
                describe(&partial)
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    // A leftover grandchild may still hold the pipes open: give it until the
    // deadline, then kill the group so the test fails instead of hanging.
    let grace = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(grace).unwrap_or_else(|_| {
            kill_process_group(child.id());
            rx.recv_timeout(Duration::from_secs(1))
                .unwrap_or_else(|_| panic!("output of {desc} never closed"))
        })
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Runs `cmd` with no stdin and the default timeout.
/// Waits for a child to exit and returns its output and how long that took.
pub fn wait_output(child: Child, timeout: Duration) -> (Output, Duration) {
    let started = std::time::Instant::now();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(timeout)
        .expect("the process did not end in time")
        .expect("wait for the process");
    (out, started.elapsed())
}

/// The `p`th percentile of `samples` (sorted in place); NaN when empty.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank]
}

pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, None, COMMAND_TIMEOUT)
}

/// Reads `source` to its end on a thread; the result arrives on the channel.
fn read_in_background(mut source: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = source.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// SIGKILLs every process in group `pgid` (ignores a group that is gone).
fn kill_process_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`), 0 if unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    proc_kib(pid, "status", field)
}

/// A field in KiB of the `/proc/PID/FILE` kind that lists `Field: N kB` lines
/// (`status`, `smaps_rollup`), 0 if unreadable.
pub fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The fields of `/proc/PID/stat` after the command name (which is in parentheses
/// and may hold spaces): state first, then the parent pid. Empty if unreadable.
pub fn stat_fields(pid: u32) -> Vec<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rfind(')') {
        Some(at) => stat[at + 2..].split(' ').map(str::to_string).collect(),
        None => Vec::new(),
    }
}

/// Bytes under `dir`, as `du -sb` counts them (0 if it cannot).
pub fn du_bytes(dir: &Path) -> u64 {
    let out = Command::new("du").args(["-sb"]).arg(dir).output();
    out.map(|out| text(&out.stdout))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A number from the environment (benchmark settings), `default` when unset; a
/// value that is not a number stops the run with its name.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// User plus system CPU seconds a process has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let fields = stat_fields(pid);
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// A background server process whose output goes to a log file; killed on drop.
pub struct Daemon {
    pub(super) what: &'static str,
    pub(super) child: Child,
    pub(super) port: u16,
    pub(super) log: PathBuf,
}

impl Daemon {
    /// Starts a daemon on a free loopback port and waits until it accepts TCP
    /// connections. `prepare(port)` writes whatever config names the port and
    /// returns the command to spawn. A daemon that exits before listening (most
    /// likely because another process grabbed the port) is retried on a new
    /// port; all attempts append to `log`.
    pub fn start(
        what: &'static str,
        log: &Path,
        mut prepare: impl FnMut(u16) -> Command,
    ) -> Daemon {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            let log_file = File::options()
                .create(true)
                .append(true)
                .open(log)
                .expect("open daemon log");
            let child = spawn_logged(&mut prepare(port), log_file);
            let mut daemon = Daemon {
                what,
                child,
                port,
                log: log.to_path_buf(),
            };
            match daemon.wait_listening() {
                Ok(()) => return daemon,
                Err(reason) if attempt < ATTEMPTS && reason.contains("exited") => continue,
                Err(reason) => panic!("{reason}\n--- {what} log ---\n{}", daemon.log()),
            }
        }
        unreachable!()
    }

    /// Polls the port until it accepts a connection on a socket of this daemon's
    /// own (another process that holds the port answers too: then ours failed
    /// to bind it and exits, and start-up retries), the process dies, or the
    /// start-up deadline passes.
    fn wait_listening(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll daemon") {
                return Err(format!(
                    "{} exited with {status} before listening on {addr}",
                    self.what
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && listens(self.child.id(), self.port)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not listen on {addr} within {STARTUP_TIMEOUT:?}",
                    self.what
                ));
            }
            thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log).map(|b| text(&b)).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Whether process `pid`, or a process it started, holds a socket listening on
/// TCP `port` (`/proc/net/tcp` and `tcp6`, and the processes' open files).
fn listens(pid: u32, port: u16) -> bool {
    let port = format!(":{port:04X}");
    let listening: BTreeSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let ours = fields.get(1)?.ends_with(&port) && *fields.get(3)? == "0A";
                    let inode = fields.get(9)?;
                    ours.then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    !listening.is_empty()
        && process_tree(pid).iter().any(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .any(|target| listening.contains(target.to_string_lossy().as_ref()))
        })
}

/// `pid` and every process below it (from `/proc/*/stat`): the bastion is one
/// process, an sshd is one per connection (and more per session), all children
/// of the listener.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent is the second field after the command, which is in
            // parentheses and may hold spaces.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            Some((child, parent.parse().ok()?))
        })
        .collect();
    let mut family = vec![pid];
    let mut next = 0;
    while next < family.len() {
        let parent = family[next];
        family.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(child, _)| *child),
        );
        next += 1;
    }
    family
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A long-running client process (e.g. a ControlMaster) whose output goes to
/// a file; killed on drop unless it has already exited.
pub struct Background {
    child: Child,
    log: PathBuf,
}

impl Background {
    pub fn spawn(mut cmd: Command, log: &Path) -> Background {
        let child = spawn_logged(&mut cmd, File::create(log).expect("create background log"));
        Background {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Waits up to `timeout` for the process to exit; returns whether it did
    /// and with which status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    /// What the process has printed so far.
    pub fn output(&self) -> String {
        fs::read(&self.log).map(|b| text(&b)).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` in a process group of its own (so that it can be killed with its
/// children), stdin closed, stdout and stderr to `log`.
fn spawn_logged(cmd: &mut Command, log: File) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .process_group(0);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Waits up to `timeout` for `child` to exit; returns its status if it did.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("poll child process");
        status.is_some()
    });
    status
}

/// Busy and total CPU time of the whole machine, from `/proc/stat` (clock ticks):
/// the target sshd, the clients and the database share the machine with the
/// bastion, so a saturated machine explains what the bastion's own CPU figure does
/// not.
#[derive(Default, Clone, Copy)]
pub struct MachineCpu {
    pub busy: u64,
    pub total: u64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            // user, nice, system, idle, iowait, irq, softirq, steal: guest time
            // (the last two) is already counted in user and nice.
            .take(8)
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

    /// What was spent between `earlier` and this reading (iowait may go back,
    /// and an unreadable `/proc/stat` reads as nothing: never below zero).
    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy.saturating_sub(earlier.busy),
            total: self.total.saturating_sub(earlier.total),
        }
    }

    pub fn add(&mut self, other: MachineCpu) {
        self.busy += other.busy;
        self.total += other.total;
    }

    /// Busy seconds (USER_HZ is 100 on Linux).
    pub fn busy_seconds(&self) -> f64 {
        self.busy as f64 / 100.0
    }

    /// Busy share, 100% per core.
    pub fn busy_percent(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.busy as f64 / self.total.max(1) as f64 * 100.0 * cores as f64
    }
}
