//! Bridge mode: for homes that already run an MQTT broker (Mosquitto), the
//! gateway is one of its clients instead of (or besides) being the devices'
//! server.
//!
//! The bridge subscribes to `bridge.topics` at QoS 1 with a persistent
//! session (clean session off, a stable client id) and manual
//! acknowledgements: each message goes through the same store pipeline as a
//! device's publish and is acknowledged to the broker only once JetStream
//! stored it. What the gateway has not acknowledged, the broker keeps and
//! sends again (DUP) after a reconnect or a gateway restart, and the
//! exactly-once ids (`jetstream::dedup`) store it once.
//!
//! Acknowledgements belong to one connection: a message received on an
//! earlier connection is not acknowledged on a later one, since the broker
//! sends it again anyway and the packet id may by then name another message.
//!
//! Retained messages the broker sends because of a subscription are stored
//! only when the subscription is new (no session on the broker yet): after
//! a restart they are old states, not events.
//!
//! The other way, the gateway's own publishes on `bridge.forward` (commands
//! to devices, routed like any MQTT publish) are published on the broker at
//! QoS 1, and confirmed to the commands downlink only once the broker
//! acknowledged them (its PUBACK): one the gateway dies before that is sent
//! again by the downlink, not lost. A topic that decodes to events is never
//! forwarded: it would come back through `bridge.topics` and be stored
//! twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::broker::{Delivery, Router};
use crate::config::{BridgeConfig, Broker};
use crate::ingest::{Done, Ingest, Pipeline, Received};

/// The bridge's connection state, 1 when connected to the broker.
pub(crate) const CONNECTED: &str = "hearth_gateway_bridge_connected";
/// Messages received from the broker, by what became of them.
pub(crate) const RECEIVED: &str = "hearth_gateway_bridge_received_total";
/// The gateway's publishes forwarded to the broker (commands), counted when
/// the broker acknowledged them.
pub(crate) const FORWARDED: &str = "hearth_gateway_bridge_forwarded_total";

/// The gateway's publishes waiting for the broker connection.
const FORWARD_QUEUE: usize = 1024;
/// The longest pause between connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How long a stopping bridge waits for what it is storing, so that it can
/// acknowledge it rather than have the broker send it again.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot subscribe on NATS for JetStream replies: {0}")]
    Pipeline(#[from] async_nats::SubscribeError),
    #[error("cannot listen for the gateway's publishes to forward: {0}")]
    Forward(async_nats::Error),
}

/// The TLS client configuration for an `mqtts://` broker; `None` without
/// TLS (or without a bridge).
pub(crate) fn tls_config(
    config: &BridgeConfig,
) -> Result<Option<Arc<tokio_rustls::rustls::ClientConfig>>, crate::mqtt::tls::TlsError> {
    if !matches!(config.broker(), Ok(Some(Broker { tls: true, .. }))) {
        return Ok(None);
    }
    let client = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
    crate::mqtt::tls::client_config(config.tls_ca.as_deref(), client).map(Some)
}

/// Whether `filter` is an MQTT topic filter: not empty, `#` only as the
/// whole last level, `+` only as a whole level.
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels
        .iter()
        .enumerate()
        .all(|(index, level)| match *level {
            "#" => index == levels.len() - 1,
            "+" => true,
            level => !level.contains(['#', '+']),
        })
}

/// What the broker connection reports to the bridge.
#[derive(Debug)]
enum FromBroker {
    Connected {
        session_present: bool,
    },
    Publish(Publish),
    /// The broker acknowledged one of the gateway's publishes; where to
    /// confirm it, if anywhere.
    Forwarded(Option<async_nats::Subject>),
    Lost,
}

/// The forwarded publishes the broker has not acknowledged yet, with where
/// to confirm each once it has. rumqttc picks the packet id when it sends a
/// publish, in the order publishes were handed to it; only the task that
/// polls the connection hands publishes over, so it knows which ones a
/// lost connection took with it.
#[derive(Debug, Default)]
struct Forwarded {
    /// Handed to the broker connection, not sent yet, in order.
    handed: VecDeque<Option<async_nats::Subject>>,
    /// Sent, by packet id.
    sent: HashMap<u16, Option<async_nats::Subject>>,
    /// After a reconnect that found no session, rumqttc has dropped what
    /// it had not sent or not got acknowledged, but may still report sends
    /// made before: those are ignored, and nothing new is handed over,
    /// until no such report is left.
    purging: bool,
}

impl Forwarded {
    fn hand_over(&mut self, client: &AsyncClient, forward: Delivery) {
        match client.try_publish(
            &*forward.topic,
            QoS::AtLeastOnce,
            false,
            forward.payload.to_vec(),
        ) {
            Ok(()) => self.handed.push_back(forward.confirm),
            Err(error) => warn!(topic = %forward.topic, %error, "not forwarded to the broker"),
        }
    }

