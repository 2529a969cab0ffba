//! The one SFTP request whose meaning depends on who serves it.
//!
//! `SSH_FXP_SYMLINK` carries two paths. The draft says link path first; OpenSSH's
//! sftp-server has always read the target first, and clients split on it: OpenSSH's
//! own sftp, Paramiko and PuTTY always send OpenSSH's order, while asyncssh and
//! libssh send the draft's unless the server's identification string names OpenSSH.
//! The bastion's identification names OpenSSH (see `server::server_id`), so every
//! one of those clients sends OpenSSH's order through it. That is right for an
//! OpenSSH target. For any other target the bastion cannot know which order its
//! sftp server reads, and a guess would put links in the wrong place without an
//! error, so a symlink request to such a target ends the session instead.
//!
//! [`SymlinkGuard`] follows the client's SFTP packets (a 4-byte length, then the
//! type) across chunk boundaries, holding four bytes at most, and stops the
//! session through its own signal: the target is not trusted to confirm a close.

use tokio::sync::oneshot;

/// `SSH_FXP_SYMLINK` (draft-ietf-secsh-filexfer-02, section 3).
const SSH_FXP_SYMLINK: u8 = 20;

/// Watches what a client sends on an sftp channel to a target whose symlink order
/// is unknown.
#[derive(Debug)]
pub struct SymlinkGuard {
    framing: Framing,
    /// The target's name, for the message.
    target: String,
    /// Where the refusal goes (the session's stop signal); taken when used.
    refused: Option<oneshot::Sender<String>>,
}

impl SymlinkGuard {
    /// A guard for an sftp session to `target`, and the receiver that yields the
    /// message to end the session with once it refused a request.
    pub fn new(target: &str) -> (SymlinkGuard, oneshot::Receiver<String>) {
        let (refused, receiver) = oneshot::channel();
        let guard = SymlinkGuard {
            framing: Framing::default(),
            target: target.to_string(),
            refused: Some(refused),
        };
        (guard, receiver)
    }

    /// Follows the next chunk of the client's stream. `false` when it holds an
    /// `SSH_FXP_SYMLINK` request: nothing more may reach the target, and the
    /// session's stop signal has been sent.
    pub fn pass(&mut self, data: &[u8]) -> bool {
        if self.refused.is_none() {
            return false;
        }
        if !self.framing.holds_symlink(data) {
            return true;
        }
        let why = format!(
            "sftp symlink refused: target '{}' does not identify as OpenSSH, so the bastion \
             cannot tell in which order its sftp server reads the two paths — session closed \
             (see the README, Clients)",
            self.target
        );
        if let Some(refused) = self.refused.take() {
            let _ = refused.send(why);
        }
        false
    }
}

/// Resolves with the refusal of `guard`'s session, if there is a guard and it
/// refused; otherwise never.
pub async fn refused(receiver: Option<oneshot::Receiver<String>>) -> String {
    match receiver {
        Some(receiver) => match receiver.await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Where the client's stream is in its SFTP packets.
#[derive(Debug, Default)]
struct Framing {
    /// The length field being read, and how many of its bytes are in.
    length: [u8; 4],
    have: usize,
    /// Bytes of the current packet still to come after its length field.
    remaining: u32,
    /// The next byte is a packet's type.
    at_type: bool,
}

impl Framing {
    /// Follows `data`; whether it holds the type byte of an `SSH_FXP_SYMLINK`.
    fn holds_symlink(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.at_type {
                self.at_type = false;
                if data[0] == SSH_FXP_SYMLINK {
                    return true;
                }
            }
            if self.remaining > 0 {
                let skip = data.len().min(self.remaining as usize);
                self.remaining -= skip as u32;
                data = &data[skip..];
                continue;
            }
            let take = data.len().min(4 - self.have);
            self.length[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 4 {
                self.have = 0;
                self.remaining = u32::from_be_bytes(self.length);
                self.at_type = self.remaining > 0;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SFTP packet: length, type, payload.
    fn packet(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(kind);
        bytes.extend_from_slice(payload);
        bytes
    }

    /// A client's stream with a symlink request last, and the offset of its type byte.
    fn symlink_stream() -> (Vec<u8>, usize) {
        let mut stream = packet(1, &3u32.to_be_bytes()); // SSH_FXP_INIT
                                                         // SSH_FXP_WRITE whose data is full of 20s, and a zero-length packet.
        stream.extend(packet(6, &[SSH_FXP_SYMLINK; 300]));
        stream.extend([0, 0, 0, 0]);
        let at = stream.len() + 4;
        stream.extend(packet(SSH_FXP_SYMLINK, b"\0\0\0\x07\0\0\0\x01a\0\0\0\x01b"));
        (stream, at)
    }

    #[test]
    fn only_a_symlink_request_is_refused_whatever_the_chunking() {
        let (stream, at) = symlink_stream();
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            let mut framing = Framing::default();
            let mut offset = 0;
            let mut refused_at = None;
            for piece in stream.chunks(chunk) {
                if framing.holds_symlink(piece) {
                    refused_at = Some(offset);
                    break;
                }
                offset += piece.len();
            }
            let refused_at = refused_at.expect("refused");
            assert!(
                (refused_at..refused_at + chunk).contains(&at),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn other_requests_pass() {
        let (mut guard, mut refused) = SymlinkGuard::new("t");
        let mut stream = packet(1, &3u32.to_be_bytes());
        stream.extend(packet(3, &[SSH_FXP_SYMLINK; 40])); // SSH_FXP_OPEN
        stream.extend(packet(21, b"link")); // SSH_FXP_LINK (v6), not SYMLINK
        assert!(guard.pass(&stream));
        assert!(refused.try_recv().is_err());
    }

    #[test]
    fn a_refusal_names_the_target_and_nothing_passes_after_it() {
        let (mut guard, mut refused) = SymlinkGuard::new("ftp-1");
        assert!(!guard.pass(&packet(SSH_FXP_SYMLINK, b"")));
        let why = refused.try_recv().unwrap();
        assert!(
            why.contains("target 'ftp-1'") && why.contains("OpenSSH"),
            "{why}"
        );
        assert!(!guard.pass(&packet(1, b"")), "the stream is cut for good");
    }
}
