//! One type per control-plane command, after tokio's mini-redis `cmd/`: each
//! command is a clap `Args` struct with its own `run`, and [`Command`] is the
//! table of them. Auditor commands are their own enum, [`AuditorCommand`], whose
//! `run` checks membership once for all of them: the check is in the type.

mod auditor;
mod decide;
mod grants;
mod request;
mod totp;
mod whoami;

use clap::{Parser, Subcommand};

use super::error::Reply;
use super::requests::Caller;
use crate::session::{ChannelContext, ClientChannel};

pub use auditor::AuditorCommand;
pub use decide::{Approve, Deny, Revoke};
pub use grants::{Grants, Requests, Show};
pub use request::Request;
pub use totp::Totp;
pub use whoami::Whoami;

#[derive(Debug, Parser)]
#[command(
    name = "ssh portcullis@BASTION",
    no_binary_name = true,
    disable_help_subcommand = true,
    disable_version_flag = true
)]
pub struct ControlArgs {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Your identity, groups and active grants.
    Whoami(Whoami),
    /// Ask for access to a target.
    Request(Request),
    /// List requests you can see (pending and active unless --all).
    Requests(Requests),
    /// Details of one request, with its approvals.
    Show(Show),
    /// Approve a request.
    Approve(Approve),
    /// Deny a request.
    Deny(Deny),
    /// TOTP enrolment for step-up.
    Totp(Totp),
    /// End a grant (and its live sessions), or withdraw a pending request.
    Revoke(Revoke),
    /// Active grants you can see.
    Grants(Grants),
    #[command(flatten)]
    Auditor(AuditorCommand),
}

impl Command {
    /// The subcommand's name, for logs (never its arguments, which may be long).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Whoami(_) => "whoami",
            Command::Request(_) => "request",
            Command::Requests(_) => "requests",
            Command::Show(_) => "show",
            Command::Approve(_) => "approve",
            Command::Deny(_) => "deny",
            Command::Revoke(_) => "revoke",
            Command::Grants(_) => "grants",
            Command::Totp(_) => "totp",
            Command::Auditor(command) => command.name(),
        }
    }

    /// Runs the command: the text for stdout, or why it failed.
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        match self {
            Command::Whoami(cmd) => cmd.run(call).await,
            Command::Request(cmd) => cmd.run(call).await,
            Command::Requests(cmd) => cmd.run(call).await,
            Command::Show(cmd) => cmd.run(call).await,
            Command::Approve(cmd) => cmd.run(call).await,
            Command::Deny(cmd) => cmd.run(call).await,
            Command::Revoke(cmd) => cmd.run(call).await,
            Command::Grants(cmd) => cmd.run(call).await,
            Command::Totp(cmd) => cmd.run(call).await,
            Command::Auditor(cmd) => cmd.run(call).await,
        }
    }
}

/// One command's run: the caller, and the channel it answers on (commands that
/// prompt, wait or stream use it; the others only return their text).
pub struct Call<'a> {
    pub context: &'a ChannelContext,
    pub client: &'a mut ClientChannel,
    pub caller: Caller<'a>,
}
