//! TOTP step-up: enrolment, verification with a replay guard, and lockout.
//!
//! Secrets are sealed with AES-256-GCM under a key file in the data dir (`totp.key`,
//! mode 0600) before they reach sled, with the user name as associated data so a
//! sealed secret cannot be moved to another user. They are never logged and never
//! shown again after enrolment.
//!
//! A code is accepted for the current 30 s step or one step either side (clock
//! skew), and only for a step later than the last one accepted for that user: a code
//! seen once is never accepted again. Five wrong codes within five minutes lock that
//! user's step-up for five minutes. Every check takes the time as an argument, so the
//! rules are tested with an injected clock.
//!
//! Each check is a conditional update of the user's state in the store: it is
//! written only if the state is still what the check read, and a check that lost
//! the race runs again on what won, so a code used by two logins at once (or on two
//! bastions) is accepted once.

pub mod invite;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use chrono::{DateTime, Utc};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use totp_rs::{Algorithm, Secret, TOTP};

use crate::store::{Store, StoreError, Table};

/// The tree of per-user state.
const TREE: &str = "users_state";

pub const ISSUER: &str = "portcullis";
const STEP_SECS: u64 = 30;
const DIGITS: usize = 6;
const SKEW_STEPS: u64 = 1;

/// Wrong codes allowed within [`FAILURE_WINDOW_SECS`] before the lock.
pub const MAX_FAILURES: usize = 5;
pub const FAILURE_WINDOW_SECS: i64 = 300;
pub const LOCKOUT_SECS: i64 = 300;

/// What the store keeps per user (`users_state` tree).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct UserState {
    /// hex(nonce ‖ ciphertext ‖ tag) of the secret.
    sealed_secret: Option<String>,
    enrolled_at: Option<DateTime<Utc>>,
    /// Highest time step ever accepted: the replay guard.
    last_step: u64,
    /// Times (unix seconds) of recent wrong codes.
    failures: Vec<i64>,
    locked_until: Option<i64>,
}

/// The outcome of checking a code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Wrong code; `locked_now` when this failure triggered the lock.
    Wrong {
        locked_now: bool,
    },
    /// A code that was already used (or older than the last one used).
    Replayed {
        locked_now: bool,
    },
    Locked {
        until: DateTime<Utc>,
    },
    NotEnrolled,
}

impl Verdict {
    /// A sentence for the user.
    pub fn explain(&self, user: &str) -> String {
        match self {
            Verdict::Accepted => "accepted".into(),
            Verdict::Wrong { locked_now: false } => "wrong TOTP code".into(),
            Verdict::Replayed { locked_now: false } => {
                "this TOTP code was already used; wait for the next one".into()
            }
            Verdict::Wrong { locked_now: true } | Verdict::Replayed { locked_now: true } => {
                format!("too many wrong TOTP codes: step-up for {user} is locked for 5 minutes")
            }
            Verdict::Locked { until } => format!(
                "step-up for {user} is locked until {} after repeated wrong codes",
                until.format("%H:%M:%S UTC")
            ),
            Verdict::NotEnrolled => format!(
                "{user} has no TOTP enrolled: run `ssh -p PORT portcullis@BASTION totp enroll`"
            ),
        }
    }

    /// Whether this verdict locked the user (worth an audit event of its own).
    pub fn locked_now(&self) -> bool {
        matches!(
            self,
            Verdict::Wrong { locked_now: true } | Verdict::Replayed { locked_now: true }
        )
    }
}

/// A secret being enrolled: shown once, stored only once a code confirms it.
pub struct Enrolment {
    secret: Vec<u8>,
    pub url: String,
    /// The otpauth URL as a QR code drawn with Unicode half blocks.
    pub qr: String,
}

/// Enrolment state of one user, for `totp status` and `whoami`.
pub struct Status {
    pub enrolled_at: Option<DateTime<Utc>>,
    pub locked_until: Option<DateTime<Utc>>,
}

/// TOTP secrets and their checks.
pub struct Totp {
    store: Arc<Store>,
    users: Table<String, UserState>,
    key: LessSafeKey,
    /// A fingerprint of the sealing key (a domain-separated SHA-256 of it, which
    /// reveals nothing of the key): nodes of one cluster must all have the same.
    key_id: String,
}

