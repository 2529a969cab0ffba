//! Compose without an engine: what `docker compose up` gives a service, made of
//! host parts.
//!
//! A service runs its image's command in a bubblewrap sandbox over the host's
//! `/usr` and `/etc`, as its image's user, with its bind mounts and named
//! volumes (directories of the project's temporary directory). Each service has
//! a network namespace of its own, linked by a veth pair to one bridge, as on a
//! compose network; the bridge lives in a namespace that stands for the compose
//! host: it holds the network's gateway address and the published ports, which
//! a userland proxy relays to the service as Docker's `docker-proxy` does (so a
//! service sees connections to `localhost` come from the gateway). Every
//! service gets an `/etc/hosts` naming all services and its own host name, as
//! compose's DNS and `hostname:` give them.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{assert_success, describe, run, wait_until, Bastion, Client, HAPROXY};

/// The user the Dockerfile creates for the bastion (`useradd --uid 10022`).
pub const BASTION_UID: &str = "10022";

/// The owner of the checkout that compose bind-mounts (a user, not root).
pub const CHECKOUT_OWNER: &str = "1000:1000";

/// Where every service listens for SSH, and the port the projects publish.
pub const SSH_PORT: u16 = 2222;

/// The namespace that stands for the compose host.
const HOST: &str = "host";

