//! The embedded database: one sled `Db` in the data dir, one tree per kind of record,
//! typed access on top. Keys are big-endian sequence numbers so that scans come back
//! in the order things happened.
//!
//! Values are JSON: readable with any sled dump tool, tolerant of added fields, and
//! small enough for the record sizes involved (recordings are compressed separately).

use std::path::Path;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::audit::AuditEvent;
use crate::grant::Grant;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("damaged record in tree {tree}: {detail}")]
    Corrupt { tree: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Typed access to the database.
pub struct Store {
    db: sled::Db,
    /// seq → [`Grant`].
    requests: sled::Tree,
    /// grant id → seq.
    request_ids: sled::Tree,
    /// seq → [`AuditEvent`], a hash chain.
    audit: sled::Tree,
    /// Serialises appends so each event links to the one before it.
    audit_append: Mutex<()>,
}

impl Store {
    /// Opens (or creates) the database in `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(data_dir.join("db"))
            .flush_every_ms(Some(200))
            .open()?;
        Ok(Store {
            requests: db.open_tree("requests")?,
            request_ids: db.open_tree("request_ids")?,
            audit: db.open_tree("audit")?,
            audit_append: Mutex::new(()),
            db,
        })
    }

    /// A fresh, strictly increasing number (survives restarts).
    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Writes `grant` and makes it durable before returning: a decision that was
    /// reported to a user must survive a crash.
    pub fn save_grant(&self, grant: &Grant) -> Result<()> {
        let key = grant.seq.to_be_bytes();
        self.requests.insert(key, to_json(grant))?;
        self.request_ids.insert(grant.id.as_bytes(), &key)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn grant(&self, id: &str) -> Result<Option<Grant>> {
        let Some(key) = self.request_ids.get(id.as_bytes())? else {
            return Ok(None);
        };
        match self.requests.get(key)? {
            Some(value) => from_json("requests", &value).map(Some),
            None => Ok(None),
        }
    }

    pub fn id_taken(&self, id: &str) -> Result<bool> {
        Ok(self.request_ids.contains_key(id.as_bytes())?)
    }

    /// Every grant ever filed, oldest first.
    pub fn grants(&self) -> Result<Vec<Grant>> {
        self.requests
            .iter()
            .values()
            .map(|value| from_json("requests", &value?))
            .collect()
    }

    /// Appends an event to the audit chain, linking it to the previous one, and
    /// returns it as stored.
    pub fn append_audit(&self, mut event: AuditEvent) -> Result<AuditEvent> {
        let _guard = self.audit_append.lock().expect("audit lock poisoned");
        let previous: Option<AuditEvent> = match self.audit.last()? {
            Some((_, value)) => Some(from_json("audit", &value)?),
            None => None,
        };
        event.link_after(previous.as_ref());
        self.audit
            .insert(event.seq.to_be_bytes(), to_json(&event))?;
        Ok(event)
    }

    /// Audit events in chain order.
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>> {
        self.audit
            .iter()
            .values()
            .map(|value| from_json("audit", &value?))
            .collect()
    }

    /// Forces everything written so far to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

fn from_json<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        tree,
        detail: err.to_string(),
    })
}
