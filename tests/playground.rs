//! The container playground (`deploy/compose.yaml`), played without a container
//! engine.
//!
//! CI has no Docker engine, so this test takes compose's part: each service runs
//! its image's command with its image's paths and user, in a bubblewrap sandbox
//! over the host's `/usr` and `/etc`, with the same bind mounts and volumes as in
//! the compose file. The bastion and each target get a network namespace of their
//! own, joined by veth links, and the bastion finds the targets by their service
//! names, as on compose's network. Then the README's walkthrough runs word for
//! word. What this cannot check is the Dockerfiles' build steps.

pub mod common;

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{
    assert_failure_mentions, assert_success, describe, run, text, wait_until, Bastion, Client,
};
use serde_json::Value;

/// The user the Dockerfile creates for the bastion (`useradd --uid 10022`).
const BASTION_UID: &str = "10022";

/// The playground's targets (compose services), in the order of their links.
const TARGETS: [&str; 2] = ["staging", "production"];

/// The owner of the checkout that compose bind-mounts (a user, not root).
const CHECKOUT_OWNER: &str = "1000:1000";

/// Where the playground publishes the bastion and its metrics.
const SSH_PORT: u16 = 2222;
const METRICS_PORT: u16 = 9922;

#[test]
fn the_readme_walkthrough_works_on_the_playground() {
    let playground = Playground::up();
    let alice = playground.user("alice");
    let bob = playground.user("bob");

    // The demo keys belong to the checkout's owner, private, and git ignores them.
    for key in ["alice", "bob"] {
        let path = playground.path("playground/keys").join(key);
        let meta = fs::metadata(&path).expect("demo key");
        assert_eq!(
            format!("{}:{}", meta.uid(), meta.gid()),
            CHECKOUT_OWNER,
            "{}",
            path.display()
        );
        assert_eq!(meta.mode() & 0o777, 0o600, "{}", path.display());
    }
    let ignored = run(Command::new("git").arg("-C").arg(repository()).args([
        "check-ignore",
        "-q",
        "deploy/playground/keys/alice",
    ]));
    // 1: not ignored (128: not a git checkout, nothing to say).
    assert_ne!(
        ignored.status.code(),
        Some(1),
        "deploy/playground/keys is not git-ignored"
    );

    says(&alice.ok("root@staging", "uptime"), "load average"); // auto-approved

    let out = alice.ssh("root@production", "uptime");
    assert_failure_mentions(&out, "production before approval", &["no active grant"]);

    alice.ok(
        "portcullis",
        "request production --command uptime --reason 'demo'",
    );
    says(&bob.ok("portcullis", "requests --pending"), "production");
    let pending: Value = serde_json::from_str(&text(
        &bob.ok("portcullis", "requests --pending --json").stdout,
    ))
    .expect("requests --json");
    let id = pending[0]["id"].as_str().expect("a pending request id");
    bob.ok("portcullis", &format!("approve {id}"));

    // Approved, and reached with a per-session certificate.
    says(&alice.ok("root@production", "uptime"), "load average");

    let sessions = bob.ok("portcullis", "sessions");
    for target in TARGETS {
        says(&sessions, target);
    }

    let health = playground.in_bastion_network(&format!(
        "exec 3<>/dev/tcp/127.0.0.1/{METRICS_PORT}; printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    ));
    says(&health, "200");
}

fn says(out: &Output, needle: &str) {
    assert!(
        text(&out.stdout).contains(needle),
        "expected {needle:?} in the output\n{}",
        describe(out)
    );
}

/// The running playground: its namespaces, services and files. Everything is
/// torn down on drop.
struct Playground {
    // Services before the network: a namespace is removed after its processes.
    services: Vec<Service>,
    network: Network,
    dir: tempfile::TempDir,
}

impl Playground {
    /// `docker compose up`: the setup service to completion, then the targets,
    /// then the bastion once its targets listen.
    fn up() -> Playground {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path();
        let playground = root.join("playground"); // compose mounts it from the checkout
        copy_dir(&repository().join("deploy/playground"), &playground);
        // A checkout belongs to a user, not to root: the demo keys must be theirs.
        let chown = run(Command::new("chown")
            .args(["-R", CHECKOUT_OWNER])
            .arg(&playground));
        assert_success(&chown, "chown the playground checkout");
        for volume in ["data", "shared"] {
            fs::create_dir(root.join(volume)).expect("volume directory");
        }
        // As the image creates its data dir (install -d -m 0700), which a fresh
        // named volume copies.
        fs::set_permissions(root.join("data"), fs::Permissions::from_mode(0o700))
            .expect("chmod the data volume");
        let network = Network::new();
        let mut this = Playground {
            services: Vec::new(),
            network,
            dir,
        };
        this.setup();
        for name in TARGETS {
            this.start_target(name);
        }
        this.start_bastion();
        this
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `setup` service: `sh /playground/setup.sh` as root, without a network.
    fn setup(&self) {
        let mut command = Sandbox::new()
            .bind(&self.path("playground"), "/playground")
            .bind(&self.path("data"), "/var/lib/portcullis")
            .bind(&self.path("shared"), "/shared")
            .read_only(Path::new(Bastion::binary()), "/usr/local/bin/portcullis")
            .command(None, &["sh", "/playground/setup.sh"]);
        let out = run(&mut command);
        assert_success(&out, "the setup service");
    }

    /// A target service: the target image's entrypoint with the service name.
    fn start_target(&mut self, name: &str) {
        for dir in ["etc-ssh", "root"] {
            fs::create_dir_all(self.path(name).join(dir)).expect("target directory");
        }
        let entrypoint = repository().join("deploy/playground/target-entrypoint.sh");
        let command = Sandbox::new()
            .read_only(&self.path("shared"), "/shared")
            .bind(&self.path(name).join("etc-ssh"), "/etc/ssh")
            .bind(&self.path(name).join("root"), "/root")
            .read_only(&entrypoint, "/usr/local/bin/target-entrypoint")
            .directory("/run/sshd")
            .command(
                Some(&self.network.namespace(name)),
                &["sh", "/usr/local/bin/target-entrypoint", name],
            );
        let service = Service::start(name, command, &self.path(&format!("{name}.log")));
        self.services.push(service);
        self.wait_listening(name, 22);
    }

    /// The bastion service: `portcullis serve` as the image's user, with the
    /// targets' names resolving to their links.
    fn start_bastion(&mut self) {
        let hosts = self.path("hosts");
        fs::write(&hosts, self.network.hosts()).expect("write hosts");
        let command = Sandbox::new()
            .read_only(
                &self.path("playground/portcullis.toml"),
                "/playground/portcullis.toml",
            )
            .bind(&self.path("data"), "/var/lib/portcullis")
            .read_only(Path::new(Bastion::binary()), "/usr/local/bin/portcullis")
            .read_only(&hosts, "/etc/hosts")
            .command(
                Some(&self.network.namespace("bastion")),
                &[
                    "setpriv",
                    &format!("--reuid={BASTION_UID}"),
                    &format!("--regid={BASTION_UID}"),
                    "--clear-groups",
                    "portcullis",
                    "serve",
                    "--config",
                    "/playground/portcullis.toml",
                ],
            );
        let service = Service::start("bastion", command, &self.path("bastion.log"));
        self.services.push(service);
        self.wait_listening("bastion", SSH_PORT);
    }

    /// Waits until something accepts TCP connections on `port` in `host`'s
    /// namespace; panics with the service logs otherwise.
    fn wait_listening(&self, host: &str, port: u16) {
        let namespace = self.network.namespace(host);
        let listening = wait_until(Duration::from_secs(15), || {
            Command::new("ip")
                .args(["netns", "exec", &namespace, "ss", "-Hltn"])
                .arg(format!("sport = :{port}"))
                .output()
                .is_ok_and(|out| !out.stdout.is_empty())
        });
        assert!(
            listening,
            "{host} never listened on {port}\n{}",
            self.logs()
        );
    }

    /// A demo user with the key the setup service made, connecting from the
    /// bastion's network (as `localhost` does on a compose host).
    fn user(&self, name: &str) -> User {
        User {
            client: Client::new(&self.path("playground/keys").join(name), SSH_PORT),
            namespace: self.network.namespace("bastion"),
            logs: self.logs_paths(),
        }
    }

    /// Runs a bash line in the bastion's network namespace.
    fn in_bastion_network(&self, line: &str) -> Output {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.network.namespace("bastion"),
            "bash",
            "-c",
            line,
        ]))
    }

    fn logs_paths(&self) -> Vec<PathBuf> {
        self.services.iter().map(|s| s.log.clone()).collect()
    }

    fn logs(&self) -> String {
        service_logs(&self.logs_paths())
    }
}

