//! The store pipeline: what happens to a publish between the socket and the
//! PUBACK.
//!
//! [`Ingest::prepare`] decodes a publish with the conventions into the
//! JetStream messages to store (events, or one dead letter). Each connection
//! has a [`Pipeline`] task that publishes those in arrival order, keeps many
//! in flight, and reports each publish back in arrival order once all of its
//! messages are stored, which is when the connection acknowledges it. Failed
//! publishes are retried under the same message ids until they are stored, so
//! a NATS outage delays acknowledgements and never loses or doubles one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::{join_all, BoxFuture};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use hearth_proto::{headers, v1, Encoding};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tracing::{debug, warn, Instrument};

use crate::conventions::{Conventions, Decoded, Rejection};
use crate::jetstream::dedup::{DedupKey, Generations};
use crate::subject;

/// A publish as received from a device.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) client_id: Arc<str>,
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) pkid: u16,
    pub(crate) dup: bool,
    pub(crate) received_at: SystemTime,
}

/// A publish whose fate is settled: the connection may acknowledge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    pub(crate) pkid: u16,
    pub(crate) qos: QoS,
}

/// One message to store.
#[derive(Debug)]
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// A publish turned into the messages that store it.
#[derive(Debug)]
struct Prepared {
    done: Done,
    dup: bool,
    /// Unique per received publish; tells a retry's duplicate from an older
    /// identical publish (see `jetstream::dedup`).
    correlation_id: String,
    /// `None` for QoS 0, which JetStream need not deduplicate.
    dedup: Option<DedupKey>,
    messages: Vec<Outgoing>,
}

/// Shared by every connection: conventions, the JetStream context, counters.
#[derive(Debug)]
pub(crate) struct Ingest {
    conventions: Conventions,
    js: jetstream::Context,
    encoding: Encoding,
    generations: Generations,
    qos0_dropped: AtomicU64,
    qos0_dropped_logged_at: AtomicU64,
}

