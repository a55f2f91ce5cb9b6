//! The consumer runtime every house rule runs on.
//!
//! One durable pull consumer per rule on `HEARTH_EVENTS`, events handled one
//! at a time in stream order (a state machine needs them in order), each
//! acknowledged only once its handler finished. A handler error is retried
//! with a growing delay up to [`Spec::max_deliver`] attempts; an event that
//! cannot succeed (it does not decode, the handler calls it poison, or its
//! attempts ran out) goes to `HEARTH_DLQ` on
//! `hearth.dlq.<consumer>.<reason>` with the consumer's name, the reason and
//! the error in headers and the original payload, and the consumer moves on.
//! On shutdown the runtime stops pulling, finishes the event in hand and
//! returns; an event not acknowledged comes again to the next run.

use std::future::Future;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::HeaderMap;
use futures::StreamExt;
use hearth_proto::{headers, v1, Encoding};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// How long a request for the next event waits for one: a stopping run
/// waits at most this long.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// The stream the rules read.
pub const EVENTS_STREAM: &str = "HEARTH_EVENTS";

const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);
const CORRELATION_ID: HeaderName = HeaderName::from_static(headers::CORRELATION_ID);
const REASON: HeaderName = HeaderName::from_static(headers::REASON);
const DETAIL: HeaderName = HeaderName::from_static(headers::DETAIL);
const CONSUMER: HeaderName = HeaderName::from_static("Hearth-Consumer");
const SUBJECT: HeaderName = HeaderName::from_static("Hearth-Subject");

/// One rule's consumer.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The durable name, e.g. `hearth-lights`: what `nats consumer ls
    /// HEARTH_EVENTS` shows.
    pub name: String,
    /// What the consumer does, in a sentence.
    pub description: String,
    /// The events it reads, e.g. `hearth.evt.>` or `hearth.evt.*.*.motion.>`.
    pub filter: String,
    /// Attempts at an event before it is dead-lettered.
    pub max_deliver: i64,
    /// How long an event may take before JetStream sends it again.
    pub ack_wait: Duration,
    /// The delay before the first retry; doubled for each further one (at
    /// most 30 s).
    pub retry: Duration,
    /// Read the stream from its start when the consumer is first created
    /// (a projection); otherwise only events from then on (a rule).
    pub from_start: bool,
}

impl Spec {
    pub fn new(name: &str, description: &str, filter: &str) -> Self {
        Self {
            name: name.to_owned(),
            description: description.to_owned(),
            filter: filter.to_owned(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            retry: Duration::from_millis(500),
            from_start: false,
        }
    }
}

/// An event handed to a rule.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: v1::Event,
    pub subject: String,
    pub stream_sequence: u64,
    /// 1 for the first attempt.
    pub attempt: i64,
}

/// Why a handler did not finish an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth another try (NATS was away, a channel timed out).
    #[error("{0}")]
    Retry(String),
    /// Will never succeed: dead-lettered at once.
    #[error("{0}")]
    Poison(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("stream {EVENTS_STREAM} is not there (is the gateway running?): {0}")]
    Stream(String),
    #[error("cannot create or open consumer {name}: {problem}")]
    Consumer { name: String, problem: String },
}

/// What a run did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub handled: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

