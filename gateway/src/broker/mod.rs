//! Publish/subscribe between MQTT clients, through NATS.
//!
//! Every publish a client makes is published on core NATS as
//! `hearth.mqtt.<topic levels>` (see [`crate::subject::mqtt_subject`]), its
//! QoS in the `Hearth-Mqtt-Qos` header. Each gateway listens on
//! `hearth.mqtt.>` once one of its clients subscribed, and hands each
//! message to its own clients whose subscriptions match, through a bounded
//! queue per client. So several gateways on one NATS cluster behave as one
//! broker, and a NATS application can talk to MQTT clients by publishing on
//! `hearth.mqtt.…` (QoS 0 unless it sets the header).
//!
//! The [`Router`] is the one place that knows every local subscription; a
//! connection holds a [`Mailbox`] (its subscriptions, removed when dropped)
//! and reads what is routed to it from the receiver that came with it. A
//! connection that does not keep up loses messages to its own full queue
//! (dropped, counted, logged), never holding up routing for the others.

mod retained;
mod subscriptions;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::header::HeaderName;
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures::StreamExt;
use rumqttc::QoS;
use tokio::sync::{mpsc, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::subject;
pub(crate) use retained::Retained;
pub(crate) use subscriptions::Subscriptions;

const QOS_HEADER: HeaderName = HeaderName::from_static(hearth_proto::headers::MQTT_QOS);
const USER_PROPERTY: HeaderName =
    HeaderName::from_static(hearth_proto::headers::MQTT_USER_PROPERTY);
const QUEUED: HeaderName = HeaderName::from_static(hearth_proto::headers::MQTT_QUEUED);
const CONFIRM_CLIENT: HeaderName = HeaderName::from_static(hearth_proto::headers::CONFIRM_CLIENT);

/// A message for one client, matching one or more of its subscriptions.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// Shared by every client the message goes to.
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    /// The lower of the publish's QoS and the subscription's.
    pub(crate) qos: QoS,
    /// Set only for retained messages sent because of a new subscription.
    pub(crate) retain: bool,
    /// MQTT 5 user properties of the publish (sent to MQTT 5 clients).
    pub(crate) user_properties: Vec<(String, String)>,
    /// Where to say that the client has the message (its PUBACK or PUBREC,
    /// or the write for QoS 0): the reply subject of a publish that asked,
    /// such as a command's.
    pub(crate) confirm: Option<Subject>,
}

/// Why routing a publish failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("topic {0:?} has no NATS subject")]
    Topic(String),
    #[error("publishing on NATS failed: {0}")]
    Publish(#[from] async_nats::PublishError),
}

#[derive(Debug)]
pub(crate) struct Router {
    client: Client,
    retained: Arc<Retained>,
    state: Mutex<State>,
    /// Set once this gateway listens on `hearth.mqtt.>`.
    listening: OnceCell<()>,
    max_queued: usize,
    next_mailbox: AtomicU64,
    subscriptions: AtomicUsize,
    dropped: AtomicU64,
    dropped_logged_at: Mutex<Option<Instant>>,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    subscriptions: Subscriptions<u64>,
    outboxes: HashMap<u64, Outbox>,
}

#[derive(Debug)]
struct Outbox {
    sender: mpsc::Sender<Delivery>,
    client_id: Arc<str>,
    /// A persistent session gets its QoS 1/2 messages from its queue
    /// (`crate::sessions`); only QoS 0 live.
    persistent: bool,
}

