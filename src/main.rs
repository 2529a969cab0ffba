//! The `portcullis` command: run the bastion, manage its keys, check policies.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use portcullis::config::{Config, LogFormat};
use portcullis::keys::{self, Role};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "SSH bastion with just-in-time access approval"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Shared by every command that reads the configuration.
const CONFIG_HELP: &str = "The config file (portcullis.toml; paths in it are relative to its directory). Without it: the embedded default, which listens on 127.0.0.1:2222 and keeps data in ./portcullis-data and policies in ./policies, relative to the working directory";

#[derive(Subcommand)]
enum Command {
    /// Write a working policy set for this machine: your keys, its sshd, a demo teammate.
    ///
    /// Writes users.toml (you, from ~/.ssh/id_*.pub and the agent, in group
    /// engineers; and a demo teammate, approver and auditor, whose key pair is kept
    /// in DATA_DIR/demo/), targets.toml (this machine's sshd as target `localhost`,
    /// its host key pinned as scanned) and flows.toml (one flow that needs one
    /// approval). Adds the bastion's upstream key to ~/.ssh/authorized_keys so it
    /// can log in to that sshd as you. Never overwrites a policy file unless it is
    /// the example shipped in the repository, or --force is given.
    Init {
        /// The SSH server to pin as the target, HOST or HOST:PORT.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:22")]
        target: String,
        /// Login on the target (default: your user name here).
        #[arg(long)]
        login: Option<String>,
        /// Your public key file (default: every ~/.ssh/id_*.pub and the agent's keys).
        #[arg(long, value_name = "FILE.pub")]
        key: Option<PathBuf>,
        /// Replace policy files that exist.
        #[arg(long)]
        force: bool,
        /// Leave ~/.ssh/authorized_keys alone (print the line to add instead).
        #[arg(long)]
        no_authorize: bool,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Run the bastion.
    ///
    /// Reads the policies (and refuses to start when they have errors), creates the
    /// data directory (mode 0700) and the bastion's keys on first start, and
    /// listens. Without --config it uses the embedded default: listen 127.0.0.1:2222,
    /// data_dir ./portcullis-data, policies ./policies (relative to the working
    /// directory). After editing policies run `portcullis reload` (or send SIGHUP);
    /// SIGTERM or Ctrl-C stops it gracefully.
    Serve {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Make the running bastion reload its policies, and say how that went.
    ///
    /// Sends SIGHUP to the `serve` holding the data directory (its pid is in
    /// DATA_DIR/portcullis.pid) and waits for its verdict: exit 0 when the new
    /// policy is in force, 1 with the errors when it was refused (the previous
    /// policy then stays in force).
    Reload {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Create missing keys and print each public key with its role and path.
    Keys {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// TOTP tools for operators.
    Totp {
        #[command(subcommand)]
        command: TotpCommand,
    },
    /// Database tools.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy every grant, session, transcript, audit event, TOTP state and counter
    /// from the database of one config into the empty database of another (e.g.
    /// sled into PostgreSQL), byte for byte, and check the copy tree by tree.
    ///
    /// Stop the bastion first: the source's data directory must not be served.
    /// When the two configs have different data directories, the keys (host,
    /// upstream, CA, TOTP sealing key) are copied too, unless the destination
    /// has its own. The source is left as it was.
    Migrate {
        /// The config of the database to copy.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The config of the (empty) database to fill.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

#[derive(Subcommand)]
enum TotpCommand {
    /// Print a one-time enrolment code for USER, for `totp enroll` (needed when
    /// `totp_require_invite = true`). Works while the bastion runs.
    Invite {
        user: String,
        /// How long the code stays valid.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    portcullis::duration::parse(text).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory (default: the one in the config); exit 1 on errors.
    ///
    /// Also warns (exit 0) about what loads but cannot work as meant: flows nobody
    /// can approve, groups nobody is in (often misspelt), principals that name no
    /// user, users in no group, targets no flow matches, and one host reachable
    /// under different approval rules.
    Check {
        dir: Option<PathBuf>,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("portcullis: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init {
            target,
            login,
            key,
            force,
            no_authorize,
            config: config_arg,
        } => {
            portcullis::datadir::private_umask();
            let config = Config::load(config_arg.as_deref())?;
            let options = portcullis::init::Options {
                target,
                login,
                key,
                force,
                authorize: !no_authorize,
                config_arg,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(portcullis::init::run(&config, &options))?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config } => {
            portcullis::allocator::tune();
            portcullis::datadir::private_umask();
            let config = Config::load(config.as_deref())?;
            init_logging(config.log_format);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(portcullis::server::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { config } => {
            let config = Config::load(config.as_deref())?;
            let status =
                portcullis::datadir::reload(&config.data_dir, std::time::Duration::from_secs(10))?;
            for warning in &status.warnings {
                eprintln!("warning: {warning}");
            }
            if status.ok {
                println!(
                    "policy reloaded by portcullis (pid {}): {}",
                    status.pid, status.summary
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("{}", status.summary);
                eprintln!(
                    "portcullis: the reload was refused; portcullis (pid {}) keeps the previous policy",
                    status.pid
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Keys { config } => {
            portcullis::datadir::private_umask();
            let config = Config::load(config.as_deref())?;
            portcullis::datadir::prepare(&config.data_dir)?;
            print_keys(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Check { dir, config },
        } => {
            let loaded = Config::load(config.as_deref())?;
            let dir = dir.unwrap_or_else(|| loaded.policies.clone());
            Ok(check_policy(&dir, &loaded.auditors))
        }
        Command::Store {
            command: StoreCommand::Migrate { from, to },
        } => {
            portcullis::datadir::private_umask();
            migrate_store(&Config::load(Some(&from))?, &Config::load(Some(&to))?, &to)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Totp {
            command: TotpCommand::Invite { user, ttl, config },
        } => {
            portcullis::datadir::private_umask();
            let config = Config::load(config.as_deref())?;
            invite(&config, &user, ttl)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Issues an enrolment code for a user the policy knows, and says how to use it.
fn invite(config: &Config, user: &str, ttl: std::time::Duration) -> Result<()> {
    let policy = portcullis::policy::load_dir(&config.policies)
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    if !policy.users.contains_key(user) {
        anyhow::bail!(
            "{user:?} is not a user in {}/users.toml; add them there first",
            config.policies.display()
        );
    }
    let code = portcullis::totp::invite::issue(&config.data_dir, user, ttl, chrono::Utc::now())?;
    println!("{code}");
    eprintln!(
        "one-time TOTP enrolment code for {user}, valid for {}; give it to them over a channel you trust. They run:\n  {}",
        portcullis::duration::format(ttl),
        portcullis::session::hint::control_line(config, &["totp", "enroll", "--invite", &code])
    );
    Ok(())
}

/// One line per key: `role<TAB>path<TAB>public key`, easy to read and to `cut`.
fn print_keys(config: &Config) -> Result<()> {
    for role in Role::ALL {
        let path = role.path(config);
        let key = keys::load_or_create(&path)?;
        println!(
            "{}\t{}\t{}",
            role.name(),
            path.display(),
            key.public_key().to_openssh()?
        );
    }
    // Secret, so only its fingerprint: nodes of one cluster must show the same.
    let fingerprint = portcullis::totp::ensure_sealing_key(&config.data_dir)?;
    println!(
        "totp-seal\t{}\t{fingerprint}",
        portcullis::totp::sealing_key_path(&config.data_dir).display()
    );
    Ok(())
}

fn check_policy(dir: &std::path::Path, auditors: &[String]) -> ExitCode {
    match portcullis::policy::load_dir(dir) {
        Ok(policy) => {
            let warnings = policy.warnings_for(auditors);
            for warning in &warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "{}: ok ({} users, {} targets, {} flows{})",
                dir.display(),
                policy.users.len(),
                policy.targets.len(),
                policy.flows.len(),
                match warnings.len() {
                    0 => String::new(),
                    n => format!(", {n} warning(s)"),
                }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s) in {}", errors.0.len(), dir.display());
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,russh=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `store migrate`: copies the database of `from` into the empty one of `to`.
fn migrate_store(from: &Config, to: &Config, to_file: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    use portcullis::store::{migrate, Store};
    if from.store_location() == to.store_location() {
        anyhow::bail!(
            "--from and --to name the same database ({}); point --to at the new one",
            from.store_location()
        );
    }
    portcullis::datadir::prepare(&to.data_dir)?;
    let _source_lock = portcullis::datadir::Lock::acquire(&from.data_dir)
        .context("stop the bastion that serves --from first")?;
    let _destination_lock = (to.data_dir != from.data_dir)
        .then(|| portcullis::datadir::Lock::acquire(&to.data_dir))
        .transpose()
        .context("stop the bastion that serves --to first")?;
    copy_keys(from, to)?;
    let source = std::sync::Arc::new(
        Store::open(&from.store, &from.data_dir)
            .with_context(|| format!("cannot open {}", from.store_location()))?,
    );
    let running =
        portcullis::cluster::live_nodes(&source, chrono::Utc::now(), from.cluster.node_timeout)?;
    if !running.is_empty() {
        anyhow::bail!(
            "bastions still run on {} (nodes {}); stop every node first, or wait node_timeout after a crash",
            from.store_location(),
            running.join(", ")
        );
    }
    let destination = Store::open(&to.store, &to.data_dir)
        .with_context(|| format!("cannot open {}", to.store_location()))?;
    eprintln!(
        "copying {} into {}",
        from.store_location(),
        to.store_location()
    );
    let copied = migrate::copy(source.backend(), destination.backend(), |tree| {
        eprintln!("  {tree}")
    })?;
    println!(
        "copied {} trees ({} entries, {:.1} MiB) and {} counters; the copy matches, tree by tree",
        copied.trees,
        copied.entries,
        copied.bytes as f64 / 1048576.0,
        copied.counters
    );
    println!(
        "next: portcullis serve --config {}, then check it with `audit verify --recordings`",
        to_file.display()
    );
    Ok(())
}

/// The keys of `from` into `to`'s data directory when that has none of its own
/// (TOTP secrets are sealed with the sealing key: without it they are lost); a
/// destination with different keys is refused.
fn copy_keys(from: &Config, to: &Config) -> Result<()> {
    use anyhow::Context;
    if from.data_dir == to.data_dir {
        return Ok(());
    }
    for (source, target) in key_files(from).iter().zip(&key_files(to)) {
        if !source.exists() {
            continue;
        }
        let bytes =
            std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
        match std::fs::read(target) {
            Ok(theirs) if theirs == bytes => {}
            Ok(_) => anyhow::bail!(
                "{} differs from {}: the copy would not be the same bastion (TOTP secrets are sealed with totp.key); remove the destination's keys or copy them from the source",
                target.display(),
                source.display()
            ),
            Err(_) => {
                portcullis::datadir::create_private(target, &bytes)?;
                let public = source.with_extension("pub");
                if public.exists() {
                    std::fs::copy(&public, target.with_extension("pub"))?;
                }
                eprintln!("copied {} to {}", source.display(), target.display());
            }
        }
    }
    Ok(())
}

/// The files that make a bastion the same bastion: its keys and the TOTP sealing key.
fn key_files(config: &Config) -> [PathBuf; 4] {
    [
        Role::Host.path(config),
        Role::Upstream.path(config),
        Role::Ca.path(config),
        portcullis::totp::sealing_key_path(&config.data_dir),
    ]
}
