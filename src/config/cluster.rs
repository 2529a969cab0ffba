//! `[cluster]`: who this bastion is among several sharing one database, and how
//! quickly the others notice that it has died. `cluster` keeps the heartbeats.

use std::time::Duration;

use serde::Deserialize;

use super::limits::humantime;

/// `[cluster]` in portcullis.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// This node's name in session records, heartbeats and `sessions --active`.
    /// Defaults to the machine's host name; every node of a cluster needs its own.
    pub node_id: String,
    /// How often the node writes its heartbeat.
    #[serde(with = "humantime")]
    pub heartbeat: Duration,
    /// A node whose heartbeat is older than this is dead: another node marks its
    /// live sessions `interrupted`.
    #[serde(with = "humantime")]
    pub node_timeout: Duration,
}

/// The longest node id: it is printed in tables and audit events.
const MAX_NODE_ID: usize = 64;

impl Default for ClusterSettings {
    fn default() -> ClusterSettings {
        ClusterSettings {
            node_id: host_name(),
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
        }
    }
}

impl ClusterSettings {
    /// Refuses settings that would name nodes ambiguously or declare live nodes
    /// dead, saying what to write instead.
    pub fn check(&self) -> Result<(), String> {
        if !valid_node_id(&self.node_id) {
            return Err(format!(
                "[cluster] node_id = {:?}: use 1 to {MAX_NODE_ID} letters, digits, '.', '-' or '_' (e.g. \"bastion-a\")",
                self.node_id
            ));
        }
        if self.heartbeat.is_zero() {
            return Err("[cluster] heartbeat must be more than 0s (e.g. \"2s\")".into());
        }
        if self.node_timeout < 3 * self.heartbeat {
            return Err(format!(
                "[cluster] node_timeout must be at least 3 heartbeats ({}), so that one late heartbeat does not declare a live node dead",
                crate::duration::format(3 * self.heartbeat)
            ));
        }
        Ok(())
    }
}

fn valid_node_id(id: &str) -> bool {
    (1..=MAX_NODE_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The machine's host name when it is a valid node id, else `bastion`.
fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    if valid_node_id(&name) {
        name
    } else {
        "bastion".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ClusterSettings::default().check().unwrap();
    }

    #[test]
    fn bad_settings_say_what_to_write() {
        let mut settings = ClusterSettings {
            node_id: "a b\u{1b}[2J".into(),
            ..ClusterSettings::default()
        };
        assert!(settings.check().unwrap_err().contains("bastion-a"));
        settings.node_id = "x".repeat(65);
        assert!(settings.check().is_err());
        settings.node_id = "bastion-a".into();
        settings.node_timeout = Duration::from_secs(5);
        assert!(settings
            .check()
            .unwrap_err()
            .contains("at least 3 heartbeats (6s)"));
        settings.heartbeat = Duration::ZERO;
        assert!(settings.check().unwrap_err().contains("more than 0s"));
    }
}
