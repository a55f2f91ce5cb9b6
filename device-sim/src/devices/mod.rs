//! Devices on the wire: every simulated device is its own MQTT connection
//! (rumqttc), as real devices are, in one tokio task (no thread per
//! device). The task publishes what the world tells it to, sees its
//! PUBACKs (rumqttc reports every packet as an event), obeys commands
//! (lights, sirens), and keeps the keypad's view of the alarm. Memory per
//! connection is kept small: a short request queue, small packet limits.

pub mod payload;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::measure::Measure;
use crate::model::layout::{Convention, DeviceKind};
use crate::model::{DeviceId, Feedback, KeypadAction, Mark, Value};
use payload::{Command, Place};

/// What the simulation asks of a device task.
#[derive(Debug, Clone)]
pub enum Control {
    Publish {
        value: Value,
        mark: Option<Mark>,
    },
    Keypad(KeypadAction),
    /// Lose the connection without a DISCONNECT (the last will goes out).
    Offline,
    /// Come back.
    Online,
    /// Publish as fast as the inflight window allows, from now on.
    Flood,
    /// Finish what is in flight (within the drain time) and disconnect.
    Stop,
}

/// How devices connect.
#[derive(Debug, Clone)]
pub struct Connect {
    pub host: String,
    pub port: u16,
    /// TLS (`mqtts://`): one configuration shared by every connection.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<(String, String)>,
    pub qos: QoS,
    pub keep_alive: Duration,
    /// How long a stopping device waits for its outstanding PUBACKs.
    pub drain: Duration,
}

/// One device, by name and place.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub home: usize,
    pub room: usize,
    pub kind: DeviceKind,
    pub convention: Convention,
    pub home_name: String,
    pub room_name: &'static str,
    pub name: &'static str,
    /// The household's alarm code (keypads).
    pub code: String,
    /// The misbehaving device of the flood scenario: a wide inflight window.
    pub flood: bool,
}

impl DeviceInfo {
    pub fn client_id(&self) -> String {
        format!("sim-{}-{}-{}", self.home_name, self.room_name, self.name)
    }

    fn place(&self) -> Place<'_> {
        Place {
            convention: self.convention,
            home: &self.home_name,
            room: self.room_name,
            device: self.name,
        }
    }
}

/// Publishes in flight at once for an ordinary device, and for a flooding one.
const INFLIGHT: u16 = 10;
const FLOOD_INFLIGHT: u16 = 100;
/// Small packets only: commands and alarm states are a few hundred bytes.
const MAX_PACKET: usize = 8 * 1024;

/// A publish handed to rumqttc, until it is written (then until acked).
#[derive(Debug)]
struct Sent {
    events: u32,
    mark: Option<Mark>,
    motion: bool,
    at: Instant,
}

struct Session {
    client: AsyncClient,
    connected: bool,
    /// Handed to rumqttc, not yet written, in order.
    queued: VecDeque<Sent>,
    /// Written, awaiting PUBACK, by packet id.
    pending: HashMap<u16, Sent>,
}

/// Runs one device until it is told to stop (or its inbox closes).
pub async fn run(
    device: DeviceInfo,
    connect: Arc<Connect>,
    mut inbox: mpsc::Receiver<Control>,
    feedback: mpsc::Sender<Feedback>,
    measure: Arc<Measure>,
    start_after: Duration,
) {
    tokio::time::sleep(start_after).await;
    let mut task = Task {
        options: options(&device, &connect),
        device,
        connect,
        feedback,
        measure,
        light: (false, 0),
        flood: false,
        keypad: None,
        keypad_retry: None,
    };
    loop {
        match task.session(&mut inbox).await {
            Ended::Stopped => return,
            // Offline: what the world says meanwhile is lost, as with a real
            // device out of reach.
            Ended::Offline => loop {
                match inbox.recv().await {
                    Some(Control::Online) => break,
                    Some(Control::Stop) | None => return,
                    Some(_) => {}
                }
            },
        }
    }
}

enum Ended {
    Offline,
    Stopped,
}

struct Task {
    device: DeviceInfo,
    connect: Arc<Connect>,
    options: MqttOptions,
    feedback: mpsc::Sender<Feedback>,
    measure: Arc<Measure>,
    light: (bool, u8),
    flood: bool,
    /// The keypad's last request and how often it was tried, and when to
    /// try again after a refusal (a window still open, as the alarm saw it).
    keypad: Option<(KeypadAction, u32)>,
    keypad_retry: Option<tokio::time::Instant>,
}

