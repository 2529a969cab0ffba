//! Pre-authentication protection: who may open a connection, how many may be
//! authenticating at once, and for how long.
//!
//! Modelled on OpenSSH 9.8's `PerSourcePenalties` and `MaxStartups`: attempts are
//! never rate-limited (a burst of logins by an authorised user must pass), failures
//! are. A failed key, a connection that closes or times out before authenticating,
//! and a protocol error each add penalty time; a source whose penalty passes a
//! threshold is refused until it has served it. A failed key is charged to the
//! (address, key) pair, so one user's typos do not lock out everyone behind the
//! same NAT; the address itself is charged for what no user does by mistake.
//!
//! Connections beyond the pre-auth slots wait for one (per network prefix, then
//! overall) instead of being reset; only when the number of unauthenticated
//! connections grows past `max_startups` are new ones dropped, at random and more
//! often as it grows, as sshd does. Refusals happen before the SSH version exchange,
//! so they cost an accept and a close, not a key exchange.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    #[serde(deserialize_with = "prefixes")]
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

/// An address and prefix length, as in `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub network: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.len) == self.network
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Prefix, String> {
        let (address, len) = text.split_once('/').unwrap_or((text, ""));
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or prefix like 10.0.0.0/8"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            "" => bits,
            len => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= bits)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {bits}"))?,
        };
        Ok(Prefix {
            network: mask(ip, len),
            len,
        })
    }
}

/// `ip` with all but its first `len` bits cleared.
pub fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4)
                & u32::MAX
                    .checked_shl(32 - u32::from(len.min(32)))
                    .unwrap_or(0);
            IpAddr::V4(bits.into())
        }
        IpAddr::V6(v6) => {
            let shift = 128 - u32::from(len.min(128));
            let bits = u128::from(v6) & u128::MAX.checked_shl(shift).unwrap_or(0);
            IpAddr::V6(bits.into())
        }
    }
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

fn prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Prefix>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|p| p.parse().map_err(serde::de::Error::custom))
        .collect()
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

    fn prefix_of(&self, ip: IpAddr) -> IpAddr {
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
mod humantime {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Why a connection was refused at the door, and what it is told (sshd's words,
/// which scanners and people recognise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address has served too little of its penalty.
    Penalised,
    /// Random early drop: too many unauthenticated connections.
    Startups,
}

impl Refusal {
    pub fn message(self) -> &'static [u8] {
        match self {
            Refusal::Penalised => b"Not allowed at this time\r\n",
            Refusal::Startups => b"Exceeded MaxStartups\r\n",
        }
    }
}

/// How a connection that never authenticated ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed it (or russh did on a negotiation failure).
    Closed,
    /// The client closed it without sending its SSH version.
    Silent,
    /// The handshake deadline or the login grace expired.
    TimedOut,
    /// The client sent something that is not SSH.
    ProtocolError,
}

/// What a connection tried before it ended unauthenticated.
#[derive(Debug, Default)]
pub struct Attempts {
    /// Fingerprints of the keys refused (unknown, or locked from this address).
    pub failed_keys: Vec<String>,
    /// A key was tried while its (address, key) lockout was running.
    pub retried_locked: bool,
}

/// A lockout that started: the credential (none for the whole address) and how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    pub key: Option<String>,
    pub duration: Duration,
}

/// Accrued penalty of an address, or of an (address, key) pair.
struct Penalty {
    until: Instant,
    /// Reached the threshold: refused until `until`.
    active: bool,
}

/// Penalty table entries kept at most; beyond, new offenders are not recorded (and
/// so not refused), as sshd's `overflow:permissive`, rather than grow without bound.
const MAX_PENALTIES: usize = 65_536;

/// The door's bookkeeping, shared by the accept loop and the connections.
pub struct Gate {
    limits: Limits,
    total: Arc<Semaphore>,
    /// Unauthenticated connections: waiting for a slot or in one.
    startups: AtomicUsize,
    inner: Mutex<GateState>,
}

struct GateState {
    penalties: HashMap<(IpAddr, Option<String>), Penalty>,
    /// One semaphore per prefix that has connections in a slot or waiting.
    prefixes: HashMap<IpAddr, Arc<Semaphore>>,
}

