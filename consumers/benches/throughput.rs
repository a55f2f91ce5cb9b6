//! Consumer throughput, printed as figures (not a timed test): events
//! stored in `HEARTH_EVENTS` beforehand, then read by one rule's consumer
//! from the start, and the time until every one is handled and
//! acknowledged (the consumer has nothing pending and nothing unacknowledged)
//! taken as its rate. (a) The runtime with a handler that does nothing,
//! which is the runtime's own ceiling, then each rule on a realistic mix
//! (mostly temperature, humidity and illuminance readings of the homes
//! file's rooms, some motion), which adds the rule's own work (its state
//! written through to a KV bucket when it changes, commands): (b) lights,
//! (c) security, (d) view, (e) notify.
//!
//! Run: `cargo bench -p hearth-consumers --bench throughput`.
//! `HEARTH_BENCH_EVENTS` (default 200000), `HEARTH_BENCH_ONLY` (the parts
//! to run, e.g. `bd`; default all), `HEARTH_NATS_SERVER` (the
//! nats-server, see hearth-test-support). Each rule gets a fresh server;
//! everything runs on this machine.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use hearth_consumers::clock::Clock;
use hearth_consumers::commands::Commands;
use hearth_consumers::events::Events;
use hearth_consumers::homes::Homes;
use hearth_consumers::lights::Lights;
use hearth_consumers::runtime::{self, Received, Spec};
use hearth_consumers::security::Security;
use hearth_consumers::{notify, view};
use hearth_proto::v1::{self, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use tokio_util::sync::CancellationToken;

/// Rooms of the bench home, each with a light.
const ROOMS: usize = 20;
/// Homes the view's events spread over.
const VIEW_HOMES: u64 = 200;
/// Publishes awaiting their acknowledgement at once while loading.
const PUBLISH_WINDOW: usize = 1024;

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
    let events = setting("HEARTH_BENCH_EVENTS", 200_000);
    let only = std::env::var("HEARTH_BENCH_ONLY").unwrap_or_else(|_| "abcde".into());
    let wanted = |part: char| only.contains(part);

    let (nats, js) = server().await;
    println!(
        "hearth consumer throughput: {events} events stored beforehand, read from the start by one consumer (nats-server {})",
        nats.server().version().unwrap_or("?")
    );
    if wanted('a') {
        let loaded = load(&js, events, 1).await;
        println!(
            "  loaded in {:.2} s ({:.0} events/s, pipelined publishes)",
            loaded.as_secs_f64(),
            events as f64 / loaded.as_secs_f64()
        );
        let figures = consume(&js, "bench-runtime", events, |_| async { Ok(()) }).await;
        println!("  (a) runtime, a handler that does nothing: {figures}");
    }
    drop(nats);

    if wanted('b') {
        let (nats, js) = server().await;
        load(&js, events, 1).await;
        let mut homes = String::new();
        for room in 0..ROOMS {
            homes.push_str(&format!(
                "[homes.bench.rooms.r{room}]\nlights = [\"ceiling\"]\nlux_below = 30\noff_after = \"5m\"\n"
            ));
        }
        let homes = Homes::parse(Path::new("bench.toml"), &homes).expect("homes");
        let lights = Lights::open(&js, homes, Commands::new(js.clone(), Encoding::Json))
            .await
            .expect("lights state");
        let figures = consume_batches(&js, "bench-lights", events, false, move |batch| {
            let lights = lights.clone();
            async move { lights.handle_batch(batch).await }
        })
        .await;
        println!("  (b) lights rule, readings and some motion: {figures}");
        drop(nats);
    }

    // (c) the security rule, every motion sensor an interior zone of a
    // disarmed alarm: each detected/clear flip is a state change written
    // through to its bucket.
    if wanted('c') {
        let (nats, js) = server().await;
        load(&js, events, 1).await;
        let mut homes = String::from("[homes.bench.security]\n");
        for room in 0..ROOMS {
            homes.push_str(&format!(
                "[homes.bench.security.zones.\"r{room}/pir\"]\ntype = \"interior\"\n"
            ));
        }
        let homes = Arc::new(Homes::parse(Path::new("bench.toml"), &homes).expect("homes"));
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let clock = Clock::system();
        let security = Security::open(
            &js,
            client,
            homes,
            Events::new(js.clone(), Encoding::Json, "bench-security", clock.clone()),
            Commands::new(js.clone(), Encoding::Json),
            clock,
            "hearth",
        )
        .await
        .expect("security state");
        let figures = consume(&js, "bench-security", events, move |received| {
            let security = security.clone();
            async move { security.handle(received).await }
        })
        .await;
        println!("  (c) security rule, motion zones of a disarmed alarm: {figures}");
        drop(nats);
    }

    // (d) the view: every event changes a home's document; the events
    // spread over many homes, so a batch writes many documents.
    if wanted('d') {
        let (nats, js) = server().await;
        load(&js, events, VIEW_HOMES).await;
        let stop = CancellationToken::new();
        let run = tokio::spawn(view::run(
            js.clone(),
            view::Options {
                http_listen: None,
                ..view::Options::default()
            },
            stop.clone(),
        ));
        let figures = until_consumed(&js, view::CONSUMER, run, stop).await;
        println!("  (d) view, {VIEW_HOMES} homes' documents: {figures}");
        drop(nats);
    }

    // (e) the notify rule with a recipient: readings pass through (no
    // condition in the mix to tell anyone about).
    if wanted('e') {
        let (nats, js) = server().await;
        load(&js, events, 1).await;
        let homes = Homes::parse(
            Path::new("bench.toml"),
            "[homes.bench.notify]\n[[homes.bench.notify.recipients]]\nname = \"a\"\n[[homes.bench.notify.recipients.channels]]\nname = \"log\"\nkind = \"log\"\n",
        )
        .expect("homes");
        // A rule reads only events from its start on: its consumer is made
        // beforehand to read from the stream's start (the rule keeps it).
        js.get_stream(runtime::EVENTS_STREAM)
            .await
            .expect("the stream")
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(notify::CONSUMER.to_owned()),
                filter_subject: "hearth.evt.>".to_owned(),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .expect("the notify consumer");
        let stop = CancellationToken::new();
        let run = tokio::spawn(notify::run(
            js.clone(),
            Arc::new(homes),
            Encoding::Json,
            Clock::system(),
            notify::Options { http_listen: None },
            stop.clone(),
        ));
        let figures = until_consumed(&js, notify::CONSUMER, run, stop).await;
        println!("  (e) notify rule, readings passing through: {figures}");
        drop(nats);
    }
}

