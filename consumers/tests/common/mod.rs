//! What the integration tests of hearth-consumers share: a nats-server with
//! hearth's streams, events stored as the gateway stores them, readers of
//! what the rules stored, waiting with a deadline, the alarm panel, the real
//! gateway with real MQTT clients (`mosquitto_pub`, `mosquitto_sub`), raw
//! HTTP requests and cheap hashes of alarm codes.
//!
//! Each test file takes it in with `mod common;`.

// Every test file is a crate of its own that compiles this module again and
// uses only some of the helpers: the others would warn as unused.
#![allow(dead_code)]

use std::fmt::{Debug, Display};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use async_nats::jetstream::{self, consumer, message::StreamMessage};
use async_nats::HeaderMap;
use hearth_gateway::Gateway;
use hearth_proto::v1::{self, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use tokio::process::{Child, Command};

/// How long a test waits for something that should happen promptly.
pub(crate) const PROMPTLY: Duration = Duration::from_secs(10);

/// How often [`wait_until`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Where the gateway and the rules store events, and the rules read them.
const EVENTS: &str = "HEARTH_EVENTS";
/// Where the rules store commands for devices.
const COMMANDS: &str = "HEARTH_COMMANDS";

// ---------------------------------------------------------------------------
// Waiting.

/// Looks with `look` until `done` holds for what it saw, and returns that:
/// again every 50 ms for `within` at the most, then the test fails naming
/// `what` it waited for and what `look` saw last.
///
/// ```ignore
/// let found = wait_until(
///     PROMPTLY,
///     "2 commands",
///     async || stored_commands(&js).await,
///     |found| found.len() >= 2,
/// )
/// .await;
/// ```
pub(crate) async fn wait_until<T: Debug>(
    within: Duration,
    what: impl Display,
    look: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    wait_until_every(within, POLL_EVERY, what, look, done).await
}

/// [`wait_until`], looking again every `every`: for a test whose `done` is
/// a lower bound of what is still coming in a burst, where looking more
/// often would return from the middle of the burst.
pub(crate) async fn wait_until_every<T: Debug>(
    within: Duration,
    every: Duration,
    what: impl Display,
    mut look: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen = look().await;
        if done(&seen) {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for {what}; last saw {seen:?}"
        );
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------------------
// NATS: the server, storing events, reading what was stored.

/// A nats-server for this test with hearth's streams, created exactly as the
/// gateway creates them, and a JetStream context on it (`js.client()` is the
/// plain client). The server stops when the [`TestNats`] is dropped.
pub(crate) async fn start_nats_with_streams() -> (TestNats, jetstream::Context) {
    let nats = TestNats::start().await;
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to the test nats-server");
    let js = jetstream::new(client);
    let config = hearth_gateway::config::Config::default();
    hearth_gateway::jetstream::streams::ensure(&js, &config.storage, &config.mqtt)
        .await
        .expect("create hearth's streams");
    (nats, js)
}

/// An event of device `room/device` in the home named `home`: id `id`,
/// correlation id `corr-<id>`, the rest default.
pub(crate) fn device_event(id: &str, room: &str, device: &str, body: Body) -> v1::Event {
    v1::Event {
        id: id.into(),
        correlation_id: format!("corr-{id}"),
        home: "home".into(),
        room: room.into(),
        device: device.into(),
        body: Some(body),
        ..Default::default()
    }
}

/// Stores `event` in HEARTH_EVENTS as the gateway does: JSON, on its
/// `hearth.evt.<home>.<room>.<kind>.<device>` subject, with a
/// `Content-Type` header. Returns its stream sequence.
pub(crate) async fn publish_event(js: &jetstream::Context, event: &v1::Event) -> u64 {
    publish_event_with_headers(js, event, HeaderMap::new()).await
}

/// [`publish_event`] with more headers (`Hearth-Event-Id`, ...).
pub(crate) async fn publish_event_with_headers(
    js: &jetstream::Context,
    event: &v1::Event,
    mut headers: HeaderMap,
) -> u64 {
    let kind = event.body.as_ref().expect("an event with a body").kind();
    let subject =
        hearth_proto::subject::event_subject(&event.home, &event.room, kind, &event.device);
    headers.insert("Content-Type", Encoding::Json.content_type());
    js.publish_with_headers(subject, headers, Encoding::Json.encode(event))
        .await
        .expect("publish the event")
        .await
        .expect("HEARTH_EVENTS stores the event")
        .sequence
}

/// Every message of `stream`, oldest first (`get_raw_message` over its first
/// to last sequence).
async fn stream_messages(js: &jetstream::Context, stream: &str) -> Vec<StreamMessage> {
    let mut handle = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|error| panic!("no stream {stream}: {error}"));
    let state = handle.info().await.expect("stream info").state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = handle
            .get_raw_message(sequence)
            .await
            .unwrap_or_else(|error| panic!("{stream} message {sequence}: {error}"));
        messages.push(message);
    }
    messages
}

