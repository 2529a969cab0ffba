//! `totp enroll` and `totp status`: TOTP for step-up.

use clap::{Args, Subcommand};

use super::Call;
use crate::control::error::Reply;
use crate::control::step_up;

#[derive(Debug, Args)]
pub struct Totp {
    #[command(subcommand)]
    action: TotpAction,
}

#[derive(Debug, Subcommand)]
enum TotpAction {
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

impl Totp {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        match self.action {
            TotpAction::Enroll { invite } => {
                step_up::enroll(call.context, call.client, invite).await
            }
            TotpAction::Status => step_up::status(call.context, &call.caller).await,
        }
    }
}
