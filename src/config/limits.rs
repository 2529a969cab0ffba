//! `[limits]`: the bastion's limits on connections, sessions, requests and memory,
//! as the config file states them. The gate (`server`) and the relay (`proxy`)
//! enforce them.

use std::net::IpAddr;
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

use super::prefix::{mask, Prefix};
use crate::grant::RequestLimits;

/// `[limits]` in portcullis.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections doing their key exchange or authentication at once, overall.
    pub preauth_total: usize,
    /// Of those, from one network prefix (`prefix_v4`, `prefix_v6`); the rest wait.
    pub preauth_per_prefix: usize,
    /// Prefix lengths that group addresses into one network for `preauth_per_prefix`.
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    /// `start:rate:full` over unauthenticated connections (in a slot or waiting for
    /// one): from `start` on, a new connection is dropped with probability `rate`%,
    /// rising linearly to 100% at `full` (sshd's `MaxStartups`).
    #[serde(deserialize_with = "max_startups")]
    pub max_startups: MaxStartups,
    /// Time from getting a slot to the end of the key exchange (version exchange
    /// included).
    #[serde(with = "humantime")]
    pub handshake_timeout: Duration,
    /// Time allowed from TCP connect (waiting for a slot included) to successful
    /// authentication.
    #[serde(with = "humantime")]
    pub login_grace: Duration,
    /// Penalty for each key refused on a connection that then ends unauthenticated,
    /// charged to (address, key).
    #[serde(with = "humantime")]
    pub penalty_authfail: Duration,
    /// Penalty charged to the address for a connection that ends unauthenticated
    /// without failing a key, fails a key new from that address, or retries a
    /// locked key.
    #[serde(with = "humantime")]
    pub penalty_noauth: Duration,
    /// Penalty charged to the address when the handshake or login grace expires.
    #[serde(with = "humantime")]
    pub penalty_grace: Duration,
    /// Penalty charged to the address for a malformed SSH stream (bad version line,
    /// corrupt packets, key exchange violations).
    #[serde(with = "humantime")]
    pub penalty_protocol: Duration,
    /// A source whose accrued penalty reaches this is refused until it expires.
    #[serde(with = "humantime")]
    pub penalty_threshold: Duration,
    /// Accrued penalty never exceeds this.
    #[serde(with = "humantime")]
    pub penalty_max: Duration,
    /// Addresses or prefixes (`"203.0.113.7"`, `"10.0.0.0/8"`) never locked out as
    /// a whole (NAT gateways, CI egress); their (address, key) lockouts still apply.
    #[serde(deserialize_with = "super::prefix::list")]
    pub penalty_exempt: Vec<Prefix>,
    /// Session channels open at once on one connection (ControlMaster multiplexing).
    pub channels_per_connection: usize,
    /// Requests of one user waiting for an approver at once.
    pub pending_requests_per_user: usize,
    /// Requests needing a decision one user may file within `request_window`.
    pub requests_per_user: usize,
    #[serde(with = "humantime")]
    pub request_window: Duration,
    /// Authenticated connections one user may hold at once.
    pub connections_per_user: usize,
    /// Proxied sessions one user may run at once (over all connections).
    pub sessions_per_user: usize,
    /// How long a peer's window may stay shut (nothing it is sent gets read)
    /// before the session is ended: a client that never reads must not pin the
    /// relay's buffers for ever.
    #[serde(with = "humantime")]
    pub idle_window_timeout: Duration,
    /// Bytes all sessions together may hold in memory beyond each relay pipe's and
    /// each recording's own allowance (see `crate::budget`): overdrafts of pipes
    /// whose peer is slow, and recording batches waiting for a slow disk.
    #[serde(deserialize_with = "size")]
    pub relay_memory: usize,
    /// Upstream connections one client connection may open to its target: more than
    /// one only when the target refuses a session channel (sshd's `MaxSessions`).
    pub upstream_connections_per_client: usize,
    // Keys of the rate-based gate, refused with a pointer to what replaced them.
    #[serde(rename = "connections_per_second")]
    removed_connections_per_second: Option<IgnoredAny>,
    #[serde(rename = "preauth_per_source")]
    removed_preauth_per_source: Option<IgnoredAny>,
    #[serde(rename = "failures_per_source")]
    removed_failures_per_source: Option<IgnoredAny>,
    #[serde(rename = "failure_window")]
    removed_failure_window: Option<IgnoredAny>,
    #[serde(rename = "lockout")]
    removed_lockout: Option<IgnoredAny>,
}

/// sshd's `MaxStartups start:rate:full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    pub start: usize,
    pub rate: usize,
    pub full: usize,
}

