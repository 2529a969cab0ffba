//! Pre-authentication protection: who may open a connection, and for how long it may
//! stay unauthenticated.
//!
//! Per source address: a rate of new connections (a token bucket, which is also what
//! keeps key-exchange floods such as DHEat cheap to refuse), a cap on connections
//! still authenticating, and a lockout after too many failed authentications. Across
//! all sources: a cap on connections still authenticating. Refused connections are
//! closed before the SSH version exchange, so they cost a syscall, not a key exchange.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::grant::RequestLimits;

/// `[limits]` in portcullis.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// New connections per second per source address (also the burst).
    pub connections_per_second: f64,
    /// Connections per source address that have not authenticated yet.
    pub preauth_per_source: usize,
    /// Connections, from all sources, that have not authenticated yet.
    pub preauth_total: usize,
    /// Failed authentications per source address within `failure_window` that
    /// lock the address out for `lockout`.
    pub failures_per_source: usize,
    #[serde(with = "humantime")]
    pub failure_window: Duration,
    #[serde(with = "humantime")]
    pub lockout: Duration,
    /// Time allowed from TCP connect to successful authentication.
    #[serde(with = "humantime")]
    pub login_grace: Duration,
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
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_per_second: 10.0,
            preauth_per_source: 10,
            preauth_total: 100,
            failures_per_source: 20,
            failure_window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
            login_grace: Duration::from_secs(30),
            channels_per_connection: 64,
            pending_requests_per_user: RequestLimits::default().pending_per_user,
            requests_per_user: RequestLimits::default().per_window,
            request_window: RequestLimits::default().window,
            connections_per_user: 128,
            sessions_per_user: 256,
            idle_window_timeout: Duration::from_secs(600),
        }
    }
}

