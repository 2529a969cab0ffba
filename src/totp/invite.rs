//! Operator-issued enrolment codes: `portcullis totp invite USER` on the bastion host
//! prints a one-time code that `totp enroll` asks for when `totp_require_invite` is
//! set. A stolen key of a user who never enrolled then cannot enrol a secret of its
//! own and pass every step-up after.
//!
//! The command runs beside a live bastion, which holds the database lock, so invites
//! are small files in `<data_dir>/totp-invites/` (directory 0700, files 0600): only
//! the SHA-256 of the code and its expiry, one file per user, replaced by a newer
//! invite and removed once used.
//!
//! The command runs only as the owner of the data directory (the bastion's own
//! account): run as root, it would write into a directory that account controls,
//! where a planted symlink could make root overwrite or hand over any file. A code
//! is used by renaming its file away first, so two enrolments can never share one.

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
    refuse_other_users(data_dir)?;
    let dir = dir(data_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = file(data_dir, user);
    let partial = path.with_extension(format!("new-{}", rng.random::<u64>()));
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    out.write_all(&serde_json::to_vec(&invite)?)?;
    out.sync_all()?;
    fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(shown)
}

/// Refuses to run as anyone but the owner of the data directory (see the module
/// comment): `sudo -u` that account instead.
fn refuse_other_users(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(data_dir)
        .with_context(|| format!("cannot read {}", data_dir.display()))?
        .uid();
    let me = effective_uid()?;
    if me != owner {
        anyhow::bail!(
            "run this as the owner of {} (uid {owner}), the bastion's own account, e.g. `sudo -u \"#{owner}\" portcullis totp invite ...`: as another user (uid {me}) it could be tricked into writing where that account points it",
            data_dir.display()
        );
    }
    Ok(())
}

/// This process's effective user id, from `/proc/self/status`.
fn effective_uid() -> Result<u32> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .context("no effective uid in /proc/self/status")
}

/// An invite taken out of reach of every other enrolment while one is checked and
/// used: [`Claim::consume`] once the enrolment succeeded; dropped unconsumed (the
/// enrolment failed or was cancelled), it is put back.
#[derive(Debug)]
pub struct Claim {
    claimed: PathBuf,
    original: PathBuf,
    /// When the operator issued it, for the audit log.
    pub issued_at: DateTime<Utc>,
    used: bool,
}

impl Claim {
    /// The code was used: it never works again.
    pub fn consume(mut self) {
        self.used = true;
        if let Err(err) = fs::remove_file(&self.claimed) {
            tracing::error!(path = %self.claimed.display(), error = %err, "cannot remove a used enrolment code");
        }
    }
}

impl Drop for Claim {
    /// The code stays usable, unless the operator issued a newer one meanwhile (a
    /// hard link never replaces it).
    fn drop(&mut self) {
        if !self.used {
            let _ = fs::hard_link(&self.claimed, &self.original);
            let _ = fs::remove_file(&self.claimed);
        }
    }
}

/// Takes the invite issued for `user` if `code` is its code: the file is renamed
/// away first (atomic; a second enrolment racing this one finds nothing), then
/// checked, and put back when the code is wrong.
pub fn claim(
    data_dir: &Path,
    user: &str,
    code: &str,
    now: DateTime<Utc>,
) -> Result<Claim, InviteError> {
    let original = file(data_dir, user);
    let claimed = original.with_extension(format!("claimed-{}", rand::rng().random::<u64>()));
    let unreadable = |err: &dyn std::fmt::Display| InviteError::Unreadable {
        user: user.to_string(),
        detail: err.to_string(),
    };
    match fs::rename(&original, &claimed) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(InviteError::None(user.to_string()))
        }
        Err(err) => return Err(unreadable(&err)),
    }
    let mut claim = Claim {
        claimed,
        original,
        issued_at: now,
        used: false,
    };
    // On an error the claim is dropped, which puts the file back.
    let invite: Invite = fs::read(&claim.claimed)
        .map_err(|err| unreadable(&err))
        .and_then(|text| serde_json::from_slice(&text).map_err(|err| unreadable(&err)))?;
    if invite.expires_at <= now {
        claim.consume();
        return Err(InviteError::Expired(user.to_string()));
    }
    if !same_digest(&digest(code), &invite.code_sha256) {
        return Err(InviteError::Wrong(user.to_string()));
    }
    claim.issued_at = invite.created_at;
    Ok(claim)
}

/// Compares two hex digests without stopping at the first difference.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(true, |same, (x, y)| same & (x == y))
}

/// Removes any invite for `user` (they left the policy).
pub fn withdraw(data_dir: &Path, user: &str) {
    let path = file(data_dir, user);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::error!(path = %path.display(), error = %err, "cannot remove an enrolment code")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_for_its_user_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        let none = |user: &str| Err::<(), _>(InviteError::None(user.into()));
        assert_eq!(
            claim(dir.path(), "alice", "x", now).map(|_| ()),
            none("alice")
        );
        let code = issue(dir.path(), "alice", DEFAULT_TTL, now).unwrap();
        assert_eq!(code.len(), 14, "{code}");
        assert_eq!(
            claim(dir.path(), "bob", &code, now).map(|_| ()),
            none("bob")
        );
        assert_eq!(
            claim(dir.path(), "alice", "AAAA-AAAA-AAAA", now).map(|_| ()),
            Err(InviteError::Wrong("alice".into()))
        );
        // A sloppy but right code, claimed: a racing second enrolment finds nothing.
        let sloppy = code.replace('-', " ").to_lowercase();
        let taken = claim(dir.path(), "alice", &sloppy, now).unwrap();
        assert_eq!(
            claim(dir.path(), "alice", &code, now).map(|_| ()),
            none("alice")
        );
        drop(taken); // the enrolment failed: the code is usable again
        claim(dir.path(), "alice", &code, now).unwrap().consume();
        assert_eq!(
            claim(dir.path(), "alice", &code, now).map(|_| ()),
            none("alice")
        );

        issue(dir.path(), "carol", DEFAULT_TTL, now).unwrap();
        let later = now + chrono::Duration::hours(25);
        let code = issue(dir.path(), "dave", DEFAULT_TTL, now).unwrap();
        assert_eq!(
            claim(dir.path(), "dave", &code, later).map(|_| ()),
            Err(InviteError::Expired("dave".into()))
        );
        withdraw(dir.path(), "carol");
        let left: Vec<_> = fs::read_dir(dir.path().join("totp-invites"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let mode = fs::metadata(dir.path().join("totp-invites")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn only_the_owner_of_the_data_directory_may_issue() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let err = issue(dir.path(), "alice", DEFAULT_TTL, Utc::now()).unwrap_err();
        assert!(
            format!("{err:#}").contains("run this as the owner"),
            "{err:#}"
        );
        assert!(!dir.path().join("totp-invites").exists());
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
