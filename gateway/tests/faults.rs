//! Faults the gateway survives, with the real binary: killed (SIGKILL, no
//! chance to tidy up) in the middle of QoS 1 streams from many devices and
//! started again, every reading acknowledged to a device is in
//! `HEARTH_EVENTS` exactly once, and no reading is stored twice, once the
//! devices have reconnected and resent what was not acknowledged.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::meters::{self, count, Acked};
use common::{jetstream, stored, TestNats};
use tokio::process::Child;

const DEVICES: u64 = 10;
const EACH: u64 = 300;

fn spawn_gateway(nats: &TestNats, mqtt: SocketAddr, data: &std::path::Path) -> Child {
    common::spawn_gateway_binary(&nats.url(), mqtt, data, &[])
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
    meters::assert_each_acknowledged_stored_once(
        &stored(&js, "HEARTH_EVENTS").await,
        &acked,
        DEVICES * EACH,
        "HEARTH_EVENTS",
    );
    gateway.kill().await.unwrap();
}
