//! The notify rule with a real nats-server, real HTTP receivers (webhook,
//! ntfy, SMS), a real SMTP sink and an adjustable clock: fan-out, device
//! conditions, retries, dead letters, escalation, acknowledgements over
//! NATS, HTTP and MQTT-style events, dedup, rate limits, quiet hours and a
//! restart half-way.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::PROMPTLY;
use hearth_consumers::clock::Clock;
use hearth_consumers::homes::Homes;
use hearth_consumers::notify::{self, NotifyError, Options};
use hearth_proto::v1::{self, event::Body, Severity};
use hearth_proto::Encoding;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Long enough for the rule to have acted (its worker looks every 250 ms).
const SETTLE: Duration = Duration::from_millis(900);

// ---------------------------------------------------------------------------
// Receivers: an HTTP server that records every request and answers with a
// scripted status per path, and an SMTP sink.

#[derive(Debug, Clone)]
struct Captured {
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Captured {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map_or("", String::as_str)
    }
}

#[derive(Debug, Default)]
struct Script {
    requests: Vec<Captured>,
    /// Status codes to answer, in order, per path; then 200.
    answers: BTreeMap<String, VecDeque<u16>>,
    /// A status answered every time, per path.
    always: BTreeMap<String, u16>,
}

#[derive(Debug, Clone)]
struct Receiver {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = axum::Router::new()
            .fallback(capture)
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, script }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn answer(&self, path: &str, statuses: &[u16]) {
        self.script
            .lock()
            .unwrap()
            .answers
            .insert(path.to_owned(), statuses.iter().copied().collect());
    }

    fn always(&self, path: &str, status: u16) {
        self.script
            .lock()
            .unwrap()
            .always
            .insert(path.to_owned(), status);
    }

    fn received(&self, path: &str) -> Vec<Captured> {
        self.script
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    fn count(&self, path: &str) -> usize {
        self.received(path).len()
    }

    /// Waits until `path` got at least `count` requests; returns them all.
    async fn wait_for(&self, path: &str, count: usize) -> Vec<Captured> {
        common::wait_until(
            PROMPTLY,
            format!("{count} requests to {path}"),
            async || self.received(path),
            |found| found.len() >= count,
        )
        .await
    }
}

async fn capture(
    State(script): State<Arc<Mutex<Script>>>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let path = uri.path().to_owned();
    let mut script = script.lock().unwrap();
    script.requests.push(Captured {
        path: path.clone(),
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    });
    let status = match script.always.get(&path) {
        Some(status) => *status,
        None => script
            .answers
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .unwrap_or(200),
    };
    StatusCode::from_u16(status).unwrap()
}

/// Speaks just enough SMTP for lettre and keeps each message's data.
#[derive(Debug, Clone)]
struct SmtpSink {
    addr: SocketAddr,
    messages: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let kept = messages.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    write.write_all(b"220 sink ESMTP\r\n").await.ok();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let answer: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "DATA" => {
                                write.write_all(b"354 go on\r\n").await.ok();
                                let mut data = Vec::new();
                                while let Ok(Some(line)) = lines.next_line().await {
                                    if line == "." {
                                        break;
                                    }
                                    data.push(line);
                                }
                                kept.lock().unwrap().push(data.join("\n"));
                                b"250 kept\r\n"
                            }
                            "QUIT" => {
                                write.write_all(b"221 bye\r\n").await.ok();
                                return;
                            }
                            _ => b"250 ok\r\n",
                        };
                        write.write_all(answer).await.ok();
                    }
                });
            }
        });
        Self { addr, messages }
    }

    /// Waits until at least `count` e-mails came; returns them all.
    async fn wait_for(&self, count: usize) -> Vec<String> {
        common::wait_until(
            PROMPTLY,
            format!("{count} e-mails"),
            async || self.messages.lock().unwrap().clone(),
            |found| found.len() >= count,
        )
        .await
    }
}

// ---------------------------------------------------------------------------
// The rule, its configuration and its streams.

fn homes(notify: &str) -> Arc<Homes> {
    homes_with("", notify)
}

/// `home` is what goes under `[homes.home]` (its time zone).
fn homes_with(home: &str, notify: &str) -> Arc<Homes> {
    Arc::new(
        Homes::parse(
            Path::new("homes.toml"),
            &format!("[homes.home]\n{home}\n[homes.home.notify]\n{notify}"),
        )
        .unwrap(),
    )
}

/// `[[recipients]]` with webhook channels on `receiver` at `/<name>-<n>`.
fn webhooks(receiver: &Receiver, recipients: &[(&str, usize, &str)]) -> String {
    let mut text = String::new();
    for (name, channels, extra) in recipients {
        text.push_str(&format!(
            "[[homes.home.notify.recipients]]\nname = \"{name}\"\n{extra}\n"
        ));
        for n in 1..=*channels {
            text.push_str(&format!(
                "[[homes.home.notify.recipients.channels]]\nname = \"{name}-{n}\"\nkind = \"webhook\"\nurl = \"{}\"\n",
                receiver.url(&format!("/{name}-{n}"))
            ));
        }
    }
    text
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), NotifyError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PROMPTLY, self.task)
            .await
            .expect("the rule stops promptly")
            .unwrap()
            .expect("the rule ran");
    }
}

