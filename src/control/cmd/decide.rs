//! The commands that decide or end a request: `approve`, `deny` and `revoke`.
//! Approve and deny pass step-up first where the request's flow wants TOTP.

use clap::Args;

use super::Call;
use crate::control::error::Reply;
use crate::control::{requests, step_up};

#[derive(Debug, Args)]
pub struct Approve {
    id: String,
    #[arg(long)]
    comment: Option<String>,
    /// Your current TOTP code, where the request's flow has `step_up = "totp"`.
    #[arg(long)]
    totp: Option<String>,
    #[arg(long)]
    json: bool,
}

impl Approve {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        step_up::for_decision(call, &self.id, self.totp).await?;
        requests::approve(&call.caller, &self.id, self.comment, self.json).await
    }
}

#[derive(Debug, Args)]
pub struct Deny {
    id: String,
    #[arg(long)]
    reason: String,
    /// Your current TOTP code, where the request's flow has `step_up = "totp"`.
    #[arg(long)]
    totp: Option<String>,
    #[arg(long)]
    json: bool,
}

impl Deny {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        step_up::for_decision(call, &self.id, self.totp).await?;
        requests::deny(&call.caller, &self.id, self.reason, self.json).await
    }
}

#[derive(Debug, Args)]
pub struct Revoke {
    id: String,
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    json: bool,
}

impl Revoke {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        requests::revoke(&call.caller, &self.id, self.reason, self.json).await
    }
}