/// One unauthenticated connection: counted in `startups` from the door until it
/// authenticates or ends, holding a prefix and a global slot once it has them.
pub struct Preauth {
    gate: Arc<Gate>,
    ip: IpAddr,
    prefix: IpAddr,
    slot: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    counted: bool,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            total: Arc::new(Semaphore::new(limits.preauth_total)),
            limits,
            startups: AtomicUsize::new(0),
            inner: Mutex::new(GateState {
                penalties: HashMap::new(),
                prefixes: HashMap::new(),
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decides at accept whether a new connection from `ip` may wait for a slot.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Preauth, Refusal> {
        self.admit_with(ip, now, rand::random_range(0..100))
    }

    /// [`Gate::admit`] with the random early drop's die already cast (0..100).
    fn admit_with(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
        die: usize,
    ) -> Result<Preauth, Refusal> {
        if self.locked(ip, None, now) {
            return Err(Refusal::Penalised);
        }
        let MaxStartups { start, rate, full } = self.limits.max_startups;
        let startups = self.startups.load(Ordering::Relaxed);
        if startups >= start {
            // sshd's formula: `rate`% at `start`, rising linearly to 100% at `full`.
            let chance = rate + (100 - rate) * (startups - start) / (full - start).max(1);
            if startups >= full || die < chance {
                return Err(Refusal::Startups);
            }
        }
        self.startups.fetch_add(1, Ordering::Relaxed);
        Ok(Preauth {
            gate: self.clone(),
            ip,
            prefix: self.limits.prefix_of(ip),
            slot: None,
            counted: true,
        })
    }

    /// Whether `ip` (with `key`: the pair) is serving a lockout.
    pub fn locked(&self, ip: IpAddr, key: Option<&str>, now: Instant) -> bool {
        let state = self.inner.lock().expect("gate lock poisoned");
        state
            .penalties
            .get(&(ip, key.map(str::to_string)))
            .is_some_and(|p| p.active && now < p.until)
    }

    /// Charges a connection from `ip` that ended unauthenticated; returns the
    /// lockouts this started (for the audit log).
    pub fn charge(
        &self,
        ip: IpAddr,
        ending: Ending,
        attempts: &Attempts,
        now: Instant,
    ) -> Vec<Lockout> {
        let limits = &self.limits;
        let mut state = self.inner.lock().expect("gate lock poisoned");
        let mut lockouts = Vec::new();
        // Closing without failing a key (scanners, probes) or retrying a lockout is
        // the address's doing; so is trying one more key nobody has failed from here
        // yet, which is how a spray of keys shows.
        let mut noauth = attempts.failed_keys.is_empty() || attempts.retried_locked;
        for key in &attempts.failed_keys {
            let entry = (ip, Some(key.clone()));
            noauth |= state.penalties.get(&entry).is_none_or(|p| now >= p.until);
            if let Some(duration) = state.penalise(entry, limits.penalty_authfail, limits, now) {
                lockouts.push(Lockout {
                    key: Some(key.clone()),
                    duration,
                });
            }
        }
        let mut address = match ending {
            Ending::Closed | Ending::Silent => Duration::ZERO,
            Ending::TimedOut => limits.penalty_grace,
            Ending::ProtocolError => limits.penalty_protocol,
        };
        if noauth {
            address = address.max(limits.penalty_noauth);
        }
        let exempt = limits.penalty_exempt.iter().any(|p| p.contains(ip));
        if !exempt && !address.is_zero() {
            if let Some(duration) = state.penalise((ip, None), address, limits, now) {
                lockouts.push(Lockout {
                    key: None,
                    duration,
                });
            }
        }
        lockouts
    }

    /// Gives back a slot and forgets the prefix's semaphore once nobody uses it.
    fn release(&self, prefix: IpAddr) {
        let mut state = self.inner.lock().expect("gate lock poisoned");
        if state
            .prefixes
            .get(&prefix)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            state.prefixes.remove(&prefix);
        }
    }

    /// Unauthenticated connections right now (waiting or in a slot).
    pub fn startups(&self) -> usize {
        self.startups.load(Ordering::Relaxed)
    }
}

impl GateState {
    /// Adds `amount` to an entry's penalty (sshd's rules: time adds up while the
    /// penalty runs, capped at `penalty_max`; once it reaches the threshold the
    /// source is refused until it expires). Returns the lockout's length when this
    /// started one.
    fn penalise(
        &mut self,
        entry: (IpAddr, Option<String>),
        amount: Duration,
        limits: &Limits,
        now: Instant,
    ) -> Option<Duration> {
        if self.penalties.len() >= MAX_PENALTIES && !self.penalties.contains_key(&entry) {
            self.penalties.retain(|_, p| now < p.until);
            if self.penalties.len() >= MAX_PENALTIES {
                tracing::warn!(source = %entry.0, "penalty table full; not recording this source");
                return None;
            }
        }
        let penalty = self.penalties.entry(entry).or_insert(Penalty {
            until: now,
            active: false,
        });
        if penalty.until <= now {
            *penalty = Penalty {
                until: now,
                active: false,
            };
        }
        penalty.until = (penalty.until + amount).min(now + limits.penalty_max);
        let remaining = penalty.until - now;
        if !penalty.active && remaining >= limits.penalty_threshold {
            penalty.active = true;
            return Some(remaining);
        }
        None
    }
}

impl Preauth {
    /// Waits for a slot in this connection's prefix, then overall (in that order, so
    /// the queue of a crowded prefix holds no global slot), and checks again that
    /// the source has not been locked out meanwhile.
    pub async fn wait_for_slot(&mut self) -> Result<(), Refusal> {
        let gate = self.gate.clone();
        let prefix = {
            let mut state = gate.inner.lock().expect("gate lock poisoned");
            state
                .prefixes
                .entry(self.prefix)
                .or_insert_with(|| Arc::new(Semaphore::new(gate.limits.preauth_per_prefix)))
                .clone()
        };
        let in_prefix = prefix.acquire_owned().await.expect("never closed");
        let overall = gate
            .total
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        self.slot = Some((in_prefix, overall));
        if gate.locked(self.ip, None, Instant::now()) {
            return Err(Refusal::Penalised);
        }
        Ok(())
    }

