//! Integration-test harness: a real OpenSSH server as the target, the real
//! `portcullis` binary as the bastion, and the real OpenSSH clients (ssh, scp,
//! sftp, rsync) as the engineer.
//!
//! Every test builds its own [`World`] in its own temporary directory with its
//! own loopback ports, so tests run in parallel and never see each other. Child
//! processes are killed on drop and the directory is removed afterwards; when a
//! test panics, the bastion's and sshd's logs are printed so the failure can be
//! understood from the test output alone.
//!
//! Shared by several test binaries (and benches), so not every helper is used
//! by every one of them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// How long a daemon may take to accept TCP connections after it was spawned.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound for one client command: a hung proxy must fail the test, not hang CI.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Name of the single target in the test policies.
pub const TARGET: &str = "local";

/// The engineer known to the policies.
pub const USER: &str = "alice";

/// File in a world's directory whose lines are appended to portcullis.toml.
const EXTRA_CONFIG: &str = "portcullis.extra.toml";

/// The reserved username of the control plane.
pub const CONTROL_USER: &str = "portcullis";

/// Group of [`USER`]; the staging flow lets it request access.
pub const GROUP: &str = "engineers";

/// How often to poll while waiting for something (a port, a file, a process).
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

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

/// A loopback port that was free a moment ago. Another process may take it
/// before our daemon binds it, which is why daemon start-up retries.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
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

/// Quotes a string for a TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
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

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

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

/// An interactive shell session of alice on the local target, in tmux, that has
/// printed `survived-9` and waited past the recording's flush interval, so its
/// output is on disk (for crash and tampering tests).
pub fn flushed_shell_session(world: &World) -> Tmux {
    let line = world
        .alice
        .ssh_shell_line(&format!("{}@{TARGET}", login_user()), &["-tt"], &[]);
    let tmux = Tmux::start(world.dir.path(), 100, 30, &line);
    tmux.send("echo survived-$((3*3))", true);
    tmux.send("Enter", false);
    assert!(
        tmux.wait_for("survived-9", Duration::from_secs(10)),
        "{}",
        tmux.screen()
    );
    // Longer than the flush interval, so the output is on disk.
    thread::sleep(Duration::from_millis(2500));
    tmux
}

/// `users` (users.toml text) without the `[users.NAME]` table.
pub fn without_user(users: &str, name: &str) -> String {
    let header = format!("[users.{name}]");
    let start = users.find(&header).expect("the user is in users.toml");
    let end = users[start + 1..]
        .find("[users.")
        .map_or(users.len(), |at| start + 1 + at);
    format!("{}{}", &users[..start], &users[end..])
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

/// Generates an unencrypted ed25519 key pair at `path` (+ `.pub`) and returns
/// the public key line.
pub fn keygen(path: &Path, comment: &str) -> String {
    let out = run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path));
    assert_success(&out, "ssh-keygen");
    public_key_of(path)
}

/// The public key line stored next to the private key at `path`.
pub fn public_key_of(path: &Path) -> String {
    let pub_path = path.with_extension("pub");
    fs::read_to_string(&pub_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", pub_path.display()))
        .trim()
        .to_string()
}

/// The `SHA256:…` fingerprint of the public key file `pub_path`, as OpenSSH
/// prints it (and as error messages about host keys are expected to).
pub fn fingerprint(pub_path: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(pub_path));
    assert_success(&out, "ssh-keygen -lf");
    text(&out.stdout)
        .split_whitespace()
        .find(|word| word.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("no fingerprint in {}", describe(&out)))
        .to_string()
}