fn service_logs(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|path| {
            let log = fs::read_to_string(path).unwrap_or_default();
            format!("--- {} ---\n{log}", path.display())
        })
        .collect()
}

/// A demo user's `ssh`, as the README types it.
struct User {
    client: Client,
    namespace: String,
    logs: Vec<PathBuf>,
}

impl User {
    /// `ssh -i KEY -p 2222 USER@localhost COMMAND`
    fn ssh(&self, user: &str, command: &str) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.namespace, "ssh"])
            .args(self.client.options())
            .args(["-p", &SSH_PORT.to_string()])
            .arg(format!("{user}@localhost"))
            .arg(command))
    }

    fn ok(&self, user: &str, command: &str) -> Output {
        let out = self.ssh(user, command);
        assert!(
            out.status.success(),
            "`{command}` failed\n{}\n{}",
            describe(&out),
            service_logs(&self.logs)
        );
        out
    }
}

/// One network namespace per host, named after this test process, with a veth
/// link from the bastion's namespace to each target's.
struct Network {
    prefix: String,
}

impl Network {
    fn new() -> Network {
        let network = Network {
            prefix: format!("pcpg{}", std::process::id()),
        };
        ip(&["netns", "add", &network.namespace("bastion")]);
        ip(&[
            "-n",
            &network.namespace("bastion"),
            "link",
            "set",
            "lo",
            "up",
        ]);
        for (index, name) in TARGETS.iter().enumerate() {
            let (bastion, target) = (network.namespace("bastion"), network.namespace(name));
            let link = format!("to{name}");
            ip(&["netns", "add", &target]);
            ip(&["-n", &target, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", &link, "netns", &bastion, "type", "veth", "peer", "name", "eth0",
                "netns", &target,
            ]);
            let subnet = Network::subnet(index);
            ip(&[
                "-n",
                &bastion,
                "addr",
                "add",
                &format!("{subnet}.1/24"),
                "dev",
                &link,
            ]);
            ip(&[
                "-n",
                &target,
                "addr",
                "add",
                &format!("{subnet}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &bastion, "link", "set", &link, "up"]);
            ip(&["-n", &target, "link", "set", "eth0", "up"]);
        }
        network
    }

    fn namespace(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// A private /24 per link, far from anything a host is likely to route.
    fn subnet(index: usize) -> String {
        format!("10.231.{}", index + 1)
    }

    /// `/etc/hosts` for the bastion: compose's service names.
    fn hosts(&self) -> String {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (index, name) in TARGETS.iter().enumerate() {
            hosts.push_str(&format!("{}.2 {name}\n", Network::subnet(index)));
        }
        hosts
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of each veth link, and so the link.
        for host in ["bastion"].into_iter().chain(TARGETS) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.namespace(host)])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args));
    assert_success(&out, &format!("ip {}", args.join(" ")));
}

/// A bubblewrap command line: a fresh root with the host's `/usr` and `/etc`
/// read-only, fresh `/tmp` and `/run`, its own pid namespace (so killing it
/// kills everything inside), plus the service's mounts.
struct Sandbox {
    args: Vec<String>,
}

impl Sandbox {
    fn new() -> Sandbox {
        let mut sandbox = Sandbox { args: Vec::new() };
        sandbox.push(&["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]);
        for dir in ["bin", "lib", "lib64", "sbin"] {
            // Debian's merged /usr: the top-level directories are links into it.
            if let Ok(link) = fs::read_link(Path::new("/").join(dir)) {
                sandbox.push(&["--symlink", &link.to_string_lossy(), &format!("/{dir}")]);
            }
        }
        sandbox.push(&["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
        sandbox.push(&["--tmpfs", "/run", "--tmpfs", "/usr/local/bin"]);
        sandbox.push(&["--unshare-pid", "--die-with-parent"]);
        sandbox
    }

    fn push(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| a.to_string()));
    }

    fn bind(mut self, source: &Path, target: &str) -> Sandbox {
        self.make_parents(target);
        self.push(&["--bind", &source.to_string_lossy(), target]);
        self
    }

    fn read_only(mut self, source: &Path, target: &str) -> Sandbox {
        self.make_parents(target);
        self.push(&["--ro-bind", &source.to_string_lossy(), target]);
        self
    }

    /// Creates the mount point's parents world-readable, as an image has them
    /// (bubblewrap would copy the mode of the temporary directory, 0700).
    fn make_parents(&mut self, target: &str) {
        let parents: Vec<&Path> = Path::new(target).ancestors().skip(1).collect();
        for parent in parents.into_iter().rev().skip(1) {
            self.push(&["--dir", &parent.to_string_lossy()]);
        }
    }

    fn directory(mut self, path: &str) -> Sandbox {
        self.push(&["--dir", path]);
        self
    }

    /// The command to run `argv` in the sandbox, in `namespace` or, without one,
    /// with no network at all.
    fn command(self, namespace: Option<&str>, argv: &[&str]) -> Command {
        let mut command = match namespace {
            Some(namespace) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", namespace, "bwrap"]);
                ip
            }
            None => {
                let mut bwrap = Command::new("bwrap");
                bwrap.arg("--unshare-net");
                bwrap
            }
        };
        command.args(&self.args).args(argv);
        command
    }
}

/// A long-running service, its output in a log file; killed on drop.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(name: &str, mut command: Command, log: &Path) -> Service {
        let file = File::create(log).expect("service log");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Service {
            child,
            log: log.to_path_buf(),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // `ip netns exec` became bwrap; its sandbox dies with it (--die-with-parent
        // and the pid namespace).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create directory");
    for entry in fs::read_dir(from).expect("read directory") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).expect("copy file");
        }
    }
}
