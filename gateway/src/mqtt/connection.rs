//! One device connection: the CONNECT handshake, then reading packets,
//! handing publishes to the store pipeline and acknowledging them in order as
//! they are stored.
//!
//! Flow control is the device's own inflight window: the connection keeps
//! reading (and answering PINGREQ) while fewer than `max_inflight` QoS 1/2
//! publishes await storage, so a slow store never turns into keep-alive
//! timeouts. A client that sends more than that without waiting is simply
//! not read from until storage catches up. QoS 0 has a lane of its own and
//! is dropped (and counted) rather than waited for, and every publish holds
//! a share of the gateway-wide memory budget until it is settled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::{self, v4, QoS};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::codec::{Codec, Extras};
use super::persistent::Persistent;
use super::throttle::Throttle;
use super::Shared;
use crate::auth::{Auth, Counters, Refusal, Who};
use crate::broker::{Delivery, Mailbox};
use crate::ingest::{Done, Pipeline, Received};
use hearth_proto::v1::event::Body;
use hearth_proto::v1::LoginFailed;

/// How long a closing connection waits for publishes still being stored so
/// that it can acknowledge them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write to a device may take: a device that stops reading must
/// not hold its connection (and its slot) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest client id accepted (MQTT allows 65535 bytes; real devices
/// use a few dozen).
const MAX_CLIENT_ID: usize = 256;
/// Retained messages waiting to be sent past which a client is not read.
const RETAINED_BACKLOG: usize = 10_000;
/// The starting size of a connection's read and write buffers.
const BUFFER: usize = 1024;
/// How long a connection that took over waits for the previous one.
const TAKEOVER_WAIT: Duration = Duration::from_secs(15);

/// The two directions of a connection, plain TCP or TLS alike.
type Reader = FramedRead<Box<dyn AsyncRead + Send + Unpin>, Codec>;
type Writer = FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, Codec>;

pub(crate) struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// For connections to the TLS listener.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Why a connection ended, for the log line.
#[derive(Debug)]
enum Closed {
    ClientDisconnected,
    EndOfStream,
    KeepAliveTimeout,
    TakenOver,
    ShuttingDown,
    ProtocolError(String),
    Io(String),
}

impl Connection {
    pub(crate) fn new(
        stream: TcpStream,
        peer: SocketAddr,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        Self {
            stream,
            peer,
            shared,
            shutdown,
            tls,
        }
    }

