//! Faults the gateway survives, with the real binary: killed (SIGKILL, no
//! chance to tidy up) in the middle of QoS 1 streams from many devices and
//! started again, every reading acknowledged to a device is in
//! `HEARTH_EVENTS` exactly once, and no reading is stored twice, once the
//! devices have reconnected and resent what was not acknowledged.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::meters::{self, count, Acked};
use common::{jetstream, json, stored, TestNats};
use tokio::process::{Child, Command};

const DEVICES: u64 = 10;
const EACH: u64 = 300;

fn spawn_gateway(nats: &TestNats, mqtt: SocketAddr, data: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hearth-gateway"))
        .args([
            "--nats-url",
            &nats.url(),
            "--mqtt-listen",
            &mqtt.to_string(),
        ])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--allow-anonymous",
            "--data-dir",
        ])
        .arg(data)
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-gateway")
}

async fn wait_for_listener(mqtt: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(mqtt).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway does not listen on {mqtt}");
}

#[tokio::test]
async fn a_gateway_killed_mid_stream_loses_no_acknowledged_reading_and_stores_none_twice() {
    let nats = TestNats::start().await;
    let data = tempfile::tempdir().unwrap();
    let mqtt = SocketAddr::from(([127, 0, 0, 1], hearth_test_support::free_port()));
    let mut gateway = spawn_gateway(&nats, mqtt, data.path());
    wait_for_listener(mqtt).await;

    let acked: Acked = Arc::default();
    let devices: Vec<_> = (0..DEVICES)
        .map(|n| {
            meters::spawn(
                mqtt,
                "home",
                n,
                EACH,
                meters::no_quota(EACH),
                Arc::clone(&acked),
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&acked) < DEVICES * EACH / 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} acknowledged",
            count(&acked)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway.kill().await.unwrap();
    let at_kill = count(&acked);
    assert!(at_kill < DEVICES * EACH, "killed mid-stream");
    let mut gateway = spawn_gateway(&nats, mqtt, data.path());
    for device in devices {
        tokio::time::timeout(Duration::from_secs(90), device)
            .await
            .unwrap_or_else(|_| panic!("only {} of {} acknowledged", count(&acked), DEVICES * EACH))
            .unwrap();
    }

    let js = jetstream(&nats).await;
    let mut stored_values: BTreeMap<u64, u32> = BTreeMap::new();
    for message in stored(&js, "HEARTH_EVENTS").await {
        let value = json(&message)["illuminance"]["lux"]
            .as_f64()
            .expect("a reading") as u64;
        *stored_values.entry(value).or_default() += 1;
    }
    let twice: Vec<_> = stored_values.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    for (device, values) in acked.lock().unwrap().iter() {
        let missing: Vec<_> = values
            .iter()
            .filter(|value| !stored_values.contains_key(value))
            .collect();
        assert!(
            missing.is_empty(),
            "meter-{device}: acknowledged, not stored: {missing:?}"
        );
    }
    assert_eq!(
        stored_values.len() as u64,
        DEVICES * EACH,
        "every reading, once"
    );
    gateway.kill().await.unwrap();
}
