//! Prometheus metrics and a health check, served on `metrics_listen` when set.
//!
//! `GET /metrics` is the Prometheus text format; `GET /healthz` answers `200 ok`
//! while the bastion accepts connections and 503 with the reason otherwise:
//! `draining` during shutdown (so a load balancer stops sending new users before
//! the sessions end), `store failed: …` once the database cannot be written, and
//! `disk nearly full: …` below `min_free_disk` (new sessions are refused then).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::server::{Phase, State};

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
            "relay_memory_bytes",
            "Session bytes held beyond their own allowances, charged to [limits] relay_memory",
            self.relay_memory_bytes.clone(),
        );
        r.register("tasks_alive", "Tokio tasks alive", self.tasks_alive.clone());
        r.register("open_fds", "Open file descriptors", self.open_fds.clone());
        self
    }

    /// The text exposition, with gauges read now.
    pub fn render(&self, state: &State, runtime: &tokio::runtime::Handle) -> String {
        self.active_sessions
            .set(*state.live_sessions.borrow() as i64);
        self.pending_requests
            .set(state.grants.pending_count() as i64);
        self.recording_queue_bytes
            .set(state.recorder.queued_bytes() as i64);
        self.relay_memory_bytes.set(state.memory.used() as i64);
        self.tasks_alive
            .set(runtime.metrics().num_alive_tasks() as i64);
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        self.open_fds.set(fds as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// `/healthz`: status and body.
fn health(state: &State) -> (u16, String) {
    if *state.phase.borrow() != Phase::Running {
        return (503, "draining\n".to_string());
    }
    if let Some(failure) = state.store.failure() {
        return (
            503,
            format!("store failed: {failure}; restarting once the disk has room\n"),
        );
    }
    if let Some(free) = state.recorder.disk_low() {
        let min = state.recorder.limits().min_free_disk;
        return (
            503,
            format!(
                "disk nearly full: {free} bytes free, min_free_disk = {min}; new sessions are refused\n"
            ),
        );
    }
    (200, "ok\n".to_string())
}

/// Serves `/metrics` and `/healthz` on `listen` from a small thread of its own.
pub fn serve(listen: SocketAddr, state: Arc<State>) -> Result<()> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot listen for metrics on {listen}"))?;
    let runtime = tokio::runtime::Handle::current();
    tracing::info!(%listen, "metrics and health check listening");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, body) = match request.url() {
                    "/metrics" => (200, state.metrics.render(&state, &runtime)),
                    "/healthz" => health(&state),
                    _ => (404, "try /metrics or /healthz\n".to_string()),
                };
                let response = tiny_http::Response::from_string(body).with_status_code(status);
                let _ = request.respond(response);
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(())
}
