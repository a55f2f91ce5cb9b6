//! The consumer runtime against a real nats-server: durable and described,
//! in order, in batches, retried in place, dead-lettered without blocking,
//! resumed after a restart or a crash without handling an event twice or
//! out of order, a consumer of the one-at-a-time runtime updated in place,
//! and commands issued once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use hearth_consumers::commands::{Commands, Issued, Target};
use hearth_consumers::runtime::{self, HandlerError, Received, Spec};
use hearth_proto::v1::{self, command, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use tokio_util::sync::CancellationToken;

const PROMPTLY: Duration = Duration::from_secs(10);
/// How long a stopping run may take to hand back what it holds: the ack
/// wait (30 s) is far longer.
const HANDED_BACK: Duration = Duration::from_secs(4);

/// A NATS server with hearth's streams, made as the gateway makes them.
async fn setup() -> (TestNats, jetstream::Context) {
    let nats = TestNats::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let config = hearth_gateway::config::Config::default();
    hearth_gateway::jetstream::streams::ensure(&js, &config.storage, &config.mqtt)
        .await
        .expect("streams");
    (nats, js)
}

fn motion(id: &str, device: &str) -> v1::Event {
    v1::Event {
        id: id.into(),
        correlation_id: format!("corr-{id}"),
        home: "home".into(),
        room: "hall".into(),
        device: device.into(),
        body: Some(Body::Motion(v1::Motion { detected: true })),
        ..Default::default()
    }
}

async fn store(js: &jetstream::Context, event: &v1::Event) {
    let subject =
        hearth_proto::subject::event_subject(&event.home, &event.room, "motion", &event.device);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", Encoding::Json.content_type());
    js.publish_with_headers(subject, headers, Encoding::Json.encode(event))
        .await
        .unwrap()
        .await
        .unwrap();
}

fn quick(name: &str) -> Spec {
    let mut spec = Spec::new(name, "a test rule: records what it sees", "hearth.evt.>");
    spec.retry = Duration::from_millis(50);
    spec.max_deliver = 3;
    spec
}

/// What a run did: the events its handler saw (id and attempt), in order,
/// its stats, and how long it took to return once told to stop.
struct Run {
    seen: Vec<(String, i64)>,
    stats: runtime::Stats,
    stopping: Duration,
}

impl Run {
    fn ids(&self) -> Vec<String> {
        self.seen.iter().map(|(id, _)| id.clone()).collect()
    }

    fn attempts(&self, id: &str) -> Vec<i64> {
        self.seen
            .iter()
            .filter(|(seen, _)| seen == id)
            .map(|(_, attempt)| *attempt)
            .collect()
    }
}

/// Runs `spec` with a handler that records what it sees (and fails as
/// `fail` says) until `stop` returns true for what was recorded.
async fn run_with(
    js: &jetstream::Context,
    spec: &Spec,
    fail: impl Fn(&Received) -> Option<HandlerError> + Send + 'static,
    stop: impl Fn(&[(String, i64)]) -> bool + Send + 'static,
) -> Run {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stopped_at = Arc::new(Mutex::new(None));
    let shutdown = CancellationToken::new();
    // A guard against a test that would otherwise wait forever; a condition
    // already true stops the run at once.
    let watcher = {
        let (shutdown, stopped_at) = (shutdown.clone(), Arc::clone(&stopped_at));
        let done_before = stop(&[]);
        tokio::spawn(async move {
            if !done_before {
                tokio::time::sleep(PROMPTLY).await;
            }
            stopped_at.lock().unwrap().get_or_insert_with(Instant::now);
            shutdown.cancel();
        })
    };
    let recorder = Arc::clone(&seen);
    let stopper = shutdown.clone();
    let stop_time = Arc::clone(&stopped_at);
    let stats = runtime::run(
        js,
        spec,
        move |received| {
            let outcome = fail(&received);
            let mut seen = recorder.lock().unwrap();
            seen.push((received.event.id.clone(), received.attempt));
            // The runtime finishes (acknowledges) this event, then stops.
            if stop(&seen) {
                stop_time.lock().unwrap().get_or_insert_with(Instant::now);
                stopper.cancel();
            }
            async move { outcome.map_or(Ok(()), Err) }
        },
        shutdown,
    )
    .await
    .expect("runs");
    watcher.abort();
    let stopping = stopped_at
        .lock()
        .unwrap()
        .map_or(Duration::ZERO, |at| at.elapsed());
    let seen = seen.lock().unwrap().clone();
    Run {
        seen,
        stats,
        stopping,
    }
}

/// [`run_with`] for event ids only.
async fn run_until(
    js: &jetstream::Context,
    spec: &Spec,
    fail: impl Fn(&v1::Event) -> Option<HandlerError> + Send + 'static,
    stop: impl Fn(&[String]) -> bool + Send + 'static,
) -> (Vec<String>, runtime::Stats) {
    let run = run_with(
        js,
        spec,
        move |received| fail(&received.event),
        move |seen| stop(&seen.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()),
    )
    .await;
    (run.ids(), run.stats)
}

#[tokio::test]
async fn events_are_handled_in_order_by_a_durable_described_consumer() {
    let (_nats, js) = setup().await;
    let spec = quick("hearth-test-order");
    // Created first: a rule reads events from its creation on.
    let (seen, _) = run_until(&js, &spec, |_| None, |_| true).await;
    assert!(seen.is_empty());
    for i in 0..5 {
        store(&js, &motion(&format!("e{i}"), "pir")).await;
    }
    let (seen, stats) = run_until(&js, &spec, |_| None, |seen| seen.len() >= 5).await;
    assert_eq!(seen, ["e0", "e1", "e2", "e3", "e4"]);
    assert_eq!(stats.handled, 5);

    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-test-order", "HEARTH_EVENTS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.config.description.as_deref(),
        Some("a test rule: records what it sees")
    );
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

#[tokio::test]
async fn a_backlog_many_times_the_prefetch_is_read_batch_after_batch_without_waiting() {
    let (_nats, js) = setup().await;
    let mut spec = quick("hearth-test-batches");
    spec.prefetch = 4;
    run_until(&js, &spec, |_| None, |_| true).await;
    let ids: Vec<String> = (0..40).map(|i| format!("b{i:02}")).collect();
    for id in &ids {
        store(&js, &motion(id, "pir")).await;
    }
    let started = Instant::now();
    let (seen, stats) = run_until(&js, &spec, |_| None, |seen| seen.len() >= 40).await;
    assert_eq!(seen, ids, "in order, each once");
    assert_eq!(stats.handled, 40);
    // Each filled request is followed by the next at once, not after the
    // request's expiry (1 s) or its grace: 20 requests.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-test-batches", "HEARTH_EVENTS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.max_ack_pending, 4);
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
}

#[tokio::test]
async fn a_poison_event_is_set_aside_and_the_next_one_handled() {
    let (_nats, js) = setup().await;
    let spec = quick("hearth-test-poison");
    run_until(&js, &spec, |_| None, |_| true).await;
    // Undecodable, then one the handler rejects, then one it retries until
    // its attempts run out, then a good one.
    js.publish("hearth.evt.home.hall.motion.pir", "not an event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    store(&js, &motion("poison", "pir")).await;
    store(&js, &motion("flaky", "pir")).await;
    store(&js, &motion("good", "pir")).await;
    let run = run_with(
        &js,
        &spec,
        |received| match received.event.id.as_str() {
            "poison" => Some(HandlerError::Poison("this can never work".into())),
            "flaky" => Some(HandlerError::Retry("the channel is down".into())),
            _ => None,
        },
        |seen| seen.iter().any(|(id, _)| id == "good"),
    )
    .await;
    let (seen, stats) = (run.ids(), run.stats);
    assert_eq!(
        seen,
        ["poison", "flaky", "flaky", "flaky", "good"],
        "3 attempts, then on; the retried event is not overtaken"
    );
    assert_eq!(run.attempts("flaky"), [1, 2, 3]);
    assert_eq!(stats.dead_lettered, 3);
    assert_eq!(stats.retried, 2);

    let mut dlq = js.get_stream("HEARTH_DLQ").await.unwrap();
    let state = dlq.info().await.unwrap().state.clone();
    let mut letters = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        letters.push(dlq.get_raw_message(sequence).await.unwrap());
    }
    let header = |m: &async_nats::jetstream::message::StreamMessage, name: &str| {
        m.headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let reasons: Vec<(String, String, String)> = letters
        .iter()
        .map(|m| {
            (
                m.subject.to_string(),
                header(m, "Hearth-Reason"),
                header(m, "Hearth-Consumer"),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (
                "hearth.dlq.hearth-test-poison.undecodable_event".to_owned(),
                "undecodable_event".to_owned(),
                "hearth-test-poison".to_owned()
            ),
            (
                "hearth.dlq.hearth-test-poison.consumer_failed".to_owned(),
                "consumer_failed".to_owned(),
                "hearth-test-poison".to_owned()
            ),
            (
                "hearth.dlq.hearth-test-poison.consumer_failed".to_owned(),
                "consumer_failed".to_owned(),
                "hearth-test-poison".to_owned()
            ),
        ]
    );
    assert!(header(&letters[2], "Hearth-Detail").contains("failed 3 times"));
    assert_eq!(
        &letters[0].payload[..],
        b"not an event",
        "the original payload is kept"
    );
}

#[tokio::test]
async fn a_restarted_consumer_resumes_where_it_was_without_handling_twice() {
    let (_nats, js) = setup().await;
    let spec = quick("hearth-test-restart");
    run_until(&js, &spec, |_| None, |_| true).await;
    for i in 0..6 {
        store(&js, &motion(&format!("r{i}"), "pir")).await;
    }
    // The first run holds all six when it stops after the third.
    let first = run_with(&js, &spec, |_| None, |seen| seen.len() >= 3).await;
    assert_eq!(first.ids(), ["r0", "r1", "r2"], "stopped after the third");
    assert!(
        first.stopping < HANDED_BACK,
        "a stopping run returns promptly ({:?})",
        first.stopping
    );
    let started = Instant::now();
    let second = run_with(
        &js,
        &spec,
        |_| None,
        move |seen| seen.last().is_some_and(|(id, _)| id == "r5"),
    )
    .await;
    assert!(
        started.elapsed() < HANDED_BACK,
        "handed back, not left to the ack wait ({:?})",
        started.elapsed()
    );
    let mut all = first.ids();
    all.extend(second.ids());
    assert_eq!(
        all,
        ["r0", "r1", "r2", "r3", "r4", "r5"],
        "each once, in order"
    );
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-test-restart", "HEARTH_EVENTS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
}

#[tokio::test]
async fn a_consumer_made_one_event_at_a_time_is_updated_where_it_stands() {
    let (_nats, js) = setup().await;
    let spec = quick("hearth-test-update");
    // As the runtime used to create it: one event at a time, the server
    // counting deliveries.
    let stream = js.get_stream("HEARTH_EVENTS").await.unwrap();
    let old: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(spec.name.clone()),
            description: Some("the old description".into()),
            filter_subject: spec.filter.clone(),
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            max_deliver: spec.max_deliver,
            max_ack_pending: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..5 {
        store(&js, &motion(&format!("u{i}"), "pir")).await;
    }
    // The old runtime handled two of them.
    for _ in 0..2 {
        let mut batch = old.batch().max_messages(1).messages().await.unwrap();
        let message = batch.next().await.unwrap().unwrap();
        message.double_ack().await.unwrap();
    }
    let run = run_with(
        &js,
        &spec,
        |_| None,
        |seen| seen.iter().any(|(id, _)| id == "u4"),
    )
    .await;
    assert_eq!(run.ids(), ["u2", "u3", "u4"], "on from where it stood");
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-test-update", "HEARTH_EVENTS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.config.max_ack_pending,
        i64::try_from(spec.prefetch).unwrap()
    );
    assert_eq!(
        info.config.description.as_deref(),
        Some("a test rule: records what it sees")
    );
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
}

#[tokio::test]
async fn events_held_by_a_crashed_run_come_first_and_in_order() {
    let (_nats, js) = setup().await;
    let mut spec = quick("hearth-test-crash");
    spec.ack_wait = Duration::from_secs(2);
    run_until(&js, &spec, |_| None, |_| true).await;
    for i in 0..6 {
        store(&js, &motion(&format!("c{i}"), "pir")).await;
    }
    // A run that took the first three and died without a word.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(&spec.name, "HEARTH_EVENTS")
        .await
        .unwrap();
    let mut batch = consumer.batch().max_messages(3).messages().await.unwrap();
    for _ in 0..3 {
        batch.next().await.unwrap().unwrap();
    }
    drop(batch);
    store(&js, &motion("c6", "pir")).await;

    let started = Instant::now();
    let run = run_with(
        &js,
        &spec,
        |_| None,
        |seen| seen.iter().any(|(id, _)| id == "c6"),
    )
    .await;
    assert_eq!(
        run.ids(),
        ["c0", "c1", "c2", "c3", "c4", "c5", "c6"],
        "the dead run's events first, then the rest, each once"
    );
    assert_eq!(
        run.attempts("c0"),
        [2],
        "its delivery to the dead run counts"
    );
    assert_eq!(run.attempts("c3"), [1]);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "they came again after the ack wait"
    );
}

#[tokio::test]
async fn a_retry_longer_than_the_ack_wait_lets_nothing_behind_it_come_twice() {
    let (_nats, js) = setup().await;
    let mut spec = quick("hearth-test-long-retry");
    spec.ack_wait = Duration::from_secs(1);
    // 600 ms, then 1.2 s: more than the ack wait, twice.
    spec.retry = Duration::from_millis(600);
    run_until(&js, &spec, |_| None, |_| true).await;
    store(&js, &motion("slow", "pir")).await;
    for i in 0..4 {
        store(&js, &motion(&format!("b{i}"), "pir")).await;
    }
    let run = run_with(
        &js,
        &spec,
        |received| {
            (received.event.id == "slow" && received.attempt < 3)
                .then(|| HandlerError::Retry("not yet".into()))
        },
        |seen| seen.iter().any(|(id, _)| id == "b3"),
    )
    .await;
    assert_eq!(
        run.ids(),
        ["slow", "slow", "slow", "b0", "b1", "b2", "b3"],
        "in order, each handled once"
    );
    assert_eq!(run.attempts("slow"), [1, 2, 3]);
    assert_eq!(
        run.attempts("b3"),
        [1],
        "the events held behind it were not sent again"
    );
    assert_eq!(run.stats.handled, 5);
}

#[tokio::test]
async fn a_stop_while_an_event_waits_for_its_retry_hands_it_back_at_once() {
    let (_nats, js) = setup().await;
    let mut spec = quick("hearth-test-stop-in-retry");
    spec.retry = Duration::from_secs(20);
    run_until(&js, &spec, |_| None, |_| true).await;
    store(&js, &motion("waiting", "pir")).await;
    store(&js, &motion("behind", "pir")).await;
    let first = run_with(
        &js,
        &spec,
        |_| Some(HandlerError::Retry("down".into())),
        |seen| !seen.is_empty(),
    )
    .await;
    assert_eq!(first.ids(), ["waiting"]);
    assert!(
        first.stopping < HANDED_BACK,
        "not after the 20 s delay ({:?})",
        first.stopping
    );
    let second = run_with(
        &js,
        &spec,
        |_| None,
        |seen| seen.iter().any(|(id, _)| id == "behind"),
    )
    .await;
    assert_eq!(second.ids(), ["waiting", "behind"]);
    assert_eq!(
        second.attempts("waiting"),
        [2],
        "handed back: the next delivery"
    );
}

#[tokio::test]
async fn a_command_for_the_same_event_and_action_is_stored_once() {
    let (_nats, js) = setup().await;
    let commands = Commands::new(js.clone(), Encoding::Json);
    let cause = motion("cause-1", "pir");
    let target = Target {
        home: "home",
        room: "Living Room",
        device: "ceiling",
    };
    let body = || {
        command::Body::LightSet(v1::LightSet {
            on: true,
            brightness_pct: Some(80),
        })
    };
    let first = commands
        .issue(&cause, target, "light-on", body())
        .await
        .unwrap();
    assert!(matches!(first, Issued::Stored { .. }));
    let again = commands
        .issue(&cause, target, "light-on", body())
        .await
        .unwrap();
    assert_eq!(
        again,
        Issued::AlreadyIssued,
        "a redelivered event does not command twice"
    );
    let other = commands
        .issue(&cause, target, "light-on-2", body())
        .await
        .unwrap();
    assert!(
        matches!(other, Issued::Stored { .. }),
        "another action of the same event"
    );

    let mut stream = js.get_stream("HEARTH_COMMANDS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    let stored = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        stored.subject.as_str(),
        "hearth.cmd.home.Living%20Room.light_set.ceiling"
    );
    let command: v1::Command = Encoding::Json.decode(&stored.payload).unwrap();
    assert_eq!(command.causation_id, "cause-1");
    assert_eq!(command.correlation_id, "corr-cause-1");
    assert_eq!(
        stored.headers.get("Hearth-Schema").map(|v| v.as_str()),
        Some("hearth.v1.Command")
    );
}

/// A batch handler gets the events ready together, in order; each is
/// finished by its own outcome, and the one tried again comes back alone,
/// before anything newer.
#[tokio::test]
async fn events_handed_over_in_batches_are_finished_each_by_its_own_outcome() {
    let (_nats, js) = setup().await;
    let spec = quick("hearth-test-batch-handler");
    run_until(&js, &spec, |_| None, |_| true).await;
    let ids: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    for id in &ids {
        store(&js, &motion(id, "pir")).await;
    }
    // Each batch: its events' ids and attempts.
    type Batches = Vec<Vec<(String, i64)>>;
    let batches: Arc<Mutex<Batches>> = Arc::default();
    let shutdown = CancellationToken::new();
    let recorder = Arc::clone(&batches);
    let stopper = shutdown.clone();
    let guard = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PROMPTLY).await;
            shutdown.cancel();
        })
    };
    let stats = runtime::run_batches(
        &js,
        &spec,
        move |events: Vec<Received>| {
            let outcomes: Vec<Result<(), HandlerError>> = events
                .iter()
                .map(
                    |received| match (received.event.id.as_str(), received.attempt) {
                        ("b3", 1) => Err(HandlerError::Retry("not yet".into())),
                        ("b5", _) => Err(HandlerError::Poison("never".into())),
                        _ => Ok(()),
                    },
                )
                .collect();
            let mut batches = recorder.lock().unwrap();
            batches.push(
                events
                    .iter()
                    .map(|r| (r.event.id.clone(), r.attempt))
                    .collect(),
            );
            let seen: usize = batches.iter().map(Vec::len).sum();
            if seen >= 11 {
                stopper.cancel();
            }
            async move { outcomes }
        },
        shutdown,
    )
    .await
    .expect("runs");
    guard.abort();
    let batches = batches.lock().unwrap().clone();
    let first_attempts: Vec<String> = batches
        .iter()
        .flatten()
        .filter(|(_, attempt)| *attempt == 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(first_attempts, ids, "every event once, in stream order");
    let again = batches
        .iter()
        .position(|batch| batch.iter().any(|(_, attempt)| *attempt == 2))
        .expect("b3 tried again");
    assert_eq!(
        batches[again],
        [("b3".to_owned(), 2)],
        "alone, as soon as it failed"
    );
    assert!(
        batches.iter().any(|batch| batch.len() > 1),
        "events ready together come together: {batches:?}"
    );
    assert_eq!(
        stats,
        runtime::Stats {
            handled: 9,
            retried: 1,
            dead_lettered: 1
        }
    );
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("hearth-test-batch-handler", "HEARTH_EVENTS")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    let dlq = js.get_stream("HEARTH_DLQ").await.unwrap();
    let letter = dlq.get_last_raw_message_by_subject("hearth.dlq.>").await;
    assert!(letter.is_ok(), "the poison event is dead-lettered");
}