/// Runs `spec`'s consumer until `shutdown`, handing each event to `handler`.
pub async fn run<H, F>(
    js: &jetstream::Context,
    spec: &Spec,
    mut handler: H,
    shutdown: CancellationToken,
) -> Result<Stats, RuntimeError>
where
    H: FnMut(Received) -> F,
    F: Future<Output = Result<(), HandlerError>>,
{
    // The gateway creates the stream; a rule started first waits for it.
    let mut waited = 0u32;
    let stream = loop {
        match js.get_stream(EVENTS_STREAM).await {
            Ok(stream) => break stream,
            Err(error) => {
                if waited % 10 == 0 {
                    warn!(consumer = %spec.name, %error, "waiting for {EVENTS_STREAM} (is the gateway running?)");
                }
                waited += 1;
                tokio::select! {
                    () = shutdown.cancelled() => return Err(RuntimeError::Stream(error.to_string())),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &spec.name,
            consumer::pull::Config {
                durable_name: Some(spec.name.clone()),
                description: Some(spec.description.clone()),
                filter_subject: spec.filter.clone(),
                deliver_policy: if spec.from_start {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::New
                },
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: spec.ack_wait,
                max_deliver: spec.max_deliver,
                // One at a time, in order: a rule's state follows the events.
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| RuntimeError::Consumer {
            name: spec.name.clone(),
            problem: e.to_string(),
        })?;
    info!(consumer = %spec.name, filter = %spec.filter, "consuming");
    let mut stats = Stats::default();
    // One event per request, rather than an open pull: when the run stops,
    // the event JetStream sent in answer to the last request is seen (the
    // request is read to its end) and handed back at once, instead of
    // landing in a closed inbox and waiting out the ack wait; and a handed
    // back event does not come back into the same request, which is
    // already answered.
    while !shutdown.is_cancelled() {
        let batch = consumer
            .batch()
            .max_messages(1)
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                debug!(consumer = %spec.name, %error, "fetching events");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    debug!(consumer = %spec.name, %error, "fetching events");
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                    debug!(%error, "handing an event back failed");
                }
                continue;
            }
            handle(js, spec, &mut handler, message, &mut stats).await;
        }
    }
    info!(consumer = %spec.name, ?stats, "stopped");
    Ok(stats)
}

async fn handle<H, F>(
    js: &jetstream::Context,
    spec: &Spec,
    handler: &mut H,
    message: jetstream::Message,
    stats: &mut Stats,
) where
    H: FnMut(Received) -> F,
    F: Future<Output = Result<(), HandlerError>>,
{
    let Ok(info) = message.info() else {
        return;
    };
    let (sequence, attempt) = (info.stream_sequence, info.delivered);
    let content_type = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(CONTENT_TYPE))
        .map(|value| value.as_str().to_owned());
    let event =
        match Encoding::decode_stored::<v1::Event>(content_type.as_deref(), &message.payload) {
            Ok(event) => event,
            Err(error) => {
                let detail = format!("not a hearth.v1.Event: {error}");
                dead_letter(js, spec, &message, "undecodable_event", &detail).await;
                stats.dead_lettered += 1;
                return;
            }
        };
    let span = info_span!(
        "event",
        consumer = %spec.name,
        event_id = %event.id,
        correlation_id = %event.correlation_id,
        device = %event.device,
    );
    let received = Received {
        event,
        subject: message.subject.to_string(),
        stream_sequence: sequence,
        attempt,
    };
    let outcome = handler(received).instrument(span.clone()).await;
    let _entered = span.enter();
    match outcome {
        Ok(()) => {
            // Confirmed by the server: an event acknowledged is not handled
            // again after a crash.
            if let Err(error) = message.double_ack().await {
                warn!(%error, "acknowledging failed; the event may come again");
            }
            stats.handled += 1;
        }
        Err(HandlerError::Poison(error)) => {
            dead_letter(js, spec, &message, "consumer_failed", &error).await;
            stats.dead_lettered += 1;
        }
        Err(HandlerError::Retry(error)) if attempt >= spec.max_deliver => {
            let detail = format!("failed {attempt} times, last: {error}");
            dead_letter(js, spec, &message, "consumer_failed", &detail).await;
            stats.dead_lettered += 1;
        }
        Err(HandlerError::Retry(error)) => {
            let exponent = u32::try_from(attempt.clamp(1, 10) - 1).unwrap_or(0);
            let delay = (spec.retry * 2u32.pow(exponent)).min(Duration::from_secs(30));
            warn!(%error, attempt, retry_in = ?delay, "handling failed; trying again");
            if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                debug!(%error, "nak failed; the event comes again after the ack wait");
            }
            stats.retried += 1;
        }
    }
}

/// Sets an event aside in `HEARTH_DLQ`, then tells JetStream to stop
/// sending it.
async fn dead_letter(
    js: &jetstream::Context,
    spec: &Spec,
    message: &jetstream::Message,
    reason: &str,
    detail: &str,
) {
    warn!(consumer = %spec.name, reason, detail, subject = %message.subject, "event dead-lettered");
    let mut headers = HeaderMap::new();
    headers.insert(REASON, reason);
    headers.insert(DETAIL, &*headers::safe_value(detail));
    headers.insert(CONSUMER, spec.name.as_str());
    headers.insert(SUBJECT, message.subject.as_str());
    for name in [CONTENT_TYPE, CORRELATION_ID] {
        if let Some(value) = message.headers.as_ref().and_then(|h| h.get(name.clone())) {
            headers.insert(name, value.as_str());
        }
    }
    let subject = format!("hearth.dlq.{}.{reason}", token(&spec.name));
    let stored = match js
        .publish_with_headers(subject, headers, message.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match stored {
        Ok(()) => {
            if let Err(error) = message.ack_with(AckKind::Term).await {
                debug!(%error, "terminating the event failed");
            }
        }
        // Not set aside: not dropped either; it comes again.
        Err(error) => warn!(%error, "could not dead-letter the event; it comes again"),
    }
}

/// A consumer name as one subject token.
fn token(name: &str) -> String {
    name.chars()
        .map(|c| {
            if matches!(c, '.' | '*' | '>') || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}
