//! Commands downlink: `hearth.v1.Command`s stored in `HEARTH_COMMANDS` reach
//! devices over MQTT, on their convention's command topic and in its shape.
//!
//! The gateways of a cluster share one durable consumer, `hearth-gateway`,
//! so each command is handled once. A command is routed like any MQTT
//! publish (QoS 1) with a reply subject; the gateway whose client takes it
//! (PUBACK) answers there, and only then is the command acknowledged to
//! JetStream. Without an answer in `commands.delivery_timeout` it is sent
//! again, with a growing delay, until `commands.max_age` after it was issued:
//! then it is given up and dead-lettered (`undelivered`). A command older
//! than a newer one for the same device that was already sent is not sent
//! again (`superseded`): a light must end in the state last asked for.
//!
//! Which topic: the device's convention and topic as learned from its
//! reports (`crate::devices`); a device never seen gets the native
//! convention's `hearth/<home>/<room>/<device>/set`. Commands that are not
//! for devices (arming the alarm) are acknowledged and left to the house
//! rules. For a device with a persistent session subscribed to its command
//! topic, the command is queued in the session (`crate::sessions`) and
//! acknowledged once queued: it reaches the device when it is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::header::HeaderName;
use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::HeaderMap;
use futures::StreamExt;
use hearth_proto::{headers, v1, Encoding};
use rumqttc::QoS;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::broker::Router;
use crate::config::CommandsConfig;
use crate::conventions::Conventions;
use crate::devices::{Devices, Place};
use crate::jetstream::streams::COMMANDS_STREAM;
use crate::sessions::Sessions;
use crate::subject;

/// The durable consumer the gateways share.
pub(crate) const CONSUMER: &str = "hearth-gateway";
/// Commands waiting for a device's acknowledgement at once, per gateway.
const MAX_PENDING: usize = 1000;
const RETRY_MAX: Duration = Duration::from_secs(30);

const REASON: HeaderName = HeaderName::from_static(headers::REASON);
const DETAIL: HeaderName = HeaderName::from_static(headers::DETAIL);
const CORRELATION_ID: HeaderName = HeaderName::from_static(headers::CORRELATION_ID);
const CONTENT_TYPE: HeaderName = HeaderName::from_static(headers::CONTENT_TYPE);

/// Why a command is not delivered, as dead-letter reasons.
#[derive(Debug, Clone, Copy)]
enum GiveUp {
    BadCommand,
    Undelivered,
}

impl GiveUp {
    fn as_str(self) -> &'static str {
        match self {
            Self::BadCommand => "bad_command",
            Self::Undelivered => "undelivered",
        }
    }
}

struct Waiting {
    message: jetstream::Message,
    place: Place,
    deadline: Instant,
    issued: SystemTime,
}

pub(crate) struct Commands {
    js: jetstream::Context,
    router: Arc<Router>,
    devices: Arc<Devices>,
    sessions: Arc<Sessions>,
    conventions: Conventions,
    config: CommandsConfig,
    inbox: String,
    waiting: HashMap<u64, Waiting>,
    /// The stream sequence of the newest command sent to each device.
    newest: HashMap<Place, u64>,
}

