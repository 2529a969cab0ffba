//! What a control-plane command answers when it does not succeed.
//!
//! Every variant reaches the client as one `portcullis: ...` line on stderr and
//! exit status 1 (see [`super::finish`]); the variants say where the message comes
//! from, so a command's failure paths are visible in its type.

use crate::audit::ChainBreak;
use crate::grant::GrantError;
use crate::store::StoreError;

/// Why a control-plane command failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input, or a refusal; the message says what to do instead.
    #[error("{0}")]
    Refused(String),
    /// An auditor command run by someone outside `auditors`.
    #[error("only auditors ({}) may read recordings and the audit log", .auditors.join(", "))]
    NotAuditor { auditors: Vec<String> },
    /// A request, approval or grant change the grant rules refused.
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// The database could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `audit verify` found the hash chain broken.
    #[error(transparent)]
    Chain(#[from] ChainBreak),
    /// `request --wait --json` ended without approval: the decided request, as
    /// JSON for stdout (scripts read the document, and the exit status says no).
    #[error("the request was not approved")]
    NotApprovedJson(String),
    /// The client closed the channel while the command waited: nobody to answer.
    #[error("the client went away")]
    Gone,
}

impl ControlError {
    /// A refusal with `message`.
    pub fn refused(message: impl Into<String>) -> Self {
        ControlError::Refused(message.into())
    }
}

/// What a command prints on stdout when it succeeds, or why it failed.
pub type Reply = Result<String, ControlError>;
