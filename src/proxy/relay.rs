//! The byte path between a client's session channel and the target's.
//!
//! Each direction is a [`drain`] (russh queue → byte-bounded [`pipe`]) joined with a
//! writer (pipe → the peer, waiting for the peer's SSH window). A slow reader makes its
//! writer wait once the pipe is full; neither direction ever blocks the other.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use russh::client;
use russh::{Channel, ChannelMsg, ChannelWriteHalf};

use super::pipe::{drain, pipe, Drained, Overdraft, PipeRx};
use super::sftp::SymlinkGuard;
use crate::budget::Budget;
use crate::record::{SessionRecorder, Stream};
use crate::session::{ClientChannel, ClientOut, WindowSize};

/// How long a target may take to confirm a close the client started.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a notice to the client may wait for the client's window: a client that
/// never reads must not keep a session (and its recording) open.
pub const NOTICE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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

/// Exit status a client sees when the bastion ends its session (grant revoked or
/// expired), the same status OpenSSH reports for a lost connection.
pub const ENDED_BY_BASTION: u32 = 255;

/// What one session's relay may hold, and for how long.
pub struct Bounds<'a> {
    /// `[limits] idle_window_timeout`.
    pub idle_window: std::time::Duration,
    /// `[limits] relay_memory`, shared by every session.
    pub memory: &'a Arc<Budget>,
}

/// Relays until either side closes the channel, or until `stop` resolves: then the
/// target's channel is closed and the stop message is returned, for the caller to
/// tell the client once the recording is finished (a client that never reads must
/// not hold the end of its own session hostage).
///
/// The client's channel is left open and handed back: the caller closes it once
/// the recording is stored, so that when `ssh` returns, the session's record and
/// audit event are already there.
///
/// A peer whose window stays shut for `bounds.idle_window` (it reads nothing it is
/// sent) ends the session the same way, so it cannot pin the relay's buffers for
/// ever.
/// An sftp request that `symlink_guard` refuses is not forwarded, nor anything
/// after it; the guard ends the session through `stop`.
pub async fn relay(
    client: ClientChannel,
    upstream: Channel<client::Msg>,
    pending: VecDeque<PendingReply>,
    recording: &SessionRecorder,
    stop: impl Future<Output = String>,
    bounds: Bounds<'_>,
    symlink_guard: Option<SymlinkGuard>,
) -> (Outcome, ClientOut, Option<String>) {
    let (up_reader, up_writer) = upstream.split();
    let ClientChannel { reader, out } = client;
    let (to_target_tx, to_target_rx) = pipe(bounds.memory);
    let (to_client_tx, to_client_rx) = pipe(bounds.memory);
    let to_target_overdraft = to_target_tx.overdraft();
    let to_client_overdraft = to_client_tx.overdraft();
    let mut outcome = Outcome::default();
    let mut bytes_to_target = 0;
    let shared = Shared {
        client_input_closed: AtomicBool::new(false),
        stalled: Stalled {
            limit: bounds.idle_window,
            why: OnceLock::new(),
        },
    };
    let stopped = {
        let client_side = async {
            let (drained, ()) = tokio::join!(
                drain(reader, to_target_tx, || shared
                    .client_input_closed
                    .store(true, Ordering::Release)),
                write_to_target(
                    to_target_rx,
                    &up_writer,
                    &to_client_overdraft,
                    recording,
                    &shared.stalled,
                    &mut bytes_to_target,
                    symlink_guard
                )
            );
            drained
        };
        let target_side = async {
            tokio::join!(
                drain(up_reader, to_client_tx, || {}),
                write_to_client(
                    to_client_rx,
                    &out,
                    &to_target_overdraft,
                    pending,
                    recording,
                    &shared,
                    &mut outcome
                )
            );
        };
        let (mut client_side, mut target_side) = (pin!(client_side), pin!(target_side));
        let mut stopped_with = None;
        tokio::select! {
            drained = &mut client_side => {
                // The client closed its channel. Close the target's too, but keep relaying
                // until the target confirms: sshd may still send the exit status, which
                // OpenSSH clients (ControlMaster in particular) wait for. A client whose
                // connection vanished waits for nothing.
                //
                // The target's side keeps being relayed while the close is sent: the
                // target connection's reader loop may be blocked on our full queue, and
                // it has to move for the close to go out.
                let confirmed = tokio::time::timeout(CLOSE_GRACE, async {
                    let close = pin!(up_writer.close());
                    tokio::select! {
                        _ = close => if drained == Drained::Closed {
                            (&mut target_side).await;
                        },
                        () = &mut target_side => {}
                    }
                });
                if confirmed.await.is_err() {
                    tracing::debug!("target did not confirm the channel close in time");
                }
            }
            _ = &mut target_side => {}
            message = stop => stopped_with = Some(message),
        }
        stopped_with
    };
    let stopped = stopped.or_else(|| shared.stalled.why.get().cloned());
    if stopped.is_some() {
        stop_writer(&up_writer).await;
        outcome.exit_status = Some(ENDED_BY_BASTION);
    }
    outcome.bytes_to_target = bytes_to_target;
    (outcome, out, stopped)
}

