//! The consumer runtime against a real nats-server: durable and described,
//! in order, retried, dead-lettered without blocking, resumed after a
//! restart without handling an event twice, and commands issued once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use hearth_consumers::commands::{Commands, Issued, Target};
use hearth_consumers::runtime::{self, HandlerError, Spec};
use hearth_proto::v1::{self, command, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use tokio_util::sync::CancellationToken;

const PROMPTLY: Duration = Duration::from_secs(10);

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

/// Runs `spec` with a handler that records event ids (and fails as `fail`
/// says) until `stop` returns true for what was recorded.
async fn run_until(
    js: &jetstream::Context,
    spec: &Spec,
    fail: impl Fn(&v1::Event) -> Option<HandlerError> + Send + 'static,
    stop: impl Fn(&[String]) -> bool + Send + 'static,
) -> (Vec<String>, runtime::Stats) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    // A guard against a test that would otherwise wait forever; a condition
    // already true stops the run at once.
    let watcher = {
        let (seen, shutdown) = (Arc::clone(&seen), shutdown.clone());
        let done_before = stop(&[]);
        tokio::spawn(async move {
            if !done_before {
                tokio::time::sleep(PROMPTLY).await;
                let _ = seen;
            }
            shutdown.cancel();
        })
    };
    let recorder = Arc::clone(&seen);
    let stopper = shutdown.clone();
    let stats = runtime::run(
        js,
        spec,
        move |received| {
            let outcome = fail(&received.event);
            let mut seen = recorder.lock().unwrap();
            seen.push(received.event.id.clone());
            // The runtime finishes (acknowledges) this event, then stops.
            if stop(&seen) {
                stopper.cancel();
            }
            async move { outcome.map_or(Ok(()), Err) }
        },
        shutdown,
    )
    .await
    .expect("runs");
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    (seen, stats)
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
    let (seen, stats) = run_until(
        &js,
        &spec,
        |event| match event.id.as_str() {
            "poison" => Some(HandlerError::Poison("this can never work".into())),
            "flaky" => Some(HandlerError::Retry("the channel is down".into())),
            _ => None,
        },
        |seen| seen.iter().any(|id| id == "good"),
    )
    .await;
    assert_eq!(
        seen,
        ["poison", "flaky", "flaky", "flaky", "good"],
        "3 attempts, then on"
    );
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
    let (first, _) = run_until(&js, &spec, |_| None, |seen| seen.len() >= 3).await;
    assert_eq!(first, ["r0", "r1", "r2"], "stopped after the third");
    let (second, _) = run_until(
        &js,
        &spec,
        |_| None,
        move |seen| seen.last().is_some_and(|id| id == "r5"),
    )
    .await;
    let mut all = first.clone();
    all.extend(second);
    assert_eq!(
        all,
        ["r0", "r1", "r2", "r3", "r4", "r5"],
        "each once, in order"
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