async fn start(
    js: &jetstream::Context,
    homes: Arc<Homes>,
    clock: &Clock,
    http: Option<SocketAddr>,
) -> Running {
    let stop = CancellationToken::new();
    let mut task = tokio::spawn(notify::run(
        js.clone(),
        homes,
        Encoding::Json,
        clock.clone(),
        Options { http_listen: http },
        stop.clone(),
    ));
    // The consumer exists before the events come (a rule reads new events).
    tokio::select! {
        () = common::wait_for_consumer(js, notify::CONSUMER, PROMPTLY) => {}
        ended = &mut task => panic!("the rule ended: {ended:?}"),
    }
    Running { stop, task }
}

/// Stores an event of `room/device` caused by `cause-<id>`.
async fn publish(js: &jetstream::Context, id: &str, room: &str, device: &str, body: Body) {
    let event = v1::Event {
        causation_id: format!("cause-{id}"),
        ..common::device_event(id, room, device, body)
    };
    common::publish_event(js, &event).await;
}

/// A notification request as the security rule stores one.
async fn notification(
    js: &jetstream::Context,
    id: &str,
    device: &str,
    severity: Severity,
    category: &str,
    title: &str,
) {
    publish(
        js,
        id,
        "_home",
        device,
        Body::Notification(v1::Notification {
            severity: severity as i32,
            category: category.into(),
            title: title.into(),
            message: format!("{title}!"),
        }),
    )
    .await;
}

/// The critical "Alarm" notification the security rule stores when the
/// alarm triggers.
async fn alarm_notification(js: &jetstream::Context, id: &str) {
    notification(
        js,
        id,
        "hearth-security",
        Severity::Critical,
        "alarm_triggered",
        "Alarm",
    )
    .await;
}

/// The delivery outcomes stored, with their events.
async fn deliveries(js: &jetstream::Context) -> Vec<(v1::Event, v1::NotificationDelivery)> {
    common::stored_events(js)
        .await
        .into_iter()
        .filter_map(|event| match event.body.clone() {
            Some(Body::NotificationDelivery(delivery)) => Some((event, delivery)),
            _ => None,
        })
        .collect()
}

/// Waits until at least `count` delivery outcomes are stored; returns them
/// all.
async fn wait_for_deliveries(
    js: &jetstream::Context,
    count: usize,
) -> Vec<(v1::Event, v1::NotificationDelivery)> {
    common::wait_until(
        PROMPTLY,
        format!("{count} delivery outcomes"),
        async || deliveries(js).await,
        |found| found.len() >= count,
    )
    .await
}

/// The notifications stored by the rule itself.
async fn own_notifications(js: &jetstream::Context) -> Vec<(v1::Event, v1::Notification)> {
    common::stored_events(js)
        .await
        .into_iter()
        .filter_map(|event| match event.body.clone() {
            Some(Body::Notification(n))
                if event
                    .source
                    .as_ref()
                    .is_some_and(|s| s.convention == notify::CONSUMER) =>
            {
                Some((event, n))
            }
            _ => None,
        })
        .collect()
}

/// Waits until the rule has handled every event stored so far.
async fn consumed(js: &jetstream::Context) {
    common::wait_until(
        PROMPTLY,
        "no events left to the rule",
        async || {
            let mut consumer = js
                .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    notify::CONSUMER,
                    "HEARTH_EVENTS",
                )
                .await
                .unwrap();
            consumer.info().await.unwrap().clone()
        },
        |info| info.num_pending == 0 && info.num_ack_pending == 0,
    )
    .await;
}

