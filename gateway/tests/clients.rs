//! Off-the-shelf MQTT clients, and the gateway's embedded nats-server.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hearth_gateway::config::Config;
use hearth_gateway::Gateway;

#[tokio::test]
async fn mosquitto_pub_readings_are_stored() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let port = gateway.mqtt_addr().port().to_string();

    let publish = |topic: &'static str, message: &'static str, qos: &'static str| {
        let port = port.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-q", qos, "-i", "mosq-test"])
                .args(["-t", topic, "-m", message])
                .status()
                .expect("run mosquitto_pub")
        })
    };
    assert!(publish(
        "hearth/flat/kitchen/mosq/temperature",
        r#"{"celsius":22.25}"#,
        "1"
    )
    .await
    .unwrap()
    .success());
    assert!(publish(
        "zigbee2mqtt/hall/door",
        r#"{"contact":false,"battery":90}"#,
        "1"
    )
    .await
    .unwrap()
    .success());
    assert!(
        publish("hearth/flat/kitchen/mosq/availability", "offline", "0")
            .await
            .unwrap()
            .success()
    );

    let js = jetstream(&nats).await;
    let stored = stored_at_least(&js, "HEARTH_EVENTS", 4).await;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "hearth.evt.flat.kitchen.temperature.mosq",
            "hearth.evt.home.hall.contact.door",
            "hearth.evt.home.hall.battery.door",
            "hearth.evt.flat.kitchen.availability.mosq",
        ]
    );
    assert_eq!(json(&stored[0])["temperature"]["celsius"], 22.25);
    assert_eq!(
        json(&stored[1])["contact"]["open"],
        true,
        "zigbee2mqtt contact=false is open"
    );
    assert_eq!(
        json(&stored[3])["availability"]["online"],
        false,
        "offline is written out, not omitted as the default"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn without_a_nats_url_the_gateway_runs_and_stops_its_own_nats_server() {
    hearth_test_support::init_tracing();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.auth.allow_anonymous = true;
    config.storage.data_dir = data.path().to_owned();
    config.nats.embedded_listen = format!("127.0.0.1:{}", hearth_test_support::free_port())
        .parse()
        .unwrap();
    if let Some(binary) = std::env::var_os("HEARTH_NATS_SERVER") {
        config.nats.server_binary = binary.into();
    }
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let gateway = Gateway::start(config)
        .await
        .expect("gateway with embedded NATS");
    let url = gateway.nats_url().to_owned();

    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "embedded", true, 30).await;
    device
        .publish(
            "hearth/h/r/d/water_leak",
            br#"{"detected":true}"#,
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            1,
            false,
        )
        .await;
    device.expect_puback(1).await;
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut events = js.get_stream("HEARTH_EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 1);
    assert!(
        data.path().join("nats").join("jetstream").exists(),
        "the store lives in the data directory"
    );

    gateway.shutdown().await;
    let gone = async {
        while tokio::net::TcpStream::connect(url.trim_start_matches("nats://"))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PROMPTLY, gone)
        .await
        .expect("the embedded nats-server stops with the gateway");
}

#[tokio::test]
async fn a_missing_nats_server_binary_is_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.auth.allow_anonymous = true;
    config.storage.data_dir = data.path().to_owned();
    config.nats.server_binary = "/nonexistent/nats-server".into();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let error = Gateway::start(config).await.unwrap_err().to_string();
    assert!(error.contains("/nonexistent/nats-server"), "{error}");
    assert!(
        error.contains("apt-get install nats-server"),
        "says how to install it: {error}"
    );
    assert!(
        error.contains("--nats-url"),
        "and how to do without: {error}"
    );
}

#[tokio::test]
async fn healthz_reports_nats_and_clients() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (_device, _) = RawClient::connect(gateway.mqtt_addr(), "watcher", true, 30).await;

    let body = http_get(gateway.http_addr(), "/healthz").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains(r#""status":"ok""#), "{body}");
    assert!(body.contains(r#""mqtt_clients":1"#), "{body}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_streams_are_named_described_and_limited_as_configured() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.storage.duplicate_window = Duration::from_secs(90);
        config.storage.dlq.max_age = Duration::from_secs(3 * 24 * 3600);
    })
    .await;
    let js = jetstream(&nats).await;
    for (name, subjects, mentions) in [
        ("HEARTH_EVENTS", "hearth.evt.>", "hearth.v1.Event"),
        ("HEARTH_COMMANDS", "hearth.cmd.>", "hearth.v1.Command"),
        ("HEARTH_DLQ", "hearth.dlq.>", "Hearth-Reason"),
    ] {
        let mut stream = js.get_stream(name).await.expect(name);
        let config = stream.info().await.unwrap().config.clone();
        assert_eq!(config.subjects, [subjects], "{name}");
        let description = config.description.unwrap_or_default();
        assert!(description.contains(mentions), "{name}: {description}");
        assert_eq!(config.duplicate_window, Duration::from_secs(90), "{name}");
        assert_eq!(
            config.max_messages_per_subject, -1,
            "{name}: no per-subject limit"
        );
    }
    let dlq = js
        .get_stream("HEARTH_DLQ")
        .await
        .unwrap()
        .cached_info()
        .config
        .max_age;
    assert_eq!(dlq, Duration::from_secs(3 * 24 * 3600));
    let retained = js
        .get_stream("HEARTH_RETAINED")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(retained.subjects, ["hearth.retained.>"]);
    assert_eq!(
        retained.max_messages_per_subject, 1,
        "the last of each topic"
    );
    assert!(retained
        .description
        .is_some_and(|d| d.contains("retained MQTT messages")));
    gateway.shutdown().await;

    // Started again with other limits, the streams are updated in place.
    let gateway = common::gateway(&nats, |config| {
        config.storage.events.max_bytes = bytesize::ByteSize::mib(64);
    })
    .await;
    let mut events = js.get_stream("HEARTH_EVENTS").await.unwrap();
    assert_eq!(
        events.info().await.unwrap().config.max_bytes,
        64 * 1024 * 1024
    );
    gateway.shutdown().await;
}
