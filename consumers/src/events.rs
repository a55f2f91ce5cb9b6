//! Storing the rules' own events (an alarm state change, a notification
//! request, a delivery outcome) in `HEARTH_EVENTS`, idempotently.
//!
//! Each event is stored on `hearth.evt.<home>.<room>.<kind>.<device>` with
//! the same headers as a device event, so `nats stream view` and every other
//! rule read it alike, and with a `Nats-Msg-Id` the rule derives from what
//! caused it (the causing event's id and the action): handling the same
//! event again after a crash stores nothing new.

use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream;
use async_nats::HeaderMap;
use hearth_proto::v1::{self, event::Body};
use hearth_proto::{headers, subject, Encoding};

use crate::clock::Clock;

const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);
const SCHEMA: HeaderName = HeaderName::from_static(headers::SCHEMA);
const EVENT_ID: HeaderName = HeaderName::from_static(headers::EVENT_ID);
const KIND: HeaderName = HeaderName::from_static(headers::KIND);
const CORRELATION_ID: HeaderName = HeaderName::from_static(headers::CORRELATION_ID);

/// The room of events about a whole home (the alarm, notifications).
pub const HOME_ROOM: &str = "_home";

/// Where an event is about.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub home: &'a str,
    pub room: &'a str,
    pub device: &'a str,
}

/// What an emitted event follows from: its correlation id is carried on, its
/// id becomes the causation id.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cause {
    pub event_id: String,
    pub correlation_id: String,
}

impl Cause {
    pub fn of(event: &v1::Event) -> Self {
        Self {
            event_id: event.id.clone(),
            correlation_id: event.correlation_id.clone(),
        }
    }

    /// A new chain (a request from a person, not an event): a fresh
    /// correlation id and no causing event.
    pub fn fresh() -> Self {
        Self {
            event_id: String::new(),
            correlation_id: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// The causing event's id, or for a chain started by a request, its
    /// correlation id: what names the cause in dedup ids.
    pub fn event_id_or_correlation(&self) -> &str {
        if self.event_id.is_empty() {
            &self.correlation_id
        } else {
            &self.event_id
        }
    }

    /// As the minimal event [`crate::commands::Commands::issue`] takes.
    pub fn as_event(&self) -> v1::Event {
        v1::Event {
            id: self.event_id.clone(),
            correlation_id: self.correlation_id.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot store the {kind} event: {problem}")]
pub struct EmitError {
    kind: &'static str,
    problem: String,
}

/// What emitting came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emitted {
    /// Stored as a new event with this id.
    Stored(String),
    /// An event with the same dedup id was stored before.
    AlreadyStored,
}

/// Stores events for one rule.
#[derive(Debug, Clone)]
pub struct Events {
    js: jetstream::Context,
    encoding: Encoding,
    rule: String,
    clock: Clock,
}

impl Events {
    /// `rule` is the consumer's name, recorded as the events' source.
    pub fn new(js: jetstream::Context, encoding: Encoding, rule: &str, clock: Clock) -> Self {
        Self {
            js,
            encoding,
            rule: rule.to_owned(),
            clock,
        }
    }

    /// Stores `body` at `place` because of `cause`, once per `dedup_id`
    /// (within the stream's duplicate window).
    pub async fn emit(
        &self,
        place: Place<'_>,
        cause: &Cause,
        dedup_id: &str,
        body: Body,
    ) -> Result<Emitted, EmitError> {
        let kind = body.kind();
        let event = v1::Event {
            id: uuid::Uuid::now_v7().to_string(),
            correlation_id: if cause.correlation_id.is_empty() {
                uuid::Uuid::now_v7().to_string()
            } else {
                cause.correlation_id.clone()
            },
            causation_id: cause.event_id.clone(),
            occurred_at: None,
            received_at: Some(self.clock.timestamp()),
            home: place.home.to_owned(),
            room: place.room.to_owned(),
            device: place.device.to_owned(),
            source: Some(v1::Source {
                convention: self.rule.clone(),
                client_id: String::new(),
                topic: String::new(),
            }),
            body: Some(body),
        };
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, self.encoding.content_type());
        map.insert(SCHEMA, v1::EVENT_SCHEMA);
        map.insert(EVENT_ID, event.id.as_str());
        map.insert(KIND, kind);
        map.insert(CORRELATION_ID, event.correlation_id.as_str());
        map.insert(
            NATS_MESSAGE_ID,
            headers::safe_value(&format!("{}-{dedup_id}", self.rule)).as_ref(),
        );
        let subject = subject::event_subject(place.home, place.room, kind, place.device);
        let failed = |e: &dyn std::fmt::Display| EmitError {
            kind,
            problem: e.to_string(),
        };
        let ack = async {
            self.js
                .publish_with_headers(subject, map, self.encoding.encode(&event))
                .await
                .map_err(|e| failed(&e))?
                .await
                .map_err(|e| failed(&e))
        }
        .await;
        let outcome = match &ack {
            Ok(ack) if ack.duplicate => "duplicate",
            Ok(_) => "stored",
            Err(_) => "failed",
        };
        metrics::counter!(
            "hearth_rule_events_total",
            "rule" => self.rule.clone(),
            "kind" => kind,
            "outcome" => outcome
        )
        .increment(1);
        Ok(if ack?.duplicate {
            Emitted::AlreadyStored
        } else {
            Emitted::Stored(event.id)
        })
    }
}
