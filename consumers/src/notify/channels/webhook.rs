//! `kind = "webhook"`: the message as JSON in an HTTP POST.
//!
//! ```json
//! {"idempotency_key": "0193….alice.hook.0", "notification_id": "0193…",
//!  "kind": "notification", "step": 0, "recipient": "alice", "channel": "hook",
//!  "home": "home", "room": "kitchen", "device": "smoke-1",
//!  "severity": "critical", "category": "smoke", "title": "Smoke detected",
//!  "message": "…", "correlation_id": "…", "causation_id": "…"}
//! ```

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{http_outcome, Channel, Outgoing, SendError};
use crate::notify::config::WebhookSpec;

#[derive(Debug)]
pub(super) struct Webhook {
    spec: WebhookSpec,
    http: reqwest::Client,
    timeout: Duration,
}

impl Webhook {
    pub(super) fn new(spec: WebhookSpec, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            spec,
            http,
            timeout,
        }
    }
}

impl Channel for Webhook {
    fn send<'a>(&'a self, message: &'a Outgoing) -> BoxFuture<'a, Result<(), SendError>> {
        async move {
            let mut request = self
                .http
                .post(&self.spec.url)
                .timeout(self.timeout)
                .json(message);
            for (name, value) in &self.spec.headers {
                request = request.header(name.as_str(), value.expose());
            }
            http_outcome(request, message).await
        }
        .boxed()
    }
}
