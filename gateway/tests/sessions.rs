//! Persistent sessions (clean session = false): subscriptions and QoS 1/2
//! messages outlive the connection and the gateway; what was in flight comes
//! again with DUP, in order, under its packet id.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;

/// Publishes `payloads` on `topic` at QoS 1 from a fresh client, each
/// acknowledged.
async fn publish_all(addr: SocketAddr, topic: &str, payloads: &[&str]) {
    let (mut publisher, _) = RawClient::connect(addr, "publisher", true, 30).await;
    for (i, payload) in payloads.iter().enumerate() {
        let pkid = u16::try_from(i + 1).unwrap();
        publisher
            .publish(topic, payload.as_bytes(), QoS::AtLeastOnce, pkid, false)
            .await;
        publisher.expect_puback(pkid).await;
    }
    publisher.send(Packet::Disconnect).await;
}

async fn payloads(client: &mut RawClient, count: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..count {
        let publish = next_publish(client).await;
        client
            .send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;
        seen.push(String::from_utf8(publish.payload.to_vec()).unwrap());
    }
    seen
}

#[tokio::test]
async fn messages_published_while_away_are_delivered_on_return_in_order() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, ack) = RawClient::connect(addr, "away", false, 30).await;
    assert!(!ack.session_present, "a new session");
    subscribe_one(&mut app, "sensors/#", QoS::AtLeastOnce).await;
    app.send(Packet::Disconnect).await;
    assert!(app.closed_within(PROMPTLY).await);

    publish_all(addr, "sensors/hall", &["1", "2", "3"]).await;

    let (mut app, ack) = RawClient::connect(addr, "away", false, 30).await;
    assert!(ack.session_present, "the session was kept");
    assert_eq!(payloads(&mut app, 3).await, ["1", "2", "3"]);
    // Live now, without subscribing again.
    publish_all(addr, "sensors/kitchen", &["4"]).await;
    assert_eq!(payloads(&mut app, 1).await, ["4"]);
    app.send(Packet::Disconnect).await;
    assert!(app.closed_within(PROMPTLY).await);

    // Acknowledged messages do not come again.
    let (mut app, _) = RawClient::connect(addr, "away", false, 30).await;
    assert!(app.silent_for(Duration::from_millis(500)).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_messages_come_again_with_dup_and_their_packet_ids() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "forgetful", false, 30).await;
    subscribe_one(&mut app, "cmd/#", QoS::AtLeastOnce).await;
    publish_all(addr, "cmd/x", &["a", "b", "c"]).await;
    let first: Vec<v4::Publish> = vec![
        next_publish(&mut app).await,
        next_publish(&mut app).await,
        next_publish(&mut app).await,
    ];
    assert!(first.iter().all(|p| !p.dup));
    // Acknowledges only the first, then the connection drops.
    app.send(Packet::PubAck(v4::PubAck::new(first[0].pkid)))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(app);

    let (mut app, ack) = RawClient::connect(addr, "forgetful", false, 30).await;
    assert!(ack.session_present);
    let again = [next_publish(&mut app).await, next_publish(&mut app).await];
    assert_eq!(
        again
            .iter()
            .map(|p| (
                String::from_utf8(p.payload.to_vec()).unwrap(),
                p.dup,
                p.pkid
            ))
            .collect::<Vec<_>>(),
        [
            ("b".to_owned(), true, first[1].pkid),
            ("c".to_owned(), true, first[2].pkid)
        ]
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_session_and_its_queue_survive_a_gateway_restart() {
    let nats = TestNats::start().await;
    let first = gateway(&nats, |_| {}).await;
    let (mut app, _) = RawClient::connect(first.mqtt_addr(), "survivor", false, 30).await;
    subscribe_one(&mut app, "alarm/+", QoS::ExactlyOnce).await;
    drop(app);
    publish_all(first.mqtt_addr(), "alarm/siren", &["on"]).await;
    first.shutdown().await;

    let second = gateway(&nats, |_| {}).await;
    publish_all(second.mqtt_addr(), "alarm/siren", &["off"]).await;
    let (mut app, ack) = RawClient::connect(second.mqtt_addr(), "survivor", false, 30).await;
    assert!(ack.session_present);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let publish = next_publish(&mut app).await;
        assert_eq!(
            publish.qos,
            QoS::AtLeastOnce,
            "the publish's QoS 1, under the granted 2"
        );
        app.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;
        seen.push(String::from_utf8(publish.payload.to_vec()).unwrap());
    }
    assert_eq!(seen, ["on", "off"]);
    second.shutdown().await;
}