/// Moves the clock on by `step` until `done`, giving the rule a tick in
/// between.
async fn advance_until(clock: &Clock, step: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never came");
        clock.advance(step);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `{"notification_id": id, "recipient": recipient}` on hearth.notify.ack.
async fn ack_over_nats(js: &jetstream::Context, id: &str, recipient: &str) -> Value {
    let request = serde_json::json!({"notification_id": id, "recipient": recipient});
    let answer = js
        .client()
        .request(notify::ACK_SUBJECT, request.to_string().into())
        .await
        .expect("an answer");
    serde_json::from_slice(&answer.payload).unwrap()
}

/// A bare HTTP/1.1 request; the status and the body.
async fn http(addr: SocketAddr, method: &str, target: &str) -> (u16, Value) {
    let response = common::http_request(addr, method, target).await;
    let body = serde_json::from_str(&response.body).unwrap_or(Value::Null);
    (response.status, body)
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_critical_notification_goes_to_every_recipients_first_channel() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let config = webhooks(&receiver, &[("alice", 2, ""), ("bob", 1, "")]);
    let rule = start(&js, homes(&config), &clock, None).await;

    // Named and described for `nats consumer ls`.
    let mut consumer = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            notify::CONSUMER,
            "HEARTH_EVENTS",
        )
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert!(info
        .config
        .description
        .as_deref()
        .is_some_and(|d| d.starts_with("hearth notify")));

    alarm_notification(&js, "n1").await;
    let alice = receiver.wait_for("/alice-1", 1).await;
    let bob = receiver.wait_for("/bob-1", 1).await;
    let body = alice[0].json();
    assert_eq!(body["notification_id"], "n1");
    assert_eq!(body["severity"], "critical");
    assert_eq!(body["category"], "alarm_triggered");
    assert_eq!(body["title"], "Alarm");
    assert!(body["message"].as_str().unwrap().starts_with("Alarm!"));
    assert_eq!(body["kind"], "notification");
    assert_eq!(body["step"], 0);
    assert_eq!(body["recipient"], "alice");
    assert_eq!(body["correlation_id"], "corr-n1");
    assert_eq!(body["causation_id"], "cause-n1");
    assert_eq!(body["device"], "hearth-security");
    assert_eq!(alice[0].header("Idempotency-Key"), "n1.alice.alice-1.0");
    assert_eq!(bob[0].header("Idempotency-Key"), "n1.bob.bob-1.0");
    assert_eq!(bob[0].json()["recipient"], "bob");

    // Each outcome is stored, following from the notification.
    let outcomes = wait_for_deliveries(&js, 2).await;
    for (event, delivery) in &outcomes {
        assert_eq!(event.causation_id, "n1");
        assert_eq!(event.correlation_id, "corr-n1");
        assert!(delivery.delivered);
        assert_eq!((delivery.attempts, delivery.step), (1, 0));
    }
    let mut to: Vec<_> = outcomes
        .iter()
        .map(|(_, d)| (d.recipient.clone(), d.channel.clone()))
        .collect();
    to.sort();
    assert_eq!(
        to,
        [
            ("alice".to_owned(), "alice-1".to_owned()),
            ("bob".to_owned(), "bob-1".to_owned())
        ]
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 1);
    assert_eq!(
        receiver.count("/alice-2"),
        0,
        "the second channel waits for escalation"
    );
    assert_eq!(receiver.count("/bob-1"), 1);
    rule.stop().await;
}