impl Router {
    pub(crate) fn new(
        client: Client,
        retained: Arc<Retained>,
        max_queued: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            retained,
            state: Mutex::default(),
            listening: OnceCell::new(),
            max_queued,
            next_mailbox: AtomicU64::new(0),
            subscriptions: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            dropped_logged_at: Mutex::new(None),
            shutdown,
        })
    }

    /// A mailbox for a client's subscriptions, and where what they match
    /// arrives.
    pub(crate) fn mailbox(
        self: &Arc<Self>,
        client_id: Arc<str>,
        persistent: bool,
    ) -> (Mailbox, mpsc::Receiver<Delivery>) {
        let id = self.next_mailbox.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(self.max_queued);
        self.state().outboxes.insert(
            id,
            Outbox {
                sender,
                client_id,
                persistent,
            },
        );
        let mailbox = Mailbox {
            router: Arc::clone(self),
            id,
            filters: HashSet::new(),
        };
        (mailbox, receiver)
    }

    /// The retained messages.
    pub(crate) fn retained(&self) -> &Retained {
        &self.retained
    }

    /// Subscriptions of this gateway's clients.
    pub(crate) fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Messages dropped since start because a client's queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Routes a client's publish to every subscriber of `topic`, on every
    /// gateway of the cluster. Returns once the NATS client took it.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        user_properties: &[(String, String)],
    ) -> Result<(), RouteError> {
        let subject =
            subject::mqtt_subject(topic).ok_or_else(|| RouteError::Topic(topic.into()))?;
        if qos == QoS::AtMostOnce && user_properties.is_empty() {
            self.client.publish(subject, payload).await?;
        } else {
            let mut headers = qos_headers(qos);
            add_user_properties(&mut headers, user_properties);
            self.client
                .publish_with_headers(subject, headers, payload)
                .await?;
        }
        Ok(())
    }

    /// Like [`Router::publish`], asking the gateway of a subscriber to say
    /// on `confirm` once the subscriber has the message: `client_id`'s only
    /// when given, else the first to have it (nobody answers when nobody
    /// subscribes).
    pub(crate) async fn publish_confirmed(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        confirm: Subject,
        client_id: Option<&str>,
    ) -> Result<(), RouteError> {
        let subject =
            subject::mqtt_subject(topic).ok_or_else(|| RouteError::Topic(topic.into()))?;
        let mut headers = qos_headers(qos);
        if let Some(client_id) = client_id {
            headers.insert(CONFIRM_CLIENT, &*encode_property(client_id));
        }
        self.client
            .publish_with_reply_and_headers(subject, confirm, headers, payload)
            .await?;
        Ok(())
    }

    /// Says on `confirm` that a subscriber has a message.
    pub(crate) async fn confirm(&self, confirm: Subject) {
        if let Err(error) = self.client.publish(confirm, Bytes::new()).await {
            debug!(%error, "confirming a delivery failed");
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes this gateway to `hearth.mqtt.>` the first time a client
    /// subscribes, and returns once the NATS server knows, so that a
    /// publish made after the SUBACK is not missed.
    async fn listen(self: &Arc<Self>) -> Result<(), async_nats::Error> {
        self.listening
            .get_or_try_init(|| async {
                let messages = self.client.subscribe(subject::MQTT_SUBJECTS).await?;
                round_trip(&self.client).await?;
                tokio::spawn(Arc::clone(self).dispatch(messages));
                Ok::<_, async_nats::Error>(())
            })
            .await?;
        Ok(())
    }

    async fn dispatch(self: Arc<Self>, mut messages: async_nats::Subscriber) {
        loop {
            let message = tokio::select! {
                () = self.shutdown.cancelled() => return,
                message = messages.next() => message,
            };
            let Some(message) = message else {
                warn!("the NATS client closed; MQTT routing stops");
                return;
            };
            let topic = match subject::subject_topic(&message.subject) {
                Ok(topic) => topic,
                Err(error) => {
                    debug!(subject = %message.subject, %error, "not routed");
                    continue;
                }
            };
            let qos = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(QOS_HEADER))
                .and_then(|value| parse_qos(value.as_str()))
                .unwrap_or(QoS::AtMostOnce);
            let headers = message.headers.as_ref();
            let properties = headers.map(user_properties).unwrap_or_default();
            let queued = headers.is_some_and(|headers| headers.get(QUEUED).is_some());
            let confirm = message.reply.map(|reply| {
                let only = headers
                    .and_then(|headers| headers.get(CONFIRM_CLIENT))
                    .and_then(|client| subject::decode_token(client.as_str()).ok());
                (reply, only)
            });
            self.deliver(
                topic.into(),
                message.payload,
                qos,
                confirm,
                queued,
                &properties,
            );
        }
    }

    /// Queues a message for every local subscriber of `topic`.
    fn deliver(
        &self,
        topic: Arc<str>,
        payload: Bytes,
        qos: QoS,
        confirm: Option<(Subject, Option<String>)>,
        queued: bool,
        properties: &[(String, String)],
    ) {
        let state = self.state();
        for (id, granted) in state.subscriptions.matching(&topic) {
            let Some(outbox) = state.outboxes.get(&id) else {
                continue;
            };
            let qos = lower(qos, granted);
            if outbox.persistent && qos != QoS::AtMostOnce && queued {
                // Comes through the session's queue.
                continue;
            }
            let confirm = confirm.as_ref().and_then(|(reply, only)| {
                only.as_deref()
                    .is_none_or(|only| only == &*outbox.client_id)
                    .then(|| reply.clone())
            });
            let delivery = Delivery {
                topic: Arc::clone(&topic),
                payload: payload.clone(),
                qos,
                retain: false,
                user_properties: properties.to_vec(),
                confirm,
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = outbox.sender.try_send(delivery) {
                self.count_drop(&outbox.client_id, &topic);
            }
        }
    }

    fn count_drop(&self, client_id: &str, topic: &str) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged_at = self
            .dropped_logged_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // One line per 10 s at most: a stuck subscriber must not flood the log.
        if logged_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *logged_at = Some(Instant::now());
            warn!(
                client_id,
                topic,
                dropped_total = dropped,
                "a client's queue is full (mqtt.max_queued): message for it dropped"
            );
        }
    }
}

