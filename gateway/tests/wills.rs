//! Last wills are stored once per connection that ends without DISCONNECT
//! (MQTT 3.1.1, 3.1.2.5), however it ends: the client vanishing, or another
//! connection taking its client id over (3.1.4: the server disconnects the
//! existing client, which is a close without DISCONNECT). Never twice for
//! one connection, also when a takeover and the old socket's end race each
//! other, and never folded into one when a device's identical wills follow
//! each other (a will always has packet id 0).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;

/// As many devices as hearth-sim's reconnect storm has wills.
const DEVICES: usize = 26;

fn client_id(device: usize) -> String {
    format!("dev-{device}")
}

fn availability_topic(device: usize) -> String {
    format!("hearth/home/hall/dev-{device}/availability")
}

/// What hearth-sim's devices leave: `offline`, QoS 1, retained.
fn will(device: usize) -> v4::LastWill {
    v4::LastWill::new(
        availability_topic(device),
        "offline",
        QoS::AtLeastOnce,
        true,
    )
}

/// Sends CONNECT with `device`'s will; the CONNACK is not waited for.
async fn send_connect(addr: SocketAddr, device: usize) -> RawClient {
    let mut client = RawClient::open(addr).await;
    let mut connect = v4::Connect::new(client_id(device));
    connect.keep_alive = 30;
    connect.last_will = Some(will(device));
    client.send(Packet::Connect(connect)).await;
    client
}

/// Connects `device` with its will, as a device does after every (re)connect:
/// `online` (retained) first, then a reading; both acknowledged.
async fn come_online(addr: SocketAddr, device: usize) -> RawClient {
    let mut client = send_connect(addr, device).await;
    match client.next().await {
        Some(Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => {}
        other => panic!(
            "{}: expected a successful CONNACK, got {other:?}",
            client_id(device)
        ),
    }
    let mut online = v4::Publish::new(availability_topic(device), QoS::AtLeastOnce, "online");
    online.pkid = 1;
    online.retain = true;
    client.send(Packet::Publish(online)).await;
    client.expect_puback(1).await;
    client
        .publish(
            &format!("hearth/home/hall/dev-{device}/temperature"),
            br#"{"celsius":21.5}"#,
            QoS::AtLeastOnce,
            2,
            false,
        )
        .await;
    client.expect_puback(2).await;
    client
}

async fn disconnect(mut client: RawClient) {
    client.send(Packet::Disconnect).await;
    assert!(client.closed_within(PROMPTLY).await);
}

/// The availability events in HEARTH_EVENTS: offline ones per client id,
/// and how many say online.
async fn availability(js: &jetstream::Context) -> (BTreeMap<String, usize>, usize) {
    let mut offline = BTreeMap::new();
    let mut online = 0;
    for message in stored(js, "HEARTH_EVENTS").await {
        let event = json(&message);
        match event["availability"]["online"].as_bool() {
            Some(false) => {
                let client = event["source"]["clientId"].as_str().unwrap().to_owned();
                *offline.entry(client).or_default() += 1;
            }
            Some(true) => online += 1,
            None => {}
        }
    }
    (offline, online)
}

/// Waits until HEARTH_EVENTS holds `expected` offline events in all, and
/// returns them per client id a while later (time for a second copy of any
/// to show).
async fn offline_events(js: &jetstream::Context, expected: usize) -> BTreeMap<String, usize> {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let (offline, _) = availability(js).await;
        let total: usize = offline.values().sum();
        if total >= expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{total} offline events, expected {expected}: {offline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    availability(js).await.0
}

fn each(count: usize) -> BTreeMap<String, usize> {
    (0..DEVICES)
        .map(|device| (client_id(device), count))
        .collect()
}

/// What each device's availability topic holds retained now.
async fn retained_availability(js: &jetstream::Context, device: usize) -> String {
    let stream = js.get_stream("HEARTH_RETAINED").await.unwrap();
    let subject = hearth_proto::subject::retained_subject(&availability_topic(device)).unwrap();
    let message = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap_or_else(|error| panic!("{subject}: {error}"));
    String::from_utf8(message.payload.to_vec()).unwrap()
}

#[tokio::test]
async fn a_connection_taken_over_leaves_one_will_however_its_socket_ends() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let js = jetstream(&nats).await;

    let mut old = come_online(addr, 0).await;
    let newer = come_online(addr, 0).await;
    // The gateway closed the old connection (its will went out then); the
    // client's own close that follows is no second end of it.
    assert!(
        old.closed_within(PROMPTLY).await,
        "the old connection is closed"
    );
    drop(old);
    disconnect(newer).await;

    let offline = offline_events(&js, 1).await;
    assert_eq!(offline, BTreeMap::from([(client_id(0), 1)]));
    assert_eq!(retained_availability(&js, 0).await, "online");
    gateway.shutdown().await;
}

/// hearth-sim's reconnect storm without the simulator: every device drops
/// its connection and reconnects at once, all at the same time, twice. A
/// third close the old socket first, a third connect first (a takeover
/// while the old socket is open; it is closed after the new CONNACK), and a
/// third do both at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_leaves_exactly_one_will_per_dropped_connection() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let js = jetstream(&nats).await;

    let mut clients = Vec::new();
    for device in 0..DEVICES {
        clients.push(come_online(addr, device).await);
    }
    for round in 1..=2 {
        let storm = clients.into_iter().enumerate().map(|(device, old)| {
            tokio::spawn(async move {
                match device % 3 {
                    0 => {
                        drop(old);
                        come_online(addr, device).await
                    }
                    1 => {
                        let newer = come_online(addr, device).await;
                        drop(old);
                        newer
                    }
                    _ => {
                        let connecting = tokio::spawn(come_online(addr, device));
                        tokio::task::yield_now().await;
                        drop(old);
                        connecting.await.unwrap()
                    }
                }
            })
        });
        clients = futures::future::join_all(storm)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // The identical will of the next round is a new one, not a
        // duplicate of this round's (both have packet id 0).
        assert_eq!(
            offline_events(&js, round * DEVICES).await,
            each(round),
            "after storm {round}"
        );
    }
    for client in clients {
        disconnect(client).await;
    }

    assert_eq!(offline_events(&js, 2 * DEVICES).await, each(2));
    let (_, online) = availability(&js).await;
    assert_eq!(online, 3 * DEVICES, "every `online` stored once");
    let readings = stored(&js, "HEARTH_EVENTS")
        .await
        .iter()
        .filter(|message| json(message).get("temperature").is_some())
        .count();
    assert_eq!(readings, 3 * DEVICES, "every reading stored once");
    for device in 0..DEVICES {
        assert_eq!(
            retained_availability(&js, device).await,
            "online",
            "no will stored after the device's `online`"
        );
    }
    gateway.shutdown().await;
}

