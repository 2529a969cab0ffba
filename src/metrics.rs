//! Prometheus metrics and a health check, served on `metrics_listen` when set.
//!
//! `GET /metrics` is the Prometheus text format; `GET /healthz` answers `200 ok`
//! while the bastion accepts connections and 503 with the reason otherwise:
//! `draining` during shutdown (so a load balancer stops sending new users before
//! the sessions end), `store failed: …` once the database cannot be written, and
//! `disk nearly full: …` below `min_free_disk` (new sessions are refused then).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Everything counted while the bastion runs; gauges are refreshed at each scrape.
pub struct Metrics {
    registry: Registry,
    pub sessions_total: Counter,
    pub auth_failures: Counter,
    pub bytes_to_targets: Counter,
    pub bytes_from_targets: Counter,
    pub upstream_connect_seconds: Histogram,
    active_sessions: Gauge,
    pending_requests: Gauge,
    recording_queue_bytes: Gauge,
    recording_wait_seconds: Counter<f64, AtomicU64>,
    recording_writes: Counter,
    recording_write_seconds: Counter<f64, AtomicU64>,
    relay_memory_bytes: Gauge,
    tasks_alive: Gauge,
    open_fds: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("portcullis"),
            sessions_total: Counter::default(),
            auth_failures: Counter::default(),
            bytes_to_targets: Counter::default(),
            bytes_from_targets: Counter::default(),
            // 1 ms … ~16 s
            upstream_connect_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            active_sessions: Gauge::default(),
            pending_requests: Gauge::default(),
            recording_queue_bytes: Gauge::default(),
            recording_wait_seconds: Counter::default(),
            recording_writes: Counter::default(),
            recording_write_seconds: Counter::default(),
            relay_memory_bytes: Gauge::default(),
            tasks_alive: Gauge::default(),
            open_fds: Gauge::default(),
        };
        metrics.register_all()
    }
}

impl Metrics {
    fn register_all(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "sessions",
            "Proxied sessions started",
            self.sessions_total.clone(),
        );
        r.register(
            "auth_failures",
            "Failed authentication attempts",
            self.auth_failures.clone(),
        );
        r.register(
            "bytes_to_targets",
            "Bytes relayed from clients to targets",
            self.bytes_to_targets.clone(),
        );
        r.register(
            "bytes_from_targets",
            "Bytes relayed from targets to clients",
            self.bytes_from_targets.clone(),
        );
        r.register(
            "upstream_connect_seconds",
            "Time to connect and authenticate to a target",
            self.upstream_connect_seconds.clone(),
        );
        r.register(
            "active_sessions",
            "Proxied sessions running now",
            self.active_sessions.clone(),
        );
        r.register(
            "pending_requests",
            "Access requests waiting for a decision",
            self.pending_requests.clone(),
        );
        r.register(
            "recording_queue_bytes",
            "Recorded bytes not yet written to the store",
            self.recording_queue_bytes.clone(),
        );
        r.register(
            "recording_wait_seconds",
            "Time relays waited for their recordings to be written: the store is slower than the sessions",
            self.recording_wait_seconds.clone(),
        );
        r.register(
            "recording_writes",
            "Transcript writes to the store",
            self.recording_writes.clone(),
        );
        r.register(
            "recording_write_seconds",
            "Time the transcript writes to the store took",
            self.recording_write_seconds.clone(),
        );
        r.register(
            "relay_memory_bytes",
            "Session bytes held beyond their own allowances, charged to [limits] relay_memory",
            self.relay_memory_bytes.clone(),
        );
        r.register("tasks_alive", "Tokio tasks alive", self.tasks_alive.clone());
        r.register("open_fds", "Open file descriptors", self.open_fds.clone());
        self
    }

    /// The text exposition, with the gauges set from `now`.
    pub fn render(&self, now: &Snapshot) -> String {
        self.active_sessions.set(now.live_sessions as i64);
        self.pending_requests.set(now.pending_requests as i64);
        self.recording_queue_bytes
            .set(now.recording_queue_bytes as i64);
        // Counters from totals the recorder keeps: each scrape adds what grew.
        let grown = |counter: &Counter<f64, AtomicU64>, total: f64| {
            counter.inc_by((total - counter.get()).max(0.0));
        };
        grown(&self.recording_wait_seconds, now.recording_wait_seconds);
        grown(&self.recording_write_seconds, now.recording_write_seconds);
        let writes = now
            .recording_writes
            .saturating_sub(self.recording_writes.get());
        self.recording_writes.inc_by(writes);
        self.relay_memory_bytes.set(now.relay_memory_bytes as i64);
        self.tasks_alive.set(now.tasks_alive as i64);
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        self.open_fds.set(fds as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// What the gauges and the health check show, read from the bastion at a scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub live_sessions: usize,
    pub pending_requests: usize,
    pub recording_queue_bytes: u64,
    /// Totals since start (the recorder's `RecordingTotals`).
    pub recording_wait_seconds: f64,
    pub recording_writes: u64,
    pub recording_write_seconds: f64,
    pub relay_memory_bytes: usize,
    pub tasks_alive: usize,
    /// Why the bastion should get no new users right now (`/healthz` answers 503
    /// with it), or `None` when it is healthy.
    pub unhealthy: Option<String>,
}

/// Where the metrics thread reads from: the bastion's state, as the server wires it.
pub trait Source: Send + Sync + 'static {
    fn metrics(&self) -> &Metrics;
    fn snapshot(&self) -> Snapshot;
}

/// `/healthz`: status and body.
fn health(now: &Snapshot) -> (u16, String) {
    match &now.unhealthy {
        None => (200, "ok\n".to_string()),
        Some(why) => (503, format!("{why}\n")),
    }
}

/// Serves `/metrics` and `/healthz` on `listen` from a small thread of its own.
pub fn serve(listen: SocketAddr, source: Arc<dyn Source>) -> Result<()> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot listen for metrics on {listen}"))?;
    tracing::info!(%listen, "metrics and health check listening");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, body) = match request.url() {
                    "/metrics" => (200, source.metrics().render(&source.snapshot())),
                    "/healthz" => health(&source.snapshot()),
                    _ => (404, "try /metrics or /healthz\n".to_string()),
                };
                let response = tiny_http::Response::from_string(body).with_status_code(status);
                let _ = request.respond(response);
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(())
}
