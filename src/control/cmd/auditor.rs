//! The auditor commands: `sessions`, `replay`, `watch`, `export` and `audit`.
//! [`AuditorCommand::run`] refuses everyone outside `auditors` before any of
//! them runs, and records in the audit log that the auditor ran it.

use chrono::Utc;
use clap::{Args, Subcommand};

use super::Call;
use crate::audit::{Anchor, AuditEvent, AuditKind};
use crate::control::error::{ControlError, Reply};
use crate::control::requests::Caller;
use crate::control::{audit, sessions};

#[derive(Debug, Subcommand)]
pub enum AuditorCommand {
    /// Recorded sessions (auditors).
    Sessions(Sessions),
    /// Play a recording with its original timing (auditors).
    Replay(Replay),
    /// Follow a live session read-only (auditors).
    Watch(Watch),
    /// A recording as asciicast v2 on stdout (auditors).
    Export(Export),
    /// Audit events; `audit verify` checks the hash chain (auditors).
    Audit(Audit),
}

impl AuditorCommand {
    /// The subcommand's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            AuditorCommand::Sessions(_) => "sessions",
            AuditorCommand::Replay(_) => "replay",
            AuditorCommand::Watch(_) => "watch",
            AuditorCommand::Export(_) => "export",
            AuditorCommand::Audit(_) => "audit",
        }
    }

    /// Runs the command for an auditor; refuses anyone else.
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        let auditors = &call.caller.state.config.auditors;
        if !call.caller.policy.is_member(call.caller.user, auditors) {
            return Err(ControlError::NotAuditor {
                auditors: auditors.clone(),
            });
        }
        match self {
            AuditorCommand::Sessions(cmd) => cmd.run(call).await,
            AuditorCommand::Replay(cmd) => cmd.run(call).await,
            AuditorCommand::Watch(cmd) => cmd.run(call).await,
            AuditorCommand::Export(cmd) => cmd.run(call).await,
            AuditorCommand::Audit(cmd) => cmd.run(call).await,
        }
    }
}

/// Records that the auditor ran a command; a failed append refuses the command.
async fn record(
    caller: &Caller<'_>,
    event: impl FnOnce(AuditEvent) -> AuditEvent,
    kind: AuditKind,
) -> Result<(), ControlError> {
    let event = event(AuditEvent::new(kind, caller.user, Utc::now()));
    caller
        .state
        .audit_or_refuse(event)
        .await
        .map_err(ControlError::Refused)
}

#[derive(Debug, Args)]
pub struct Sessions {
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
}

impl Sessions {
    async fn run(self, call: &mut Call<'_>) -> Reply {
        let grep = self.grep.clone();
        record(
            &call.caller,
            |e| e.detail("grep", grep),
            AuditKind::AuditorSessions,
        )
        .await?;
        let filter = sessions::SessionFilter {
            user: self.user,
            target: self.target,
            since: self.since,
            active: self.active,
            grep: self.grep,
        };
        sessions::list(&call.caller, filter, self.json).await
    }
}

#[derive(Debug, Args)]
pub struct Replay {
    session: String,
    /// Faster (2) or slower (0.5) than real time; pauses are capped at 2s first.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Pass every recorded terminal sequence, also those that set the clipboard
    /// or the title, make links, or query the terminal (dropped by default).
    #[arg(long)]
    raw: bool,
}

impl Replay {
    async fn run(self, call: &mut Call<'_>) -> Reply {
        let caller = &call.caller;
        let found = sessions::find(caller, &self.session).await?;
        let raw = self.raw;
        record(
            caller,
            |e| e.detail("session", found.id).detail("raw", raw),
            AuditKind::AuditorReplay,
        )
        .await?;
        sessions::replay(caller, &call.client.out, &found, self.speed, raw).await
    }
}

#[derive(Debug, Args)]
pub struct Watch {
    session: String,
    /// Pass every terminal sequence, as for `replay --raw`.
    #[arg(long)]
    raw: bool,
}

impl Watch {
    async fn run(self, call: &mut Call<'_>) -> Reply {
        let found = sessions::find(&call.caller, &self.session).await?;
        let raw = self.raw;
        record(
            &call.caller,
            |e| e.detail("session", found.id).detail("raw", raw),
            AuditKind::AuditorWatch,
        )
        .await?;
        sessions::watch(&call.caller, call.client, &found, raw).await
    }
}

#[derive(Debug, Args)]
pub struct Export {
    session: String,
}

impl Export {
    async fn run(self, call: &mut Call<'_>) -> Reply {
        let caller = &call.caller;
        let found = sessions::find(caller, &self.session).await?;
        record(
            caller,
            |e| e.detail("session", found.id),
            AuditKind::AuditorExport,
        )
        .await?;
        sessions::export(caller, &call.client.out, &found).await
    }
}

#[derive(Debug, Args)]
pub struct Audit {
    #[command(subcommand)]
    action: Option<AuditAction>,
    /// Only events within this long, e.g. 24h.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum AuditAction {
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

impl Audit {
    async fn run(self, call: &mut Call<'_>) -> Reply {
        let caller = &call.caller;
        match self.action {
            Some(AuditAction::Verify {
                recordings,
                anchors,
            }) => {
                let anchored: Vec<String> = anchors.iter().map(|a| a.to_string()).collect();
                record(
                    caller,
                    |e| {
                        e.detail("recordings", recordings)
                            .detail("anchors", anchored)
                    },
                    AuditKind::AuditorVerify,
                )
                .await?;
                audit::verify(&call.context.state, recordings, anchors).await
            }
            None => {
                let since = self.since.clone();
                record(
                    caller,
                    |e| e.detail("since", since),
                    AuditKind::AuditorAudit,
                )
                .await?;
                audit::list(&call.context.state, caller.now, self.since, self.json).await
            }
        }
    }
}