impl Commands {
    /// Creates (or finds) the shared consumer; the returned future delivers
    /// until `shutdown`.
    pub(crate) async fn start(
        js: jetstream::Context,
        router: Arc<Router>,
        devices: Arc<Devices>,
        sessions: Arc<Sessions>,
        conventions: Conventions,
        config: CommandsConfig,
        shutdown: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, async_nats::Error> {
        let stream = js.get_stream(COMMANDS_STREAM).await?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    description: Some(
                        "hearth gateway: delivers hearth.v1.Command to devices over MQTT"
                            .to_owned(),
                    ),
                    filter_subject: subject::COMMANDS_SUBJECTS.to_owned(),
                    // Commands issued before any gateway ever ran are history,
                    // not work.
                    deliver_policy: consumer::DeliverPolicy::New,
                    ack_policy: consumer::AckPolicy::Explicit,
                    // Beyond the longest delivery attempt, so the server does
                    // not resend what is still being delivered.
                    ack_wait: config.delivery_timeout + Duration::from_secs(30),
                    max_ack_pending: i64::try_from(MAX_PENDING).unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await?;
        let messages = consumer.messages().await?;
        let client = js.client();
        let inbox = client.new_inbox();
        let confirmations = client.subscribe(format!("{inbox}.>")).await?;
        let commands = Self {
            js,
            router,
            devices,
            sessions,
            conventions,
            config,
            inbox,
            waiting: HashMap::new(),
            newest: HashMap::new(),
        };
        info!(consumer = CONSUMER, "delivering commands to devices");
        Ok(commands
            .run(messages, confirmations, shutdown)
            .instrument(info_span!("commands")))
    }

    async fn run(
        mut self,
        mut messages: consumer::pull::Stream,
        mut confirmations: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                message = messages.next() => match message {
                    Some(Ok(message)) => self.handle(message).await,
                    Some(Err(error)) => debug!(%error, "reading commands"),
                    None => {
                        warn!("the NATS client closed; commands are not delivered");
                        return;
                    }
                },
                confirmation = confirmations.next() => {
                    let Some(confirmation) = confirmation else { return };
                    // NATS answers "no responders" itself when nobody at all
                    // subscribes: not a delivery, the command waits.
                    if confirmation.status.is_none() {
                        self.confirmed(&confirmation.subject).await;
                    }
                }
                _ = tick.tick(), if !self.waiting.is_empty() => self.expire().await,
            }
        }
    }

    async fn handle(&mut self, message: jetstream::Message) {
        let Ok(info) = message.info() else {
            return;
        };
        let (sequence, delivered) = (info.stream_sequence, info.delivered);
        let published = SystemTime::from(info.published);
        let content_type = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(CONTENT_TYPE))
            .map(|value| value.as_str().to_owned());
        let command =
            match Encoding::decode_stored::<v1::Command>(content_type.as_deref(), &message.payload)
            {
                Ok(command) => command,
                Err(error) => {
                    let detail = format!("not a hearth.v1.Command: {error}");
                    self.give_up(&message, GiveUp::BadCommand, &detail, "")
                        .await;
                    return;
                }
            };
        let span = info_span!(
            "command",
            command_id = %command.id,
            correlation_id = %command.correlation_id,
            device = %command.device,
        );
        let place = Place {
            home: command.home.clone(),
            room: command.room.clone(),
            device: command.device.clone(),
        };
        let issued = command
            .issued_at
            .as_ref()
            .and_then(|at| {
                let seconds = u64::try_from(at.seconds).ok()?;
                let nanos = u32::try_from(at.nanos).ok()?;
                Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos))
            })
            .unwrap_or(published);
        async {
            if place.device.is_empty() {
                debug!("not for a device; left to the house rules");
                ack(&message, AckKind::Ack).await;
                return;
            }
            if delivered > 1
                && self
                    .newest
                    .get(&place)
                    .is_some_and(|&newest| newest > sequence)
            {
                info!("superseded by a newer command for the device; not sent again");
                ack(&message, AckKind::Term).await;
                return;
            }
            if age(issued) > self.config.max_age {
                let detail = format!(
                    "issued {:?} ago, more than commands.max_age ({:?})",
                    age(issued),
                    self.config.max_age
                );
                self.give_up(
                    &message,
                    GiveUp::Undelivered,
                    &detail,
                    &command.correlation_id,
                )
                .await;
                return;
            }
            let Some((topic, payload, device_client)) = self.encode(&place, &command) else {
                debug!("not a device command; left to the house rules");
                ack(&message, AckKind::Ack).await;
                return;
            };
            // Kept for a persistent session of the device, connected or not:
            // that is delivery as far as the command goes. (Other persistent
            // subscribers of the topic get their copy too.)
            let queued_for = match self
                .sessions
                .enqueue(
                    &topic,
                    payload.clone().into(),
                    QoS::AtLeastOnce,
                    &format!("hearth-command-{sequence}"),
                )
                .await
            {
                Ok(clients) => clients,
                Err(error) => {
                    warn!(%error, "could not queue the command for persistent sessions");
                    Vec::new()
                }
            };
            let kept = match &device_client {
                Some(client) => queued_for.iter().any(|queued| **queued == **client),
                None => !queued_for.is_empty(),
            };
            if kept {
                info!(topic, "command queued in the device's persistent session");
                if let Err(error) = self
                    .router
                    .publish(&topic, payload.into(), QoS::AtLeastOnce, &[])
                    .await
                {
                    debug!(%error, "live copy not routed");
                }
                self.newest.insert(place, sequence);
                ack(&message, AckKind::Ack).await;
                return;
            }
            let confirm = format!("{}.{sequence}", self.inbox);
            if let Err(error) = self
                .router
                .publish_confirmed(
                    &topic,
                    payload.into(),
                    QoS::AtLeastOnce,
                    confirm.into(),
                    device_client.as_deref(),
                )
                .await
            {
                warn!(%error, topic, "could not send the command; trying again");
            } else {
                debug!(topic, attempt = delivered, "command sent");
            }
            self.newest
                .entry(place.clone())
                .and_modify(|newest| *newest = (*newest).max(sequence))
                .or_insert(sequence);
            self.waiting.insert(
                sequence,
                Waiting {
                    message,
                    place,
                    deadline: Instant::now() + self.config.delivery_timeout,
                    issued,
                },
            );
        }
        .instrument(span)
        .await;
    }

    /// The device's command topic, the payload in its convention, and the
    /// client id it publishes with (when known: only its acknowledgement
    /// counts, not that of some other subscriber to the topic).
    fn encode(
        &self,
        place: &Place,
        command: &v1::Command,
    ) -> Option<(String, Vec<u8>, Option<String>)> {
        let (convention, root, client) = match self.devices.route(place) {
            Some(route) => (
                self.conventions.get(&route.convention)?,
                route.topic,
                Some(route.client_id).filter(|id| !id.is_empty()),
            ),
            None => {
                let native = self.conventions.fallback()?;
                let root = format!(
                    "{}/{}/{}/{}",
                    native.topic_root(),
                    place.home,
                    place.room,
                    place.device
                );
                (native, root, None)
            }
        };
        let payload = convention.command_payload(command)?;
        Some((format!("{root}/set"), payload, client))
    }

    async fn confirmed(&mut self, subject: &str) {
        let Some(sequence) = subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|token| token.parse::<u64>().ok())
        else {
            return;
        };
        if let Some(waiting) = self.waiting.remove(&sequence) {
            info!(device = %waiting.place.device, room = %waiting.place.room, "command delivered");
            ack(&waiting.message, AckKind::Ack).await;
        }
    }

    /// Sends again (through JetStream's redelivery) what was not confirmed
    /// in time, or gives it up when too old.
    async fn expire(&mut self) {
        let now = Instant::now();
        let overdue: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, waiting)| waiting.deadline <= now)
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in overdue {
            let Some(waiting) = self.waiting.remove(&sequence) else {
                continue;
            };
            if age(waiting.issued) + self.config.delivery_timeout > self.config.max_age {
                let detail = format!(
                    "no device took it within commands.max_age ({:?}); is {} {} {} connected and subscribed to its command topic?",
                    self.config.max_age, waiting.place.home, waiting.place.room, waiting.place.device
                );
                self.give_up(&waiting.message, GiveUp::Undelivered, &detail, "")
                    .await;
                continue;
            }
            let attempts = waiting.message.info().map_or(1, |info| info.delivered);
            let delay = Duration::from_secs(1 << attempts.clamp(0, 5)).min(RETRY_MAX);
            debug!(device = %waiting.place.device, ?delay, "command not acknowledged in time; sending again");
            ack(&waiting.message, AckKind::Nak(Some(delay))).await;
        }
    }

    /// Dead-letters a command with the reason, then stops its redelivery.
    async fn give_up(
        &self,
        message: &jetstream::Message,
        reason: GiveUp,
        detail: &str,
        correlation_id: &str,
    ) {
        warn!(reason = reason.as_str(), detail, subject = %message.subject, "command given up");
        let mut headers = HeaderMap::new();
        headers.insert(REASON, reason.as_str());
        headers.insert(DETAIL, &*headers::safe_value(detail));
        if !correlation_id.is_empty() {
            headers.insert(CORRELATION_ID, &*headers::safe_value(correlation_id));
        }
        if let Some(content_type) = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(CONTENT_TYPE))
        {
            headers.insert(CONTENT_TYPE, content_type.as_str());
        }
        let subject = subject::dlq_subject(reason.as_str());
        let stored = match self
            .js
            .publish_with_headers(subject, headers, message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = stored {
            warn!(%error, "could not dead-letter the command");
        }
        ack(message, AckKind::Term).await;
    }
}

fn age(issued: SystemTime) -> Duration {
    SystemTime::now().duration_since(issued).unwrap_or_default()
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        debug!(%error, "acknowledging a command to JetStream failed; it comes again");
    }
}
