//! The store path: what happens to a publish between the socket and the
//! PUBACK.
//!
//! [`Ingest::prepare`] decodes a publish with the conventions into the
//! JetStream messages that store it (events, or one dead letter). Each
//! connection has a [`Pipeline`] that publishes those in arrival order, many
//! in flight, and settles each publish in arrival order once JetStream has
//! stored all of its messages; then the connection acknowledges it.

mod pipeline;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use hearth_proto::v1::event::Body;
use hearth_proto::{headers, v1, Encoding};
use rumqttc::QoS;
use tracing::{debug, warn};

use crate::conventions::{Conventions, Decoded, Reading, Rejection};
use crate::jetstream::dedup::{DedupKey, Generations};
use crate::subject;

pub(crate) use pipeline::Pipeline;

/// A publish as received from a device.
#[derive(Debug)]
pub(crate) struct Received {
    /// Its share of the gateway's memory budget, given back when it is
    /// settled (dropped with it).
    pub(crate) budget: Option<tokio::sync::OwnedSemaphorePermit>,
    pub(crate) client_id: std::sync::Arc<str>,
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) pkid: u16,
    pub(crate) dup: bool,
    pub(crate) retain: bool,
    /// MQTT 5 user properties, routed with the message as NATS headers.
    pub(crate) user_properties: Vec<(String, String)>,
    pub(crate) received_at: SystemTime,
}

/// A publish whose fate is settled: the connection may route it to
/// subscribers and acknowledge it.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) pkid: u16,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    /// Where a retained publish was stored in `HEARTH_RETAINED`.
    pub(crate) retained_sequence: Option<u64>,
    pub(crate) user_properties: Vec<(String, String)>,
}

/// What a stored message is, for its headers.
#[derive(Debug)]
enum Meta {
    Event {
        id: String,
        kind: &'static str,
    },
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
    /// The publish itself, as the topic's retained message.
    Retained,
    /// The publish, queued for the persistent session of `target` at `qos`.
    Queued {
        qos: QoS,
        target: std::sync::Arc<str>,
    },
}

/// One message to store. Its headers are built for each publish attempt
/// rather than kept and cloned: the common case has exactly one attempt.
#[derive(Debug)]
struct Outgoing {
    subject: Subject,
    payload: Bytes,
    meta: Meta,
}

impl Outgoing {
    fn is_queued(&self) -> bool {
        matches!(self.meta, Meta::Queued { .. })
    }

    /// Whether storing it fresh proves that no older identical publish used
    /// the generation: events and dead letters follow from the topic and
    /// payload alone; a retained copy does not (the retain flag is not part
    /// of the dedup key) and a session's copy depends on who subscribed.
    fn tells_generation(&self) -> bool {
        matches!(self.meta, Meta::Event { .. } | Meta::DeadLetter { .. })
    }
}

/// A publish turned into the messages that store it.
#[derive(Debug)]
struct Prepared {
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
    pkid: u16,
    qos: QoS,
    retain: bool,
    dup: bool,
    client_id: std::sync::Arc<str>,
    topic: String,
    payload: Bytes,
    user_properties: Vec<(String, String)>,
    /// Unique per received publish; tells a retry's duplicate from an older
    /// identical publish (see `jetstream::dedup`).
    correlation_id: String,
    /// `None` for QoS 0, which JetStream need not deduplicate.
    dedup: Option<DedupKey>,
    messages: Vec<Outgoing>,
    /// Which of `messages` is the retained copy, if any.
    retained: Option<usize>,
    received_at: SystemTime,
}

const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);
const SCHEMA: HeaderName = HeaderName::from_static(headers::SCHEMA);
const EVENT_ID: HeaderName = HeaderName::from_static(headers::EVENT_ID);
const KIND: HeaderName = HeaderName::from_static(headers::KIND);
const CORRELATION_ID: HeaderName = HeaderName::from_static(headers::CORRELATION_ID);
const REASON: HeaderName = HeaderName::from_static(headers::REASON);
const DETAIL: HeaderName = HeaderName::from_static(headers::DETAIL);
const MQTT_TOPIC: HeaderName = HeaderName::from_static(headers::MQTT_TOPIC);
const MQTT_CLIENT_ID: HeaderName = HeaderName::from_static(headers::MQTT_CLIENT_ID);
const MQTT_QOS: HeaderName = HeaderName::from_static(headers::MQTT_QOS);

