//! The daemon's configuration file (`portcullis.toml`) and its embedded default.
//!
//! Paths in a config file are resolved relative to the file's own directory, so
//! that `portcullis serve --config /etc/portcullis/portcullis.toml` does not depend
//! on the working directory of whoever started it. Without a file, the embedded
//! default resolves paths relative to the working directory, which is what the
//! quickstart expects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::record::disk::{parse_quota, parse_size};
use crate::record::RecordingLimits;

pub mod accept_env;
pub mod cluster;
pub mod limits;
pub mod prefix;
mod store;

pub use accept_env::{AcceptEnv, DEFAULT_ACCEPT_ENV};
pub use cluster::ClusterSettings;
pub use limits::{Limits, MaxStartups};
pub use prefix::Prefix;

/// The listen address of the embedded default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:2222";

/// `step_up_max_age` when the config does not say.
pub const DEFAULT_STEP_UP_MAX_AGE: Duration = Duration::from_secs(300);

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Optional notification settings (`[notify]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// URL that receives a JSON POST for every request lifecycle event.
    pub webhook: Option<String>,
}

/// How long recordings are kept (`[retention]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    recordings: Option<String>,
}

/// Recording limits (`[recording]`), as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecording {
    session_quota: Option<String>,
    user_quota: Option<String>,
    min_free_disk: Option<String>,
}

/// The file as written by the operator; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    policies: Option<PathBuf>,
    host_key: Option<PathBuf>,
    auditors: Option<Vec<String>>,
    record_input: Option<bool>,
    record_file_transfers: Option<bool>,
    retention: Option<RawRetention>,
    recording: Option<RawRecording>,
    notify: Option<Notify>,
    log_format: Option<LogFormat>,
    connect_timeout: Option<String>,
    shutdown_grace: Option<String>,
    limits: Option<Limits>,
    post_quantum_only: Option<bool>,
    metrics_listen: Option<SocketAddr>,
    step_up_max_age: Option<String>,
    totp_require_invite: Option<bool>,
    legacy_clients: Option<bool>,
    accept_env: Option<String>,
    cluster: Option<ClusterSettings>,
    #[serde(default, deserialize_with = "prefix::list")]
    proxy_protocol_from: Vec<Prefix>,
    store: Option<store::RawStore>,
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub policies: PathBuf,
    /// The bastion's own SSH host key; generated on first start when missing.
    pub host_key: PathBuf,
    /// Principals (`user` or `group:NAME`) allowed to use the auditor commands.
    pub auditors: Vec<String>,
    pub record_input: bool,
    /// Store the data of provable file transfers too (sftp forced to internal-sftp
    /// on certificate-mode targets; otherwise metadata and byte counts only).
    pub record_file_transfers: bool,
    /// Transcripts of sessions that ended longer ago than this are pruned (the audit
    /// chain and session metadata are kept). `None`: keep forever.
    pub recordings_retention: Option<Duration>,
    /// Recording quotas and the free-space watermark (`[recording]`).
    pub recording: RecordingLimits,
    pub notify: Notify,
    pub log_format: LogFormat,
    /// How long the bastion waits for a target's TCP connect and SSH handshake.
    pub connect_timeout: Duration,
    /// How long live sessions may go on after SIGTERM before they are closed.
    pub shutdown_grace: Duration,
    /// Pre-authentication protection (`[limits]`).
    pub limits: Limits,
    /// Offer clients only post-quantum hybrid key exchange (needs OpenSSH ≥ 9.9).
    pub post_quantum_only: bool,
    /// Where `/metrics` (Prometheus) and `/healthz` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How old a TOTP step-up may be for a session start or an approver's decision
    /// in a `step_up = "totp"` flow.
    pub step_up_max_age: Duration,
    /// `totp enroll` needs a one-time code from `portcullis totp invite USER`, so a
    /// stolen key of a user who never enrolled cannot enrol itself.
    pub totp_require_invite: bool,
    /// Also offer AES-CTR with SHA-2 MACs, for clients without AEAD ciphers
    /// (Debian 12's Paramiko 2.12, libssh2 1.10 and so curl).
    pub legacy_clients: bool,
    /// Environment variables clients may pass on to targets (sshd's `AcceptEnv`).
    pub accept_env: AcceptEnv,
    /// This node among several on one database (`[cluster]`).
    pub cluster: ClusterSettings,
    /// Load balancers whose connections start with a PROXY protocol header naming
    /// the real client (see `server::proxy_protocol`); nobody else may name one.
    pub proxy_protocol_from: Vec<Prefix>,
    /// Where the state lives (`[store]`): sled in `data_dir`, or PostgreSQL.
    pub store: crate::store::Settings,
}

impl Config {
    /// Where the database is, for messages: sled's directory or PostgreSQL's URL
    /// (which never holds a password).
    pub fn store_location(&self) -> String {
        match &self.store {
            crate::store::Settings::Sled => {
                format!("sled in {}", self.data_dir.join("db").display())
            }
            crate::store::Settings::Postgres(pg) => format!("PostgreSQL at {}", pg.url),
        }
    }

