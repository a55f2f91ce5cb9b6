//! The real `hearth-consumers` process's metrics and health checks: the
//! events a rule handled and the commands it issued are counted on
//! /metrics with the consumer's lag; /readyz says whether NATS and the
//! events stream are there, /healthz that the process is alive. Logs as
//! JSON on request.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use hearth_proto::v1::{self, event::Body};
use hearth_test_support::prometheus_sample as sample;

/// A whole process starts and acts.
const PROMPTLY: Duration = Duration::from_secs(15);

#[tokio::test]
async fn handled_events_commands_and_lag_are_on_metrics_and_readiness_follows_nats() {
    let (mut nats, js) = common::start_nats_with_streams().await;
    let dir = tempfile::tempdir().unwrap();
    let homes = dir.path().join("homes.toml");
    std::fs::write(
        &homes,
        "[homes.home.rooms.hall]\nlights = [\"ceiling\"]\noff_after = \"1h\"\n",
    )
    .unwrap();
    let port = hearth_test_support::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _rule = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth-consumers"))
        .args([
            "--nats-url",
            &nats.url(),
            "--metrics-listen",
            &addr.to_string(),
        ])
        .arg("--homes")
        .arg(&homes)
        .arg("lights")
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-consumers");
    common::wait_for_consumer(&js, "hearth-lights", PROMPTLY).await;

    let motion = Body::Motion(v1::Motion { detected: true });
    common::publish_event(&js, &common::device_event("m1", "hall", "pir", motion)).await;
    let handled = "hearth_consumer_events_total{consumer=\"hearth-lights\",outcome=\"handled\"}";
    let page = common::wait_until(
        PROMPTLY,
        "the event and its command counted, and the lag read",
        async || common::http_request(addr, "GET", "/metrics").await.body,
        |page| {
            sample(page, handled) == Some(1.0)
                && sample(
                    page,
                    "hearth_commands_total{kind=\"light_set\",outcome=\"stored\"}",
                ) == Some(1.0)
                && sample(
                    page,
                    "hearth_consumer_ack_pending_events{consumer=\"hearth-lights\"}",
                ) == Some(0.0)
        },
    )
    .await;
    assert!(
        page.contains("# TYPE hearth_consumer_handler_seconds histogram"),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "hearth_consumer_pending_events{consumer=\"hearth-lights\"}"
        ),
        Some(0.0)
    );

    assert_eq!(
        common::http_request(addr, "GET", "/healthz").await.status,
        200
    );
    assert_eq!(
        common::http_request(addr, "GET", "/readyz").await.status,
        200
    );
    nats.kill().await;
    let not_ready = common::wait_until(
        PROMPTLY,
        "not ready without NATS",
        async || common::http_request(addr, "GET", "/readyz").await,
        |response| response.status == 503,
    )
    .await;
    assert!(not_ready.body.contains("NATS"), "{}", not_ready.body);
    assert_eq!(
        common::http_request(addr, "GET", "/healthz").await.status,
        200,
        "alive all the same"
    );
    nats.restart().await;
    common::wait_until(
        PROMPTLY,
        "ready again, the reconnect counted",
        async || common::http_request(addr, "GET", "/metrics").await.body,
        |page| sample(page, "hearth_nats_reconnects_total").is_some_and(|n| n >= 1.0),
    )
    .await;
    let ready = common::http_request(addr, "GET", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
}

/// `--log-format json`: every log line one JSON object, with its fields.
#[tokio::test]
async fn json_logs_are_one_object_a_line_with_their_fields() {
    let (nats, js) = common::start_nats_with_streams().await;
    let dir = tempfile::tempdir().unwrap();
    let homes = dir.path().join("homes.toml");
    std::fs::write(&homes, "[homes.home.rooms.hall]\nlights = [\"ceiling\"]\n").unwrap();
    let rule = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth-consumers"))
        .args(["--nats-url", &nats.url(), "--metrics-listen", "off"])
        .args(["--log-format", "json", "--homes"])
        .arg(&homes)
        .arg("lights")
        .env("HEARTH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-consumers");
    common::wait_for_consumer(&js, "hearth-lights", PROMPTLY).await;
    // Stopped by SIGTERM, so that it logs its stop too.
    let pid = rule.id().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(PROMPTLY, rule.wait_with_output())
        .await
        .expect("stops")
        .unwrap();
    let logs = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line["fields"]["message"] == "consuming"
                && line["fields"]["consumer"] == "hearth-lights"
                && line["level"] == "INFO"),
        "{logs}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line["fields"]["message"] == "stopped"),
        "{logs}"
    );
}
