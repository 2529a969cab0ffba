//! A real PostgreSQL server (Debian's `postgresql` package) for the tests of the
//! PostgreSQL backend: one server per test binary, started at first use on a
//! free loopback port with a temporary data directory, and a fresh database for
//! every test.
//!
//! PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user the package creates (or `nobody`), through `setpriv`. The
//! server lives in a static and so is never dropped: it is started under a
//! small shell that waits on a pipe from this process and stops the server and
//! removes its directory when the pipe closes, which is when the test binary
//! exits, however it exits.

use std::os::unix::fs::PermissionsExt;
use std::process::ChildStdin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;

/// The superuser the tests connect as.
const ROLE: &str = "portcullis";

/// The shared server of this test binary.
pub struct Postgres {
    port: u16,
    dir: PathBuf,
    /// The password of [`ROLE`], in a file (as `password_file` reads it).
    password_file: PathBuf,
    /// The certificate authority that signed the server's certificate.
    ca_file: PathBuf,
    /// The shell that runs the server, and its stdin: closing that (at exit)
    /// stops the server.
    _shell: Mutex<(Child, ChildStdin)>,
}

/// The tests' server, started on first use, with `fsync` off: many tests
/// share it, and none of them tests what reaches the disk.
pub fn postgres() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(|| Postgres::start(&["fsync=off"]))
}

/// The benchmarks' server, started on first use, with `fsync` on, as a
/// production server runs (sled, on the other routes, syncs its writes too),
/// and the settings in `BENCH_PG_SETTINGS` (`name=value` words, each passed
/// as `-c`, e.g. `fsync=off`, as benchmarks before 2026-11-28 ran).
pub fn bench_postgres() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(|| {
        let extra = std::env::var("BENCH_PG_SETTINGS").unwrap_or_default();
        let settings: Vec<&str> = std::iter::once("fsync=on")
            .chain(extra.split_whitespace())
            .collect();
        Postgres::start(&settings)
    })
}

/// The directory of the newest PostgreSQL's programs.
pub fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs Debian's postgresql)")
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|bin| {
        let version = bin.parent().and_then(Path::file_name);
        version.and_then(|v| v.to_str()?.parse::<u32>().ok())
    });
    versions.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
}

/// The account the server runs as: this one, or an unprivileged one as root.
fn server_user() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let exists = |user: &str| run(Command::new("id").arg("-u").arg(user)).status.success();
    Some(if exists("postgres") {
        "postgres"
    } else {
        "nobody"
    })
}