    /// The connection's two directions, after the TLS handshake for the
    /// TLS listener, with the username a client certificate gives.
    async fn open(
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        timeout: Duration,
    ) -> Option<(
        Box<dyn AsyncRead + Send + Unpin>,
        Box<dyn AsyncWrite + Send + Unpin>,
        Option<String>,
    )> {
        let Some(acceptor) = tls else {
            let (read, write) = stream.into_split();
            return Some((Box::new(read), Box::new(write), None));
        };
        let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                info!(%error, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                debug!("no TLS handshake in time");
                return None;
            }
        };
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(super::tls::common_name);
        let (read, write) = tokio::io::split(stream);
        Some((Box::new(read), Box::new(write), identity))
    }

    pub(crate) async fn run(self) {
        let span = info_span!("mqtt", peer = %self.peer, client_id = tracing::field::Empty);
        self.serve().instrument(span).await;
    }

    async fn serve(self) {
        let config = &self.shared.config;
        let codec = Codec::new(config.max_packet_size);
        let Some((read, write, identity)) =
            Self::open(self.stream, self.tls.clone(), config.connect_timeout).await
        else {
            return;
        };
        // Small buffers to start with (they grow for big packets): most
        // packets are tens of bytes, and 10,000 idle devices should not
        // hold 16 KiB of buffers each.
        let mut reader = FramedRead::with_capacity(read, codec.clone(), BUFFER);
        let mut writer = FramedWrite::new(write, codec);
        *writer.write_buffer_mut() = bytes::BytesMut::with_capacity(BUFFER);

        let Some((connect, extras)) = handshake(
            &mut reader,
            &mut writer,
            config.connect_timeout,
            &self.shared.auth.counters,
        )
        .await
        else {
            return;
        };
        let clean_start = extras.as_ref().is_some_and(|extras| extras.clean_start);
        // Credentials before anything else: a client that cannot log in must
        // not take over a logged-in client's id.
        let username = match self
            .shared
            .auth
            .login(connect.login.as_ref(), identity)
            .await
        {
            Ok(username) => username,
            Err(refusal) => {
                refuse_login(&self.shared, self.peer, &connect, refusal, &mut writer).await;
                return;
            }
        };
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            format!("hearth-{}", uuid::Uuid::now_v7().simple()).into()
        } else {
            connect.client_id.as_str().into()
        };
        tracing::Span::current().record("client_id", &*client_id);

        let taken_over = CancellationToken::new();
        let claim = self.shared.registry.claim(&client_id, taken_over.clone());
        // A connection that took over waits until the previous connection's
        // pipeline has finished: a retransmission must not look up a
        // generation the old pipeline is still recording.
        let session_lock = claim.session();
        let _session = tokio::select! {
            guard = tokio::time::timeout(TAKEOVER_WAIT, session_lock.lock_owned()) => match guard {
                Ok(guard) => Some(guard),
                Err(_) => {
                    warn!("the previous connection of this client is still finishing; going ahead");
                    None
                }
            },
            () = self.shutdown.cancelled() => return,
            () = taken_over.cancelled() => return,
        };
        let sessions = &self.shared.sessions;
        if clean_start && !connect.clean_session && sessions.get(&client_id).is_some() {
            // MQTT 5: a clean start that keeps the new session afterwards.
            if let Err(error) = sessions.discard(&client_id).await {
                warn!(%error, "could not end the kept session of this client");
            }
        }
        let (persistent, session_present) = if connect.clean_session {
            // A clean session ends whatever was kept under this id.
            if sessions.get(&client_id).is_some() {
                if let Err(error) = sessions.discard(&client_id).await {
                    warn!(%error, "could not end the kept session of this client");
                }
            }
            (None, false)
        } else {
            let existing = sessions.get(&client_id);
            let present = existing.is_some();
            let record = existing.unwrap_or_default();
            if !present {
                if let Err(error) = sessions.save(&client_id, &record).await {
                    warn!(%error, "refused: cannot keep a persistent session now");
                    let refuse = v4::ConnAck::new(v4::ConnectReturnCode::ServiceUnavailable, false);
                    let _ = crate::deadline::within(
                        WRITE_TIMEOUT,
                        writer.send(v4::Packet::ConnAck(refuse)),
                    )
                    .await;
                    return;
                }
            }
            let persistent =
                Persistent::resume(Arc::clone(sessions), Arc::clone(&client_id), record);
            (Some(persistent), present)
        };
        let connack = v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present);
        if !matches!(
            crate::deadline::within(WRITE_TIMEOUT, writer.send(v4::Packet::ConnAck(connack))).await,
            Ok(Ok(()))
        ) {
            return;
        }
        info!(
            protocol = if reader.decoder().v5() { "5" } else { "3.1.1" },
            keep_alive = connect.keep_alive,
            clean_session = connect.clean_session,
            "device connected"
        );

        let will = connect.last_will;
        let will_properties = extras
            .map(|extras| extras.user_properties)
            .unwrap_or_default();
        let (mut mailbox, mut deliveries) = self
            .shared
            .router
            .mailbox(Arc::clone(&client_id), persistent.is_some());
        if let Some(persistent) = &persistent {
            // Live delivery for what is not queued (QoS 0).
            for (filter, qos) in persistent.subscriptions() {
                if let Err(error) = mailbox.subscribe(&filter, qos).await {
                    warn!(%error, filter, "could not restore a subscription");
                }
            }
        }
        let mut session = Session {
            client_id,
            username,
            auth: Arc::clone(&self.shared.auth),
            throttle: Throttle::new(config.max_publish_rate),
            router: Arc::clone(&self.shared.router),
            mailbox,
            outgoing: Outgoing::default(),
            retained: VecDeque::new(),
            persistent,
            ingest: Arc::clone(&self.shared.ingest),
            keep_alive: keep_alive_limit(connect.keep_alive),
            max_inflight: config.max_inflight,
            inflight: 0,
            qos0_inflight: 0,
            budget: Arc::clone(&self.shared.budget),
            budget_total: config.max_inflight_bytes,
            awaiting_release: HashSet::new(),
        };
        if let Some((held, released)) = session.persistent.as_ref().map(Persistent::held_packet_ids)
        {
            // A returning client may still hold packet ids from before: they
            // are not given to other messages, and the PUBREL of a QoS 2
            // message awaiting PUBCOMP is sent again (MQTT 4.4).
            session.outgoing.reserved.extend(held);
            for pkid in released {
                session.outgoing.unacked.insert(
                    pkid,
                    Unacked {
                        awaiting: Awaiting::Complete,
                        sequence: None,
                        confirm: None,
                    },
                );
                // A broken socket shows in the serve loop that follows.
                let _ = writer.feed(v4::Packet::PubRel(v4::PubRel::new(pkid))).await;
            }
            let _ = crate::deadline::within(WRITE_TIMEOUT, writer.flush()).await;
        }
        let stop_pipeline = CancellationToken::new();
        let (jobs, mut done, mut pipeline) = match Pipeline::spawn(
            Arc::clone(&self.shared.ingest),
            // QoS 0 has a lane of the same size beside QoS 1/2's.
            2 * config.max_inflight,
            stop_pipeline.clone(),
            tracing::Span::current(),
        )
        .await
        {
            Ok(pipeline) => pipeline,
            Err(error) => {
                warn!(%error, "closing connection: cannot subscribe for JetStream replies");
                return;
            }
        };
        let closed = session
            .serve(
                &mut reader,
                &mut writer,
                Channels {
                    jobs: &jobs,
                    done: &mut done,
                    deliveries: &mut deliveries,
                },
                &self.shutdown,
                &taken_over,
            )
            .await;

        // The will goes last through the pipeline, stored and routed like
        // any publish from the client.
        let mut will_topic = String::new();
        let mut will_payload = bytes::Bytes::new();
        let will = will
            .filter(|_| closed.publishes_will())
            .filter(|will| {
                let allowed = session.auth.acl().can_publish(session.who(), &will.topic);
                if !allowed {
                    warn!(topic = %will.topic, "will denied by the ACL; not published");
                }
                allowed
            })
            .and_then(|will| {
                will_topic.clone_from(&will.topic);
                will_payload = will.message.clone();
                let received = Received {
                    budget: None,
                    client_id: Arc::clone(&session.client_id),
                    topic: will.topic,
                    payload: will.message,
                    qos: will.qos,
                    pkid: 0,
                    dup: false,
                    retain: will.retain,
                    user_properties: will_properties,
                    received_at: SystemTime::now(),
                };
                jobs.try_send(received).is_ok().then_some(())
            });
        drop(jobs);
        if will.is_some() {
            info!(reason = ?closed, "publishing the will");
            session.will_speaks_for_devices(&will_topic, &will_payload);
            let drain = async {
                // The will is the last to settle; what the client sent
                // before it is not acknowledged (the connection is gone) and
                // will come again from the client.
                let mut last = None;
                while let Some(settled) = done.recv().await {
                    last = Some(settled);
                }
                if let Some(will) = last {
                    session.route(will).await;
                }
            };
            if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
                warn!("the will could not be stored in time; not published");
            }
        }
        // Acknowledge what is still being stored, briefly, unless the socket
        // is gone or another connection took over (it will get the resends).
        if matches!(closed, Closed::ShuttingDown | Closed::ClientDisconnected) {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            let drain = async {
                while session.inflight + session.qos0_inflight > 0 {
                    let Some(settled) = done.recv().await else {
                        break;
                    };
                    if session.acknowledge(&mut writer, settled).await.is_err() {
                        break;
                    }
                    // Flush what is acknowledged now: the drain may time out
                    // on a later publish.
                    if done.is_empty() && writer.flush().await.is_err() {
                        break;
                    }
                }
                let _ = writer.flush().await;
            };
            let _ = tokio::time::timeout_at(deadline, drain).await;
        }
        // Let the pipeline finish the step it is in (see `Pipeline::run`),
        // bounded, before giving the client id to a newer connection.
        stop_pipeline.cancel();
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut pipeline)
            .await
            .is_err()
        {
            warn!("the store pipeline did not stop in time; aborting it");
            pipeline.abort();
        }
        if let Some(persistent) = session.persistent.take() {
            let released = session
                .outgoing
                .unacked
                .iter()
                .filter(|(_, sent)| sent.awaiting == Awaiting::Complete)
                .map(|(pkid, _)| *pkid)
                .collect();
            persistent.suspend(released).await;
        }
        if matches!(closed, Closed::ProtocolError(_)) {
            // MQTT 5 clients are told why.
            let reason = reader.decoder().refusal();
            writer.encoder_mut().disconnect_with(reason);
            let _ =
                crate::deadline::within(WRITE_TIMEOUT, writer.send(v4::Packet::Disconnect)).await;
        }
        match closed {
            Closed::ClientDisconnected => info!("device disconnected"),
            Closed::ProtocolError(error) => {
                warn!(%error, "closing connection: protocol error")
            }
            Closed::Io(error) => {
                info!(%error, unacknowledged = session.inflight, "connection lost")
            }
            other => info!(reason = ?other, unacknowledged = session.inflight, "connection closed"),
        }
        drop(claim);
    }
}