/// For a rule that runs its own consumer: the rate once the consumer
/// `name` has nothing pending and nothing unacknowledged.
async fn until_consumed<E: std::fmt::Debug>(
    js: &jetstream::Context,
    name: &str,
    run: tokio::task::JoinHandle<Result<(), E>>,
    stop: CancellationToken,
) -> String {
    let started = Instant::now();
    let count = js
        .get_stream(runtime::EVENTS_STREAM)
        .await
        .expect("the stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages;
    loop {
        if run.is_finished() {
            panic!("the rule ended early: {:?}", run.await);
        }
        let consumer: Result<PullConsumer, _> = js
            .get_consumer_from_stream(name, runtime::EVENTS_STREAM)
            .await;
        if let Ok(mut consumer) = consumer {
            let info = consumer.info().await.expect("consumer info");
            if info.num_ack_pending == 0
                && info.num_pending == 0
                && info.delivered.stream_sequence >= count
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = started.elapsed();
    stop.cancel();
    let _ = run.await;
    format!(
        "{:.0} events/s (all handled and acknowledged in {:.2} s)",
        count as f64 / done.as_secs_f64(),
        done.as_secs_f64()
    )
}

/// A server with hearth's streams, made as the gateway makes them.
async fn server() -> (TestNats, jetstream::Context) {
    let nats = TestNats::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let config = hearth_gateway::config::Config::default();
    hearth_gateway::jetstream::streams::ensure(&js, &config.storage, &config.mqtt)
        .await
        .expect("streams");
    (nats, js)
}

/// Stores `count` events as the gateway stores them (JSON, with a
/// Content-Type), a window of publishes in flight rather than one round
/// trip each; the events of home `bench`, or spread over `homes` homes
/// (`bench0`, `bench1`, ...).
async fn load(js: &jetstream::Context, count: u64, homes: u64) -> Duration {
    let started = Instant::now();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut acks = std::collections::VecDeque::with_capacity(PUBLISH_WINDOW);
    for i in 0..count {
        let event = reading(i, &mut random, homes);
        let kind = event.body.as_ref().map_or("unknown", Body::kind);
        let subject =
            hearth_proto::subject::event_subject(&event.home, &event.room, kind, &event.device);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", Encoding::Json.content_type());
        if acks.len() == PUBLISH_WINDOW {
            let ack: jetstream::context::PublishAckFuture = acks.pop_front().expect("an ack");
            ack.await.expect("stored");
        }
        acks.push_back(
            js.publish_with_headers(subject, headers, Encoding::Json.encode(&event))
                .await
                .expect("published"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    started.elapsed()
}

/// Event `i` of the mix: per room a thermometer, a hygrometer, a lux
/// sensor and a motion sensor; one in ten is motion.
fn reading(i: u64, random: &mut Random, homes: u64) -> v1::Event {
    let home = if homes <= 1 {
        "bench".to_owned()
    } else {
        format!("bench{}", random.below(homes))
    };
    let room = format!("r{}", random.below(ROOMS as u64));
    let (device, body) = match random.below(20) {
        0..=6 => (
            "thermo",
            Body::Temperature(v1::Temperature {
                celsius: 18.0 + random.below(80) as f64 / 10.0,
            }),
        ),
        7..=12 => (
            "hygro",
            Body::Humidity(v1::Humidity {
                percent: 35.0 + random.below(300) as f64 / 10.0,
            }),
        ),
        13..=17 => (
            "lux",
            Body::Illuminance(v1::Illuminance {
                lux: random.below(120) as f64,
            }),
        ),
        _ => (
            "pir",
            Body::Motion(v1::Motion {
                detected: random.below(4) != 0,
            }),
        ),
    };
    let id = uuid::Uuid::now_v7().to_string();
    v1::Event {
        correlation_id: id.clone(),
        id,
        occurred_at: Some(pbjson_types::Timestamp {
            seconds: 1_800_000_000 + i64::try_from(i).unwrap_or(0) / 100,
            nanos: 0,
        }),
        home,
        room,
        device: device.into(),
        source: Some(v1::Source {
            convention: "native".into(),
            client_id: format!("sensor-{device}"),
            topic: format!("hearth/bench/{device}"),
        }),
        body: Some(body),
        ..Default::default()
    }
}

/// Runs a consumer reading from the start over the `count` stored events,
/// one at a time; the figures once all are handled and acknowledged.
async fn consume<H, F>(js: &jetstream::Context, name: &str, count: u64, handler: H) -> String
where
    H: Fn(Received) -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), runtime::HandlerError>> + Send,
{
    consume_batches(js, name, count, true, move |mut events: Vec<Received>| {
        let handled = events.pop().map(&handler);
        async move {
            match handled {
                Some(handled) => vec![handled.await],
                None => Vec::new(),
            }
        }
    })
    .await
}

/// [`consume`], the events handed over in batches (`runtime::run_batches`),
/// or one at a time (`runtime::run`, each handed over as a batch of one)
/// with `one_at_a_time`.
async fn consume_batches<H, F>(
    js: &jetstream::Context,
    name: &str,
    count: u64,
    one_at_a_time: bool,
    handler: H,
) -> String
where
    H: Fn(Vec<Received>) -> F + Send + 'static,
    F: std::future::Future<Output = Vec<Result<(), runtime::HandlerError>>> + Send,
{
    let spec = bench_spec(name);
    let handled = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let run = {
        let (js, spec, handled, stop) = (
            js.clone(),
            spec.clone(),
            Arc::clone(&handled),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let counted = move |events: Vec<Received>| {
                handled.fetch_add(events.len() as u64, Ordering::Relaxed);
                handler(events)
            };
            if one_at_a_time {
                // The one-at-a-time runtime, as the rules that use it run.
                let one = move |received| {
                    let handled = counted(vec![received]);
                    async move { handled.await.pop().unwrap_or(Ok(())) }
                };
                runtime::run(&js, &spec, one, stop).await
            } else {
                runtime::run_batches(&js, &spec, counted, stop).await
            }
        })
    };
    figures(js, name, count, started, &handled, run, shutdown).await
}

fn bench_spec(name: &str) -> Spec {
    let mut spec = Spec::new(name, "throughput bench", "hearth.evt.>");
    spec.from_start = true;
    spec
}

/// Waits until `count` events are handled and acknowledged, stops the run
/// and tells how long it took.
async fn figures(
    js: &jetstream::Context,
    name: &str,
    count: u64,
    started: Instant,
    handled: &AtomicU64,
    run: tokio::task::JoinHandle<Result<runtime::Stats, runtime::RuntimeError>>,
    shutdown: CancellationToken,
) -> String {
    while handled.load(Ordering::Relaxed) < count {
        if run.is_finished() {
            panic!("the run ended early: {:?}", run.await);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all_handled = started.elapsed();
    // Acknowledged too: nothing left for the consumer, nothing unacknowledged.
    let mut consumer: PullConsumer = js
        .get_consumer_from_stream(name, runtime::EVENTS_STREAM)
        .await
        .expect("the consumer");
    loop {
        let info = consumer.info().await.expect("consumer info");
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all_acked = started.elapsed();
    let stopping = Instant::now();
    shutdown.cancel();
    let stats = run.await.expect("the run").expect("runs");
    format!(
        "{:.0} events/s (all handled in {:.2} s, acknowledged in {:.2} s; stopped in {:.0} ms; {stats:?})",
        count as f64 / all_acked.as_secs_f64(),
        all_handled.as_secs_f64(),
        all_acked.as_secs_f64(),
        stopping.elapsed().as_secs_f64() * 1e3,
    )
}

/// A small deterministic generator (xorshift64*): the same mix every run,
/// without a dependency.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}