// ---------------------------------------------------------------------------
// Daemons
// ---------------------------------------------------------------------------

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`), 0 if unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU seconds a process has used so far, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (in parentheses, may hold spaces).
    let Some(at) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[at + 2..].split(' ').collect();
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// A background server process whose output goes to a log file; killed on drop.
pub struct Daemon {
    what: &'static str,
    child: Child,
    port: u16,
    log: PathBuf,
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
            let mut cmd = prepare(port);
            cmd.stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log handle"))
                .stderr(log_file)
                .process_group(0);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
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

    /// Polls the port until it accepts a connection, the process dies, or the
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
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
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

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real OpenSSH server on loopback: the target behind the bastion.
pub struct Sshd {
    daemon: Daemon,
    dir: PathBuf,
    host_key: PathBuf,
}

impl Sshd {
    /// Starts sshd with its files (host key, authorized_keys, config, log) in
    /// `dir`, letting in any of `authorized_keys`.
    pub fn start(dir: &Path, authorized_keys: &[String]) -> Sshd {
        Sshd::start_with(dir, authorized_keys, "")
    }

    /// Like [`Sshd::start`], with `extra_config` placed before the defaults:
    /// sshd keeps the first value it reads for a keyword, so this overrides them.
    pub fn start_with(dir: &Path, authorized_keys: &[String], extra_config: &str) -> Sshd {
        fs::create_dir_all(dir).expect("create sshd dir");
        // Privilege separation directory; sshd refuses to start without it.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let host_key = dir.join("host_key");
        keygen(&host_key, "portcullis-test-target");
        let authorized = dir.join("authorized_keys");
        let mut keys = authorized_keys.join("\n");
        keys.push('\n');
        fs::write(&authorized, keys).expect("write authorized_keys");
        let config = dir.join("sshd_config");
        let daemon = Daemon::start("sshd", &dir.join("sshd.log"), |port| {
            fs::write(
                &config,
                sshd_config(port, &host_key, &authorized, extra_config),
            )
            .expect("write sshd_config");
            let mut cmd = Command::new("/usr/sbin/sshd");
            cmd.args(["-D", "-e", "-f"]).arg(&config);
            cmd
        });
        Sshd {
            daemon,
            dir: dir.to_path_buf(),
            host_key,
        }
    }

    pub fn port(&self) -> u16 {
        self.daemon.port()
    }

    /// `127.0.0.1:PORT`, as a target address in policies.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The host public key line (`ssh-ed25519 AAAA… comment`).
    pub fn host_public_key(&self) -> String {
        public_key_of(&self.host_key)
    }

    /// Path of the host public key file.
    pub fn host_public_key_path(&self) -> PathBuf {
        self.host_key.with_extension("pub")
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Process id of the listening sshd; it leads its process group, which also
    /// holds the per-connection sshd processes.
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lets `key` in too (sshd reads authorized_keys at every login).
    pub fn authorize_key(&self, key: &str) {
        let path = self.dir.join("authorized_keys");
        let mut keys = fs::read_to_string(&path).expect("read authorized_keys");
        keys.push_str(key.trim());
        keys.push('\n');
        fs::write(&path, keys).expect("write authorized_keys");
    }
}

/// The sshd configuration for tests: loopback only, public keys only, our own
/// files only, verbose logging to stderr.
fn sshd_config(port: u16, host_key: &Path, authorized_keys: &Path, extra: &str) -> String {
    format!(
        "{extra}
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
AcceptEnv LANG LC_* TZ
AllowTcpForwarding yes
LogLevel VERBOSE
{concurrency}",
        host_key = host_key.display(),
        authorized_keys = authorized_keys.display(),
        // Concurrency tests open dozens of connections at once; the defaults
        // (MaxStartups 10:30:100) would drop some of them at random. Unlike most
        // keywords, sshd keeps the *last* MaxStartups it reads, so an `extra` that
        // sets it (the door benchmark's stock sshd) must not be followed by this.
        concurrency = if extra.contains("MaxStartups") {
            ""
        } else {
            "MaxStartups 200\nMaxSessions 100\n"
        },
    )
}

/// Public keys printed by `portcullis keys`.
#[derive(Debug, Clone)]
pub struct BastionKeys {
    /// Presented to engineers.
    pub host: String,
    /// Used towards targets; goes into their authorized_keys.
    pub upstream: String,
    /// Signs user certificates; targets may trust it with TrustedUserCAKeys.
    pub ca: String,
}

/// A russh client handler that accepts any host key: for tests and benchmarks that
/// drive the bastion through russh on loopback, against servers they started.
pub struct AnyHostKey;

impl russh::client::Handler for AnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// The portcullis binary under test, running `serve`.
pub struct Bastion {
    daemon: Daemon,
    dir: PathBuf,
}

impl Bastion {
    /// Path of the binary Cargo built for this test run.
    pub fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_portcullis")
    }

    /// Path of the config file in `dir`.
    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("portcullis.toml")
    }

    /// Writes `DIR/portcullis.toml` listening on `port`, with relative data and
    /// policies directories (which the bastion resolves against the config's
    /// directory).
    pub fn write_config(dir: &Path, port: u16) -> PathBuf {
        let path = Bastion::config_path(dir);
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n\
             data_dir = \"data\"\n\
             policies = \"policies\"\n\
             log_format = \"text\"\n"
        );
        let mut extra = fs::read_to_string(dir.join(EXTRA_CONFIG)).unwrap_or_default();
        if !extra.contains("[limits]") {
            // Tests fail authentications on purpose, and the harness probes the
            // port with bare TCP connects: keep 127.0.0.1 from being locked out as
            // a whole. Tests of the limits set their own.
            extra.push_str("\n[limits]\npenalty_exempt = [\"127.0.0.1\"]\n");
        }
        fs::write(&path, config + &extra).expect("write portcullis.toml");
        path
    }

    /// Runs `portcullis keys`, which creates missing keys and prints
    /// `ROLE<TAB>PATH<TAB>PUBLIC KEY` lines; the harness needs the upstream key
    /// before the target sshd starts.
    pub fn keys(dir: &Path) -> BastionKeys {
        let config = Bastion::config_path(dir);
        if !config.exists() {
            Bastion::write_config(dir, free_port());
        }
        let out = run(Command::new(Bastion::binary())
            .arg("keys")
            .arg("--config")
            .arg(&config));
        assert_success(&out, "portcullis keys");
        let stdout = text(&out.stdout);
        let key = |role: &str| {
            stdout
                .lines()
                .filter_map(|line| {
                    let mut fields = line.splitn(3, '\t');
                    match (fields.next(), fields.next(), fields.next()) {
                        (Some(r), Some(_path), Some(key)) if r == role => {
                            Some(key.trim().to_string())
                        }
                        _ => None,
                    }
                })
                .next()
                .unwrap_or_else(|| panic!("portcullis keys printed no {role} key:\n{stdout}"))
        };
        BastionKeys {
            host: key("host"),
            upstream: key("upstream"),
            ca: key("ca"),
        }
    }

    /// Starts `portcullis serve` for the config in `dir` (rewritten with a
    /// fresh port) and waits until it accepts TCP connections.
    pub fn start(dir: &Path) -> Bastion {
        let daemon = Daemon::start("portcullis", &dir.join("bastion.log"), |port| {
            let config = Bastion::write_config(dir, port);
            let mut cmd = Command::new(Bastion::binary());
            cmd.arg("serve").arg("--config").arg(config);
            // The log is a file read by people on failure: no colour codes.
            cmd.env("NO_COLOR", "1");
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info,portcullis=debug");
            }
            cmd
        });
        Bastion {
            daemon,
            dir: dir.to_path_buf(),
        }
    }

    pub fn port(&self) -> u16 {
        self.daemon.port()
    }

    /// The bastion's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    /// Waits up to `timeout` for the bastion to exit and returns how it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.daemon.child.try_wait().expect("poll bastion");
            status.is_some()
        });
        status
    }

    /// A stand-in while the real bastion restarts: a process that is already gone.
    fn placeholder(dir: &Path) -> Bastion {
        let child = Command::new("true").spawn().expect("spawn true");
        Bastion {
            daemon: Daemon {
                what: "placeholder",
                child,
                port: 0,
                log: dir.join("bastion.log"),
            },
            dir: dir.to_path_buf(),
        }
    }

    /// Everything the bastion logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn policies_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// Whether the bastion process is still running (it must survive bad clients).
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }
}

// ---------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------

/// What the test policies say; [`Policies::write`] turns it into TOML files.
///
/// Users: `alice` (engineers), `bob` and `carol` (sre-leads, approvers), `dave`
/// (engineers and auditors). Targets, all the same sshd under different labels:
///
/// | target | flow | rules |
/// |---|---|---|
/// | `local` | staging | auto-approve, shells |
/// | `prod` | production | 1 approval by sre-leads, shells, max_ttl 1h |
/// | `crit` | critical | 2 approvals by sre-leads, shells |
/// | `cmds` | restricted | 1 approval, commands `id`, `uname *`, `sleep *` only |
/// | `secure` | secure | auto-approve, shells, TOTP step-up |
/// | `vault` | vault | 1 approval, shells, TOTP step-up (for approvers too) |
/// | `certs` | production | (optional second sshd) certificate mode |
#[derive(Debug, Clone)]
pub struct Policies {
    /// (name, public key, groups) of every user.
    pub users: Vec<(String, String, Vec<String>)>,
    /// Address and host key of the certificate-only sshd, if any.
    pub cert_target: Option<(String, String)>,
    /// `host:port` of the target sshd.
    pub target_address: String,
    /// Host key pinned for the target.
    pub target_host_key: String,
    /// Allowed logins on the target, default first.
    pub logins: Vec<String>,
}

/// The flows of the test policies (see [`Policies`]).
const FLOWS: &str = r#"
[[flows]]
name = "staging"
match = { env = "staging" }
requesters = ["group:engineers"]
auto_approve = true
shell = true
max_ttl = "8h"

[[flows]]
name = "production"
match = { env = "production" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
max_ttl = "1h"
shell = true

[[flows]]
name = "critical"
match = { env = "critical" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
approvals = 2
max_ttl = "1h"
shell = true

[[flows]]
name = "secure"
match = { env = "secure" }
requesters = ["group:engineers"]
auto_approve = true
shell = true
step_up = "totp"

[[flows]]
name = "vault"
match = { env = "vault" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
shell = true
step_up = "totp"

[[flows]]
name = "restricted"
match = { env = "restricted" }
requesters = ["group:engineers"]
approvers = ["group:sre-leads"]
max_ttl = "1h"
commands = ["id", "uname *", "sleep *"]
"#;

impl Policies {
    /// Writes users.toml, targets.toml and flows.toml into `dir`.
    pub fn write(&self, dir: &Path) {
        fs::create_dir_all(dir).expect("create policies dir");
        let mut users = String::new();
        for (name, key, groups) in &self.users {
            let groups: Vec<String> = groups.iter().map(|g| toml_str(g)).collect();
            users.push_str(&format!(
                "[users.{name}]\nkeys = [{}]\ngroups = [{}]\n",
                toml_str(key),
                groups.join(", ")
            ));
        }
        let logins: Vec<String> = self.logins.iter().map(|l| toml_str(l)).collect();
        let mut targets = String::new();
        for (name, env) in [
            (TARGET, "staging"),
            ("prod", "production"),
            ("crit", "critical"),
            ("cmds", "restricted"),
            ("secure", "secure"),
            ("vault", "vault"),
        ] {
            targets.push_str(&format!(
                "[targets.{name}]\naddress = {}\nhost_key = {}\nlogins = [{}]\nlabels = {{ env = \"{env}\" }}\n",
                toml_str(&self.target_address),
                toml_str(&self.target_host_key),
                logins.join(", ")
            ));
        }
        if let Some((address, host_key)) = &self.cert_target {
            targets.push_str(&format!(
                "[targets.certs]\naddress = {}\nhost_key = {}\nlogins = [{}]\nlabels = {{ env = \"production\" }}\nauth = \"certificate\"\n",
                toml_str(address),
                toml_str(host_key),
                logins.join(", ")
            ));
        }
        fs::write(dir.join("users.toml"), users).expect("write users.toml");
        fs::write(dir.join("targets.toml"), targets).expect("write targets.toml");
        fs::write(dir.join("flows.toml"), FLOWS).expect("write flows.toml");
    }
}

/// The allowed logins on the test target: the current user first (the only
/// one sshd can really log in as), then `nobody` so lists have two entries.
pub fn default_logins() -> Vec<String> {
    let mut logins = vec![login_user().to_string()];
    if login_user() != "nobody" {
        logins.push("nobody".to_string());
    }
    logins
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// The OpenSSH client tools of one engineer (one key) pointed at one port.
#[derive(Debug, Clone)]
pub struct Client {
    key: PathBuf,
    port: u16,
    /// Answers keyboard-interactive prompts (TOTP) with this program instead of
    /// refusing them (`BatchMode`).
    askpass: Option<PathBuf>,
}

impl Client {
    pub fn new(key: &Path, port: u16) -> Client {
        Client {
            key: key.to_path_buf(),
            port,
            askpass: None,
        }
    }

    /// The same engineer, answering the TOTP prompt with `program` through
    /// `SSH_ASKPASS` (one attempt per connection).
    pub fn with_askpass(&self, program: &Path) -> Client {
        Client {
            askpass: Some(program.to_path_buf()),
            ..self.clone()
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn key(&self) -> &Path {
        &self.key
    }

    /// Options shared by ssh, scp and sftp: no user config, no known_hosts, only
    /// this key, never prompt, only errors on stderr. (The port flag differs
    /// between tools, so it is not included.)
    pub fn options(&self) -> Vec<String> {
        let mut opts: Vec<String> = [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            if self.askpass.is_some() {
                "NumberOfPasswordPrompts=1"
            } else {
                "BatchMode=yes"
            },
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        opts.push(self.key.display().to_string());
        opts
    }

    /// `ssh OPTIONS -p PORT FLAGS -l USER 127.0.0.1 COMMAND...`, not yet run.
    pub fn ssh_command(&self, user: &str, flags: &[&str], command: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        if let Some(askpass) = &self.askpass {
            cmd.env("SSH_ASKPASS", askpass)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0");
        }
        cmd.args(self.options())
            .args(["-p", &self.port.to_string()])
            .args(flags)
            .args(["-l", user, "127.0.0.1"])
            .args(command);
        cmd
    }

    /// The same command line as [`Client::ssh_command`], as one shell string
    /// (for tmux).
    pub fn ssh_shell_line(&self, user: &str, flags: &[&str], command: &[&str]) -> String {
        let cmd = self.ssh_command(user, flags, command);
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|arg| shell_quote(&arg.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs a remote command as `user` (e.g. `root@local`).
    pub fn ssh(&self, user: &str, command: &[&str]) -> Output {
        run(&mut self.ssh_command(user, &[], command))
    }

    /// Like [`Client::ssh`] with extra ssh flags (before the destination).
    pub fn ssh_with(&self, user: &str, flags: &[&str], command: &[&str]) -> Output {
        run(&mut self.ssh_command(user, flags, command))
    }

    /// Like [`Client::ssh`], feeding `input` on stdin.
    pub fn ssh_stdin(&self, user: &str, command: &[&str], input: Vec<u8>) -> Output {
        run_with_timeout(
            &mut self.ssh_command(user, &[], command),
            Some(input),
            COMMAND_TIMEOUT,
        )
    }

    /// `scp OPTIONS -P PORT FLAGS FROM TO` (sftp protocol unless FLAGS has `-O`).
    pub fn scp(&self, flags: &[&str], from: &str, to: &str) -> Output {
        run(Command::new("scp")
            .args(self.options())
            .args(["-P", &self.port.to_string()])
            .args(flags)
            .args([from, to]))
    }

    /// `sftp OPTIONS -P PORT -b BATCH USER@127.0.0.1`; sftp exits non-zero when
    /// any batch command fails.
    pub fn sftp_batch(&self, user: &str, batch: &Path) -> Output {
        run(Command::new("sftp")
            .args(self.options())
            .args(["-P", &self.port.to_string(), "-b"])
            .arg(batch)
            .arg(format!("{user}@127.0.0.1")))
    }

    /// `rsync -a -e 'ssh OPTIONS -p PORT' FROM TO`.
    pub fn rsync(&self, from: &str, to: &str) -> Output {
        let mut ssh = vec!["ssh".to_string()];
        ssh.extend(self.options().iter().map(|o| shell_quote(o)));
        ssh.extend(["-p".to_string(), self.port.to_string()]);
        run(Command::new("rsync").args(["-a", "-e", &ssh.join(" "), from, to]))
    }
    /// Starts `ssh -M -N` as a ControlMaster on `control_path` in the
    /// background (output to `log`) and waits until it accepts multiplexed
    /// sessions. Running it in the foreground, rather than with `-f`, keeps it
    /// our child so it is always reaped.
    pub fn control_master(&self, user: &str, control_path: &Path, log: &Path) -> Background {
        let path_opt = format!("ControlPath={}", control_path.display());
        let master = Background::spawn(
            self.ssh_command(
                user,
                &["-M", "-N", "-o", &path_opt, "-o", "ControlPersist=no"],
                &[],
            ),
            log,
        );
        let ready = wait_until(STARTUP_TIMEOUT, || {
            self.mux_control(user, control_path, "check")
                .status
                .success()
        });
        assert!(
            ready,
            "ControlMaster never became ready:\n{}",
            master.output()
        );
        master
    }

    /// `ssh -O OPERATION` (check, exit, …) against the master on `control_path`.
    pub fn mux_control(&self, user: &str, control_path: &Path, operation: &str) -> Output {
        let path_opt = format!("ControlPath={}", control_path.display());
        run(&mut self.ssh_command(user, &["-o", &path_opt, "-O", operation], &[]))
    }
}

/// Words quoted for a POSIX shell and joined into one command line.
pub fn quote_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `USER@127.0.0.1:PATH`, the remote-path syntax of scp and rsync (OpenSSH
/// splits the host at the last `@`, so USER may be `root@local`).
pub fn remote_path(user: &str, path: &Path) -> String {
    format!("{user}@127.0.0.1:{}", path.display())
}

// ---------------------------------------------------------------------------
// A whole world: target sshd + bastion + engineers
// ---------------------------------------------------------------------------

/// Choices for [`World::start_with`].
#[derive(Debug, Clone, Default)]
pub struct WorldOptions {
    /// Pin this host key for the target instead of the real one (to test a
    /// changed host key).
    pub pinned_host_key: Option<String>,
    /// Extra lines for portcullis.toml (e.g. a `[notify]` table).
    pub extra_config: String,
    /// Also start a second sshd that trusts only the bastion's CA (no
    /// authorized_keys at all), as target `certs` with `auth = "certificate"`.
    pub certificate_target: bool,
    /// Extra lines for the target sshd's config (e.g. `ChannelTimeout`).
    pub sshd_config: String,
}

/// One test's universe: a temp dir, a target sshd that trusts only the
/// bastion's upstream key, a bastion whose policies know `alice` and the
/// target `local`, and clients for `alice` (known) and `mallory` (unknown).
///
/// Fields drop in order: the bastion, then sshd, then the directory.
pub struct World {
    pub bastion: Bastion,
    pub sshd: Sshd,
    /// The certificate-only target, when asked for.
    pub cert_sshd: Option<Sshd>,
    /// Engineer (group engineers).
    pub alice: Client,
    /// Approver (group sre-leads).
    pub bob: Client,
    /// Approver (group sre-leads).
    pub carol: Client,
    /// Engineer and auditor.
    pub dave: Client,
    /// A key the bastion has never heard of.
    pub mallory: Client,
    pub keys: BastionKeys,
    pub dir: TempDir,
}

impl World {
    /// A world with default options.
    pub fn start() -> World {
        World::start_with(WorldOptions::default())
    }

    pub fn start_with(options: WorldOptions) -> World {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-test-")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path();
        let mut users = Vec::new();
        for (name, groups) in [
            (USER, vec![GROUP]),
            ("bob", vec!["sre-leads"]),
            ("carol", vec!["sre-leads"]),
            ("dave", vec![GROUP, "auditors"]),
        ] {
            let public = keygen(&root.join(name), name);
            let groups = groups.iter().map(|g| g.to_string()).collect();
            users.push((name.to_string(), public, groups));
        }
        let mallory_key = root.join("mallory");
        keygen(&mallory_key, "mallory");
        fs::write(root.join(EXTRA_CONFIG), &options.extra_config).expect("write extra config");

        let keys = Bastion::keys(root);
        let ca_pub = root.join("data").join("ca_ed25519.pub");
        // Trusting the bastion's CA as well lets certificate mode work against
        // the same target once it exists.
        let mut extra = if ca_pub.exists() {
            format!("TrustedUserCAKeys {}\n", ca_pub.display())
        } else {
            String::new()
        };
        extra.push_str(&options.sshd_config);
        let sshd = Sshd::start_with(
            &root.join("sshd"),
            std::slice::from_ref(&keys.upstream),
            &extra,
        );
        let cert_sshd = options
            .certificate_target
            .then(|| Sshd::start_with(&root.join("sshd-certs"), &[], &extra));

        Policies {
            users,
            cert_target: cert_sshd
                .as_ref()
                .map(|c| (c.address(), c.host_public_key())),
            target_address: sshd.address(),
            target_host_key: options
                .pinned_host_key
                .clone()
                .unwrap_or_else(|| sshd.host_public_key()),
            logins: default_logins(),
        }
        .write(&root.join("policies"));
        let bastion = Bastion::start(root);
        let port = bastion.port();
        let client = |name: &str| Client::new(&root.join(name), port);
        World {
            cert_sshd,
            alice: client(USER),
            bob: client("bob"),
            carol: client("carol"),
            dave: client("dave"),
            mallory: client("mallory"),
            bastion,
            sshd,
            keys,
            dir,
        }
    }

    /// Kills the bastion (SIGKILL, like a crash) and starts it again on the same data
    /// directory; clients follow it to its new port.
    pub fn restart_bastion(&mut self) {
        self.restart_bastion_after(false, |_| {});
    }

    /// Stops the bastion (SIGTERM and a wait when `graceful`, SIGKILL otherwise), runs
    /// `between` with the data directory (the database is unlocked then), and starts
    /// it again; clients follow it to its new port.
    pub fn restart_bastion_after(&mut self, graceful: bool, between: impl FnOnce(&Path)) {
        let root = self.dir.path().to_path_buf();
        let mut old = std::mem::replace(&mut self.bastion, Bastion::placeholder(&root));
        if graceful {
            let _ = Command::new("kill")
                .args(["-TERM", &old.pid().to_string()])
                .status();
            let stopped = wait_until(STARTUP_TIMEOUT, || !old.is_running());
            assert!(
                stopped,
                "the bastion did not stop on SIGTERM:\n{}",
                old.log()
            );
        }
        drop(old);
        between(&root.join("data"));
        self.bastion = Bastion::start(&root);
        let port = self.bastion.port();
        for client in [
            &mut self.alice,
            &mut self.bob,
            &mut self.carol,
            &mut self.dave,
            &mut self.mallory,
        ] {
            client.port = port;
        }
    }

    /// Rewrites one policy file with `edit`, sends the bastion SIGHUP and waits
    /// until it logged that the policy was reloaded.
    pub fn edit_policy(&self, file: &str, edit: impl FnOnce(String) -> String) {
        let path = self.bastion.policies_dir().join(file);
        let before = fs::read_to_string(&path).expect("read policy file");
        fs::write(&path, edit(before)).expect("write policy file");
        let reloads = || self.bastion.log().matches("policy reloaded").count();
        let seen = reloads();
        let sent = Command::new("kill")
            .args(["-HUP", &self.bastion.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(sent.success());
        assert!(
            wait_until(STARTUP_TIMEOUT, || reloads() > seen),
            "the bastion did not reload {file}:\n{}",
            self.logs()
        );
    }

    /// Runs a control-plane command as `client` that must succeed; returns stdout.
    pub fn ok(&self, client: &Client, command: &[&str]) -> String {
        let out = self.control_as(client, command);
        assert!(
            out.status.success(),
            "{command:?} failed: {}\n{}",
            describe(&out),
            self.logs()
        );
        text(&out.stdout)
    }

    /// The kinds of all audit events, in order, as the auditor dave sees them.
    pub fn audit_kinds(&self) -> Vec<String> {
        self.ok(&self.dave, &["audit", "--json"])
            .lines()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                event["kind"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }

    /// Runs a control-plane command as `client`. The words are quoted into one
    /// command line, as a user types `ssh portcullis@bastion "request db --reason 'a b'"`
    /// (ssh joins separate arguments with bare spaces).
    pub fn control_as(&self, client: &Client, command: &[&str]) -> Output {
        client.ssh(CONTROL_USER, &[&quote_words(command)])
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `LOGIN@local` with the current user as the login.
    pub fn target_user(&self) -> String {
        format!("{}@{TARGET}", login_user())
    }

    /// Runs a control-plane command as alice.
    pub fn control(&self, command: &[&str]) -> Output {
        self.alice.ssh(CONTROL_USER, command)
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- bastion log ({}) ---\n{}\n--- sshd log ---\n{}",
            self.dir.path().display(),
            truncate_tail(&self.bastion.log(), 20_000),
            truncate_tail(&self.sshd.log(), 10_000)
        )
    }
}

impl Drop for World {
    /// On a failing test, show what the daemons said: it is usually the answer.
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The last `max` bytes of `s`, where the interesting part of a log usually is.
fn truncate_tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[… {start} bytes]\n{}", &s[start..])
}

/// A long-running client process (e.g. a ControlMaster) whose output goes to
/// a file; killed on drop unless it has already exited.
pub struct Background {
    child: Child,
    log: PathBuf,
}

impl Background {
    pub fn spawn(mut cmd: Command, log: &Path) -> Background {
        let file = File::create(log).expect("create background log");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Background {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Waits up to `timeout` for the process to exit; returns whether it did
    /// and with which status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().expect("poll background process");
            status.is_some()
        });
        status
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

// ---------------------------------------------------------------------------
// Terminals
// ---------------------------------------------------------------------------

/// A private tmux server, giving a command a real terminal whose size the test
/// controls. Killed on drop.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts a detached `cols`×`rows` session running `shell_line`. The pane
    /// stays open after the command ends so its screen can still be captured.
    pub fn start(dir: &Path, cols: u16, rows: u16, shell_line: &str) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let keep_open = format!("{shell_line}; echo \"[exited $?]\"; sleep 60");
        let out = run(tmux
            .command()
            .args([
                "new-session",
                "-d",
                "-x",
                &cols.to_string(),
                "-y",
                &rows.to_string(),
            ])
            .arg(keep_open));
        assert_success(&out, "tmux new-session");
        tmux
    }

    /// `tmux -S SOCKET -f /dev/null`, so no user configuration interferes.
    fn command(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket).args(["-f", "/dev/null"]);
        cmd
    }

    /// Resizes the window, as a user resizing their terminal would.
    pub fn resize(&self, cols: u16, rows: u16) {
        let out = run(self.command().args([
            "resize-window",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]));
        assert_success(&out, "tmux resize-window");
    }

    /// Types `keys` (tmux key names such as `Enter` or `C-c`, or literal text with
    /// `literal`).
    pub fn send(&self, keys: &str, literal: bool) {
        let mut cmd = self.command();
        cmd.args(["send-keys", "-t", "0"]);
        if literal {
            cmd.arg("-l");
        }
        let out = run(cmd.arg(keys));
        assert_success(&out, "tmux send-keys");
    }

    /// Waits until the screen shows `needle`; returns whether it did.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.screen().contains(needle))
    }

    /// The visible text of the pane, for failure messages.
    pub fn screen(&self) -> String {
        let out = run(self.command().args(["capture-pane", "-p"]));
        text(&out.stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