#[tokio::test]
async fn device_conditions_become_notifications_on_every_kind_of_channel() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let smtp = SmtpSink::start().await;
    let clock = Clock::system();
    let config = format!(
        r#"
silent_after = "1h"
[[homes.home.notify.recipients]]
name = "alice"
[[homes.home.notify.recipients.channels]]
name = "push"
kind = "ntfy"
server = "{ntfy}"
topic = "alice-home"
token = "tk"
[[homes.home.notify.recipients]]
name = "bob"
[[homes.home.notify.recipients.channels]]
name = "mail"
kind = "email"
server = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "hearth <hearth@example.com>"
to = "bob@example.com"
[[homes.home.notify.recipients]]
name = "carol"
[[homes.home.notify.recipients.channels]]
name = "sms"
kind = "sms"
url = "{sms}"
to = "+49 170 1"
body = '{{"to":"{{to}}","text":"{{message}}"}}'
headers = {{ X-Api-Key = "k1" }}
[[homes.home.notify.recipients]]
name = "dave"
[[homes.home.notify.recipients.channels]]
name = "log"
kind = "log"
"#,
        ntfy = receiver.url(""),
        smtp_port = smtp.addr.port(),
        sms = receiver.url("/sms"),
    );
    let rule = start(&js, homes(&config), &clock, None).await;

    publish(
        &js,
        "s1",
        "kitchen",
        "smoke-1",
        Body::Smoke(v1::Smoke { detected: true }),
    )
    .await;
    let push = receiver.wait_for("/alice-home", 1).await;
    assert_eq!(push[0].header("Title"), "Smoke detected");
    assert_eq!(push[0].header("Priority"), "5");
    assert!(push[0].header("Tags").contains("rotating_light"));
    assert_eq!(push[0].header("Authorization"), "Bearer tk");
    assert!(push[0]
        .body
        .starts_with("Smoke detected in kitchen (smoke-1)"));
    let notification_id = {
        let stored = own_notifications(&js).await;
        assert_eq!(stored.len(), 1, "{stored:?}");
        let (event, n) = &stored[0];
        assert_eq!(n.severity(), Severity::Critical);
        assert_eq!(n.category, "smoke");
        assert_eq!(
            (event.room.as_str(), event.device.as_str()),
            ("kitchen", "smoke-1")
        );
        assert_eq!(event.causation_id, "s1");
        assert_eq!(event.correlation_id, "corr-s1");
        event.id.clone()
    };
    assert_eq!(
        push[0].header("Idempotency-Key"),
        format!("{notification_id}.alice.push.0")
    );
    let mails = smtp.wait_for(1).await;
    assert!(mails[0].contains("Subject: Smoke detected"), "{}", mails[0]);
    assert!(
        mails[0].contains(&format!(
            "Message-ID: <{notification_id}.bob.mail.0@hearth.notify>"
        )),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("To: bob@example.com"), "{}", mails[0]);
    let sms = receiver.wait_for("/sms", 1).await;
    let text = sms[0].json();
    assert_eq!(text["to"], "+49 170 1");
    assert!(text["text"]
        .as_str()
        .unwrap()
        .starts_with("Smoke detected: Smoke detected in kitchen"));
    assert_eq!(sms[0].header("X-Api-Key"), "k1");
    // Four recipients, four outcomes (the log channel too).
    let outcomes = wait_for_deliveries(&js, 4).await;
    assert!(outcomes.iter().all(|(_, d)| d.delivered), "{outcomes:?}");

    // The detector keeps reporting smoke: told once.
    publish(
        &js,
        "s2",
        "kitchen",
        "smoke-1",
        Body::Smoke(v1::Smoke { detected: true }),
    )
    .await;
    // A leak, a low battery (twice), a device going offline.
    publish(
        &js,
        "w1",
        "bath",
        "leak-1",
        Body::WaterLeak(v1::WaterLeak { detected: true }),
    )
    .await;
    publish(
        &js,
        "b1",
        "hall",
        "door",
        Body::Battery(v1::Battery { percent: 9.0 }),
    )
    .await;
    publish(
        &js,
        "b2",
        "hall",
        "door",
        Body::Battery(v1::Battery { percent: 8.0 }),
    )
    .await;
    publish(
        &js,
        "o1",
        "hall",
        "plug",
        Body::Availability(v1::Availability { online: false }),
    )
    .await;
    receiver.wait_for("/alice-home", 4).await;
    tokio::time::sleep(SETTLE).await;
    let categories: Vec<String> = own_notifications(&js)
        .await
        .into_iter()
        .map(|(_, n)| n.category)
        .collect();
    assert_eq!(
        categories,
        ["smoke", "water_leak", "battery_low", "device_offline"]
    );
    let pushes = receiver.received("/alice-home");
    assert_eq!(pushes.len(), 4);
    assert_eq!(pushes[2].header("Priority"), "4", "a warning");

    // Devices that reported and then fall silent (the temperature sensor and
    // every device above) are told once each.
    publish(
        &js,
        "t1",
        "hall",
        "thermo",
        Body::Temperature(v1::Temperature { celsius: 20.5 }),
    )
    .await;
    consumed(&js).await;
    clock.advance(Duration::from_secs(3601));
    let silent_ones = || async {
        own_notifications(&js)
            .await
            .into_iter()
            .filter(|(_, n)| n.category == "sensor_silent")
            .map(|(e, _)| (e.room, e.device))
            .collect::<Vec<(String, String)>>()
    };
    common::wait_until(
        PROMPTLY,
        "4 sensor_silent notifications",
        silent_ones,
        |silent| silent.len() >= 4,
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    let silent = silent_ones().await;
    assert_eq!(silent.len(), 4, "{silent:?}");
    assert!(silent.contains(&("hall".to_owned(), "thermo".to_owned())));
    assert!(
        !silent.iter().any(|(_, d)| d == "plug"),
        "offline is no report"
    );
    rule.stop().await;
}

#[tokio::test]
async fn a_failing_webhook_is_retried_until_it_answers() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    receiver.answer("/alice-1", &[500, 500]);
    let clock = Clock::system();
    let config = format!(
        "retry = {{ tries = 5, backoff = \"10s\" }}\n{}",
        webhooks(&receiver, &[("alice", 1, "")])
    );
    let rule = start(&js, homes(&config), &clock, None).await;
    notification(
        &js,
        "n1",
        "hearth-security",
        Severity::Warning,
        "test",
        "Retry me",
    )
    .await;
    receiver.wait_for("/alice-1", 1).await;
    advance_until(&clock, Duration::from_secs(10), || {
        receiver.count("/alice-1") >= 3
    })
    .await;
    let outcomes = wait_for_deliveries(&js, 1).await;
    assert_eq!(outcomes.len(), 1);
    let delivery = &outcomes[0].1;
    assert!(delivery.delivered);
    assert_eq!(delivery.attempts, 3);
    assert_eq!(delivery.notification_id, "n1");
    let keys: Vec<String> = receiver
        .received("/alice-1")
        .iter()
        .map(|r| r.header("Idempotency-Key").to_owned())
        .collect();
    assert_eq!(
        keys, ["n1.alice.alice-1.0"; 3],
        "every attempt is the same message"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 3);
    rule.stop().await;
}

