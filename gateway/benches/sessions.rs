//! Persistent sessions at scale, printed as figures (not a timed test):
//! 10,000 MQTT clients with clean session = false against one gateway.
//!
//! 1. each connects, subscribes to its own topic at QoS 1 and goes away;
//! 2. one publisher sends each of them a QoS 1 message while they are away
//!    (each is queued in its session before the PUBACK);
//! 3. all come back at once, stay connected, and each gets its message.
//!
//! Printed: the rate of each phase, the gateway's and nats-server's memory
//! with every session connected, and how many JetStream consumers exist
//! (hearth keeps a few per gateway, not one per session or subscription:
//! the shape that makes nats-server's own MQTT time out at a few thousand
//! clients).
//!
//! Run: `cargo bench -p hearth-gateway --bench sessions`; `HEARTH_BENCH_SESSIONS`
//! sets the number of sessions (default 10000). The gateway runs as its own
//! process (the release binary) so that its memory is its own; each side
//! holds one socket per session, so `ulimit -n` must exceed the count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hearth_test_support::{free_port, TestNats};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;

type Client = Framed<TcpStream, v4::Codec>;

/// Connections being opened at once.
const CONCURRENCY: usize = 200;
const PROMPTLY: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        // `cargo test --benches` runs bench targets too: only `cargo bench` measures.
        return;
    }
    let sessions: usize = std::env::var("HEARTH_BENCH_SESSIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let nats = TestNats::start().await;
    let mqtt_port = free_port();
    let http_port = free_port();
    // The one publisher sends to every session as fast as it can: no
    // per-client rate limit here.
    let config = std::env::temp_dir().join(format!("hearth-sessions-bench-{mqtt_port}.toml"));
    std::fs::write(&config, "[mqtt]\nmax_publish_rate = 0\n").expect("write the bench config");
    let mut gateway = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth-gateway"))
        .arg("--config")
        .arg(&config)
        .args(["--nats-url", &nats.url(), "--allow-anonymous"])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt_port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .env("HEARTH_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway binary");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{mqtt_port}").parse().unwrap();
    wait_for(addr).await;
    let gateway_pid = gateway.id().expect("gateway pid");
    let nats_pid = nats.server().pid().expect("nats-server pid");
    println!(
        "hearth persistent sessions benchmark: {sessions} sessions, nats-server {}",
        nats.server().version().unwrap_or("?")
    );

    // 1. Subscribe and go away.
    let started = Instant::now();
    run_all(sessions, move |i| async move {
        let mut client = connect(addr, i).await;
        let mut subscribe = v4::Subscribe::new(format!("bench/{i}/#"), QoS::AtLeastOnce);
        subscribe.pkid = 1;
        client.send(Packet::Subscribe(subscribe)).await.unwrap();
        expect(&mut client, |p| matches!(p, Packet::SubAck(_))).await;
        client.send(Packet::Disconnect).await.unwrap();
    })
    .await;
    report("connect, subscribe, go away", sessions, started.elapsed());

    // 2. One message for each, queued while they are away.
    let started = Instant::now();
    let mut publisher = Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        },
    );
    publisher
        .send(Packet::Connect(v4::Connect::new("bench-publisher")))
        .await
        .unwrap();
    expect(&mut publisher, |p| matches!(p, Packet::ConnAck(_))).await;
    let window = 100usize;
    let mut acked = 0usize;
    for i in 0..sessions {
        let mut publish = v4::Publish::new(format!("bench/{i}/cmd"), QoS::AtLeastOnce, "on");
        publish.pkid = u16::try_from(i % 60_000 + 1).unwrap();
        publisher.feed(Packet::Publish(publish)).await.unwrap();
        if i + 1 - acked >= window {
            publisher.flush().await.unwrap();
            expect(&mut publisher, |p| matches!(p, Packet::PubAck(_))).await;
            acked += 1;
        }
    }
    publisher.flush().await.unwrap();
    while acked < sessions {
        expect(&mut publisher, |p| matches!(p, Packet::PubAck(_))).await;
        acked += 1;
    }
    report(
        "publish one QoS 1 message to each (queued)",
        sessions,
        started.elapsed(),
    );

    // 3. All come back, stay, and get their message.
    let started = Instant::now();
    let (kept_tx, mut kept_rx) = tokio::sync::mpsc::channel(sessions);
    run_all(sessions, move |i| {
        let kept = kept_tx.clone();
        async move {
            let mut client = connect(addr, i).await;
            let message = expect(&mut client, |p| matches!(p, Packet::Publish(_))).await;
            if let Packet::Publish(publish) = message {
                assert_eq!(publish.topic, format!("bench/{i}/cmd"));
                client
                    .send(Packet::PubAck(v4::PubAck::new(publish.pkid)))
                    .await
                    .unwrap();
            }
            let _ = kept.send(client).await;
        }
    })
    .await;
    report("come back and receive it", sessions, started.elapsed());
    let mut connected = Vec::with_capacity(sessions);
    while let Ok(client) = kept_rx.try_recv() {
        connected.push(client);
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let consumers = consumer_count(&nats).await;
    println!(
        "  with {} sessions connected: gateway {} MiB RSS, nats-server {} MiB RSS, {consumers} JetStream consumers in all",
        connected.len(),
        rss_mib(gateway_pid),
        rss_mib(nats_pid),
    );
    drop(connected);
    let _ = gateway.kill().await;
}

/// Runs `task(i)` for every session, `CONCURRENCY` at a time.
async fn run_all<F, Fut>(sessions: usize, task: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let task = Arc::new(task);
    let mut handles = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
        let task = Arc::clone(&task);
        handles.push(tokio::spawn(async move {
            task(i).await;
            drop(permit);
        }));
    }
    for handle in handles {
        handle.await.expect("a session task failed");
    }
}

async fn connect(addr: std::net::SocketAddr, i: usize) -> Client {
    let mut client = Framed::new(
        TcpStream::connect(addr).await.expect("connect"),
        v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        },
    );
    let mut connect = v4::Connect::new(format!("session-{i}"));
    connect.clean_session = false;
    connect.keep_alive = 300;
    client.send(Packet::Connect(connect)).await.unwrap();
    expect(
        &mut client,
        |p| matches!(p, Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success),
    )
    .await;
    client
}

async fn expect(client: &mut Client, wanted: impl Fn(&Packet) -> bool) -> Packet {
    match tokio::time::timeout(PROMPTLY, client.next()).await {
        Ok(Some(Ok(packet))) if wanted(&packet) => packet,
        other => panic!("unexpected: {other:?}"),
    }
}

async fn wait_for(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + PROMPTLY;
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(phase: &str, sessions: usize, took: Duration) {
    println!(
        "  {phase:<45} {:>8.1} s  {:>8.0} sessions/s",
        took.as_secs_f64(),
        sessions as f64 / took.as_secs_f64()
    );
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

async fn consumer_count(nats: &TestNats) -> usize {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut total = 0;
    let mut names = js.stream_names();
    while let Some(Ok(name)) = names.next().await {
        let mut stream = js.get_stream(&name).await.unwrap();
        total += stream.info().await.unwrap().state.consumer_count;
    }
    total
}
