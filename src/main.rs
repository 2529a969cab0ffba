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

#[derive(Subcommand)]
enum Command {
    /// Run the bastion (embedded default config when --config is not given).
    Serve {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Create missing keys and print each public key with its role and path.
    Keys {
        #[arg(long, value_name = "FILE")]
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
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    portcullis::duration::parse(text).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory (default: the one in the config); exit 1 on errors.
    Check {
        dir: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
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
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            init_logging(config.log_format);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(portcullis::server::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { config } => {
            let config = Config::load(config.as_deref())?;
            print_keys(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Check { dir, config },
        } => {
            let dir = match dir {
                Some(dir) => dir,
                None => Config::load(config.as_deref())?.policies,
            };
            Ok(check_policy(&dir))
        }
        Command::Totp {
            command: TotpCommand::Invite { user, ttl, config },
        } => {
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
        "one-time TOTP enrolment code for {user}, valid for {}; give it to them over a channel you trust. They run:\n  ssh -p {} portcullis@BASTION \"totp enroll --invite {code}\"",
        portcullis::duration::format(ttl),
        config.listen.port()
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
    Ok(())
}

fn check_policy(dir: &std::path::Path) -> ExitCode {
    match portcullis::policy::load_dir(dir) {
        Ok(policy) => {
            let warnings = policy.warnings();
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
