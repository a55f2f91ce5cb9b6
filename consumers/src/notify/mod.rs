//! Notifications (`hearth-notify`): telling the people of a home, on their
//! channels, with retries, dedup, rate limits, quiet hours and escalation
//! until someone acknowledges.
//!
//! The rule is a durable consumer of `hearth.evt.>`:
//!
//! - A `Notification` event (the security rule's `alarm_triggered`, or one
//!   this rule stored itself) is fanned out to every recipient's first
//!   channel (`fanout`), after dedup, quiet hours and rate limits
//!   (`policy`); a critical one escalates until acknowledged
//!   (`escalation`).
//! - Device conditions become notifications, stored as `Notification`
//!   events so the log shows each one (`conditions`): smoke and water
//!   leaks (critical), a device offline, a low battery, a device silent too
//!   long (warnings).
//! - A `NotificationAck` event (over MQTT through the gateway, or stored by
//!   this rule for a NATS or HTTP acknowledgement, see `ack`) stops the
//!   escalation and sends "done" messages.
//!
//! Handling an event only records what is to be sent in the KV bucket
//! `hearth_notify` (`records`) and acknowledges the event; the delivery
//! worker (`worker`) sends, retries with backoff, escalates, sums up what
//! was held back and stores each outcome as a `NotificationDelivery` event
//! (a delivery given up also in `HEARTH_DLQ`). Everything goes by the
//! rule's [`Clock`], and everything resumes from the bucket after a
//! restart.
//!
//! The configuration is `[homes.<home>.notify]` in the homes file
//! ([`config`]); channels are in `channels`.

mod ack;
mod channels;
mod conditions;
pub mod config;
mod escalation;
mod fanout;
mod policy;
mod records;
mod rule;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use hearth_proto::Encoding;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use ack::ACK_SUBJECT;
pub use config::HomeConfig;

use crate::clock::Clock;
use crate::homes::Homes;
use crate::runtime::{self, RuntimeError, Spec};

/// The rule's consumer name (and `source.convention` of what it stores).
pub const CONSUMER: &str = "hearth-notify";
/// The rule's state bucket.
pub const BUCKET: &str = "hearth_notify";
/// Where deliveries given up go.
pub const DLQ_SUBJECT: &str = "hearth.dlq.hearth-notify.undeliverable";
/// The HTTP listener's usual address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9882";

/// The consumer of this rule.
pub fn spec() -> Spec {
    Spec::new(
        CONSUMER,
        "hearth notify: tells each home's recipients (webhook, e-mail, ntfy, SMS, log) with retries, dedup, rate limits, quiet hours and escalation until acknowledged",
        "hearth.evt.>",
    )
}

/// How the rule is run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where the acknowledgement and status HTTP API listens
    /// ([`DEFAULT_HTTP_LISTEN`] usually); `None`: no HTTP.
    pub http_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("home {home:?}: {problem}")]
    Config { home: String, problem: String },
    #[error("cannot open the notify state (KV bucket {BUCKET}): {0}")]
    State(String),
    #[error("{0}")]
    Channels(String),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Subscribe(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Runs the rule until `shutdown`: the consumer, the delivery worker, the
/// NATS acknowledgement responder and (with `options.http_listen`) the HTTP
/// API. Returns once the messages being sent have been and their outcome is
/// stored; an event in hand is handed back to JetStream.
pub async fn run(
    js: async_nats::jetstream::Context,
    homes: Arc<Homes>,
    encoding: Encoding,
    clock: Clock,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), NotifyError> {
    let rule = Arc::new(rule::Rule::open(&js, &homes, encoding, clock).await?);
    let listener = match options.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NotifyError::Listen { addr, source })?,
        ),
        None => None,
    };
    let client = js.client();
    let requests = ack::subscribe(&client)
        .await
        .map_err(NotifyError::Subscribe)?;
    // Its own token: a consumer that fails stops the rest of this rule,
    // not the other rules sharing `shutdown`.
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    tasks.spawn(worker::run(rule.clone(), stop.clone()));
    tasks.spawn(ack::serve_nats(
        rule.clone(),
        client,
        requests,
        stop.clone(),
    ));
    if let Some(listener) = listener {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "notify HTTP API listening");
        }
        tasks.spawn(ack::serve_http(rule.clone(), listener, stop.clone()));
    }
    tasks.close();
    let handler = rule.clone();
    let consumed = runtime::run(
        &js,
        &spec().partitioned(homes.partition()),
        move |received| {
            let rule = handler.clone();
            async move { rule.handle(received).await }
        },
        stop.clone(),
    )
    .await;
    stop.cancel();
    tasks.wait().await;
    consumed?;
    Ok(())
}