    /// Authentication succeeded (or the connection ended): the slot is free for
    /// someone else and the connection no longer counts as a startup.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.gate.startups.fetch_sub(1, Ordering::Relaxed);
            self.slot = None;
            self.gate.release(self.prefix);
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
            preauth_total: 4,
            preauth_per_prefix: 3,
            max_startups: MaxStartups {
                start: 6,
                rate: 50,
                full: 8,
            },
            ..Limits::default()
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const A2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 1));

    fn slot_now(preauth: &mut Preauth) -> bool {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), preauth.wait_for_slot())
                .await
                .is_ok_and(|r| r.is_ok())
        })
    }

    #[test]
    fn a_prefix_gets_part_of_the_slots_and_the_rest_wait() {
        let gate = gate();
        let now = Instant::now();
        let mut held = Vec::new();
        for ip in [A, A2, A] {
            let mut p = gate.admit(ip, now).unwrap();
            assert!(slot_now(&mut p));
            held.push(p);
        }
        // A fourth from 10.0.0.0/24 waits, another network still gets in.
        let mut waiting = gate.admit(A2, now).unwrap();
        assert!(!slot_now(&mut waiting));
        let mut other = gate.admit(B, now).unwrap();
        assert!(slot_now(&mut other));
        held.pop();
        assert!(slot_now(&mut waiting));
        assert_eq!(gate.startups(), 4);
        drop((held, waiting, other));
        assert_eq!(gate.startups(), 0);
        assert!(gate.inner.lock().unwrap().prefixes.is_empty());
    }

    #[test]
    fn beyond_max_startups_connections_are_dropped_at_random_then_all() {
        let gate = gate();
        let now = Instant::now();
        let held: Vec<Preauth> = (0..6).map(|_| gate.admit(B, now).unwrap()).collect();
        // 6 = start: 50% chance.
        assert_eq!(gate.admit_with(B, now, 49).err(), Some(Refusal::Startups));
        let seventh = gate.admit_with(B, now, 50).unwrap();
        // 7: 75%.
        assert_eq!(gate.admit_with(B, now, 74).err(), Some(Refusal::Startups));
        let eighth = gate.admit_with(B, now, 99).unwrap();
        // 8 = full: always.
        assert_eq!(gate.admit_with(B, now, 99).err(), Some(Refusal::Startups));
        drop((held, seventh, eighth));
        assert!(gate.admit_with(B, now, 0).is_ok());
    }

    fn failed(key: &str) -> Attempts {
        Attempts {
            failed_keys: vec![key.to_string()],
            retried_locked: false,
        }
    }

    #[test]
    fn failed_keys_lock_the_pair_not_the_address() {
        let gate = gate();
        let now = Instant::now();
        // 5 s each: the third makes 15 s, the threshold.
        assert!(gate
            .charge(A, Ending::Closed, &failed("k1"), now)
            .is_empty());
        assert!(gate
            .charge(A, Ending::Closed, &failed("k1"), now)
            .is_empty());
        let lockouts = gate.charge(A, Ending::Closed, &failed("k1"), now);
        assert_eq!(
            lockouts,
            vec![Lockout {
                key: Some("k1".into()),
                duration: Duration::from_secs(15)
            }]
        );
        assert!(gate.locked(A, Some("k1"), now));
        assert!(!gate.locked(A, Some("k2"), now));
        assert!(
            !gate.locked(A, None, now),
            "one new key cost the address 1 s"
        );
        assert!(gate.admit(A, now).is_ok());
        let later = now + Duration::from_secs(15);
        assert!(!gate.locked(A, Some("k1"), later));
    }

    #[test]
    fn retrying_a_lockout_or_spraying_keys_locks_the_address() {
        let gate = gate();
        let now = Instant::now();
        let retry = Attempts {
            failed_keys: vec!["k".into()],
            retried_locked: true,
        };
        for _ in 0..14 {
            gate.charge(A, Ending::Closed, &retry, now);
        }
        assert!(!gate.locked(A, None, now));
        gate.charge(A, Ending::Closed, &retry, now);
        assert_eq!(gate.admit(A, now).err(), Some(Refusal::Penalised));
        assert!(gate.admit(A2, now).is_ok(), "penalties are per address");
        for n in 0..15 {
            gate.charge(A2, Ending::Closed, &failed(&format!("spray{n}")), now);
        }
        assert_eq!(gate.admit(A2, now).err(), Some(Refusal::Penalised));
    }

    #[test]
    fn timeouts_and_protocol_errors_cost_more_and_exempt_addresses_nothing() {
        let gate = Gate::new(Limits {
            penalty_exempt: vec!["10.0.1.0/24".parse().unwrap()],
            ..Limits::default()
        });
        let now = Instant::now();
        let none = Attempts::default();
        gate.charge(A, Ending::TimedOut, &none, now);
        assert!(!gate.locked(A, None, now));
        let lockouts = gate.charge(A, Ending::ProtocolError, &none, now);
        assert_eq!(lockouts[0].duration, Duration::from_secs(20));
        assert!(gate.locked(A, None, now + Duration::from_secs(19)));
        assert!(!gate.locked(A, None, now + Duration::from_secs(20)));
        for _ in 0..100 {
            gate.charge(B, Ending::TimedOut, &none, now);
        }
        assert!(!gate.locked(B, None, now));
        // Capped at penalty_max.
        for _ in 0..100 {
            gate.charge(A2, Ending::TimedOut, &none, now);
        }
        assert!(gate.locked(A2, None, now + Duration::from_secs(599)));
        assert!(!gate.locked(A2, None, now + Duration::from_secs(600)));
    }

    #[test]
    fn prefixes_mask_addresses() {
        let p: Prefix = "10.1.2.3/8".parse().unwrap();
        assert_eq!(p.network.to_string(), "10.0.0.0");
        assert!(p.contains("10.200.0.1".parse().unwrap()));
        assert!(!p.contains("11.0.0.1".parse().unwrap()));
        let v6: Prefix = "2001:db8::1/64".parse().unwrap();
        assert!(v6.contains("2001:db8::ffff".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert_eq!(mask("1.2.3.4".parse().unwrap(), 0).to_string(), "0.0.0.0");
    }

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