impl Closed {
    /// MQTT publishes the will of a connection that ends without DISCONNECT
    /// (3.1.2.5). Not when the gateway itself stops: its devices are not
    /// gone, they will reconnect to it or to another gateway.
    fn publishes_will(&self) -> bool {
        !matches!(self, Self::ClientDisconnected | Self::ShuttingDown)
    }
}

/// Answers a failed login, counts it, logs it, and stores it as a
/// `login_failed` event for the security rules.
async fn refuse_login(
    shared: &Shared,
    peer: SocketAddr,
    connect: &v4::Connect,
    refusal: Refusal,
    writer: &mut Writer,
) {
    let auth = &shared.auth;
    let total = Counters::count(&auth.counters.refused_connections);
    let username = connect
        .login
        .as_ref()
        .map(|login| login.username.clone())
        .unwrap_or_default();
    warn!(
        client_id = %connect.client_id,
        username,
        reason = refusal.as_str(),
        refused_total = total,
        "refused: login failed"
    );
    if auth.may_record_refusal() {
        let device = if connect.client_id.is_empty() {
            "unknown"
        } else {
            &connect.client_id
        };
        shared.ingest.store_own_event(
            (&shared.config.home, "gateway", device),
            device,
            Body::LoginFailed(LoginFailed {
                username,
                address: peer.to_string(),
                reason: refusal.as_str().to_owned(),
            }),
        );
    }
    let refuse = v4::ConnAck::new(refusal.code(), false);
    let _ = crate::deadline::within(WRITE_TIMEOUT, writer.send(v4::Packet::ConnAck(refuse))).await;
}