#[tokio::test]
async fn a_channel_that_keeps_failing_ends_in_the_dead_letter_queue() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    receiver.always("/alice-1", 503);
    receiver.always("/bob-1", 404);
    let clock = Clock::system();
    let config = format!(
        "retry = {{ tries = 3, backoff = \"10s\" }}\n{}",
        webhooks(&receiver, &[("alice", 1, ""), ("bob", 1, "")])
    );
    let rule = start(&js, homes(&config), &clock, None).await;
    notification(
        &js,
        "n1",
        "hearth-security",
        Severity::Warning,
        "test",
        "Nobody hears",
    )
    .await;
    receiver.wait_for("/alice-1", 1).await;
    advance_until(&clock, Duration::from_secs(10), || {
        receiver.count("/alice-1") >= 3
    })
    .await;
    let mut outcomes: Vec<v1::NotificationDelivery> = wait_for_deliveries(&js, 2)
        .await
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    outcomes.sort_by(|a, b| a.recipient.cmp(&b.recipient));
    assert!(!outcomes[0].delivered);
    assert_eq!(outcomes[0].attempts, 3, "{outcomes:?}");
    assert!(outcomes[0].error.contains("503"), "{outcomes:?}");
    // A 404 will not get better: given up at once.
    assert!(!outcomes[1].delivered);
    assert_eq!(outcomes[1].attempts, 1, "{outcomes:?}");

    let mut dlq = js.get_stream("HEARTH_DLQ").await.unwrap();
    common::wait_until(
        PROMPTLY,
        "2 dead letters in HEARTH_DLQ",
        async || dlq.info().await.unwrap().state.messages,
        |&messages| messages >= 2,
    )
    .await;
    let mut letters = Vec::new();
    for sequence in 1..=2 {
        letters.push(dlq.get_raw_message(sequence).await.unwrap());
    }
    letters.sort_by_key(|m| m.headers.get("Hearth-Recipient").unwrap().to_string());
    let alice = &letters[0];
    assert_eq!(
        alice.subject.as_str(),
        "hearth.dlq.hearth-notify.undeliverable"
    );
    assert_eq!(
        alice.headers.get("Hearth-Reason").unwrap().as_str(),
        "undeliverable"
    );
    assert_eq!(
        alice.headers.get("Hearth-Consumer").unwrap().as_str(),
        "hearth-notify"
    );
    let detail = alice.headers.get("Hearth-Detail").unwrap().as_str();
    assert!(
        detail.contains("alice/alice-1") && detail.contains("3 attempts"),
        "{detail}"
    );
    let event: v1::Event = Encoding::Json.decode(&alice.payload).unwrap();
    assert_eq!(event.id, "n1");
    assert_eq!(event.correlation_id, "corr-n1");
    let Some(Body::Notification(n)) = event.body else {
        panic!("not a notification: {event:?}");
    };
    assert_eq!(n.title, "Nobody hears");
    tokio::time::sleep(SETTLE).await;
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 3, "no more tries");
    assert_eq!(receiver.count("/bob-1"), 1);
    assert_eq!(dlq.info().await.unwrap().state.messages, 2);
    rule.stop().await;
}

#[tokio::test]
async fn an_unacknowledged_critical_notification_escalates_on_schedule() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let config = format!(
        "escalate = [\"5m\", \"15m\"]\n{}",
        webhooks(
            &receiver,
            &[
                ("alice", 2, ""),
                ("bob", 1, ""),
                ("neighbour", 1, "backup = true")
            ]
        )
    );
    let rule = start(&js, homes(&config), &clock, None).await;
    alarm_notification(&js, "n1").await;
    receiver.wait_for("/alice-1", 1).await;
    receiver.wait_for("/bob-1", 1).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        receiver.count("/neighbour-1"),
        0,
        "a backup waits for escalation"
    );

    clock.advance(Duration::from_secs(5 * 60));
    let alice = receiver.wait_for("/alice-2", 1).await;
    assert_eq!(alice[0].json()["kind"], "reminder");
    assert_eq!(alice[0].json()["step"], 1);
    assert!(alice[0].json()["title"].as_str().unwrap().contains("Alarm"));
    receiver.wait_for("/bob-1", 2).await;
    let neighbour = receiver.wait_for("/neighbour-1", 1).await;
    assert_eq!(
        neighbour[0].header("Idempotency-Key"),
        "n1.neighbour.neighbour-1.1"
    );

    clock.advance(Duration::from_secs(10 * 60));
    receiver.wait_for("/alice-2", 2).await;
    receiver.wait_for("/bob-1", 3).await;
    receiver.wait_for("/neighbour-1", 2).await;
    // The schedule is over.
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        [
            receiver.count("/alice-1"),
            receiver.count("/alice-2"),
            receiver.count("/bob-1"),
            receiver.count("/neighbour-1")
        ],
        [1, 2, 3, 2]
    );
    rule.stop().await;
}

