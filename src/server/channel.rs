//! One session channel from accept to close: collect the set-up requests (pty, env),
//! wait for the request that starts the session (shell, exec or subsystem), then hand
//! the channel to the control plane or to the proxy.

use std::sync::Arc;

use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf};

use crate::config::AcceptEnv;
use crate::proxy::UpstreamPool;
use crate::session::{
    ChannelContext, ClientChannel, ClientOut, PtyRequest, Route, SessionSetup, Start,
};

/// Drives one session channel to its end.
pub async fn serve_channel(
    context: ChannelContext,
    upstream: Arc<UpstreamPool>,
    channel: Channel<Msg>,
) {
    let (mut reader, writer) = channel.split();
    let accept_env = &context.state.config.accept_env;
    let Some((setup, start)) = read_setup(&mut reader, accept_env).await else {
        return; // closed before anything started
    };
    let client = ClientChannel {
        reader,
        out: ClientOut {
            writer,
            handle: context.handle.clone(),
            pty: setup.pty.is_some(),
            eof_sent: Default::default(),
        },
    };
    if let Some(why) = &context.refused {
        return client.out.fail(why, 1).await;
    }
    match &context.identity.route {
        Err(invalid) => {
            let why = invalid.to_string();
            tracing::warn!(user = %context.identity.user, key = %crate::policy::fingerprint(&context.identity.key), reason = %crate::display::escape(&why), "refused: invalid username");
            client.out.fail(&why, 1).await
        }
        Ok(Route::Control) => crate::control::run(&context, client, start).await,
        Ok(Route::Target { target, login }) => {
            crate::proxy::run(
                &context,
                &upstream,
                client,
                setup,
                start,
                target,
                login.as_deref(),
            )
            .await
        }
    }
}

/// How many environment variables one session passes on, and how many bytes of
/// names and values; the rest are dropped (a client cannot grow a channel's
/// set-up without bound).
pub const MAX_ENV: usize = 64;
pub const MAX_ENV_BYTES: usize = 64 * 1024;

/// Collects pty, env (what `accept_env` allows, within [`MAX_ENV`] and
/// [`MAX_ENV_BYTES`]) and window changes until the session-starting request
/// arrives.
async fn read_setup(
    reader: &mut ChannelReadHalf,
    accept_env: &AcceptEnv,
) -> Option<(SessionSetup, Start)> {
    let mut setup = SessionSetup::default();
    let mut env_bytes = 0;
    loop {
        match reader.wait().await? {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                setup.pty = Some(PtyRequest {
                    term,
                    cols: col_width,
                    rows: row_height,
                    pix_width,
                    pix_height,
                    modes: terminal_modes,
                });
            }
            msg @ ChannelMsg::WindowChange { .. } => setup.keep_window_change(&msg),
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } if accept_env.allows(&variable_name) => {
                let bytes = variable_name.len() + variable_value.len();
                if setup.env.len() < MAX_ENV && env_bytes + bytes <= MAX_ENV_BYTES {
                    env_bytes += bytes;
                    setup.env.push((variable_name, variable_value));
                } else {
                    tracing::debug!(
                        "dropped an environment variable over {MAX_ENV} or {MAX_ENV_BYTES} bytes"
                    );
                }
            }
            ChannelMsg::RequestShell { .. } => return Some((setup, Start::Shell)),
            ChannelMsg::Exec { command, .. } => return Some((setup, Start::Exec(command))),
            ChannelMsg::RequestSubsystem { name, .. } => {
                return Some((setup, Start::Subsystem(name)))
            }
            ChannelMsg::Close => return None,
            // Data before the session starts has nowhere to go (OpenSSH never sends it).
            _ => {}
        }
    }
}
