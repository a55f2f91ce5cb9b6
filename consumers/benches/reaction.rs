//! Reaction latency, printed as figures (not a timed test): motion sensors
//! publish over MQTT to the gateway, the lights rule reads the events from
//! JetStream and commands the room's light, and the light, an MQTT client
//! of the same gateway, receives the command. Printed: the time from the
//! motion PUBLISH to the light's command, p50/p99/max, at a steady event
//! rate spread over many rooms (after a second's warm-up), and how much of
//! it is the way to the rule.
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
use hearth_consumers::runtime::{self, Received};
use hearth_proto::v1::{self, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

type Client = Framed<TcpStream, v4::Codec>;

/// The first events are sent, not measured: the first writes to a new
/// store and the first pull requests cost tens of milliseconds once.
const WARM_UP: Duration = Duration::from_secs(1);

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
    // When each room's last motion was published, and how long the events
    // took to reach the rule (the first half of the way).
    let sent: Arc<Mutex<HashMap<u64, (Instant, bool)>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let to_rule: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rule = {
        let (js, stop, handled) = (js.clone(), shutdown.clone(), Arc::clone(&handled));
        let (sent, to_rule) = (Arc::clone(&sent), Arc::clone(&to_rule));
        tokio::spawn(async move {
            runtime::run_batches(
                &js,
                &lights::spec(),
                move |events: Vec<Received>| {
                    for received in &events {
                        let detected = matches!(
                            received.event.body,
                            Some(Body::Motion(v1::Motion { detected: true }))
                        );
                        let room = received
                            .event
                            .room
                            .strip_prefix('r')
                            .and_then(|r| r.parse().ok());
                        if let Some((at, true)) = room
                            .filter(|_| detected)
                            .and_then(|room: u64| sent.lock().unwrap().get(&room).copied())
                        {
                            to_rule.lock().unwrap().push(at.elapsed());
                        }
                    }
                    let lights = lights.clone();
                    let handled = Arc::clone(&handled);
                    async move {
                        let count = events.len() as u64;
                        let outcomes = lights.handle_batch(events).await;
                        handled.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                        outcomes
                    }
                },
                stop,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One MQTT client as all the lights: it subscribes to every command.
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
                if let Some((at, true)) = room.and_then(|room| sent.lock().unwrap().remove(&room)) {
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
                // Noted before it is sent: the command can come back before
                // this task runs again.
                if detected {
                    let warming = started.elapsed() < WARM_UP;
                    sent.lock()
                        .unwrap()
                        .insert(room, (Instant::now(), !warming));
                }
                sensor.send(Packet::Publish(publish)).await.unwrap();
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

    let summary = |latencies: &Mutex<Vec<Duration>>| {
        let mut latencies = latencies.lock().unwrap().clone();
        latencies.sort();
        let percentile = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3
        };
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} measured)",
            percentile(0.50),
            percentile(0.99),
            percentile(1.0),
            latencies.len()
        )
    };
    println!(
        "hearth reaction benchmark: {rate} motion events/s (detected and clear in turn) over {rooms} rooms for {secs} s, the first {WARM_UP:?} not measured (MQTT → gateway → JetStream → lights rule → gateway → MQTT)"
    );
    println!(
        "  motion published {published}, events handled by the rule {}",
        handled.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!("  reaction latency: {}", summary(&latencies));
    println!("    of which to the rule: {}", summary(&to_rule));
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
