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
//! type) across chunk boundaries, holding four bytes at most.

/// `SSH_FXP_SYMLINK` (draft-ietf-secsh-filexfer-02, section 3).
const SSH_FXP_SYMLINK: u8 = 20;

/// Watches what a client sends on an sftp channel to a target whose symlink order
/// is unknown.
#[derive(Debug, Default)]
pub struct SymlinkGuard {
    /// The length field being read, and how many of its bytes are in.
    length: [u8; 4],
    have: usize,
    /// Bytes of the current packet still to come after its length field.
    remaining: u32,
    /// The next byte is a packet's type.
    at_type: bool,
}

impl SymlinkGuard {
    /// Follows the next chunk of the client's stream; returns why the session must
    /// end when the chunk holds the type byte of an `SSH_FXP_SYMLINK` request.
    pub fn refusal(&mut self, mut data: &[u8], target: &str) -> Option<String> {
        while !data.is_empty() {
            if self.at_type {
                self.at_type = false;
                if data[0] == SSH_FXP_SYMLINK {
                    return Some(format!(
                        "sftp symlink refused: target '{target}' does not identify as OpenSSH, so \
                         the bastion cannot tell in which order its sftp server reads the two \
                         paths — session closed (see the README, Clients)"
                    ));
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
        None
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
            let mut guard = SymlinkGuard::default();
            let mut offset = 0;
            let mut refused_at = None;
            for piece in stream.chunks(chunk) {
                if guard.refusal(piece, "t").is_some() {
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
        let mut guard = SymlinkGuard::default();
        let mut stream = packet(1, &3u32.to_be_bytes());
        stream.extend(packet(3, &[SSH_FXP_SYMLINK; 40])); // SSH_FXP_OPEN
        stream.extend(packet(21, b"link")); // SSH_FXP_LINK (v6), not SYMLINK
        assert_eq!(guard.refusal(&stream, "t"), None);
    }

    #[test]
    fn the_message_names_the_target() {
        let mut guard = SymlinkGuard::default();
        let why = guard
            .refusal(&packet(SSH_FXP_SYMLINK, b""), "ftp-1")
            .unwrap();
        assert!(
            why.contains("target 'ftp-1'") && why.contains("OpenSSH"),
            "{why}"
        );
    }
}
