//! Devices publish over real MQTT to a real gateway storing into a real
//! nats-server: what lands in JetStream, and what the device is told.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use hearth_proto::{v1, Encoding};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn several_nats_urls_start_the_gateway_while_one_of_them_is_down() {
    let nats = TestNats::start().await;
    let down = format!("nats://127.0.0.1:{}", hearth_test_support::free_port());
    let urls = format!("{down}, {}", nats.url());
    let gateway = gateway(&nats, |config| config.nats.url = Some(urls)).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "pir-2", true, 30).await;
    device
        .publish(
            "hearth/home1/hall/pir-2/motion",
            br#"{"detected":true}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;
    let stored = stored(&jetstream(&nats).await, "HEARTH_EVENTS").await;
    assert_eq!(stored.len(), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_native_publish_is_stored_with_subject_headers_and_body() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;

    let (mut device, ack) = RawClient::connect(gateway.mqtt_addr(), "pir-1", true, 30).await;
    assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    device
        .publish(
            "hearth/home1/kitchen/pir-1/motion",
            br#"{"detected":true,"ts":"2026-11-23T10:00:00Z"}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;

    let stored = stored(&js, "HEARTH_EVENTS").await;
    assert_eq!(stored.len(), 1, "acknowledged means stored");
    let message = &stored[0];
    assert_eq!(
        message.subject.as_str(),
        "hearth.evt.home1.kitchen.motion.pir-1"
    );
    assert_eq!(header(message, "Content-Type"), Some("application/json"));
    assert_eq!(header(message, "Hearth-Schema"), Some("hearth.v1.Event"));
    assert_eq!(header(message, "Hearth-Kind"), Some("motion"));
    assert!(header(message, "Nats-Msg-Id").is_some());

    let event: v1::Event = Encoding::Json.decode(&message.payload).unwrap();
    assert_eq!(header(message, "Hearth-Event-Id"), Some(event.id.as_str()));
    assert_eq!(
        header(message, "Hearth-Correlation-Id"),
        Some(event.correlation_id.as_str())
    );
    assert_eq!(
        uuid::Uuid::parse_str(&event.id).unwrap().get_version_num(),
        7
    );
    assert_eq!(
        (
            event.home.as_str(),
            event.room.as_str(),
            event.device.as_str()
        ),
        ("home1", "kitchen", "pir-1")
    );
    assert_eq!(
        event.body,
        Some(v1::event::Body::Motion(v1::Motion { detected: true }))
    );
    assert_eq!(event.occurred_at.unwrap().seconds, 1_795_428_000);
    assert!(event.received_at.is_some());
    let source = event.source.unwrap();
    assert_eq!(
        (source.convention.as_str(), source.client_id.as_str()),
        ("native", "pir-1")
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_zigbee2mqtt_report_becomes_one_event_per_field_under_escaped_names() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;

    let (mut bridge, _) = RawClient::connect(gateway.mqtt_addr(), "zigbee2mqtt", true, 30).await;
    bridge
        .publish(
            "zigbee2mqtt/Living Room/Lamp 2.1",
            br#"{"state":"ON","brightness":127,"linkquality":80,"temperature":21.5}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    bridge.expect_puback(1).await;
    // The bridge's own traffic is acknowledged but is not a device event.
    bridge
        .publish(
            "zigbee2mqtt/bridge/state",
            br#"{"state":"online"}"#,
            QoS::AtLeastOnce,
            2,
            false,
        )
        .await;
    bridge.expect_puback(2).await;

    let stored = stored(&js, "HEARTH_EVENTS").await;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "hearth.evt.home.Living%20Room.temperature.Lamp%202%2E1",
            "hearth.evt.home.Living%20Room.light.Lamp%202%2E1",
        ]
    );
    let events: Vec<v1::Event> = stored
        .iter()
        .map(|m| Encoding::Json.decode(&m.payload).unwrap())
        .collect();
    assert_eq!(
        events[0].correlation_id, events[1].correlation_id,
        "one publish, one correlation"
    );
    assert_ne!(events[0].id, events[1].id);
    assert_eq!(events[1].room, "Living Room");
    assert_eq!(events[1].device, "Lamp 2.1");
    assert_eq!(
        events[1].body,
        Some(v1::event::Body::Light(v1::LightState {
            on: true,
            brightness_pct: Some(50)
        }))
    );
    assert_eq!(stored_at_least(&js, "HEARTH_DLQ", 0).await.len(), 0);
    gateway.shutdown().await;
}

#[tokio::test]
async fn bad_publishes_are_dead_lettered_with_their_reason_and_still_acknowledged() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "bad-device", true, 30).await;

    let cases: [(&str, &[u8], &str); 5] = [
        ("somewhere/else", b"hello", "unknown_topic"),
        ("hearth/h/r/d/motion", b"{not json", "bad_payload"),
        ("hearth/h/r/d/teleport", br#"{"x":1}"#, "unknown_kind"),
        (
            "hearth/h/r/d/temperature",
            br#"{"celsius":500}"#,
            "out_of_range",
        ),
        (
            "hearth/h/r/d/contact",
            br#"{"open":"maybe"}"#,
            "missing_field",
        ),
    ];
    for (pkid, (topic, payload, _)) in (1..).zip(cases) {
        device
            .publish(topic, payload, QoS::AtLeastOnce, pkid, false)
            .await;
        device.expect_puback(pkid).await;
    }

    let letters = stored(&js, "HEARTH_DLQ").await;
    assert_eq!(letters.len(), cases.len());
    for (letter, (topic, payload, reason)) in letters.iter().zip(cases) {
        assert_eq!(
            letter.subject.as_str(),
            format!("hearth.dlq.gateway.{reason}")
        );
        assert_eq!(header(letter, "Hearth-Reason"), Some(reason));
        assert!(!header(letter, "Hearth-Detail")
            .unwrap_or_default()
            .is_empty());
        assert_eq!(header(letter, "Hearth-Mqtt-Topic"), Some(topic));
        assert_eq!(header(letter, "Hearth-Mqtt-Client-Id"), Some("bad-device"));
        assert_eq!(&letter.payload[..], payload, "the original payload is kept");
    }
    assert!(stored(&js, "HEARTH_EVENTS").await.is_empty());
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_retransmission_is_stored_once_but_a_repeated_reading_is_stored_again() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let topic = "hearth/home/hall/door/contact";
    let open = br#"{"open":true}"#;

    let (mut door, _) = RawClient::connect(gateway.mqtt_addr(), "door", false, 30).await;
    door.publish(topic, open, QoS::AtLeastOnce, 1, false).await;
    door.expect_puback(1).await;
    // The PUBACK was "lost": the device sends it again, flagged DUP.
    door.publish(topic, open, QoS::AtLeastOnce, 1, true).await;
    door.expect_puback(1).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 1);

    // The same reading again, under the same packet id, not a DUP: a new
    // event (a deep-sleeping sensor that always starts at packet id 1).
    door.publish(topic, open, QoS::AtLeastOnce, 1, false).await;
    door.expect_puback(1).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 2);
    // And that one's retransmission is stored once too.
    door.publish(topic, open, QoS::AtLeastOnce, 1, true).await;
    door.expect_puback(1).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 2);
    drop(door);

    // After a gateway restart, the retransmission is still recognised.
    gateway.shutdown().await;
    let gateway = common::gateway(&nats, |_| {}).await;
    let (mut door, _) = RawClient::connect(gateway.mqtt_addr(), "door", false, 30).await;
    door.publish(topic, open, QoS::AtLeastOnce, 1, true).await;
    door.expect_puback(1).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 2);
    door.publish(topic, open, QoS::AtLeastOnce, 1, false).await;
    door.expect_puback(1).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 3);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_qos2_publish_is_stored_exactly_once_through_the_whole_handshake() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "q2", true, 30).await;
    let topic = "hearth/h/r/smoke1/smoke";

    device
        .publish(topic, br#"{"detected":true}"#, QoS::ExactlyOnce, 9, false)
        .await;
    assert!(matches!(device.next().await, Some(Packet::PubRec(r)) if r.pkid == 9));
    device
        .publish(topic, br#"{"detected":true}"#, QoS::ExactlyOnce, 9, true)
        .await;
    assert!(matches!(device.next().await, Some(Packet::PubRec(r)) if r.pkid == 9));
    device
        .send(Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(9)))
        .await;
    assert!(matches!(device.next().await, Some(Packet::PubComp(c)) if c.pkid == 9));
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_hundred_concurrent_devices_are_all_stored() {
    const DEVICES: u32 = 100;
    const EACH: u32 = 20;
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;

    let mut devices = Vec::new();
    for d in 0..DEVICES {
        let addr = gateway.mqtt_addr();
        devices.push(tokio::spawn(async move {
            let (client, mut acks, task) = rumqttc_client(addr, &format!("lux-{d}"), 10);
            for i in 0..EACH {
                let payload = format!(r#"{{"lux":{}}}"#, d * EACH + i);
                client
                    .publish(
                        format!("hearth/home/room{}/lux-{d}/illuminance", d % 7),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .unwrap();
            }
            for _ in 0..EACH {
                tokio::time::timeout(PROMPTLY, acks.recv())
                    .await
                    .expect("PUBACK in time");
            }
            task.abort();
        }));
    }
    for device in devices {
        device.await.unwrap();
    }
    let stored = stored(&js, "HEARTH_EVENTS").await;
    let values: BTreeSet<u64> = stored
        .iter()
        .map(|m| json(m)["illuminance"]["lux"].as_f64().unwrap_or(0.0) as u64)
        .collect();
    assert_eq!(stored.len() as u32, DEVICES * EACH);
    assert_eq!(values, (0..u64::from(DEVICES * EACH)).collect());
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_nats_restart_mid_stream_loses_no_acknowledged_message_and_stores_none_twice() {
    const TOTAL: u32 = 3000;
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;

    let (client, mut acks, task) = rumqttc_client(gateway.mqtt_addr(), "steady", 50);
    let publisher = tokio::spawn(async move {
        for i in 0..TOTAL {
            let payload = format!(r#"{{"lux":{i}}}"#);
            client
                .publish(
                    "hearth/home/lab/meter/illuminance",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        client
    });
    // Let part of the stream through, then take NATS away under it.
    let mut acked = 0u32;
    while acked < TOTAL / 4 {
        tokio::time::timeout(PROMPTLY, acks.recv())
            .await
            .expect("PUBACK")
            .unwrap();
        acked += 1;
    }
    nats.restart().await;
    while acked < TOTAL {
        tokio::time::timeout(Duration::from_secs(60), acks.recv())
            .await
            .unwrap_or_else(|_| panic!("only {acked} of {TOTAL} acknowledged after the restart"))
            .unwrap();
        acked += 1;
    }
    let _client = publisher.await.unwrap();
    task.abort();

    let js = jetstream(&nats).await;
    let stored = stored(&js, "HEARTH_EVENTS").await;
    let values: Vec<u64> = stored
        .iter()
        .map(|m| json(m)["illuminance"]["lux"].as_f64().unwrap_or(0.0) as u64)
        .collect();
    let distinct: BTreeSet<u64> = values.iter().copied().collect();
    assert_eq!(
        distinct,
        (0..u64::from(TOTAL)).collect(),
        "every acknowledged reading is stored"
    );
    assert_eq!(values.len(), distinct.len(), "and none twice");
    gateway.shutdown().await;
}

#[tokio::test]
async fn while_nats_is_down_publishes_wait_unacknowledged_and_pings_are_answered() {
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "patient", true, 30).await;

    nats.kill().await;
    device
        .publish(
            "hearth/h/r/t1/temperature",
            br#"{"celsius":20.5}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.send(Packet::PingReq).await;
    assert!(
        matches!(device.next().await, Some(Packet::PingResp)),
        "PINGRESP, and no PUBACK yet"
    );

    nats.restart().await;
    device.expect_puback(1).await;
    let js = jetstream(&nats).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn protobuf_encoding_is_chosen_by_configuration() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.storage.encoding = Encoding::Protobuf).await;
    let js = jetstream(&nats).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "h1", true, 30).await;
    device
        .publish(
            "hearth/h/bath/h1/humidity",
            br#"{"percent":61}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;

    let stored = stored(&js, "HEARTH_EVENTS").await;
    assert_eq!(
        header(&stored[0], "Content-Type"),
        Some("application/x-protobuf")
    );
    let event: v1::Event = Encoding::Protobuf.decode(&stored[0].payload).unwrap();
    assert_eq!(
        event.body,
        Some(v1::event::Body::Humidity(v1::Humidity { percent: 61.0 }))
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn qos0_publishes_are_stored_too() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "q0", true, 30).await;
    for _ in 0..3 {
        device
            .publish(
                "hearth/h/r/b1/battery",
                br#"{"percent":80}"#,
                QoS::AtMostOnce,
                0,
                false,
            )
            .await;
    }
    // Identical QoS 0 readings are three readings, not duplicates.
    assert_eq!(stored_at_least(&js, "HEARTH_EVENTS", 3).await.len(), 3);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_qos0_publish_that_cannot_be_stored_is_counted_as_dropped() {
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "lossy", true, 30).await;
    nats.kill().await;
    device
        .publish(
            "hearth/h/r/m/motion",
            br#"{"detected":true}"#,
            QoS::AtMostOnce,
            0,
            false,
        )
        .await;
    // QoS 0 gets one attempt; after the reply timeout it is given up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let health = http_get(gateway.http_addr(), "/healthz").await;
        if health.contains(r#""qos0_dropped":1"#) {
            assert!(health.starts_with("HTTP/1.1 503"), "NATS is down: {health}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never counted: {health}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection is unaffected.
    device.send(Packet::PingReq).await;
    assert!(matches!(device.next().await, Some(Packet::PingResp)));
    gateway.shutdown().await;
}

#[tokio::test]
async fn identical_repeats_are_each_stored_once_across_a_nats_restart() {
    const REPEATS: u16 = 24;
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut sensor, _) = RawClient::connect(gateway.mqtt_addr(), "sleepy", true, 60).await;
    let topic = "hearth/home/hall/sleepy/motion";
    let motion = br#"{"detected":true}"#;

    // The same reading under the same packet id each time, each sent only
    // once the previous one was acknowledged: every one is a new reading.
    for n in 0..REPEATS {
        if n == REPEATS / 2 {
            nats.restart().await;
        }
        sensor
            .publish(topic, motion, QoS::AtLeastOnce, 1, false)
            .await;
        sensor.expect_puback(1).await;
    }
    let js = jetstream(&nats).await;
    let stored = stored(&js, "HEARTH_EVENTS").await;
    assert_eq!(stored.len(), usize::from(REPEATS));
    let generations: BTreeSet<String> = stored
        .iter()
        .map(|m| header(m, "Nats-Msg-Id").unwrap().to_owned())
        .collect();
    assert_eq!(
        generations.len(),
        usize::from(REPEATS),
        "one message id per reading"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn qos0_beyond_its_lane_is_dropped_and_counted_while_the_connection_stays_up() {
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.mqtt.max_inflight = 16).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "chatty0", true, 30).await;
    nats.kill().await;
    for _ in 0..100 {
        device
            .publish(
                "hearth/h/r/lux/illuminance",
                br#"{"lux":5}"#,
                QoS::AtMostOnce,
                0,
                false,
            )
            .await;
    }
    device.send(Packet::PingReq).await;
    assert!(
        matches!(device.next().await, Some(Packet::PingResp)),
        "still served"
    );
    let health = http_get(gateway.http_addr(), "/healthz").await;
    let dropped: u64 = health
        .split(r#""qos0_dropped":"#)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no qos0_dropped in {health}"));
    assert!(dropped >= 100 - 16, "{dropped} dropped: {health}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn pubacks_follow_arrival_order_whatever_each_publish_stores() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "mixed", true, 30).await;
    let report = br#"{"temperature":20.5,"humidity":40,"battery":99,"linkquality":3}"#;
    // Three events, one event, a dead letter, nothing stored, three events.
    let publishes: [(&str, &[u8]); 5] = [
        ("zigbee2mqtt/bath/sensor", report),
        ("hearth/h/bath/pir/motion", br#"{"detected":true}"#),
        ("hearth/h/bath/pir/motion", b"garbage"),
        ("zigbee2mqtt/bridge/state", b"online"),
        ("zigbee2mqtt/bath/sensor", report),
    ];
    for (pkid, (topic, payload)) in (1..).zip(publishes) {
        device
            .publish(topic, payload, QoS::AtLeastOnce, pkid, false)
            .await;
    }
    for pkid in 1..=5 {
        device.expect_puback(pkid).await;
    }
    let js = jetstream(&nats).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 7);
    assert_eq!(stored(&js, "HEARTH_DLQ").await.len(), 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_gateway_shutting_down_acknowledges_what_it_stores_before_closing() {
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "late", true, 30).await;
    nats.kill().await;
    for pkid in 1..=5u16 {
        let payload = format!(r#"{{"lux":{pkid}}}"#);
        device
            .publish(
                "hearth/h/r/lux/illuminance",
                payload.as_bytes(),
                QoS::AtLeastOnce,
                pkid,
                false,
            )
            .await;
    }
    // Packets are handled in order: the PINGRESP says the five were read.
    device.send(Packet::PingReq).await;
    assert!(matches!(device.next().await, Some(Packet::PingResp)));
    // Shut down while the five cannot be stored; NATS comes back during the
    // drain, and the connection stays open long enough to acknowledge them.
    let stopping = tokio::spawn(gateway.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "the gateway waits for what it stores"
    );
    nats.restart().await;
    for pkid in 1..=5 {
        device.expect_puback(pkid).await;
    }
    assert!(device.closed_within(PROMPTLY).await);
    stopping.await.unwrap();
    let js = jetstream(&nats).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 5);
}

#[tokio::test]
async fn a_spent_memory_budget_pauses_qos1_and_drops_qos0_until_storage_returns() {
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.mqtt.max_packet_size = 2048;
        config.mqtt.max_inflight_bytes = 8 * 1024;
    })
    .await;
    let (mut big, _) = RawClient::connect(gateway.mqtt_addr(), "big", true, 30).await;
    let (mut small, _) = RawClient::connect(gateway.mqtt_addr(), "small", true, 30).await;
    nats.kill().await;

    // Each of these counts 1.5 KiB + 1 KiB: three fit in 8 KiB.
    let press = format!(r#"{{"action":"{}"}}"#, "x".repeat(1500));
    for pkid in 1..=6u16 {
        big.publish(
            "hearth/h/r/big/button",
            press.as_bytes(),
            QoS::AtLeastOnce,
            pkid,
            false,
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another device's QoS 0 finds the budget spent: dropped, counted, and
    // its connection is served.
    small
        .publish(
            "hearth/h/r/small/motion",
            br#"{"detected":true}"#,
            QoS::AtMostOnce,
            0,
            false,
        )
        .await;
    small.send(Packet::PingReq).await;
    assert!(matches!(small.next().await, Some(Packet::PingResp)));
    let health = http_get(gateway.http_addr(), "/healthz").await;
    assert!(health.contains(r#""qos0_dropped":1"#), "{health}");

    nats.restart().await;
    for pkid in 1..=6 {
        big.expect_puback(pkid).await;
    }
    let js = jetstream(&nats).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 6);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_client_ignoring_its_window_is_not_read_from_until_storage_catches_up() {
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.mqtt.max_inflight = 4).await;
    // Keep-alive 1 s: the pause below is longer, and must not count as the
    // client's silence.
    let (mut greedy, _) = RawClient::connect(gateway.mqtt_addr(), "greedy", true, 1).await;
    nats.kill().await;
    for pkid in 1..=10u16 {
        let payload = format!(r#"{{"lux":{pkid}}}"#);
        greedy
            .publish(
                "hearth/h/r/g/illuminance",
                payload.as_bytes(),
                QoS::AtLeastOnce,
                pkid,
                false,
            )
            .await;
    }
    greedy.send(Packet::PingReq).await;
    // Four publishes are taken; the rest and the PINGREQ wait unread.
    assert!(
        greedy.silent_for(Duration::from_secs(2)).await,
        "no answer and no disconnect while paused"
    );
    nats.restart().await;
    // Then all of it is read and answered: the PUBACKs in order, the
    // PINGRESP as soon as the PINGREQ is read.
    let (mut acked, mut pinged) = (Vec::new(), false);
    while acked.len() < 10 || !pinged {
        match greedy.next().await {
            Some(Packet::PubAck(ack)) => acked.push(ack.pkid),
            Some(Packet::PingResp) => pinged = true,
            other => panic!("unexpected {other:?} after {acked:?}"),
        }
    }
    assert_eq!(acked, (1..=10).collect::<Vec<u16>>());
    let js = jetstream(&nats).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 10);
    gateway.shutdown().await;
}

#[tokio::test]
async fn names_too_long_for_a_nats_subject_are_dead_lettered_and_nats_stays_up() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "verbose", true, 30).await;
    // 5000 characters that each escape to three: far beyond what NATS
    // takes on one protocol line.
    let room = ".".repeat(5000);
    let topic = format!("hearth/home/{room}/d/motion");
    device
        .publish(&topic, br#"{"detected":true}"#, QoS::AtLeastOnce, 1, false)
        .await;
    device.expect_puback(1).await;
    let letters = stored(&js, "HEARTH_DLQ").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "Hearth-Reason"), Some("name_too_long"));
    assert!(
        header(&letters[0], "Hearth-Mqtt-Topic").unwrap().len() < 1100,
        "long device input is truncated in headers"
    );
    // The gateway's NATS connection survived: ordinary events still flow.
    device
        .publish(
            "hearth/home/hall/d/motion",
            br#"{"detected":true}"#,
            QoS::AtLeastOnce,
            2,
            false,
        )
        .await;
    device.expect_puback(2).await;
    assert_eq!(stored(&js, "HEARTH_EVENTS").await.len(), 1);
    gateway.shutdown().await;
}