/// Ends what runs on the target: sshd does not signal a command without a pty when
/// its channel closes, so a revoked `sleep 60; rm -rf` would go on. The command is
/// sent SIGTERM, then the channel is closed (a pty session also gets SIGHUP).
pub async fn stop_remote(channel: &Channel<client::Msg>) {
    let _ = channel.signal(russh::Sig::TERM).await;
    let _ = channel.close().await;
}

async fn stop_writer(writer: &ChannelWriteHalf<client::Msg>) {
    let _ = writer.signal(russh::Sig::TERM).await;
    let _ = writer.close().await;
}

/// A `portcullis: ...` notice that gives up after [`NOTICE_GRACE`] when the
/// client's window stays shut.
pub async fn tell(client: &ClientOut, message: &str) {
    if tokio::time::timeout(NOTICE_GRACE, client.notice(message))
        .await
        .is_err()
    {
        tracing::debug!("the client did not read the notice in time");
    }
}

async fn write_to_target(
    mut pipe: PipeRx,
    target: &ChannelWriteHalf<client::Msg>,
    overdraft: &Overdraft,
    recording: &SessionRecorder,
    stalled: &Stalled,
    bytes: &mut u64,
    mut symlink_guard: Option<SymlinkGuard>,
) {
    let mut held = 0;
    while let Some(msg) = pipe.recv(&mut held).await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                if symlink_guard
                    .as_mut()
                    .is_some_and(|guard| !guard.pass(&data))
                {
                    return;
                }
                *bytes += data.len() as u64;
                recording.input(&data).await;
                stalled
                    .unless("target", with_overdraft(overdraft, target.data_bytes(data)))
                    .await
            }
            // Every write that waits on the target is bounded by the idle window,
            // like data: a session never hangs on a peer that stopped reading.
            ChannelMsg::Eof => stalled.unless("target", target.eof()).await,
            ChannelMsg::Signal { signal } => stalled.unless("target", target.signal(signal)).await,
            ChannelMsg::Close => return,
            // A window change is passed on (and recorded); anything else is not.
            other => match WindowSize::of(&other) {
                Some(size) => {
                    recording.resize(size.cols, size.rows).await;
                    let change =
                        target.window_change(size.cols, size.rows, size.pix_width, size.pix_height);
                    stalled.unless("target", change).await
                }
                None => Ok(()),
            },
        };
        if sent.is_err() {
            return; // the target's channel is gone; the other direction reports it
        }
    }
}

/// What the two directions of one session's relay know of each other.
struct Shared {
    /// The client sent its EOF (see `write_to_client` for why that matters).
    client_input_closed: AtomicBool,
    stalled: Stalled,
}

/// The idle-window limit of one session, and why it was hit, if it was.
struct Stalled {
    limit: std::time::Duration,
    why: OnceLock<String>,
}

