//! What a session channel is, for every layer that serves one: who is on the
//! connection ([`Identity`]), what the channel task gets from its connection
//! ([`ChannelContext`]), what the client asked for before starting ([`SessionSetup`],
//! [`Start`]) and the client's side of the channel ([`ClientChannel`], [`ClientOut`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty};

use super::route::{InvalidUsername, Route};
use super::State;
use crate::audit::{AuditEvent, AuditKind};
use crate::grant::Action;

/// Who is on this connection and where they asked to go.
#[derive(Debug)]
pub struct Identity {
    pub user: String,
    /// The key the user authenticated with: re-checked against the policy at every
    /// reload and every channel open, so a removed or rotated key stops working at
    /// once, ControlMaster connections included.
    pub key: russh::keys::PublicKey,
    pub route: Result<Route, InvalidUsername>,
    pub peer: Option<SocketAddr>,
    /// When this connection last passed a TOTP check (at authentication, or for an
    /// approver's decision).
    pub stepped_up: std::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>>,
}

impl Identity {
    pub fn new(
        user: String,
        key: russh::keys::PublicKey,
        route: Result<Route, InvalidUsername>,
        peer: Option<SocketAddr>,
        stepped_up: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Identity {
        Identity {
            user,
            key,
            route,
            peer,
            stepped_up: std::sync::Mutex::new(stepped_up),
        }
    }

    pub fn stepped_up_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        *self.stepped_up.lock().expect("identity lock poisoned")
    }

    /// Whether this connection passed TOTP within `max_age` of now. A step-up that
    /// seems to lie in the future (the clock stepped back) is not fresh.
    pub fn stepped_up_within(&self, max_age: std::time::Duration) -> bool {
        self.stepped_up_at().is_some_and(|at| {
            (chrono::Utc::now() - at)
                .to_std()
                .is_ok_and(|age| age <= max_age)
        })
    }

    pub fn mark_stepped_up(&self, at: chrono::DateTime<chrono::Utc>) {
        *self.stepped_up.lock().expect("identity lock poisoned") = Some(at);
    }

    /// Why this identity no longer holds under `policy`, if it does not: the key
    /// was removed or now belongs to someone else, or the user left the policy.
    pub fn withdrawn(&self, policy: &crate::policy::Policy) -> Option<String> {
        let key = crate::policy::fingerprint(&self.key);
        let user = &self.user;
        match policy.user_by_key(&self.key) {
            Some(owner) if owner.name == *user => None,
            Some(owner) => Some(format!("key {key} now belongs to {}", owner.name)),
            None if policy.users.contains_key(user) => {
                Some(format!("key {key} was removed from user {user}"))
            }
            None => Some(format!("user {user} was removed from the policy")),
        }
    }
}

/// What a channel task needs from its connection.
pub struct ChannelContext {
    /// Why this connection may do nothing (the user is over a cap), told to the
    /// client on each channel.
    pub refused: Option<String>,
    pub state: Arc<State>,
    pub identity: Arc<Identity>,
    pub handle: Handle,
}

impl ChannelContext {
    /// Checks a TOTP code the connected user typed for `purpose`, with its audit
    /// events (success, failure, lockout). An accepted code counts as this
    /// connection's latest step-up. The check syncs the consumed step to disk, so
    /// it runs on the blocking pool.
    pub async fn check_totp(&self, code: &str, purpose: &str) -> Result<(), String> {
        let user = self.identity.user.as_str();
        let now = chrono::Utc::now();
        let (checked, code) = (user.to_string(), code.to_string());
        let verdict = self
            .state
            .blocking(move |state| state.totp.verify(&checked, &code, now))
            .await
            .map_err(|e| e.to_string())?;
        let (result, locked) = step_up_events(user, &verdict, now);
        let audited = self
            .state
            .audit_or_refuse(result.detail("purpose", purpose))
            .await;
        if let Some(locked) = locked {
            let _ = self.state.audit(locked.detail("purpose", purpose)).await;
        }
        audited?;
        if verdict == crate::totp::Verdict::Accepted {
            self.identity.mark_stepped_up(now);
            Ok(())
        } else if verdict == crate::totp::Verdict::NotEnrolled {
            let enroll = super::hint::control_line(&self.state.config, &["totp", "enroll"]);
            Err(format!("{user} has no TOTP enrolled: run `{enroll}` first"))
        } else {
            Err(verdict.explain(user))
        }
    }
}