    fn sent(&mut self, pkid: u16) {
        // A packet id still unacknowledged is a publish sent again.
        if !self.purging && !self.sent.contains_key(&pkid) {
            if let Some(confirm) = self.handed.pop_front() {
                self.sent.insert(pkid, confirm);
            }
        }
    }

    /// The publish `pkid` is acknowledged: whether it was one of ours, and
    /// where to confirm it.
    fn acked(&mut self, pkid: u16) -> Option<Option<async_nats::Subject>> {
        self.sent.remove(&pkid)
    }

    /// The broker kept no session: what was handed over is gone, left
    /// unconfirmed (the commands downlink sends it again).
    fn session_lost(&mut self) {
        if !self.handed.is_empty() || !self.sent.is_empty() {
            warn!(
                dropped = self.handed.len() + self.sent.len(),
                "the broker kept no session: forwarded publishes it had not acknowledged are \
                 sent again by whoever sent them"
            );
        }
        self.handed.clear();
        self.sent.clear();
        self.purging = true;
    }

    /// Ends purging once the connection has no earlier send left to report.
    fn check_purged(&mut self, eventloop: &EventLoop) {
        if self.purging {
            self.purging = eventloop
                .state
                .events
                .iter()
                .any(|event| matches!(event, Event::Outgoing(Outgoing::Publish(_))));
        }
    }
}

/// A bridge to one broker, ready to [`Bridge::run`].
pub(crate) struct Bridge {
    config: BridgeConfig,
    broker: Broker,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    max_packet_size: usize,
    ingest: Arc<Ingest>,
    router: Arc<Router>,
    shutdown: CancellationToken,
    jobs: mpsc::Sender<Received>,
    done: mpsc::Receiver<Done>,
    pipeline: tokio::task::JoinHandle<()>,
    stop_pipeline: CancellationToken,
    forward: (crate::broker::Mailbox, mpsc::Receiver<Delivery>),
    /// The client id, as the pipeline's publishes carry it.
    client_id: Arc<str>,
    /// `bridge{broker, client_id}`, for the pipeline and the bridge's own logs.
    span: tracing::Span,
}

impl Bridge {
    /// Sets up the store pipeline and the forwarding subscriptions; the
    /// broker connection is made by [`Bridge::run`], and made again
    /// whenever it is lost.
    pub(crate) async fn start(
        config: BridgeConfig,
        broker: Broker,
        tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
        max_packet_size: usize,
        ingest: Arc<Ingest>,
        router: Arc<Router>,
        shutdown: CancellationToken,
    ) -> Result<Self, BridgeError> {
        let client_id: Arc<str> = Arc::from(config.client_id.as_str());
        let span = info_span!("bridge", broker = %broker, client_id = %client_id);
        let stop_pipeline = CancellationToken::new();
        let (jobs, done, pipeline) = Pipeline::spawn(
            Arc::clone(&ingest),
            config.max_inflight,
            stop_pipeline.clone(),
            span.clone(),
        )
        .await?;
        let (mut mailbox, deliveries) = router.mailbox(Arc::clone(&client_id), false);
        for filter in &config.forward {
            mailbox
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .map_err(BridgeError::Forward)?;
        }
        Ok(Self {
            config,
            broker,
            tls,
            max_packet_size,
            ingest,
            router,
            shutdown,
            jobs,
            done,
            pipeline,
            stop_pipeline,
            forward: (mailbox, deliveries),
            client_id,
            span,
        })
    }

    /// Runs until the gateway stops.
    pub(crate) async fn run(self) {
        let span = self.span.clone();
        self.serve().instrument(span).await;
    }

