//! A real HAProxy on loopback in TCP mode: the load balancer in front of one or
//! more bastions, sending the PROXY protocol as a deployment would.

use super::*;

/// The Debian package's binary (`scripts/test` installs it).
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy relaying a free loopback port to bastions; killed on drop.
pub struct Haproxy {
    daemon: Daemon,
}

impl Haproxy {
    /// Starts HAProxy with its config and log in `dir`, balancing TCP connections
    /// round-robin over the loopback `backends` (ports), each `server` line ending
    /// in `server_options` (`"send-proxy-v2"`, `"send-proxy"`, or with
    /// `"source 127.0.0.2"` to connect from another address).
    pub fn start(dir: &Path, backends: &[u16], server_options: &str) -> Haproxy {
        Haproxy::start_with(dir, |port| haproxy_config(port, backends, server_options))
    }

    /// Starts HAProxy on the config `config(port)` returns for its free loopback
    /// `port` (to run a shipped config with the test's ports put in).
    pub fn start_with(dir: &Path, config: impl Fn(u16) -> String) -> Haproxy {
        assert!(
            Path::new(HAPROXY).exists(),
            "{HAPROXY} is missing: run scripts/test, which installs haproxy"
        );
        fs::create_dir_all(dir).expect("create haproxy dir");
        let path = dir.join("haproxy.cfg");
        let daemon = Daemon::start("haproxy", &dir.join("haproxy.log"), |port| {
            fs::write(&path, config(port)).expect("write haproxy.cfg");
            let mut cmd = Command::new(HAPROXY);
            // -db: stay in the foreground, so the test owns the process.
            cmd.args(["-db", "-f"]).arg(&path);
            cmd
        });
        Haproxy { daemon }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.daemon.port()
    }

    /// What HAProxy logged (one line per relayed connection), for failure messages.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// TCP mode, logging to stderr, long timeouts (an SSH session may idle), and one
/// `server` line per backend.
fn haproxy_config(port: u16, backends: &[u16], server_options: &str) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, backend)| format!("    server b{i} 127.0.0.1:{backend} {server_options}\n"))
        .collect();
    format!(
        "global
    log stderr format raw local0
    maxconn 1000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend ssh
    bind 127.0.0.1:{port}
    default_backend bastions

backend bastions
    balance roundrobin
{servers}"
    )
}