/// Reads CONNECT and refuses what MQTT 3.1.1 says to refuse; `None` when the
/// connection is to be closed.
async fn handshake(
    reader: &mut Reader,
    writer: &mut Writer,
    timeout: Duration,
    counters: &Counters,
) -> Option<(v4::Connect, Option<Box<Extras>>)> {
    // Every refusal is counted (`refused_connections`); the log line names
    // the address (and client id) through the connection's span.
    let refuse = |code| {
        Counters::count(&counters.refused_connections);
        v4::Packet::ConnAck(v4::ConnAck::new(code, false))
    };
    let first = match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => {
            debug!("no CONNECT in time");
            return None;
        }
        Ok(None) => return None,
        Ok(Some(packet)) => packet,
    };
    let (connect, extras) = match first.map(|inbound| (inbound.packet, inbound.extras)) {
        Ok((v4::Packet::Connect(connect), extras)) => (connect, extras),
        Err(mqttbytes::Error::InvalidProtocol | mqttbytes::Error::InvalidProtocolLevel(_)) => {
            info!("refused: protocol version not supported (MQTT 3.1.1 and 5 only)");
            let _ = writer
                .send(refuse(v4::ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return None;
        }
        Err(error) => {
            warn!(%error, "closing connection: malformed CONNECT");
            return None;
        }
        Ok((other, _)) => {
            warn!(packet = ?packet_name(&other), "closing connection: first packet must be CONNECT");
            return None;
        }
    };
    if connect.protocol != mqttbytes::Protocol::V4 {
        info!("refused: MQTT 3.1 is not supported (MQTT 3.1.1 and 5 are)");
        let _ = writer
            .send(refuse(v4::ConnectReturnCode::RefusedProtocolVersion))
            .await;
        return None;
    }
    if connect.client_id.contains(|c: char| c.is_control()) {
        // It goes into NATS headers and subjects; no device needs one.
        info!("refused: client id with control characters");
        let _ = writer
            .send(refuse(v4::ConnectReturnCode::BadClientId))
            .await;
        return None;
    }
    if connect.client_id.len() > MAX_CLIENT_ID {
        // Every event carries the client id; MQTT lets a server refuse ids
        // it does not accept.
        info!(
            length = connect.client_id.len(),
            "refused: client id longer than {MAX_CLIENT_ID} bytes"
        );
        let _ = writer
            .send(refuse(v4::ConnectReturnCode::BadClientId))
            .await;
        return None;
    }
    if let Some(will) = &connect.last_will {
        if will.topic.is_empty() || !mqttbytes::valid_topic(&will.topic) {
            warn!(topic = %will.topic, "closing connection: the will topic is not a valid topic name");
            return None;
        }
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        // A session cannot be resumed under an id the server made up.
        info!("refused: empty client id with clean session = false");
        let _ = writer
            .send(refuse(v4::ConnectReturnCode::BadClientId))
            .await;
        return None;
    }
    Some((connect, extras))
}

/// MQTT: the server disconnects a client silent for 1.5 times its keep-alive.
fn keep_alive_limit(keep_alive_secs: u16) -> Option<Duration> {
    (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500))
}

/// What a connection exchanges with the rest of the gateway.
struct Channels<'a> {
    /// Publishes to store.
    jobs: &'a tokio::sync::mpsc::Sender<Received>,
    /// Publishes stored, in arrival order.
    done: &'a mut tokio::sync::mpsc::Receiver<Done>,
    /// Messages matching the client's subscriptions.
    deliveries: &'a mut tokio::sync::mpsc::Receiver<Delivery>,
}

/// Messages sent to the client that it has not acknowledged yet.
#[derive(Debug, Default)]
struct Outgoing {
    last_pkid: u16,
    unacked: HashMap<u16, Unacked>,
    /// Packet ids a returning client may still hold for messages not sent
    /// again yet: not given to others.
    reserved: HashSet<u16>,
}

/// A message sent to the client, not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    awaiting: Awaiting,
    /// Where it is in the session's queue, for a persistent session.
    sequence: Option<u64>,
    /// Told once the client acknowledged (see `Delivery::confirm`).
    confirm: Option<async_nats::Subject>,
}

/// What the client owes for a message sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// PUBACK (QoS 1).
    Ack,
    /// PUBREC (QoS 2, first step).
    Received,
    /// PUBCOMP (QoS 2, after our PUBREL).
    Complete,
}

impl Outgoing {
    /// A packet id not in use; there is one, as fewer than 65535 messages
    /// are ever unacknowledged (`mqtt.max_inflight`).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid != 0
                && !self.unacked.contains_key(&self.last_pkid)
                && !self.reserved.contains(&self.last_pkid)
            {
                return self.last_pkid;
            }
        }
    }
}