#[tokio::test]
async fn a_clean_session_ends_the_kept_one() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "fickle", false, 30).await;
    subscribe_one(&mut app, "x/#", QoS::AtLeastOnce).await;
    drop(app);
    publish_all(addr, "x/y", &["kept"]).await;

    let (clean, ack) = RawClient::connect(addr, "fickle", true, 30).await;
    assert!(!ack.session_present);
    drop(clean);
    publish_all(addr, "x/y", &["nobody's"]).await;
    let (mut app, ack) = RawClient::connect(addr, "fickle", false, 30).await;
    assert!(!ack.session_present, "ended by the clean session");
    assert!(
        app.silent_for(Duration::from_millis(500)).await,
        "its queue went with it"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_full_session_queue_drops_its_oldest_messages() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.mqtt.max_session_queue = 3).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "slowpoke", false, 30).await;
    subscribe_one(&mut app, "load", QoS::AtLeastOnce).await;
    drop(app);
    publish_all(addr, "load", &["1", "2", "3", "4", "5"]).await;
    let (mut app, _) = RawClient::connect(addr, "slowpoke", false, 30).await;
    assert_eq!(payloads(&mut app, 3).await, ["3", "4", "5"]);
    assert!(app.silent_for(Duration::from_millis(300)).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn qos0_is_live_only_for_a_persistent_session() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "mixed", false, 30).await;
    subscribe_one(&mut app, "m/#", QoS::AtLeastOnce).await;
    let (mut device, _) = RawClient::connect(addr, "dev", true, 30).await;
    device
        .publish("m/a", b"zero", QoS::AtMostOnce, 0, false)
        .await;
    device
        .publish("m/a", b"one", QoS::AtLeastOnce, 1, false)
        .await;
    device.expect_puback(1).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let publish = next_publish(&mut app).await;
        if publish.qos == QoS::AtLeastOnce {
            app.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
                .await;
        }
        got.push((
            String::from_utf8(publish.payload.to_vec()).unwrap(),
            publish.qos,
        ));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            ("one".to_owned(), QoS::AtLeastOnce),
            ("zero".to_owned(), QoS::AtMostOnce)
        ]
    );
    assert!(
        app.silent_for(Duration::from_millis(300)).await,
        "each once"
    );
    drop(app);
    // Away: QoS 0 is not kept.
    device
        .publish("m/a", b"lost", QoS::AtMostOnce, 0, false)
        .await;
    device
        .publish("m/a", b"kept", QoS::AtLeastOnce, 2, false)
        .await;
    device.expect_puback(2).await;
    let (mut app, _) = RawClient::connect(addr, "mixed", false, 30).await;
    assert_eq!(payloads(&mut app, 1).await, ["kept"]);
    gateway.shutdown().await;
}

