//! What the gateway's integration tests share: a gateway started in-process
//! against a test nats-server, a raw MQTT client for precise protocol
//! checks, and readers of what JetStream stored.

#![allow(dead_code, unreachable_pub)]

pub mod meters;
pub mod pki;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use futures::{SinkExt, StreamExt};
use hearth_gateway::config::Config;
use hearth_gateway::Gateway;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub use hearth_test_support::TestNats;

/// How long a test waits for something that should happen promptly.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A gateway on free ports, storing into `nats`.
pub async fn gateway(nats: &TestNats, adjust: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    adjust(&mut config);
    Gateway::start(config).await.expect("gateway starts")
}

/// The real `hearth-gateway` binary, anonymous clients allowed, storing
/// into `nats_url`, MQTT on `mqtt`, HTTP on a free port, its data in
/// `data`, then `extra` options; warnings only in its log. Killed when
/// dropped (or by the test, e.g. mid-stream).
pub fn spawn_gateway_binary(
    nats_url: &str,
    mqtt: SocketAddr,
    data: &std::path::Path,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth-gateway"))
        .args(["--nats-url", nats_url, "--mqtt-listen", &mqtt.to_string()])
        .args(["--http-listen", "127.0.0.1:0", "--allow-anonymous"])
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("HEARTH_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-gateway")
}

pub async fn jetstream(nats: &TestNats) -> jetstream::Context {
    jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("connect to NATS"),
    )
}

/// Every message in `stream`, oldest first.
pub async fn stored(js: &jetstream::Context, stream: &str) -> Vec<StreamMessage> {
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            messages.push(message);
        }
    }
    messages
}

/// Waits until `stream` holds at least `count` messages, then returns all.
pub async fn stored_at_least(
    js: &jetstream::Context,
    stream: &str,
    count: u64,
) -> Vec<StreamMessage> {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let mut handle = js.get_stream(stream).await.expect("stream exists");
        let messages = handle.info().await.expect("stream info").state.messages;
        if messages >= count || tokio::time::Instant::now() > deadline {
            return stored(js, stream).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|value| value.as_str())
}

pub fn json(message: &StreamMessage) -> serde_json::Value {
    serde_json::from_slice(&message.payload).expect("stored payload is JSON")
}

/// An MQTT 3.1.1 client that sends exactly the packets a test writes, for
/// what rumqttc cannot be made to do (DUP flags, fixed packet ids, bad
/// packets, silence).
pub struct RawClient {
    framed: Framed<TcpStream, v4::Codec>,
}

impl RawClient {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("TCP connect");
        let codec = v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        };
        Self {
            framed: Framed::new(stream, codec),
        }
    }

    /// Connects and returns the CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> (Self, v4::ConnAck) {
        let mut client = Self::open(addr).await;
        let mut connect = v4::Connect::new(client_id);
        connect.clean_session = clean;
        connect.keep_alive = keep_alive;
        client.send(Packet::Connect(connect)).await;
        match client.next().await {
            Some(Packet::ConnAck(ack)) => (client, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: Packet) {
        self.framed.send(packet).await.expect("send packet");
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed
            .get_mut()
            .write_all(bytes)
            .await
            .expect("write bytes");
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16, dup: bool) {
        let mut publish = v4::Publish::new(topic, qos, payload.to_vec());
        publish.pkid = pkid;
        publish.dup = dup;
        self.send(Packet::Publish(publish)).await;
    }

    /// The next packet, or `None` when the server closed the connection or
    /// nothing came within [`PROMPTLY`].
    pub async fn next(&mut self) -> Option<Packet> {
        match tokio::time::timeout(PROMPTLY, self.framed.next()).await {
            Ok(Some(Ok(packet))) => Some(packet),
            _ => None,
        }
    }

    /// Waits for the PUBACK of `pkid` (failing on anything else).
    pub async fn expect_puback(&mut self, pkid: u16) {
        match self.next().await {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => {}
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }

    /// The next packet if one comes within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Packet> {
        match tokio::time::timeout(within, self.framed.next()).await {
            Ok(Some(Ok(packet))) => Some(packet),
            _ => None,
        }
    }

    /// Whether nothing at all (no packet, no close) came within `within`.
    pub async fn silent_for(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.framed.next())
            .await
            .is_err()
    }

    /// Whether the server closed the connection within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        loop {
            match tokio::time::timeout(within, self.framed.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// A rumqttc client with its event loop driven in the background; returns
/// the client and a receiver of the packet ids the server acknowledged.
pub fn rumqttc_client(
    addr: SocketAddr,
    client_id: &str,
    inflight: u16,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<u16>,
    tokio::task::JoinHandle<()>,
) {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(inflight);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, usize::from(inflight) * 2);
    let (acks_tx, acks) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack))) => {
                    let _ = acks_tx.send(ack.pkid);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "test client event loop ended");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    (client, acks, task)
}

/// A plain HTTP/1.1 GET; the whole response, status line first.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Subscribes `client` to `filters` and returns the SUBACK's codes.
pub async fn subscribe(
    client: &mut RawClient,
    pkid: u16,
    filters: &[(&str, QoS)],
) -> Vec<v4::SubscribeReasonCode> {
    let mut subscribe = v4::Subscribe::new_many(
        filters
            .iter()
            .map(|(filter, qos)| v4::SubscribeFilter::new((*filter).to_owned(), *qos)),
    );
    subscribe.pkid = pkid;
    client.send(Packet::Subscribe(subscribe)).await;
    match client.next().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, pkid);
            ack.return_codes
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Subscribes `client` to one filter, which must be granted at `qos`.
pub async fn subscribe_one(client: &mut RawClient, filter: &str, qos: QoS) {
    let codes = subscribe(client, 1, &[(filter, qos)]).await;
    assert_eq!(codes, [v4::SubscribeReasonCode::Success(qos)], "{filter}");
}

/// The next PUBLISH sent to `client`.
pub async fn next_publish(client: &mut RawClient) -> v4::Publish {
    match client.next().await {
        Some(Packet::Publish(publish)) => publish,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Waits until the gateway counts `count` subscriptions.
pub async fn wait_for_subscriptions(gateway: &hearth_gateway::Gateway, count: usize) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let expected = format!("\"mqtt_subscriptions\":{count}");
    loop {
        let health = http_get(gateway.http_addr(), "/healthz").await;
        if health.contains(&expected) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {count} subscriptions: {health}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
