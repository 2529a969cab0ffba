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
//! Shared by several test binaries (and benches), which declare it `pub mod
//! common`: a helper one binary does not use is then no warning there.
//!
//! - [`processes`]: commands with a deadline, daemons, background clients, output helpers
//! - [`sshd`]: a real OpenSSH server as the target (and jump host), and key files
//! - [`bastion`]: the `portcullis` binary under test, its config, keys and test policies
//! - [`clients`]: the OpenSSH client tools of one engineer, and russh sessions from the test's process
//! - [`in_process`]: the bastion run inside the test (for tokio's paused clock)
//! - [`haproxy`]: a real HAProxy in front of bastions, sending the PROXY protocol
//! - [`tmux`]: a real terminal whose size the test controls
//! - [`totp`]: TOTP enrolment and answers to the step-up prompt
//! - [`postgres`]: a real PostgreSQL server, one per test binary, a database per test
//! - [`world`]: all of them together, one temp dir per test

pub mod bastion;
pub mod clients;
pub mod haproxy;
pub mod in_process;
pub mod postgres;
pub mod processes;
pub mod sshd;
pub mod tmux;
pub mod totp;
pub mod world;

pub use bastion::*;
pub use clients::*;
pub use haproxy::*;
pub use in_process::*;
pub use postgres::*;
pub use processes::*;
pub use sshd::*;
pub use tmux::*;
pub use totp::*;
pub use world::*;

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

/// File in a world's directory whose lines are appended to portcullis.toml; other
/// nodes of the world ([`World::another_node`]) get them too.
const EXTRA_CONFIG: &str = "portcullis.extra.toml";

/// File in a node's directory whose lines are appended to portcullis.toml after
/// [`EXTRA_CONFIG`]'s: this node's own (its `[cluster]` table), never copied.
const NODE_CONFIG: &str = "portcullis.node.toml";

/// The reserved username of the control plane.
pub const CONTROL_USER: &str = "portcullis";

/// Group of [`USER`]; the staging flow lets it request access.
pub const GROUP: &str = "engineers";

/// How often to poll while waiting for something (a port, a file, a process).
const POLL: Duration = Duration::from_millis(20);