/// The audit events of a TOTP check by `user`: its result (`stepup.success` or
/// `stepup.failure`, saying why), and `stepup.locked` when this check locked the
/// user out. The caller adds where the check happened.
pub fn step_up_events(
    user: &str,
    verdict: &crate::totp::Verdict,
    now: chrono::DateTime<chrono::Utc>,
) -> (AuditEvent, Option<AuditEvent>) {
    let kind = match verdict {
        crate::totp::Verdict::Accepted => AuditKind::StepupSuccess,
        _ => AuditKind::StepupFailure,
    };
    let result = AuditEvent::new(kind, user, now).detail("result", verdict.explain(user));
    let locked = verdict
        .locked_now()
        .then(|| AuditEvent::new(AuditKind::StepupLocked, user, now));
    (result, locked)
}

/// The pseudo-terminal a client asked for.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
    pub modes: Vec<(Pty, u32)>,
}

/// Everything the client sent before starting the session, replayed to the target.
#[derive(Debug, Default)]
pub struct SessionSetup {
    pub pty: Option<PtyRequest>,
    pub env: Vec<(String, String)>,
}

impl SessionSetup {
    /// Keeps the terminal's new size from a `window-change`, so the target's pty
    /// starts at the size the client has now; any other message is ignored.
    pub fn keep_window_change(&mut self, msg: &ChannelMsg) {
        if let (Some(pty), Some(size)) = (self.pty.as_mut(), WindowSize::of(msg)) {
            (pty.cols, pty.rows, pty.pix_width, pty.pix_height) =
                (size.cols, size.rows, size.pix_width, size.pix_height);
        }
    }
}

/// A terminal's size from a client's `window-change`: the one place that
/// unpacks the message, for the set-up before a session and the relay during it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
}

impl WindowSize {
    /// The size `msg` carries, if it is a `window-change`.
    pub fn of(msg: &ChannelMsg) -> Option<WindowSize> {
        match *msg {
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => Some(WindowSize {
                cols: col_width,
                rows: row_height,
                pix_width,
                pix_height,
            }),
            _ => None,
        }
    }
}

/// The request that starts the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

impl Start {
    pub fn action(&self) -> Action<'_> {
        match self {
            Start::Shell => Action::Shell,
            Start::Exec(command) => Action::Exec(command),
            Start::Subsystem(name) => Action::Subsystem(name),
        }
    }
}

/// The client's side of a session channel: the reader feeds the client-to-target
/// direction, [`ClientOut`] everything sent back.
pub struct ClientChannel {
    pub reader: ChannelReadHalf,
    pub out: ClientOut,
}

pub const CTRL_C: u8 = 0x03;
pub const CTRL_D: u8 = 0x04;
const BACKSPACE: u8 = 0x7f;
const CTRL_H: u8 = 0x08;

/// Longest line [`ClientChannel::read_line`] keeps.
const MAX_LINE: usize = 500;

impl ClientChannel {
    /// Reads one line the user types: a reason, a TOTP code. With a pty the client's
    /// terminal is in raw mode, so this echoes (when `echo`) and handles backspace
    /// itself; without one, the client's own terminal did that. `None` on Ctrl-C,
    /// Ctrl-D, an empty line or a closed channel. Other messages (window changes)
    /// go to `on_other`.
    pub async fn read_line(
        &mut self,
        echo: bool,
        mut on_other: impl FnMut(&ChannelMsg),
    ) -> Option<String> {
        let echo = echo && self.out.pty;
        let mut line: Vec<u8> = Vec::new();
        loop {
            let data = match self.reader.wait().await? {
                ChannelMsg::Data { data } => data,
                ChannelMsg::Eof | ChannelMsg::Close => return None,
                msg => {
                    on_other(&msg);
                    continue;
                }
            };
            for &byte in data.iter() {
                match byte {
                    CTRL_C | CTRL_D => return None,
                    b'\r' | b'\n' => {
                        if self.out.pty {
                            self.out.stderr("\n").await;
                        }
                        let text = String::from_utf8_lossy(&line).trim().to_string();
                        return (!text.is_empty()).then_some(text);
                    }
                    BACKSPACE | CTRL_H => {
                        // Drop one whole UTF-8 character.
                        while let Some(last) = line.pop() {
                            if last & 0xC0 != 0x80 {
                                break;
                            }
                        }
                        if echo {
                            self.out.stderr("\x08 \x08").await;
                        }
                    }
                    byte if byte >= 0x20 && line.len() < MAX_LINE => {
                        line.push(byte);
                        if echo {
                            let _ = self.out.writer.extended_data(1, &[byte][..]).await;
                        }
                    }
                    _ => {} // other control bytes (arrows, escape sequences) are ignored
                }
            }
        }
    }
}

