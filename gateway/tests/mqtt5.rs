//! MQTT 5 basics with a raw client: CONNACK properties, reason codes,
//! persistent sessions by session expiry, topic aliases refused cleanly,
//! user properties routed as NATS headers.

mod common;

use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::v5::{self, Packet};
use rumqttc::v5::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

type Client = Framed<TcpStream, v5::Codec>;

async fn connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    expiry: Option<u32>,
) -> (Client, v5::ConnAck) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut client = Framed::new(
        stream,
        v5::Codec {
            max_incoming_size: None,
            max_outgoing_size: None,
        },
    );
    let mut properties = v5::ConnectProperties::new();
    properties.session_expiry_interval = expiry;
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_start: expiry.is_none(),
        properties: Some(properties),
    };
    client
        .send(Packet::Connect(connect, None, None))
        .await
        .unwrap();
    match next(&mut client).await {
        Some(Packet::ConnAck(ack)) => (client, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn next(client: &mut Client) -> Option<Packet> {
    match tokio::time::timeout(PROMPTLY, client.next()).await {
        Ok(Some(Ok(packet))) => Some(packet),
        other => {
            eprintln!("no packet: {other:?}");
            None
        }
    }
}

fn publish(
    topic: &str,
    payload: &str,
    pkid: u16,
    properties: Option<v5::PublishProperties>,
) -> Packet {
    Packet::Publish(v5::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties,
    })
}

#[tokio::test]
async fn an_mqtt5_client_connects_subscribes_and_publishes_with_reason_codes() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut client, ack) = connect(gateway.mqtt_addr(), "five", None).await;
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    let properties = ack.properties.expect("CONNACK properties");
    assert_eq!(properties.topic_alias_max, Some(0), "no topic aliases");
    assert_eq!(properties.shared_subscription_available, Some(0));

    let subscribe = v5::Subscribe {
        pkid: 1,
        filters: vec![
            v5::Filter::new("hearth/#", QoS::AtLeastOnce),
            v5::Filter::new("bad/#/filter", QoS::AtMostOnce),
        ],
        properties: None,
    };
    client.send(Packet::Subscribe(subscribe)).await.unwrap();
    match next(&mut client).await {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [
                v5::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                v5::SubscribeReasonCode::NotAuthorized
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let properties = v5::PublishProperties {
        user_properties: vec![("origin".into(), "a=b%c".into())],
        ..Default::default()
    };
    client
        .send(publish(
            "hearth/home/hall/five/motion",
            r#"{"detected":true}"#,
            7,
            Some(properties),
        ))
        .await
        .unwrap();
    let mut got_ack = false;
    let mut got_message = false;
    while !(got_ack && got_message) {
        match next(&mut client).await {
            Some(Packet::PubAck(ack)) => {
                assert_eq!((ack.pkid, ack.reason), (7, v5::PubAckReason::Success));
                got_ack = true;
            }
            Some(Packet::Publish(message)) => {
                assert_eq!(&message.topic[..], b"hearth/home/hall/five/motion");
                assert_eq!(
                    message.properties.unwrap().user_properties,
                    [("origin".to_owned(), "a=b%c".to_owned())],
                    "user properties round-trip, = and % included"
                );
                client
                    .send(Packet::PubAck(v5::PubAck::new(message.pkid, None)))
                    .await
                    .unwrap();
                got_message = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let js = jetstream(&nats).await;
    assert_eq!(
        json(&stored_at_least(&js, "HEARTH_EVENTS", 1).await[0])["device"],
        "five"
    );

    let unsubscribe = v5::Unsubscribe {
        pkid: 2,
        filters: vec!["hearth/#".into(), "never/subscribed".into()],
        properties: None,
    };
    client.send(Packet::Unsubscribe(unsubscribe)).await.unwrap();
    match next(&mut client).await {
        Some(Packet::UnsubAck(ack)) => assert_eq!(ack.reasons.len(), 2, "one reason per filter"),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_session_expiry_keeps_the_session_and_a_topic_alias_is_refused_with_its_reason() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut client, ack) = connect(addr, "keeper", Some(3600)).await;
    assert!(!ack.session_present);
    let subscribe = v5::Subscribe {
        pkid: 1,
        filters: vec![v5::Filter::new("kept/#", QoS::AtLeastOnce)],
        properties: None,
    };
    client.send(Packet::Subscribe(subscribe)).await.unwrap();
    assert!(matches!(next(&mut client).await, Some(Packet::SubAck(_))));

    // A topic alias: the CONNACK said 0, so the connection ends, with 0x94.
    let aliased = v5::PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    client
        .send(publish("kept/x", "1", 2, Some(aliased)))
        .await
        .unwrap();
    match next(&mut client).await {
        Some(Packet::Disconnect(disconnect)) => {
            assert_eq!(
                disconnect.reason_code,
                v5::DisconnectReasonCode::TopicAliasInvalid
            );
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    drop(client);

    let (mut device, _) = RawClient::connect(addr, "device", true, 30).await;
    device
        .publish(
            "kept/y",
            b"while away",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;

    let (mut client, ack) = connect(addr, "keeper", Some(3600)).await;
    assert!(ack.session_present, "kept by its expiry interval");
    match next(&mut client).await {
        Some(Packet::Publish(message)) => assert_eq!(&message.payload[..], b"while away"),
        other => panic!("expected the kept message, got {other:?}"),
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_plain_mqtt5_disconnect_is_clean_and_publishes_no_will() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let addr = gateway.mqtt_addr();
    let (mut watcher, _) = RawClient::connect(addr, "watcher", true, 30).await;
    let mut subscribe =
        rumqttc::mqttbytes::v4::Subscribe::new("wills/#", rumqttc::mqttbytes::QoS::AtMostOnce);
    subscribe.pkid = 1;
    watcher
        .send(rumqttc::mqttbytes::v4::Packet::Subscribe(subscribe))
        .await;
    assert!(watcher.next().await.is_some(), "SUBACK");

    let stream = TcpStream::connect(addr).await.unwrap();
    let mut client = Framed::new(
        stream,
        v5::Codec {
            max_incoming_size: None,
            max_outgoing_size: None,
        },
    );
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "polite5".into(),
        clean_start: true,
        properties: None,
    };
    let will = v5::LastWill::new("wills/polite5", "gone", QoS::AtMostOnce, false, None);
    client
        .send(Packet::Connect(connect, Some(will), None))
        .await
        .unwrap();
    assert!(matches!(next(&mut client).await, Some(Packet::ConnAck(_))));
    client
        .send(Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )))
        .await
        .unwrap();
    assert!(
        watcher
            .silent_for(std::time::Duration::from_millis(700))
            .await,
        "no will after a normal DISCONNECT"
    );
    gateway.shutdown().await;
}
