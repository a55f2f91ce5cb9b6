//! Reaction latency, printed as figures (not a timed test): motion sensors
//! publish over MQTT to the gateway, the lights rule reads the events from
//! JetStream and commands the room's light, and the light, an MQTT client
//! of the same gateway, receives the command. Printed: the time from the
//! motion PUBLISH to the light's command, p50/p99/max, at a steady event
//! rate spread over many rooms, and the rule's throughput.
//!
//! Run: `cargo bench -p hearth-consumers --bench reaction`.
//! `HEARTH_BENCH_RATE` (motion events/s, default 200), `HEARTH_BENCH_ROOMS`
//! (default 100), `HEARTH_BENCH_SECS` (default 10). Everything runs on this
//! machine: nats-server, the gateway, the rule and the simulated devices.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hearth_consumers::commands::Commands;
use hearth_consumers::homes::Homes;
use hearth_consumers::lights::{self, Lights};
use hearth_consumers::runtime;
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

type Client = Framed<TcpStream, v4::Codec>;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let rate = setting("HEARTH_BENCH_RATE", 200);
    let rooms = setting("HEARTH_BENCH_ROOMS", 100);
    let secs = setting("HEARTH_BENCH_SECS", 10);

    let nats = TestNats::start().await;
    let mut config = hearth_gateway::config::Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.max_publish_rate = 0;
    let gateway = hearth_gateway::Gateway::start(config)
        .await
        .expect("gateway");
    let addr = gateway.mqtt_addr();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());

    // Every room dark, its light off again soon after, so that each motion
    // (a room every rooms/rate seconds) is a command to measure.
    let mut homes = String::new();
    for room in 0..rooms {
        homes.push_str(&format!(
            "[homes.bench.rooms.r{room}]\nlights = [\"light\"]\noff_after = \"200ms\"\n"
        ));
    }
    let homes = Homes::parse(Path::new("bench.toml"), &homes).unwrap();
    let lights = Lights::open(&js, homes, Commands::new(js.clone(), Encoding::Json))
        .await
        .expect("lights state");
    let shutdown = CancellationToken::new();
    let timers = tokio::spawn(lights.clone().run_timers(shutdown.clone()));
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rule = {
        let (js, stop, handled) = (js.clone(), shutdown.clone(), Arc::clone(&handled));
        tokio::spawn(async move {
            runtime::run(
                &js,
                &lights::spec(),
                move |received| {
                    let lights = lights.clone();
                    let handled = Arc::clone(&handled);
                    async move {
                        let outcome = lights.handle(received).await;
                        handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        outcome
                    }
                },
                stop,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One MQTT client as all the lights: it subscribes to every command.
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut light = connect(addr, "lights").await;
    let mut subscribe = v4::Subscribe::new("hearth/bench/+/light/set", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    light.send(Packet::Subscribe(subscribe)).await.unwrap();
    assert!(matches!(light.next().await, Some(Ok(Packet::SubAck(_)))));
    let listener = {
        let (sent, latencies) = (Arc::clone(&sent), Arc::clone(&latencies));
        tokio::spawn(async move {
            while let Some(Ok(packet)) = light.next().await {
                let Packet::Publish(publish) = packet else {
                    continue;
                };
                if publish.qos != QoS::AtMostOnce {
                    let _ = light
                        .send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
                        .await;
                }
                if !publish.payload.windows(9).any(|w| w == b"\"on\":true") {
                    continue;
                }
                let room: Option<u64> = publish
                    .topic
                    .split('/')
                    .nth(2)
                    .and_then(|r| r.strip_prefix('r'))
                    .and_then(|r| r.parse().ok());
                if let Some(at) = room.and_then(|room| sent.lock().unwrap().remove(&room)) {
                    latencies.lock().unwrap().push(at.elapsed());
                }
            }
        })
    };

    // The motion sensors: one MQTT client publishing for every room, at a
    // steady rate.
    let mut sensor = connect(addr, "sensors").await;
    let reader = tokio::spawn({
        async move {
            let started = Instant::now();
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let mut published = 0u64;
            let mut pkid = 0u16;
            while started.elapsed() < Duration::from_secs(secs) {
                // Each room's sensor reports motion, then clear (as a PIR
                // does after its cool-down): two events per room in turn.
                let room = (published / 2) % rooms;
                let detected = published % 2 == 0;
                pkid = pkid.wrapping_add(1).max(1);
                let payload: &[u8] = if detected {
                    br#"{"detected":true}"#
                } else {
                    br#"{"detected":false}"#
                };
                let mut publish = v4::Publish::new(
                    format!("hearth/bench/r{room}/pir/motion"),
                    QoS::AtMostOnce,
                    payload.to_vec(),
                );
                publish.pkid = 0;
                sensor.send(Packet::Publish(publish)).await.unwrap();
                if detected {
                    sent.lock().unwrap().insert(room, Instant::now());
                }
                published += 1;
                let next = started + interval.mul_f64(published as f64);
                tokio::time::sleep_until(next.into()).await;
            }
            published
        }
    });
    let published = reader.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.cancel();
    let _ = rule.await;
    let _ = timers.await;
    listener.abort();

    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "hearth reaction benchmark: {rate} motion events/s (detected and clear in turn) over {rooms} rooms for {secs} s (MQTT → gateway → JetStream → lights rule → gateway → MQTT)"
    );
    println!(
        "  motion published {published}, events handled by the rule {}, light commands measured {}",
        handled.load(std::sync::atomic::Ordering::Relaxed),
        latencies.len()
    );
    println!(
        "  reaction latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(0.50).as_secs_f64() * 1e3,
        percentile(0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    gateway.shutdown().await;
}

async fn connect(addr: std::net::SocketAddr, client_id: &str) -> Client {
    let mut client = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        },
    );
    client
        .send(Packet::Connect(v4::Connect::new(client_id)))
        .await
        .unwrap();
    assert!(matches!(client.next().await, Some(Ok(Packet::ConnAck(_)))));
    client
}