impl Prepared {
    /// What the connection needs once this publish is settled.
    fn done(self, retained_sequence: Option<u64>) -> Done {
        Done {
            pkid: self.pkid,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic,
            payload: self.payload,
            retained_sequence,
            user_properties: self.user_properties,
        }
    }

    /// The headers of message `index` for an attempt at `generation`.
    fn headers(&self, index: usize, generation: u32, encoding: Encoding) -> HeaderMap {
        let message = &self.messages[index];
        let mut map = HeaderMap::new();
        match &message.meta {
            Meta::Event { id, kind } => {
                map.insert(CONTENT_TYPE, encoding.content_type());
                map.insert(SCHEMA, v1::EVENT_SCHEMA);
                map.insert(EVENT_ID, id.as_str());
                map.insert(KIND, *kind);
            }
            Meta::Queued { qos, .. } => {
                // Exactly, as the session's client gets it: a topic may hold
                // characters a header cannot.
                map.insert(MQTT_TOPIC, &*crate::broker::encode_property(&self.topic));
                map.insert(MQTT_QOS, crate::broker::qos_digit(*qos));
                crate::broker::add_user_properties(&mut map, &self.user_properties);
            }
            Meta::Retained => {
                map.insert(MQTT_QOS, crate::broker::qos_digit(self.qos));
                map.insert(MQTT_CLIENT_ID, &*headers::safe_value(&self.client_id));
            }
            Meta::DeadLetter { reason, detail } => {
                map.insert(CONTENT_TYPE, "application/octet-stream");
                map.insert(REASON, *reason);
                map.insert(DETAIL, &*headers::safe_value(detail));
                map.insert(MQTT_TOPIC, &*headers::safe_value(&self.topic));
                map.insert(MQTT_CLIENT_ID, &*headers::safe_value(&self.client_id));
            }
        }
        map.insert(CORRELATION_ID, self.correlation_id.as_str());
        if let Some(key) = &self.dedup {
            let id = match &message.meta {
                Meta::Queued { target, .. } => key.queued_id(generation, target),
                _ => key.message_id(generation, index),
            };
            map.insert(NATS_MESSAGE_ID, id);
        }
        map
    }
}

/// Shared by every connection: conventions, NATS, counters.
#[derive(Debug)]
pub(crate) struct Ingest {
    conventions: Conventions,
    devices: std::sync::Arc<crate::devices::Devices>,
    sessions: std::sync::Arc<crate::sessions::Sessions>,
    js: async_nats::jetstream::Context,
    encoding: Encoding,
    generations: Generations,
    qos0_dropped: AtomicU64,
    qos0_dropped_logged_at: AtomicU64,
    health: StoreHealth,
    /// `hearth_gateway_events_total` by convention and kind: registering a
    /// labelled counter allocates its labels, so each is registered once.
    event_counters: std::sync::RwLock<EventCounters>,
}

type EventCounters = std::collections::HashMap<(&'static str, &'static str), metrics::Counter>;

/// Whether storing works: failures are logged when they start, every 10 s
/// while they last (not once per publish: a full stream fails every
/// device's publishes) and when they end; `/readyz` and a gauge tell it too.
#[derive(Debug, Default)]
struct StoreHealth {
    /// Set while storing fails, so that success costs one load.
    failing: std::sync::atomic::AtomicBool,
    trouble: std::sync::Mutex<Option<Trouble>>,
}

#[derive(Debug)]
struct Trouble {
    since: std::time::Instant,
    logged_at: std::time::Instant,
    failures: u64,
    error: String,
    reason: &'static str,
}

