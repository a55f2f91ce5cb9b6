//! JetStream storage full, with the real binary: `HEARTH_EVENTS` configured
//! to keep everything (`discard = "new"`) in a small `max_bytes`. When it is
//! full the gateway stops acknowledging (devices wait, their keep-alive
//! still answered), says why in its log, its metrics and `/readyz`, and
//! acknowledges nothing it did not store; once there is room again (an
//! operator raises the limit, as `nats stream edit` would) every reading is
//! stored, once, and acknowledged.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use hearth_test_support::prometheus_sample as metric;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use tokio::process::Command;

const READINGS: u64 = 400;
const WINDOW: usize = 10;
const TOPIC: &str = "hearth/home/cellar/meter/illuminance";

/// Readings in `HEARTH_EVENTS`, by value, with how often each is there.
async fn stored_values(js: &async_nats::jetstream::Context) -> BTreeMap<u64, u32> {
    let mut values = BTreeMap::new();
    for message in stored(js, "HEARTH_EVENTS").await {
        let value = json(&message)["illuminance"]["lux"]
            .as_f64()
            .expect("a reading") as u64;
        *values.entry(value).or_default() += 1;
    }
    values
}

/// Sends readings from `next` on, `WINDOW` in flight, until all up to
/// `READINGS` are acknowledged or no acknowledgement came for `stall`.
/// Returns whether all were acknowledged.
async fn send(
    client: &mut RawClient,
    next: &mut u64,
    in_flight: &mut BTreeMap<u16, u64>,
    acked: &mut BTreeSet<u64>,
    stall: Duration,
) -> bool {
    loop {
        while in_flight.len() < WINDOW && *next < READINGS {
            let pkid = (1..=(2 * WINDOW as u16))
                .find(|pkid| !in_flight.contains_key(pkid))
                .expect("a free packet id");
            let payload = format!(r#"{{"lux":{next}}}"#);
            client
                .publish(TOPIC, payload.as_bytes(), QoS::AtLeastOnce, pkid, false)
                .await;
            in_flight.insert(pkid, *next);
            *next += 1;
        }
        if in_flight.is_empty() {
            return true;
        }
        match client.next_within(stall).await {
            Some(Packet::PubAck(ack)) => {
                let value = in_flight
                    .remove(&ack.pkid)
                    .expect("a PUBACK for a publish in flight");
                acked.insert(value);
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => return false,
        }
    }
}

#[tokio::test]
async fn a_full_stream_holds_the_acknowledgements_says_why_and_recovers_when_there_is_room() {
    let nats = TestNats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hearth.toml");
    std::fs::write(
        &config,
        "[storage.events]\nmax_age = \"1d\"\nmax_bytes = \"64 KiB\"\ndiscard = \"new\"\n",
    )
    .unwrap();
    let log = dir.path().join("gateway.log");
    let mqtt = SocketAddr::from(([127, 0, 0, 1], hearth_test_support::free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], hearth_test_support::free_port()));
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_hearth-gateway"))
        .arg("--config")
        .arg(&config)
        .args(["--nats-url", &nats.url(), "--allow-anonymous"])
        .args(["--mqtt-listen", &mqtt.to_string()])
        .args(["--http-listen", &http.to_string()])
        .env("HEARTH_LOG", "warn,hearth_gateway=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-gateway");
    let mut client = None;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(mqtt).await.is_ok() {
            client = Some(RawClient::connect(mqtt, "cellar-meter", true, 30).await.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the gateway listens");
    let js = jetstream(&nats).await;

    let (mut next, mut in_flight, mut acked) = (0, BTreeMap::new(), BTreeSet::new());
    let all = send(
        &mut client,
        &mut next,
        &mut in_flight,
        &mut acked,
        Duration::from_secs(3),
    )
    .await;
    assert!(
        !all,
        "{READINGS} readings fit in 64 KiB: the stream never filled"
    );
    assert!(
        !acked.is_empty(),
        "nothing stored before the stream was full"
    );

    // Full: nothing acknowledged that is not stored, nothing stored twice.
    let values = stored_values(&js).await;
    let unstored: Vec<_> = acked.iter().filter(|v| !values.contains_key(v)).collect();
    assert!(
        unstored.is_empty(),
        "acknowledged, not stored: {unstored:?}"
    );
    assert!(values.values().all(|n| *n == 1), "stored twice: {values:?}");
    // The device is waiting, not cut off: its keep-alive is answered.
    client.send(Packet::PingReq).await;
    match client.next_within(PROMPTLY).await {
        Some(Packet::PingResp) => {}
        other => panic!("expected PINGRESP while storage is full, got {other:?}"),
    }
    // Says why: /readyz, the metrics, the log.
    let ready = http_get(http, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("storage_full"),
        "{ready}"
    );
    let metrics = http_get(http, "/metrics").await;
    assert_eq!(
        metric(&metrics, "hearth_gateway_store_failing"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "hearth_gateway_store_failures_total{reason=\"storage_full\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("storing in JetStream fails") && logged.contains("maximum bytes"),
        "{logged}"
    );

    // Room again, as an operator would make it.
    let mut events = js.get_stream("HEARTH_EVENTS").await.unwrap();
    let mut stream_config = events.info().await.unwrap().config.clone();
    stream_config.max_bytes = 16 * 1024 * 1024;
    js.update_stream(stream_config).await.unwrap();
    let all = send(
        &mut client,
        &mut next,
        &mut in_flight,
        &mut acked,
        Duration::from_secs(15),
    )
    .await;
    assert!(
        all,
        "{} of {READINGS} acknowledged after the stream got room",
        acked.len()
    );
    let values = stored_values(&js).await;
    assert_eq!(values.len() as u64, READINGS, "every reading stored");
    assert!(values.values().all(|n| *n == 1), "none twice");
    let ready = http_get(http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(http, "/metrics").await;
    assert_eq!(metric(&metrics, "hearth_gateway_store_failing"), Some(0.0));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("storing in JetStream works again"));
    gateway.kill().await.unwrap();
}

#[tokio::test]
async fn stream_limits_the_server_cannot_reserve_are_refused_at_start_with_the_sizes() {
    let nats =
        TestNats::start_with(|config| config.jetstream_max_file = Some(8 * 1024 * 1024)).await;
    let mut config = hearth_gateway::config::Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let error = hearth_gateway::Gateway::start(config)
        .await
        .expect_err("1.4 GiB of streams on an 8 MiB store")
        .to_string();
    assert!(
        error.contains("cannot reserve the streams' storage") && error.contains("1.4 GiB"),
        "{error}"
    );
}
