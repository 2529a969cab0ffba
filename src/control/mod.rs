//! The control plane: commands run with `ssh portcullis@bastion CMD ...`.

use crate::server::{ChannelContext, ClientChannel, Start};

/// The command table shown by `help`.
pub const HELP: &str = "\
portcullis control plane — run as: ssh -p PORT portcullis@BASTION COMMAND [ARGS]

  whoami                      your identity, groups and active grants
  help                        this table

Connect to a target with: ssh -p PORT LOGIN@TARGET@BASTION (or TARGET@BASTION for its default login)
";

/// Runs one control-plane command on a session channel.
pub async fn run(context: &ChannelContext, client: ClientChannel, start: Start) {
    let out = &client.out;
    let command = match start {
        Start::Exec(command) => command,
        Start::Shell => {
            out.stdout(HELP).await;
            out.exit(0).await;
            return;
        }
        Start::Subsystem(name) => {
            out.fail(&format!("the control plane has no subsystem {name:?}; run commands with ssh portcullis@BASTION COMMAND"), 1).await;
            return;
        }
    };
    let Some(words) = std::str::from_utf8(&command).ok().and_then(shlex::split) else {
        out.fail(
            "cannot parse the command line: use UTF-8 and balanced quotes",
            2,
        )
        .await;
        return;
    };
    let user = &context.identity.user;
    tracing::info!(%user, command = ?words, "control command");
    match words.first().map(String::as_str) {
        None | Some("help") | Some("--help") => {
            out.stdout(HELP).await;
            out.exit(0).await;
        }
        Some("whoami") => {
            let text = whoami(context, words.iter().any(|w| w == "--json"));
            out.stdout(&text).await;
            out.exit(0).await;
        }
        Some(other) => {
            let other: String = other.chars().take(40).collect();
            out.fail(
                &format!("unknown command {other:?}; run `help` for the list"),
                2,
            )
            .await;
        }
    }
}

fn whoami(context: &ChannelContext, json: bool) -> String {
    let policy = context.state.policy();
    let user = &context.identity.user;
    let groups = policy
        .users
        .get(user)
        .map(|u| u.groups.clone())
        .unwrap_or_default();
    if json {
        let doc = serde_json::json!({ "user": user, "groups": groups });
        return format!("{doc}\n");
    }
    format!(
        "user:   {user}\ngroups: {}\n",
        if groups.is_empty() {
            "-".to_string()
        } else {
            groups.join(", ")
        }
    )
}
