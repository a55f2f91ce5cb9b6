//! Publish/subscribe between MQTT clients, routed through NATS: filters,
//! QoS, overlapping subscriptions, `$` topics, several gateways as one
//! broker, NATS applications talking to MQTT clients, real mosquitto
//! clients.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use rumqttc::mqttbytes::v4::{self, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn suback_grants_each_valid_filter_and_refuses_invalid_ones() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut app, _) = RawClient::connect(gateway.mqtt_addr(), "app", true, 30).await;
    let codes = subscribe(
        &mut app,
        4,
        &[
            ("hearth/#", QoS::AtLeastOnce),
            ("zigbee2mqtt/+", QoS::AtMostOnce),
            ("sport/tennis#", QoS::AtMostOnce),
            ("a/#/b", QoS::AtMostOnce),
            ("a/b", QoS::ExactlyOnce),
        ],
    )
    .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::ExactlyOnce),
        ]
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_publish_reaches_matching_subscribers_at_the_lower_qos() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut qos1, _) = RawClient::connect(addr, "sub-qos1", true, 30).await;
    subscribe(&mut qos1, 1, &[("home/+/temp", QoS::AtLeastOnce)]).await;
    let (mut qos0, _) = RawClient::connect(addr, "sub-qos0", true, 30).await;
    subscribe(&mut qos0, 1, &[("home/#", QoS::AtMostOnce)]).await;
    let (mut other, _) = RawClient::connect(addr, "sub-other", true, 30).await;
    subscribe(&mut other, 1, &[("garden/#", QoS::ExactlyOnce)]).await;

    let (mut device, _) = RawClient::connect(addr, "publisher", true, 30).await;
    device
        .publish("home/kitchen/temp", b"21.5", QoS::ExactlyOnce, 7, false)
        .await;
    assert!(matches!(device.next().await, Some(Packet::PubRec(rec)) if rec.pkid == 7));

    let first = next_publish(&mut qos1).await;
    assert_eq!(
        (
            first.topic.as_str(),
            &first.payload[..],
            first.qos,
            first.retain,
            first.dup
        ),
        (
            "home/kitchen/temp",
            &b"21.5"[..],
            QoS::AtLeastOnce,
            false,
            false
        )
    );
    assert_ne!(first.pkid, 0);
    qos1.send(Packet::PubAck(v4::PubAck::new(first.pkid))).await;

    let zero = next_publish(&mut qos0).await;
    assert_eq!(
        (zero.topic.as_str(), zero.qos),
        ("home/kitchen/temp", QoS::AtMostOnce)
    );
    assert!(
        other.silent_for(Duration::from_millis(300)).await,
        "garden/# must not match"
    );

    // Messages keep their order and take fresh packet ids.
    for (pkid, value) in [(8u16, "22"), (9, "23"), (10, "24")] {
        device
            .publish(
                "home/hall/temp",
                value.as_bytes(),
                QoS::AtLeastOnce,
                pkid,
                false,
            )
            .await;
    }
    let mut pkids = Vec::new();
    for value in ["22", "23", "24"] {
        let publish = next_publish(&mut qos1).await;
        assert_eq!(&publish.payload[..], value.as_bytes());
        assert!(!pkids.contains(&publish.pkid));
        pkids.push(publish.pkid);
        qos1.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos_with_the_qos2_flow() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "overlap", true, 30).await;
    subscribe(
        &mut app,
        1,
        &[
            ("a/+", QoS::AtMostOnce),
            ("a/#", QoS::ExactlyOnce),
            ("a/b", QoS::AtLeastOnce),
        ],
    )
    .await;
    let (mut device, _) = RawClient::connect(addr, "pub", true, 30).await;
    device
        .publish("a/b", b"x", QoS::ExactlyOnce, 1, false)
        .await;

    let publish = next_publish(&mut app).await;
    assert_eq!(publish.qos, QoS::ExactlyOnce);
    app.send(Packet::PubRec(v4::PubRec::new(publish.pkid)))
        .await;
    match app.next().await {
        Some(Packet::PubRel(rel)) => assert_eq!(rel.pkid, publish.pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    app.send(Packet::PubComp(v4::PubComp::new(publish.pkid)))
        .await;
    assert!(
        app.silent_for(Duration::from_millis(500)).await,
        "one copy only"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut everything, _) = RawClient::connect(addr, "all", true, 30).await;
    subscribe(
        &mut everything,
        1,
        &[("#", QoS::AtMostOnce), ("+/status", QoS::AtMostOnce)],
    )
    .await;
    let (mut dollar, _) = RawClient::connect(addr, "dollar", true, 30).await;
    subscribe(&mut dollar, 1, &[("$hearth/#", QoS::AtMostOnce)]).await;

    let (mut device, _) = RawClient::connect(addr, "pub", true, 30).await;
    device
        .publish("$hearth/status", b"up", QoS::AtMostOnce, 0, false)
        .await;
    device
        .publish("plain/status", b"up", QoS::AtMostOnce, 0, false)
        .await;

    assert_eq!(next_publish(&mut dollar).await.topic, "$hearth/status");
    assert_eq!(next_publish(&mut everything).await.topic, "plain/status");
    assert!(everything.silent_for(Duration::from_millis(300)).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn unsubscribing_stops_delivery_and_empty_levels_route() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "app", true, 30).await;
    subscribe(
        &mut app,
        1,
        &[("/a//b", QoS::AtMostOnce), ("x/y", QoS::AtMostOnce)],
    )
    .await;
    let (mut device, _) = RawClient::connect(addr, "pub", true, 30).await;
    device
        .publish("/a//b", b"1", QoS::AtMostOnce, 0, false)
        .await;
    assert_eq!(next_publish(&mut app).await.topic, "/a//b");

    let mut unsubscribe = v4::Unsubscribe::new("/a//b");
    unsubscribe.pkid = 2;
    app.send(Packet::Unsubscribe(unsubscribe)).await;
    assert!(matches!(app.next().await, Some(Packet::UnsubAck(ack)) if ack.pkid == 2));
    device
        .publish("/a//b", b"2", QoS::AtMostOnce, 0, false)
        .await;
    device.publish("x/y", b"3", QoS::AtMostOnce, 0, false).await;
    let next = next_publish(&mut app).await;
    assert_eq!((next.topic.as_str(), &next.payload[..]), ("x/y", &b"3"[..]));
    gateway.shutdown().await;
}

#[tokio::test]
async fn two_gateways_on_one_nats_behave_as_one_broker() {
    let nats = TestNats::start().await;
    let east = gateway(&nats, |_| {}).await;
    let west = gateway(&nats, |_| {}).await;
    let (mut app, _) = RawClient::connect(east.mqtt_addr(), "app", true, 30).await;
    subscribe(&mut app, 1, &[("zigbee2mqtt/+", QoS::AtLeastOnce)]).await;
    let (mut device, _) = RawClient::connect(west.mqtt_addr(), "sensor", true, 30).await;
    device
        .publish(
            "zigbee2mqtt/porch",
            br#"{"occupancy":true}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;
    let publish = next_publish(&mut app).await;
    assert_eq!(publish.topic, "zigbee2mqtt/porch");
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    east.shutdown().await;
    west.shutdown().await;
}

#[tokio::test]
async fn nats_applications_publish_to_and_listen_to_mqtt_clients() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut listener = client.subscribe("hearth.mqtt.>").await.unwrap();
    // Round trip: the server has the subscription once it answers.
    let _ = client.request(client.new_inbox(), "".into()).await;

    let (mut app, _) = RawClient::connect(gateway.mqtt_addr(), "app", true, 30).await;
    subscribe(&mut app, 1, &[("lights/+/set", QoS::AtLeastOnce)]).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Hearth-Mqtt-Qos", "1");
    client
        .publish_with_headers("hearth.mqtt.lights.Living%20Room.set", headers, "on".into())
        .await
        .unwrap();
    let publish = next_publish(&mut app).await;
    assert_eq!(publish.topic, "lights/Living Room/set");
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    // Without the header it is QoS 0.
    client
        .publish("hearth.mqtt.lights.hall.set", "off".into())
        .await
        .unwrap();
    assert_eq!(next_publish(&mut app).await.qos, QoS::AtMostOnce);

    // And what MQTT clients publish can be seen on NATS.
    app.publish("lights/hall/state", b"off", QoS::AtLeastOnce, 5, false)
        .await;
    use futures::StreamExt;
    let seen = loop {
        let message = tokio::time::timeout(PROMPTLY, listener.next())
            .await
            .expect("routed in time")
            .unwrap();
        if message.subject.as_str() == "hearth.mqtt.lights.hall.state" {
            break message;
        }
    };
    assert_eq!(&seen.payload[..], b"off");
    assert_eq!(
        seen.headers
            .as_ref()
            .and_then(|h| h.get("Hearth-Mqtt-Qos"))
            .map(|v| v.as_str()),
        Some("1")
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_loses_only_its_own_messages() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.mqtt.max_queued = 5;
        config.mqtt.max_inflight = 5;
    })
    .await;
    let addr = gateway.mqtt_addr();
    // Subscribes, then never acknowledges: its window of 5 fills, then its
    // queue of 5, then messages for it are dropped.
    let (mut stuck, _) = RawClient::connect(addr, "stuck", true, 30).await;
    subscribe(&mut stuck, 1, &[("load/#", QoS::AtLeastOnce)]).await;
    let (mut healthy, _) = RawClient::connect(addr, "healthy", true, 30).await;
    subscribe(&mut healthy, 1, &[("load/#", QoS::AtMostOnce)]).await;

    let (mut device, _) = RawClient::connect(addr, "pub", true, 30).await;
    for i in 0..40u16 {
        device
            .publish(
                "load/x",
                i.to_string().as_bytes(),
                QoS::AtLeastOnce,
                i + 1,
                false,
            )
            .await;
        device.expect_puback(i + 1).await;
    }
    for i in 0..40u16 {
        let publish = next_publish(&mut healthy).await;
        assert_eq!(&publish.payload[..], i.to_string().as_bytes());
    }
    let health = http_get(gateway.http_addr(), "/healthz").await;
    let body: serde_json::Value =
        serde_json::from_str(health.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let dropped = body["queue_dropped"].as_u64().unwrap();
    assert!((25..=30).contains(&dropped), "dropped {dropped}: {body}");
    // The stuck client got its window's worth, in order.
    for i in 0..5u16 {
        assert_eq!(
            &next_publish(&mut stuck).await.payload[..],
            i.to_string().as_bytes()
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn mosquitto_clients_publish_and_subscribe_through_the_gateway() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let port = gateway.mqtt_addr().port().to_string();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "mosq-sub",
            "-q",
            "1",
            "-v",
        ])
        .args([
            "-t",
            "zigbee2mqtt/+",
            "-t",
            "hearth/+/+/+/motion",
            "-C",
            "2",
            "-W",
            "20",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub");
    wait_for_subscriptions(&gateway, 2).await;
    for (topic, message) in [
        ("zigbee2mqtt/Hall Sensor", r#"{"occupancy":true}"#),
        ("hearth/home/hall/pir/motion", r#"{"detected":true}"#),
    ] {
        let status = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                message,
            ])
            .status()
            .await
            .expect("run mosquitto_pub");
        assert!(status.success());
    }
    let output = tokio::time::timeout(Duration::from_secs(30), sub.wait_with_output())
        .await
        .expect("mosquitto_sub ends after two messages")
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "zigbee2mqtt/Hall Sensor {\"occupancy\":true}\nhearth/home/hall/pir/motion {\"detected\":true}\n"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn retained_messages_greet_new_subscriptions_and_an_empty_one_deletes() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut device, _) = RawClient::connect(addr, "device", true, 30).await;
    for (pkid, topic, payload) in [
        (1, "r/a", "1"),
        (2, "r/b", "2"),
        (3, "r/a", "3"),
        (4, "r/c", "4"),
    ] {
        let mut publish = v4::Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        publish.retain = true;
        device.send(Packet::Publish(publish)).await;
        device.expect_puback(pkid).await;
    }
    // Deleted by an empty retained publish.
    let mut delete = v4::Publish::new("r/c", QoS::AtMostOnce, Vec::new());
    delete.retain = true;
    device.send(Packet::Publish(delete)).await;

    let (mut app, _) = RawClient::connect(addr, "app", true, 30).await;
    // Wait for the QoS 0 delete to be stored: it has no PUBACK to wait for.
    let js = jetstream(&nats).await;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    while stored(&js, "HEARTH_RETAINED")
        .await
        .iter()
        .all(|m| !m.payload.is_empty())
    {
        assert!(tokio::time::Instant::now() < deadline, "delete not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscribe(&mut app, 1, &[("r/+", QoS::AtMostOnce)]).await;
    let mut greeted = Vec::new();
    for _ in 0..2 {
        let publish = next_publish(&mut app).await;
        assert!(publish.retain, "sent because of the subscription: retained");
        assert_eq!(
            publish.qos,
            QoS::AtMostOnce,
            "downgraded to the granted QoS"
        );
        greeted.push((
            publish.topic,
            String::from_utf8(publish.payload.to_vec()).unwrap(),
        ));
    }
    greeted.sort();
    assert_eq!(
        greeted,
        [
            ("r/a".to_owned(), "3".to_owned()),
            ("r/b".to_owned(), "2".to_owned())
        ]
    );
    assert!(
        app.silent_for(Duration::from_millis(300)).await,
        "r/c was deleted"
    );

    // A live retained publish reaches existing subscribers without the flag.
    let mut live = v4::Publish::new("r/b", QoS::AtLeastOnce, "5");
    live.pkid = 9;
    live.retain = true;
    device.send(Packet::Publish(live)).await;
    let publish = next_publish(&mut app).await;
    assert_eq!((publish.topic.as_str(), publish.retain), ("r/b", false));

    // One message per topic is kept, the delete as an empty one.
    let kept = stored(&js, "HEARTH_RETAINED").await;
    let mut subjects: Vec<_> = kept.iter().map(|m| m.subject.to_string()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "hearth.retained.r.a",
            "hearth.retained.r.b",
            "hearth.retained.r.c"
        ]
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn retained_messages_survive_a_gateway_restart_with_mosquitto_clients() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let nats = TestNats::start().await;
    let first = gateway(&nats, |_| {}).await;
    let port = first.mqtt_addr().port().to_string();
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-r"])
        .args(["-t", "homeassistant/status", "-m", "online"])
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success());
    first.shutdown().await;

    let second = gateway(&nats, |_| {}).await;
    let port = second.mqtt_addr().port().to_string();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-v", "-C", "1", "-W", "20"])
            .args(["-t", "homeassistant/#", "-F", "%r %t %p"])
            .output(),
    )
    .await
    .expect("mosquitto_sub ends")
    .expect("run mosquitto_sub");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "1 homeassistant/status online\n"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn a_retained_message_reaches_subscribers_of_another_gateway() {
    let nats = TestNats::start().await;
    let east = gateway(&nats, |_| {}).await;
    let west = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(east.mqtt_addr(), "device", true, 30).await;
    let mut publish = v4::Publish::new("porch/light", QoS::AtLeastOnce, "on");
    publish.pkid = 1;
    publish.retain = true;
    device.send(Packet::Publish(publish)).await;
    device.expect_puback(1).await;
    // West follows the retained stream: it learns of it within moments.
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let (mut app, _) = RawClient::connect(west.mqtt_addr(), "app", true, 30).await;
        subscribe(&mut app, 1, &[("porch/#", QoS::AtLeastOnce)]).await;
        if let Some(packet) = app.next_within(Duration::from_millis(200)).await {
            let Packet::Publish(publish) = packet else {
                panic!("expected PUBLISH, got {packet:?}");
            };
            assert_eq!(
                (publish.topic.as_str(), &publish.payload[..], publish.retain),
                ("porch/light", &b"on"[..], true)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "west never learned the retained message"
        );
    }
    east.shutdown().await;
    west.shutdown().await;
}

/// Connects `client_id` with a will and returns the client.
async fn connect_with_will(
    addr: std::net::SocketAddr,
    client_id: &str,
    keep_alive: u16,
    will: v4::LastWill,
) -> RawClient {
    let mut client = RawClient::open(addr).await;
    let mut connect = v4::Connect::new(client_id);
    connect.keep_alive = keep_alive;
    connect.last_will = Some(will);
    client.send(Packet::Connect(connect)).await;
    assert!(
        matches!(client.next().await, Some(Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success)
    );
    client
}

#[tokio::test]
async fn the_will_is_published_stored_and_retained_when_a_client_vanishes() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut watcher, _) = RawClient::connect(addr, "watcher", true, 30).await;
    subscribe(
        &mut watcher,
        1,
        &[("hearth/+/+/+/availability", QoS::AtLeastOnce)],
    )
    .await;

    let will = v4::LastWill::new(
        "hearth/home/hall/pir/availability",
        "offline",
        QoS::AtLeastOnce,
        true,
    );
    let device = connect_with_will(addr, "pir", 30, will).await;
    drop(device); // the socket closes without DISCONNECT

    let publish = next_publish(&mut watcher).await;
    assert_eq!(
        (publish.topic.as_str(), &publish.payload[..], publish.qos),
        (
            "hearth/home/hall/pir/availability",
            &b"offline"[..],
            QoS::AtLeastOnce
        )
    );
    watcher
        .send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
        .await;
    // Stored as an availability event of the device...
    let js = jetstream(&nats).await;
    let events = stored_at_least(&js, "HEARTH_EVENTS", 1).await;
    let event = json(&events[0]);
    assert_eq!(event["device"], "pir");
    assert_eq!(event["availability"]["online"], false, "{event}");
    assert_eq!(event["source"]["clientId"], "pir");
    // ...and, retained, greets later subscribers.
    let (mut later, _) = RawClient::connect(addr, "later", true, 30).await;
    subscribe(&mut later, 1, &[("hearth/#", QoS::AtMostOnce)]).await;
    let greeted = next_publish(&mut later).await;
    assert!(greeted.retain);
    assert_eq!(&greeted.payload[..], b"offline");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_clean_disconnect_publishes_no_will_and_a_keep_alive_timeout_does() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut watcher, _) = RawClient::connect(addr, "watcher", true, 30).await;
    subscribe(&mut watcher, 1, &[("wills/#", QoS::AtMostOnce)]).await;

    let mut polite = connect_with_will(
        addr,
        "polite",
        30,
        v4::LastWill::new("wills/polite", "gone", QoS::AtMostOnce, false),
    )
    .await;
    polite.send(Packet::Disconnect).await;
    assert!(polite.closed_within(PROMPTLY).await);
    assert!(
        watcher.silent_for(Duration::from_millis(500)).await,
        "no will after DISCONNECT"
    );

    // Keep-alive 1 s: silent for 1.5 s, the gateway gives up on it.
    let _silent = connect_with_will(
        addr,
        "silent",
        1,
        v4::LastWill::new("wills/silent", "gone", QoS::AtMostOnce, false),
    )
    .await;
    let publish = next_publish(&mut watcher).await;
    assert_eq!(publish.topic, "wills/silent");
    gateway.shutdown().await;
}

#[tokio::test]
async fn an_invalid_will_topic_closes_the_connection() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let mut client = RawClient::open(gateway.mqtt_addr()).await;
    let mut connect = v4::Connect::new("bad-will");
    connect.last_will = Some(v4::LastWill::new("wills/#", "x", QoS::AtMostOnce, false));
    client.send(Packet::Connect(connect)).await;
    assert!(client.closed_within(PROMPTLY).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_will_of_a_killed_mosquitto_client_is_published() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut watcher, _) = RawClient::connect(addr, "watcher", true, 30).await;
    subscribe(
        &mut watcher,
        1,
        &[("zigbee2mqtt/+/availability", QoS::AtLeastOnce)],
    )
    .await;
    let port = addr.port().to_string();
    let mut doomed = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "doomed",
            "-t",
            "nothing/here",
        ])
        .args([
            "--will-topic",
            "zigbee2mqtt/Porch Light/availability",
            "--will-payload",
            "offline",
            "--will-qos",
            "1",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub");
    wait_for_subscriptions(&gateway, 2).await;
    doomed.kill().await.expect("SIGKILL mosquitto_sub");
    let publish = next_publish(&mut watcher).await;
    assert_eq!(
        (publish.topic.as_str(), &publish.payload[..]),
        ("zigbee2mqtt/Porch Light/availability", &b"offline"[..])
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_will_elsewhere_marks_the_clients_devices_offline() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let will = v4::LastWill::new("status/pir", "gone", QoS::AtLeastOnce, false);
    let mut device = connect_with_will(gateway.mqtt_addr(), "pir-client", 30, will).await;
    device
        .publish(
            "hearth/home/hall/pir/motion",
            br#"{"detected":true}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;
    drop(device);

    let js = jetstream(&nats).await;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let offline = loop {
        let events: Vec<_> = stored(&js, "HEARTH_EVENTS")
            .await
            .iter()
            .map(json)
            .collect();
        if let Some(event) = events.iter().find(|e| e.get("availability").is_some()) {
            break event.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no availability event: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(offline["availability"]["online"], false);
    assert_eq!(
        (
            offline["home"].as_str(),
            offline["room"].as_str(),
            offline["device"].as_str()
        ),
        (Some("home"), Some("hall"), Some("pir"))
    );
    assert_eq!(offline["source"]["convention"], "gateway");
    assert_eq!(offline["source"]["clientId"], "pir-client");
    gateway.shutdown().await;
}