const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Ingest {
    pub(crate) fn new(
        conventions: Conventions,
        js: jetstream::Context,
        encoding: Encoding,
        generations: Generations,
    ) -> Self {
        Self {
            conventions,
            js,
            encoding,
            generations,
            qos0_dropped: AtomicU64::new(0),
            qos0_dropped_logged_at: AtomicU64::new(0),
        }
    }

    /// QoS 0 publishes that could not be stored since start.
    pub(crate) fn qos0_dropped(&self) -> u64 {
        self.qos0_dropped.load(Ordering::Relaxed)
    }

    fn prepare(&self, received: Received) -> Prepared {
        let correlation_id = uuid::Uuid::now_v7().to_string();
        let (convention, decoded) = self.conventions.decode(&received.topic, &received.payload);
        let messages = match decoded {
            Ok(Decoded::Events(readings)) => readings
                .into_iter()
                .map(|reading| self.event_message(&received, convention, &correlation_id, reading))
                .collect(),
            Ok(Decoded::NotAnEvent(why)) => {
                debug!(topic = %received.topic, why, "not a device event; acknowledged, not stored");
                Vec::new()
            }
            Err(rejection) => vec![dead_letter(&received, &correlation_id, &rejection)],
        };
        let dedup = (received.qos != QoS::AtMostOnce).then(|| {
            DedupKey::new(
                &received.client_id,
                received.pkid,
                &received.topic,
                &received.payload,
            )
        });
        Prepared {
            done: Done {
                pkid: received.pkid,
                qos: received.qos,
            },
            dup: received.dup,
            correlation_id,
            dedup,
            messages,
        }
    }

    fn event_message(
        &self,
        received: &Received,
        convention: &str,
        correlation_id: &str,
        reading: crate::conventions::Reading,
    ) -> Outgoing {
        let kind = reading.body.kind();
        let subject = subject::event_subject(&reading.home, &reading.room, kind, &reading.device);
        let event = v1::Event {
            id: uuid::Uuid::now_v7().to_string(),
            correlation_id: correlation_id.to_owned(),
            causation_id: String::new(),
            occurred_at: reading.occurred_at,
            received_at: Some(timestamp(received.received_at)),
            source: Some(v1::Source {
                convention: convention.to_owned(),
                client_id: received.client_id.to_string(),
                topic: received.topic.clone(),
            }),
            home: reading.home,
            room: reading.room,
            device: reading.device,
            body: Some(reading.body),
        };
        let mut headers = HeaderMap::new();
        headers.insert(headers::CONTENT_TYPE, self.encoding.content_type());
        headers.insert(headers::SCHEMA, v1::EVENT_SCHEMA);
        headers.insert(headers::EVENT_ID, event.id.as_str());
        headers.insert(headers::KIND, kind);
        headers.insert(headers::CORRELATION_ID, correlation_id);
        debug!(event_id = %event.id, correlation_id, device = %event.device, kind, "event decoded");
        Outgoing {
            subject,
            payload: self.encoding.encode(&event),
            headers,
        }
    }

    /// Publishes every message of `prepared` (awaiting only their hand-over
    /// to the NATS client, so that the stream keeps arrival order) and returns
    /// a future that settles once all are stored.
    async fn submit(self: &Arc<Self>, prepared: Prepared) -> BoxFuture<'static, Done> {
        let this = Arc::clone(self);
        if prepared.dup && prepared.dedup.is_some() {
            // A retransmission must first learn its original's generation.
            return Box::pin(async move { this.store(prepared, None).await });
        }
        let first = self.send(&prepared, 0).await;
        Box::pin(async move { this.store(prepared, Some(first)).await })
    }

    async fn send(
        &self,
        prepared: &Prepared,
        generation: u32,
    ) -> Vec<Result<PublishAckFuture, jetstream::context::PublishError>> {
        let mut acks = Vec::with_capacity(prepared.messages.len());
        for (index, message) in prepared.messages.iter().enumerate() {
            let mut publish = jetstream::message::PublishMessage::build()
                .headers(message.headers.clone())
                .payload(message.payload.clone());
            if let Some(key) = &prepared.dedup {
                publish = publish.message_id(key.message_id(generation, index));
            }
            acks.push(self.js.send_publish(message.subject.clone(), publish).await);
        }
        acks
    }

    /// Drives `prepared` until it is stored (QoS 1/2) or tried once (QoS 0).
    async fn store(
        &self,
        prepared: Prepared,
        mut in_flight: Option<Vec<Result<PublishAckFuture, jetstream::context::PublishError>>>,
    ) -> Done {
        let mut generation = 0;
        let mut backoff = RETRY_MIN;
        let mut looked_up = !prepared.dup;
        loop {
            if !looked_up {
                if let Some(key) = &prepared.dedup {
                    match self.generations.get(key).await {
                        Ok(found) => {
                            generation = found;
                            looked_up = true;
                        }
                        Err(error) => {
                            warn!(%error, "retrying");
                            backoff = pause(backoff).await;
                            continue;
                        }
                    }
                }
            }
            let acks = match in_flight.take() {
                Some(acks) => acks,
                None => self.send(&prepared, generation).await,
            };
            let results = join_all(acks.into_iter().map(|ack| async move {
                match ack {
                    Ok(ack) => ack.await,
                    Err(error) => Err(error),
                }
            }))
            .await;

            if let Some(error) = results.iter().find_map(|r| r.as_ref().err()) {
                if prepared.done.qos == QoS::AtMostOnce {
                    self.count_qos0_drop(error);
                    return prepared.done;
                }
                warn!(
                    %error,
                    retry_in = ?backoff,
                    correlation_id = %prepared.correlation_id,
                    "storing a publish failed; retrying with the same message ids"
                );
                backoff = pause(backoff).await;
                continue;
            }
            let first_duplicate = results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .find(|ack| ack.duplicate);
            match (first_duplicate, &prepared.dedup) {
                (Some(ack), Some(key)) if !prepared.dup => {
                    match self.stored_correlation_id(ack).await {
                        Ok(Some(id)) if id == prepared.correlation_id => return prepared.done,
                        Ok(_) => {
                            // An older identical publish holds this id: this
                            // one is new, store it under the next generation.
                            generation += 1;
                            debug!(generation, "identical repeat of an earlier publish");
                            while let Err(error) = self.generations.record(key, generation).await {
                                warn!(%error, "retrying");
                                backoff = pause(backoff).await;
                            }
                        }
                        Err(error) => {
                            warn!(%error, "cannot read back a duplicate; retrying");
                            backoff = pause(backoff).await;
                        }
                    }
                }
                _ => return prepared.done,
            }
        }
    }

    async fn stored_correlation_id(
        &self,
        ack: &PublishAck,
    ) -> Result<Option<String>, async_nats::Error> {
        let stream = self.js.get_stream_no_info(&ack.stream).await?;
        let message = stream.get_raw_message(ack.sequence).await?;
        Ok(message
            .headers
            .get(headers::CORRELATION_ID)
            .map(|v| v.as_str().to_owned()))
    }

    fn count_qos0_drop(&self, error: &jetstream::context::PublishError) {
        let dropped = self.qos0_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per 10 s at most: a NATS outage must not flood the log.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.qos0_dropped_logged_at.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .qos0_dropped_logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(%error, dropped_total = dropped, "QoS 0 publish could not be stored and is dropped (QoS 0 is at most once)");
        }
    }
}

