//! Ingest throughput, printed as figures (not a timed test):
//!
//! - QoS 1 publishes acknowledged to devices (and so stored) through the
//!   gateway, with 1 and with 50 device connections;
//! - the raw async-nats JetStream publish rate from one process into the
//!   same server: the ceiling;
//! - the same MQTT load sent to nats-server's built-in MQTT listener: the peer.
//!
//! Run: `cargo bench -p hearth-gateway --bench ingest`. Each figure is
//! measured for `HEARTH_BENCH_SECS` seconds (default 5) after a one-second
//! warm-up, against every nats-server named in `HEARTH_BENCH_SERVERS`
//! (colon-separated paths; default: `$HEARTH_NATS_SERVER` or `nats-server`).
//! `HEARTH_BENCH_ONLY` measures a single figure (`raw`, `raw-shaped`, `gateway-1`,
//! `gateway-50`, `nats-mqtt-1`, `nats-mqtt-50`), e.g. under a profiler.
//! `HEARTH_BENCH_ENCODING=protobuf` stores protobuf instead of JSON events.
//! The gateway records its metrics as the binary does;
//! `HEARTH_BENCH_NO_METRICS=1` measures without.
//! Everything runs on this machine: the load, the gateway and nats-server
//! share its cores, as on a Raspberry Pi that hosts them all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use hearth_gateway::config::Config;
use hearth_gateway::Gateway;
use hearth_test_support::{free_port, TestNats};

