//! The consumer runtime every house rule runs on.
//!
//! One durable pull consumer per rule on `HEARTH_EVENTS`, events handled in
//! stream order (a state machine needs them in order), one at a time
//! ([`run`]) or, for a rule that writes many events' effects at once, in
//! batches of the events ready ([`run_batches`]); each acknowledged only
//! once its handler finished with it. A handler error is retried
//! with a doubling delay up to [`Spec::max_deliver`] attempts; an event that
//! cannot succeed (it does not decode, the handler calls it poison, or its
//! attempts ran out) goes to `HEARTH_DLQ` on
//! `hearth.dlq.<consumer>.<reason>` with the consumer's name, the reason and
//! the error in headers and the original payload, and the consumer moves on.
//! On shutdown the runtime stops pulling, finishes the event in hand, hands
//! back every other event it holds and returns; the next run starts with
//! them, in order.
//!
//! How it keeps up (tens of thousands of events a second):
//!
//! - Events are pulled in batches: [`Spec::prefetch`] held at most (the
//!   consumer's `max_ack_pending`), half of that per pull request, the next
//!   request sent as soon as the last one is filled, while its events are
//!   still being handled. They arrive in stream order on one subscription.
//! - Acknowledgements are sent without waiting for the server's answer: the
//!   server applies a connection's acknowledgements in order, and a stopping
//!   run waits for the answer to its last one, so every event handled in a
//!   run is acknowledged when `run` returns.
//! - A retry happens here, not by redelivery: the event is kept (JetStream
//!   told that work is in progress, so it does not send it again) and the
//!   events behind it wait, so none overtakes it.
//!
//! The crash window: an event whose handler finished but whose
//! acknowledgement had not reached the server when the process died (or the
//! connection dropped) is handled again by the next run. Handlers must be
//! idempotent; that is the contract (`commands` issues commands
//! idempotently for this reason). The events a dead run held come back
//! after the ack wait; the next run takes them first, in order, before
//! newer events (see `Recovery`), so after a crash a rule waits up to the
//! ack wait, as before, but never sees its events out of order.
//!
//! One run per consumer: two processes running the same rule would share
//! its events between them, and each would see a part, out of order.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use hearth_proto::{headers, v1, Encoding};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::partition::Partition;

/// How long a pull request waits for events: a stopping run waits at most
/// this long for the one it has out.
const REQUEST_WAIT: Duration = Duration::from_secs(1);
/// A request whose end the server has not reported this long after it
/// expired is taken as lost (the connection dropped), and another sent.
const REQUEST_GRACE: Duration = Duration::from_secs(2);
/// The pause before pulling again after the server refused a request.
const REFUSED_PAUSE: Duration = Duration::from_millis(500);
/// The longest delay between two attempts at an event.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// How long a stopping run waits for the server to confirm that what it
/// acknowledged and handed back is applied.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// The stream the rules read.
pub const EVENTS_STREAM: &str = "HEARTH_EVENTS";

const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);
const CORRELATION_ID: HeaderName = HeaderName::from_static(headers::CORRELATION_ID);
const REASON: HeaderName = HeaderName::from_static(headers::REASON);
const DETAIL: HeaderName = HeaderName::from_static(headers::DETAIL);
const CONSUMER: HeaderName = HeaderName::from_static("Hearth-Consumer");
const SUBJECT: HeaderName = HeaderName::from_static("Hearth-Subject");

const ACK: Bytes = Bytes::from_static(b"+ACK");
const NAK: Bytes = Bytes::from_static(b"-NAK");

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
    /// Attempts at an event before it is dead-lettered. Deliveries to
    /// earlier runs that stopped or crashed holding it count too.
    pub max_deliver: i64,
    /// How long an event may go without word from the runtime before
    /// JetStream sends it again: after a crash, the next run waits up to
    /// this long for the events the dead one held. A running runtime keeps
    /// every event it holds from expiring, however long the handler takes.
    pub ack_wait: Duration,
    /// The delay before the first retry; doubled for each further one (at
    /// most 30 s).
    pub retry: Duration,
    /// Read the stream from its start when the consumer is first created
    /// (a projection); otherwise only events from then on (a rule).
    pub from_start: bool,
    /// The most events held at once: received and not yet acknowledged,
    /// the one in hand included (the consumer's `max_ack_pending`). More
    /// is more throughput and more events handed back on shutdown.
    pub prefetch: usize,
    /// The homes this consumer handles; others' events are acknowledged
    /// without reaching the handler (see [`Partition`]).
    pub partition: Partition,
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
            prefetch: 512,
            partition: Partition::WHOLE,
        }
    }

    /// This rule in `partition`: its own durable consumer
    /// (`<name>-<I>of<N>`), for its homes only.
    #[must_use]
    pub fn partitioned(mut self, partition: Partition) -> Self {
        self.name = partition.durable(&self.name);
        if !partition.is_whole() {
            self.description = format!("{} (homes of partition {partition})", self.description);
        }
        self.partition = partition;
        self
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

/// Runs `spec`'s consumer until `shutdown`, handing each event to `handler`,
/// one at a time.
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
    let one_at_a_time = |mut events: Vec<Received>| {
        let handled = events.pop().map(&mut handler);
        async move {
            match handled {
                Some(handled) => vec![handled.await],
                None => Vec::new(),
            }
        }
    };
    consume(js, spec, 1, one_at_a_time, shutdown).await
}