/// The escalation config of the acknowledgement tests: alice and bob, each
/// with a second channel for the first reminder.
fn two_with_reminders(receiver: &Receiver) -> String {
    format!(
        "escalate = [\"5m\"]\n{}",
        webhooks(receiver, &[("alice", 2, ""), ("bob", 2, "")])
    )
}

/// Starts the rule with [`two_with_reminders`] (and HTTP on `http`) and
/// waits until the alarm notification `n1` reached alice's and bob's first
/// channels.
async fn alarm_delivered_to_both(
    js: &jetstream::Context,
    receiver: &Receiver,
    clock: &Clock,
    http: Option<SocketAddr>,
) -> Running {
    let rule = start(js, homes(&two_with_reminders(receiver)), clock, http).await;
    alarm_notification(js, "n1").await;
    receiver.wait_for("/alice-1", 1).await;
    receiver.wait_for("/bob-1", 1).await;
    wait_for_deliveries(js, 2).await;
    rule
}

/// After the acknowledgement: both got a done message, nobody a reminder.
async fn acknowledged(receiver: &Receiver, clock: &Clock, by: &str) {
    let alice = receiver.wait_for("/alice-1", 2).await;
    let bob = receiver.wait_for("/bob-1", 2).await;
    for done in [&alice[1], &bob[1]] {
        let body = done.json();
        assert_eq!(body["kind"], "done");
        assert_eq!(body["step"], 1);
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(&format!("acknowledged by {by}")),
            "{body}"
        );
    }
    clock.advance(Duration::from_secs(600));
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        [
            receiver.count("/alice-1"),
            receiver.count("/alice-2"),
            receiver.count("/bob-1"),
            receiver.count("/bob-2")
        ],
        [2, 0, 2, 0],
        "no reminders after the acknowledgement"
    );
}

#[tokio::test]
async fn an_acknowledgement_over_nats_stops_escalation_and_sends_done() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let rule = alarm_delivered_to_both(&js, &receiver, &clock, None).await;

    assert_eq!(
        ack_over_nats(&js, "n1", "bob").await,
        serde_json::json!({"ok": true})
    );
    acknowledged(&receiver, &clock, "bob via nats").await;
    let acks: Vec<v1::NotificationAck> = common::stored_events(&js)
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::NotificationAck(ack)) => Some(ack),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (acks[0].recipient.as_str(), acks[0].via.as_str()),
        ("bob", "nats")
    );

    let again = ack_over_nats(&js, "n1", "alice").await;
    assert_eq!(again["ok"], false);
    assert!(
        again["error"]
            .as_str()
            .unwrap()
            .contains("already acknowledged by bob via nats"),
        "{again}"
    );
    let unknown = ack_over_nats(&js, "nope", "alice").await;
    assert_eq!(unknown["ok"], false);
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("unknown notification"),
        "{unknown}"
    );
    let stranger = ack_over_nats(&js, "n1", "mallory").await;
    assert!(
        stranger["error"]
            .as_str()
            .unwrap()
            .contains("not a recipient"),
        "{stranger}"
    );
    let garbage = js
        .client()
        .request(notify::ACK_SUBJECT, "not json".into())
        .await
        .unwrap();
    let garbage: Value = serde_json::from_slice(&garbage.payload).unwrap();
    assert_eq!(garbage["ok"], false);
    rule.stop().await;
}

#[tokio::test]
async fn an_acknowledgement_over_http_stops_escalation_and_sends_done() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let addr: SocketAddr = format!("127.0.0.1:{}", hearth_test_support::free_port())
        .parse()
        .unwrap();
    let rule = alarm_delivered_to_both(&js, &receiver, &clock, Some(addr)).await;

    let (status, shown) = http(addr, "GET", "/notifications/n1").await;
    assert_eq!(status, 200);
    assert_eq!(
        shown["notification"]["deliveries"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        shown["notification"]["deliveries"][0]["status"],
        "delivered"
    );
    assert!(shown["notification"]["escalation"].is_object());

    assert_eq!(
        http(addr, "POST", "/notifications/n1/ack").await.0,
        400,
        "who?"
    );
    let (status, body) = http(addr, "POST", "/notifications/n1/ack?recipient=alice").await;
    assert_eq!((status, body), (200, serde_json::json!({"ok": true})));
    acknowledged(&receiver, &clock, "alice via http").await;

    let (status, body) = http(addr, "POST", "/notifications/n1/ack?recipient=bob").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("already acknowledged by alice via http"));
    let (status, body) = http(addr, "POST", "/notifications/nope/ack?recipient=bob").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(http(addr, "GET", "/notifications/nope").await.0, 404);
    let (_, shown) = http(addr, "GET", "/notifications/n1").await;
    assert_eq!(shown["notification"]["ack"]["recipient"], "alice");
    assert!(shown["notification"]["escalation"].is_null());
    let (status, list) = http(addr, "GET", "/notifications").await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["acknowledged_by"], "alice via http");
    rule.stop().await;
}