impl Stalled {
    /// Runs a write that waits for `peer`'s window, giving up (and keeping the
    /// reason) when the window stayed shut for the whole limit. A write that
    /// finishes at once (the common case, every keystroke) never arms a timer.
    async fn unless(
        &self,
        peer: &str,
        write: impl Future<Output = Result<(), russh::Error>>,
    ) -> Result<(), russh::Error> {
        let mut write = pin!(write);
        if let Poll::Ready(done) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            return done;
        }
        match tokio::time::timeout(self.limit, write).await {
            Ok(done) => done,
            Err(elapsed) => {
                let _ = self.why.set(format!(
                    "the {peer} read nothing for {} ([limits] idle_window_timeout) — session closed",
                    crate::duration::format(self.limit)
                ));
                Err(elapsed.into())
            }
        }
    }
}

/// Runs one write; if it cannot finish at once (the peer's window is shut or its
/// connection loop is busy), the opposite pipe may overdraw until it does, so that the
/// loop we wait on can read its way to the window adjustment we need (see `pipe`).
async fn with_overdraft<T>(overdraft: &Overdraft, write: impl Future<Output = T>) -> T {
    let mut write = pin!(write);
    if let Poll::Ready(done) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return done;
    }
    overdraft.open();
    let done = write.await;
    overdraft.close();
    done
}

/// Forwards the target's side to the client.
///
/// The target's EOF is forwarded when it happens while the client's input is still
/// open, so a reader sees the end of a command's output when the command closes it.
/// Once the client has sent its own EOF, the target's EOF waits for the exit status:
/// an OpenSSH ControlMaster closes a session channel as soon as EOF went both ways,
/// and russh answers a close at once, so a status sent after it would be lost and
/// the client would report 255.
async fn write_to_client(
    mut pipe: PipeRx,
    client: &ClientOut,
    overdraft: &Overdraft,
    mut pending: VecDeque<PendingReply>,
    recording: &SessionRecorder,
    shared: &Shared,
    outcome: &mut Outcome,
) {
    let stalled = &shared.stalled;
    let writer = &client.writer;
    let mut held = 0;
    let mut closed_by_target = false;
    let mut eof_waits_for_status = false;
    while let Some(msg) = pipe.recv(&mut held).await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                outcome.bytes_from_target += data.len() as u64;
                recording.output(Stream::Stdout, &data).await;
                stalled
                    .unless("client", with_overdraft(overdraft, writer.data_bytes(data)))
                    .await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                outcome.bytes_from_target += data.len() as u64;
                recording.output(Stream::Stderr, &data).await;
                stalled
                    .unless(
                        "client",
                        with_overdraft(overdraft, writer.extended_data_bytes(ext, data)),
                    )
                    .await
            }
            ChannelMsg::Eof if !shared.client_input_closed.load(Ordering::Acquire) => {
                stalled.unless("client", client.eof()).await
            }
            ChannelMsg::Eof => {
                eof_waits_for_status = true;
                Ok(())
            }
            ChannelMsg::ExitStatus { exit_status } => {
                outcome.exit_status = Some(exit_status);
                let sent = stalled
                    .unless("client", writer.exit_status(exit_status))
                    .await;
                if eof_waits_for_status {
                    let _ = stalled.unless("client", client.eof()).await;
                }
                sent
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
                if eof_waits_for_status {
                    let _ = client.eof().await;
                }
                Ok(())
            }
            ChannelMsg::Success => {
                pending.pop_front();
                Ok(())
            }
            ChannelMsg::Failure => match pending.pop_front() {
                Some(PendingReply::Pty) => {
                    tell(client, "the target refused to allocate a pty").await;
                    Ok(())
                }
                Some(PendingReply::Start(what)) => {
                    tell(client, &format!("the target refused the {what} request")).await;
                    outcome.exit_status = Some(1);
                    let _ = writer.exit_status(1).await;
                    break;
                }
                None => Ok(()),
            },
            ChannelMsg::Close => {
                closed_by_target = true;
                break;
            }
            _ => Ok(()),
        };
        if sent.is_err() {
            return; // the client is gone
        }
    }
    if outcome.exit_status.is_none() && outcome.exit_signal.is_none() {
        let what = if closed_by_target {
            // e.g. sshd's ChannelTimeout, or a target-side session limit
            "the target closed the session without an exit status"
        } else {
            "the connection to the target was lost"
        };
        tell(client, what).await;
        outcome.exit_status = Some(255);
        let _ = writer.exit_status(255).await;
    }
}