async fn pause(backoff: Duration) -> Duration {
    tokio::time::sleep(backoff).await;
    (backoff * 2).min(RETRY_MAX)
}

fn timestamp(time: SystemTime) -> pbjson_types::Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The dead letter for a publish no convention could turn into events: the
/// original payload, with headers saying where it came from and why.
fn dead_letter(received: &Received, correlation_id: &str, rejection: &Rejection) -> Outgoing {
    debug!(topic = %received.topic, reason = %rejection.reason, detail = %rejection.detail, "dead-lettered");
    let mut headers = HeaderMap::new();
    headers.insert(headers::REASON, rejection.reason.as_str());
    headers.insert(headers::DETAIL, header_safe(&rejection.detail).as_str());
    headers.insert(headers::MQTT_TOPIC, header_safe(&received.topic).as_str());
    headers.insert(
        headers::MQTT_CLIENT_ID,
        header_safe(&received.client_id).as_str(),
    );
    headers.insert(headers::CORRELATION_ID, correlation_id);
    headers.insert(headers::CONTENT_TYPE, "application/octet-stream");
    Outgoing {
        subject: subject::dlq_subject(rejection.reason.as_str()),
        headers,
        payload: received.payload.clone(),
    }
}

/// Header values cannot carry line breaks; device-chosen strings may.
fn header_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The per-connection store pipeline (see the module docs).
pub(crate) struct Pipeline;

impl Pipeline {
    /// Starts the pipeline task. Publishes go in through the returned sender;
    /// settled ones come out, in the same order, through the receiver. The
    /// task ends when the sender is dropped and everything in flight settled,
    /// or when the receiver is dropped.
    pub(crate) fn spawn(
        ingest: Arc<Ingest>,
        capacity: usize,
        span: tracing::Span,
    ) -> (
        mpsc::Sender<Received>,
        mpsc::Receiver<Done>,
        tokio::task::JoinHandle<()>,
    ) {
        let (jobs_tx, mut jobs) = mpsc::channel::<Received>(capacity);
        let (done_tx, done_rx) = mpsc::channel::<Done>(capacity);
        let task = tokio::spawn(
            async move {
                let mut in_flight = FuturesOrdered::new();
                let mut open = true;
                loop {
                    tokio::select! {
                        biased;
                        Some(done) = in_flight.next() => {
                            if done_tx.send(done).await.is_err() {
                                return;
                            }
                        }
                        job = jobs.recv(), if open => match job {
                            Some(received) => {
                                let prepared = ingest.prepare(received);
                                in_flight.push_back(ingest.submit(prepared).await);
                            }
                            None => open = false,
                        },
                        else => return,
                    }
                }
            }
            .instrument(span),
        );
        (jobs_tx, done_rx, task)
    }
}
