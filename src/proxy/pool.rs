//! The upstream connections of one client connection.
//!
//! Every session channel of a client connection (OpenSSH ControlMaster multiplexes
//! many) goes to the same target as the same login, so they share one upstream
//! connection, like a ProxyJump hop would. A target's sshd allows only `MaxSessions`
//! sessions on one connection (10 by default) and refuses the next channel; OpenSSH
//! would then open a new connection of its own, but the bastion has already
//! accepted the client's channel. So when the target refuses a channel, the pool
//! opens another connection, up to `[limits] upstream_connections_per_client`, and
//! tries there. The first connection lives as long as the client connection (as a
//! ProxyJump hop would); an extra one is closed as soon as its last session ends.
//!
//! A connection is only ever reused for the same route (login, target, address
//! and pinned host key): a policy reload that changes any of them between two
//! sessions must not let the second run over the first one's connection, as
//! another login or on a host whose key is no longer the pinned one.

use std::sync::{Arc, Mutex};

use russh::client;
use russh::ChannelOpenFailure;

use super::upstream::{Upstream, UpstreamError};

/// A client connection's upstream connections, at most `limit` of them.
pub struct UpstreamPool {
    limit: usize,
    connections: Mutex<Connections>,
    /// Held while a connection is being opened, so that sessions refused at the same
    /// moment open one new connection between them, not one each.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// In the order they were opened; the first is kept while it is idle.
    open: Vec<Pooled>,
}

struct Pooled {
    id: u64,
    /// Login, target, address and host key it was opened for.
    route: String,
    upstream: Arc<Upstream>,
    /// Sessions holding a [`Lease`] on it, including those still being opened.
    sessions: usize,
    /// The number of other sessions it held when the target last refused one: it
    /// is skipped while it holds that many.
    full_at: Option<usize>,
}

/// A session's hold on its upstream connection: while it lives, the connection
/// stays open. Dropping the last lease on an extra connection closes it.
pub struct Lease {
    pool: Arc<UpstreamPool>,
    id: u64,
    upstream: Arc<Upstream>,
}

impl Lease {
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let idle = self.pool.release(self.id);
        if let Some(idle) = idle {
            close(idle);
        }
    }
}