/// Writes towards the client.
pub struct ClientOut {
    pub writer: ChannelWriteHalf<Msg>,
    pub handle: Handle,
    /// Whether the client has a pty: messages then need `\r\n` line ends.
    pub pty: bool,
    /// EOF was sent (a relay forwards the target's as it happens); sent once only.
    pub eof_sent: std::sync::atomic::AtomicBool,
}

impl ClientOut {
    /// Writes a message to the client's stderr and ends the session with `status`.
    pub async fn fail(&self, message: &str, status: u32) {
        self.notice(message).await;
        self.exit(status).await;
    }

    /// A `portcullis: ...` line on the client's stderr.
    pub async fn notice(&self, message: &str) {
        self.stderr(&format!("portcullis: {message}\n")).await;
    }

    /// Writes to the client's stderr, translating line ends for a pty.
    pub async fn stderr(&self, text: &str) {
        let _ = self
            .writer
            .extended_data_bytes(1, self.for_terminal(text))
            .await;
    }

    /// Writes to the client's stdout, translating line ends for a pty.
    pub async fn stdout(&self, text: &str) {
        let _ = self.writer.data_bytes(self.for_terminal(text)).await;
    }

    fn for_terminal(&self, text: &str) -> Bytes {
        if self.pty {
            Bytes::from(text.replace('\n', "\r\n"))
        } else {
            Bytes::copy_from_slice(text.as_bytes())
        }
    }

    /// Sends exit status, EOF and close: the orderly end of a session.
    pub async fn exit(&self, status: u32) {
        let _ = self.writer.exit_status(status).await;
        self.close().await;
    }

    /// Sends EOF unless it was sent already: no more data on this channel.
    pub async fn eof(&self) -> Result<(), russh::Error> {
        if self
            .eof_sent
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return Ok(());
        }
        self.writer.eof().await
    }

    /// Sends EOF (once) and close.
    pub async fn close(&self) {
        let _ = self.eof().await;
        let _ = self.writer.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBnPj0TH2hTmIobo5mbbFnqBThDCSdHTvEKAbAeRh9+H";
    const OTHER: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    /// A policy with the given `(user, key)` pairs and one target.
    fn policy(users: &[(&str, &str)]) -> crate::policy::Policy {
        let users: String = users
            .iter()
            .map(|(name, key)| format!("[users.{name}]\nkeys = [\"{key}\"]\ngroups = [\"eng\"]\n"))
            .collect();
        crate::policy::from_texts(
            &users,
            &format!("[targets.db]\naddress = \"127.0.0.1\"\nhost_key = \"{ALICE}\"\nlogins = [\"postgres\"]\nlabels = {{ env = \"prod\" }}\n"),
            "[[flows]]\nname = \"prod\"\nmatch = { env = \"prod\" }\nrequesters = [\"group:eng\"]\napprovers = [\"bob\"]\n",
        )
    }

    /// The check every channel open and every reload runs on a live connection.
    #[test]
    fn an_identity_holds_only_while_its_key_is_still_its_users() {
        let key = russh::keys::PublicKey::from_openssh(ALICE).unwrap();
        let alice = Identity::new("alice".into(), key, Route::parse("db"), None, None);
        assert_eq!(alice.withdrawn(&policy(&[("alice", ALICE)])), None);
        let rotated = alice.withdrawn(&policy(&[("alice", OTHER)])).unwrap();
        assert!(rotated.contains("was removed from user alice"), "{rotated}");
        let moved = alice
            .withdrawn(&policy(&[("alice", OTHER), ("mallory", ALICE)]))
            .unwrap();
        assert!(moved.contains("now belongs to mallory"), "{moved}");
        let gone = alice.withdrawn(&policy(&[("bob", OTHER)])).unwrap();
        assert!(gone.contains("user alice was removed"), "{gone}");
    }
}
