//! Issuing `hearth.v1.Command`s from a rule, idempotently.
//!
//! A command is stored in `HEARTH_COMMANDS` on
//! `hearth.cmd.<home>.<room>.<kind>.<device>` with a `Nats-Msg-Id` made of
//! the causing event's id and the rule's name for the action: if the rule
//! handles the same event again (a redelivery after a crash), JetStream
//! drops the second copy within its duplicate window, so the device is not
//! told twice. The command carries the event's correlation id and the event
//! id as its causation id, so the chain reads back from the log.

use std::time::SystemTime;

use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream;
use async_nats::HeaderMap;
use hearth_proto::v1::{self, command};
use hearth_proto::{headers, subject, Encoding};

const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);
const SCHEMA: HeaderName = HeaderName::from_static(headers::SCHEMA);
const EVENT_ID: HeaderName = HeaderName::from_static(headers::EVENT_ID);
const KIND: HeaderName = HeaderName::from_static(headers::KIND);
const CORRELATION_ID: HeaderName = HeaderName::from_static(headers::CORRELATION_ID);

/// Where a command goes: a device, or a whole home (`device` empty).
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub home: &'a str,
    pub room: &'a str,
    pub device: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("cannot store the command: {0}")]
    Store(String),
}

/// What issuing came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// Stored, with this command id.
    Stored { command_id: String },
    /// The same action for the same event was stored before: not again.
    AlreadyIssued,
}

#[derive(Debug, Clone)]
pub struct Commands {
    js: jetstream::Context,
    encoding: Encoding,
}

impl Commands {
    pub fn new(js: jetstream::Context, encoding: Encoding) -> Self {
        Self { js, encoding }
    }

    /// Issues `body` to `target` because of `cause`. `action` tells apart
    /// the commands one event causes (`"light-on:hall-ceiling"`); the same
    /// event and action are stored once.
    pub async fn issue(
        &self,
        cause: &v1::Event,
        target: Target<'_>,
        action: &str,
        body: command::Body,
    ) -> Result<Issued, IssueError> {
        let kind = body.kind();
        let command = v1::Command {
            id: uuid::Uuid::now_v7().to_string(),
            correlation_id: cause.correlation_id.clone(),
            causation_id: cause.id.clone(),
            issued_at: Some(now()),
            home: target.home.to_owned(),
            room: target.room.to_owned(),
            device: target.device.to_owned(),
            body: Some(body),
        };
        let subject = subject::command_subject(
            target.home,
            target.room,
            kind,
            if target.device.is_empty() {
                "_home"
            } else {
                target.device
            },
        );
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, self.encoding.content_type());
        map.insert(SCHEMA, "hearth.v1.Command");
        map.insert(EVENT_ID, command.id.as_str());
        map.insert(KIND, kind);
        map.insert(CORRELATION_ID, cause.correlation_id.as_str());
        map.insert(
            NATS_MESSAGE_ID,
            format!("cmd-{}-{}", cause.id, action).as_str(),
        );
        let ack = async {
            self.js
                .publish_with_headers(subject, map, self.encoding.encode(&command))
                .await
                .map_err(|e| IssueError::Store(e.to_string()))?
                .await
                .map_err(|e| IssueError::Store(e.to_string()))
        }
        .await;
        let outcome = match &ack {
            Ok(ack) if ack.duplicate => "duplicate",
            Ok(_) => "stored",
            Err(_) => "failed",
        };
        metrics::counter!("hearth_commands_total", "kind" => kind, "outcome" => outcome)
            .increment(1);
        Ok(if ack?.duplicate {
            Issued::AlreadyIssued
        } else {
            Issued::Stored {
                command_id: command.id,
            }
        })
    }
}

fn now() -> pbjson_types::Timestamp {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}