/// What hearth-sim's devices did now and then in the storm: rumqttc's
/// connect was cancelled after it had sent CONNECT (the device's task
/// dropped `EventLoop::poll` for a message from the world), so the device
/// closed that socket unanswered and connected again. The gateway had
/// accepted the CONNECT: a connection of its own, ended without
/// DISCONNECT, with a will of its own. The device counts one dropout; the
/// gateway rightly stores two wills.
#[tokio::test]
async fn a_connection_abandoned_before_its_connack_leaves_a_will_of_its_own() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let js = jetstream(&nats).await;

    let old = come_online(addr, 0).await;
    drop(old);
    let abandoned = send_connect(addr, 0).await;
    drop(abandoned);
    // Both ended without DISCONNECT.
    assert_eq!(
        offline_events(&js, 2).await,
        BTreeMap::from([(client_id(0), 2)])
    );
    disconnect(come_online(addr, 0).await).await;

    assert_eq!(
        offline_events(&js, 2).await,
        BTreeMap::from([(client_id(0), 2)])
    );
    assert_eq!(retained_availability(&js, 0).await, "online");
    gateway.shutdown().await;
}

/// A device's second (identical) will goes to a persistent session that
/// subscribed after the first: its copy is queued once. The will's events
/// are duplicates of the first will's, so the store pipeline moves the
/// publish to generation 1 (`ingest/pipeline.rs`); the session's copy must
/// be queued under that generation only, not under 0 as well.
#[tokio::test]
async fn a_repeated_will_is_queued_once_for_a_session_subscribed_since_the_first() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let js = jetstream(&nats).await;
    let mut first = send_connect(addr, 0).await;
    assert!(matches!(first.next().await, Some(Packet::ConnAck(_))));
    drop(first);
    offline_events(&js, 1).await;

    let (mut app, _) = RawClient::connect(addr, "app", false, 30).await;
    subscribe_one(&mut app, "hearth/+/+/+/availability", QoS::AtLeastOnce).await;
    let retained = next_publish(&mut app).await;
    assert_eq!(
        &retained.payload[..],
        b"offline",
        "the first will, retained"
    );
    app.send(Packet::PubAck(v4::PubAck::new(retained.pkid)))
        .await;
    disconnect(app).await;

    let mut second = send_connect(addr, 0).await;
    assert!(matches!(second.next().await, Some(Packet::ConnAck(_))));
    drop(second);
    offline_events(&js, 2).await;

    let (mut app, ack) = RawClient::connect(addr, "app", false, 30).await;
    assert!(ack.session_present);
    let mut received = Vec::new();
    while let Some(Packet::Publish(publish)) = app.next_within(Duration::from_secs(2)).await {
        app.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;
        received.push(String::from_utf8(publish.payload.to_vec()).unwrap());
    }
    assert_eq!(received, ["offline"], "the second will, once");
    gateway.shutdown().await;
}