#[tokio::test]
async fn an_acknowledgement_over_mqtt_stops_escalation_and_sends_done() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let rule = alarm_delivered_to_both(&js, &receiver, &clock, None).await;
    // What the gateway stores for `hearth/home/hall/panel/notification_ack`.
    publish(
        &js,
        "ack1",
        "hall",
        "panel",
        Body::NotificationAck(v1::NotificationAck {
            notification_id: "n1".into(),
            recipient: "alice".into(),
            via: "mqtt".into(),
        }),
    )
    .await;
    acknowledged(&receiver, &clock, "alice via mqtt").await;
    // The done messages' outcomes are stored too: 2 + 2.
    let outcomes = wait_for_deliveries(&js, 4).await;
    assert_eq!(outcomes.iter().filter(|(_, d)| d.step == 1).count(), 2);
    rule.stop().await;
}

#[tokio::test]
async fn the_same_category_and_device_within_the_dedup_window_is_told_once() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let config = format!(
        "dedup_window = \"10m\"\n{}",
        webhooks(&receiver, &[("alice", 1, "")])
    );
    let rule = start(&js, homes(&config), &clock, None).await;
    notification(
        &js,
        "d1",
        "plug",
        Severity::Warning,
        "device_offline",
        "Plug offline",
    )
    .await;
    receiver.wait_for("/alice-1", 1).await;
    notification(
        &js,
        "d2",
        "plug",
        Severity::Warning,
        "device_offline",
        "Plug offline",
    )
    .await;
    // The same event again (as after a crash): one notification.
    notification(
        &js,
        "d1",
        "plug",
        Severity::Warning,
        "device_offline",
        "Plug offline",
    )
    .await;
    notification(
        &js,
        "d3",
        "lamp",
        Severity::Warning,
        "device_offline",
        "Lamp offline",
    )
    .await;
    receiver.wait_for("/alice-1", 2).await;
    tokio::time::sleep(SETTLE).await;
    let ids: Vec<String> = receiver
        .received("/alice-1")
        .iter()
        .map(|r| r.json()["notification_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["d1", "d3"]);
    clock.advance(Duration::from_secs(601));
    notification(
        &js,
        "d4",
        "plug",
        Severity::Warning,
        "device_offline",
        "Plug offline",
    )
    .await;
    receiver.wait_for("/alice-1", 3).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 3);
    rule.stop().await;
}

#[tokio::test]
async fn a_rate_limit_holds_the_rest_back_and_sends_a_summary() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    // No reminders of the critical one in between.
    let config = format!(
        "escalate = []\n{}",
        webhooks(
            &receiver,
            &[("alice", 1, "rate_limit = { max = 2, period = \"1h\" }")],
        )
    );
    let rule = start(&js, homes(&config), &clock, None).await;
    for n in 1..=5 {
        let title = format!("Info {n}");
        notification(
            &js,
            &format!("i{n}"),
            "svc",
            Severity::Info,
            &format!("c{n}"),
            &title,
        )
        .await;
    }
    receiver.wait_for("/alice-1", 2).await;
    // Critical ones are never limited.
    notification(&js, "crit", "svc", Severity::Critical, "smoke", "Fire").await;
    receiver.wait_for("/alice-1", 3).await;
    tokio::time::sleep(SETTLE).await;
    let titles: Vec<String> = receiver
        .received("/alice-1")
        .iter()
        .map(|r| r.json()["title"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(titles, ["Info 1", "Info 2", "Fire"]);

    clock.advance(Duration::from_secs(3601));
    let all = receiver.wait_for("/alice-1", 4).await;
    let summary = all[3].json();
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["title"], "3 more held back");
    let text = summary["message"].as_str().unwrap();
    for n in 3..=5 {
        assert!(text.contains(&format!("Info {n}")), "{text}");
    }
    assert!(!text.contains("Info 2"), "{text}");
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 4);
    rule.stop().await;
}

#[tokio::test]
async fn quiet_hours_hold_non_critical_ones_and_let_critical_ones_through() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    // Quiet from an hour ago to an hour from now, in UTC.
    let now = jiff::Timestamp::from_millisecond(clock.now_ms() as i64)
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    let minute = i32::from(now.hour()) * 60 + i32::from(now.minute());
    let at = |m: i32| {
        let m = m.rem_euclid(24 * 60);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    let quiet = format!("quiet_hours = \"{}-{}\"", at(minute - 60), at(minute + 60));
    let config = format!(
        "escalate = []\n{}",
        webhooks(&receiver, &[("alice", 1, &quiet), ("bob", 1, "")])
    );
    let homes = homes_with("timezone = \"UTC\"", &config);
    let rule = start(&js, homes, &clock, None).await;
    notification(
        &js,
        "w1",
        "door",
        Severity::Warning,
        "battery_low",
        "Battery low",
    )
    .await;
    receiver.wait_for("/bob-1", 1).await;
    alarm_notification(&js, "c1").await;
    let alice = receiver.wait_for("/alice-1", 1).await;
    assert_eq!(
        alice[0].json()["title"],
        "Alarm",
        "critical overrides quiet hours"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 1, "the warning is held");

    clock.advance(Duration::from_secs(2 * 3600));
    let alice = receiver.wait_for("/alice-1", 2).await;
    let summary = alice[1].json();
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["title"], "1 notification during quiet hours");
    assert!(summary["message"].as_str().unwrap().contains("Battery low"));
    assert_eq!(summary["severity"], "warning");
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 2);
    assert_eq!(
        receiver.count("/bob-1"),
        2,
        "bob: the warning and the alarm"
    );
    rule.stop().await;
}

