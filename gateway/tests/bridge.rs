//! Bridge mode against a real Mosquitto: what devices publish on the home's
//! own broker is stored in `HEARTH_EVENTS`, each message acknowledged to the
//! broker only once stored, so that a gateway killed mid-stream loses
//! nothing and stores nothing twice once it is back; commands go back to
//! devices through the broker.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use hearth_proto::v1::{self, command};
use hearth_proto::Encoding;
use hearth_test_support::TestMosquitto;
use rumqttc::QoS;
use tokio::process::Child;

/// A client of the broker that counts what the broker acknowledged (the
/// devices' side of the bridge).
fn broker_client(
    broker: &TestMosquitto,
    client_id: &str,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<u16>,
    tokio::task::JoinHandle<()>,
) {
    rumqttc_client(broker.addr(), client_id, 100)
}

/// A motion reading of the `probe` device, at QoS 1.
async fn publish_probe(probe: &rumqttc::AsyncClient) {
    probe
        .publish(
            "hearth/home/lab/probe/motion",
            QoS::AtLeastOnce,
            false,
            r#"{"detected":true}"#,
        )
        .await
        .unwrap();
}

/// Publishes a probe reading every 200 ms until one is stored: from then on
/// the bridge is subscribed, and what devices publish reaches it.
async fn wait_until_bridged(js: &jetstream::Context, broker: &TestMosquitto) {
    let (probe, _acks, task) = broker_client(broker, "probe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        publish_probe(&probe).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let events = js.get_stream("HEARTH_EVENTS").await;
        if let Ok(mut events) = events {
            if events
                .info()
                .await
                .is_ok_and(|info| info.state.messages > 0)
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge stores nothing from {}",
            broker.url()
        );
    }
    task.abort();
}