/// Every event of HEARTH_EVENTS, oldest first.
pub(crate) async fn stored_events(js: &jetstream::Context) -> Vec<v1::Event> {
    stream_messages(js, EVENTS)
        .await
        .iter()
        .map(|message| {
            Encoding::Json
                .decode(&message.payload)
                .expect("a JSON event")
        })
        .collect()
}

/// Every command of HEARTH_COMMANDS, oldest first.
pub(crate) async fn stored_commands(js: &jetstream::Context) -> Vec<v1::Command> {
    stream_messages(js, COMMANDS)
        .await
        .iter()
        .map(|message| {
            Encoding::Json
                .decode(&message.payload)
                .expect("a JSON command")
        })
        .collect()
}

/// Waits until the durable consumer `name` exists on HEARTH_EVENTS: a rule
/// reads only the events stored after its consumer was made, so a test
/// waits for it before storing any.
pub(crate) async fn wait_for_consumer(js: &jetstream::Context, name: &str, within: Duration) {
    wait_until(
        within,
        format!("the consumer {name} on {EVENTS}"),
        async || {
            js.get_consumer_from_stream::<consumer::pull::Config, _, _>(name, EVENTS)
                .await
                .map(drop)
                .map_err(|error| error.to_string())
        },
        Result::is_ok,
    )
    .await
    .expect("wait_until returns once it exists");
}

/// Asks the alarm panel of the home named `home` (`hearth.alarm.home`) with
/// `body`, again until it answers (it does once the security rule is up),
/// and returns the answer.
pub(crate) async fn ask_alarm_panel(
    client: &async_nats::Client,
    body: &str,
    within: Duration,
) -> async_nats::Message {
    wait_until(
        within,
        "an answer from the alarm panel on hearth.alarm.home",
        async || {
            client
                .request("hearth.alarm.home", body.to_owned().into())
                .await
        },
        Result::is_ok,
    )
    .await
    .expect("wait_until returns an answer")
}

