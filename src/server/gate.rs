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

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::limits::{Limits, MaxStartups};

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
    /// From a load balancer: its PROXY header is owed before anything else.
    relayed: bool,
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

    /// Decides at accept whether a new connection from the load balancer at `ip`
    /// (`proxy_protocol_from`) may read its PROXY header. Only the random early
    /// drop applies here: whose lockout counts is known once the header names the
    /// client ([`Preauth::readdress`]), so a balancer charged for a bad header does
    /// not lock out every client behind it (its own connections, `LOCAL`, still
    /// meet its lockout there).
    pub fn admit_relayed(self: &Arc<Self>, ip: IpAddr) -> Result<Preauth, Refusal> {
        let mut preauth = self.startup(ip, rand::random_range(0..100))?;
        preauth.relayed = true;
        Ok(preauth)
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
        self.startup(ip, die)
    }

    /// Counts a new unauthenticated connection, unless the random early drop (with
    /// its die cast, 0..100) refuses it.
    fn startup(self: &Arc<Self>, ip: IpAddr, die: usize) -> Result<Preauth, Refusal> {
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
            relayed: false,
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
    /// Whether the connection came from a load balancer ([`Gate::admit_relayed`]).
    pub fn relayed(&self) -> bool {
        self.relayed
    }

    /// The relayed connection is really from `ip` (its PROXY header says so): from
    /// now on it is counted, limited and charged as `ip`'s, which must not be
    /// serving a lockout. Only before a slot is held, since the slot belongs to the
    /// prefix.
    pub fn readdress(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        debug_assert!(self.relayed && self.slot.is_none());
        if self.gate.locked(ip, None, now) {
            return Err(Refusal::Penalised);
        }
        self.ip = ip;
        self.prefix = self.gate.limits.prefix_of(ip);
        Ok(())
    }

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
        let mut limits = Limits::default();
        limits.preauth_total = 4;
        limits.preauth_per_prefix = 3;
        limits.max_startups = MaxStartups {
            start: 6,
            rate: 50,
            full: 8,
        };
        Gate::new(limits)
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

    #[test]
    fn a_readdressed_connection_takes_its_clients_slot_and_lockout() {
        let gate = gate();
        let now = Instant::now();
        let none = Attempts::default();
        let locked_client: IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..2 {
            gate.charge(locked_client, Ending::ProtocolError, &none, now);
        }
        // Through the balancer A: the client's lockout applies.
        // A balancer locked out for bad headers of its own still relays its clients.
        for _ in 0..2 {
            gate.charge(A, Ending::ProtocolError, &none, now);
        }
        assert_eq!(gate.admit(A, now).err(), Some(Refusal::Penalised));
        let mut own_check = gate.admit_relayed(A).unwrap();
        assert_eq!(own_check.readdress(A, now).err(), Some(Refusal::Penalised));
        drop(own_check);
        let mut refused = gate.admit_relayed(A).unwrap();
        assert_eq!(
            refused.readdress(locked_client, now).err(),
            Some(Refusal::Penalised)
        );
        drop(refused);
        // The client's prefix fills, not the balancer's.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut p = gate.admit_relayed(A).unwrap();
            p.readdress(B, now).unwrap();
            assert!(slot_now(&mut p));
            held.push(p);
        }
        let mut waiting = gate.admit_relayed(A).unwrap();
        waiting.readdress(B, now).unwrap();
        assert!(!slot_now(&mut waiting));
        let mut own = gate.admit_relayed(A).unwrap();
        own.readdress(A2, now).unwrap();
        assert!(
            slot_now(&mut own),
            "the balancer's network has its own slots"
        );
        drop((held, waiting, own));
        assert_eq!(gate.startups(), 0);
        assert!(gate.inner.lock().unwrap().prefixes.is_empty());
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
        let mut limits = Limits::default();
        limits.penalty_exempt = vec!["10.0.1.0/24".parse().unwrap()];
        let gate = Gate::new(limits);
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
}