/// A person at the keypad tries again this often, and gives up after so
/// many tries.
const KEYPAD_RETRY: Duration = Duration::from_secs(1);
const KEYPAD_TRIES: u32 = 5;

fn options(device: &DeviceInfo, connect: &Connect) -> MqttOptions {
    let mut options = MqttOptions::new(device.client_id(), connect.host.clone(), connect.port);
    options.set_keep_alive(connect.keep_alive);
    if let Some(tls) = &connect.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
        ));
    }
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let inflight = if device.flood {
        FLOOD_INFLIGHT
    } else {
        INFLIGHT
    };
    options.set_inflight(inflight);
    options.set_request_channel_capacity(usize::from(inflight) + 6);
    if let Some((user, password)) = &connect.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    if device.kind != DeviceKind::Keypad {
        let place = device.place();
        options.set_last_will(LastWill::new(
            place.availability_topic(),
            payload::availability_payload(false).to_vec(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    options
}

fn error_kind(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "tcp_refused"
        }
        ConnectionError::Io(_) => "io",
        ConnectionError::ConnectionRefused(_) => "connack_refused",
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => "timeout",
        ConnectionError::MqttState(_) => "mqtt_state",
        _ => "connection",
    }
}

/// The task polling a session's event loop; aborted (closing the socket
/// without DISCONNECT) when the session ends.
struct Poller(tokio::task::JoinHandle<()>);

impl Drop for Poller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls `eventloop`, handing every event and error to the session. After
/// an error it backs off, growing, with jitter (from `seed`), so that a
/// storm of failures does not become a storm of reconnects; the next poll
/// connects again.
async fn poll(
    mut eventloop: rumqttc::EventLoop,
    events: mpsc::Sender<Result<Event, ConnectionError>>,
    seed: u64,
) {
    let mut failures: u32 = 0;
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if events.send(event).await.is_err() {
            return;
        }
        if failed {
            failures = failures.saturating_add(1);
            let base = 250u64 << failures.min(5);
            let jitter = (seed * 7919 + u64::from(failures) * 104_729) % base;
            tokio::time::sleep(Duration::from_millis(base + jitter)).await;
        } else {
            failures = 0;
        }
    }
}

impl Task {
    async fn session(&mut self, inbox: &mut mpsc::Receiver<Control>) -> Ended {
        let capacity = usize::from(if self.device.flood {
            FLOOD_INFLIGHT
        } else {
            INFLIGHT
        }) + 6;
        let (client, eventloop) = AsyncClient::new(self.options.clone(), capacity);
        // Polled in a task of its own: rumqttc connects inside `poll`, and a
        // poll dropped by a `select!` between CONNECT and CONNACK would close
        // a connection the gateway accepted, leaving a will the device never
        // knew of (and reconnecting at once).
        let (events_tx, mut events) = mpsc::channel(capacity);
        let poller = Poller(tokio::spawn(poll(
            eventloop,
            events_tx,
            self.device.id as u64,
        )));
        let mut session = Session {
            client,
            connected: false,
            queued: VecDeque::new(),
            pending: HashMap::new(),
        };
        let mut stop_by: Option<tokio::time::Instant> = None;
        loop {
            if stop_by.is_some() && session.queued.is_empty() && session.pending.is_empty() {
                self.disconnect(&mut session, &mut events).await;
                return Ended::Stopped;
            }
            let deadline =
                stop_by.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                control = inbox.recv(), if stop_by.is_none() => match control {
                    None | Some(Control::Stop) => {
                        stop_by = Some(tokio::time::Instant::now() + self.connect.drain);
                        self.flood = false;
                    }
                    Some(Control::Publish { value, mark }) => self.publish_reading(&mut session, &value, mark),
                    Some(Control::Keypad(action)) => {
                        self.keypad = Some((action, 1));
                        self.keypad_retry = None;
                        self.keypad_request(&mut session, action);
                    }
                    Some(Control::Offline) => {
                        // The keypad has no last will.
                        if session.connected && self.device.kind != DeviceKind::Keypad {
                            self.measure.wills.fetch_add(1, Ordering::Relaxed);
                        }
                        self.lost(&mut session, "lost_in_dropout");
                        // Dropping the event loop closes the socket without
                        // a DISCONNECT: the gateway publishes the will.
                        drop(poller);
                        return Ended::Offline;
                    }
                    Some(Control::Online) => {}
                    Some(Control::Flood) => {
                        self.flood = true;
                        self.top_up(&mut session);
                    }
                },
                event = events.recv() => match event {
                    None => return Ended::Stopped,
                    Some(Ok(event)) => self.handle(&mut session, event),
                    Some(Err(error)) => {
                        if session.connected && self.device.kind != DeviceKind::Keypad {
                            // Ended without DISCONNECT: the gateway publishes
                            // the device's last will, unless it had not seen
                            // the end yet when the device came back.
                            self.measure.error("will_after_connection_error");
                        }
                        // With a clean session, rumqttc drops on reconnect
                        // what it had in flight (maybe stored, never
                        // acknowledged) and what it had not sent yet.
                        self.lost(&mut session, "cut_off_by_reconnect");
                        self.measure.error(error_kind(&error));
                        debug!(%error, "connection failed");
                        if stop_by.is_some() {
                            self.lost(&mut session, "unacknowledged_at_end");
                            return Ended::Stopped;
                        }
                    }
                },
                () = tokio::time::sleep_until(self.keypad_retry.unwrap_or(deadline)), if self.keypad_retry.is_some() && stop_by.is_none() => {
                    self.keypad_retry = None;
                    if let Some((action, tries)) = &mut self.keypad {
                        *tries += 1;
                        let action = *action;
                        self.keypad_request(&mut session, action);
                    }
                }
                () = tokio::time::sleep_until(deadline), if stop_by.is_some() => {
                    self.lost(&mut session, "unacknowledged_at_end");
                    if session.connected {
                        session.connected = false;
                        self.measure.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    return Ended::Stopped;
                }
            }
        }
    }

