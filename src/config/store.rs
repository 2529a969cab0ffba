//! `[store]`: which database the bastion keeps its state in.
//!
//! ```toml
//! [store]
//! backend = "postgres"
//! url = "postgres://portcullis@db.example.com:5432/portcullis?sslmode=require"
//! password_file = "/etc/portcullis/db-password"
//! ```
//!
//! The password never sits in the config file (which is often readable by
//! many, kept in a repository, or pasted into tickets): it comes from
//! `password_file` or, without one, the `PORTCULLIS_STORE_PASSWORD`
//! environment variable, and is read when the database is opened.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::store::{PgSettings, Settings, SslMode, DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE};

/// Largest `pool_size` accepted: PostgreSQL's default `max_connections` is 100,
/// shared by every node.
const MAX_POOL_SIZE: usize = 256;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    Sled,
    Postgres,
}

/// `[store]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    backend: Option<Kind>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    pool_size: Option<usize>,
    connect_timeout: Option<String>,
    ca_file: Option<PathBuf>,
}

impl RawStore {
    /// The backend's settings; `at` resolves a path written in the config file.
    pub fn resolve(self, at: impl Fn(PathBuf) -> PathBuf) -> Result<Settings> {
        if self.backend.unwrap_or_default() == Kind::Sled {
            let postgres_only = [
                ("url", self.url.is_some()),
                ("password_file", self.password_file.is_some()),
                ("pool_size", self.pool_size.is_some()),
                ("connect_timeout", self.connect_timeout.is_some()),
                ("ca_file", self.ca_file.is_some()),
            ];
            if let Some((key, _)) = postgres_only.iter().find(|(_, set)| *set) {
                bail!("[store] {key} is a PostgreSQL setting; add backend = \"postgres\" (or remove {key} to keep sled)");
            }
            return Ok(Settings::Sled);
        }
        let Some(url) = self.url else {
            bail!(
                "[store] backend = \"postgres\" needs url = \"postgres://USER@HOST:PORT/DATABASE\""
            );
        };
        let pool_size = self.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
            bail!("[store] pool_size = {pool_size}: use 1 to {MAX_POOL_SIZE}");
        }
        let connect_timeout = match self.connect_timeout {
            Some(text) => crate::duration::parse(&text)
                .with_context(|| format!("[store] connect_timeout = {text:?}"))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let settings = PgSettings {
            url,
            password_file: self.password_file.map(&at),
            pool_size,
            connect_timeout,
            ca_file: self.ca_file.map(&at),
        };
        // A mistake in the URL shows at load, not at the first query.
        let driver = settings.parse_url()?;
        if settings.ca_file.is_some() && driver.get_ssl_mode() == SslMode::Disable {
            bail!("[store] ca_file is set but the url says sslmode=disable, so the server's certificate would never be checked; remove one of them");
        }
        Ok(Settings::Postgres(settings))
    }
}