struct Session {
    client_id: Arc<str>,
    /// The checked username, for the ACL; `None` for anonymous clients.
    username: Option<String>,
    auth: Arc<Auth>,
    throttle: Option<Throttle>,
    router: Arc<crate::broker::Router>,
    mailbox: Mailbox,
    outgoing: Outgoing,
    /// Retained messages for new subscriptions, sent before anything else
    /// as the window allows.
    retained: VecDeque<Delivery>,
    /// The kept session, when clean session = false.
    persistent: Option<Persistent>,
    ingest: Arc<crate::ingest::Ingest>,
    keep_alive: Option<Duration>,
    max_inflight: usize,
    /// QoS 1/2 publishes handed to the pipeline and not yet settled.
    inflight: usize,
    /// The same for QoS 0, which is never waited for: past `max_inflight`
    /// further QoS 0 publishes are dropped and counted.
    qos0_inflight: usize,
    /// The gateway-wide memory budget of publishes in flight, in bytes.
    budget: Arc<Semaphore>,
    budget_total: usize,
    /// QoS 2 packet ids stored and PUBREC'd, waiting for PUBREL.
    awaiting_release: HashSet<u16>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        reader: &mut Reader,
        writer: &mut Writer,
        channels: Channels<'_>,
        shutdown: &CancellationToken,
        taken_over: &CancellationToken,
    ) -> Closed {
        let Channels {
            jobs,
            done,
            deliveries,
        } = channels;
        let far_future = || Instant::now() + Duration::from_secs(86_400 * 365);
        let mut deadline = self
            .keep_alive
            .map_or_else(far_future, |ka| Instant::now() + ka);
        let mut was_reading = true;
        loop {
            // Also not while retained messages for new subscriptions pile
            // up unsent: a client that subscribes again and again without
            // acknowledging must not grow that backlog without end.
            let reading =
                self.inflight < self.max_inflight && self.retained.len() < RETAINED_BACKLOG;
            if was_reading && !reading {
                let cause = if self.inflight >= self.max_inflight {
                    "inflight_window"
                } else {
                    "retained_backlog"
                };
                metrics::counter!(crate::telemetry::BACKPRESSURE, "cause" => cause).increment(1);
            }
            was_reading = reading;
            let mut sending = self.outgoing.unacked.len() < self.max_inflight;
            if sending && !self.retained.is_empty() {
                let written = crate::deadline::within(WRITE_TIMEOUT, async {
                    while self.outgoing.unacked.len() < self.max_inflight {
                        let Some(delivery) = self.retained.pop_front() else {
                            break;
                        };
                        self.send(writer, delivery).await?;
                    }
                    writer.flush().await
                })
                .await;
                if let Some(closed) = write_failed(written) {
                    return closed;
                }
                sending = self.retained.is_empty();
            }
            if sending && self.persistent.as_ref().is_some_and(|p| p.unread) {
                let written = crate::deadline::within(WRITE_TIMEOUT, async {
                    let mut wrote = false;
                    while self.outgoing.unacked.len() < self.max_inflight {
                        let Some(persistent) = self.persistent.as_mut() else {
                            break;
                        };
                        let Some(queued) = persistent.next().await else {
                            break;
                        };
                        let delivery = Delivery {
                            topic: queued.topic,
                            payload: queued.payload,
                            qos: queued.qos,
                            retain: false,
                            user_properties: queued.user_properties,
                            confirm: None,
                        };
                        self.send_queued(writer, delivery, Some(queued.sequence))
                            .await?;
                        wrote = true;
                    }
                    if wrote {
                        writer.flush().await?;
                    }
                    Ok::<_, mqttbytes::Error>(())
                })
                .await;
                if let Some(closed) = write_failed(written) {
                    return closed;
                }
            }
            let waiting_for_queue = self.persistent.as_ref().is_some_and(|p| !p.unread);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Closed::ShuttingDown,
                () = taken_over.cancelled() => return Closed::TakenOver,
                settled = done.recv() => {
                    let Some(settled) = settled else {
                        return Closed::Io("the store pipeline stopped".into());
                    };
                    let written = crate::deadline::within(WRITE_TIMEOUT, async {
                        self.acknowledge(writer, settled).await?;
                        // Acknowledge everything else already settled in one write.
                        while let Ok(settled) = done.try_recv() {
                            self.acknowledge(writer, settled).await?;
                        }
                        writer.flush().await
                    })
                    .await;
                    if let Some(closed) = write_failed(written) {
                        return closed;
                    }
                    if !reading {
                        // Reading resumes now; the silence was ours, not the
                        // client's.
                        deadline = self.keep_alive.map_or_else(far_future, |ka| Instant::now() + ka);
                    }
                }
                delivery = deliveries.recv(), if sending => {
                    let Some(delivery) = delivery else {
                        return Closed::Io("MQTT routing stopped".into());
                    };
                    let written = crate::deadline::within(WRITE_TIMEOUT, async {
                        self.send(writer, delivery).await?;
                        // Send everything else already queued in one write.
                        while self.outgoing.unacked.len() < self.max_inflight {
                            let Ok(delivery) = deliveries.try_recv() else {
                                break;
                            };
                            self.send(writer, delivery).await?;
                        }
                        writer.flush().await
                    })
                    .await;
                    if let Some(closed) = write_failed(written) {
                        return closed;
                    }
                }
                () = woken(self.persistent.as_mut()), if waiting_for_queue => {
                    if let Some(persistent) = self.persistent.as_mut() {
                        persistent.unread = true;
                    }
                }
                packet = reader.next(), if reading => {
                    let (packet, extras) = match packet {
                        None => return Closed::EndOfStream,
                        Some(Err(mqttbytes::Error::Io(error))) => return Closed::Io(error.to_string()),
                        Some(Err(error)) => return Closed::ProtocolError(error.to_string()),
                        Some(Ok(inbound)) => (inbound.packet, inbound.extras),
                    };
                    // A publish first reserves its share of the gateway-wide
                    // memory budget; waiting for it is back-pressure, not a
                    // slow write, so it happens outside the write bound.
                    if matches!(packet, v4::Packet::Publish(_)) {
                        if let Some(wait) = self.throttle() {
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = shutdown.cancelled() => return Closed::ShuttingDown,
                                () = taken_over.cancelled() => return Closed::TakenOver,
                            }
                        }
                    }
                    let reserved = match &packet {
                        v4::Packet::Publish(publish) => tokio::select! {
                            reserved = self.reserve(publish) => reserved,
                            () = shutdown.cancelled() => return Closed::ShuttingDown,
                            () = taken_over.cancelled() => return Closed::TakenOver,
                        },
                        _ => None,
                    };
                    deadline = self.keep_alive.map_or_else(far_future, |ka| Instant::now() + ka);
                    match crate::deadline::within(WRITE_TIMEOUT, self.handle(packet, extras, reserved, writer, jobs)).await {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(closed))) => return closed,
                        Ok(Err(error)) => return Closed::Io(error.to_string()),
                        Err(_) => return Closed::Io("the device does not read".into()),
                    }
                }
                () = tokio::time::sleep_until(deadline), if reading => return Closed::KeepAliveTimeout,
            }
        }
    }

    /// The memory a publish may hold until it is settled. QoS 1/2 wait for
    /// it (this connection is not read meanwhile); QoS 0 takes it only if it
    /// is free, and is dropped otherwise.
    async fn reserve(&self, publish: &v4::Publish) -> Option<OwnedSemaphorePermit> {
        let budget = &self.budget;
        let wanted = budget_share(publish.payload.len(), self.budget_total);
        if let Ok(permit) = Arc::clone(budget).try_acquire_many_owned(wanted) {
            return Some(permit);
        }
        if publish.qos == QoS::AtMostOnce {
            return None;
        }
        metrics::counter!(crate::telemetry::BACKPRESSURE, "cause" => "memory_budget").increment(1);
        Arc::clone(budget).acquire_many_owned(wanted).await.ok()
    }

    /// Handles one packet; `Some` when the connection is to close.
    async fn handle(
        &mut self,
        packet: v4::Packet,
        extras: Option<Box<Extras>>,
        reserved: Option<OwnedSemaphorePermit>,
        writer: &mut Writer,
        jobs: &tokio::sync::mpsc::Sender<Received>,
    ) -> Result<Option<Closed>, mqttbytes::Error> {
        match packet {
            v4::Packet::Publish(publish) => {
                if !mqttbytes::valid_topic(&publish.topic) {
                    return Ok(Some(Closed::ProtocolError(format!(
                        "invalid topic name {:?} in PUBLISH",
                        publish.topic
                    ))));
                }
                if !self.auth.acl().can_publish(self.who(), &publish.topic) {
                    // MQTT 3.1.1 has no way to refuse a publish: it is
                    // acknowledged as usual and dropped.
                    let total = Counters::count(&self.auth.counters.denied_publishes);
                    warn!(topic = %publish.topic, denied_total = total, "publish denied by the ACL; dropped");
                    match publish.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            writer
                                .send(v4::Packet::PubAck(v4::PubAck::new(publish.pkid)))
                                .await?;
                        }
                        QoS::ExactlyOnce => {
                            self.awaiting_release.insert(publish.pkid);
                            writer
                                .send(v4::Packet::PubRec(v4::PubRec::new(publish.pkid)))
                                .await?;
                        }
                    }
                    return Ok(None);
                }
                if publish.qos == QoS::ExactlyOnce && self.awaiting_release.contains(&publish.pkid)
                {
                    // Already stored; the client missed our PUBREC.
                    writer
                        .send(v4::Packet::PubRec(v4::PubRec::new(publish.pkid)))
                        .await?;
                    return Ok(None);
                }
                let received = Received {
                    budget: reserved,
                    client_id: Arc::clone(&self.client_id),
                    topic: publish.topic,
                    payload: publish.payload,
                    qos: publish.qos,
                    pkid: publish.pkid,
                    dup: publish.dup,
                    retain: publish.retain,
                    user_properties: extras
                        .map(|extras| extras.user_properties)
                        .unwrap_or_default(),
                    received_at: SystemTime::now(),
                };
                let qos0 = received.qos == QoS::AtMostOnce;
                if qos0 && received.budget.is_none() {
                    self.ingest
                        .count_qos0_drop(&"storage is behind and the memory budget is spent");
                    return Ok(None);
                }
                if qos0 && self.qos0_inflight >= self.max_inflight {
                    // At most once, and storage is behind: dropping it is
                    // what QoS 0 allows, counting it is what users need.
                    self.ingest
                        .count_qos0_drop(&"storage is behind and the QoS 0 lane is full");
                    return Ok(None);
                }
                // Cannot be full: each lane stays within its half of the
                // channel's capacity.
                if jobs.try_send(received).is_err() {
                    return Ok(Some(Closed::Io("store pipeline stopped".into())));
                }
                if qos0 {
                    self.qos0_inflight += 1;
                } else {
                    self.inflight += 1;
                }
            }
            v4::Packet::PubRel(release) => {
                self.awaiting_release.remove(&release.pkid);
                writer
                    .send(v4::Packet::PubComp(v4::PubComp::new(release.pkid)))
                    .await?;
            }
            v4::Packet::PingReq => writer.send(v4::Packet::PingResp).await?,
            v4::Packet::Disconnect => return Ok(Some(Closed::ClientDisconnected)),
            v4::Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    codes.push(self.subscribe(&filter.path, filter.qos).await);
                }
                if let Some(persistent) = self.persistent.as_mut() {
                    // Kept before the SUBACK: from then on publishes are
                    // queued for the session.
                    let granted: Vec<(String, QoS)> = subscribe
                        .filters
                        .iter()
                        .zip(&codes)
                        .filter_map(|(filter, code)| match code {
                            v4::SubscribeReasonCode::Success(qos) => {
                                Some((filter.path.clone(), *qos))
                            }
                            v4::SubscribeReasonCode::Failure => None,
                        })
                        .collect();
                    if let Err(error) = persistent.update_subscriptions(&granted, &[]).await {
                        warn!(%error, "subscriptions not kept for the session; refused");
                        for (filter, _) in &granted {
                            self.mailbox.unsubscribe(filter);
                        }
                        codes
                            .iter_mut()
                            .for_each(|code| *code = v4::SubscribeReasonCode::Failure);
                    }
                }
                // The retained messages of each new subscription follow the
                // SUBACK, flagged as retained (3.3.1.3).
                let mut greeted = HashSet::new();
                for (filter, code) in subscribe.filters.iter().zip(&codes) {
                    let v4::SubscribeReasonCode::Success(granted) = *code else {
                        continue;
                    };
                    if !greeted.insert(filter.path.as_str()) {
                        // The same filter twice in one SUBSCRIBE.
                        continue;
                    }
                    for (topic, payload, qos) in self.router.retained().matching(&filter.path) {
                        self.retained.push_back(Delivery {
                            topic,
                            payload,
                            qos: crate::broker::lower(qos, granted),
                            retain: true,
                            user_properties: Vec::new(),
                            confirm: None,
                        });
                    }
                }
                writer
                    .send(v4::Packet::SubAck(v4::SubAck::new(subscribe.pkid, codes)))
                    .await?;
            }
            v4::Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topics {
                    self.mailbox.unsubscribe(filter);
                }
                if let Some(persistent) = self.persistent.as_mut() {
                    if let Err(error) = persistent
                        .update_subscriptions(&[], &unsubscribe.topics)
                        .await
                    {
                        warn!(%error, "unsubscription not kept for the session");
                    }
                }
                debug!(filters = ?unsubscribe.topics, "unsubscribed");
                writer
                    .encoder()
                    .unsubscribing(unsubscribe.pkid, unsubscribe.topics.len());
                writer
                    .send(v4::Packet::UnsubAck(v4::UnsubAck::new(unsubscribe.pkid)))
                    .await?;
            }
            v4::Packet::Connect(_) => {
                return Ok(Some(Closed::ProtocolError("second CONNECT".into())))
            }
            // Acknowledgements of messages we sent; one for a packet id not
            // awaiting it (a late duplicate) changes nothing.
            v4::Packet::PubAck(ack) => {
                if self.awaits(ack.pkid, Awaiting::Ack) {
                    if let Some(sent) = self.outgoing.unacked.remove(&ack.pkid) {
                        self.delivered(sent.sequence).await;
                        self.confirm(sent.confirm).await;
                    }
                }
            }
            v4::Packet::PubRec(received) => {
                if let Some(sent) = self.outgoing.unacked.get_mut(&received.pkid) {
                    if matches!(sent.awaiting, Awaiting::Received | Awaiting::Complete) {
                        sent.awaiting = Awaiting::Complete;
                        let confirm = sent.confirm.take();
                        let sequence = sent.sequence.take();
                        self.delivered(sequence).await;
                        self.confirm(confirm).await;
                        writer
                            .send(v4::Packet::PubRel(v4::PubRel::new(received.pkid)))
                            .await?;
                    }
                }
            }
            v4::Packet::PubComp(complete) => {
                if self.awaits(complete.pkid, Awaiting::Complete) {
                    self.outgoing.unacked.remove(&complete.pkid);
                }
            }
            other => {
                return Ok(Some(Closed::ProtocolError(format!(
                    "{:?} is not sent by clients",
                    packet_name(&other)
                ))))
            }
        }
        Ok(None)
    }

    /// A will not on an availability topic still means the client's devices
    /// are gone: each gets an `availability` (offline) event, unless the
    /// will itself is one.
    fn will_speaks_for_devices(&self, topic: &str, payload: &[u8]) {
        /// A bridge (Zigbee2MQTT) speaks for many devices; not for thousands.
        const MOST: usize = 1000;
        if self.ingest.is_availability(topic, payload) {
            return;
        }
        let devices = self.ingest.devices_of(&self.client_id, MOST);
        if !devices.is_empty() {
            info!(
                devices = devices.len(),
                "the will marks the client's devices offline"
            );
        }
        for place in devices {
            self.ingest.store_own_event(
                (&place.home, &place.room, &place.device),
                &self.client_id,
                Body::Availability(hearth_proto::v1::Availability { online: false }),
            );
        }
    }

    /// Routes a stored publish to subscribers, and records it as the
    /// topic's retained message if it is one.
    async fn route(&self, settled: Done) {
        if let (true, Some(sequence)) = (settled.retain, settled.retained_sequence) {
            // Known here at once, not only when the stream is followed: a
            // subscription made after the PUBACK must find it.
            self.router.retained().apply(
                &settled.topic,
                sequence,
                settled.payload.clone(),
                settled.qos,
            );
        }
        if let Err(error) = self
            .router
            .publish(
                &settled.topic,
                settled.payload,
                settled.qos,
                &settled.user_properties,
            )
            .await
        {
            warn!(topic = %settled.topic, %error, "publish not routed to subscribers");
        }
    }

    /// How long to hold the client's next publish, if it publishes faster
    /// than `mqtt.max_publish_rate`; counted and logged once per episode.
    fn throttle(&mut self) -> Option<Duration> {
        let throttle = self.throttle.as_mut()?;
        let now = Instant::now();
        let (wait, started) = throttle.take(now);
        if started {
            let total = Counters::count(&self.auth.counters.throttled);
            // One line per client per 10 s at most.
            if throttle
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
            {
                throttle.warned_at = Some(now);
                warn!(
                    throttled_total = total,
                    "publishing faster than mqtt.max_publish_rate: slowed down"
                );
            }
        }
        (!wait.is_zero()).then_some(wait)
    }

    /// The client, for the ACL.
    fn who(&self) -> Who<'_> {
        Who {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }

    /// Whether message `pkid` sent to the client awaits `what`.
    fn awaits(&self, pkid: u16, what: Awaiting) -> bool {
        self.outgoing
            .unacked
            .get(&pkid)
            .is_some_and(|sent| sent.awaiting == what)
    }

    /// The client has queue message `sequence` (of its persistent session).
    async fn delivered(&mut self, sequence: Option<u64>) {
        if let (Some(sequence), Some(persistent)) = (sequence, self.persistent.as_mut()) {
            persistent.acknowledged(sequence).await;
        }
    }

    async fn confirm(&self, confirm: Option<async_nats::Subject>) {
        if let Some(confirm) = confirm {
            self.router.confirm(confirm).await;
        }
    }

    /// Subscribes to one filter; the SUBACK return code.
    async fn subscribe(&mut self, filter: &str, qos: QoS) -> v4::SubscribeReasonCode {
        if !mqttbytes::valid_filter(filter) || filter.contains('\0') {
            info!(filter, "subscription refused: not a valid topic filter");
            return v4::SubscribeReasonCode::Failure;
        }
        if !self.auth.acl().can_subscribe(self.who(), filter) {
            let total = Counters::count(&self.auth.counters.denied_subscriptions);
            warn!(
                filter,
                denied_total = total,
                "subscription denied by the ACL"
            );
            return v4::SubscribeReasonCode::Failure;
        }
        match self.mailbox.subscribe(filter, qos).await {
            Ok(()) => {
                debug!(filter, ?qos, "subscribed");
                v4::SubscribeReasonCode::Success(qos)
            }
            Err(error) => {
                warn!(filter, %error, "subscription failed: NATS did not take it");
                v4::SubscribeReasonCode::Failure
            }
        }
    }

    /// Writes a message for the client's subscriptions (without flushing).
    async fn send(
        &mut self,
        writer: &mut Writer,
        delivery: Delivery,
    ) -> Result<(), mqttbytes::Error> {
        self.send_queued(writer, delivery, None).await
    }

    /// Writes a message (without flushing); `queued` is its place in a
    /// persistent session's queue.
    async fn send_queued(
        &mut self,
        writer: &mut Writer,
        delivery: Delivery,
        queued: Option<u64>,
    ) -> Result<(), mqttbytes::Error> {
        if !self.auth.acl().can_receive(self.who(), &delivery.topic) {
            // Checked on the way out too: a broad subscription, a retained
            // message or a kept session must not leak what the rules deny.
            debug!(topic = %delivery.topic, "not sent: the ACL denies this client the topic");
            self.delivered(queued).await;
            return Ok(());
        }
        let (dup, earlier_pkid) = match (queued, &self.persistent) {
            (Some(sequence), Some(persistent)) => persistent.resent(sequence),
            _ => (false, None),
        };
        let pkid = match delivery.qos {
            QoS::AtMostOnce => 0,
            _ => match earlier_pkid {
                // Sent again under its packet id, as MQTT asks.
                Some(pkid) if pkid != 0 && !self.outgoing.unacked.contains_key(&pkid) => {
                    self.outgoing.reserved.remove(&pkid);
                    pkid
                }
                _ => self.outgoing.next_pkid(),
            },
        };
        let publish = v4::Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: delivery.topic.to_string(),
            pkid,
            payload: delivery.payload,
        };
        if !delivery.user_properties.is_empty() {
            writer
                .encoder_mut()
                .attach_properties(delivery.user_properties.to_vec());
        }
        match writer.feed(v4::Packet::Publish(publish)).await {
            Ok(()) => {}
            Err(mqttbytes::Error::OutgoingPacketTooLarge { pkt_size, max }) => {
                warn!(topic = %delivery.topic, size = pkt_size, max, "message not sent: larger than mqtt.max_packet_size");
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        let awaiting = match delivery.qos {
            // Written is all QoS 0 promises.
            QoS::AtMostOnce => {
                self.confirm(delivery.confirm).await;
                return Ok(());
            }
            QoS::AtLeastOnce => Awaiting::Ack,
            QoS::ExactlyOnce => Awaiting::Received,
        };
        self.outgoing.unacked.insert(
            pkid,
            Unacked {
                awaiting,
                sequence: queued,
                confirm: delivery.confirm,
            },
        );
        if let (Some(sequence), Some(persistent)) = (queued, self.persistent.as_mut()) {
            persistent.sent(sequence, pkid);
        }
        Ok(())
    }

    /// Writes the acknowledgement of a settled publish (without flushing).
    async fn acknowledge(
        &mut self,
        writer: &mut Writer,
        settled: Done,
    ) -> Result<(), mqttbytes::Error> {
        // Routed once stored, and once only: a QoS 2 publish the client sent
        // again before our PUBREC settles a second time.
        let (pkid, qos) = (settled.pkid, settled.qos);
        let repeat = qos == QoS::ExactlyOnce && self.awaiting_release.contains(&pkid);
        if !repeat {
            self.route(settled).await;
        }
        if qos == QoS::AtMostOnce {
            self.qos0_inflight = self.qos0_inflight.saturating_sub(1);
            return Ok(());
        }
        self.inflight = self.inflight.saturating_sub(1);
        match qos {
            QoS::AtMostOnce => Ok(()),
            QoS::AtLeastOnce => writer.feed(v4::Packet::PubAck(v4::PubAck::new(pkid))).await,
            QoS::ExactlyOnce => {
                self.awaiting_release.insert(pkid);
                writer.feed(v4::Packet::PubRec(v4::PubRec::new(pkid))).await
            }
        }
    }
}

