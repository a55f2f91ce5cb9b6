//! MQTT over TLS, with and without client certificates, with real
//! mosquitto clients.

mod common;

use std::time::Duration;

use common::pki::{pki, Pki};
use common::*;
use hearth_gateway::auth::AclRule;

/// mosquitto_pub over TLS to `port`; its output.
async fn mosquitto_pub_tls(
    port: u16,
    pki: &Pki,
    with_cert: bool,
    topic: &str,
) -> std::process::Output {
    let mut command = tokio::process::Command::new("mosquitto_pub");
    command
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-i",
            "tls-client",
        ])
        .arg("--cafile")
        .arg(&pki.ca)
        .args(["-t", topic, "-m", r#"{"detected":true}"#]);
    if with_cert {
        command
            .arg("--cert")
            .arg(&pki.client_cert)
            .arg("--key")
            .arg(&pki.client_key);
    }
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("mosquitto_pub ends")
        .expect("run mosquitto_pub")
}

#[tokio::test]
async fn tls_without_a_client_certificate() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "scripts/setup.sh installs mosquitto-clients"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.mqtt.tls.listen = "127.0.0.1:0".parse().unwrap();
        config.mqtt.tls.cert = Some(pki.server_cert.clone());
        config.mqtt.tls.key = Some(pki.server_key.clone());
    })
    .await;
    let port = gateway.mqtt_tls_addr().expect("TLS listener").port();
    let output = mosquitto_pub_tls(port, &pki, false, "hearth/home/hall/tls/motion").await;
    assert!(output.status.success(), "{output:?}");
    let js = jetstream(&nats).await;
    let events = stored_at_least(&js, "HEARTH_EVENTS", 1).await;
    assert_eq!(json(&events[0])["device"], "tls");
    // The plain listener still works beside it.
    let (_plain, ack) = RawClient::connect(gateway.mqtt_addr(), "plain", true, 30).await;
    assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_logs_the_device_in_under_its_common_name() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "scripts/setup.sh installs mosquitto-clients"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats = TestNats::start().await;
    let gateway = gateway(&nats, |config| {
        config.mqtt.tls.listen = "127.0.0.1:0".parse().unwrap();
        config.mqtt.tls.cert = Some(pki.server_cert.clone());
        config.mqtt.tls.key = Some(pki.server_key.clone());
        config.mqtt.tls.client_ca = Some(pki.ca.clone());
        config.mqtt.tls.require_client_cert = true;
        config.auth.allow_anonymous = false;
        // No password file: the certificate is the only way in.
        config.auth.acl = vec![AclRule {
            user: "*".into(),
            publish: vec!["hearth/+/+/%u/#".into()],
            subscribe: vec![],
        }];
    })
    .await;
    let port = gateway.mqtt_tls_addr().expect("TLS listener").port();
    let without = mosquitto_pub_tls(
        port,
        &pki,
        false,
        "hearth/home/kitchen/kitchen-sensor/motion",
    )
    .await;
    assert!(
        !without.status.success(),
        "no certificate, no connection: {without:?}"
    );
    let with = mosquitto_pub_tls(
        port,
        &pki,
        true,
        "hearth/home/kitchen/kitchen-sensor/motion",
    )
    .await;
    assert!(with.status.success(), "{with:?}");
    // Its username is the certificate's name: the ACL's %u lets it publish
    // under its own name and nowhere else.
    let other = mosquitto_pub_tls(port, &pki, true, "hearth/home/kitchen/oven/motion").await;
    assert!(
        other.status.success(),
        "acknowledged, then dropped: {other:?}"
    );
    let js = jetstream(&nats).await;
    stored_at_least(&js, "HEARTH_EVENTS", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events: Vec<_> = stored(&js, "HEARTH_EVENTS")
        .await
        .iter()
        .map(json)
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["device"], "kitchen-sensor");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_tls_setup_with_a_missing_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats = TestNats::start().await;
    let mut config = hearth_gateway::config::Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.tls.cert = Some(pki.server_cert.clone());
    config.mqtt.tls.key = Some(dir.path().join("nope.pem"));
    let error = hearth_gateway::Gateway::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("nope.pem"), "{error}");
}
