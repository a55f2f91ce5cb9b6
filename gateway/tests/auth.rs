//! Logins against the password file, the ACL, and flood protection: who
//! gets in, what they may do, and that refusals are counted, logged and
//! stored for the security rules.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use hearth_gateway::auth::{set_password, AclRule};
use rumqttc::mqttbytes::v4::{self, ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;

/// Connects with a username and password; the CONNACK code.
async fn login(
    addr: std::net::SocketAddr,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> (RawClient, ConnectReturnCode) {
    let mut client = RawClient::open(addr).await;
    let mut connect = v4::Connect::new(client_id);
    if let Some((user, password)) = credentials {
        connect.set_login(user, password);
    }
    client.send(Packet::Connect(connect)).await;
    match client.next().await {
        Some(Packet::ConnAck(ack)) => (client, ack.code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn passwords(dir: &Path, users: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("passwd");
    for (user, password) in users {
        set_password(&path, user, Some(password.as_bytes())).unwrap();
    }
    path
}

fn health(body: &str) -> serde_json::Value {
    serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

#[tokio::test]
async fn only_known_users_with_their_password_get_in_and_failures_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let file = passwords(dir.path(), &[("lamp", "correct horse")]);
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.auth.allow_anonymous = false;
        config.auth.password_file = Some(file.clone());
    })
    .await;
    let addr = gateway.mqtt_addr();

    let (_lamp, code) = login(addr, "lamp-1", Some(("lamp", "correct horse"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (_, code) = login(addr, "lamp-2", Some(("lamp", "battery staple"))).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let (_, code) = login(addr, "ghost-1", Some(("ghost", "correct horse"))).await;
    assert_eq!(
        code,
        ConnectReturnCode::BadUserNamePassword,
        "unknown users look the same"
    );
    let (_, code) = login(addr, "anon-1", None).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    let js = jetstream(&nats).await;
    let events = stored_at_least(&js, "HEARTH_EVENTS", 3).await;
    let mut failures: Vec<(String, String, String)> = events
        .iter()
        .map(json)
        .map(|e| {
            assert_eq!(e["room"], "gateway");
            assert!(e["loginFailed"]["address"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"));
            (
                e["device"].as_str().unwrap().to_owned(),
                e["loginFailed"]["username"].as_str().unwrap().to_owned(),
                e["loginFailed"]["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    failures.sort();
    assert_eq!(
        failures,
        [
            (
                "anon-1".into(),
                String::new(),
                "anonymous_not_allowed".into()
            ),
            ("ghost-1".into(), "ghost".into(), "unknown_user".into()),
            ("lamp-2".into(), "lamp".into(), "wrong_password".into()),
        ]
    );
    assert_eq!(
        events[0]
            .subject
            .split('.')
            .take(5)
            .collect::<Vec<_>>()
            .join("."),
        "hearth.evt.home.gateway.login_failed"
    );
    let body = health(&http_get(gateway.http_addr(), "/healthz").await);
    assert_eq!(body["refused_connections"], 3);

    // A user added while the gateway runs gets in without a restart.
    set_password(&file, "pir", Some(b"motion")).unwrap();
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let (_, code) = login(addr, "pir", Some(("pir", "motion"))).await;
        if code == ConnectReturnCode::Success {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new user never got in"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    gateway.shutdown().await;
}

fn device_rules() -> Vec<AclRule> {
    vec![
        AclRule {
            user: "*".into(),
            publish: vec!["hearth/+/+/%c/#".into()],
            subscribe: vec!["hearth/+/+/%c/set".into()],
        },
        AclRule {
            user: "ha".into(),
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
        },
    ]
}

#[tokio::test]
async fn the_acl_keeps_each_device_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let file = passwords(dir.path(), &[("lamp", "l"), ("ha", "h")]);
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.auth.allow_anonymous = false;
        config.auth.password_file = Some(file);
        config.auth.acl = device_rules();
    })
    .await;
    let addr = gateway.mqtt_addr();
    let (mut ha, _) = login(addr, "homeassistant", Some(("ha", "h"))).await;
    let mut subscribe = v4::Subscribe::new("hearth/#", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    ha.send(Packet::Subscribe(subscribe)).await;
    assert!(matches!(ha.next().await, Some(Packet::SubAck(_))));

    let (mut lamp, code) = login(addr, "lamp", Some(("lamp", "l"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    // Someone else's topic: acknowledged (MQTT 3.1.1 cannot refuse), dropped.
    lamp.publish(
        "hearth/home/hall/pir/motion",
        br#"{"detected":true}"#,
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    lamp.expect_puback(1).await;
    lamp.publish(
        "hearth/home/hall/lamp/light",
        br#"{"on":true}"#,
        QoS::AtLeastOnce,
        2,
        false,
    )
    .await;
    lamp.expect_puback(2).await;
    let seen = match ha.next().await {
        Some(Packet::Publish(publish)) => publish,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!(
        seen.topic, "hearth/home/hall/lamp/light",
        "only the allowed publish went on"
    );
    let js = jetstream(&nats).await;
    let events = stored(&js, "HEARTH_EVENTS").await;
    assert_eq!(events.len(), 1);
    assert_eq!(json(&events[0])["device"], "lamp");

    let mut subscribe = v4::Subscribe::new_many([
        v4::SubscribeFilter::new("hearth/home/hall/lamp/set".into(), QoS::AtLeastOnce),
        v4::SubscribeFilter::new("hearth/#".into(), QoS::AtLeastOnce),
    ]);
    subscribe.pkid = 3;
    lamp.send(Packet::Subscribe(subscribe)).await;
    match lamp.next().await {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let body = health(&http_get(gateway.http_addr(), "/healthz").await);
    assert_eq!(body["denied_publishes"], 1);
    assert_eq!(body["denied_subscriptions"], 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn messages_kept_in_a_session_are_checked_against_the_rules_when_sent() {
    let nats = TestNats::start().await;
    // No rules at first: the spy subscribes to everything, persistently.
    let open = gateway(&nats, |_| {}).await;
    let (mut spy, _) = RawClient::connect(open.mqtt_addr(), "spy", false, 30).await;
    let mut subscribe = v4::Subscribe::new("#", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    spy.send(Packet::Subscribe(subscribe)).await;
    assert!(matches!(spy.next().await, Some(Packet::SubAck(_))));
    drop(spy);
    open.shutdown().await;

    // Rules now keep it to its own commands; what was kept must not leak.
    let strict = gateway(&nats, |config| config.auth.acl = device_rules()).await;
    let addr = strict.mqtt_addr();
    let (mut device, _) = RawClient::connect(addr, "door", true, 30).await;
    device
        .publish(
            "hearth/home/hall/door/contact",
            br#"{"open":true}"#,
            QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;
    let mut retained = v4::Publish::new(
        "hearth/home/hall/door/availability",
        QoS::AtLeastOnce,
        "online",
    );
    retained.pkid = 2;
    retained.retain = true;
    device.send(Packet::Publish(retained)).await;
    device.expect_puback(2).await;

    let (mut spy, ack) = RawClient::connect(addr, "spy", false, 30).await;
    assert!(ack.session_present);
    assert!(
        spy.silent_for(Duration::from_millis(700)).await,
        "nothing the rules deny"
    );
    strict.shutdown().await;
}

#[tokio::test]
async fn mosquitto_clients_log_in_with_a_password() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = passwords(dir.path(), &[("sensor", "s3cret")]);
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.auth.allow_anonymous = false;
        config.auth.password_file = Some(file);
    })
    .await;
    let port = gateway.mqtt_addr().port().to_string();
    let publish = |password: &'static str| {
        let port = port.clone();
        async move {
            tokio::process::Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-q",
                    "1",
                    "-u",
                    "sensor",
                    "-P",
                    password,
                ])
                .args([
                    "-t",
                    "hearth/home/hall/sensor/motion",
                    "-m",
                    r#"{"detected":true}"#,
                ])
                .output()
                .await
                .expect("run mosquitto_pub")
        }
    };
    let refused = publish("wrong").await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .to_lowercase()
            .contains("password"),
        "{refused:?}"
    );
    let accepted = publish("s3cret").await;
    assert!(accepted.status.success(), "{accepted:?}");
    let js = jetstream(&nats).await;
    let stored = stored_at_least(&js, "HEARTH_EVENTS", 2).await;
    let kinds: Vec<_> = stored
        .iter()
        .map(|m| header(m, "Hearth-Kind").unwrap().to_owned())
        .collect();
    assert!(
        kinds.contains(&"motion".to_owned()) && kinds.contains(&"login_failed".to_owned()),
        "{kinds:?}"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_flooding_client_is_slowed_down_and_the_others_are_not() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.mqtt.max_publish_rate = 20).await;
    let addr = gateway.mqtt_addr();
    let (mut flood, _) = RawClient::connect(addr, "flood", true, 30).await;
    // 250 at once: 20 pass at once, the rest at 20 a second, over 11 s.
    for i in 0..250u16 {
        flood
            .publish(
                "hearth/home/hall/flood/motion",
                br#"{"detected":true}"#,
                QoS::AtLeastOnce,
                i + 1,
                false,
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut calm, _) = RawClient::connect(addr, "calm", true, 30).await;
    calm.publish(
        "hearth/home/hall/calm/motion",
        br#"{"detected":false}"#,
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    calm.expect_puback(1).await;
    // The calm client is done while the flood is still being read.
    let mut acked = 0;
    while let Some(packet) = flood.next_within(Duration::from_millis(20)).await {
        assert!(matches!(packet, Packet::PubAck(_)), "{packet:?}");
        acked += 1;
    }
    assert!(
        acked < 250,
        "the flood was not slowed: {acked} acknowledged already"
    );
    let body = health(&http_get(gateway.http_addr(), "/healthz").await);
    assert!(body["throttled"].as_u64().unwrap() >= 1, "{body}");
    // Slowed, not dropped: every publish is acknowledged in the end.
    while acked < 250 {
        match flood.next().await {
            Some(Packet::PubAck(_)) => acked += 1,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    gateway.shutdown().await;
}