/// Runs `spec`'s consumer until `shutdown`, handing `handler` every event
/// held that is ready, in stream order, up to [`Spec::prefetch`] at once.
/// The handler answers with one outcome per event, in the same order; each
/// event is acknowledged, tried again or dead-lettered by its own outcome,
/// as [`run`] does. The events tried again go back to the handler together,
/// before any newer event.
///
/// For a rule whose work is cheap and whose writes can be batched (the
/// view writes each home once per batch): one round trip confirms many
/// events, and every event is still acknowledged only after its write.
pub async fn run_batches<H, F>(
    js: &jetstream::Context,
    spec: &Spec,
    handler: H,
    shutdown: CancellationToken,
) -> Result<Stats, RuntimeError>
where
    H: FnMut(Vec<Received>) -> F,
    F: Future<Output = Vec<Result<(), HandlerError>>>,
{
    consume(js, spec, spec.prefetch.max(1), handler, shutdown).await
}

async fn consume<H, F>(
    js: &jetstream::Context,
    spec: &Spec,
    most: usize,
    mut handler: H,
    shutdown: CancellationToken,
) -> Result<Stats, RuntimeError>
where
    H: FnMut(Vec<Received>) -> F,
    F: Future<Output = Vec<Result<(), HandlerError>>>,
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
    let consumer = open_consumer(&stream, spec).await?;
    let mut feed = Feed::open(js, spec, consumer).await?;
    info!(consumer = %spec.name, filter = %spec.filter, prefetch = feed.capacity, "consuming");
    let mut stats = Tally::new(&spec.name);
    loop {
        let messages = feed.next(most, &shutdown).await;
        if messages.is_empty() {
            break;
        }
        let handled = handle(
            js,
            spec,
            &mut handler,
            &mut feed,
            messages,
            &mut stats,
            &shutdown,
        );
        if handled.await == Handled::HandBack {
            break;
        }
    }
    feed.hand_back().await;
    let stats = stats.stats;
    info!(consumer = %spec.name, ?stats, "stopped");
    Ok(stats)
}

/// Creates the consumer, or brings an existing one up to `spec` (a consumer
/// made by an earlier version, one event at a time, gets the prefetch)
/// without moving its position.
async fn open_consumer(
    stream: &jetstream::stream::Stream,
    spec: &Spec,
) -> Result<consumer::PullConsumer, RuntimeError> {
    let deliver_policy = if spec.from_start {
        consumer::DeliverPolicy::All
    } else {
        match resume_from(stream, spec).await {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::New,
        }
    };
    let config = consumer::pull::Config {
        durable_name: Some(spec.name.clone()),
        description: Some(spec.description.clone()),
        filter_subject: spec.filter.clone(),
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        // The runtime counts attempts and dead-letters; a limit in the
        // server would drop an event silently when a run stopped holding
        // its last allowed delivery.
        max_deliver: -1,
        max_ack_pending: i64::try_from(spec.prefetch.max(1)).unwrap_or(i64::MAX),
        ..Default::default()
    };
    match stream.create_consumer(config).await {
        Ok(consumer) => Ok(consumer),
        // What cannot be changed (the deliver policy, on older servers the
        // filter) keeps the consumer as it is rather than stopping the rule.
        Err(error) => match stream
            .get_consumer::<consumer::pull::Config>(&spec.name)
            .await
        {
            Ok(consumer) => {
                warn!(consumer = %spec.name, %error, "cannot update the consumer; running it as it is");
                Ok(consumer)
            }
            Err(_) => Err(RuntimeError::Consumer {
                name: spec.name.clone(),
                problem: error.to_string(),
            }),
        },
    }
}