    fn options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(
            &self.config.client_id,
            self.broker.host.as_str(),
            self.broker.port,
        );
        if let Some(tls) = &self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
            ));
        }
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(self.config.keep_alive)
            .set_max_packet_size(self.max_packet_size, self.max_packet_size);
        if let Some(username) = &self.config.username {
            options.set_credentials(
                username.as_str(),
                self.config.password.clone().unwrap_or_default(),
            );
        }
        options
    }

    async fn serve(mut self) {
        // Acknowledgements and forwarded publishes are handed over without
        // waiting (see below): room for all of them.
        let (client, eventloop) =
            AsyncClient::new(self.options(), 2 * self.config.max_inflight + 64);
        let (events_tx, mut events) = mpsc::channel(64);
        let (forwards, forwards_rx) = mpsc::channel(FORWARD_QUEUE);
        let poller = tokio::spawn(
            poll(
                eventloop,
                client.clone(),
                events_tx,
                forwards_rx,
                self.shutdown.clone(),
            )
            .instrument(tracing::Span::current()),
        );
        // Which connection each publish in the pipeline came on, in order.
        let mut came_on: VecDeque<u64> = VecDeque::new();
        let mut connection = 0u64;
        let mut connected = false;
        let mut subscribed_once = false;
        let mut fresh_subscription = false;
        // A publish waiting for room in the pipeline.
        let mut waiting: Option<Received> = None;
        let mut unsent_acks: VecDeque<Publish> = VecDeque::new();
        let mut retry = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                settled = self.done.recv() => {
                    let Some(settled) = settled else {
                        warn!("the store pipeline stopped; the bridge stops");
                        break;
                    };
                    let on = came_on.pop_front();
                    if settled.qos != QoS::AtMostOnce && on == Some(connection) && connected {
                        unsent_acks.push_back(ack_of(settled));
                        send_acks(&client, &mut unsent_acks);
                    }
                }
                permit = self.jobs.reserve(), if waiting.is_some() => {
                    let Ok(permit) = permit else { break };
                    if let Some(received) = waiting.take() {
                        came_on.push_back(connection);
                        permit.send(received);
                    }
                }
                event = events.recv(), if waiting.is_none() => {
                    match event {
                        None => break,
                        Some(FromBroker::Connected { session_present }) => {
                            connection += 1;
                            connected = true;
                            metrics::gauge!(CONNECTED).set(1.0);
                            unsent_acks.clear();
                            info!(session_present, "connected to the broker");
                            // Subscribing again re-sends the retained messages,
                            // so only when the broker forgot the session or
                            // this process has not subscribed yet (the filters
                            // may have changed).
                            if !session_present || !subscribed_once {
                                fresh_subscription = !session_present;
                                let filters = self.config.topics.iter().map(|filter| {
                                    rumqttc::SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce)
                                });
                                match client.try_subscribe_many(filters) {
                                    Ok(()) => subscribed_once = true,
                                    Err(error) => warn!(%error, "cannot subscribe on the broker"),
                                }
                            }
                        }
                        Some(FromBroker::Lost) => {
                            connected = false;
                            metrics::gauge!(CONNECTED).set(0.0);
                        }
                        Some(FromBroker::Publish(publish)) => {
                            waiting = self.received(publish, fresh_subscription, &client, &mut unsent_acks);
                        }
                        Some(FromBroker::Forwarded(confirm)) => {
                            metrics::counter!(FORWARDED).increment(1);
                            if let Some(confirm) = confirm {
                                self.router.confirm(confirm).await;
                            }
                        }
                    }
                }
                delivery = self.forward.1.recv() => {
                    let Some(delivery) = delivery else { break };
                    self.forward(delivery, &forwards);
                }
                _ = retry.tick(), if !unsent_acks.is_empty() => send_acks(&client, &mut unsent_acks),
            }
        }
        self.stop(&client, &mut came_on, connection, connected)
            .await;
        let _ = poller.await;
    }

    /// A publish from the broker, as the pipeline takes it; `None` for one
    /// that is not stored (acknowledged here).
    fn received(
        &self,
        publish: Publish,
        fresh_subscription: bool,
        client: &AsyncClient,
        unsent_acks: &mut VecDeque<Publish>,
    ) -> Option<Received> {
        let skip = if publish.retain && !fresh_subscription {
            Some("retained (an old state, sent again because of a re-subscription)")
        } else if publish.qos == QoS::ExactlyOnce {
            // Subscribed at QoS 1, so the broker sends at most that.
            Some("QoS 2 from the broker")
        } else {
            None
        };
        if let Some(why) = skip {
            debug!(topic = %publish.topic, why, "not stored");
            metrics::counter!(RECEIVED, "outcome" => "skipped").increment(1);
            if publish.qos != QoS::AtMostOnce {
                unsent_acks.push_back(publish);
                send_acks(client, unsent_acks);
            }
            return None;
        }
        metrics::counter!(RECEIVED, "outcome" => "stored").increment(1);
        Some(Received {
            budget: None,
            client_id: Arc::clone(&self.client_id),
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            pkid: publish.pkid,
            dup: publish.dup,
            // The broker keeps its retained messages; the gateway's router
            // does not mirror them.
            retain: false,
            user_properties: Vec::new(),
            received_at: SystemTime::now(),
        })
    }

    /// Passes one of the gateway's own publishes to the task that polls the
    /// broker connection (which drops it while not connected); it is
    /// confirmed once the broker acknowledged it. One that goes nowhere is
    /// not confirmed: the commands downlink sends it again.
    fn forward(&self, delivery: Delivery, forwards: &mpsc::Sender<Delivery>) {
        if self
            .ingest
            .decodes_to_events(&delivery.topic, &delivery.payload)
        {
            warn!(topic = %delivery.topic, "not forwarded: it is a device event topic, and would be stored twice (bridge.forward should name command topics)");
            return;
        }
        // rumqttc would fail the connection on it, and again on every
        // reconnect.
        if delivery.topic.len() + delivery.payload.len() + 16 > self.max_packet_size {
            warn!(topic = %delivery.topic, bytes = delivery.payload.len(), max_packet_size = self.max_packet_size, "not forwarded: too large for mqtt.max_packet_size");
            return;
        }
        if let Err(error) = forwards.try_send(delivery) {
            warn!(%error, "not forwarded to the broker: too many waiting");
        }
    }

    /// Lets the pipeline finish what it is storing and acknowledges it, then
    /// disconnects.
    async fn stop(
        mut self,
        client: &AsyncClient,
        came_on: &mut VecDeque<u64>,
        connection: u64,
        connected: bool,
    ) {
        drop(self.jobs);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(settled) = self.done.recv().await {
                if settled.qos != QoS::AtMostOnce
                    && came_on.pop_front() == Some(connection)
                    && connected
                {
                    // Waiting is fine now: nothing else needs the loop.
                    let _ = client.ack(&ack_of(settled)).await;
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!("the bridge did not finish storing in time; the broker will send the rest again");
        }
        self.stop_pipeline.cancel();
        if tokio::time::timeout(Duration::from_secs(1), &mut self.pipeline)
            .await
            .is_err()
        {
            self.pipeline.abort();
        }
        let _ = client.disconnect().await;
        metrics::gauge!(CONNECTED).set(0.0);
    }
}

