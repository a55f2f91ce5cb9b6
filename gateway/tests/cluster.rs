//! A three-node NATS cluster with every hearth stream replicated three times
//! (`--replicas 3`), and the real gateway binary in front of it: the node
//! that leads `HEARTH_EVENTS` is killed with SIGKILL in the middle of QoS 1
//! streams from many devices, while a durable R3 pull consumer reads the
//! stream. Leadership of the stream and of the consumer is first moved to
//! the node the gateway and the consumer are connected to, so the kill
//! takes the stream leader, the consumer leader and both connections at
//! once. The two survivors elect new leaders, the clients fail over, and:
//!
//! - every reading acknowledged to a device is in `HEARTH_EVENTS` exactly
//!   once, and no reading is stored twice;
//! - the consumer receives every stored reading, as stored, and its state
//!   shows them all acknowledged: none lost in the failover;
//! - the killed node, started again, rejoins and catches up.
//!
//! The gateway is given one node's URL, so that it is connected to the node
//! killed, and learns the others from the server (INFO `connect_urls`).
//! (`--nats-url` also takes several, comma-separated, for a start while a
//! node is down: `gateway/tests/ingest.rs`.)

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use common::meters::{self, count, Acked};
use common::{header, stored};
use futures::StreamExt;
use hearth_test_support::TestCluster;
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::time::Instant;

