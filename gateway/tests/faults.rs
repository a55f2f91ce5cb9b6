//! Faults the gateway survives, with the real binary: killed (SIGKILL, no
//! chance to tidy up) in the middle of QoS 1 streams from many devices and
//! started again, every reading acknowledged to a device is in
//! `HEARTH_EVENTS` exactly once, and no reading is stored twice, once the
//! devices have reconnected and resent what was not acknowledged.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{jetstream, json, stored, TestNats};
use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_util::codec::Framed;

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

/// The readings each device had acknowledged.
type Acked = Arc<Mutex<BTreeMap<u64, Vec<u64>>>>;

/// Readings a device has in flight at most.
const WINDOW: usize = 20;

/// A device connection: MQTT 3.1.1 over TCP with rumqttc's codec.
type Connection = Framed<TcpStream, v4::Codec>;

/// Connects with a persistent session (clean session 0); `None` while the
/// gateway is away.
async fn connect(mqtt: SocketAddr, client_id: &str) -> Option<Connection> {
    let stream = TcpStream::connect(mqtt).await.ok()?;
    let mut connection = Framed::new(
        stream,
        v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        },
    );
    let mut connect = v4::Connect::new(client_id);
    connect.clean_session = false;
    connect.keep_alive = 30;
    connection.send(Packet::Connect(connect)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(5), connection.next()).await {
        Ok(Some(Ok(Packet::ConnAck(ack)))) if ack.code == v4::ConnectReturnCode::Success => {
            Some(connection)
        }
        _ => None,
    }
}

/// A device sending `EACH` readings at QoS 1, `WINDOW` in flight, as a
/// device does: when the connection drops it connects again and resends
/// every reading not acknowledged, with DUP set and the same packet id.
fn device(mqtt: SocketAddr, number: u64, acked: Acked) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client_id = format!("meter-{number}");
        let topic = format!("hearth/home/lab/meter-{number}/illuminance");
        let payload = |value: u64| format!(r#"{{"lux":{value}}}"#).into_bytes();
        let publish = |pkid: u16, value: u64, dup: bool| {
            let mut publish = v4::Publish::new(&topic, QoS::AtLeastOnce, payload(value));
            publish.pkid = pkid;
            publish.dup = dup;
            Packet::Publish(publish)
        };
        let mut unacked: BTreeMap<u16, u64> = BTreeMap::new();
        let mut sent = 0u64;
        'connection: loop {
            let Some(mut connection) = connect(mqtt, &client_id).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            for (&pkid, &value) in &unacked {
                if connection.send(publish(pkid, value, true)).await.is_err() {
                    continue 'connection;
                }
            }
            loop {
                while unacked.len() < WINDOW && sent < EACH {
                    let value = number * 10_000 + sent;
                    // Packet ids 1..=WINDOW * 2, never one still in flight.
                    let pkid = (1..=(WINDOW as u16) * 2)
                        .find(|pkid| !unacked.contains_key(pkid))
                        .expect("a free packet id");
                    unacked.insert(pkid, value);
                    sent += 1;
                    if connection.send(publish(pkid, value, false)).await.is_err() {
                        continue 'connection;
                    }
                    if sent % 20 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if unacked.is_empty() && sent == EACH {
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(10), connection.next()).await {
                    Ok(Some(Ok(Packet::PubAck(ack)))) => {
                        if let Some(value) = unacked.remove(&ack.pkid) {
                            acked.lock().unwrap().entry(number).or_default().push(value);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => continue 'connection,
                }
            }
        }
    })
}

fn count(acked: &Acked) -> u64 {
    acked.lock().unwrap().values().map(|v| v.len() as u64).sum()
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
        .map(|n| device(mqtt, n, Arc::clone(&acked)))
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