    /// Loads `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        match path {
            None => Config::resolve(RawConfig::default(), Path::new(".")),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                let raw: RawConfig = toml::from_str(&text).map_err(|err| {
                    anyhow::anyhow!(
                        "{}: {}",
                        path.display(),
                        crate::policy::describe_toml_error(&text, &err)
                    )
                })?;
                let base = path.parent().unwrap_or(Path::new("."));
                Config::resolve(raw, base)
                    .with_context(|| format!("invalid config file {}", path.display()))
            }
        }
    }

    fn resolve(raw: RawConfig, base: &Path) -> Result<Config> {
        let at = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let data_dir = at(raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from("portcullis-data")));
        let host_key = raw
            .host_key
            .map(&at)
            .unwrap_or_else(|| data_dir.join("host_ed25519"));
        let connect_timeout = match raw.connect_timeout {
            Some(text) => crate::duration::parse(&text)
                .with_context(|| format!("connect_timeout = {text:?}"))?,
            None => Duration::from_secs(10),
        };
        let shutdown_grace = match raw.shutdown_grace {
            Some(text) => crate::duration::parse(&text)
                .with_context(|| format!("shutdown_grace = {text:?}"))?,
            None => Duration::from_secs(30),
        };
        let step_up_max_age = match raw.step_up_max_age {
            Some(text) => crate::duration::parse(&text)
                .with_context(|| format!("step_up_max_age = {text:?}"))?,
            None => DEFAULT_STEP_UP_MAX_AGE,
        };
        let limits = raw.limits.unwrap_or_default();
        limits.check().map_err(anyhow::Error::msg)?;
        let recordings_retention = match raw.retention.and_then(|r| r.recordings) {
            Some(text) => Some(
                crate::duration::parse(&text)
                    .with_context(|| format!("retention.recordings = {text:?}"))?,
            ),
            None => None,
        };
        let recording = recording_limits(raw.recording.unwrap_or_default())?;
        let cluster = raw.cluster.unwrap_or_default();
        cluster.check().map_err(anyhow::Error::msg)?;
        let accept_env = match raw.accept_env {
            Some(text) => AcceptEnv::parse(&text).map_err(anyhow::Error::msg)?,
            None => AcceptEnv::default(),
        };
        check_proxy_protocol_from(&raw.proxy_protocol_from)?;
        let store = raw.store.unwrap_or_default().resolve(at)?;
        Ok(Config {
            store,
            recording,
            cluster,
            listen: raw
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            policies: at(raw.policies.unwrap_or_else(|| PathBuf::from("policies"))),
            host_key,
            data_dir,
            auditors: raw
                .auditors
                .unwrap_or_else(|| vec!["group:auditors".to_string()]),
            record_input: raw.record_input.unwrap_or(true),
            record_file_transfers: raw.record_file_transfers.unwrap_or(false),
            recordings_retention,
            notify: raw.notify.unwrap_or_default(),
            log_format: raw.log_format.unwrap_or_default(),
            connect_timeout,
            shutdown_grace,
            limits,
            post_quantum_only: raw.post_quantum_only.unwrap_or(false),
            metrics_listen: raw.metrics_listen,
            step_up_max_age,
            totp_require_invite: raw.totp_require_invite.unwrap_or(false),
            legacy_clients: raw.legacy_clients.unwrap_or(false),
            accept_env,
            proxy_protocol_from: raw.proxy_protocol_from,
        })
    }
}

/// Refuses a `proxy_protocol_from` that would let any address name its own client
/// address: every address listed there may claim to be anyone.
fn check_proxy_protocol_from(balancers: &[Prefix]) -> Result<()> {
    if let Some(all) = balancers.iter().find(|p| p.len == 0) {
        anyhow::bail!(
            "proxy_protocol_from = [\"{all}\"] would let every address claim any client address; list only your load balancers' addresses (e.g. \"10.0.0.5\" or \"10.0.0.0/29\")"
        );
    }
    Ok(())
}

