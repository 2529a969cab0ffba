//! `whoami`: your identity, groups, TOTP enrolment and active grants.

use clap::Args;

use super::Call;
use crate::control::error::Reply;
use crate::control::{requests, table};

#[derive(Debug, Args)]
pub struct Whoami {
    #[arg(long)]
    json: bool,
}

impl Whoami {
    pub async fn run(self, call: &mut Call<'_>) -> Reply {
        let caller = &call.caller;
        let user = caller.user;
        let groups = caller
            .policy
            .users
            .get(user)
            .map(|u| u.groups.clone())
            .unwrap_or_default();
        let active = requests::own_active(caller).await?;
        let totp = call.context.state.totp_enrolled(user).await?;
        if self.json {
            let doc = serde_json::json!({
                "user": user,
                "groups": groups,
                "totp_enrolled": totp,
                "grants": active,
            });
            return Ok(format!("{doc}\n"));
        }
        let mut text = format!(
            "user:   {user}\ngroups: {}\ntotp:   {}\ngrants: {}\n",
            if groups.is_empty() {
                "-".to_string()
            } else {
                groups.join(", ")
            },
            if totp { "enrolled" } else { "not enrolled" },
            if active.is_empty() { "none" } else { "" }
        );
        for grant in &active {
            text.push_str(&format!(
                "  {}  {}  {}  expires {}\n",
                grant.id,
                grant.destination(),
                crate::display::escape(&grant.scope.describe()),
                grant
                    .expires_at
                    .map(|at| table::relative(at, caller.now))
                    .unwrap_or_default()
            ));
        }
        Ok(text)
    }
}
