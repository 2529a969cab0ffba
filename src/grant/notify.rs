//! Notifications: an optional webhook (`notify.webhook`) receives an HTTP POST with a
//! JSON body for every request lifecycle event. The body has a Slack-compatible `text`
//! field plus structured fields for anything else.
//!
//! Delivery is fire-and-forget on a blocking worker with a short timeout: a slow or
//! failing webhook is logged and never delays or breaks a decision.

use std::time::Duration;

use serde_json::json;

use super::{Ending, Grant};
use crate::display;
use crate::duration::format as format_duration;

/// How long one webhook delivery may take, connect to response.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Sends lifecycle events to the configured webhook, if any.
#[derive(Clone)]
pub struct Notifier {
    webhook: Option<String>,
    agent: ureq::Agent,
}

impl Notifier {
    pub fn new(webhook: Option<String>) -> Notifier {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(true)
            .build()
            .into();
        Notifier { webhook, agent }
    }

    /// Posts one event about `grant` in the background. Must be called from within
    /// the tokio runtime; outside it (unit tests) the event is only logged.
    pub fn grant_event(&self, kind: &str, actor: &str, grant: &Grant) {
        let Some(url) = self.webhook.clone() else {
            return;
        };
        let body = webhook_body(kind, actor, grant).to_string();
        let agent = self.agent.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(event = kind, "no runtime; webhook not sent");
            return;
        };
        let kind = kind.to_string();
        runtime.spawn_blocking(move || {
            let result = agent
                .post(&url)
                .header("content-type", "application/json")
                .send(body.as_str());
            match result {
                Ok(_) => tracing::debug!(event = %kind, "webhook delivered"),
                Err(err) => tracing::warn!(event = %kind, error = %err, "webhook failed"),
            }
        });
    }
}

/// The JSON posted for one event.
pub fn webhook_body(kind: &str, actor: &str, grant: &Grant) -> serde_json::Value {
    json!({
        "text": display::slack(&display::escape(&summary(kind, actor, grant))),
        "event": kind,
        "actor": actor,
        "id": grant.id,
        "state": grant.state.as_str(),
        "requester": grant.requester,
        "target": grant.target,
        "login": grant.login,
        "scope": grant.scope.describe(),
        "reason": grant.reason,
        "approvals": grant.approvals.iter().map(|a| a.by.as_str()).collect::<Vec<_>>(),
        "expires_at": grant.expires_at.map(|t| t.to_rfc3339()),
    })
}

/// One line for humans in a chat channel, before escaping: the whole line is made of
/// plain words and user-supplied fields, with no markup of its own, so
/// [`webhook_body`] escapes all of it for Slack (`&`, `<`, `>`) and for terminals
/// (control and format characters). The structured fields stay exact.
fn summary(kind: &str, actor: &str, grant: &Grant) -> String {
    let what = format!(
        "{} on {} ({})",
        grant.scope.describe(),
        grant.destination(),
        grant.id
    );
    let why = grant
        .ended
        .as_ref()
        .map(Ending::because)
        .unwrap_or_default();
    match kind {
        "request.created" => format!(
            "{} requests {what} for {}: {} — approve with `approve {}`",
            grant.requester,
            format_duration(Duration::from_secs(grant.ttl_secs)),
            grant.reason,
            grant.id
        ),
        "request.approval" => format!(
            "{actor} approved {what} for {} ({} of {} approvals)",
            grant.requester,
            grant.approvals.len(),
            grant.approvals_needed
        ),
        "request.approved" => format!("{actor} approved {what} for {}", grant.requester),
        "request.denied" => format!("{actor} denied {what} for {}{why}", grant.requester),
        "request.revoked" => format!("{actor} revoked {what} of {}{why}", grant.requester),
        "request.cancelled" => format!("{actor} cancelled the request {what}"),
        "request.expired" => format!("{what} of {} expired{why}", grant.requester),
        other => format!("{other}: {what}"),
    }
}