/// `[recording]` over its defaults.
fn recording_limits(raw: RawRecording) -> Result<RecordingLimits> {
    let mut limits = RecordingLimits::default();
    if let Some(text) = raw.session_quota {
        limits.session_quota = parse_quota(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("recording.session_quota = {text:?}"))?;
    }
    if let Some(text) = raw.user_quota {
        limits.user_quota = parse_quota(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("recording.user_quota = {text:?}"))?;
    }
    if let Some(text) = raw.min_free_disk {
        limits.min_free_disk = parse_size(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("recording.min_free_disk = {text:?}"))?;
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_matches_the_design() {
        let config = Config::load(None).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:2222");
        assert_eq!(config.data_dir, Path::new("./portcullis-data"));
        assert_eq!(config.policies, Path::new("./policies"));
        assert_eq!(config.auditors, vec!["group:auditors"]);
        assert!(config.record_input);
        assert_eq!(config.step_up_max_age, Duration::from_secs(300));
        assert!(!config.totp_require_invite);
        assert!(!config.legacy_clients);
        assert_eq!(
            config.accept_env,
            AcceptEnv::parse("LANG LC_* TZ GIT_PROTOCOL").unwrap()
        );
    }

    #[test]
    fn accept_env_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, "accept_env = \"LANG *\"\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(err.contains("accept_env pattern '*'"), "{err}");
        std::fs::write(&path, "accept_env = \"LANG GIT_*\"\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(
            err.contains("accept_env pattern 'GIT_*' would pass variables starting with GIT_"),
            "{err}"
        );
        std::fs::write(
            &path,
            "accept_env = \"LANG FOO_?\"\nlegacy_clients = true\n",
        )
        .unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert!(config.accept_env.allows("FOO_1") && !config.accept_env.allows("TZ"));
        assert!(config.legacy_clients);
    }

    #[test]
    fn proxy_protocol_from_takes_addresses_and_networks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(
            &path,
            "proxy_protocol_from = [\"127.0.0.1\", \"10.0.0.0/8\", \"fd00::/64\"]\n",
        )
        .unwrap();
        let config = Config::load(Some(&path)).unwrap();
        let listed: Vec<String> = config
            .proxy_protocol_from
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(listed, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/64"]);
        assert!(Config::load(None).unwrap().proxy_protocol_from.is_empty());
    }

    #[test]
    fn a_bad_proxy_protocol_network_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        for (text, wanted) in [
            (
                "listen = \"127.0.0.1:2222\"\nproxy_protocol_from = [\"10.0.0.0/33\"]\n",
                "line 2: \"10.0.0.0/33\": prefix length must be 0 to 32",
            ),
            (
                "proxy_protocol_from = [\"lb.example.com\"]\n",
                "\"lb.example.com\" is not an address or prefix like 10.0.0.0/8",
            ),
            (
                "proxy_protocol_from = \"10.0.0.1\"\n",
                "line 1: invalid type: string \"10.0.0.1\", expected a sequence",
            ),
            (
                "proxy_protocol_from = [\"10.0.0.5\", \"0.0.0.0/0\"]\n",
                "would let every address claim any client address",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", Config::load(Some(&path)).unwrap_err());
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_an_error_with_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/portcullis.toml");
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:2222");
        assert_eq!(config.limits, Limits::default());
        assert_eq!(
            config.limits.requests(),
            crate::grant::RequestLimits::default()
        );
        assert_eq!(
            config.recordings_retention,
            Some(Duration::from_secs(180 * 86400))
        );
        assert!(config.metrics_listen.is_some());
        assert!(config.totp_require_invite);
    }

    /// `[store]`: sled by default; PostgreSQL with its defaults and paths
    /// relative to the file; every mistake refused with what to write instead,
    /// a password in the URL without repeating it.
    #[test]
    fn the_store_section_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        let load = |store: &str| {
            std::fs::write(&path, format!("[store]\n{store}\n")).unwrap();
            Config::load(Some(&path)).map_err(|err| format!("{err:#}"))
        };
        assert!(matches!(
            Config::load(None).unwrap().store,
            crate::store::Settings::Sled
        ));
        let pg =
            "backend = \"postgres\"\nurl = \"postgres://portcullis@db:5432/p?sslmode=require\"";
        let config = load(&format!(
            "{pg}\npassword_file = \"pw\"\nconnect_timeout = \"2s\""
        ))
        .unwrap();
        let crate::store::Settings::Postgres(settings) = config.store else {
            panic!("postgres expected");
        };
        assert_eq!(settings.password_file, Some(dir.path().join("pw")));
        assert_eq!(settings.pool_size, crate::store::DEFAULT_POOL_SIZE);
        assert_eq!(settings.connect_timeout, Duration::from_secs(2));
        for (store, expected) in [
            (
                "backend = \"postgres\"\nurl = \"postgres://u:hunter2@db/p\"",
                "put it in password_file",
            ),
            ("backend = \"postgres\"", "needs url = "),
            ("url = \"postgres://u@db/p\"", "add backend = \"postgres\""),
            ("backend = \"mysql\"", "unknown variant"),
            (&format!("{pg}\npool_size = 0"), "use 1 to 256"),
            (
                &format!("{pg}\nconnect_timeout = \"soon\""),
                "connect_timeout",
            ),
            (
                "backend = \"postgres\"\nurl = \"mysql://db\"",
                "postgres://USER@HOST",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u:hunter2@db:port/p\"",
                "postgres://USER@HOST",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/p?password=hunter2\"",
                "put it in password_file",
            ),
            (
                "backend = \"postgres\"\nurl = \"host=db password=hunter2\"",
                "put it in password_file",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/p?sslmode=disable\"\nca_file = \"ca.pem\"",
                "remove one of them",
            ),
        ] {
            let err = load(store).unwrap_err();
            assert!(err.contains(expected), "{store}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, "data_dir = \"d\"\npolicies = \"/abs/p\"\n").unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.data_dir, dir.path().join("d"));
        assert_eq!(config.host_key, dir.path().join("d/host_ed25519"));
        assert_eq!(config.policies, Path::new("/abs/p"));
    }
}