impl UpstreamPool {
    pub fn new(limit: usize) -> Arc<UpstreamPool> {
        Arc::new(UpstreamPool {
            limit: limit.max(1),
            connections: Mutex::default(),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens a session channel to the target on one of the pool's connections for
    /// `route`, opening one with `connect` when none is open or all of them
    /// refused. A refusal on a connection that carries no other session is final:
    /// another connection would be refused the same way.
    pub async fn open_session<F, C>(
        self: &Arc<Self>,
        target: &str,
        route: &str,
        mut connect: F,
    ) -> Result<(russh::Channel<client::Msg>, Lease), UpstreamError>
    where
        F: FnMut() -> C,
        C: std::future::Future<Output = Result<Upstream, UpstreamError>>,
    {
        let mut tried = Vec::new();
        loop {
            let lease = match self.lease(route, &tried) {
                Some(lease) => lease,
                None => {
                    let _connecting = self.connecting.lock().await;
                    match self.lease(route, &tried) {
                        Some(lease) => lease,
                        None if self.open_count() >= self.limit => {
                            return Err(UpstreamError::SessionsExhausted {
                                target: target.to_string(),
                                limit: self.limit,
                            });
                        }
                        None => self.add(route, connect().await?),
                    }
                }
            };
            match lease.upstream.handle.channel_open_session().await {
                Ok(channel) => return Ok((channel, lease)),
                Err(russh::Error::ChannelOpenFailure(reason)) if retryable(&reason) => {
                    let others = self.refused(lease.id);
                    tracing::debug!(
                        target,
                        others,
                        ?reason,
                        "the target refused a session channel"
                    );
                    if others == 0 {
                        return Err(UpstreamError::SessionRefused {
                            target: target.to_string(),
                            reason: describe(&reason),
                        });
                    }
                    tried.push(lease.id);
                }
                Err(source) => {
                    return Err(UpstreamError::Protocol {
                        target: target.to_string(),
                        source,
                    })
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .expect("upstream pool lock poisoned")
    }

    /// A lease on the first open connection for `route` not in `tried` that is
    /// not known to be full, forgetting connections that have closed and idle
    /// ones for another route.
    fn lease(self: &Arc<Self>, route: &str, tried: &[u64]) -> Option<Lease> {
        let mut connections = self.lock();
        let mut stale = Vec::new();
        connections.open.retain(|pooled| {
            let idle_elsewhere = pooled.route != route && pooled.sessions == 0;
            if idle_elsewhere {
                stale.push(pooled.upstream.clone());
            }
            !pooled.upstream.handle.is_closed() && !idle_elsewhere
        });
        stale.into_iter().for_each(close);
        let pooled = connections.open.iter_mut().find(|pooled| {
            pooled.route == route
                && !tried.contains(&pooled.id)
                && pooled.full_at.is_none_or(|full| pooled.sessions < full)
        })?;
        pooled.sessions += 1;
        Some(Lease {
            pool: self.clone(),
            id: pooled.id,
            upstream: pooled.upstream.clone(),
        })
    }

    fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// Adds a new connection for `route` with one lease on it.
    fn add(self: &Arc<Self>, route: &str, upstream: Upstream) -> Lease {
        let upstream = Arc::new(upstream);
        let mut connections = self.lock();
        let id = connections.next_id;
        connections.next_id += 1;
        connections.open.push(Pooled {
            id,
            route: route.to_string(),
            upstream: upstream.clone(),
            sessions: 1,
            full_at: None,
        });
        Lease {
            pool: self.clone(),
            id,
            upstream,
        }
    }

    /// Notes that connection `id` refused a session; returns how many other
    /// sessions it holds.
    fn refused(&self, id: u64) -> usize {
        let mut connections = self.lock();
        let Some(pooled) = connections.open.iter_mut().find(|p| p.id == id) else {
            return 0;
        };
        let others = pooled.sessions.saturating_sub(1);
        pooled.full_at = Some(others);
        others
    }

    /// Drops a lease; returns the connection when it was an extra one left idle,
    /// for the caller to close outside the lock.
    fn release(&self, id: u64) -> Option<Arc<Upstream>> {
        let mut connections = self.lock();
        let at = connections.open.iter().position(|p| p.id == id)?;
        let pooled = &mut connections.open[at];
        pooled.sessions = pooled.sessions.saturating_sub(1);
        if pooled.sessions < pooled.full_at.unwrap_or(usize::MAX) {
            pooled.full_at = None;
        }
        (at > 0 && pooled.sessions == 0).then(|| connections.open.remove(at).upstream)
    }
}

/// Whether another connection might take the session the target refused: sshd
/// refuses over `MaxSessions` with "connect failed"; other servers say resource
/// shortage or prohibited. An unknown channel type is refused everywhere.
fn retryable(reason: &ChannelOpenFailure) -> bool {
    !matches!(reason, ChannelOpenFailure::UnknownChannelType)
}

/// The refusal in words (a server's own reason text escaped).
fn describe(reason: &ChannelOpenFailure) -> String {
    match reason {
        ChannelOpenFailure::AdministrativelyProhibited => "administratively prohibited".into(),
        ChannelOpenFailure::ConnectFailed => "connect failed".into(),
        ChannelOpenFailure::UnknownChannelType => "unknown channel type".into(),
        ChannelOpenFailure::ResourceShortage => "resource shortage".into(),
        ChannelOpenFailure::Other { code, reason } => {
            let reason: String = reason.chars().take(200).collect();
            format!("code {code}: {}", crate::display::escape(&reason))
        }
    }
}

/// Says goodbye to an idle extra connection in the background.
fn close(upstream: Arc<Upstream>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = upstream
                .handle
                .disconnect(russh::Disconnect::ByApplication, "", "")
                .await;
        });
    }
}