/// The same allocator as the `hearth-gateway` binary, counting allocations
/// so that each figure can say how many it took per message.
#[global_allocator]
static ALLOCATOR: Counting = Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: forwards every call unchanged to mimalloc, which upholds the
// GlobalAlloc contract; the counter is a relaxed atomic increment.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// Each client's inflight window (rumqttc's default); the gateway reads up
/// to its own `mqtt.max_inflight` (1024) per connection.
const INFLIGHT: u16 = 100;
const TOPIC: &str = "hearth/home/lab/meter/illuminance";

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` and nextest's listing also run bench
    // targets; only `cargo bench` (which passes --bench) measures.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    // Metrics recorded, as the binary records them (`HEARTH_BENCH_NO_METRICS`
    // to measure without).
    if std::env::var_os("HEARTH_BENCH_NO_METRICS").is_none() {
        hearth_gateway::telemetry::install().expect("the metrics recorder");
    }
    let secs: u64 = std::env::var("HEARTH_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let window = Duration::from_secs(secs);
    let servers: Vec<String> = std::env::var("HEARTH_BENCH_SERVERS")
        .or_else(|_| std::env::var("HEARTH_NATS_SERVER"))
        .unwrap_or_else(|_| "nats-server".to_owned())
        .split(':')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    // One figure only, e.g. for profiling: raw, gateway-1, gateway-50,
    // nats-mqtt-1 or nats-mqtt-50.
    let only = std::env::var("HEARTH_BENCH_ONLY").unwrap_or_default();
    let encoding: hearth_proto::Encoding = std::env::var("HEARTH_BENCH_ENCODING")
        .unwrap_or_else(|_| "json".to_owned())
        .parse()
        .expect("HEARTH_BENCH_ENCODING is json or protobuf");

    println!("hearth ingest benchmark: {secs} s per figure, QoS 1, clients with an inflight window of {INFLIGHT}, gateway storing {encoding:?}");
    for server in servers {
        let mqtt_port = free_port();
        let nats = TestNats::start_with(|config| {
            config.binary = server.clone().into();
            config.extra_config = format!("mqtt {{ listen: \"127.0.0.1:{mqtt_port}\" }}\n");
        })
        .await;
        let version = nats.server().version().unwrap_or("unknown").to_owned();
        println!("\nnats-server {version} ({server})");

        let mut config = Config::default();
        config.auth.allow_anonymous = true;
        // The bench measures how much the gateway can take, not the per-client
        // flood protection.
        config.mqtt.max_publish_rate = 0;
        config.nats.url = Some(nats.url());
        config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.storage.encoding = encoding;
        let gateway = Gateway::start(config).await.expect("gateway starts");
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());

        let wanted = |figure: &str| only.is_empty() || only == figure;
        let nats_pid = nats.server().pid().unwrap_or(0);
        let skipped = Figure::skipped();
        let raw = if wanted("raw") {
            raw_jetstream(&js, window, false, nats_pid).await
        } else {
            skipped
        };
        raw.print(
            "raw JetStream, bare 320 B payloads",
            "client",
            "the ceiling",
        );
        purge(&js).await;
        let shaped = if wanted("raw-shaped") {
            raw_jetstream(&js, window, true, nats_pid).await
        } else {
            skipped
        };
        shaped.print(
            "raw JetStream, gateway-shaped",
            "client",
            "JSON event, 6 headers, Nats-Msg-Id",
        );
        for connections in [1, 50] {
            purge(&js).await;
            let gateway_figure = if wanted(&format!("gateway-{connections}")) {
                mqtt_load(
                    gateway.mqtt_addr().port(),
                    connections,
                    window,
                    "gw",
                    nats_pid,
                )
                .await
            } else {
                skipped
            };
            purge(&js).await;
            let nats_mqtt = if wanted(&format!("nats-mqtt-{connections}")) {
                mqtt_load(mqtt_port, connections, window, "nm", nats_pid).await
            } else {
                skipped
            };
            gateway_figure.print(
                &format!("gateway, {connections:>2} connection(s)"),
                "gateway+load",
                &format!(
                    "{:.0}% of bare, {:.0}% of shaped, {:.2}x nats-server MQTT",
                    100.0 * gateway_figure.rate / raw.rate,
                    100.0 * gateway_figure.rate / shaped.rate,
                    gateway_figure.rate / nats_mqtt.rate
                ),
            );
            nats_mqtt.print(
                &format!("nats-server MQTT, {connections:>2} conn."),
                "load",
                "the peer",
            );
        }
        gateway.shutdown().await;
    }
}

/// A stream that captures nats-server's own MQTT traffic too (its MQTT
/// topics become subjects `hearth.home.lab...`), so both paths store.
async fn purge(js: &jetstream::Context) {
    let config = jetstream::stream::Config {
        name: "BENCH_NATS_MQTT".into(),
        subjects: vec!["hearth.home.>".into()],
        ..Default::default()
    };
    js.create_or_update_stream(config).await.unwrap();
    for name in ["HEARTH_EVENTS", "BENCH_NATS_MQTT"] {
        js.get_stream(name).await.unwrap().purge().await.unwrap();
    }
}

/// Publishes straight into JetStream with many acks in flight, as fast as
/// one process can: bare 320-byte payloads, or (`shaped`) messages shaped
/// like the gateway's, a JSON event with its six headers and a unique
/// `Nats-Msg-Id`, which cost the server more to store.
async fn raw_jetstream(
    js: &jetstream::Context,
    window: Duration,
    shaped: bool,
    nats_pid: u32,
) -> Figure {
    let (payload, headers) = if shaped {
        let event = hearth_proto::v1::Event {
            id: uuid::Uuid::now_v7().to_string(),
            correlation_id: uuid::Uuid::now_v7().to_string(),
            home: "home".into(),
            room: "lab".into(),
            device: "meter".into(),
            received_at: Some(pbjson_types::Timestamp {
                seconds: 1_795_428_000,
                nanos: 1,
            }),
            source: Some(hearth_proto::v1::Source {
                convention: "native".into(),
                client_id: "gw-0-019ab0e1-0000-7000-8000-000000000000".into(),
                topic: TOPIC.into(),
            }),
            body: Some(hearth_proto::v1::event::Body::Illuminance(
                hearth_proto::v1::Illuminance { lux: 12345.0 },
            )),
            ..Default::default()
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        headers.insert("Hearth-Schema", "hearth.v1.Event");
        headers.insert("Hearth-Event-Id", event.id.as_str());
        headers.insert("Hearth-Kind", "illuminance");
        headers.insert("Hearth-Correlation-Id", event.correlation_id.as_str());
        (hearth_proto::Encoding::Json.encode(&event), Some(headers))
    } else {
        (Bytes::from(vec![b'x'; 320]), None)
    };
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let counter = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            while let Some(ack) = rx.recv().await {
                let ack: jetstream::context::PublishAckFuture = ack;
                if ack.await.is_ok() {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let publisher = {
        let js = js.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let subject = format!("hearth.evt.home.lab.illuminance.meter{}", i % 50);
                let ack = match &headers {
                    None => js.publish(subject, payload.clone()).await.unwrap(),
                    Some(headers) => {
                        let mut headers = headers.clone();
                        headers.insert("Nats-Msg-Id", format!("bench-{i}").as_str());
                        js.publish_with_headers(subject, headers, payload.clone())
                            .await
                            .unwrap()
                    }
                };
                if tx.send(ack).await.is_err() {
                    break;
                }
            }
        })
    };
    let rate = measure(&acked, window, nats_pid).await;
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    counter.await.unwrap();
    rate
}

/// `connections` MQTT clients publishing QoS 1 as fast as their inflight
/// windows allow; the rate of PUBACKs they receive. The client is a lean
/// one on rumqttc's codec (a writer filling the window, a reader counting
/// acks), so that the figures measure the servers, not the load generator.
async fn mqtt_load(
    port: u16,
    connections: usize,
    window: Duration,
    prefix: &str,
    nats_pid: u32,
) -> Figure {
    use futures::{SinkExt, StreamExt};
    use rumqttc::mqttbytes::v4::{self, Packet};
    use tokio_util::codec::{FramedRead, FramedWrite};

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let codec = v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        };
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let (read, write) = stream.into_split();
        let mut reader = FramedRead::new(read, codec.clone());
        let mut writer = FramedWrite::new(write, codec);
        let mut connect = v4::Connect::new(format!("{prefix}-{c}-{}", uuid::Uuid::now_v7()));
        connect.keep_alive = 60;
        writer.send(Packet::Connect(connect)).await.unwrap();
        match reader.next().await {
            Some(Ok(Packet::ConnAck(ack))) if ack.code == v4::ConnectReturnCode::Success => {}
            other => panic!("benchmark client not accepted: {other:?}"),
        }
        let window_permits = Arc::new(tokio::sync::Semaphore::new(usize::from(INFLIGHT)));
        let acked = Arc::clone(&acked);
        let permits = Arc::clone(&window_permits);
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(packet)) = reader.next().await {
                if let Packet::PubAck(_) = packet {
                    acked.fetch_add(1, Ordering::Relaxed);
                    permits.add_permits(1);
                }
            }
        }));
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut pkid = 0u16;
            let mut lux = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let permit = match window_permits.try_acquire() {
                    Ok(permit) => permit,
                    Err(_) => {
                        // Window full: push out what is buffered, then wait.
                        if writer.flush().await.is_err() {
                            return;
                        }
                        window_permits.acquire().await.unwrap()
                    }
                };
                permit.forget();
                pkid = pkid % u16::MAX + 1;
                lux = (lux + 1) % 100_000;
                let mut publish = v4::Publish::new(
                    TOPIC,
                    rumqttc::mqttbytes::QoS::AtLeastOnce,
                    format!(r#"{{"lux":{lux}}}"#),
                );
                publish.pkid = pkid;
                if writer.feed(Packet::Publish(publish)).await.is_err() {
                    return;
                }
            }
        }));
    }
    let rate = measure(&acked, window, nats_pid).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    rate
}

/// One measured figure: acknowledged messages per second, and the CPU time
/// per message of this process and of nats-server over the same window
/// (steadier than the rate on a shared machine).
#[derive(Clone, Copy)]
struct Figure {
    rate: f64,
    here_us: f64,
    nats_us: f64,
    allocations: f64,
}

impl Figure {
    fn skipped() -> Self {
        Self {
            rate: f64::NAN,
            here_us: f64::NAN,
            nats_us: f64::NAN,
            allocations: f64::NAN,
        }
    }

    fn print(&self, what: &str, here: &str, note: &str) {
        if self.rate.is_nan() {
            return;
        }
        println!(
            "  {what:<34} {:>8.0} msg/s   per msg: {here} {:>5.1} us CPU and {:>4.1} allocations, nats-server {:>5.1} us   ({note})",
            self.rate, self.here_us, self.allocations, self.nats_us
        );
    }
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Rate of `counter` over `window`, after a one-second warm-up.
async fn measure(counter: &AtomicU64, window: Duration, nats_pid: u32) -> Figure {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let nats_pid = nats_pid.to_string();
    let (here_start, nats_start) = (cpu_ticks("self"), cpu_ticks(&nats_pid));
    let start_count = counter.load(Ordering::Relaxed);
    let allocations_start = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let count = (counter.load(Ordering::Relaxed) - start_count) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    // Linux reports CPU time in USER_HZ ticks, 100 per second.
    let per_message = |ticks: u64| ticks as f64 * 10_000.0 / count;
    Figure {
        rate: count / elapsed,
        here_us: per_message(cpu_ticks("self") - here_start),
        nats_us: per_message(cpu_ticks(&nats_pid) - nats_start),
        allocations: (ALLOCATIONS.load(Ordering::Relaxed) - allocations_start) as f64 / count,
    }
}