/// Why storing failed, as the `reason` label of
/// `hearth_gateway_store_failures_total`.
fn failure_reason(error: &str) -> &'static str {
    let error = error.to_ascii_lowercase();
    if [
        "maximum bytes",
        "maximum messages",
        "insufficient",
        "resources",
    ]
    .iter()
    .any(|full| error.contains(full))
    {
        "storage_full"
    } else if error.contains("no stream answered") {
        "no_stream"
    } else if error.contains("no reply") {
        "timeout"
    } else {
        "error"
    }
}

impl Ingest {
    pub(crate) fn new(
        conventions: Conventions,
        devices: std::sync::Arc<crate::devices::Devices>,
        sessions: std::sync::Arc<crate::sessions::Sessions>,
        js: async_nats::jetstream::Context,
        encoding: Encoding,
        generations: Generations,
    ) -> Self {
        Self {
            conventions,
            devices,
            sessions,
            js,
            encoding,
            generations,
            qos0_dropped: AtomicU64::new(0),
            qos0_dropped_logged_at: AtomicU64::new(0),
            health: StoreHealth::default(),
            event_counters: std::sync::RwLock::default(),
        }
    }

    /// Counts one event of `kind` decoded by `convention`.
    fn count_event(&self, convention: &'static str, kind: &'static str) {
        let known = self
            .event_counters
            .read()
            .ok()
            .and_then(|counters| counters.get(&(convention, kind)).cloned());
        let counter = known.unwrap_or_else(|| {
            let counter = metrics::counter!(crate::telemetry::EVENTS, "convention" => convention, "kind" => kind);
            if let Ok(mut counters) = self.event_counters.write() {
                counters.insert((convention, kind), counter.clone());
            }
            counter
        });
        counter.increment(1);
    }

    /// A publish could not be stored (it is retried, or dropped at QoS 0).
    pub(crate) fn store_failed(&self, error: &str) {
        let reason = failure_reason(error);
        metrics::counter!(crate::telemetry::STORE_FAILURES, "reason" => reason).increment(1);
        let now = std::time::Instant::now();
        let mut trouble = self
            .health
            .trouble
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match trouble.as_mut() {
            None => {
                warn!(
                    %error,
                    reason,
                    "storing in JetStream fails: devices' QoS 1 publishes are not acknowledged until \
                     they are stored (retried under the same message ids)"
                );
                *trouble = Some(Trouble {
                    since: now,
                    logged_at: now,
                    failures: 1,
                    error: error.to_owned(),
                    reason,
                });
                self.health.failing.store(true, Ordering::Release);
                metrics::gauge!(crate::telemetry::STORE_FAILING).set(1.0);
            }
            Some(trouble) => {
                trouble.failures += 1;
                error.clone_into(&mut trouble.error);
                trouble.reason = reason;
                if now.duration_since(trouble.logged_at) >= std::time::Duration::from_secs(10) {
                    trouble.logged_at = now;
                    warn!(
                        %error,
                        reason,
                        failures = trouble.failures,
                        failing_for = ?now.duration_since(trouble.since),
                        "storing in JetStream still fails; devices wait for their acknowledgements"
                    );
                }
            }
        }
    }

    /// A publish was stored.
    pub(crate) fn store_succeeded(&self) {
        if !self.health.failing.load(Ordering::Acquire) {
            return;
        }
        let mut trouble = self
            .health
            .trouble
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(trouble) = trouble.take() {
            tracing::info!(
                failures = trouble.failures,
                failed_for = ?trouble.since.elapsed(),
                "storing in JetStream works again"
            );
        }
        self.health.failing.store(false, Ordering::Release);
        metrics::gauge!(crate::telemetry::STORE_FAILING).set(0.0);
    }

    /// Why storing fails, while it does.
    pub(crate) fn store_trouble(&self) -> Option<String> {
        if !self.health.failing.load(Ordering::Acquire) {
            return None;
        }
        let trouble = self
            .health
            .trouble
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        trouble.as_ref().map(|trouble| {
            format!(
                "storing fails ({}) for {}s: {}",
                trouble.reason,
                trouble.since.elapsed().as_secs(),
                trouble.error
            )
        })
    }

