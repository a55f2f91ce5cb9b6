//! The paho-mqtt Python client (as Home Assistant uses) against the gateway.

mod common;

use common::*;

/// Runs `tests/paho/client.py` against `port`; its JSON report.
async fn paho(port: u16, protocol: &str, scenario: &str) -> (bool, serde_json::Value) {
    let python = hearth_test_support::python_with_paho()
        .expect("paho-mqtt is missing: scripts/setup.sh installs it into .tools/venv");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho/client.py");
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(python)
            .arg(script)
            .args([&port.to_string(), protocol, scenario])
            .output(),
    )
    .await
    .expect("the paho client ends")
    .expect("run the paho client");
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!("no report from paho: {output:?}");
    });
    (output.status.success(), report)
}

#[tokio::test]
async fn paho_mqtt_3_1_1_subscribes_publishes_and_receives() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (ok, report) = paho(gateway.mqtt_addr().port(), "3.1.1", "roundtrip").await;
    assert!(ok, "{report}");
    assert_eq!(report["suback"], serde_json::json!([1]));
    assert_eq!(report["messages"][0]["topic"], "paho/test");
    assert_eq!(report["messages"][0]["payload"], "hello");
    assert_eq!(report["messages"][0]["qos"], 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn paho_mqtt_5_connects_and_its_user_properties_travel_with_the_message() {
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |_| {}).await;
    let (ok, report) = paho(gateway.mqtt_addr().port(), "5", "roundtrip").await;
    assert!(ok, "{report}");
    assert_eq!(report["connack"], "Success");
    assert_eq!(report["suback"], serde_json::json!([1]));
    let message = &report["messages"][0];
    assert_eq!(message["topic"], "paho/test");
    assert_eq!(message["payload"], "hello");
    assert_eq!(
        message["user_properties"],
        serde_json::json!([["room", "kitchen"]])
    );
    gateway.shutdown().await;
}