/// A client's subscriptions; dropping it removes them.
#[derive(Debug)]
pub(crate) struct Mailbox {
    router: Arc<Router>,
    id: u64,
    filters: HashSet<String>,
}

impl Mailbox {
    /// Adds or replaces the subscription to `filter` (a valid filter) and
    /// returns once messages published from now on will arrive.
    pub(crate) async fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
    ) -> Result<(), async_nats::Error> {
        self.router.listen().await?;
        self.router
            .state()
            .subscriptions
            .insert(filter, self.id, qos);
        if self.filters.insert(filter.to_owned()) {
            self.router.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes the subscription to `filter`, if there is one.
    pub(crate) fn unsubscribe(&mut self, filter: &str) {
        if self.filters.remove(filter) {
            self.router.state().subscriptions.remove(filter, self.id);
            self.router.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let mut state = self.router.state();
        for filter in &self.filters {
            state.subscriptions.remove(filter, self.id);
        }
        state.outboxes.remove(&self.id);
        self.router
            .subscriptions
            .fetch_sub(self.filters.len(), Ordering::Relaxed);
    }
}

/// Returns once the NATS server has processed everything this client sent
/// before (`flush` only empties the client's own buffer): a request nobody
/// answers, which the server itself answers with "no responders", in order.
async fn round_trip(client: &Client) -> Result<(), async_nats::Error> {
    match client.request(client.new_inbox(), Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Adds MQTT 5 user properties as `Hearth-Mqtt-User-Property: name=value`
/// headers, one per property, both parts percent-encoded where they hold
/// `%`, `=` or control characters (so any property round-trips).
pub(crate) fn add_user_properties(headers: &mut HeaderMap, properties: &[(String, String)]) {
    for (name, value) in properties {
        headers.append(
            USER_PROPERTY,
            format!("{}={}", encode_property(name), encode_property(value)).as_str(),
        );
    }
}

/// The MQTT 5 user properties in `headers`, in order.
pub(crate) fn user_properties(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .get_all(USER_PROPERTY)
        .filter_map(|value| {
            let (name, value) = value.as_str().split_once('=')?;
            Some((
                subject::decode_token(name).ok()?,
                subject::decode_token(value).ok()?,
            ))
        })
        .collect()
}

/// `text` with `%`, `=` and control characters percent-encoded: safe in a
/// NATS header value, and back with `subject::decode_token`.
pub(crate) fn encode_property(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(|c: char| c == '%' || c == '=' || c.is_control()) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '%' || c == '=' || c.is_control() {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// The QoS header; for QoS 1/2 also the mark that persistent sessions got
/// their copy through their queue (every gateway publish queues it).
fn qos_headers(qos: QoS) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(QOS_HEADER, qos_digit(qos));
    if qos != QoS::AtMostOnce {
        headers.insert(QUEUED, "1");
    }
    headers
}

/// The lower of two QoS levels: what a subscriber granted `b` gets of a
/// message published at `a` (rumqttc's `QoS` has no `Ord`).
pub(crate) fn lower(a: QoS, b: QoS) -> QoS {
    if b < a {
        b
    } else {
        a
    }
}

pub(crate) fn qos_digit(qos: QoS) -> &'static str {
    match qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    }
}

pub(crate) fn parse_qos(digit: &str) -> Option<QoS> {
    match digit.trim() {
        "0" => Some(QoS::AtMostOnce),
        "1" => Some(QoS::AtLeastOnce),
        "2" => Some(QoS::ExactlyOnce),
        _ => None,
    }
}