fn max_startups<'de, D: Deserializer<'de>>(d: D) -> Result<MaxStartups, D::Error> {
    let text = String::deserialize(d)?;
    let numbers: Vec<usize> = text
        .split(':')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| serde::de::Error::custom("max_startups is \"start:rate:full\""))?;
    match numbers[..] {
        [start, rate, full] if start <= full && rate <= 100 => {
            Ok(MaxStartups { start, rate, full })
        }
        _ => Err(serde::de::Error::custom(
            "max_startups is \"start:rate:full\" with start <= full and rate <= 100",
        )),
    }
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let text = String::deserialize(d)?;
    crate::record::disk::parse_size(&text)
        .and_then(|bytes| usize::try_from(bytes).map_err(|_| format!("{text:?} is too large")))
        .map_err(serde::de::Error::custom)
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            preauth_total: 256,
            preauth_per_prefix: 64,
            prefix_v4: 24,
            prefix_v6: 64,
            max_startups: MaxStartups {
                start: 1500,
                rate: 30,
                full: 6000,
            },
            handshake_timeout: Duration::from_secs(10),
            login_grace: Duration::from_secs(30),
            penalty_authfail: Duration::from_secs(5),
            penalty_noauth: Duration::from_secs(1),
            penalty_grace: Duration::from_secs(10),
            penalty_protocol: Duration::from_secs(10),
            penalty_threshold: Duration::from_secs(15),
            penalty_max: Duration::from_secs(600),
            penalty_exempt: Vec::new(),
            channels_per_connection: 64,
            pending_requests_per_user: RequestLimits::default().pending_per_user,
            requests_per_user: RequestLimits::default().per_window,
            request_window: RequestLimits::default().window,
            connections_per_user: 128,
            sessions_per_user: 256,
            idle_window_timeout: Duration::from_secs(600),
            relay_memory: crate::budget::DEFAULT_LIMIT,
            upstream_connections_per_client: 4,
            removed_connections_per_second: None,
            removed_preauth_per_source: None,
            removed_failures_per_source: None,
            removed_failure_window: None,
            removed_lockout: None,
        }
    }
}

impl Limits {
    /// Refuses removed keys (naming their replacement) and limits that would lock
    /// every user out.
    pub fn check(&self) -> Result<(), String> {
        for (removed, key, instead) in [
            (
                self.removed_connections_per_second.is_some(),
                "connections_per_second",
                "attempts are no longer rate-limited: failures accrue penalties (penalty_*), and connections beyond preauth_total / preauth_per_prefix wait for a slot",
            ),
            (
                self.removed_preauth_per_source.is_some(),
                "preauth_per_source",
                "use preauth_per_prefix (per address: prefix_v4 = 32, prefix_v6 = 128)",
            ),
            (
                self.removed_failures_per_source.is_some(),
                "failures_per_source",
                "use penalty_authfail and penalty_threshold",
            ),
            (
                self.removed_failure_window.is_some(),
                "failure_window",
                "penalties expire by themselves; use penalty_threshold",
            ),
            (
                self.removed_lockout.is_some(),
                "lockout",
                "a lockout lasts as long as the accrued penalty, at most penalty_max",
            ),
        ] {
            if removed {
                return Err(format!("limits.{key} was removed: {instead}"));
            }
        }
        for (key, value) in [
            ("preauth_total", self.preauth_total),
            ("preauth_per_prefix", self.preauth_per_prefix),
            ("channels_per_connection", self.channels_per_connection),
            ("pending_requests_per_user", self.pending_requests_per_user),
            ("requests_per_user", self.requests_per_user),
            ("connections_per_user", self.connections_per_user),
            ("sessions_per_user", self.sessions_per_user),
            (
                "upstream_connections_per_client",
                self.upstream_connections_per_client,
            ),
        ] {
            if value == 0 {
                return Err(format!(
                    "limits.{key} = 0 would refuse everyone; use 1 or more"
                ));
            }
        }
        if self.preauth_per_prefix > self.preauth_total {
            return Err(format!(
                "limits.preauth_per_prefix = {} is more than preauth_total = {}: one network could take every slot",
                self.preauth_per_prefix, self.preauth_total
            ));
        }
        if self.prefix_v4 > 32 || self.prefix_v6 > 128 {
            return Err("limits.prefix_v4 is at most 32 and prefix_v6 at most 128".into());
        }
        for (key, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("login_grace", self.login_grace),
            ("penalty_threshold", self.penalty_threshold),
            ("request_window", self.request_window),
        ] {
            if value.is_zero() {
                return Err(format!("limits.{key} = 0s cannot work; see the README"));
            }
        }
        Ok(())
    }

    /// The per-user request limits the grant service enforces.
    pub fn requests(&self) -> RequestLimits {
        RequestLimits {
            pending_per_user: self.pending_requests_per_user,
            per_window: self.requests_per_user,
            window: self.request_window,
        }
    }

    /// The network `ip` belongs to, for per-prefix limits.
    pub fn prefix_of(&self, ip: IpAddr) -> IpAddr {
        mask(
            ip,
            if ip.is_ipv4() {
                self.prefix_v4
            } else {
                self.prefix_v6
            },
        )
    }
}

/// Durations as `30s`, `5m` in the config file.
pub(super) mod humantime {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_refuse_everyone_or_removed_keys_are_rejected() {
        assert!(Limits::default().check().is_ok());
        let no_slots = Limits {
            preauth_total: 0,
            ..Limits::default()
        };
        assert!(no_slots.check().unwrap_err().contains("preauth_total"));
        let greedy = Limits {
            preauth_per_prefix: 300,
            ..Limits::default()
        };
        assert!(greedy.check().unwrap_err().contains("preauth_per_prefix"));
        let old: Limits = toml::from_str("connections_per_second = 10.0").unwrap();
        let err = old.check().unwrap_err();
        assert!(err.contains("connections_per_second was removed"), "{err}");
        assert!(err.contains("penalty_"), "{err}");
        let old: Limits = toml::from_str("lockout = \"5m\"").unwrap();
        assert!(old.check().unwrap_err().contains("penalty_max"));
        let startups: Limits = toml::from_str("max_startups = \"10:30:100\"").unwrap();
        assert_eq!(startups.max_startups.full, 100);
        assert!(toml::from_str::<Limits>("max_startups = \"10:130:100\"").is_err());
    }

    #[test]
    fn the_relay_memory_budget_is_a_size() {
        let limits: Limits = toml::from_str("relay_memory = \"64MiB\"").unwrap();
        assert_eq!(limits.relay_memory, 64 << 20);
        let err = toml::from_str::<Limits>("relay_memory = \"lots\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("512MiB or 2GiB"), "{err}");
    }
}