impl Totp {
    /// Loads (or creates, mode 0600) the sealing key in `data_dir/totp.key`.
    pub fn open(data_dir: &Path, store: Arc<Store>) -> Result<Totp> {
        let path = sealing_key_path(data_dir);
        let bytes = load_or_create_key(&path)?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| anyhow::anyhow!("{} does not hold a 32-byte key", path.display()))?;
        Ok(Totp {
            users: Table::new(&store, TREE),
            store,
            key: LessSafeKey::new(key),
            key_id: key_fingerprint(&bytes),
        })
    }

    /// The sealing key's fingerprint (`SHA256:` and hex), for the cluster's
    /// identity check.
    pub fn key_fingerprint(&self) -> &str {
        &self.key_id
    }

    pub fn status(&self, user: &str, now: DateTime<Utc>) -> Result<Status, StoreError> {
        let state = self.state(user)?;
        Ok(Status {
            enrolled_at: state.enrolled_at,
            locked_until: state
                .locked_until
                .filter(|until| *until > now.timestamp())
                .and_then(|until| DateTime::from_timestamp(until, 0)),
        })
    }

    /// Users with a TOTP secret or step-up state.
    pub fn users(&self) -> Result<Vec<String>, StoreError> {
        self.users.keys().collect()
    }

    /// Forgets everything about `user`'s TOTP (they left the policy): a user added
    /// later under the same name enrols afresh instead of inheriting a secret that
    /// someone else, perhaps with a stolen key, may have enrolled.
    pub fn forget(&self, user: &str) -> Result<(), StoreError> {
        self.users.remove(&user.to_string())?;
        self.store.flush()
    }

    pub fn is_enrolled(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self.state(user)?.sealed_secret.is_some())
    }

    /// A fresh secret for `user`, not stored yet.
    pub fn begin_enrolment(&self, user: &str) -> Enrolment {
        let secret = Secret::generate_secret()
            .to_bytes()
            .expect("generated secrets are valid");
        let totp = totp_for(&secret, user);
        let url = totp.get_url();
        Enrolment {
            qr: terminal_qr(&url),
            url,
            secret,
        }
    }

    /// Stores the enrolment if `code` is valid for its secret at `now`. Re-enrolling
    /// keeps the replay guard: no code of the old secret's steps is accepted again.
    pub fn confirm(
        &self,
        user: &str,
        enrolment: &Enrolment,
        code: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let Some(step) = matching_step(&enrolment.secret, user, code, now) else {
            return Ok(false);
        };
        let sealed = self.seal(user, &enrolment.secret);
        self.update(user, |state| {
            state.sealed_secret = Some(sealed.clone());
            state.enrolled_at = Some(now);
            state.last_step = state.last_step.max(step);
            state.failures.clear();
            state.locked_until = None;
            Ok((true, true))
        })
    }

    /// Checks a step-up code for `user` at `now`, updating the replay guard and the
    /// failure count. Blocks (the update is synced to disk): async code runs it on
    /// the blocking pool.
    pub fn verify(
        &self,
        user: &str,
        code: &str,
        now: DateTime<Utc>,
    ) -> Result<Verdict, StoreError> {
        self.update(user, |state| self.check(user, state, code, now))
    }

    /// The verdict on `code` against `state`, and `state` as it must be stored
    /// after it; `(verdict, false)` when nothing changes.
    fn check(
        &self,
        user: &str,
        state: &mut UserState,
        code: &str,
        now: DateTime<Utc>,
    ) -> Result<(Verdict, bool), StoreError> {
        let Some(sealed) = &state.sealed_secret else {
            return Ok((Verdict::NotEnrolled, false));
        };
        let t = now.timestamp();
        if let Some(until) = state.locked_until.filter(|until| *until > t) {
            let until = DateTime::from_timestamp(until, 0).unwrap_or(now);
            return Ok((Verdict::Locked { until }, false));
        }
        let secret = self.unseal(user, sealed)?;
        let verdict = match matching_step(&secret, user, code, now) {
            Some(step) if step > state.last_step => {
                state.last_step = step;
                state.failures.clear();
                state.locked_until = None;
                Verdict::Accepted
            }
            matched => {
                state.failures.retain(|at| t - at < FAILURE_WINDOW_SECS);
                state.failures.push(t);
                let locked_now = state.failures.len() >= MAX_FAILURES;
                if locked_now {
                    state.locked_until = Some(t + LOCKOUT_SECS);
                    state.failures.clear();
                }
                if matched.is_some() {
                    Verdict::Replayed { locked_now }
                } else {
                    Verdict::Wrong { locked_now }
                }
            }
        };
        Ok((verdict, true))
    }

    /// Runs `change` on `user`'s state and, when it says the state changed, stores
    /// it durably if nobody stored another meanwhile; otherwise runs it again on
    /// the state that won. A consumed step must stay consumed, hence the sync.
    fn update<T>(
        &self,
        user: &str,
        change: impl Fn(&mut UserState) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let key = user.to_string();
        loop {
            let read = self.users.get_versioned(&key)?;
            let (mut state, old) = match read {
                Some((state, bytes)) => (state, Some(bytes)),
                None => (UserState::default(), None),
            };
            let (outcome, changed) = change(&mut state)?;
            if !changed {
                return Ok(outcome);
            }
            if self.users.swap(&key, old.as_deref(), &state)? {
                self.store.flush()?;
                return Ok(outcome);
            }
        }
    }

    fn state(&self, user: &str) -> Result<UserState, StoreError> {
        Ok(self.users.get(&user.to_string())?.unwrap_or_default())
    }

    fn seal(&self, user: &str, secret: &[u8]) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::rng().random();
        let mut sealed = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(user.as_bytes()),
                &mut sealed,
            )
            .expect("sealing a short secret cannot fail");
        let mut out = nonce_bytes.to_vec();
        out.extend(sealed);
        hex::encode(out)
    }

    fn unseal(&self, user: &str, sealed: &str) -> Result<Vec<u8>, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            tree: "users_state",
            detail: format!("TOTP secret of {user}: {detail}"),
        };
        let bytes = hex::decode(sealed).map_err(|_| corrupt("not hex"))?;
        if bytes.len() <= NONCE_LEN {
            return Err(corrupt("too short"));
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt("bad nonce"))?;
        let mut buffer = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(user.as_bytes()), &mut buffer)
            .map_err(|_| corrupt("cannot be opened with totp.key"))?;
        Ok(plain.to_vec())
    }
}