/// Why a bounded write closes the connection, if it does.
fn write_failed(
    written: Result<Result<(), mqttbytes::Error>, tokio::time::error::Elapsed>,
) -> Option<Closed> {
    match written {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(Closed::Io(error.to_string())),
        Err(_) => Some(Closed::Io("the device does not read".into())),
    }
}

/// Resolves when a persistent session's queue grew; never without one.
async fn woken(persistent: Option<&mut Persistent>) {
    match persistent {
        Some(persistent) => persistent.woken().await,
        None => std::future::pending().await,
    }
}

/// What a publish of `payload` bytes counts against the budget: its payload
/// and the event built from it, never more than the whole budget.
fn budget_share(payload: usize, total: usize) -> u32 {
    const PER_MESSAGE: usize = 1024;
    u32::try_from((payload + PER_MESSAGE).min(total)).unwrap_or(u32::MAX)
}

fn packet_name(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::Connect(_) => "CONNECT",
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::Publish(_) => "PUBLISH",
        v4::Packet::PubAck(_) => "PUBACK",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubRel(_) => "PUBREL",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::Subscribe(_) => "SUBSCRIBE",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingReq => "PINGREQ",
        v4::Packet::PingResp => "PINGRESP",
        v4::Packet::Disconnect => "DISCONNECT",
    }
}
