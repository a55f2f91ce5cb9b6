//! The MQTT 3.1.1 server side, packet by packet, with a raw client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::{self, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn an_empty_client_id_with_clean_session_is_accepted_and_without_it_refused() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;

    let (mut anonymous, ack) = RawClient::connect(gateway.mqtt_addr(), "", true, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present);
    anonymous
        .publish(
            "hearth/h/r/d/motion",
            br#"{"detected":false}"#,
            QoS::AtLeastOnce,
            3,
            false,
        )
        .await;
    anonymous.expect_puback(3).await;
    let js = jetstream(&nats).await;
    let event = json(&stored(&js, "HEARTH_EVENTS").await[0]);
    assert!(
        event["source"]["clientId"]
            .as_str()
            .unwrap()
            .starts_with("hearth-"),
        "an assigned id is recorded: {event}"
    );

    let (mut refused, ack) = RawClient::connect(gateway.mqtt_addr(), "", false, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    assert!(refused.closed_within(PROMPTLY).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn unsupported_protocol_levels_are_refused_with_the_version_code() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    // MQTT 3.1 ("MQIsdp", level 3) and an unknown level 6, by hand (MQTT 5
    // is spoken: see tests/mqtt5.rs).
    let mqtt31: &[u8] = &[
        0x10, 0x12, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x1e, 0x00,
        0x04, b't', b'e', b's', b't',
    ];
    let level6: &[u8] = &[
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x1e, 0x00, 0x04, b't',
        b'e', b's', b't',
    ];
    for connect in [mqtt31, level6] {
        let mut client = RawClient::open(gateway.mqtt_addr()).await;
        client.send_bytes(connect).await;
        match client.next().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion)
            }
            other => panic!("expected CONNACK 0x01, got {other:?}"),
        }
        assert!(client.closed_within(PROMPTLY).await);
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_is_disconnected_after_one_and_a_half_keep_alives() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut quiet, _) = RawClient::connect(gateway.mqtt_addr(), "quiet", true, 1).await;
    let (mut chatty, _) = RawClient::connect(gateway.mqtt_addr(), "chatty", true, 1).await;
    let started = Instant::now();
    // The chatty one pings every 800 ms and stays; the quiet one goes.
    let pinger = tokio::spawn(async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(800)).await;
            chatty.send(Packet::PingReq).await;
            assert!(matches!(chatty.next().await, Some(Packet::PingResp)));
        }
    });
    assert!(quiet.closed_within(Duration::from_secs(5)).await);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400),
        "not before 1.5 x keep-alive: {elapsed:?}"
    );
    pinger.await.expect("the pinging client stays connected");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut first, _) = RawClient::connect(gateway.mqtt_addr(), "twin", true, 30).await;
    let (mut second, ack) = RawClient::connect(gateway.mqtt_addr(), "twin", true, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(
        first.closed_within(PROMPTLY).await,
        "the old connection is closed"
    );
    second.send(Packet::PingReq).await;
    assert!(matches!(second.next().await, Some(Packet::PingResp)));
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_malformed_packet_closes_only_its_own_connection() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut good, _) = RawClient::connect(gateway.mqtt_addr(), "good", true, 30).await;
    let (mut bad, _) = RawClient::connect(gateway.mqtt_addr(), "bad", true, 30).await;

    // A QoS 1 PUBLISH whose packet id is 0 is malformed.
    bad.send_bytes(&[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00])
        .await;
    assert!(bad.closed_within(PROMPTLY).await);

    // So is garbage in place of a first packet.
    let mut garbage = RawClient::open(gateway.mqtt_addr()).await;
    garbage.send_bytes(&[0xff; 16]).await;
    assert!(garbage.closed_within(PROMPTLY).await);

    good.publish(
        "hearth/h/r/d/tamper",
        br#"{"detected":true}"#,
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    good.expect_puback(1).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_packet_over_the_size_limit_closes_the_connection() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.mqtt.max_packet_size = 1024).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "big", true, 30).await;
    device
        .publish(
            "hearth/h/r/d/button",
            &vec![b'x'; 4096],
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    assert!(device.closed_within(PROMPTLY).await);
    let js = jetstream(&nats).await;
    assert!(stored(&js, "HEARTH_EVENTS").await.is_empty());
    assert!(stored(&js, "HEARTH_DLQ").await.is_empty());
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_first_packet_must_be_connect() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let mut client = RawClient::open(gateway.mqtt_addr()).await;
    client.send(Packet::PingReq).await;
    assert!(client.closed_within(PROMPTLY).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_wildcard_in_a_published_topic_is_a_protocol_error() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "wild", true, 30).await;
    device
        .publish("hearth/+/r/d/motion", b"{}", QoS::AtLeastOnce, 1, false)
        .await;
    assert!(device.closed_within(PROMPTLY).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn publishes_in_flight_at_a_graceful_disconnect_are_still_stored() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "brief", true, 30).await;
    for pkid in 1..=20u16 {
        let payload = format!(r#"{{"celsius":{}}}"#, pkid);
        device
            .publish(
                "hearth/h/r/t/temperature",
                payload.as_bytes(),
                QoS::AtLeastOnce,
                pkid,
                false,
            )
            .await;
    }
    device.send(Packet::Disconnect).await;
    assert_eq!(stored_at_least(&js, "HEARTH_EVENTS", 20).await.len(), 20);
    gateway.shutdown().await;
}

/// A small deterministic generator, so that a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn random_and_mutated_packets_never_take_the_listener_down() {
    // A panic in a connection task would be caught by tokio and go
    // unnoticed; count every panic in this process instead.
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        previous(info);
    }));

    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.mqtt.connect_timeout = Duration::from_secs(1)
    })
    .await;
    // No keep-alive: a long run (HEARTH_FUZZ_ROUNDS) outlasts any.
    let (mut good, _) = RawClient::connect(gateway.mqtt_addr(), "steady", true, 0).await;

    // Valid packets to mutate: a CONNECT followed by a PUBLISH.
    let mut valid = bytes::BytesMut::new();
    let mut connect = v4::Connect::new("fuzz");
    connect.keep_alive = 5;
    connect.write(&mut valid).unwrap();
    let mut publish = v4::Publish::new(
        "hearth/h/r/d/motion",
        QoS::AtLeastOnce,
        br#"{"detected":true}"#.to_vec(),
    );
    publish.pkid = 1;
    publish.write(&mut valid).unwrap();
    v4::Subscribe::new("a/+/#", QoS::ExactlyOnce)
        .write(&mut valid)
        .unwrap();
    // And an MQTT 5 exchange, with properties, for the MQTT 5 codec.
    let mut valid5 = bytes::BytesMut::new();
    {
        use rumqttc::v5::mqttbytes::v5 as m5;
        use rumqttc::v5::mqttbytes::QoS as Q5;
        let mut properties = m5::ConnectProperties::new();
        properties.session_expiry_interval = Some(60);
        properties.user_properties = vec![("k".into(), "v".into())];
        let packets = [
            m5::Packet::Connect(
                m5::Connect {
                    keep_alive: 5,
                    client_id: "fuzz5".into(),
                    clean_start: true,
                    properties: Some(properties),
                },
                None,
                None,
            ),
            m5::Packet::Publish(m5::Publish {
                dup: false,
                qos: Q5::AtLeastOnce,
                retain: true,
                topic: bytes::Bytes::from_static(b"hearth/h/r/d/motion"),
                pkid: 2,
                payload: bytes::Bytes::from_static(br#"{"detected":true}"#),
                properties: Some(m5::PublishProperties {
                    user_properties: vec![("room".into(), "hall".into())],
                    message_expiry_interval: Some(30),
                    ..Default::default()
                }),
            }),
            m5::Packet::Subscribe(m5::Subscribe {
                pkid: 3,
                filters: vec![m5::Filter::new("a/#", Q5::ExactlyOnce)],
                properties: None,
            }),
        ];
        for packet in packets {
            packet.write(&mut valid5, None).unwrap();
        }
    }

    // HEARTH_FUZZ_ROUNDS and HEARTH_FUZZ_SEED make longer or other runs
    // (see README, "Fuzzing the packet path").
    let rounds: u64 = std::env::var("HEARTH_FUZZ_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("HEARTH_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001);
    let mut rng = XorShift(seed | 1);
    let mut attackers = Vec::new();
    for round in 0..rounds {
        let mut bytes = if round % 4 < 2 {
            valid.to_vec()
        } else {
            valid5.to_vec()
        };
        if round % 2 == 0 {
            // Flip a few bytes of a valid exchange (3.1.1 or 5).
            for _ in 0..(1 + rng.next() % 4) {
                let at = (rng.next() as usize) % bytes.len();
                bytes[at] = rng.next() as u8;
            }
        } else {
            // Or send noise of random length.
            bytes = (0..(rng.next() % 300)).map(|_| rng.next() as u8).collect();
        }
        let addr = gateway.mqtt_addr();
        attackers.push(tokio::spawn(async move {
            let mut client = RawClient::open(addr).await;
            client.send_bytes(&bytes).await;
            // Whatever the server answers, it must end the exchange by itself
            // (close, or keep a valid session open) without hanging the test.
            let _ = client.closed_within(Duration::from_secs(3)).await;
        }));
        // At most a few hundred connections at once, however long the run.
        if attackers.len() >= 200 {
            for attacker in attackers.drain(..) {
                attacker
                    .await
                    .expect("the attacking client itself does not panic");
            }
        }
    }
    for attacker in attackers {
        attacker
            .await
            .expect("the attacking client itself does not panic");
    }

    // The gateway still serves the device that was connected all along, and
    // new ones.
    good.publish(
        "hearth/h/r/d/motion",
        br#"{"detected":true}"#,
        QoS::AtLeastOnce,
        7,
        false,
    )
    .await;
    good.expect_puback(7).await;
    let (mut fresh, ack) = RawClient::connect(gateway.mqtt_addr(), "after-fuzz", true, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    fresh.send(Packet::PingReq).await;
    assert!(matches!(fresh.next().await, Some(Packet::PingResp)));
    gateway.shutdown().await;
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no task panicked"
    );
}

#[tokio::test]
async fn an_overlong_client_id_is_refused_as_an_identifier() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut client, ack) =
        RawClient::connect(gateway.mqtt_addr(), &"x".repeat(1000), true, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    assert!(client.closed_within(PROMPTLY).await);
    gateway.shutdown().await;
}
