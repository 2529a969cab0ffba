//! The bastion's own key material, generated on first start:
//! its SSH host key, the identity it uses towards targets, and a CA for
//! short-lived user certificates.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

use crate::config::Config;

/// What a key is used for; printed by `portcullis keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Presented to engineers' SSH clients.
    Host,
    /// Authenticates the bastion to targets (add to their authorized_keys).
    Upstream,
    /// Signs per-session user certificates (targets trust it with TrustedUserCAKeys).
    Ca,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Host, Role::Upstream, Role::Ca];

    pub fn name(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Upstream => "upstream",
            Role::Ca => "ca",
        }
    }

    /// Where this key lives for `config`.
    pub fn path(self, config: &Config) -> PathBuf {
        match self {
            Role::Host => config.host_key.clone(),
            Role::Upstream => config.data_dir.join("upstream_ed25519"),
            Role::Ca => config.data_dir.join("ca_ed25519"),
        }
    }
}

/// Loads the key at `path`, creating an ed25519 key (mode 0600, plus `.pub`) when missing.
pub fn load_or_create(path: &Path) -> Result<PrivateKey> {
    if path.exists() {
        check_private_permissions(path)?;
        return russh::keys::load_secret_key(path, None)
            .with_context(|| format!("cannot load private key {}", path.display()));
    }
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)?;
    let pem = key.to_openssh(LineEnding::LF)?;
    // create_new: never overwrite a key another process just wrote.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create private key {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    let public = key.public_key().to_openssh()?;
    // Every file in the data directory is 0600, whatever the umask, and none is
    // written through a link planted where it goes.
    let public_path = path.with_extension("pub");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&public_path)
        .with_context(|| {
            format!(
                "cannot write {} (a symbolic link is refused)",
                public_path.display()
            )
        })?;
    file.write_all(format!("{public}\n").as_bytes())?;
    tracing::info!(path = %path.display(), "generated new ed25519 key");
    Ok(key)
}

/// Refuses keys readable by others, as OpenSSH does, so a leaked key is noticed early.
fn check_private_permissions(path: &Path) -> Result<()> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "private key {} is accessible by others (mode {:o}); run: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// The bastion's keys, loaded (and created where missing) at start.
pub struct KeySet {
    pub host: PrivateKey,
    /// Shared with every upstream connection's authenticator.
    pub upstream: std::sync::Arc<PrivateKey>,
    pub ca: PrivateKey,
}

impl KeySet {
    pub fn load_or_create(config: &Config) -> Result<KeySet> {
        Ok(KeySet {
            host: load_or_create(&Role::Host.path(config))?,
            upstream: std::sync::Arc::new(load_or_create(&Role::Upstream.path(config))?),
            ca: load_or_create(&Role::Ca.path(config))?,
        })
    }

    pub fn get(&self, role: Role) -> &PrivateKey {
        match role {
            Role::Host => &self.host,
            Role::Upstream => &self.upstream,
            Role::Ca => &self.ca,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/host_ed25519");
        let first = load_or_create(&path).unwrap();
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(path.with_extension("pub").exists());
    }

    #[test]
    fn refuses_world_readable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_ed25519");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