/// How long a service may take to listen once started.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running compose project: its directory (volumes, logs, the checkout's
/// `deploy/playground`), its network and its services. Everything is torn down
/// on drop.
pub struct Project {
    // Services before the network: a namespace is removed after its processes.
    services: Vec<Service>,
    network: Network,
    /// Every service's log, a killed one's too.
    logs: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Project {
    /// A project whose network is `subnet` (three octets; the host has `.1`),
    /// with `hosts` (service, last octet) on it, and a copy of the checkout's
    /// `deploy/playground`, which both compose files bind-mount.
    pub fn new(subnet: &'static str, hosts: &[(&str, u8)]) -> Project {
        let dir = tempfile::tempdir().expect("temporary directory");
        let playground = dir.path().join("playground");
        copy_dir(&repository().join("deploy/playground"), &playground);
        // A checkout belongs to a user, not to root: the demo keys must be theirs.
        chown(CHECKOUT_OWNER, &playground);
        let network = Network::new(subnet, hosts);
        fs::write(dir.path().join("hosts"), network.hosts_file()).expect("write hosts");
        Project {
            services: Vec::new(),
            network,
            logs: Vec::new(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh named volume: an empty directory with the mode and owner of the
    /// image's directory it is first mounted on (Docker copies them), or root's
    /// 0755 when the image has none.
    pub fn volume(&self, name: &str, mode: u32, owner: &str) -> PathBuf {
        let path = self.path(name);
        fs::create_dir(&path).expect("volume directory");
        chown(owner, &path);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod a volume");
        path
    }

    /// Runs a one-shot service (`setup`, an init step) to completion, without
    /// a network.
    pub fn run_once(&self, name: &str, sandbox: Sandbox, argv: &[&str]) {
        let out = run(&mut sandbox.command(None, argv));
        assert!(
            out.status.success(),
            "the {name} service failed:\n{}\n{}",
            describe(&out),
            self.logs()
        );
    }

    /// Starts service `name`: `argv` in `sandbox`, in the service's namespace,
    /// with compose's `/etc/hosts` and the service's host name.
    pub fn start(&mut self, name: &str, sandbox: Sandbox, argv: &[&str]) {
        let command = sandbox
            .read_only(&self.path("hosts"), "/etc/hosts")
            .hostname(name)
            .command(Some(&self.network.namespace(name)), argv);
        self.spawn(name, command);
    }

    fn spawn(&mut self, name: &str, command: Command) {
        let log = self.path(&format!("{name}.log"));
        self.services.push(Service::start(name, command, &log));
        self.logs.push(log);
    }

    /// What service `name` has printed so far.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// A playground target (the target image, the same service in both compose
    /// files): its entrypoint with the service name, trusting what the setup
    /// service left in the `shared` volume. Returns once sshd listens.
    pub fn start_target(&mut self, name: &str) {
        for dir in ["etc-ssh", "root"] {
            fs::create_dir_all(self.path(name).join(dir)).expect("target directory");
        }
        let entrypoint = repository().join("deploy/playground/target-entrypoint.sh");
        let sandbox = Sandbox::new()
            .read_only(&self.path("shared"), "/shared")
            .bind(&self.path(name).join("etc-ssh"), "/etc/ssh")
            .bind(&self.path(name).join("root"), "/root")
            .read_only(&entrypoint, "/usr/local/bin/target-entrypoint")
            .directory("/run/sshd", 0o755);
        self.start(
            name,
            sandbox,
            &["sh", "/usr/local/bin/target-entrypoint", name],
        );
        self.wait_listening(name, 22);
    }

    /// `docker compose kill NAME`: SIGKILL to the service's process, then its
    /// network endpoint goes (the container's namespace and its veth link), so
    /// that its address no longer answers at all.
    pub fn kill(&mut self, name: &str) {
        let index = self
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name} to kill"));
        drop(self.services.remove(index));
        let namespace = self.network.namespace(name);
        let empty = wait_until(START_TIMEOUT, || {
            Command::new("ip")
                .args(["netns", "pids", &namespace])
                .output()
                .is_ok_and(|out| out.stdout.is_empty())
        });
        assert!(empty, "{name}'s processes outlived SIGKILL");
        self.network.remove(name);
    }

    /// Publishes `bind` (HAProxy's `bind` syntax: `:2222` for every address of
    /// the host, `127.0.0.1:9922` for loopback only) on the host, relayed to
    /// `service:port` by a userland proxy. Returns once it listens.
    pub fn publish(&mut self, ports: &[(&str, &str, u16)]) {
        let listeners: String = ports
            .iter()
            .map(|(bind, service, port)| {
                format!(
                    "listen {service}-{port}\n    bind {bind}\n    server {service} {}:{port}\n",
                    self.network.address(service)
                )
            })
            .collect();
        let config = self.path("docker-proxy.cfg");
        fs::write(
            &config,
            format!(
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n{listeners}"
            ),
        )
        .expect("write the userland proxy's config");
        // Debian's HAProxy as Docker's userland proxy: a plain TCP relay, in a
        // sandbox only so that it dies with the test.
        let proxy = Sandbox::new().read_only(&config, "/usr/local/etc/docker-proxy.cfg");
        let command = proxy.command(
            Some(&self.network.namespace(HOST)),
            &[HAPROXY, "-db", "-f", "/usr/local/etc/docker-proxy.cfg"],
        );
        self.spawn("docker-proxy", command);
        for (bind, _, _) in ports {
            let port = bind.rsplit(':').next().expect("a port");
            self.wait_listening(HOST, port.parse().expect("a port number"));
        }
    }

    /// Waits until something accepts TCP connections on `port` in `host`'s
    /// namespace; panics with the service logs otherwise.
    pub fn wait_listening(&self, host: &str, port: u16) {
        let namespace = self.network.namespace(host);
        let listening = wait_until(START_TIMEOUT, || {
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

    /// A demo user with the key the setup service made, typing on the compose
    /// host.
    pub fn user(&self, name: &str) -> User {
        User {
            client: Client::new(&self.path("playground/keys").join(name), SSH_PORT),
            namespace: self.network.namespace(HOST),
            logs: self.logs.clone(),
        }
    }

    /// Runs a bash line on the compose host.
    pub fn on_host(&self, line: &str) -> Output {
        self.in_network_of(HOST, &["bash", "-c", line])
    }

    /// Runs `argv` (a host program) in `service`'s network namespace, as
    /// `docker compose exec` would in the container (a healthcheck).
    pub fn in_network_of(&self, service: &str, argv: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.network.namespace(service)])
            .args(argv))
    }

    /// Every service's log, for failure messages.
    pub fn logs(&self) -> String {
        service_logs(&self.logs)
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

/// A demo user's `ssh` on the compose host, as the README types it.
pub struct User {
    client: Client,
    namespace: String,
    logs: Vec<PathBuf>,
}

impl User {
    /// `ssh -i KEY -p 2222 USER@localhost COMMAND`
    pub fn ssh(&self, user: &str, command: &str) -> Output {
        run(&mut self.ssh_command(user, command))
    }

    /// The same, as a command to start in the background.
    pub fn ssh_command(&self, user: &str, command: &str) -> Command {
        let mut ssh = Command::new("ip");
        ssh.args(["netns", "exec", &self.namespace, "ssh"])
            .args(self.client.options())
            .args(["-p", &SSH_PORT.to_string()])
            .arg(format!("{user}@localhost"))
            .arg(command);
        ssh
    }

    /// [`User::ssh`], which must succeed.
    pub fn ok(&self, user: &str, command: &str) -> Output {
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

/// The compose network: a namespace per service, each with an `eth0` linked to
/// a bridge in the host's namespace. Namespaces are named after this test
/// process and project, so that projects (and test runs) never meet.
struct Network {
    prefix: String,
    subnet: &'static str,
    hosts: Vec<(String, u8)>,
}

/// The bridge in the host's namespace.
const BRIDGE: &str = "compose0";

impl Network {
    fn new(subnet: &'static str, hosts: &[(&str, u8)]) -> Network {
        static PROJECTS: AtomicUsize = AtomicUsize::new(0);
        let network = Network {
            prefix: format!(
                "pcpg{}.{}",
                std::process::id(),
                PROJECTS.fetch_add(1, Ordering::Relaxed)
            ),
            subnet,
            hosts: hosts.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
        };
        let host = network.namespace(HOST);
        ip(&["netns", "add", &host]);
        ip(&["-n", &host, "link", "set", "lo", "up"]);
        ip(&["-n", &host, "link", "add", BRIDGE, "type", "bridge"]);
        let gateway = format!("{subnet}.1/24");
        ip(&["-n", &host, "addr", "add", &gateway, "dev", BRIDGE]);
        ip(&["-n", &host, "link", "set", BRIDGE, "up"]);
        for (name, _) in &network.hosts {
            network.attach(name);
        }
        network
    }

    /// A namespace for `name`, its `eth0` on the bridge with its address.
    fn attach(&self, name: &str) {
        let (host, service) = (self.namespace(HOST), self.namespace(name));
        let link = format!("v-{name}"); // the host's end: at most 15 bytes
        ip(&["netns", "add", &service]);
        ip(&["-n", &service, "link", "set", "lo", "up"]);
        ip(&[
            "link", "add", &link, "netns", &host, "type", "veth", "peer", "name", "eth0", "netns",
            &service,
        ]);
        ip(&["-n", &host, "link", "set", &link, "master", BRIDGE, "up"]);
        let address = format!("{}/24", self.address(name));
        ip(&["-n", &service, "addr", "add", &address, "dev", "eth0"]);
        ip(&["-n", &service, "link", "set", "eth0", "up"]);
    }

    fn namespace(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn address(&self, name: &str) -> String {
        let (_, last) = self
            .hosts
            .iter()
            .find(|(host, _)| host == name)
            .unwrap_or_else(|| panic!("no service {name} on the network"));
        format!("{}.{last}", self.subnet)
    }

    /// `/etc/hosts` for every service: compose's service names.
    fn hosts_file(&self) -> String {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (name, _) in &self.hosts {
            hosts.push_str(&format!("{} {name}\n", self.address(name)));
        }
        hosts
    }

    /// Removes `name`'s namespace: with it goes its end of the veth link, and
    /// so the link.
    fn remove(&self, name: &str) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.namespace(name)])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for (name, _) in &self.hosts {
            self.remove(name);
        }
        self.remove(HOST);
    }
}

fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args));
    assert_success(&out, &format!("ip {}", args.join(" ")));
}

/// A bubblewrap command line: a fresh root with the host's `/usr` and `/etc`
/// read-only, fresh `/tmp` and `/run`, its own pid namespace (so killing it
/// kills everything inside), plus the service's mounts, run as the image's
/// user.
#[derive(Clone)]
pub struct Sandbox {
    args: Vec<String>,
    user: Option<String>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let mut sandbox = Sandbox {
            args: Vec::new(),
            user: None,
        };
        sandbox.push(&["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]);
        for dir in ["bin", "lib", "lib64", "sbin"] {
            // Debian's merged /usr: the top-level directories are links into it.
            if let Ok(link) = fs::read_link(Path::new("/").join(dir)) {
                sandbox.push(&["--symlink", &link.to_string_lossy(), &format!("/{dir}")]);
            }
        }
        // An image's /tmp is world-writable and sticky (bubblewrap's default: 0755).
        sandbox.push(&["--proc", "/proc", "--dev", "/dev"]);
        sandbox.push(&["--perms", "1777", "--tmpfs", "/tmp"]);
        // What images put under /usr/local: their own programs and configs.
        sandbox.push(&["--tmpfs", "/run", "--tmpfs", "/usr/local/bin"]);
        sandbox.push(&["--tmpfs", "/usr/local/etc"]);
        sandbox.push(&["--unshare-pid", "--die-with-parent"]);
        sandbox
    }

    /// The portcullis image: the binary under test as its `/usr/local/bin/portcullis`.
    pub fn portcullis_image() -> Sandbox {
        Sandbox::new().read_only(Path::new(Bastion::binary()), "/usr/local/bin/portcullis")
    }

    fn push(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| a.to_string()));
    }

    pub fn bind(mut self, source: &Path, target: &str) -> Sandbox {
        self.make_parents(target);
        self.push(&["--bind", &source.to_string_lossy(), target]);
        self
    }

    pub fn read_only(mut self, source: &Path, target: &str) -> Sandbox {
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

    /// A directory the image has, with its mode.
    pub fn directory(mut self, path: &str, mode: u32) -> Sandbox {
        self.make_parents(path);
        self.push(&["--perms", &format!("{mode:o}"), "--dir", path]);
        self
    }

    /// The image's `USER` (a numeric id, also its group).
    pub fn user(mut self, uid: &str) -> Sandbox {
        self.user = Some(uid.to_string());
        self
    }

    /// An environment variable the image sets.
    pub fn env(mut self, name: &str, value: &str) -> Sandbox {
        self.push(&["--setenv", name, value]);
        self
    }

    fn hostname(mut self, name: &str) -> Sandbox {
        self.push(&["--unshare-uts", "--hostname", name]);
        self
    }

    /// The command to run `argv` in the sandbox, in `namespace` or, without one,
    /// with no network at all.
    pub fn command(self, namespace: Option<&str>, argv: &[&str]) -> Command {
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
        command.args(&self.args);
        if let Some(uid) = &self.user {
            command
                .args([
                    "setpriv",
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                ])
                .args(["--clear-groups", "--"]);
        }
        command.args(argv);
        command
    }
}

/// A long-running service, its output in a log file; killed on drop.
struct Service {
    name: String,
    child: Child,
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
            name: name.to_string(),
            child,
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // SIGKILL, as `docker compose kill`. `ip netns exec` became bwrap; its
        // sandbox dies with it (--die-with-parent and the pid namespace).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chown(owner: &str, path: &Path) {
    let out = run(Command::new("chown").arg("-R").arg(owner).arg(path));
    assert_success(&out, &format!("chown {owner} {}", path.display()));
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