/// Where a rule's consumer that does not exist yet starts when the rule ran
/// before under another partitioning: after the furthest event any of its
/// consumers acknowledged, so that events stored while the processes were
/// restarted with the new partitioning are not skipped. `None`: as a new
/// rule, from the next event.
async fn resume_from(stream: &jetstream::stream::Stream, spec: &Spec) -> Option<u64> {
    if stream
        .get_consumer::<consumer::pull::Config>(&spec.name)
        .await
        .is_ok()
    {
        return None;
    }
    let base = spec.partition.rule_of(&spec.name);
    let mut names = stream.consumer_names();
    let mut furthest: Option<(u64, String)> = None;
    let mut others = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        // The other partitions of this partitioning are peers, not where
        // this one's homes were handled before.
        if Partition::count_of(base, &name).is_none_or(|count| count == spec.partition.count()) {
            continue;
        }
        let Ok(mut other) = stream.get_consumer::<consumer::pull::Config>(&name).await else {
            continue;
        };
        let Ok(info) = other.info().await else {
            continue;
        };
        let acked = info.ack_floor.stream_sequence;
        if furthest
            .as_ref()
            .is_none_or(|(sequence, _)| acked > *sequence)
        {
            furthest = Some((acked, name.clone()));
        }
        others.push(name);
    }
    let (acked, from) = furthest?;
    info!(
        consumer = %spec.name,
        from,
        start_sequence = acked + 1,
        "new partitioning: starting after the furthest event the rule's other consumers acknowledged"
    );
    warn!(
        consumer = %spec.name,
        others = ?others,
        "consumers of another partitioning are left in HEARTH_EVENTS; once no process uses them, \
         remove them with `nats consumer rm HEARTH_EVENTS <name>`"
    );
    Some(acked + 1)
}

/// A run's [`Stats`], also counted in its metrics (see `telemetry`).
struct Tally {
    stats: Stats,
    consumer: String,
    handled: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    /// Other partitions' events.
    skipped: metrics::Counter,
    handler_time: metrics::Histogram,
}

impl Tally {
    fn new(consumer: &str) -> Self {
        let events = |outcome: &'static str| {
            metrics::counter!(
                "hearth_consumer_events_total",
                "consumer" => consumer.to_owned(),
                "outcome" => outcome
            )
        };
        Self {
            stats: Stats::default(),
            consumer: consumer.to_owned(),
            handled: events("handled"),
            retried: events("retried"),
            dead_lettered: events("dead_lettered"),
            skipped: events("other_partition"),
            handler_time: metrics::histogram!(
                "hearth_consumer_handler_seconds",
                "consumer" => consumer.to_owned()
            ),
        }
    }

    fn handled(&mut self) {
        self.stats.handled += 1;
        self.handled.increment(1);
    }

    fn skipped(&mut self) {
        self.skipped.increment(1);
    }

    fn retried(&mut self) {
        self.stats.retried += 1;
        self.retried.increment(1);
    }

    fn dead_lettered(&mut self, reason: &str) {
        self.stats.dead_lettered += 1;
        self.dead_lettered.increment(1);
        metrics::counter!(
            "hearth_dlq_events_total",
            "consumer" => self.consumer.clone(),
            "reason" => reason.to_owned()
        )
        .increment(1);
    }
}

/// What became of the events in hand.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    /// Acknowledged or dead-lettered: on to the next.
    Done,
    /// Shutdown came while some waited for another attempt: handed back.
    HandBack,
}

/// An event in hand: its delivery, and the attempt it is at.
struct Attempt {
    message: jetstream::Message,
    sequence: u64,
    attempt: i64,
}