/// What acknowledges `settled` to the broker: rumqttc's PUBACK needs only
/// the packet id and QoS of the publish.
fn ack_of(settled: Done) -> Publish {
    let mut ack = Publish::from_bytes(settled.topic, settled.qos, bytes::Bytes::new());
    ack.pkid = settled.pkid;
    ack
}

/// Hands waiting acknowledgements to the broker connection without waiting;
/// what does not fit now is tried again shortly.
fn send_acks(client: &AsyncClient, unsent: &mut VecDeque<Publish>) {
    while let Some(publish) = unsent.front() {
        if client.try_ack(publish).is_err() {
            return;
        }
        unsent.pop_front();
    }
}

/// Drives the broker connection, reconnecting with a growing pause, and
/// reports what matters to the bridge. Hands over the gateway's publishes
/// for the broker (`forwards`) itself, while a poll is under way but never
/// inside one, so that it knows which of them a lost connection dropped.
async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::Sender<FromBroker>,
    mut forwards: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
) {
    let mut pause = Duration::from_millis(500);
    let mut failures = 0u32;
    let mut forwarded = Forwarded::default();
    let mut connected = false;
    loop {
        forwarded.check_purged(&eventloop);
        let polled = {
            // Never dropped half-way (rumqttc's poll is not cancel-safe),
            // except to stop.
            let poll = eventloop.poll();
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break None,
                    polled = &mut poll => break Some(polled),
                    forward = forwards.recv(), if !forwarded.purging => match forward {
                        Some(forward) if connected => forwarded.hand_over(&client, forward),
                        Some(forward) => {
                            debug!(topic = %forward.topic, "not forwarded: the broker is not connected");
                        }
                        None => break None,
                    },
                }
            }
        };
        let Some(polled) = polled else {
            // Let the disconnect the bridge sends go out.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
            return;
        };
        let report = match polled {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                pause = Duration::from_millis(500);
                failures = 0;
                connected = true;
                if !connack.session_present {
                    forwarded.session_lost();
                }
                FromBroker::Connected {
                    session_present: connack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => FromBroker::Publish(publish),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                forwarded.sent(pkid);
                continue;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => match forwarded.acked(ack.pkid) {
                Some(confirm) => FromBroker::Forwarded(confirm),
                None => continue,
            },
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let refused = suback
                    .return_codes
                    .iter()
                    .filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    warn!(
                        refused,
                        "the broker refused some of bridge.topics (its ACL?)"
                    );
                }
                continue;
            }
            Ok(_) => continue,
            Err(error) => {
                connected = false;
                failures += 1;
                // The first failure and then every tenth: a broker that is
                // away for hours must not flood the log.
                if failures == 1 || failures % 10 == 0 {
                    warn!(%error, failures, retry_in = ?pause, "broker connection failed");
                }
                if events.send(FromBroker::Lost).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        if events.send(report).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_filter;

    #[test]
    fn filters_follow_the_mqtt_rules() {
        for good in [
            "#",
            "+",
            "a/b",
            "zigbee2mqtt/#",
            "hearth/+/+/+/set",
            "a//b",
            "+/+",
        ] {
            assert!(valid_filter(good), "{good}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "a+/b", "nul\0"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }
}
