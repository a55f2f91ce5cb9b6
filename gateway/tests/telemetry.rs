//! The gateway's Prometheus metrics and readiness, in a process of their
//! own (the recorder is per process): a device's events are counted by
//! convention and kind, a bad payload by its dead-letter reason, the store
//! time as a histogram, the connected clients read at scrape time; /readyz
//! follows NATS.

mod common;

use std::time::Duration;

use common::{gateway, http_get, RawClient, TestNats, PROMPTLY};
use hearth_test_support::prometheus_sample as sample;
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn events_dead_letters_store_times_and_clients_are_on_metrics_and_readiness_follows_nats() {
    hearth_gateway::telemetry::install().expect("the recorder");
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "pir", true, 30).await;
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
    device
        .publish(
            "hearth/home/hall/pir/motion",
            b"not json",
            QoS::AtLeastOnce,
            2,
            false,
        )
        .await;
    device.expect_puback(2).await;

    let page = http_get(gateway.http_addr(), "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(
        sample(
            &page,
            r#"hearth_gateway_events_total{convention="native",kind="motion"}"#
        ),
        Some(1.0),
        "{page}"
    );
    let dead_letters: f64 = page
        .lines()
        .filter(|line| line.starts_with("hearth_gateway_dead_letters_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dead_letters, 1.0, "{page}");
    assert_eq!(
        sample(&page, "hearth_gateway_store_seconds_count"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "hearth_gateway_mqtt_clients"),
        Some(1.0),
        "{page}"
    );

    let ready = http_get(gateway.http_addr(), "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    nats.kill().await;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let ready = http_get(gateway.http_addr(), "/readyz").await;
        if ready.starts_with("HTTP/1.1 503") {
            assert!(ready.contains("NATS"), "{ready}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.restart().await;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let page = http_get(gateway.http_addr(), "/metrics").await;
        if sample(&page, "hearth_gateway_nats_reconnects_total").is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect counted: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_device_held_back_by_its_inflight_window_is_counted_as_backpressure() {
    hearth_gateway::telemetry::install().expect("the recorder");
    let mut nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| config.mqtt.max_inflight = 2).await;
    let (mut device, _) = RawClient::connect(gateway.mqtt_addr(), "meter", true, 30).await;
    // Storage away: the first two publishes wait, the rest are not read.
    nats.kill().await;
    for pkid in 1..=5 {
        let payload = format!(r#"{{"lux":{pkid}}}"#);
        device
            .publish(
                "hearth/home/hall/meter/illuminance",
                payload.as_bytes(),
                QoS::AtLeastOnce,
                pkid,
                false,
            )
            .await;
    }
    let series = r#"hearth_gateway_backpressure_waits_total{cause="inflight_window"}"#;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let page = http_get(gateway.http_addr(), "/metrics").await;
        if sample(&page, series).is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.restart().await;
    for pkid in 1..=5 {
        device.expect_puback(pkid).await;
    }
    gateway.shutdown().await;
}