    /// Sends DISCONNECT (no will) and waits briefly for it to be written.
    async fn disconnect(
        &self,
        session: &mut Session,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
    ) {
        if !session.connected {
            return;
        }
        let _ = session.client.try_disconnect();
        let written = async {
            loop {
                match events.recv().await {
                    Some(Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) | None => return,
                    Some(Ok(_)) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), written).await;
        session.connected = false;
        self.measure.connected.fetch_sub(1, Ordering::Relaxed);
    }

    fn lost(&self, session: &mut Session, why: &'static str) {
        let lost = session.pending.len();
        session.pending.clear();
        self.measure.abandoned(lost, why);
        if !session.queued.is_empty() {
            for _ in 0..session.queued.len() {
                self.measure.error("lost_unsent");
            }
            session.queued.clear();
        }
        if session.connected {
            session.connected = false;
            self.measure.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn keypad_request(&self, session: &mut Session, action: KeypadAction) {
        let body = payload::keypad_request(action, &self.device.code);
        let topic = payload::keypad_set_topic(&self.device.home_name);
        self.publish(session, topic, body, false, 0, None, false);
    }

    fn publish_reading(&mut self, session: &mut Session, value: &Value, mark: Option<Mark>) {
        let (topic, body) = self.device.place().reading(value);
        let motion = matches!(value, Value::Motion(true));
        self.publish(session, topic, body, false, 1, mark, motion);
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        session: &mut Session,
        topic: String,
        body: Vec<u8>,
        retain: bool,
        events: u32,
        mark: Option<Mark>,
        motion: bool,
    ) {
        match session
            .client
            .try_publish(topic, self.connect.qos, retain, body)
        {
            Ok(()) => session.queued.push_back(Sent {
                events,
                mark,
                motion,
                at: Instant::now(),
            }),
            Err(_) => self.measure.error("request_queue_full"),
        }
    }

    /// Keeps a flooding device's window full.
    fn top_up(&self, session: &mut Session) {
        if !self.flood {
            return;
        }
        let mut n = session.pending.len() + session.queued.len();
        while n < usize::from(FLOOD_INFLIGHT) {
            let celsius = 20.0 + (n % 50) as f64 / 10.0;
            let (topic, body) = self.device.place().reading(&Value::Temperature(celsius));
            let before = session.queued.len();
            self.publish(session, topic, body, false, 1, None, false);
            if session.queued.len() == before {
                return;
            }
            n += 1;
        }
    }

    fn handle(&mut self, session: &mut Session, event: Event) {
        let now = Instant::now();
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                session.connected = true;
                self.measure.connected.fetch_add(1, Ordering::Relaxed);
                self.measure.connects.fetch_add(1, Ordering::Relaxed);
                self.on_connect(session);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if pkid != 0 && session.pending.contains_key(&pkid) {
                    // rumqttc sending it again after a reconnect.
                    return;
                }
                let Some(mut sent) = session.queued.pop_front() else {
                    return;
                };
                sent.at = now;
                if sent.motion {
                    self.measure.motion_sent(
                        self.device.id,
                        self.device.home,
                        self.device.room,
                        now,
                    );
                }
                if let Some(mark) = sent.mark {
                    info!(home = %self.device.home_name, ?mark, "incident published");
                    self.measure.observe_mark(self.device.home, mark, now);
                }
                self.measure.sent(sent.events, pkid != 0);
                if pkid != 0 {
                    session.pending.insert(pkid, sent);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(sent) = session.pending.remove(&ack.pkid) {
                    self.measure
                        .acked(sent.events, now.duration_since(sent.at), self.device.flood);
                }
                self.top_up(session);
            }
            Event::Incoming(Packet::Publish(publish)) => {
                self.incoming(session, &publish.topic, &publish.payload, now)
            }
            _ => {}
        }
    }

    fn on_connect(&mut self, session: &mut Session) {
        let place = self.device.place();
        let subscription = match self.device.kind {
            DeviceKind::Keypad => Some(payload::keypad_state_topic(&self.device.home_name)),
            kind if kind.takes_commands() => Some(place.command_topic()),
            _ => None,
        };
        if let Some(topic) = subscription {
            if session
                .client
                .try_subscribe(topic, QoS::AtLeastOnce)
                .is_err()
            {
                self.measure.error("request_queue_full");
            }
        }
        if self.device.kind == DeviceKind::Keypad {
            let result = payload::keypad_result_topic(&self.device.home_name);
            if session
                .client
                .try_subscribe(result, QoS::AtLeastOnce)
                .is_err()
            {
                self.measure.error("request_queue_full");
            }
            return;
        }
        let (topic, body) = place.reading(&Value::Availability(true));
        self.publish(session, topic, body, true, 1, None, false);
        if self.device.kind == DeviceKind::Light {
            // A light says what state it is in when it comes up (and so
            // the gateway learns its convention and command topic).
            let (on, brightness_pct) = self.light;
            self.publish_reading(session, &Value::Light { on, brightness_pct }, None);
        }
    }

    fn incoming(&mut self, session: &mut Session, topic: &str, body: &[u8], now: Instant) {
        self.measure
            .commands_received
            .fetch_add(1, Ordering::Relaxed);
        if self.device.kind == DeviceKind::Keypad && topic.ends_with("/result") {
            if let Some(error) = payload::keypad_refusal(body) {
                let tries = self.keypad.map_or(0, |(_, tries)| tries);
                warn!(home = %self.device.home_name, %error, tries, "the alarm panel refused the keypad");
                self.measure.error("keypad_refused");
                if tries < KEYPAD_TRIES {
                    self.keypad_retry = Some(tokio::time::Instant::now() + KEYPAD_RETRY);
                }
            }
            return;
        }
        if self.device.kind == DeviceKind::Keypad {
            let state = String::from_utf8_lossy(body).trim().to_owned();
            debug!(home = %self.device.home_name, topic, state, "the keypad sees the alarm");
            self.measure
                .observe_alarm(self.device.home, state.clone(), now);
            let _ = self.feedback.try_send(Feedback::AlarmState {
                home: self.device.home,
                state,
            });
            return;
        }
        match payload::parse_command(self.device.convention, self.device.kind, body) {
            Ok(Command::Light {
                on,
                brightness_pct,
                correlation_id,
            }) => {
                let brightness = match (on, brightness_pct) {
                    (_, Some(brightness)) => brightness,
                    (true, None) if self.light.1 == 0 => 100,
                    (_, None) => self.light.1,
                };
                if on && !self.light.0 {
                    self.measure.light_commanded(
                        self.device.home,
                        self.device.room,
                        correlation_id.as_deref(),
                        now,
                    );
                }
                self.light = (on, brightness);
                if self
                    .feedback
                    .try_send(Feedback::Light {
                        device: self.device.id,
                        on,
                        brightness_pct: brightness,
                    })
                    .is_err()
                {
                    self.measure.error("feedback_full");
                }
                self.publish_reading(
                    session,
                    &Value::Light {
                        on,
                        brightness_pct: brightness,
                    },
                    None,
                );
            }
            Ok(Command::Siren { on, .. }) => {
                info!(home = %self.device.home_name, on, "siren commanded");
                self.measure.observe_siren(self.device.home, on, now);
            }
            Err(error) => {
                warn!(topic, %error, "unreadable command");
                self.measure.error("bad_command");
            }
        }
    }
}