/// The TOTP parameters every authenticator app understands: SHA-1, 6 digits, 30 s.
fn totp_for(secret: &[u8], user: &str) -> TOTP {
    TOTP::new_unchecked(
        Algorithm::SHA1,
        DIGITS,
        SKEW_STEPS as u8,
        STEP_SECS,
        secret.to_vec(),
        Some(ISSUER.to_string()),
        user.to_string(),
    )
}

/// The time step (within the allowed skew) whose code is `code`, if any.
fn matching_step(secret: &[u8], user: &str, code: &str, now: DateTime<Utc>) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = totp_for(secret, user);
    let current = now.timestamp().max(0) as u64 / STEP_SECS;
    (current.saturating_sub(SKEW_STEPS)..=current + SKEW_STEPS)
        .find(|step| constant_time_eq(totp.generate(step * STEP_SECS).as_bytes(), code.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn terminal_qr(text: &str) -> String {
    use qrcode::render::unicode::Dense1x2;
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
        Err(_) => String::new(),
    }
}

/// Where the sealing key lives: every node of a cluster needs the same file.
pub fn sealing_key_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("totp.key")
}

/// Creates the sealing key if it is missing (`portcullis keys`, so that the whole
/// key set can be copied to other nodes before any of them serves) and returns its
/// fingerprint.
pub fn ensure_sealing_key(data_dir: &Path) -> Result<String> {
    Ok(key_fingerprint(&load_or_create_key(&sealing_key_path(
        data_dir,
    ))?))
}

fn key_fingerprint(key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"portcullis totp sealing key fingerprint\0")
        .chain_update(key)
        .finalize();
    format!("SHA256:{}", hex::encode(digest))
}

fn load_or_create_key(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    if path.exists() {
        let mode = std::fs::metadata(path)?.mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {:o}); run chmod 600 on it",
                path.display(),
                mode & 0o777
            );
        }
        return std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    }
    let key: [u8; 32] = rand::rng().random();
    crate::datadir::create_private(path, &key)?;
    Ok(key.to_vec())
}

/// The current code for a base32 secret at `now`; for tests and tools.
pub fn code_at(secret_base32: &str, user: &str, now: DateTime<Utc>) -> Option<String> {
    let secret = Secret::Encoded(secret_base32.to_string()).to_bytes().ok()?;
    Some(totp_for(&secret, user).generate(now.timestamp().max(0) as u64))
}

