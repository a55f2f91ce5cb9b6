//! Commands downlink: a `hearth.v1.Command` stored in `HEARTH_COMMANDS`
//! reaches the device over MQTT, on its convention's topic, and is
//! acknowledged to JetStream only once the device has it.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use hearth_proto::v1::{self, command};
use hearth_proto::Encoding;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;

fn light_set(
    home: &str,
    room: &str,
    device: &str,
    on: bool,
    brightness: Option<u32>,
) -> v1::Command {
    v1::Command {
        id: uuid::Uuid::now_v7().to_string(),
        correlation_id: uuid::Uuid::now_v7().to_string(),
        issued_at: Some(now()),
        home: home.into(),
        room: room.into(),
        device: device.into(),
        body: Some(command::Body::LightSet(v1::LightSet {
            on,
            brightness_pct: brightness,
        })),
        ..Default::default()
    }
}

fn now() -> pbjson_types::Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    pbjson_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// Stores `command` on its subject, as the house rules would; returns its
/// stream sequence.
async fn issue(js: &jetstream::Context, command: &v1::Command) -> u64 {
    let subject = format!(
        "hearth.cmd.{}.{}.light.{}",
        hearth_gateway::subject::encode_token(&command.home),
        hearth_gateway::subject::encode_token(&command.room),
        hearth_gateway::subject::encode_token(&command.device)
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", Encoding::Json.content_type());
    headers.insert("Hearth-Schema", "hearth.v1.Command");
    js.publish_with_headers(subject, headers, Encoding::Json.encode(command))
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Waits until the gateway's consumer has every command up to `sequence`
/// acknowledged.
async fn acknowledged_through(js: &jetstream::Context, sequence: u64) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("hearth-gateway", "HEARTH_COMMANDS")
            .await
            .expect("the gateway's consumer exists");
        let info = consumer.info().await.unwrap();
        if info.ack_floor.stream_sequence >= sequence && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not acknowledged: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_command_reaches_a_native_device_and_is_acknowledged_once_it_has_it() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut lamp, _) = RawClient::connect(gateway.mqtt_addr(), "lamp", true, 30).await;
    subscribe_one(&mut lamp, "hearth/home/hall/lamp/set", QoS::AtLeastOnce).await;

    let command = light_set("home", "hall", "lamp", true, Some(40));
    let sequence = issue(&js, &command).await;
    let publish = next_publish(&mut lamp).await;
    assert_eq!(publish.topic, "hearth/home/hall/lamp/set");
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({
            "on": true,
            "brightness_pct": 40,
            "command_id": command.id,
            "correlation_id": command.correlation_id,
        })
    );
    // Not acknowledged to JetStream before the device's PUBACK.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-gateway", "HEARTH_COMMANDS")
        .await
        .unwrap();
    assert_eq!(consumer.info().await.unwrap().num_ack_pending, 1);
    lamp.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
        .await;
    acknowledged_through(&js, sequence).await;
    assert!(
        lamp.silent_for(Duration::from_millis(300)).await,
        "delivered once"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_zigbee2mqtt_device_gets_commands_in_its_own_shape_on_its_own_topic() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut z2m, _) = RawClient::connect(gateway.mqtt_addr(), "zigbee2mqtt", true, 30).await;
    subscribe_one(&mut z2m, "zigbee2mqtt/+/set", QoS::AtLeastOnce).await;
    // The bridge reports the light: the gateway learns where it lives.
    z2m.publish(
        "zigbee2mqtt/Porch Light",
        br#"{"state":"OFF","brightness":0}"#,
        QoS::AtLeastOnce,
        7,
        false,
    )
    .await;
    z2m.expect_puback(7).await;
    let devices = stored_at_least(&js, "HEARTH_DEVICES", 1).await;
    assert_eq!(
        devices[0].subject.as_str(),
        "hearth.device.home.unassigned.Porch%20Light"
    );
    assert_eq!(
        json(&devices[0]),
        serde_json::json!({"convention":"zigbee2mqtt","topic":"zigbee2mqtt/Porch Light","client_id":"zigbee2mqtt"})
    );

    let sequence = issue(
        &js,
        &light_set("home", "unassigned", "Porch Light", true, Some(50)),
    )
    .await;
    let publish = next_publish(&mut z2m).await;
    assert_eq!(publish.topic, "zigbee2mqtt/Porch Light/set");
    let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"state": "ON", "brightness": 127})
    );
    z2m.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
        .await;
    acknowledged_through(&js, sequence).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_device_that_connects_late_still_gets_the_newest_command_only() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.commands.delivery_timeout = Duration::from_millis(300);
    })
    .await;
    let js = jetstream(&nats).await;
    // Nobody listens yet: on, then off, for the same light.
    issue(&js, &light_set("home", "hall", "lamp", true, None)).await;
    let off = light_set("home", "hall", "lamp", false, None);
    let last = issue(&js, &off).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let (mut lamp, _) = RawClient::connect(gateway.mqtt_addr(), "lamp", true, 30).await;
    subscribe_one(&mut lamp, "hearth/home/hall/lamp/set", QoS::AtLeastOnce).await;
    let publish = next_publish(&mut lamp).await;
    let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(
        payload["command_id"],
        off.id.as_str(),
        "the newer command, not the stale one"
    );
    assert_eq!(payload["on"], false);
    lamp.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
        .await;
    acknowledged_through(&js, last).await;
    assert!(
        lamp.silent_for(Duration::from_secs(3)).await,
        "the superseded command must not follow"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn undeliverable_and_unreadable_commands_are_dead_lettered() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.commands.delivery_timeout = Duration::from_millis(200);
        config.commands.max_age = Duration::from_secs(1);
    })
    .await;
    let js = jetstream(&nats).await;
    let command = light_set("home", "cellar", "nobody", true, None);
    let undelivered = issue(&js, &command).await;
    let garbage = js
        .publish(
            "hearth.cmd.home.hall.light.lamp",
            "switch it on please".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;

    let letters = stored_at_least(&js, "HEARTH_DLQ", 2).await;
    let reasons: Vec<_> = letters
        .iter()
        .map(|m| {
            (
                m.subject.to_string(),
                header(m, "Hearth-Reason").unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        reasons.contains(&(
            "hearth.dlq.gateway.bad_command".into(),
            "bad_command".into()
        )),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(
            "hearth.dlq.gateway.undelivered".into(),
            "undelivered".into()
        )),
        "{reasons:?}"
    );
    let letter = letters
        .iter()
        .find(|m| m.subject.as_str() == "hearth.dlq.gateway.undelivered")
        .unwrap();
    assert_eq!(
        header(letter, "Hearth-Correlation-Id"),
        Some(command.correlation_id.as_str())
    );
    assert!(header(letter, "Hearth-Detail")
        .unwrap()
        .contains("commands.max_age"));
    acknowledged_through(&js, undelivered.max(garbage)).await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_command_for_an_away_device_with_a_persistent_session_waits_for_it() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let (mut siren, _) = RawClient::connect(gateway.mqtt_addr(), "siren", false, 30).await;
    subscribe_one(&mut siren, "hearth/home/hall/siren/set", QoS::AtLeastOnce).await;
    drop(siren);

    let command = v1::Command {
        body: Some(command::Body::SirenSet(v1::SirenSet { on: true })),
        ..light_set("home", "hall", "siren", true, None)
    };
    let sequence = issue(&js, &command).await;
    // Kept for the session: that is delivery as far as JetStream goes.
    acknowledged_through(&js, sequence).await;

    let (mut siren, ack) = RawClient::connect(gateway.mqtt_addr(), "siren", false, 30).await;
    assert!(ack.session_present);
    let publish = next_publish(&mut siren).await;
    assert_eq!(publish.topic, "hearth/home/hall/siren/set");
    let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(payload["on"], true);
    assert_eq!(payload["command_id"], command.id.as_str());
    gateway.shutdown().await;
}

#[tokio::test]
async fn only_the_device_itself_confirms_a_command() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let js = jetstream(&nats).await;
    let addr = gateway.mqtt_addr();
    // The lamp has reported, so its client id is known; then it went away.
    let (mut lamp, _) = RawClient::connect(addr, "lamp-client", true, 30).await;
    lamp.publish(
        "hearth/home/hall/lamp/light",
        br#"{"on":false}"#,
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    lamp.expect_puback(1).await;
    drop(lamp);
    stored_at_least(&js, "HEARTH_DEVICES", 1).await;
    // An observer of everything acknowledges everything it gets.
    let (mut observer, _) = RawClient::connect(addr, "observer", true, 30).await;
    subscribe_one(&mut observer, "#", QoS::AtLeastOnce).await;

    let sequence = issue(&js, &light_set("home", "hall", "lamp", true, None)).await;
    let seen = next_publish(&mut observer).await;
    assert_eq!(seen.topic, "hearth/home/hall/lamp/set");
    observer
        .send(Packet::PubAck(v4::PubAck::new(seen.pkid)))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-gateway", "HEARTH_COMMANDS")
        .await
        .unwrap();
    assert_eq!(
        consumer.info().await.unwrap().num_ack_pending,
        1,
        "an observer's PUBACK is not the lamp's"
    );

    let (mut lamp, _) = RawClient::connect(addr, "lamp-client", true, 30).await;
    subscribe_one(&mut lamp, "hearth/home/hall/lamp/set", QoS::AtLeastOnce).await;
    let publish = next_publish(&mut lamp).await;
    lamp.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
        .await;
    acknowledged_through(&js, sequence).await;
    gateway.shutdown().await;
}