/// An Argon2id hash (PHC string) of an alarm code, as the homes file keeps
/// them, at the lowest cost: tests run unoptimised, and the real default
/// costs ~50 ms a check even in release builds.
pub(crate) fn cheap_code_hash(code: &str) -> String {
    let params = Params::new(64, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"hearth-test-salt").unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(code.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

// ---------------------------------------------------------------------------
// The real hearth-consumers process.

/// Runs `hearth-consumers` against `url` with the homes file `homes`, no
/// HTTP listeners, warnings only in its log, then `args` (the rule, and
/// options such as `--partition`). Killed when dropped.
pub(crate) fn spawn_rules(url: &str, homes: &std::path::Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hearth-consumers"))
        .args(["--nats-url", url, "--view-listen", "127.0.0.1:0"])
        .args(["--notify-listen", "off", "--metrics-listen", "off"])
        .arg("--homes")
        .arg(homes)
        .args(args)
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-consumers")
}

// ---------------------------------------------------------------------------
// The real gateway and real MQTT clients.

/// Fails the test when the `mosquitto_pub`/`mosquitto_sub` clients are not
/// installed.
pub(crate) fn require_mosquitto_clients() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
}

/// The real gateway, in-process, storing into `nats`: anonymous MQTT clients
/// allowed, MQTT and HTTP on free ports of 127.0.0.1.
pub(crate) async fn start_gateway(nats: &TestNats) -> Gateway {
    let mut config = hearth_gateway::config::Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    Gateway::start(config).await.expect("the gateway starts")
}

/// Publishes `message` to `topic` at QoS 1 with `mosquitto_pub` on the MQTT
/// server at `mqtt`, and checks that it succeeded.
pub(crate) async fn mosquitto_pub(mqtt: SocketAddr, topic: &str, message: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", &mqtt.ip().to_string(), "-p", &mqtt.port().to_string()])
        .args(["-q", "1", "-t", topic, "-m", message])
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub to {topic}: {status}");
}

/// Starts `mosquitto_sub -v` as client `client_id`, subscribed at QoS 1 to
/// `topics` on the MQTT server at `mqtt`: it exits after `count` messages,
/// or after `timeout_secs` seconds with what it has. Killed when dropped;
/// [`mosquitto_sub_output`] reads what it heard.
pub(crate) fn spawn_mosquitto_sub(
    mqtt: SocketAddr,
    client_id: &str,
    topics: &[&str],
    count: u32,
    timeout_secs: u32,
) -> Child {
    let mut command = Command::new("mosquitto_sub");
    command
        .args(["-h", &mqtt.ip().to_string(), "-p", &mqtt.port().to_string()])
        .args(["-i", client_id, "-q", "1"]);
    for topic in topics {
        command.args(["-t", topic]);
    }
    command
        .args([
            "-v",
            "-C",
            &count.to_string(),
            "-W",
            &timeout_secs.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub")
}

/// What a [`spawn_mosquitto_sub`] printed (a `topic payload` line a message)
/// once it has exited; the test fails, saying `what` it was to hear, when it
/// does not exit within `within`.
pub(crate) async fn mosquitto_sub_output(sub: Child, within: Duration, what: &str) -> String {
    let output = tokio::time::timeout(within, sub.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: mosquitto_sub did not finish within {within:?}"))
        .expect("read mosquitto_sub's output");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until the gateway's /healthz counts `count` MQTT subscriptions, so
/// that the `mosquitto_sub`s started before are subscribed.
pub(crate) async fn wait_for_mqtt_subscriptions(gateway: &Gateway, count: usize) {
    let expected = format!("\"mqtt_subscriptions\":{count}");
    wait_until(
        PROMPTLY,
        format!("{count} MQTT subscriptions (mosquitto_sub subscribed) on /healthz"),
        async || {
            http_request(gateway.http_addr(), "GET", "/healthz")
                .await
                .body
        },
        |health| health.contains(&expected),
    )
    .await;
}

// ---------------------------------------------------------------------------
// HTTP.

/// A whole HTTP/1.1 response as it came over the socket.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    /// The status code.
    pub(crate) status: u16,
    /// The status line and the headers, without the blank line.
    pub(crate) head: String,
    /// What came after the blank line, as it came.
    pub(crate) body: String,
}

/// `method target` with an empty body over a TCP connection of its own
/// (`Connection: close`): what a plain client sees, headers included.
pub(crate) async fn http_request(addr: SocketAddr, method: &str, target: &str) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|error| panic!("connect to {addr}: {error}"));
    stream
        .write_all(
            format!(
                "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send the request");
    let mut response = String::new();
    tokio::time::timeout(PROMPTLY, stream.read_to_string(&mut response))
        .await
        .unwrap_or_else(|_| panic!("no response to {method} {target} within {PROMPTLY:?}"))
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a whole response: {response}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    HttpResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}