#[tokio::test]
async fn a_rule_shared_out_anew_starts_where_it_stood_and_each_partition_sees_its_homes_only() {
    use hearth_consumers::partition::Partition;
    let (_nats, js) = setup().await;
    let whole = quick("hearth-test-share");
    run_until(&js, &whole, |_| None, |_| true).await;
    let in_home = |id: &str, home: usize| v1::Event {
        home: format!("home-{home}"),
        ..motion(id, "pir")
    };
    for i in 0..2 {
        store(&js, &in_home(&format!("before{i}"), i)).await;
    }
    let (seen, _) = run_until(&js, &whole, |_| None, |seen| seen.len() >= 2).await;
    assert_eq!(seen, ["before0", "before1"]);

    // Stored while every process is restarted with two partitions.
    let homes: Vec<usize> = (0..10).collect();
    for &home in &homes {
        store(&js, &in_home(&format!("while{home}"), home)).await;
    }
    for number in 1..=2 {
        let partition = Partition::new(number, 2).unwrap();
        let expected: Vec<String> = homes
            .iter()
            .filter(|home| partition.owns(&format!("home-{home}")))
            .map(|home| format!("while{home}"))
            .collect();
        assert!(!expected.is_empty(), "partition {partition} owns a home");
        let spec = quick("hearth-test-share").partitioned(partition);
        assert_eq!(spec.name, format!("hearth-test-share-{number}of2"));
        let last = expected.last().cloned().unwrap();
        let (seen, stats) =
            run_until(&js, &spec, |_| None, move |seen| seen.last() == Some(&last)).await;
        assert_eq!(
            seen, expected,
            "partition {partition}: its homes' events since the whole rule stopped, in order"
        );
        assert_eq!(stats.handled, expected.len() as u64);
    }
}