const NODES: usize = 3;
const DEVICES: u64 = 10;
const EACH: u64 = 300;
const EVENTS: &str = "HEARTH_EVENTS";
/// The durable consumer standing for a house rule.
const CONSUMER: &str = "cluster-audit";
/// How long the consumer has to acknowledge a message before it comes again;
/// short, so that a message whose acknowledgement was lost in the failover
/// comes back within the test.
const ACK_WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn killing_the_stream_leader_of_a_three_node_cluster_loses_no_acknowledged_reading() {
    let started = Instant::now();
    let mut cluster = TestCluster::start(NODES).await;
    let js = jetstream::new(
        async_nats::connect(cluster.urls())
            .await
            .expect("the test connects to the cluster"),
    );
    wait_for_replicated_jetstream(&js).await;
    tracing::info!(elapsed = ?started.elapsed(), "the cluster places R3 streams");

    // The gateway and the consumer both start from node 0's URL; the kill
    // below takes that node away from under them.
    let data = tempfile::tempdir().unwrap();
    let mqtt = SocketAddr::from(([127, 0, 0, 1], hearth_test_support::free_port()));
    let mut gateway = spawn_gateway(&cluster.url(0), mqtt, data.path());
    wait_for_listener(mqtt, &mut gateway).await;
    let doomed = cluster.name(0).to_owned();
    let events = js
        .get_stream(EVENTS)
        .await
        .expect("the gateway made HEARTH_EVENTS");
    assert_eq!(
        events.cached_info().config.num_replicas,
        NODES,
        "--replicas 3"
    );
    move_leader(&js, &Group::Stream(EVENTS), &doomed).await;

    let consumer_js = jetstream::new(
        async_nats::connect(cluster.url(0))
            .await
            .expect("the consumer connects to node 0"),
    );
    let consumer = consumer_js
        .get_stream(EVENTS)
        .await
        .expect("HEARTH_EVENTS")
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            description: Some("cluster test: reads every event through the failover".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            num_replicas: NODES,
            ..Default::default()
        })
        .await
        .expect("creating the durable consumer");
    move_leader(&js, &Group::Consumer(EVENTS, CONSUMER), &doomed).await;
    tracing::info!(elapsed = ?started.elapsed(), "gateway up, {doomed} leads the stream and the consumer");
    let received: Received = Arc::default();
    let reader = tokio::spawn(read_and_acknowledge(consumer, Arc::clone(&received)));

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
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&acked) < DEVICES * EACH / 3 {
        assert!(
            Instant::now() < deadline,
            "only {} readings acknowledged before the kill",
            count(&acked)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let leader = stream_leader(&js, EVENTS)
        .await
        .expect("HEARTH_EVENTS has a leader before the kill");
    let victim = cluster
        .index_of(&leader)
        .unwrap_or_else(|| panic!("the leader {leader:?} is not a node of the cluster"));
    cluster.kill(victim).await;
    let at_kill = count(&acked);
    let consumed_at_kill = received.lock().unwrap().len();
    assert!(at_kill < DEVICES * EACH, "killed mid-stream");
    tracing::info!(%leader, at_kill, consumed_at_kill, "killed the stream leader");

    for device in devices {
        tokio::time::timeout(Duration::from_secs(60), device)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} readings acknowledged after the leader {leader} was killed",
                    count(&acked),
                    DEVICES * EACH
                )
            })
            .expect("a device task panicked");
    }
    tracing::info!(elapsed = ?started.elapsed(), "every reading acknowledged");
    let new_leader = stream_leader(&js, EVENTS).await;
    assert!(
        new_leader.as_ref().is_some_and(|new| *new != leader),
        "a survivor leads HEARTH_EVENTS after the kill: {new_leader:?}"
    );

    // Every acknowledged reading stored, exactly once.
    let messages = stored(&js, EVENTS).await;
    meters::assert_each_acknowledged_stored_once(&messages, &acked, DEVICES * EACH, EVENTS);

    // The consumer received every stored reading, as stored, and its state
    // says that it acknowledged them all.
    let stored_ids: BTreeMap<u64, String> = messages
        .iter()
        .map(|message| {
            let id = header(message, "Hearth-Event-Id").expect("an event id");
            (message.sequence, id.to_owned())
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = not_delivered(&stored_ids, &received);
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer never received {} stored readings, e.g. stream sequences {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (sequence, delivery) in received.lock().unwrap().iter() {
        assert_eq!(
            stored_ids.get(sequence),
            Some(&delivery.event_id),
            "the consumer got stream sequence {sequence} as stored"
        );
    }
    let last = messages.last().expect("something stored").sequence;
    let info = wait_for_consumer_done(&js, last).await;
    reader.abort();
    let redelivered: u32 = received
        .lock()
        .unwrap()
        .values()
        .map(|delivery| delivery.deliveries - 1)
        .sum();

    tracing::info!(elapsed = ?started.elapsed(), "the consumer has acknowledged everything");

    // The killed node comes back and catches up with the survivors.
    cluster.restart(victim).await;
    wait_for_replicas_current(&js, EVENTS, NODES).await;
    gateway.kill().await.unwrap();
    tracing::info!(
        at_kill,
        consumed_at_kill,
        redelivered,
        consumer_redelivered = info.num_redelivered,
        elapsed = ?started.elapsed(),
        "cluster test done"
    );
}

fn spawn_gateway(nats_url: &str, mqtt: SocketAddr, data: &std::path::Path) -> Child {
    common::spawn_gateway_binary(nats_url, mqtt, data, &["--replicas", "3"])
}

/// Waits until the gateway listens for MQTT, i.e. has made its R3 streams.
async fn wait_for_listener(mqtt: SocketAddr, gateway: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(mqtt).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = gateway.try_wait() {
            panic!("the gateway exited ({status}) before it listened on {mqtt}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway does not listen on {mqtt}");
}

/// Waits until the cluster can place a stream on all its nodes: the routes
/// are up, JetStream has a meta leader and every node has joined it. The
/// gateway waits for a JetStream that does not answer yet, but gives up at
/// start on one that refuses (an R3 stream asked for before the third node
/// has joined), so this test does not leave that to timing.
async fn wait_for_replicated_jetstream(js: &jetstream::Context) {
    const PROBE: &str = "CLUSTER_TEST_PROBE";
    // Without a meta leader a request goes unanswered: ask again soon
    // rather than wait out the context's 5 s timeout.
    let mut probe = js.clone();
    probe.set_timeout(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = probe
            .create_stream(stream::Config {
                name: PROBE.to_owned(),
                subjects: vec!["cluster-test.probe".to_owned()],
                num_replicas: NODES,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {
                js.delete_stream(PROBE)
                    .await
                    .expect("deleting the probe stream");
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "the cluster cannot place an R{NODES} stream yet");
                assert!(
                    Instant::now() < deadline,
                    "the cluster cannot place an R{NODES} stream: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A Raft group of JetStream: a stream's or a consumer's.
enum Group<'a> {
    Stream(&'a str),
    Consumer(&'a str, &'a str),
}

impl Group<'_> {
    async fn leader(&self, js: &jetstream::Context) -> Option<String> {
        match self {
            Group::Stream(stream) => stream_leader(js, stream).await,
            Group::Consumer(stream, consumer) => {
                let mut consumer: jetstream::consumer::PullConsumer =
                    js.get_consumer_from_stream(consumer, stream).await.ok()?;
                consumer.info().await.ok()?.cluster.clone()?.leader
            }
        }
    }

    fn stepdown_subject(&self) -> String {
        match self {
            Group::Stream(stream) => format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            Group::Consumer(stream, consumer) => {
                format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}")
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Group::Stream(stream) => format!("stream {stream}"),
            Group::Consumer(stream, consumer) => format!("consumer {stream}/{consumer}"),
        }
    }
}

async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let stream = js.get_stream(stream).await.ok()?;
    stream.cached_info().cluster.clone()?.leader
}

/// Makes `node` the leader of `group`: asks the leader to step down (the
/// group elects another member at random) until `node` wins, so that the
/// kill hits the leader and the clients' connection at once.
async fn move_leader(js: &jetstream::Context, group: &Group<'_>, node: &str) {
    // Right after a step-down a request can go unanswered (no leader to
    // answer it yet): ask again soon rather than wait out 5 s.
    let mut js = js.clone();
    js.set_timeout(Duration::from_secs(1));
    let js = &js;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader = group.leader(js).await;
        if leader.as_deref() == Some(node) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} is still led by {leader:?}, not {node}",
            group.describe()
        );
        tracing::debug!(
            group = group.describe(),
            ?leader,
            "moving the leader to {node}"
        );
        let Some(leader) = leader else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let response = js
            .client()
            .request(group.stepdown_subject(), "".into())
            .await
            .unwrap_or_else(|error| panic!("stepping down {}: {error}", group.describe()));
        let answer: serde_json::Value =
            serde_json::from_slice(&response.payload).expect("a JSON stepdown response");
        assert!(
            answer["success"] == true,
            "stepping down {}: {answer}",
            group.describe()
        );
        // Until a new leader is elected.
        while group
            .leader(js)
            .await
            .as_deref()
            .is_none_or(|now| now == leader)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the consumer got for one stream sequence.
#[derive(Debug)]
struct Delivery {
    event_id: String,
    deliveries: u32,
}

type Received = Arc<Mutex<BTreeMap<u64, Delivery>>>;

/// A house rule's loop: fetches batches from the durable consumer and
/// acknowledges each message. An acknowledgement lost in the failover makes
/// the message come again after [`ACK_WAIT`]; the consumer's own state
/// (its ack floor) tells at the end that every one arrived. Failed fetches
/// (the node or the leader gone) are retried.
async fn read_and_acknowledge(consumer: jetstream::consumer::PullConsumer, received: Received) {
    loop {
        let batch = consumer
            .fetch()
            .max_messages(200)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::debug!(%error, "fetch failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::debug!(%error, "batch ended with an error");
                    break;
                }
            };
            let sequence = message.info().expect("JetStream metadata").stream_sequence;
            let event_id = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Hearth-Event-Id"))
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            if let Err(error) = message.ack().await {
                tracing::debug!(%error, sequence, "acknowledgement not sent");
            }
            received
                .lock()
                .unwrap()
                .entry(sequence)
                .or_insert(Delivery {
                    event_id,
                    deliveries: 0,
                })
                .deliveries += 1;
        }
    }
}

/// The stream sequences stored but not (yet) delivered to the consumer.
fn not_delivered(stored: &BTreeMap<u64, String>, received: &Received) -> Vec<u64> {
    let received = received.lock().unwrap();
    stored
        .keys()
        .filter(|sequence| !received.contains_key(sequence))
        .copied()
        .collect()
}

/// Waits until the consumer's own state (on its new leader) says that
/// everything up to `last` is acknowledged and nothing is pending.
async fn wait_for_consumer_done(js: &jetstream::Context, last: u64) -> jetstream::consumer::Info {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info = match js
            .get_consumer_from_stream::<pull::Config, _, _>(CONSUMER, EVENTS)
            .await
        {
            Ok(mut consumer) => consumer.info().await.ok().cloned(),
            Err(_) => None,
        };
        if let Some(info) = &info {
            if info.ack_floor.stream_sequence == last
                && info.num_ack_pending == 0
                && info.num_pending == 0
            {
                return info.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the consumer's state does not show every reading acknowledged (last {last}): {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the stream has `replicas` members, all current: the killed
/// node has rejoined and caught up.
async fn wait_for_replicas_current(js: &jetstream::Context, stream: &str, replicas: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cluster = match js.get_stream(stream).await {
            Ok(mut handle) => handle
                .info()
                .await
                .ok()
                .and_then(|info| info.cluster.clone()),
            Err(_) => None,
        };
        if let Some(cluster) = &cluster {
            let followers = &cluster.replicas;
            if cluster.leader.is_some()
                && followers.len() == replicas - 1
                && followers
                    .iter()
                    .all(|peer| peer.current && !peer.offline && peer.lag.unwrap_or(0) == 0)
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{stream}: the restarted node did not catch up: {cluster:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