/// `program` run as the server's account.
fn as_server(program: &Path) -> Command {
    match server_user() {
        Some(user) => {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid", user, "--regid", user, "--clear-groups", "--"])
                .arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

impl Postgres {
    /// A server with `settings` (`name=value`, each passed as `-c`; a later one
    /// wins), then the TLS settings every test server has.
    fn start(settings: &[&str]) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()
            .expect("create PostgreSQL temp dir")
            .keep();
        let password_file = dir.join("password");
        fs::write(&password_file, "test-password\n").expect("write password file");
        // The bastion refuses a password file others can read.
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600))
            .expect("chmod the password file");
        let ca_file = certificates(&dir);
        if let Some(user) = server_user() {
            let out = run(Command::new("chown").arg("-R").arg(user).arg(&dir));
            assert_success(&out, "chown the PostgreSQL dir");
        }
        let bin = postgres_bin_dir();
        let data = dir.join("data");
        let out = run(as_server(&bin.join("initdb"))
            .current_dir(&dir)
            .arg("-D")
            .arg(&data)
            .args(["-U", ROLE, "-E", "UTF8", "--no-sync", "--auth-local=trust"])
            .args(["--auth-host=scram-sha-256", "--pwfile"])
            .arg(&password_file));
        assert_success(&out, "initdb");
        let port = free_port();
        let log = dir.join("postgres.log");
        // The shell stops the server when this process's end of its stdin closes.
        let script = format!(
            "\"$@\" >{log} 2>&1 & server=$!; read _; kill -INT $server; wait $server; rm -rf {dir}",
            log = shell_quote(&log.to_string_lossy()),
            dir = shell_quote(&dir.to_string_lossy()),
        );
        let server = as_server(&bin.join("postgres"));
        let mut child = Command::new("sh")
            .current_dir(&dir)
            .arg("-c")
            .arg(script)
            .arg("postgres")
            .arg(server.get_program())
            .args(server.get_args())
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            // Many tests, each with a few pools, run at once.
            .args(["-c", "max_connections=300"])
            .args(settings.iter().flat_map(|setting| ["-c", setting]))
            // TLS for the clients that ask (the others say sslmode=disable).
            .args(["-c", "ssl=on", "-c"])
            .arg(format!(
                "ssl_cert_file={}",
                dir.join("server.pem").display()
            ))
            .arg("-c")
            .arg(format!("ssl_key_file={}", dir.join("server.key").display()))
            .stdin(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let lifeline = child.stdin.take().expect("piped stdin");
        let server = Postgres {
            port,
            dir,
            password_file,
            ca_file,
            _shell: Mutex::new((child, lifeline)),
        };
        // It listens before it has finished starting up: wait for an answer.
        let answers = wait_until(STARTUP_TIMEOUT, || {
            server.psql("postgres", "SELECT 1").status.success()
        });
        assert!(
            answers,
            "postgres did not answer on port {port}:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// CPU seconds the server has used so far: the postmaster, the children it
    /// has reaped, and the ones still running (backends, WAL writer,
    /// checkpointer). Benchmarks put it next to the bastion's own.
    pub fn cpu_seconds(&self) -> f64 {
        let pid_file =
            fs::read_to_string(self.dir.join("data").join("postmaster.pid")).unwrap_or_default();
        let Some(postmaster) = pid_file.lines().next().and_then(|l| l.trim().parse().ok()) else {
            return 0.0;
        };
        let ticks = |fields: &[String], at: std::ops::Range<usize>| -> f64 {
            at.filter_map(|i| fields.get(i)?.parse::<f64>().ok()).sum()
        };
        // Fields after the command: utime 11, stime 12, cutime 13, cstime 14.
        let mut total = ticks(&stat_fields(postmaster), 11..15);
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let fields = stat_fields(pid);
            if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
                total += ticks(&fields, 11..13);
            }
        }
        total / 100.0 // USER_HZ is 100 on Linux
    }

    /// The file that holds the password (for `password_file`).
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// The CA of the server's TLS certificate (for `ca_file`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Creates an empty database and returns its URL (without the password).
    pub fn fresh_database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        format!(
            "postgres://{ROLE}@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    /// Runs `sql` in database `database` (through the local socket) and returns
    /// what psql printed: unaligned, tuples only.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        let out = self.psql(database, sql);
        assert_success(&out, &format!("psql: {sql}"));
        text(&out.stdout).trim().to_string()
    }

    fn psql(&self, database: &str, sql: &str) -> Output {
        run(Command::new(postgres_bin_dir().join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", ROLE])
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-d", database, "-c", sql]))
    }

    /// The `[store]` section of a bastion on database `url`.
    pub fn store_config(&self, url: &str) -> String {
        format!(
            "\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\npassword_file = \"{}\"\npool_size = 4\n",
            self.password_file.display()
        )
    }
}

/// A test CA and a certificate it signs for 127.0.0.1 and localhost, made
/// with the `openssl` command in `dir` (`server.pem`, `server.key`); returns
/// the CA's file.
fn certificates(dir: &Path) -> PathBuf {
    let openssl = |args: &str| {
        let out = run(Command::new("openssl")
            .current_dir(dir)
            .args(args.split_whitespace()));
        assert_success(&out, &format!("openssl {args}"));
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(&format!(
        "req -x509 {key} -days 2 -subj /CN=portcullis-test-ca -keyout ca.key -out ca.pem"
    ));
    openssl(&format!(
        "req {key} -subj /CN=127.0.0.1 -keyout server.key -out server.csr"
    ));
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write server.ext");
    openssl("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.pem");
    // PostgreSQL refuses a key file others can read.
    fs::set_permissions(dir.join("server.key"), fs::Permissions::from_mode(0o600))
        .expect("chmod server.key");
    dir.join("ca.pem")
}

/// The store a benchmark runs on, from `BENCH_STORE`: `sled` (the default: no
/// extra config) or `postgres`. Returns the config lines and the backend's name.
/// PostgreSQL is [`bench_postgres`].
pub fn bench_store() -> (String, &'static str) {
    store_chosen_by("BENCH_STORE", bench_postgres)
}

/// The `[store]` lines for the backend the environment variable `var` names:
/// `sled` (or unset: none) or `postgres` (a fresh database on `server`, with
/// the default pool). Also the backend's name.
pub fn store_chosen_by(var: &str, server: fn() -> &'static Postgres) -> (String, &'static str) {
    match std::env::var(var).as_deref() {
        Err(_) | Ok("sled") => (String::new(), "sled"),
        Ok("postgres") => {
            let server = server();
            let url = server.fresh_database();
            let config = format!(
                "\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\npassword_file = \"{}\"\n",
                server.password_file().display()
            );
            (config, "postgres")
        }
        Ok(other) => panic!("{var}={other:?}: use sled or postgres"),
    }
}

/// The database name of a URL from [`Postgres::fresh_database`].
pub fn database_of(url: &str) -> &str {
    let path = url.rsplit('/').next().expect("a URL with a path");
    path.split('?').next().expect("a database name")
}
