//! Command-line syntax of the control plane, parsed with clap from the words of the
//! exec request (`ssh portcullis@bastion approve 7f3a9c --comment "ok"`).

use clap::{Parser, Subcommand};

use crate::audit::Anchor;

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
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Ask for access to a target.
    Request {
        target: String,
        /// Login on the target (default: the target's first login).
        #[arg(long)]
        login: Option<String>,
        /// An interactive shell (also covers any command and sftp).
        #[arg(long)]
        shell: bool,
        /// File transfer with sftp and scp.
        #[arg(long)]
        sftp: bool,
        /// A command pattern; `*` matches within one argument. Repeatable.
        #[arg(long = "command", value_name = "PATTERN")]
        commands: Vec<String>,
        /// How long the grant lasts once approved, e.g. 30m or 1h30m.
        #[arg(long)]
        ttl: Option<String>,
        /// Why you need access (ticket, incident).
        #[arg(long)]
        reason: String,
        /// Block until the request is decided.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// List requests you can see (pending and active unless --all).
    Requests {
        /// Only requests waiting for a decision.
        #[arg(long)]
        pending: bool,
        /// Only your own requests.
        #[arg(long)]
        mine: bool,
        /// Include decided, expired and revoked requests.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Details of one request, with its approvals.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request.
    Approve {
        id: String,
        #[arg(long)]
        comment: Option<String>,
        /// Your current TOTP code, where the request's flow has `step_up = "totp"`.
        #[arg(long)]
        totp: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Deny a request.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
        /// Your current TOTP code, where the request's flow has `step_up = "totp"`.
        #[arg(long)]
        totp: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// TOTP enrolment for step-up.
    Totp {
        #[command(subcommand)]
        action: TotpAction,
    },
    /// End a grant (and its live sessions), or withdraw a pending request.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Active grants you can see.
    Grants {
        #[arg(long)]
        json: bool,
    },
    /// Recorded sessions (auditors).
    Sessions {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// Only sessions started within this long, e.g. 24h.
        #[arg(long)]
        since: Option<String>,
        /// Only live sessions.
        #[arg(long)]
        active: bool,
        /// Only sessions whose output contains this text.
        #[arg(long)]
        grep: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Play a recording with its original timing (auditors).
    Replay {
        session: String,
        /// Faster (2) or slower (0.5) than real time; pauses are capped at 2s first.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Pass every recorded terminal sequence, also those that set the clipboard
        /// or the title, make links, or query the terminal (dropped by default).
        #[arg(long)]
        raw: bool,
    },
    /// Follow a live session read-only (auditors).
    Watch {
        session: String,
        /// Pass every terminal sequence, as for `replay --raw`.
        #[arg(long)]
        raw: bool,
    },
    /// A recording as asciicast v2 on stdout (auditors).
    Export { session: String },
    /// Audit events; `audit verify` checks the hash chain (auditors).
    Audit {
        #[command(subcommand)]
        action: Option<AuditAction>,
        /// Only events within this long, e.g. 24h.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// The subcommand's name, for logs (never its arguments, which may be long).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Whoami { .. } => "whoami",
            Command::Request { .. } => "request",
            Command::Requests { .. } => "requests",
            Command::Show { .. } => "show",
            Command::Approve { .. } => "approve",
            Command::Deny { .. } => "deny",
            Command::Revoke { .. } => "revoke",
            Command::Grants { .. } => "grants",
            Command::Totp { .. } => "totp",
            Command::Sessions { .. } => "sessions",
            Command::Replay { .. } => "replay",
            Command::Watch { .. } => "watch",
            Command::Export { .. } => "export",
            Command::Audit { .. } => "audit",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TotpAction {
    /// Show a new secret (URL and QR code) and activate it with one code.
    Enroll {
        /// The one-time enrolment code an operator issued with `portcullis totp
        /// invite USER` (asked for when the bastion requires one and it is missing).
        #[arg(long, value_name = "CODE")]
        invite: Option<String>,
    },
    /// Whether you are enrolled.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Recompute the hash chain; exit 1 at the first break.
    Verify {
        /// Also recompute every recording's digest against its session's end event.
        #[arg(long)]
        recordings: bool,
        /// A chain head kept from the logs (`audit chain head seq=… digest=…`): event
        /// SEQ must still have DIGEST, or the chain was truncated or rewritten.
        /// Repeatable.
        #[arg(long = "anchor", value_name = "SEQ:DIGEST")]
        anchors: Vec<Anchor>,
    },
}