impl Limits {
    /// Refuses limits that would lock every user out (a zero rate or zero slots).
    pub fn check(&self) -> Result<(), String> {
        let rate = self.connections_per_second;
        if !(rate.is_finite() && rate >= 1.0) {
            return Err(format!(
                "limits.connections_per_second = {rate} would refuse everyone; use 1 or more (default 10)"
            ));
        }
        for (key, value) in [
            ("preauth_per_source", self.preauth_per_source),
            ("preauth_total", self.preauth_total),
            ("failures_per_source", self.failures_per_source),
            ("channels_per_connection", self.channels_per_connection),
            ("pending_requests_per_user", self.pending_requests_per_user),
            ("requests_per_user", self.requests_per_user),
            ("connections_per_user", self.connections_per_user),
            ("sessions_per_user", self.sessions_per_user),
        ] {
            if value == 0 {
                return Err(format!(
                    "limits.{key} = 0 would refuse everyone; use 1 or more"
                ));
            }
        }
        if self.request_window.is_zero() {
            return Err(
                "limits.request_window = 0s would not limit anything; use e.g. \"10m\"".into(),
            );
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
}

/// Durations as `30s`, `5m` in the config file.
mod humantime {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Why a connection was refused at the door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    LockedOut,
    TooFast,
    TooManyFromSource,
    TooManyOverall,
}

/// What the gate tracks per source address.
struct Source {
    tokens: f64,
    refilled: Instant,
    preauth: usize,
    failures: Vec<Instant>,
    locked_until: Option<Instant>,
}

/// The door's bookkeeping, shared by the accept loop and the connections.
pub struct Gate {
    limits: Limits,
    inner: Mutex<GateState>,
}

struct GateState {
    sources: HashMap<IpAddr, Source>,
    preauth_total: usize,
}

/// Holds one pre-authentication slot until authentication succeeds or the
/// connection ends.
pub struct Preauth {
    gate: Arc<Gate>,
    ip: IpAddr,
    released: bool,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            inner: Mutex::new(GateState {
                sources: HashMap::new(),
                preauth_total: 0,
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decides whether a new connection from `ip` may start authenticating.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Preauth, Refusal> {
        let limits = &self.limits;
        let mut state = self.inner.lock().expect("gate lock poisoned");
        if state.preauth_total >= limits.preauth_total {
            return Err(Refusal::TooManyOverall);
        }
        if state.sources.len() > 100_000 {
            // Bound the table under a spray of source addresses.
            state
                .sources
                .retain(|_, s| s.preauth > 0 || s.locked_until.is_some());
        }
        let source = state.sources.entry(ip).or_insert_with(|| Source {
            tokens: limits.connections_per_second,
            refilled: now,
            preauth: 0,
            failures: Vec::new(),
            locked_until: None,
        });
        if source.locked_until.is_some_and(|until| now < until) {
            return Err(Refusal::LockedOut);
        }
        let elapsed = now.duration_since(source.refilled).as_secs_f64();
        source.tokens = (source.tokens + elapsed * limits.connections_per_second)
            .min(limits.connections_per_second.max(1.0));
        source.refilled = now;
        if source.tokens < 1.0 {
            return Err(Refusal::TooFast);
        }
        if source.preauth >= limits.preauth_per_source {
            return Err(Refusal::TooManyFromSource);
        }
        source.tokens -= 1.0;
        source.preauth += 1;
        state.preauth_total += 1;
        Ok(Preauth {
            gate: self.clone(),
            ip,
            released: false,
        })
    }

    /// Counts a failed authentication; returns true when it locks the source out.
    pub fn auth_failed(&self, ip: IpAddr, now: Instant) -> bool {
        let limits = &self.limits;
        let mut state = self.inner.lock().expect("gate lock poisoned");
        let Some(source) = state.sources.get_mut(&ip) else {
            return false;
        };
        source
            .failures
            .retain(|at| now.duration_since(*at) < limits.failure_window);
        source.failures.push(now);
        if source.failures.len() >= limits.failures_per_source
            && source.locked_until.is_none_or(|u| u <= now)
        {
            source.locked_until = Some(now + limits.lockout);
            source.failures.clear();
            return true;
        }
        false
    }

    fn release(&self, ip: IpAddr) {
        let mut state = self.inner.lock().expect("gate lock poisoned");
        state.preauth_total = state.preauth_total.saturating_sub(1);
        if let Some(source) = state.sources.get_mut(&ip) {
            source.preauth = source.preauth.saturating_sub(1);
        }
    }
}

impl Preauth {
    /// Authentication succeeded: the slot is free for someone else.
    pub fn release(&mut self) {
        if !self.released {
            self.released = true;
            self.gate.release(self.ip);
        }
    }
}

impl Drop for Preauth {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Arc<Gate> {
        Gate::new(Limits {
            connections_per_second: 5.0,
            preauth_per_source: 3,
            preauth_total: 4,
            failures_per_source: 3,
            ..Limits::default()
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_source_gets_a_rate_and_a_number_of_slots() {
        let gate = gate();
        let now = Instant::now();
        let mut held: Vec<Preauth> = (0..3).map(|_| gate.admit(A, now).unwrap()).collect();
        assert_eq!(gate.admit(A, now).err(), Some(Refusal::TooManyFromSource));
        held[0].release();
        held.remove(0);
        // Slot free again, but the bucket (5/s) is nearly spent: 2 tokens left.
        held.push(gate.admit(A, now).unwrap());
        held.clear();
        held.push(gate.admit(A, now).unwrap());
        assert_eq!(gate.admit(A, now).err(), Some(Refusal::TooFast));
        let later = now + Duration::from_secs(1);
        held.push(gate.admit(A, later).unwrap());
        // Another source is not affected, but the overall cap is.
        let b: Vec<Preauth> = (0..2).map(|_| gate.admit(B, later).unwrap()).collect();
        assert_eq!(gate.admit(B, later).err(), Some(Refusal::TooManyOverall));
        drop(b);
    }

    #[test]
    fn limits_that_refuse_everyone_are_rejected() {
        assert!(Limits::default().check().is_ok());
        let zero_rate = Limits {
            connections_per_second: 0.0,
            ..Limits::default()
        };
        assert!(zero_rate
            .check()
            .unwrap_err()
            .contains("connections_per_second"));
        let no_slots = Limits {
            preauth_total: 0,
            ..Limits::default()
        };
        assert!(no_slots.check().unwrap_err().contains("preauth_total"));
    }

    #[test]
    fn repeated_failures_lock_a_source_out_for_a_while() {
        let gate = gate();
        let now = Instant::now();
        drop(gate.admit(A, now).unwrap());
        assert!(!gate.auth_failed(A, now));
        assert!(!gate.auth_failed(A, now));
        assert!(gate.auth_failed(A, now));
        assert_eq!(gate.admit(A, now).err(), Some(Refusal::LockedOut));
        assert!(gate.admit(B, now).is_ok());
        let after = now + Limits::default().lockout + Duration::from_secs(1);
        assert!(gate.admit(A, after).is_ok());
    }
}
