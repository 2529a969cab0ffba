//! The bastion's SSH client towards targets: connect with a timeout, insist on the
//! pinned host key, authenticate with the bastion's own identity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use thiserror::Error;
use tokio::io::BufReader;
use tokio::net::TcpStream;

use crate::policy::{fingerprint, Target};

/// Why a target could not be reached; each message tells the user what happened.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot reach target '{target}' at {address}: {source}")]
    Unreachable {
        target: String,
        address: String,
        source: std::io::Error,
    },
    #[error(
        "target '{target}' at {address} did not complete the SSH handshake within {timeout:?}"
    )]
    Timeout {
        target: String,
        address: String,
        timeout: Duration,
    },
    #[error(
        "host key mismatch for target '{target}': expected {expected} (pinned in targets.toml), \
         the target presented {seen}; refusing to connect. If the target's key really changed, \
         update host_key in targets.toml"
    )]
    HostKeyMismatch {
        target: String,
        expected: String,
        seen: String,
    },
    #[error(
        "target '{target}' refused the bastion's key for login '{login}': add the bastion's upstream \
         key (see `portcullis keys`) to ~{login}/.ssh/authorized_keys on the target"
    )]
    AuthRejected { target: String, login: String },
    #[error(
        "target '{target}' refused the bastion's certificate for login '{login}': the target's \
         sshd_config needs `TrustedUserCAKeys` with the bastion's CA key (see `portcullis keys`)"
    )]
    CertificateRejected { target: String, login: String },
    #[error("cannot issue a certificate for target '{target}': {detail}")]
    Certificate { target: String, detail: String },
    #[error(
        "target '{target}' refused to open a session ({reason}); its sshd allows this login no \
         sessions (MaxSessions) or refuses the bastion"
    )]
    SessionRefused { target: String, reason: String },
    #[error(
        "target '{target}' refused another session on each of the {limit} connections this \
         connection may open to it ([limits] upstream_connections_per_client = {limit}); sshd \
         counts MaxSessions per connection: end some sessions, or raise the limit"
    )]
    SessionsExhausted { target: String, limit: usize },
    #[error("SSH error talking to target '{target}': {source}")]
    Protocol {
        target: String,
        source: russh::Error,
    },
}

/// russh client handler that only accepts the pinned host key and remembers what it
/// saw, and the target's identification string.
pub struct PinnedHostKey {
    expected: PublicKey,
    seen: Arc<Mutex<Option<PublicKey>>>,
    server_id: Arc<Mutex<String>>,
}

impl client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false); // host certificates are not pinned keys
        };
        *self.seen.lock().expect("host key slot poisoned") = Some(key.clone());
        Ok(key.key_data() == self.expected.key_data())
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        _names: &russh::Names,
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let id = String::from_utf8_lossy(session.remote_sshid());
        *self.server_id.lock().expect("server id slot poisoned") = id.chars().take(255).collect();
        Ok(())
    }
}

/// An authenticated SSH connection to a target.
pub struct Upstream {
    pub handle: Handle<PinnedHostKey>,
    /// The target's identification string (`SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u7`).
    pub server_id: String,
}

impl Upstream {
    /// Whether the target reads the paths of `SSH_FXP_SYMLINK` in OpenSSH's order,
    /// the order the bastion's clients send (see `sftp`): it says it is OpenSSH, or
    /// another portcullis (which makes the same promise to its own clients).
    pub fn reads_openssh_symlink_order(&self) -> bool {
        self.server_id
            .strip_prefix("SSH-2.0-")
            .is_some_and(|software| {
                software.starts_with("OpenSSH_") || software.starts_with("portcullis_")
            })
    }
}

/// Client settings towards targets, mirroring the server side's flow control.
pub fn client_config() -> client::Config {
    client::Config {
        client_id: russh::SshId::Standard(
            format!("SSH-2.0-portcullis_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        window_size: crate::session::WINDOW_SIZE,
        maximum_packet_size: crate::session::MAX_PACKET_SIZE,
        channel_buffer_size: crate::session::CHANNEL_QUEUE,
        preferred: crate::session::preferred_algorithms(false, false),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    }
}

/// How the bastion proves itself to a target.
pub enum Credential {
    /// The bastion's long-lived upstream key.
    Key(Arc<PrivateKey>),
    /// A per-session key pair and its certificate from the bastion's CA.
    Certificate(Arc<PrivateKey>, Box<russh::keys::Certificate>),
}

/// Opens an authenticated SSH connection to `target` as `login`.
pub async fn connect(
    config: Arc<client::Config>,
    target: &Target,
    login: &str,
    credential: Credential,
    timeout: Duration,
) -> Result<Upstream, UpstreamError> {
    let seen = Arc::new(Mutex::new(None));
    let server_id = Arc::new(Mutex::new(String::new()));
    let handler = PinnedHostKey {
        expected: target.host_key.clone(),
        seen: seen.clone(),
        server_id: server_id.clone(),
    };
    let connecting = async {
        let socket = TcpStream::connect(target.address.as_str())
            .await
            .map_err(russh::Error::IO)?;
        let _ = socket.set_nodelay(true);
        let buffered = BufReader::with_capacity(crate::session::READ_BUFFER, socket);
        client::connect_stream(config, buffered, handler).await
    };
    let result = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| UpstreamError::Timeout {
            target: target.name.clone(),
            address: target.address.clone(),
            timeout,
        })?;
    let mut handle = result.map_err(|err| match err {
        russh::Error::UnknownKey => UpstreamError::HostKeyMismatch {
            target: target.name.clone(),
            expected: fingerprint(&target.host_key),
            seen: seen
                .lock()
                .expect("host key slot poisoned")
                .as_ref()
                .map(fingerprint)
                .unwrap_or_else(|| "a host certificate".into()),
        },
        russh::Error::IO(source) => UpstreamError::Unreachable {
            target: target.name.clone(),
            address: target.address.clone(),
            source,
        },
        source => UpstreamError::Protocol {
            target: target.name.clone(),
            source,
        },
    })?;
    let by_certificate = matches!(credential, Credential::Certificate(..));
    let auth = match credential {
        Credential::Key(key) => {
            handle
                .authenticate_publickey(login, PrivateKeyWithHashAlg::new(key, None))
                .await
        }
        Credential::Certificate(key, cert) => {
            handle.authenticate_openssh_cert(login, key, *cert).await
        }
    }
    .map_err(|source| UpstreamError::Protocol {
        target: target.name.clone(),
        source,
    })?;
    if !auth.success() {
        let (target, login) = (target.name.clone(), login.to_string());
        return Err(if by_certificate {
            UpstreamError::CertificateRejected { target, login }
        } else {
            UpstreamError::AuthRejected { target, login }
        });
    }
    let server_id = server_id.lock().expect("server id slot poisoned").clone();
    Ok(Upstream { handle, server_id })
}
