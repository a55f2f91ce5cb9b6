//! Persistent MQTT sessions (clean session = false): their subscriptions
//! and the QoS 1/2 messages for them outlive the connection and the gateway.
//!
//! Shaped so that 10,000 sessions cost JetStream two streams and one
//! consumer per gateway, not one consumer per session:
//!
//! - `HEARTH_SESSIONS` keeps each session's state on
//!   `hearth.session.<client id>` (its subscriptions, and at disconnect what
//!   was in flight). Every gateway follows it, so every gateway knows every
//!   persistent subscription.
//! - `HEARTH_SESSION_QUEUE` keeps the messages for each session on
//!   `hearth.queue.<client id>`, at most `mqtt.max_session_queue` (oldest
//!   dropped). A QoS 1/2 publish matching a persistent subscription is
//!   written there by the publisher's store pipeline, before its PUBACK,
//!   whether the session's client is connected or not: nothing to get
//!   wrong when a client comes and goes.
//! - A connected session reads its queue in order from a cursor (one direct
//!   read per message), is woken by the gateway's one headers-only consumer
//!   over the whole queue stream, and purges what its client acknowledged.
//!   What was sent but not acknowledged when the client went away is sent
//!   again on its return, with DUP and its packet id.
//!
//! QoS 0 reaches a connected persistent session live, like any client, and
//! is not kept for an absent one (which MQTT allows).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use async_nats::jetstream::{self, consumer, stream::RawMessageErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::{parse_qos, Subscriptions};
use crate::jetstream::follow::follow;
use crate::jetstream::streams::{QUEUE_STREAM, SESSIONS_STREAM};
use crate::subject;

/// What `HEARTH_SESSIONS` keeps of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Filter → granted QoS (0, 1 or 2).
    pub(crate) subscriptions: BTreeMap<String, u8>,
    /// The last queue sequence sent to the client before it went away:
    /// what is still queued up to here is sent again with DUP.
    #[serde(default)]
    pub(crate) sent_through: u64,
    /// Queue sequence → packet id of what was in flight then, so that it is
    /// sent again under the same packet id.
    #[serde(default)]
    pub(crate) inflight: BTreeMap<u64, u16>,
    /// Packet ids of QoS 2 messages whose PUBREL was sent and whose PUBCOMP
    /// had not come: the PUBREL is sent again on return.
    #[serde(default)]
    pub(crate) released: std::collections::BTreeSet<u16>,
}

/// A message from a session's queue.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) sequence: u64,
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) user_properties: Vec<(String, String)>,
}

/// A connection of this gateway attached to a session: its number and
/// what wakes it.
type Attached = (u64, watch::Sender<u64>);

#[derive(Debug, Default)]
struct Known {
    records: HashMap<Arc<str>, Record>,
    /// The stream sequence of each client's latest known state (deleted
    /// ones too), so that a late copy of an older one is not applied.
    sequences: HashMap<Arc<str>, u64>,
    subscriptions: Subscriptions<Arc<str>>,
}

#[derive(Debug)]
pub(crate) struct Sessions {
    js: jetstream::Context,
    /// `HEARTH_SESSION_QUEUE`, for direct reads and purges.
    queue: jetstream::stream::Stream<()>,
    known: RwLock<Known>,
    /// Connected persistent sessions of this gateway: told the newest
    /// sequence of their queue. Keyed by client id, with the number of the
    /// connection that attached.
    woken: Mutex<HashMap<Arc<str>, Attached>>,
    attachments: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("cannot store the session state: {0}")]
    Save(String),
    #[error("cannot read the session queue: {0}")]
    Read(String),
    #[error("cannot purge the session queue: {0}")]
    Purge(String),
}

