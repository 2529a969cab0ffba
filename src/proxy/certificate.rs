//! Per-session OpenSSH user certificates, signed by the bastion's CA, for targets
//! with `auth = "certificate"`.
//!
//! Each session gets a fresh ed25519 key pair and a certificate for it: principal =
//! the login, valid from a minute ago (clock skew) until the grant expires, key id
//! naming user, grant and session. A shell grant gets `permit-pty`; anything narrower
//! gets a `force-command` (the exact granted command, or `internal-sftp`) and no pty.
//! No forwarding extensions are ever set. The target then enforces the grant itself:
//! even a bastion whose own checks were bypassed cannot use the certificate beyond it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::RngExt;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::Certificate;
use russh::keys::{Algorithm, PrivateKey};

use crate::grant::Grant;

/// Slack before "now" in `valid_after`, for targets whose clock is a little behind.
const CLOCK_SKEW_SECS: i64 = 60;

/// What the certificate is for.
pub struct CertificateRequest<'a> {
    pub user: &'a str,
    pub grant: &'a Grant,
    pub login: &'a str,
    pub session: u64,
    /// The command the target must run whatever the client asks; `None` for a shell.
    pub force_command: Option<&'a str>,
    pub now: DateTime<Utc>,
}

/// A freshly issued certificate and its private key.
pub struct SessionCertificate {
    pub key: Arc<PrivateKey>,
    pub certificate: Certificate,
}

impl SessionCertificate {
    /// The certificate in OpenSSH's one-line format, as stored with the session.
    pub fn openssh(&self) -> String {
        self.certificate.to_openssh().unwrap_or_default()
    }
}

/// Signs a certificate with `ca` for one session under `request.grant`.
pub fn issue(
    ca: &PrivateKey,
    request: &CertificateRequest,
) -> Result<SessionCertificate, russh::keys::ssh_key::Error> {
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)?;
    let valid_after = (request.now.timestamp() - CLOCK_SKEW_SECS).max(0) as u64;
    let valid_before = request
        .grant
        .expires_at
        .map_or(valid_after, |at| at.timestamp().max(0) as u64);
    let nonce: [u8; 32] = rand::rng().random();
    let mut builder = Builder::new(nonce.to_vec(), key.public_key(), valid_after, valid_before)?;
    builder
        .serial(request.session)?
        .cert_type(CertType::User)?
        .key_id(format!(
            "portcullis user={} grant={} session={}",
            request.user, request.grant.id, request.session
        ))?
        .valid_principal(request.login)?;
    match request.force_command {
        Some(command) => {
            builder.critical_option("force-command", command)?;
        }
        None => {
            builder.extension("permit-pty", "")?;
        }
    }
    let certificate = builder.sign(ca)?;
    Ok(SessionCertificate {
        key: Arc::new(key),
        certificate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::{GrantState, Scope};

    fn grant(expires: DateTime<Utc>) -> Grant {
        Grant {
            id: "7f3a9c".into(),
            seq: 1,
            requester: "alice".into(),
            target: "db".into(),
            login: "postgres".into(),
            scope: Scope::default(),
            ttl_secs: 600,
            reason: "INC-1".into(),
            flow: "prod".into(),
            approvals_needed: 1,
            state: GrantState::Approved,
            created_at: expires,
            pending_until: expires,
            approvals: Vec::new(),
            approved_at: None,
            expires_at: Some(expires),
            ended: None,
            auto: false,
        }
    }

    #[test]
    fn certificates_carry_the_grant() {
        let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let now = Utc::now();
        let expires = now + chrono::Duration::minutes(10);
        let grant = grant(expires);
        let request = CertificateRequest {
            user: "alice",
            grant: &grant,
            login: "postgres",
            session: 42,
            force_command: Some("uname -a"),
            now,
        };
        let issued = issue(&ca, &request).unwrap();
        let cert = &issued.certificate;
        assert_eq!(cert.valid_principals(), ["postgres"]);
        assert_eq!(cert.valid_before(), expires.timestamp() as u64);
        assert_eq!(cert.valid_after(), (now.timestamp() - 60) as u64);
        assert_eq!(
            cert.key_id(),
            "portcullis user=alice grant=7f3a9c session=42"
        );
        assert_eq!(cert.serial(), 42);
        assert_eq!(
            cert.critical_options()
                .get("force-command")
                .map(String::as_str),
            Some("uname -a")
        );
        assert!(cert.extensions().is_empty(), "no pty, no forwarding");
        let fingerprint = ca.public_key().fingerprint(Default::default());
        cert.validate_at(now.timestamp() as u64, [&fingerprint])
            .unwrap();
        assert!(cert
            .validate_at(expires.timestamp() as u64 + 1, [&fingerprint])
            .is_err());

        let shell = issue(
            &ca,
            &CertificateRequest {
                force_command: None,
                ..request
            },
        )
        .unwrap();
        let extensions: Vec<&String> = shell.certificate.extensions().keys().collect();
        assert_eq!(extensions, ["permit-pty"]);
    }
}