/// The base32 secret inside an `otpauth://` URL.
pub fn secret_of_url(url: &str) -> Option<String> {
    TOTP::from_url_unchecked(url)
        .ok()
        .map(|totp| totp.get_secret_base32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Totp) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::sled(dir.path()).unwrap());
        let totp = Totp::open(dir.path(), store).unwrap();
        (dir, totp)
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn enrolled(totp: &Totp) -> String {
        let enrolment = totp.begin_enrolment("alice");
        let secret = secret_of_url(&enrolment.url).unwrap();
        assert!(!totp.confirm("alice", &enrolment, "000000x", at(0)).unwrap());
        let code = code_at(&secret, "alice", at(0)).unwrap();
        assert!(totp.confirm("alice", &enrolment, &code, at(0)).unwrap());
        secret
    }

    #[test]
    fn enrolment_needs_a_valid_code_and_the_url_names_the_issuer() {
        let (_dir, totp) = setup();
        let enrolment = totp.begin_enrolment("alice");
        assert!(
            enrolment
                .url
                .starts_with("otpauth://totp/portcullis:alice?"),
            "{}",
            enrolment.url
        );
        assert!(enrolment.qr.contains('█') || enrolment.qr.contains('▀'));
        assert!(!totp.is_enrolled("bob").unwrap());
        assert_eq!(
            totp.verify("bob", "123456", at(0)).unwrap(),
            Verdict::NotEnrolled
        );
    }

    /// Logins racing with one code: the conditional update lets exactly one
    /// of them consume the step; every other one finds it used.
    #[test]
    fn a_code_raced_by_many_logins_is_accepted_once() {
        let (_dir, totp) = setup();
        let secret = enrolled(&totp);
        let code = code_at(&secret, "alice", at(60)).unwrap();
        let totp = Arc::new(totp);
        // Fewer than MAX_FAILURES, so the replays do not lock the user.
        let verdicts: Vec<Verdict> = (0..MAX_FAILURES - 1)
            .map(|_| {
                let (totp, code) = (totp.clone(), code.clone());
                std::thread::spawn(move || totp.verify("alice", &code, at(60)).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let accepted = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
        assert_eq!(accepted, 1, "{verdicts:?}");
        assert!(verdicts
            .iter()
            .all(|v| *v == Verdict::Accepted || matches!(v, Verdict::Replayed { .. })));
    }

    #[test]
    fn codes_work_once_within_the_skew() {
        let (_dir, totp) = setup();
        let secret = enrolled(&totp);
        let code = |t| code_at(&secret, "alice", at(t)).unwrap();
        // The enrolment code itself cannot be replayed.
        assert!(matches!(
            totp.verify("alice", &code(0), at(1)).unwrap(),
            Verdict::Replayed { .. }
        ));
        assert_eq!(
            totp.verify("alice", &code(30), at(30)).unwrap(),
            Verdict::Accepted
        );
        assert!(matches!(
            totp.verify("alice", &code(30), at(31)).unwrap(),
            Verdict::Replayed { .. }
        ));
        // One step of skew either way; two is too much.
        assert_eq!(
            totp.verify("alice", &code(120), at(90)).unwrap(),
            Verdict::Accepted
        );
        assert!(matches!(
            totp.verify("alice", &code(300), at(210)).unwrap(),
            Verdict::Wrong { .. }
        ));
        assert!(matches!(
            totp.verify("alice", "12345", at(400)).unwrap(),
            Verdict::Wrong { .. }
        ));
    }

    #[test]
    fn five_failures_in_five_minutes_lock_that_user_for_five_minutes() {
        let (_dir, totp) = setup();
        let secret = enrolled(&totp);
        let bob_enrolment = totp.begin_enrolment("bob");
        let bob_secret = secret_of_url(&bob_enrolment.url).unwrap();
        let bob_code = code_at(&bob_secret, "bob", at(0)).unwrap();
        assert!(totp
            .confirm("bob", &bob_enrolment, &bob_code, at(0))
            .unwrap());

        for i in 0..4 {
            assert_eq!(
                totp.verify("alice", "000000", at(100 + i)).unwrap(),
                Verdict::Wrong { locked_now: false }
            );
        }
        let fifth = totp.verify("alice", "000000", at(104)).unwrap();
        assert!(fifth.locked_now(), "{fifth:?}");
        let good = code_at(&secret, "alice", at(120)).unwrap();
        assert!(matches!(
            totp.verify("alice", &good, at(120)).unwrap(),
            Verdict::Locked { .. }
        ));
        // Bob is not affected.
        let bob_good = code_at(&bob_secret, "bob", at(120)).unwrap();
        assert_eq!(
            totp.verify("bob", &bob_good, at(120)).unwrap(),
            Verdict::Accepted
        );
        // After the window, alice is back.
        let later = code_at(&secret, "alice", at(104 + LOCKOUT_SECS)).unwrap();
        assert_eq!(
            totp.verify("alice", &later, at(104 + LOCKOUT_SECS))
                .unwrap(),
            Verdict::Accepted
        );
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_lock() {
        let (_dir, totp) = setup();
        enrolled(&totp);
        for i in 0..10 {
            let verdict = totp.verify("alice", "000000", at(i * 100)).unwrap();
            assert_eq!(verdict, Verdict::Wrong { locked_now: false }, "attempt {i}");
        }
    }

    #[test]
    fn secrets_are_sealed_at_rest() {
        let (dir, totp) = setup();
        let secret = enrolled(&totp);
        drop(totp);
        let raw = secret_bytes(&secret);
        for entry in walk(dir.path()) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
                    && !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                "{} holds the secret in plain text",
                entry.display()
            );
        }
        let mode = std::os::unix::fs::MetadataExt::mode(
            &std::fs::metadata(dir.path().join("totp.key")).unwrap(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    fn secret_bytes(base32: &str) -> Vec<u8> {
        Secret::Encoded(base32.to_string()).to_bytes().unwrap()
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
