//! Proxied sessions: authorise, connect to the target, replay the client's set-up and
//! relay the channel.

mod pipe;
mod relay;
mod upstream;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use russh::client;

use crate::grant::{authorize, AccessRequest, Decision, Permit};
use crate::server::{ChannelContext, ClientChannel, SessionSetup, Start};

pub use relay::{Outcome, PendingReply};
pub use upstream::{client_config, connect, PinnedHostKey, Upstream, UpstreamError, UpstreamSlot};

/// The client configuration towards targets, built once.
fn shared_client_config() -> Arc<client::Config> {
    static CONFIG: OnceLock<Arc<client::Config>> = OnceLock::new();
    CONFIG.get_or_init(|| Arc::new(client_config())).clone()
}

/// Runs one proxied session channel to its end.
pub async fn run(
    context: &ChannelContext,
    client: ClientChannel,
    setup: SessionSetup,
    start: Start,
    target: &str,
    login: Option<&str>,
) {
    let user = context.identity.user.as_str();
    let request = AccessRequest {
        user,
        target,
        login,
        action: start.action(),
    };
    let permit = match authorize(&context.state.policy(), &request) {
        Decision::Allow(permit) => permit,
        Decision::Deny(reason) => {
            tracing::warn!(user, target, action = %start.action().describe(), %reason, "denied");
            client.out.fail(&reason, 1).await;
            return;
        }
    };
    let channel = match open_target_channel(context, &permit).await {
        Ok(channel) => channel,
        Err(err) => {
            tracing::warn!(user, target, error = %err, "cannot open target session");
            client.out.fail(&err.to_string(), 1).await;
            return;
        }
    };
    let pending = match start_remote_session(&channel, setup, &start).await {
        Ok(pending) => pending,
        Err(err) => {
            client
                .out
                .fail(&format!("target '{target}' closed the session: {err}"), 1)
                .await;
            return;
        }
    };
    tracing::info!(user, target, login = %permit.login, action = %start.action().describe(), "session started");
    let outcome = relay::relay(client, channel, pending).await;
    tracing::info!(
        user,
        target,
        exit_status = ?outcome.exit_status,
        exit_signal = ?outcome.exit_signal,
        bytes_in = outcome.bytes_to_target,
        bytes_out = outcome.bytes_from_target,
        "session ended"
    );
}

/// A session channel on the connection's upstream, connecting first if needed.
async fn open_target_channel(
    context: &ChannelContext,
    permit: &Permit,
) -> Result<russh::Channel<client::Msg>, UpstreamError> {
    let state = &context.state;
    let upstream = context
        .upstream
        .get_or_connect(connect(
            shared_client_config(),
            &permit.target,
            &permit.login,
            state.keys.upstream.clone(),
            state.config.connect_timeout,
        ))
        .await?;
    upstream
        .channel_open_session()
        .await
        .map_err(|source| UpstreamError::Protocol {
            target: permit.target.name.clone(),
            source,
        })
}

/// Replays pty and environment, then sends the session-starting request. Returns the
/// replies the target still owes, in order.
async fn start_remote_session(
    channel: &russh::Channel<client::Msg>,
    setup: SessionSetup,
    start: &Start,
) -> Result<VecDeque<PendingReply>, russh::Error> {
    let mut pending = VecDeque::new();
    if let Some(pty) = &setup.pty {
        channel
            .request_pty(
                true,
                &pty.term,
                pty.cols,
                pty.rows,
                pty.pix_width,
                pty.pix_height,
                &pty.modes,
            )
            .await?;
        pending.push_back(PendingReply::Pty);
    }
    for (name, value) in setup.env {
        channel.set_env(false, name, value).await?;
    }
    match start {
        Start::Shell => channel.request_shell(true).await?,
        Start::Exec(command) => channel.exec(true, command.clone()).await?,
        Start::Subsystem(name) => channel.request_subsystem(true, name).await?,
    }
    pending.push_back(PendingReply::Start(start.action().describe()));
    Ok(pending)
}