    /// QoS 0 publishes that could not be stored since start.
    pub(crate) fn qos0_dropped(&self) -> u64 {
        self.qos0_dropped.load(Ordering::Relaxed)
    }

    fn prepare(&self, received: Received) -> Prepared {
        let correlation_id = uuid::Uuid::now_v7().to_string();
        let (convention, decoded) = self.conventions.decode(&received.topic, &received.payload);
        let decoded = decoded.and_then(check_subject_lengths);
        if let Ok(Decoded::Events(readings)) = &decoded {
            self.learn_device(convention, &received, readings);
        }
        let mut messages: Vec<Outgoing> = match decoded {
            Ok(Decoded::Events(readings)) => readings
                .into_iter()
                .map(|reading| {
                    let kind = reading.body.kind();
                    self.count_event(convention, kind);
                    self.event(&received, convention, &correlation_id, reading)
                })
                .collect(),
            Ok(Decoded::NotAnEvent(why)) => {
                debug!(topic = %received.topic, why, "not a device event; acknowledged, not stored");
                metrics::counter!(crate::telemetry::NOT_EVENTS, "convention" => convention)
                    .increment(1);
                Vec::new()
            }
            Err(rejection) => {
                metrics::counter!(crate::telemetry::DEAD_LETTERS, "reason" => rejection.reason.as_str())
                    .increment(1);
                vec![dead_letter(&received, &rejection)]
            }
        };
        // The retained copy is stored with the events, before the PUBACK.
        let retained = received
            .retain
            .then(|| subject::retained_subject(&received.topic))
            .flatten()
            .filter(|subject| subject.len() <= MAX_SUBJECT)
            .map(|subject| {
                messages.push(Outgoing {
                    subject: Subject::from(subject),
                    payload: received.payload.clone(),
                    meta: Meta::Retained,
                });
                messages.len() - 1
            });
        if received.retain && retained.is_none() {
            warn!(topic = %received.topic, "topic too long to retain; published, not retained");
        }
        // Persistent sessions get their copy in their queue, stored before
        // the PUBACK like the events (see `sessions`).
        for (client_id, qos) in self.sessions.queued_for(&received.topic, received.qos) {
            messages.push(Outgoing {
                subject: Subject::from(subject::queue_subject(&client_id)),
                payload: received.payload.clone(),
                meta: Meta::Queued {
                    qos,
                    target: client_id,
                },
            });
        }
        let dedup = (received.qos != QoS::AtMostOnce).then(|| {
            DedupKey::new(
                &received.client_id,
                received.pkid,
                &received.topic,
                &received.payload,
            )
        });
        Prepared {
            _budget: received.budget,
            pkid: received.pkid,
            qos: received.qos,
            retain: received.retain,
            dup: received.dup,
            client_id: received.client_id,
            topic: received.topic,
            payload: received.payload,
            user_properties: received.user_properties,
            correlation_id,
            dedup,
            messages,
            retained,
            received_at: received.received_at,
        }
    }

    /// Tells the device registry which convention and topic the device of
    /// `readings` (all of one device) uses.
    fn learn_device(&self, convention: &str, received: &Received, readings: &[Reading]) {
        let (Some(reading), Some(root)) = (
            readings.first(),
            self.conventions
                .get(convention)
                .and_then(|c| c.device_root(&received.topic)),
        ) else {
            return;
        };
        self.devices.learn(
            convention,
            root,
            (&reading.home, &reading.room, &reading.device),
            &received.client_id,
        );
    }

    fn event(
        &self,
        received: &Received,
        convention: &str,
        correlation_id: &str,
        reading: Reading,
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
        debug!(event_id = %event.id, correlation_id, device = %event.device, kind, "event decoded");
        Outgoing {
            subject: Subject::from(subject),
            payload: self.encoding.encode(&event),
            meta: Meta::Event { id: event.id, kind },
        }
    }