/// Hands `messages` to the handler until each succeeded, is poison or ran
/// out of attempts; the ones to try again go back together, in order.
async fn handle<H, F>(
    js: &jetstream::Context,
    spec: &Spec,
    handler: &mut H,
    feed: &mut Feed,
    messages: Vec<jetstream::Message>,
    stats: &mut Tally,
    shutdown: &CancellationToken,
) -> Handled
where
    H: FnMut(Vec<Received>) -> F,
    F: Future<Output = Vec<Result<(), HandlerError>>>,
{
    let mut pending = Vec::with_capacity(messages.len());
    for message in messages {
        // The feed passes on JetStream deliveries only.
        let Ok(info) = message.info() else {
            continue;
        };
        let (sequence, delivered) = (info.stream_sequence, info.delivered.max(1));
        if !spec.partition.owns_subject(&message.subject) {
            // Another partition's home: that process handles it.
            if let Err(error) = message.ack().await {
                debug!(%error, "acknowledging another partition's event failed; it may come again");
            }
            feed.finished(sequence, &message);
            stats.skipped();
            continue;
        }
        // JetStream's deliveries count as attempts: an event that comes
        // again after a crash has fewer left.
        if delivered > spec.max_deliver {
            let detail = format!(
                "delivered {delivered} times: its attempts were used by runs that stopped or crashed holding it"
            );
            let letter = Letter::new(spec, &message, "consumer_failed", &detail);
            if dead_letter(js, spec, feed, &message, letter, stats, shutdown).await
                == Handled::HandBack
            {
                return Handled::HandBack;
            }
            continue;
        }
        pending.push(Attempt {
            message,
            sequence,
            attempt: delivered,
        });
    }
    loop {
        let mut events = Vec::with_capacity(pending.len());
        let mut attempts = Vec::with_capacity(pending.len());
        for attempt in pending.drain(..) {
            // Decoded for each attempt rather than cloned for every first
            // one: retries are rare, events are not.
            match decode(&attempt.message) {
                Ok(event) => {
                    events.push(Received {
                        event,
                        subject: attempt.message.subject.to_string(),
                        stream_sequence: attempt.sequence,
                        attempt: attempt.attempt,
                    });
                    attempts.push(attempt);
                }
                Err(detail) => {
                    let letter = Letter::new(spec, &attempt.message, "undecodable_event", &detail);
                    if dead_letter(js, spec, feed, &attempt.message, letter, stats, shutdown).await
                        == Handled::HandBack
                    {
                        return Handled::HandBack;
                    }
                }
            }
        }
        if events.is_empty() {
            return Handled::Done;
        }
        let span = match events.as_slice() {
            [one] => info_span!(
                "event",
                consumer = %spec.name,
                event_id = %one.event.id,
                correlation_id = %one.event.correlation_id,
                device = %one.event.device,
            ),
            [first, .., last] => info_span!(
                "events",
                consumer = %spec.name,
                events = events.len(),
                first = first.stream_sequence,
                last = last.stream_sequence,
            ),
            [] => unreachable!("not empty"),
        };
        let count = events.len();
        let started = std::time::Instant::now();
        let mut outcomes = feed
            .alongside(handler(events).instrument(span.clone()))
            .await
            .into_iter();
        stats.handler_time.record(started.elapsed());
        let mut failed = Vec::new();
        for attempt in attempts {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Err(HandlerError::Retry(format!(
                    "the handler answered for fewer events than the {count} it was given"
                )))
            });
            match outcome {
                Ok(()) => {
                    // Not confirmed one by one: see the module's documentation.
                    if let Err(error) = attempt.message.ack().await {
                        warn!(parent: &span, %error, "acknowledging failed; the event may come again");
                    }
                    feed.finished(attempt.sequence, &attempt.message);
                    stats.handled();
                }
                Err(HandlerError::Poison(error)) => failed.push((attempt, None, error)),
                Err(HandlerError::Retry(error)) if attempt.attempt >= spec.max_deliver => {
                    let detail = format!("failed {} times, last: {error}", attempt.attempt);
                    failed.push((attempt, None, detail));
                }
                Err(HandlerError::Retry(error)) => failed.push((attempt, Some(()), error)),
            }
        }
        // Dead letters after the acknowledgements: a shutdown while one
        // cannot be stored hands back only what is not finished.
        let mut retry_in = Duration::ZERO;
        for (attempt, again, error) in failed {
            if again.is_some() {
                let delay = retry_delay(spec.retry, attempt.attempt);
                warn!(parent: &span, %error, attempt = attempt.attempt, sequence = attempt.sequence, retry_in = ?delay, "handling failed; trying again");
                stats.retried();
                retry_in = retry_in.max(delay);
                pending.push(attempt);
                continue;
            }
            let letter = Letter::new(spec, &attempt.message, "consumer_failed", &error);
            if dead_letter(js, spec, feed, &attempt.message, letter, stats, shutdown).await
                == Handled::HandBack
            {
                return Handled::HandBack;
            }
        }
        if pending.is_empty() {
            return Handled::Done;
        }
        // Kept here rather than handed back: the events behind them wait,
        // so none overtakes them.
        let messages: Vec<_> = pending.iter().map(|attempt| &attempt.message).collect();
        if !feed.hold_for(&messages, retry_in, shutdown).await {
            return Handled::HandBack;
        }
        for attempt in &mut pending {
            attempt.attempt += 1;
        }
    }
}

fn decode(message: &jetstream::Message) -> Result<v1::Event, String> {
    let content_type = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(CONTENT_TYPE))
        .map(|value| value.as_str());
    Encoding::decode_stored::<v1::Event>(content_type, &message.payload)
        .map_err(|error| format!("not a hearth.v1.Event: {error}"))
}

/// The delay after failed attempt `attempt` (1 for the first): `first`,
/// doubled for each further attempt, at most [`MAX_RETRY_DELAY`].
fn retry_delay(first: Duration, attempt: i64) -> Duration {
    let doublings = u32::try_from(attempt.clamp(1, 21) - 1).unwrap_or(0);
    first
        .saturating_mul(2u32.pow(doublings))
        .min(MAX_RETRY_DELAY)
}

/// A dead letter: the original payload, and headers saying whose it was
/// and why it was set aside.
struct Letter {
    subject: String,
    headers: HeaderMap,
    reason: String,
}

impl Letter {
    fn new(spec: &Spec, message: &jetstream::Message, reason: &str, detail: &str) -> Self {
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
        Self {
            subject: format!("hearth.dlq.{}.{reason}", token(&spec.name)),
            headers,
            reason: reason.to_owned(),
        }
    }
}