impl Sessions {
    /// Loads every session and follows `HEARTH_SESSIONS`; starts waking
    /// this gateway's sessions when their queue grows. Until `shutdown`.
    pub(crate) async fn load(
        js: &jetstream::Context,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, async_nats::Error> {
        let sessions = Arc::new(Self {
            js: js.clone(),
            queue: js.get_stream_no_info(QUEUE_STREAM).await?,
            known: RwLock::default(),
            woken: Mutex::default(),
            attachments: std::sync::atomic::AtomicU64::new(0),
        });
        let follower = Arc::clone(&sessions);
        follow(
            js,
            SESSIONS_STREAM,
            subject::SESSIONS_SUBJECTS,
            "hearth gateway: mirror of the persistent MQTT sessions",
            shutdown.clone(),
            move |message| follower.apply_message(message),
        )
        .await?;
        let queue = js.get_stream(QUEUE_STREAM).await?;
        let consumer = queue
            .create_consumer(consumer::pull::OrderedConfig {
                description: Some(
                    "hearth gateway: wakes its connected persistent sessions".to_owned(),
                ),
                filter_subject: subject::QUEUE_SUBJECTS.to_owned(),
                deliver_policy: consumer::DeliverPolicy::New,
                headers_only: true,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let waker = Arc::clone(&sessions);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => return,
                    message = messages.next() => message,
                };
                match message {
                    Some(Ok(message)) => waker.wake(&message),
                    Some(Err(error)) => debug!(%error, "following {QUEUE_STREAM}"),
                    None => return,
                }
            }
        });
        Ok(sessions)
    }

    fn apply_message(&self, message: &jetstream::Message) {
        let Some(client_id) = subject::subject_client_id(&message.subject) else {
            return;
        };
        let record = if message.payload.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Record>(&message.payload) {
                Ok(record) => Some(record),
                Err(error) => {
                    warn!(client_id, %error, "unreadable session state; ignored");
                    return;
                }
            }
        };
        let Ok(info) = message.info() else { return };
        self.apply(&client_id, record, info.stream_sequence);
    }

    /// Makes `record` (`None`: no session), stored at `sequence`, the known
    /// state of `client_id`, unless a later one is known.
    fn apply(&self, client_id: &str, record: Option<Record>, sequence: u64) {
        let mut known = self
            .known
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if known
            .sequences
            .get(client_id)
            .is_some_and(|known| *known >= sequence)
        {
            return;
        }
        known.sequences.insert(client_id.into(), sequence);
        let key: Arc<str> = known
            .records
            .get_key_value(client_id)
            .map_or_else(|| client_id.into(), |(key, _)| Arc::clone(key));
        if let Some(old) = known.records.remove(client_id) {
            for filter in old.subscriptions.keys() {
                known.subscriptions.remove(filter, Arc::clone(&key));
            }
        }
        if let Some(record) = record {
            for (filter, qos) in &record.subscriptions {
                known
                    .subscriptions
                    .insert(filter, Arc::clone(&key), qos_of(*qos));
            }
            known.records.insert(key, record);
        }
    }

    fn wake(&self, message: &jetstream::Message) {
        let Some(client_id) = subject::subject_client_id(&message.subject) else {
            return;
        };
        let Ok(info) = message.info() else { return };
        let woken = self
            .woken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, sender)) = woken.get(client_id.as_str()) {
            sender.send_if_modified(|newest| {
                let newer = info.stream_sequence > *newest;
                if newer {
                    *newest = info.stream_sequence;
                }
                newer
            });
        }
    }

    /// The stored state of `client_id`'s session, if it has one.
    pub(crate) fn get(&self, client_id: &str) -> Option<Record> {
        self.known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .records
            .get(client_id)
            .cloned()
    }

    /// Persistent sessions known.
    pub(crate) fn len(&self) -> usize {
        self.known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .records
            .len()
    }

    /// The sessions a publish of `topic` at `qos` is queued for, each with
    /// the QoS it is delivered at (1 or 2; QoS 0 is never queued).
    pub(crate) fn queued_for(&self, topic: &str, qos: QoS) -> Vec<(Arc<str>, QoS)> {
        if qos == QoS::AtMostOnce {
            return Vec::new();
        }
        let known = self
            .known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.records.is_empty() {
            return Vec::new();
        }
        known
            .subscriptions
            .matching(topic)
            .into_iter()
            .filter_map(|(client_id, granted)| {
                let effective = crate::broker::lower(qos, granted);
                (effective != QoS::AtMostOnce).then_some((client_id, effective))
            })
            .collect()
    }

    /// Queues a message that did not come from a client's publish (a
    /// command) for every persistent session subscribed to `topic`; returns
    /// their client ids, once stored. `id` makes a repeat of the same message a
    /// duplicate JetStream drops.
    pub(crate) async fn enqueue(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        id: &str,
    ) -> Result<Vec<Arc<str>>, SessionError> {
        let save = |e: String| SessionError::Save(e);
        let targets = self.queued_for(topic, qos);
        let mut acks = Vec::with_capacity(targets.len());
        for (client_id, qos) in &targets {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                hearth_proto::headers::MQTT_TOPIC,
                &*crate::broker::encode_property(topic),
            );
            headers.insert(
                hearth_proto::headers::MQTT_QOS,
                crate::broker::qos_digit(*qos),
            );
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{id}-{client_id}").as_str(),
            );
            let ack = self
                .js
                .publish_with_headers(subject::queue_subject(client_id), headers, payload.clone())
                .await
                .map_err(|e| save(e.to_string()))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| save(e.to_string()))?;
        }
        Ok(targets
            .into_iter()
            .map(|(client_id, _)| client_id)
            .collect())
    }

    /// Stores the state of `client_id`'s session; returns once stored.
    pub(crate) async fn save(&self, client_id: &str, record: &Record) -> Result<(), SessionError> {
        let payload = serde_json::to_vec(record).map_err(|e| SessionError::Save(e.to_string()))?;
        let sequence = self.store(client_id, payload.into()).await?;
        self.apply(client_id, Some(record.clone()), sequence);
        Ok(())
    }

    /// Ends `client_id`'s session: its state and queue are deleted.
    pub(crate) async fn discard(&self, client_id: &str) -> Result<(), SessionError> {
        // An empty message is the deletion: the last of its subject, it is
        // what every gateway following the stream sees.
        let sequence = self.store(client_id, Bytes::new()).await?;
        self.apply(client_id, None, sequence);
        self.queue
            .purge()
            .filter(subject::queue_subject(client_id))
            .await
            .map_err(|e| SessionError::Purge(e.to_string()))?;
        Ok(())
    }

    /// Stores a state of `client_id`'s session; its stream sequence.
    async fn store(&self, client_id: &str, payload: Bytes) -> Result<u64, SessionError> {
        let save = |e: String| SessionError::Save(e);
        let ack = self
            .js
            .publish(subject::session_subject(client_id), payload)
            .await
            .map_err(|e| save(e.to_string()))?
            .await
            .map_err(|e| save(e.to_string()))?;
        Ok(ack.sequence)
    }

    /// Tells this gateway's connection of `client_id` when its queue grows;
    /// the number to detach with.
    pub(crate) fn attach(&self, client_id: &Arc<str>) -> (watch::Receiver<u64>, u64) {
        let (sender, receiver) = watch::channel(0);
        let attachment = self
            .attachments
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.woken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(Arc::clone(client_id), (attachment, sender));
        (receiver, attachment)
    }

    /// Stops waking `attachment`, unless a newer connection of the same
    /// client attached since.
    pub(crate) fn detach(&self, client_id: &str, attachment: u64) {
        let mut woken = self
            .woken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if woken
            .get(client_id)
            .is_some_and(|(current, _)| *current == attachment)
        {
            woken.remove(client_id);
        }
    }

    /// The first message queued for `client_id` at sequence `from` or later.
    pub(crate) async fn next(
        &self,
        client_id: &str,
        from: u64,
    ) -> Result<Option<Queued>, SessionError> {
        let read = |e: String| SessionError::Read(e);
        let message = match self
            .queue
            .raw_message_builder()
            .next_by_subject(subject::queue_subject(client_id))
            .sequence(from.max(1))
            .send()
            .await
        {
            Ok(message) => message,
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(error) => return Err(read(error.to_string())),
        };
        let header = |name| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
        };
        let topic = header(hearth_proto::headers::MQTT_TOPIC)
            .and_then(|topic| subject::decode_token(&topic).ok())
            .unwrap_or_default();
        let qos = header(hearth_proto::headers::MQTT_QOS)
            .and_then(|qos| parse_qos(&qos))
            .unwrap_or(QoS::AtLeastOnce);
        let user_properties = crate::broker::user_properties(&message.headers);
        Ok(Some(Queued {
            sequence: message.sequence,
            topic: topic.into(),
            payload: message.payload,
            qos,
            user_properties,
        }))
    }

    /// Deletes `client_id`'s queued messages before sequence `below`: its
    /// client has them.
    pub(crate) async fn purge_below(
        &self,
        client_id: &str,
        below: u64,
    ) -> Result<(), SessionError> {
        let purge = |e: String| SessionError::Purge(e);
        self.queue
            .purge()
            .filter(subject::queue_subject(client_id))
            .sequence(below)
            .await
            .map_err(|e| purge(e.to_string()))?;
        Ok(())
    }
}

/// The QoS of a level as a record keeps it.
pub(crate) fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The level of a QoS as a record keeps it.
pub(crate) fn level_of(qos: QoS) -> u8 {
    qos as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_map_to_subjects_and_back() {
        for id in ["sensor-1", "Hall Lamp.2", "a*b>c", "ünï"] {
            assert_eq!(
                subject::subject_client_id(&subject::session_subject(id)).as_deref(),
                Some(id)
            );
            assert_eq!(
                subject::subject_client_id(&subject::queue_subject(id)).as_deref(),
                Some(id)
            );
        }
        assert_eq!(subject::subject_client_id("hearth.queue.a.b"), None);
        assert_eq!(subject::subject_client_id("hearth.evt.a"), None);
    }

    #[test]
    fn records_read_back_from_json_with_defaults() {
        let record: Record = serde_json::from_str(r#"{"subscriptions":{"a/#":1}}"#).unwrap();
        assert_eq!(record.subscriptions["a/#"], 1);
        assert_eq!(record.sent_through, 0);
        let mut full = record.clone();
        full.sent_through = 9;
        full.inflight.insert(8, 3);
        let json = serde_json::to_string(&full).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), full);
    }
}
