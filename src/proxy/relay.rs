//! The byte path between a client's session channel and the target's.
//!
//! Two pumps, one per direction, polled concurrently in the channel's task. Each pump
//! waits only on its own direction: writes wait for the receiver's SSH window, and the
//! reads come from russh's bounded per-channel queues. A slow reader therefore makes its
//! writer wait, nothing is buffered beyond those queues and windows, and one direction
//! stalling never stops the other.

use std::collections::VecDeque;

use russh::client;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

use crate::server::{ClientChannel, ClientOut};

/// The replies the target owes us, in the order the requests were sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingReply {
    Pty,
    /// The session-starting request, described for the error message.
    Start(String),
}

/// How a relayed session ended, for logs and the recording.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
}

/// Relays until either side closes the channel.
pub async fn relay(
    client: ClientChannel,
    upstream: Channel<client::Msg>,
    pending: VecDeque<PendingReply>,
) -> Outcome {
    let (up_reader, up_writer) = upstream.split();
    let ClientChannel { reader, out } = client;
    let mut outcome = Outcome::default();
    let mut to_target = 0u64;
    tokio::select! {
        _ = client_to_target(reader, &up_writer, &mut to_target) => {
            // The client closed its channel: close the target's too.
            let _ = up_writer.close().await;
        }
        _ = target_to_client(up_reader, &out, pending, &mut outcome) => {}
    }
    outcome.bytes_to_target = to_target;
    outcome
}

async fn client_to_target(
    mut reader: ChannelReadHalf,
    target: &ChannelWriteHalf<client::Msg>,
    bytes: &mut u64,
) {
    while let Some(msg) = reader.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                *bytes += data.len() as u64;
                target.data_bytes(data).await
            }
            ChannelMsg::Eof => target.eof().await,
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                target
                    .window_change(col_width, row_height, pix_width, pix_height)
                    .await
            }
            ChannelMsg::Signal { signal } => target.signal(signal).await,
            ChannelMsg::Close => return,
            _ => Ok(()),
        };
        if sent.is_err() {
            return; // the target's channel is gone; the other pump reports it
        }
    }
}

async fn target_to_client(
    mut reader: ChannelReadHalf,
    client: &ClientOut,
    mut pending: VecDeque<PendingReply>,
    outcome: &mut Outcome,
) {
    let writer = &client.writer;
    while let Some(msg) = reader.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                outcome.bytes_from_target += data.len() as u64;
                writer.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                outcome.bytes_from_target += data.len() as u64;
                writer.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => writer.eof().await,
            ChannelMsg::ExitStatus { exit_status } => {
                outcome.exit_status = Some(exit_status);
                writer.exit_status(exit_status).await
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                outcome.exit_signal = Some(format!("{signal_name:?}"));
                let _ = client
                    .handle
                    .exit_signal_request(
                        writer.id(),
                        signal_name,
                        core_dumped,
                        error_message,
                        lang_tag,
                    )
                    .await;
                Ok(())
            }
            ChannelMsg::Success => {
                pending.pop_front();
                Ok(())
            }
            ChannelMsg::Failure => match pending.pop_front() {
                Some(PendingReply::Pty) => {
                    client.notice("the target refused to allocate a pty").await;
                    Ok(())
                }
                Some(PendingReply::Start(what)) => {
                    client
                        .notice(&format!("the target refused the {what} request"))
                        .await;
                    outcome.exit_status = Some(1);
                    let _ = writer.exit_status(1).await;
                    break;
                }
                None => Ok(()),
            },
            ChannelMsg::Close => break,
            _ => Ok(()),
        };
        if sent.is_err() {
            return; // the client is gone
        }
    }
    if outcome.exit_status.is_none() && outcome.exit_signal.is_none() {
        client.notice("the connection to the target was lost").await;
        outcome.exit_status = Some(255);
        let _ = writer.exit_status(255).await;
    }
    client.close().await;
}