/// Stores a command to switch on light `device` in `room` of `home` in
/// `HEARTH_COMMANDS`, as the house rules do.
async fn publish_light_command(js: &jetstream::Context, room: &str, device: &str) -> v1::Command {
    let command = v1::Command {
        id: uuid::Uuid::now_v7().to_string(),
        correlation_id: uuid::Uuid::now_v7().to_string(),
        home: "home".into(),
        room: room.into(),
        device: device.into(),
        body: Some(command::Body::LightSet(v1::LightSet {
            on: true,
            brightness_pct: Some(30),
        })),
        ..Default::default()
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", Encoding::Json.content_type());
    headers.insert("Hearth-Schema", "hearth.v1.Command");
    js.publish_with_headers(
        format!("hearth.cmd.home.{room}.light.{device}"),
        headers,
        Encoding::Json.encode(&command),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    command
}

/// A gateway bridged to `broker`, once what devices publish there is
/// stored (a probe reading was).
async fn bridged_to(
    broker: &TestMosquitto,
) -> (TestNats, jetstream::Context, hearth_gateway::Gateway) {
    let nats = TestNats::start().await;
    let js = jetstream(&nats).await;
    let url = broker.url();
    let gateway = gateway(&nats, |config| config.bridge.url = Some(url)).await;
    wait_until_bridged(&js, broker).await;
    (nats, js, gateway)
}

/// The gateways' commands consumer: commands delivered and not yet
/// confirmed, and commands not delivered yet.
async fn commands(js: &jetstream::Context) -> (usize, u64) {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-gateway", "HEARTH_COMMANDS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending)
}

/// Waits until [`commands`] says `expected`; panics with `what` if it does
/// not promptly.
async fn wait_for_commands(js: &jetstream::Context, expected: (usize, u64), what: &str) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let now = commands(js).await;
        if now == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Device `device` of room `room` as a client of the broker, subscribed to
/// its native command topic: what it receives, and its event loop.
async fn device_on_broker(
    broker: &TestMosquitto,
    device: &str,
    room: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    tokio::task::JoinHandle<()>,
) {
    let mut options = rumqttc::MqttOptions::new(device, "127.0.0.1", broker.addr().port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe(format!("hearth/home/{room}/{device}/set"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (commands_tx, commands) = tokio::sync::mpsc::unbounded_channel();
    let event_loop = tokio::spawn(async move {
        // The client lives as long as its event loop.
        let _client = client;
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) = event {
                let _ = commands_tx.send(publish);
            }
        }
    });
    // Subscribed by then.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (commands, event_loop)
}

/// Readings of the `meter` devices in the stream, by value, and how many
/// times each is stored.
async fn stored_meter_readings(js: &jetstream::Context) -> BTreeMap<u64, u32> {
    let mut values = BTreeMap::new();
    for message in stored(js, "HEARTH_EVENTS").await {
        let event = json(&message);
        if event["device"]
            .as_str()
            .is_some_and(|d| d.starts_with("meter"))
        {
            let value = event["illuminance"]["lux"].as_f64().expect("a reading") as u64;
            *values.entry(value).or_default() += 1;
        }
    }
    values
}

#[tokio::test]
async fn readings_on_the_broker_are_stored_and_commands_reach_devices_through_it() {
    let nats = TestNats::start().await;
    let broker = TestMosquitto::start().await;
    let url = broker.url();
    let gateway = gateway(&nats, |config| config.bridge.url = Some(url)).await;
    let js = jetstream(&nats).await;
    wait_until_bridged(&js, &broker).await;

    let (device, mut acks, _task) = broker_client(&broker, "z2m");
    for value in 0..200u64 {
        device
            .publish(
                "hearth/home/hall/meter/illuminance",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"lux":{value}}}"#),
            )
            .await
            .unwrap();
    }
    // A Zigbee2MQTT report: one event per recognised field.
    device
        .publish(
            "zigbee2mqtt/kitchen/sensor",
            QoS::AtLeastOnce,
            false,
            r#"{"temperature":21.5,"humidity":40,"battery":90}"#,
        )
        .await
        .unwrap();
    for _ in 0..201 {
        tokio::time::timeout(PROMPTLY, acks.recv())
            .await
            .expect("the broker acknowledges")
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let readings = loop {
        let readings = stored_meter_readings(&js).await;
        if readings.len() == 200 || tokio::time::Instant::now() > deadline {
            break readings;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(readings.len(), 200, "every reading stored");
    assert!(readings.values().all(|n| *n == 1), "none twice");
    let kitchen = stored_at_least(&js, "HEARTH_EVENTS", 204).await;
    let kitchen: Vec<_> = kitchen
        .iter()
        .filter(|m| json(m)["device"] == "sensor")
        .map(|m| {
            assert!(header(m, "Hearth-Kind").is_some(), "{m:?}");
            m.subject.to_string()
        })
        .collect();
    assert_eq!(
        kitchen,
        [
            "hearth.evt.home.kitchen.temperature.sensor",
            "hearth.evt.home.kitchen.humidity.sensor",
            "hearth.evt.home.kitchen.battery.sensor"
        ],
        "a Zigbee2MQTT report through the bridge, one event per field"
    );

    // A command for the meter (a native device, learned from its reports)
    // goes to the broker, where the device subscribes.
    let (mut commands, meter_loop) = device_on_broker(&broker, "meter", "hall").await;
    let command = publish_light_command(&js, "hall", "meter").await;
    let publish = tokio::time::timeout(PROMPTLY, commands.recv())
        .await
        .expect("the command reaches the device through the broker")
        .unwrap();
    assert_eq!(publish.topic, "hearth/home/hall/meter/set");
    let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(payload["command_id"], command.id.as_str());
    assert_eq!(payload["on"], true);
    // The command coming back through the bridge's subscription is a
    // command topic: acknowledged, not stored as an event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stored(&js, "HEARTH_EVENTS")
            .await
            .iter()
            .filter(|m| m.subject.contains(".set"))
            .count(),
        0
    );
    meter_loop.abort();
    gateway.shutdown().await;
}

const READINGS: u64 = 3000;

fn spawn_gateway(nats: &TestNats, broker: &TestMosquitto, data: &std::path::Path) -> Child {
    let mqtt = SocketAddr::from(([127, 0, 0, 1], hearth_test_support::free_port()));
    common::spawn_gateway_binary(&nats.url(), mqtt, data, &["--bridge-url", &broker.url()])
}

#[tokio::test]
async fn a_bridge_killed_mid_stream_loses_nothing_the_broker_had_and_stores_nothing_twice() {
    let nats = TestNats::start().await;
    let broker = TestMosquitto::start().await;
    let data = tempfile::tempdir().unwrap();
    let js = jetstream(&nats).await;
    let mut gateway = spawn_gateway(&nats, &broker, data.path());
    wait_until_bridged(&js, &broker).await;

    // Devices publish everything to the broker, which acknowledges at once;
    // from then on only the bridge stands between the broker and the stream.
    let (device, mut acks, _task) = broker_client(&broker, "meters");
    let publisher = tokio::spawn(async move {
        for value in 0..READINGS {
            device
                .publish(
                    format!("hearth/home/lab/meter-{}/illuminance", value % 10),
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"lux":{value}}}"#),
                )
                .await
                .unwrap();
        }
        device
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stored = js
            .get_stream("HEARTH_EVENTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        if stored > READINGS / 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stored} stored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway.kill().await.unwrap();
    let _device = publisher.await.unwrap();
    for _ in 0..READINGS {
        tokio::time::timeout(PROMPTLY, acks.recv())
            .await
            .expect("the broker acknowledges every reading")
            .unwrap();
    }
    let at_kill = stored_meter_readings(&js).await.len() as u64;
    assert!(at_kill < READINGS, "killed mid-stream ({at_kill} stored)");

    let mut gateway = spawn_gateway(&nats, &broker, data.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let readings = loop {
        let readings = stored_meter_readings(&js).await;
        if readings.len() as u64 == READINGS || tokio::time::Instant::now() > deadline {
            break readings;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let twice: Vec<_> = readings.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let missing: Vec<_> = (0..READINGS)
        .filter(|v| !readings.contains_key(v))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged by the broker, never stored: {} of them, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    gateway.kill().await.unwrap();
}

#[test]
fn a_bridge_setting_that_cannot_work_is_refused_with_the_reason() {
    for (url, more, expected) in [
        (
            "http://broker",
            None,
            "the scheme must be mqtt:// or mqtts://",
        ),
        ("mqtt://broker:port", None, "is not a port number"),
        (
            "mqtt://user:secret@broker",
            None,
            "credentials go in bridge.username",
        ),
        ("mqtt://", None, "expected mqtt://host[:port]"),
        // Read before anything else is tried.
        (
            "mqtts://broker.lan",
            Some(["--bridge-tls-ca", "/nonexistent/broker-ca.pem"]),
            "bridge TLS: cannot read certificates /nonexistent/broker-ca.pem",
        ),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_hearth-gateway"))
            .args(["--bridge-url", url])
            .args(more.iter().flatten())
            .args(["--allow-anonymous", "--nats-url", "nats://127.0.0.1:1"])
            .output()
            .expect("run hearth-gateway");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{url} accepted");
        assert!(stderr.contains(expected), "{url}: {stderr}");
    }
}

/// How the bridge meets a TLS broker.
#[derive(Clone, Copy)]
enum Meeting {
    /// It trusts the broker's CA.
    Trusting,
    /// The broker also asks for a client certificate, and gets one.
    WithClientCertificate,
    /// It trusts another CA.
    Distrusting,
}

/// A Mosquitto with a TLS listener whose certificates are made in `dir`,
/// and a gateway bridged to it over TLS as `meeting` says.
async fn bridged_over_tls(
    dir: &std::path::Path,
    meeting: Meeting,
) -> (
    TestMosquitto,
    TestNats,
    jetstream::Context,
    hearth_gateway::Gateway,
) {
    let pki = common::pki::pki(&dir.join("broker"));
    let client_ca = matches!(meeting, Meeting::WithClientCertificate).then_some(&*pki.ca);
    let broker = TestMosquitto::start_tls(&pki.server_cert, &pki.server_key, client_ca).await;
    assert!(broker.url().starts_with("mqtts://"), "{}", broker.url());
    let nats = TestNats::start().await;
    let js = jetstream(&nats).await;
    let url = broker.url();
    let ca = match meeting {
        Meeting::Distrusting => common::pki::pki(&dir.join("other")).ca,
        _ => pki.ca.clone(),
    };
    let gateway = gateway(&nats, |config| {
        config.bridge.url = Some(url);
        config.bridge.tls_ca = Some(ca);
        if matches!(meeting, Meeting::WithClientCertificate) {
            config.bridge.tls_cert = Some(pki.client_cert);
            config.bridge.tls_key = Some(pki.client_key);
        }
    })
    .await;
    (broker, nats, js, gateway)
}

/// `mqtts://`: the bridge reaches the broker's TLS listener, verifying its
/// certificate against `bridge.tls_ca` (and presenting its own when the
/// broker asks for one), and stores what devices publish there.
#[tokio::test]
async fn a_tls_broker_verified_by_its_ca_is_bridged() {
    for meeting in [Meeting::Trusting, Meeting::WithClientCertificate] {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _nats, js, gateway) = bridged_over_tls(dir.path(), meeting).await;
        // Devices publish on the broker's plain listener; the bridge is
        // subscribed on its TLS one.
        wait_until_bridged(&js, &broker).await;
        gateway.shutdown().await;
    }
}

/// A broker whose certificate the bridge cannot verify is not bridged:
/// nothing from it is stored.
#[tokio::test]
async fn a_broker_with_an_untrusted_certificate_is_not_bridged() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _nats, js, gateway) = bridged_over_tls(dir.path(), Meeting::Distrusting).await;
    let (probe, mut acks, task) = broker_client(&broker, "probe");
    for _ in 0..10 {
        publish_probe(&probe).await;
        tokio::time::timeout(PROMPTLY, acks.recv())
            .await
            .expect("the broker acknowledges")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = stored(&js, "HEARTH_EVENTS").await;
    assert!(
        stored.is_empty(),
        "stored from a broker the bridge cannot verify: {stored:?}"
    );
    task.abort();
    gateway.shutdown().await;
}

/// A command forwarded to the broker is confirmed to the commands downlink
/// (and so taken off `HEARTH_COMMANDS`) only once the broker acknowledged
/// it: with the broker frozen it stays pending, thawed it is confirmed.
#[tokio::test]
async fn a_forwarded_command_is_confirmed_only_once_the_broker_acknowledged_it() {
    let broker = TestMosquitto::start().await;
    // The probe's reading also tells the gateway where the probe is.
    let (_nats, js, gateway) = bridged_to(&broker).await;
    broker.freeze();
    publish_light_command(&js, "lab", "probe").await;
    wait_for_commands(
        &js,
        (1, 0),
        "the command never reached the gateway unconfirmed",
    )
    .await;
    // Well within commands.delivery_timeout (5 s), after which it would be
    // sent again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        commands(&js).await,
        (1, 0),
        "confirmed while the broker had not acknowledged it"
    );
    broker.thaw();
    wait_for_commands(&js, (0, 0), "not confirmed once the broker acknowledged it").await;
    gateway.shutdown().await;
}

/// A broker that comes back without the bridge's session (it crashed, with
/// nothing saved) has lost the command it had not acknowledged: that one
/// is not confirmed, so the commands downlink sends it again, it reaches
/// the device and is confirmed then.
#[tokio::test]
async fn a_command_the_broker_lost_with_its_session_is_sent_again() {
    let mut broker = TestMosquitto::start().await;
    let (_nats, js, gateway) = bridged_to(&broker).await;
    broker.freeze();
    let lost = publish_light_command(&js, "lab", "probe").await;
    wait_for_commands(&js, (1, 0), "the command never reached the gateway").await;
    broker.crash_and_restart().await;

    // The device, on the broker that came back.
    let (mut commands, device_loop) = device_on_broker(&broker, "probe", "lab").await;

    // It comes again after commands.delivery_timeout (5 s).
    let publish = tokio::time::timeout(Duration::from_secs(30), commands.recv())
        .await
        .expect("the lost command sent again")
        .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(payload["command_id"], lost.id.as_str());
    wait_for_commands(&js, (0, 0), "not every command confirmed").await;
    device_loop.abort();
    gateway.shutdown().await;
}