#[tokio::test]
async fn mosquitto_clients_keep_a_session_and_get_qos2_exactly_once() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let port = gateway.mqtt_addr().port().to_string();
    let sub = |count: &str| {
        tokio::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-i",
                "mosq-persistent",
                "-c",
                "-q",
                "2",
            ])
            .args(["-t", "house/#", "-v", "-C", count, "-W", "20"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run mosquitto_sub")
    };
    // Subscribes once, then stays connected for the first message.
    let first = sub("1");
    wait_for_subscriptions(&gateway, 1).await;
    let publish = |topic: &'static str, message: &'static str| {
        let port = port.clone();
        async move {
            let status = tokio::process::Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-q",
                    "2",
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
    };
    publish("house/door", "open").await;
    let output = first.wait_with_output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "house/door open\n");

    // Away: two more, kept in the session.
    publish("house/door", "closed").await;
    publish("house/window", "open").await;
    let output = sub("2").wait_with_output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "house/door closed\nhouse/window open\n",
        "each exactly once, in order"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_mosquitto_session_gets_what_was_queued_across_a_gateway_restart() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let mosquitto = |program: &str, port: u16, args: &[&str]| {
        let mut command = tokio::process::Command::new(program);
        command
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let nats = TestNats::start().await;
    let first = gateway(&nats, |_| {}).await;
    let port = first.mqtt_addr().port();
    // Subscribe with a kept session, then leave (-W 1: gone after a second).
    let _ = mosquitto(
        "mosquitto_sub",
        port,
        &[
            "-i",
            "mosq-restart",
            "-c",
            "-q",
            "1",
            "-t",
            "garage/#",
            "-W",
            "1",
        ],
    )
    .output()
    .await
    .expect("run mosquitto_sub");
    let status = mosquitto(
        "mosquitto_pub",
        port,
        &["-q", "1", "-t", "garage/door", "-m", "opened while away"],
    )
    .status()
    .await
    .expect("run mosquitto_pub");
    assert!(status.success());
    first.shutdown().await;

    let second = gateway(&nats, |_| {}).await;
    let output = mosquitto(
        "mosquitto_sub",
        second.mqtt_addr().port(),
        &[
            "-i",
            "mosq-restart",
            "-c",
            "-q",
            "1",
            "-t",
            "garage/#",
            "-v",
            "-C",
            "1",
            "-W",
            "20",
        ],
    )
    .output()
    .await
    .expect("run mosquitto_sub");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "garage/door opened while away\n"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn what_the_client_acknowledged_out_of_order_does_not_come_again() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "picky", false, 30).await;
    subscribe_one(&mut app, "o/#", QoS::AtLeastOnce).await;
    publish_all(addr, "o/x", &["1", "2", "3"]).await;
    let got = [
        next_publish(&mut app).await,
        next_publish(&mut app).await,
        next_publish(&mut app).await,
    ];
    // Acknowledges the second and third, not the first.
    for publish in &got[1..] {
        app.send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(app);
    let (mut app, _) = RawClient::connect(addr, "picky", false, 30).await;
    let again = next_publish(&mut app).await;
    assert_eq!(
        (&again.payload[..], again.dup, again.pkid),
        (&b"1"[..], true, got[0].pkid)
    );
    app.send(Packet::PubAck(v4::PubAck::new(again.pkid))).await;
    assert!(
        app.silent_for(Duration::from_millis(500)).await,
        "2 and 3 were acknowledged"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_qos2_release_is_sent_again_on_return_and_its_packet_id_is_not_reused() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut app, _) = RawClient::connect(addr, "two", false, 30).await;
    subscribe_one(&mut app, "q2/#", QoS::ExactlyOnce).await;
    let (mut device, _) = RawClient::connect(addr, "dev2", true, 30).await;
    device
        .publish("q2/a", b"first", QoS::ExactlyOnce, 1, false)
        .await;
    assert!(matches!(device.next().await, Some(Packet::PubRec(_))));
    let first = next_publish(&mut app).await;
    assert_eq!(first.qos, QoS::ExactlyOnce);
    app.send(Packet::PubRec(v4::PubRec::new(first.pkid))).await;
    assert!(matches!(app.next().await, Some(Packet::PubRel(rel)) if rel.pkid == first.pkid));
    // Gone before PUBCOMP.
    drop(app);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut app, ack) = RawClient::connect(addr, "two", false, 30).await;
    assert!(ack.session_present);
    assert!(
        matches!(app.next().await, Some(Packet::PubRel(rel)) if rel.pkid == first.pkid),
        "the PUBREL comes again"
    );
    device
        .publish("q2/a", b"second", QoS::ExactlyOnce, 2, false)
        .await;
    let second = next_publish(&mut app).await;
    assert_eq!(&second.payload[..], b"second");
    assert_ne!(second.pkid, first.pkid, "the held packet id is not reused");
    app.send(Packet::PubComp(v4::PubComp::new(first.pkid)))
        .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn odd_topics_are_kept_exactly_and_odd_client_ids_refused() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (_, ack) = RawClient::connect(addr, "line\nbreak", false, 30).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);

    let (mut app, _) = RawClient::connect(addr, "odd", false, 30).await;
    subscribe_one(&mut app, "odd/#", QoS::AtLeastOnce).await;
    drop(app);
    publish_all(addr, "odd/tab\there/100%/new\nline", &["x"]).await;
    let (mut app, _) = RawClient::connect(addr, "odd", false, 30).await;
    assert_eq!(
        next_publish(&mut app).await.topic,
        "odd/tab\there/100%/new\nline"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_nats_application_reaches_a_connected_persistent_session_at_qos1() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut app, _) = RawClient::connect(gateway.mqtt_addr(), "kept", false, 30).await;
    subscribe_one(&mut app, "from/nats", QoS::AtLeastOnce).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Hearth-Mqtt-Qos", "1");
    client
        .publish_with_headers("hearth.mqtt.from.nats", headers, "hi".into())
        .await
        .unwrap();
    let publish = next_publish(&mut app).await;
    assert_eq!(
        (&publish.payload[..], publish.qos),
        (&b"hi"[..], QoS::AtLeastOnce)
    );
    gateway.shutdown().await;
}