/// Sets an event aside in `HEARTH_DLQ`, then tells JetStream to stop
/// sending it. If it cannot be stored, it is tried again (the events behind
/// it wait) until it is, or handed back at shutdown: never dropped.
async fn dead_letter(
    js: &jetstream::Context,
    spec: &Spec,
    feed: &mut Feed,
    message: &jetstream::Message,
    letter: Letter,
    stats: &mut Tally,
    shutdown: &CancellationToken,
) -> Handled {
    let mut attempt = 1;
    loop {
        let store = async {
            match js
                .publish_with_headers(
                    letter.subject.clone(),
                    letter.headers.clone(),
                    message.payload.clone(),
                )
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            }
        };
        let error = match feed.alongside(store).await {
            Ok(()) => {
                if let Err(error) = message.ack_with(AckKind::Term).await {
                    debug!(%error, "terminating the event failed");
                }
                if let Ok(info) = message.info() {
                    feed.finished(info.stream_sequence, message);
                }
                stats.dead_lettered(&letter.reason);
                return Handled::Done;
            }
            Err(error) => error,
        };
        let delay = retry_delay(spec.retry, attempt);
        warn!(consumer = %spec.name, %error, retry_in = ?delay, "could not dead-letter the event; trying again");
        if !feed.hold_for(&[message], delay, shutdown).await {
            return Handled::HandBack;
        }
        attempt += 1;
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

/// The events of one run on their way to the handler: the pull requests
/// out, the events received and held in stream order, the one in hand, and
/// keeping all of them from expiring.
struct Feed {
    name: String,
    consumer: consumer::PullConsumer,
    context: jetstream::Context,
    /// Pull requests are answered on `<inbox>.<request id>`, all on this
    /// one subscription. Events come with their own subject, the end of a
    /// request (a status) on the request's: one request is out at a time,
    /// so every event belongs to it and a stale status is told apart.
    inbox: String,
    subscription: async_nats::Subscriber,
    closed: bool,
    /// The most events held, in hand or on their way (`max_ack_pending`).
    capacity: usize,
    /// Events asked for per request.
    batch: usize,
    request: Option<Request>,
    next_request: u64,
    /// No request before this, after the server refused one.
    paused_until: Option<Instant>,
    held: Held<jetstream::Message>,
    /// The events being handled (or waiting for another attempt), by
    /// stream sequence.
    in_hand: BTreeMap<u64, Subject>,
    /// The reply subject of the last event acknowledged or dead-lettered.
    last_finished: Option<Subject>,
    recovery: Option<Recovery>,
    /// When the events held are next told to JetStream as in progress, and
    /// how often.
    keepalive_at: Instant,
    keepalive_every: Duration,
}

/// The pull request out: how many events it may still bring, and when it
/// is taken as lost if the server has not said it ended.
#[derive(Debug)]
struct Request {
    id: u64,
    remaining: usize,
    lost_after: Instant,
}

/// After a run that stopped or crashed holding events: until they come
/// again (after the ack wait, or at once if they were handed back), newer
/// events are held, not handled, so the rule sees every event in order.
#[derive(Debug)]
struct Recovery {
    /// Events delivered before this run and not acknowledged.
    missing: u64,
    /// Those have stream sequences up to this.
    through: u64,
    /// By then they have come, unless something else (another run,
    /// limits) took them: go on without them.
    until: Instant,
}

impl Feed {
    async fn open(
        js: &jetstream::Context,
        spec: &Spec,
        consumer: consumer::PullConsumer,
    ) -> Result<Self, RuntimeError> {
        let problem = |problem: String| RuntimeError::Consumer {
            name: spec.name.clone(),
            problem,
        };
        // As the server answered when the consumer was created or updated.
        let info = consumer.cached_info().clone();
        // An existing consumer that could not be updated keeps its own limit.
        let mut capacity = spec.prefetch.max(1);
        if let Ok(limit) = usize::try_from(info.config.max_ack_pending) {
            if limit > 0 {
                capacity = capacity.min(limit);
            }
        }
        let client = js.client();
        let inbox = client.new_inbox();
        let subscription = client.subscribe(format!("{inbox}.*")).await.map_err(|e| {
            problem(format!(
                "cannot subscribe to the consumer's deliveries: {e}"
            ))
        })?;
        let recovery = (info.num_ack_pending > 0).then(|| {
            info!(
                consumer = %spec.name,
                events = info.num_ack_pending,
                "events handed back or held by an earlier run come first; newer ones wait for them (at most the ack wait)"
            );
            Recovery {
                missing: u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
                through: info.delivered.stream_sequence,
                until: Instant::now() + info.config.ack_wait + REQUEST_GRACE,
            }
        });
        // A third of the ack wait: each event held hears from the runtime
        // at least twice before JetStream would send it again.
        let keepalive_every = (info.config.ack_wait / 3).max(Duration::from_millis(10));
        Ok(Self {
            name: spec.name.clone(),
            consumer,
            context: js.clone(),
            inbox,
            subscription,
            closed: false,
            capacity,
            batch: (capacity / 2).max(1),
            request: None,
            next_request: 0,
            paused_until: None,
            held: Held::default(),
            in_hand: BTreeMap::new(),
            last_finished: None,
            recovery,
            keepalive_at: Instant::now() + keepalive_every,
            keepalive_every,
        })
    }

    /// The next events to handle, in stream order: at least one, at most
    /// `most`, as many as are ready; none once `shutdown` (or the
    /// connection closed for good).
    async fn next(&mut self, most: usize, shutdown: &CancellationToken) -> Vec<jetstream::Message> {
        loop {
            // Whatever has arrived, without waiting.
            while let Some(Some(message)) = self.subscription.next().now_or_never() {
                self.accept(message).await;
            }
            // Also when events keep the handler busy without it ever
            // waiting: a slow one must not let those behind it expire.
            self.on_time().await;
            if shutdown.is_cancelled() || self.closed {
                return Vec::new();
            }
            if self.recovery.is_none() && self.held.len() > 0 {
                let mut messages = Vec::with_capacity(most.min(self.held.len()));
                while messages.len() < most {
                    let Some((sequence, message)) = self.held.pop() else {
                        break;
                    };
                    if let Some(reply) = message.reply.clone() {
                        self.in_hand.insert(sequence, reply);
                    }
                    messages.push(message);
                }
                // With room made, the next batch is asked for while these
                // are handled.
                self.request_more().await;
                return messages;
            }
            self.request_more().await;
            let deadline = self.deadline();
            tokio::select! {
                () = shutdown.cancelled() => return Vec::new(),
                message = self.subscription.next() => match message {
                    Some(message) => self.accept(message).await,
                    None => self.close(),
                },
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Runs `work` (a handler, storing a dead letter) to its end while
    /// events keep arriving and those held are kept from expiring.
    async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> T {
        match self.wait_on(work, None).await {
            Some(output) => output,
            None => unreachable!("only a shutdown interrupts, and there is none"),
        }
    }

    /// Keeps `messages` through `delay` before another attempt, as
    /// [`Feed::alongside`] keeps the feed going: JetStream is told the
    /// events are still being worked on, so it does not send them again.
    /// `false` if `shutdown` came first.
    async fn hold_for(
        &mut self,
        messages: &[&jetstream::Message],
        delay: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        for message in messages {
            if let Err(error) = message.ack_with(AckKind::Progress).await {
                debug!(%error, "telling JetStream an event is in progress failed");
            }
        }
        self.wait_on(tokio::time::sleep(delay), Some(shutdown))
            .await
            .is_some()
    }

    async fn wait_on<T>(
        &mut self,
        work: impl Future<Output = T>,
        shutdown: Option<&CancellationToken>,
    ) -> Option<T> {
        let mut work = pin!(work);
        // Most handlers finish without waiting for anything.
        if let std::task::Poll::Ready(output) = futures::poll!(&mut work) {
            return Some(output);
        }
        let stopped = async {
            match shutdown {
                Some(shutdown) => shutdown.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let mut stopped = pin!(stopped);
        loop {
            let deadline = self.deadline();
            tokio::select! {
                biased;
                output = &mut work => return Some(output),
                () = &mut stopped => return None,
                message = self.subscription.next(), if !self.closed => match message {
                    Some(message) => self.accept(message).await,
                    None => self.close(),
                },
                () = tokio::time::sleep_until(deadline) => self.on_time().await,
            }
            self.request_more().await;
        }
    }

    /// Takes in what the subscription brought: an event, or the end of a
    /// request.
    async fn accept(&mut self, message: async_nats::Message) {
        let request = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|id| id.parse::<u64>().ok());
        match message.status {
            None | Some(StatusCode::OK) => {}
            Some(StatusCode::IDLE_HEARTBEAT) => return,
            // The request expired: the usual end of one that was not filled.
            Some(StatusCode::TIMEOUT) => {
                if self.request.as_ref().map(|r| r.id) == request {
                    self.request = None;
                }
                return;
            }
            Some(status) => {
                // Refused (too many requests waiting, the consumer deleted,
                // JetStream unavailable): pull again after a pause.
                debug!(consumer = %self.name, %status, description = ?message.description, "pull request ended");
                if self.request.as_ref().map(|r| r.id) == request {
                    self.request = None;
                }
                self.paused_until = Some(Instant::now() + REFUSED_PAUSE);
                return;
            }
        }
        if let Some(request) = &mut self.request {
            request.remaining = request.remaining.saturating_sub(1);
            if request.remaining == 0 {
                self.request = None;
            }
        }
        let message = jetstream::Message {
            message,
            context: self.context.clone(),
        };
        let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
            debug!(consumer = %self.name, subject = %message.subject, "not a JetStream delivery; ignored");
            return;
        };
        let in_hand = self.in_hand.contains_key(&sequence);
        let late = self
            .held
            .finished
            .is_some_and(|(first, _)| sequence < first);
        match self.held.insert(sequence, message, in_hand) {
            Arrival::Held => {
                if late {
                    // Only when a recovery gave up waiting for it.
                    warn!(consumer = %self.name, sequence, "an event held by an earlier run came back late: handled out of order");
                }
                if let Some(recovery) = &mut self.recovery {
                    if sequence <= recovery.through {
                        recovery.missing = recovery.missing.saturating_sub(1);
                    }
                }
            }
            Arrival::Again => {}
            Arrival::Finished(message) => {
                // Finished in this run, its acknowledgement lost (the
                // connection dropped): acknowledged again, not handled again.
                if let Err(error) = message.ack().await {
                    debug!(%error, "acknowledging again failed");
                }
            }
        }
    }

    /// Asks for more events when no request is out and there is room for
    /// a batch. While recovering a request is always out: the events that
    /// come again need one to come in, and the consumer's
    /// `max_ack_pending` bounds what else comes.
    async fn request_more(&mut self) {
        if self.closed
            || self.request.is_some()
            || self
                .paused_until
                .is_some_and(|until| Instant::now() < until)
        {
            return;
        }
        let held = self.held.len() + self.in_hand.len();
        if held + self.batch > self.capacity && self.recovery.is_none() {
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        let request = consumer::pull::BatchConfig {
            batch: self.batch,
            expires: Some(REQUEST_WAIT),
            ..Default::default()
        };
        let inbox = Subject::from(format!("{}.{id}", self.inbox));
        if let Err(error) = self.consumer.request_batch(request, inbox).await {
            debug!(consumer = %self.name, %error, "pull request failed");
            self.paused_until = Some(Instant::now() + REFUSED_PAUSE);
            return;
        }
        self.request = Some(Request {
            id,
            remaining: self.batch,
            lost_after: Instant::now() + REQUEST_WAIT + REQUEST_GRACE,
        });
    }

    /// The next moment something is due: a request lost, a pause over, a
    /// recovery given up, the events held to be kept alive.
    fn deadline(&self) -> Instant {
        self.request
            .iter()
            .map(|r| r.lost_after)
            .chain(self.paused_until)
            .chain(self.recovery.as_ref().map(|r| r.until))
            .fold(self.keepalive_at, Instant::min)
    }

    /// Does what is due (see [`Feed::deadline`]).
    async fn on_time(&mut self) {
        let now = Instant::now();
        if self.keepalive_at <= now {
            self.keepalive_at = now + self.keepalive_every;
            self.keep_alive().await;
        }
        if self.request.as_ref().is_some_and(|r| r.lost_after <= now) {
            self.request = None;
        }
        if self.paused_until.is_some_and(|until| until <= now) {
            self.paused_until = None;
        }
        if let Some(recovery) = &self.recovery {
            if recovery.missing == 0 {
                info!(consumer = %self.name, "the events held by an earlier run came back; handling them first");
                self.recovery = None;
            } else if recovery.until <= now {
                warn!(
                    consumer = %self.name,
                    missing = recovery.missing,
                    "events held by an earlier run did not come back within the ack wait (acknowledged by another run of this consumer, or removed from the stream); going on without them"
                );
                self.recovery = None;
            }
        }
    }

    /// Tells JetStream that every event held is being worked on, so that
    /// none is sent again while the ones before it are handled.
    async fn keep_alive(&self) {
        let client = self.context.client();
        let replies = self.in_hand.values().chain(
            self.held
                .iter()
                .filter_map(|message| message.reply.as_ref()),
        );
        for reply in replies {
            if let Err(error) = client
                .publish(reply.clone(), Bytes::from(AckKind::Progress))
                .await
            {
                debug!(%error, "telling JetStream an event is in progress failed");
            }
        }
    }

    fn finished(&mut self, sequence: u64, message: &jetstream::Message) {
        self.held.finish(sequence);
        self.in_hand.remove(&sequence);
        self.last_finished = message.reply.clone();
    }

    fn close(&mut self) {
        warn!(consumer = %self.name, "the NATS connection is closed; stopping");
        self.closed = true;
    }

    /// Ends the run: waits for the request out to end (an event it
    /// brought after the run would wait out the ack wait before coming
    /// again, behind newer ones), then hands back the events in hand (when
    /// shutdown came while they waited for another attempt) and every event
    /// held, in stream order, so the next run starts with them.
    async fn hand_back(mut self) {
        while self.request.is_some() && !self.closed {
            let deadline = self.deadline();
            tokio::select! {
                message = self.subscription.next() => match message {
                    Some(message) => self.accept(message).await,
                    None => self.closed = true,
                },
                () = tokio::time::sleep_until(deadline) => self.on_time().await,
            }
        }
        // No interest left: a request the server still keeps (one taken as
        // lost) gets nothing more.
        if let Err(error) = self.subscription.unsubscribe().await {
            debug!(%error, "unsubscribing failed");
        }
        let client = self.context.client();
        let mut replies = std::mem::take(&mut self.in_hand)
            .into_values()
            .chain(
                self.held
                    .drain()
                    .filter_map(|message| message.message.reply),
            )
            .peekable();
        let handed_back = replies.peek().is_some();
        let mut last = None;
        let mut count = 0u64;
        for reply in replies {
            if let Some(previous) = last.replace(reply) {
                if let Err(error) = client.publish(previous, NAK).await {
                    debug!(%error, "handing an event back failed");
                }
            }
            count += 1;
        }
        // Answered once applied; the server applies a connection's
        // acknowledgements in order, so the answer to the last means all of
        // this run's acknowledgements and hand-backs are applied.
        let confirm = match last {
            Some(reply) => Some((reply, NAK)),
            None => self.last_finished.take().map(|reply| (reply, ACK)),
        };
        if let Some((reply, payload)) = confirm {
            match tokio::time::timeout(CONFIRM_WAIT, client.request(reply, payload)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    warn!(consumer = %self.name, %error, "the server did not confirm the last acknowledgement")
                }
                Err(_) => {
                    warn!(consumer = %self.name, "the server did not confirm the last acknowledgement in time")
                }
            }
        }
        if handed_back {
            info!(consumer = %self.name, events = count, "events held handed back for the next run");
        }
    }
}

/// Events received and not yet handled, in stream order, and which of this
/// run's events are finished.
#[derive(Debug)]
struct Held<T> {
    events: VecDeque<(u64, T)>,
    /// The first and last stream sequence finished in this run: events
    /// are finished in order, so everything between them that came to
    /// this run is finished too.
    finished: Option<(u64, u64)>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Self {
            events: VecDeque::new(),
            finished: None,
        }
    }
}

/// What [`Held::insert`] did with an event.
#[derive(Debug)]
enum Arrival<T> {
    /// Held, in its place in stream order.
    Held,
    /// Sent again while held (the newer copy is kept) or in hand.
    Again,
    /// Already finished in this run: given back, to be acknowledged again.
    Finished(T),
}

impl<T> Held<T> {
    /// `in_hand`: the event is being handled.
    fn insert(&mut self, sequence: u64, event: T, in_hand: bool) -> Arrival<T> {
        if in_hand {
            return Arrival::Again;
        }
        if self
            .finished
            .is_some_and(|(first, last)| (first..=last).contains(&sequence))
        {
            return Arrival::Finished(event);
        }
        if self.events.back().is_none_or(|(last, _)| *last < sequence) {
            self.events.push_back((sequence, event));
            return Arrival::Held;
        }
        match self.events.binary_search_by_key(&sequence, |(s, _)| *s) {
            Ok(position) => {
                self.events[position].1 = event;
                Arrival::Again
            }
            Err(position) => {
                self.events.insert(position, (sequence, event));
                Arrival::Held
            }
        }
    }

    fn pop(&mut self) -> Option<(u64, T)> {
        self.events.pop_front()
    }

    fn finish(&mut self, sequence: u64) {
        self.finished = Some(match self.finished {
            None => (sequence, sequence),
            Some((first, last)) => (first.min(sequence), last.max(sequence)),
        });
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.events.iter().map(|(_, event)| event)
    }

    fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.events.drain(..).map(|(_, event)| event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequences(held: &Held<&str>) -> Vec<u64> {
        held.events.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn events_arriving_out_of_order_are_held_in_stream_order() {
        let mut held = Held::default();
        for sequence in [5, 6, 2, 9, 1] {
            assert!(matches!(held.insert(sequence, "e", false), Arrival::Held));
        }
        assert_eq!(sequences(&held), [1, 2, 5, 6, 9]);
        assert_eq!(held.pop().map(|(s, _)| s), Some(1));
    }

    #[test]
    fn an_event_sent_again_while_held_or_in_hand_is_held_once() {
        let mut held = Held::default();
        held.insert(1, "first", false);
        held.insert(2, "first", false);
        assert!(matches!(held.insert(1, "again", false), Arrival::Again));
        assert!(matches!(held.insert(3, "again", true), Arrival::Again));
        assert_eq!(sequences(&held), [1, 2]);
        assert_eq!(
            held.pop(),
            Some((1, "again")),
            "the newer delivery's reply acknowledges"
        );
    }

    #[test]
    fn an_event_finished_in_this_run_is_given_back_to_be_acknowledged_again() {
        let mut held = Held::default();
        held.insert(4, "e", false);
        held.insert(7, "e", false);
        held.pop();
        held.finish(4);
        held.pop();
        held.finish(7);
        assert!(matches!(
            held.insert(7, "again", false),
            Arrival::Finished("again")
        ));
        assert!(matches!(
            held.insert(5, "again", false),
            Arrival::Finished("again")
        ));
        // Before the first finished: an earlier run's event, come back late.
        assert!(matches!(held.insert(3, "late", false), Arrival::Held));
        assert!(matches!(held.insert(8, "next", false), Arrival::Held));
        assert_eq!(sequences(&held), [3, 8]);
    }

    #[test]
    fn the_retry_delay_doubles_up_to_thirty_seconds() {
        let first = Duration::from_millis(500);
        assert_eq!(retry_delay(first, 1), first);
        assert_eq!(retry_delay(first, 2), Duration::from_secs(1));
        assert_eq!(retry_delay(first, 4), Duration::from_secs(4));
        assert_eq!(retry_delay(first, 7), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(first, i64::MAX), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(first, 0), first);
    }
}