    /// Stores, in the background, an event the gateway observed itself
    /// rather than decoded from a publish (a failed login, a will that
    /// speaks for devices), convention `gateway`.
    pub(crate) fn store_own_event(
        &self,
        (home, room, device): (&str, &str, &str),
        client_id: &str,
        body: Body,
    ) {
        let id = uuid::Uuid::now_v7().to_string();
        let kind = body.kind();
        let subject = subject::event_subject(home, room, kind, device);
        let event = v1::Event {
            id: id.clone(),
            correlation_id: id.clone(),
            causation_id: String::new(),
            occurred_at: None,
            received_at: Some(timestamp(SystemTime::now())),
            source: Some(v1::Source {
                convention: "gateway".to_owned(),
                client_id: client_id.to_owned(),
                topic: String::new(),
            }),
            home: home.to_owned(),
            room: room.to_owned(),
            device: device.to_owned(),
            body: Some(body),
        };
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, self.encoding.content_type());
        map.insert(SCHEMA, v1::EVENT_SCHEMA);
        map.insert(EVENT_ID, id.as_str());
        map.insert(KIND, kind);
        map.insert(CORRELATION_ID, id.as_str());
        let payload = self.encoding.encode(&event);
        let js = self.js.clone();
        tokio::spawn(async move {
            let stored = match js.publish_with_headers(subject, map, payload).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = stored {
                warn!(%error, kind, "could not store the gateway's own event");
            }
        });
    }

    /// Whether a publish of `payload` on `topic` decodes to an availability
    /// event (a will on an availability topic does).
    pub(crate) fn is_availability(&self, topic: &str, payload: &[u8]) -> bool {
        matches!(
            self.conventions.decode(topic, payload).1,
            Ok(Decoded::Events(readings))
                if readings.iter().any(|r| matches!(r.body, Body::Availability(_)))
        )
    }

    /// Whether a publish of `payload` on `topic` decodes to events.
    pub(crate) fn decodes_to_events(&self, topic: &str, payload: &[u8]) -> bool {
        matches!(
            self.conventions.decode(topic, payload).1,
            Ok(Decoded::Events(_))
        )
    }

    /// The devices `client_id` last published for.
    pub(crate) fn devices_of(&self, client_id: &str, limit: usize) -> Vec<crate::devices::Place> {
        self.devices.of_client(client_id, limit)
    }

    pub(crate) fn count_qos0_drop(&self, error: &dyn std::fmt::Display) {
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
fn dead_letter(received: &Received, rejection: &Rejection) -> Outgoing {
    debug!(topic = %received.topic, reason = %rejection.reason, detail = %rejection.detail, "dead-lettered");
    Outgoing {
        subject: Subject::from(subject::dlq_subject(rejection.reason.as_str())),
        payload: received.payload.clone(),
        meta: Meta::DeadLetter {
            reason: rejection.reason.as_str(),
            detail: rejection.detail.clone(),
        },
    }
}

/// The longest event subject hearth publishes. nats-server refuses a
/// protocol line over 4 KiB (subject, reply subject and sizes) by closing
/// the connection, which would cut off every other device's publishes too.
const MAX_SUBJECT: usize = 1024;

/// Rejects readings whose subject would be too long for NATS.
fn check_subject_lengths(decoded: Decoded) -> Result<Decoded, Rejection> {
    if let Decoded::Events(readings) = &decoded {
        for reading in readings {
            // Escaping at most triples a name: short names need no check.
            let names = reading.home.len() + reading.room.len() + reading.device.len();
            if 3 * names + 64 <= MAX_SUBJECT {
                continue;
            }
            let subject = subject::event_subject(
                &reading.home,
                &reading.room,
                reading.body.kind(),
                &reading.device,
            );
            if subject.len() > MAX_SUBJECT {
                return Err(Rejection::new(
                    crate::conventions::RejectReason::NameTooLong,
                    format!(
                        "the subject would be {} bytes, more than the {MAX_SUBJECT} hearth allows",
                        subject.len()
                    ),
                ));
            }
        }
    }
    Ok(decoded)
}