#[tokio::test]
async fn a_restarted_rule_sends_nothing_twice_and_resumes_its_escalation() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let receiver = Receiver::start().await;
    let clock = Clock::system();
    let config = format!(
        "escalate = [\"5m\", \"15m\"]\nretry = {{ tries = 5, backoff = \"1m\" }}\n{}",
        webhooks(&receiver, &[("alice", 2, ""), ("bob", 1, "")])
    );
    let rule = start(&js, homes(&config), &clock, None).await;
    receiver.answer("/bob-1", &[500]);
    alarm_notification(&js, "n1").await;
    receiver.wait_for("/alice-1", 1).await;
    receiver.wait_for("/bob-1", 1).await;
    wait_for_deliveries(&js, 1).await;
    rule.stop().await;

    // While it is down: bob's retry and the first escalation step fall due,
    // and a new notification comes in.
    clock.advance(Duration::from_secs(6 * 60));
    notification(
        &js,
        "n2",
        "plug",
        Severity::Warning,
        "device_offline",
        "Plug offline",
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-2"), 0);

    let rule = start(&js, homes(&config), &clock, None).await;
    receiver.wait_for("/alice-2", 1).await;
    let bob = receiver.wait_for("/bob-1", 4).await;
    let mut bob_got: Vec<(String, u64)> = bob
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["notification_id"].as_str().unwrap().to_owned(),
                body["step"].as_u64().unwrap(),
            )
        })
        .collect();
    bob_got.sort();
    assert_eq!(
        bob_got,
        [
            ("n1".to_owned(), 0),
            ("n1".to_owned(), 0),
            ("n1".to_owned(), 1),
            ("n2".to_owned(), 0)
        ],
        "bob: the failed first try, its retry, the reminder, the new one"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(receiver.count("/alice-1"), 2, "n1 once and n2 once");
    assert_eq!(receiver.count("/alice-2"), 1);
    assert_eq!(receiver.count("/bob-1"), 4);

    // Stopped again and back: nothing is sent again.
    rule.stop().await;
    let rule = start(&js, homes(&config), &clock, None).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        [
            receiver.count("/alice-1"),
            receiver.count("/alice-2"),
            receiver.count("/bob-1")
        ],
        [2, 1, 4]
    );
    // And the escalation goes on where it was.
    clock.advance(Duration::from_secs(10 * 60));
    receiver.wait_for("/alice-2", 2).await;
    receiver.wait_for("/bob-1", 5).await;
    rule.stop().await;
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_at_start_with_the_problem_named() {
    let (_nats, js) = common::start_nats_with_streams().await;
    // Refused when the homes file is read, naming the home, the recipient,
    // the channel and the problem.
    let error = Homes::parse(
        Path::new("homes.toml"),
        "[homes.home.notify]\n[[homes.home.notify.recipients]]\nname = \"alice\"\n[[homes.home.notify.recipients.channels]]\nname = \"push\"\nkind = \"ntfy\"\nurl = \"http://x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("home \"home\"")
            && error.contains("recipient \"alice\", channel \"push\" (ntfy)")
            && error.contains("`url` does not apply"),
        "{error}"
    );

    // A secret's variable is looked for when the rule starts (the other
    // rules start without it).
    let secret = crate::homes(
        "[[homes.home.notify.recipients]]\nname = \"bob\"\n[[homes.home.notify.recipients.channels]]\nname = \"mail\"\nkind = \"email\"\nserver = \"smtp.example.com\"\nfrom = \"a@example.com\"\nto = \"bob@example.com\"\nuser = \"hearth\"\npassword_env = \"HEARTH_NOTIFY_TEST_UNSET\"\n",
    );
    secret.homes["home"].notify.validate().expect("valid");
    let error = notify::run(
        js.clone(),
        secret,
        Encoding::Json,
        Clock::system(),
        Options::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("recipient \"bob\", channel \"mail\": password_env: environment variable HEARTH_NOTIFY_TEST_UNSET is not set"),
        "{error}"
    );
    // Parsing errors name the line.
    let error = Homes::parse(
        Path::new("homes.toml"),
        "[homes.home.notify]\ndedup_window = \"soon\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("line 2") && error.contains("dedup_window"),
        "{error}"
    );
}
