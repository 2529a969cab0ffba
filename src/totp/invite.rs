//! Operator-issued enrolment codes: `portcullis totp invite USER` on the bastion host
//! prints a one-time code that `totp enroll` asks for when `totp_require_invite` is
//! set. A stolen key of a user who never enrolled then cannot enrol a secret of its
//! own and pass every step-up after.
//!
//! The command runs beside a live bastion, which holds the database lock, so invites
//! are small files in `<data_dir>/totp-invites/` (directory 0700, files 0600): only
//! the SHA-256 of the code and its expiry, one file per user, replaced by a newer
//! invite and removed once used.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long an invite is valid unless the operator says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Letters and digits that cannot be mistaken for one another when read aloud or
/// retyped (no 0/O, 1/I/L, U/V).
const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTWXYZ23456789";

/// Characters in a code, shown in groups of four (about 58 bits).
const CODE_LEN: usize = 12;

#[derive(Debug, Serialize, Deserialize)]
struct Invite {
    code_sha256: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

/// Why an enrolment code was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("no enrolment code was issued for {0}: ask an operator to run `portcullis totp invite {0}` on the bastion host")]
    None(String),
    #[error("the enrolment code for {0} expired; ask an operator for a new one")]
    Expired(String),
    #[error(
        "that is not the enrolment code issued for {0}; check it, or ask an operator for a new one"
    )]
    Wrong(String),
    #[error("cannot read the enrolment code for {user}: {detail}")]
    Unreadable { user: String, detail: String },
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("totp-invites")
}

/// Users are policy names (letters, digits, `-`, `_`, `.`), but the file name is
/// built from hex so that no name can ever address another path.
fn file(data_dir: &Path, user: &str) -> PathBuf {
    dir(data_dir).join(hex::encode(user.as_bytes()))
}

fn digest(code: &str) -> String {
    hex::encode(Sha256::digest(normalise(code).as_bytes()))
}

/// Codes are compared without case, spaces or dashes.
fn normalise(code: &str) -> String {
    code.chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Issues a fresh code for `user`, valid for `ttl`, replacing any earlier one.
/// Returns the code as shown to the operator (`ABCD-EFGH-JKMN`).
pub fn issue(data_dir: &Path, user: &str, ttl: Duration, now: DateTime<Utc>) -> Result<String> {
    let mut rng = rand::rng();
    let raw: String = (0..CODE_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let shown = raw
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ASCII"))
        .collect::<Vec<_>>()
        .join("-");
    let invite = Invite {
        code_sha256: digest(&raw),
        created_at: now,
        expires_at: now + chrono::Duration::from_std(ttl).context("invite ttl too long")?,
    };
    let dir = dir(data_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = file(data_dir, user);
    let partial = path.with_extension("new");
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    out.write_all(&serde_json::to_vec(&invite)?)?;
    out.sync_all()?;
    give_to_data_dir_owner(data_dir, &[&dir, &partial])?;
    fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(shown)
}

/// An operator often runs this as root while the bastion runs as its own user:
/// the invite must belong to whoever owns the data directory, or the bastion could
/// neither read nor remove it.
fn give_to_data_dir_owner(data_dir: &Path, paths: &[&Path]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(data_dir)?;
    for path in paths {
        if fs::metadata(path)?.uid() != owner.uid() {
            std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).with_context(
                || {
                    format!(
                        "cannot hand {} to the owner of {}: run this as root or as the bastion's user",
                        path.display(),
                        data_dir.display()
                    )
                },
            )?;
        }
    }
    Ok(())
}

/// Checks `code` against the invite issued for `user` (it stays until [`consume`]).
/// Returns when the invite was issued, for the audit log.
pub fn check(
    data_dir: &Path,
    user: &str,
    code: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, InviteError> {
    let path = file(data_dir, user);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(InviteError::None(user.to_string()))
        }
        Err(err) => {
            return Err(InviteError::Unreadable {
                user: user.to_string(),
                detail: err.to_string(),
            })
        }
    };
    let invite: Invite = serde_json::from_slice(&text).map_err(|err| InviteError::Unreadable {
        user: user.to_string(),
        detail: err.to_string(),
    })?;
    if invite.expires_at <= now {
        return Err(InviteError::Expired(user.to_string()));
    }
    let given = digest(code);
    // Both are hex digests of equal length; compare every byte regardless.
    let same = given
        .bytes()
        .zip(invite.code_sha256.bytes())
        .fold(given.len() == invite.code_sha256.len(), |same, (a, b)| {
            same & (a == b)
        });
    if !same {
        return Err(InviteError::Wrong(user.to_string()));
    }
    Ok(invite.created_at)
}

/// Removes `user`'s invite once it has been used, so it works exactly once.
pub fn consume(data_dir: &Path, user: &str) {
    let path = file(data_dir, user);
    if let Err(err) = fs::remove_file(&path) {
        tracing::error!(path = %path.display(), error = %err, "cannot remove a used enrolment code");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_for_its_user_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        assert_eq!(
            check(dir.path(), "alice", "x", now),
            Err(InviteError::None("alice".into()))
        );
        let code = issue(dir.path(), "alice", DEFAULT_TTL, now).unwrap();
        assert_eq!(code.len(), 14, "{code}");
        assert!(check(dir.path(), "alice", &code, now).is_ok());
        let sloppy = code.replace('-', " ").to_lowercase();
        assert!(check(dir.path(), "alice", &sloppy, now).is_ok());
        assert_eq!(
            check(dir.path(), "bob", &code, now),
            Err(InviteError::None("bob".into()))
        );
        assert_eq!(
            check(dir.path(), "alice", "AAAA-AAAA-AAAA", now),
            Err(InviteError::Wrong("alice".into()))
        );
        let later = now + chrono::Duration::hours(25);
        assert_eq!(
            check(dir.path(), "alice", &code, later),
            Err(InviteError::Expired("alice".into()))
        );
        consume(dir.path(), "alice");
        assert_eq!(
            check(dir.path(), "alice", &code, now),
            Err(InviteError::None("alice".into()))
        );
        let mode = fs::metadata(dir.path().join("totp-invites")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn user_names_never_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), "../../etc/x", DEFAULT_TTL, Utc::now()).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path().join("totp-invites"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(!dir.path().join("etc").exists());
    }
}
