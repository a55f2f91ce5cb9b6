//! The security rule with a real nats-server (and, end to end, the real
//! gateway and MQTT clients): arming with a code over NATS and MQTT, the
//! entry delay, triggering with sirens and a critical notification
//! request, disarming in time, 24-hour zones, wrong codes and lockout,
//! restarts, and redelivery never acting twice. Delays run on an adjusted
//! clock, so minutes take milliseconds.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::{device_event, publish_event, PROMPTLY};
use hearth_consumers::clock::Clock;
use hearth_consumers::commands::Commands;
use hearth_consumers::events::Events;
use hearth_consumers::homes::Homes;
use hearth_consumers::runtime::{self, Received};
use hearth_consumers::security::panel::{self, Reply};
use hearth_consumers::security::{self, Security};
use hearth_proto::v1::{self, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use tokio_util::sync::CancellationToken;

/// A nats-server with hearth's streams; JetStream and the plain client.
async fn setup() -> (TestNats, jetstream::Context, async_nats::Client) {
    let (nats, js) = common::start_nats_with_streams().await;
    let client = js.client();
    (nats, js, client)
}

fn homes(extra: &str) -> Arc<Homes> {
    let text = format!(
        r#"
        [homes.home.security]
        codes = [{{ name = "alice", hash = "{}" }}]
        sirens = ["hall/siren", "attic/siren"]
        max_code_attempts = 3
        lockout = "5m"
        {extra}
        [homes.home.security.away]
        arming_time = "60s"
        delay_time = "30s"
        trigger_time = "120s"
        [homes.home.security.zones."hall/door"]
        type = "entry"
        [homes.home.security.zones."kitchen/window"]
        type = "perimeter"
        [homes.home.security.zones."kitchen/smoke"]
        type = "24h"
        "#,
        common::cheap_code_hash("1234")
    );
    Arc::new(Homes::parse(Path::new("homes.toml"), &text).unwrap())
}

async fn open(
    js: &jetstream::Context,
    client: &async_nats::Client,
    homes: Arc<Homes>,
    clock: &Clock,
) -> Security {
    let events = Events::new(
        js.clone(),
        Encoding::Json,
        security::CONSUMER,
        clock.clone(),
    );
    Security::open(
        js,
        client.clone(),
        homes,
        events,
        Commands::new(js.clone(), Encoding::Json),
        clock.clone(),
        "hearth",
    )
    .await
    .expect("open the security state")
}

/// Starts the rule (consumer, delays, panel); returns what stops it.
async fn start(
    js: &jetstream::Context,
    client: &async_nats::Client,
    homes: Arc<Homes>,
    clock: &Clock,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let security = open(js, client, homes, clock).await;
    let shutdown = CancellationToken::new();
    let timers = tokio::spawn(security.clone().run_timers(shutdown.clone()));
    let panel = tokio::spawn(panel::serve(security.clone(), shutdown.clone()));
    let js_for_run = js.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        runtime::run(
            &js_for_run,
            &security::spec(),
            move |received| {
                let security = security.clone();
                async move { security.handle(received).await }
            },
            stop,
        )
        .await
        .expect("the rule runs");
        let _ = timers.await;
        panel.await.unwrap().expect("the panel serves");
    });
    common::wait_for_consumer(js, security::CONSUMER, PROMPTLY).await;
    // The panel answers once subscribed.
    request(client, r#"{"action":"status"}"#).await;
    (shutdown, task)
}

/// The panel's reply to `body`, asked again until it answers.
async fn request(client: &async_nats::Client, body: &str) -> Reply {
    let answer = common::ask_alarm_panel(client, body, PROMPTLY).await;
    serde_json::from_slice(&answer.payload).unwrap()
}

fn door(open: bool) -> Body {
    Body::Contact(v1::Contact { open })
}

/// The alarm states stored so far, as names (`pending`, ...).
async fn states(js: &jetstream::Context) -> Vec<String> {
    common::stored_events(js)
        .await
        .into_iter()
        .filter_map(|event| match event.body {
            Some(Body::AlarmState(state)) => Some(
                v1::AlarmStatus::try_from(state.state)
                    .unwrap()
                    .as_str_name()
                    .trim_start_matches("ALARM_STATUS_")
                    .to_ascii_lowercase(),
            ),
            _ => None,
        })
        .collect()
}

/// Waits until the alarm states stored are exactly `expected`; fails at
/// once when there are more.
async fn wait_for_states(js: &jetstream::Context, expected: &[&str]) {
    common::wait_until(
        PROMPTLY,
        format!("the alarm states {expected:?}"),
        async || states(js).await,
        |found| {
            assert!(
                found.len() <= expected.len(),
                "expected alarm states {expected:?}, got {found:?}"
            );
            found == expected
        },
    )
    .await;
}

/// Siren commands stored so far: (device, on, causation id, correlation id).
async fn sirens(js: &jetstream::Context) -> Vec<(String, bool, String, String)> {
    common::stored_commands(js)
        .await
        .into_iter()
        .filter_map(|command| match command.body {
            Some(v1::command::Body::SirenSet(set)) => Some((
                format!("{}/{}", command.room, command.device),
                set.on,
                command.causation_id,
                command.correlation_id,
            )),
            _ => None,
        })
        .collect()
}

async fn notifications(js: &jetstream::Context) -> Vec<v1::Notification> {
    common::stored_events(js)
        .await
        .into_iter()
        .filter_map(|event| match event.body {
            Some(Body::Notification(notification)) => Some(notification),
            _ => None,
        })
        .collect()
}

/// Arms away over NATS and lets the exit delay pass.
async fn arm_away(js: &jetstream::Context, client: &async_nats::Client, clock: &Clock) {
    let reply = request(client, r#"{"action":"arm_away","code":"1234"}"#).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.state.as_deref(), Some("arming"));
    assert_eq!(reply.mode.as_deref(), Some("away"));
    wait_for_states(js, &["arming"]).await;
    clock.advance(Duration::from_secs(61));
    wait_for_states(js, &["arming", "armed_away"]).await;
}

#[tokio::test]
async fn a_door_opened_while_armed_away_is_pending_then_triggered_with_sirens_and_a_notification() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    arm_away(&js, &client, &clock).await;

    publish_event(&js, &device_event("door-1", "hall", "door", door(true))).await;
    wait_for_states(&js, &["arming", "armed_away", "pending"]).await;
    assert!(sirens(&js).await.is_empty(), "no siren in the entry delay");
    clock.advance(Duration::from_secs(31));
    wait_for_states(&js, &["arming", "armed_away", "pending", "triggered"]).await;
    common::wait_until(
        PROMPTLY,
        "two sirens on",
        async || sirens(&js).await,
        |sirens| sirens.len() >= 2,
    )
    .await;
    let on = sirens(&js).await;
    assert_eq!(
        on,
        [
            (
                "hall/siren".into(),
                true,
                "door-1".into(),
                "corr-door-1".into()
            ),
            (
                "attic/siren".into(),
                true,
                "door-1".into(),
                "corr-door-1".into()
            ),
        ],
        "sirens on, caused by the door"
    );
    let notes = notifications(&js).await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].severity(), v1::Severity::Critical);
    assert_eq!(notes[0].category, "alarm_triggered");
    assert!(
        notes[0].message.contains("hall/door"),
        "{}",
        notes[0].message
    );

    // The trigger time over: back to armed_away, sirens off.
    clock.advance(Duration::from_secs(121));
    wait_for_states(
        &js,
        &["arming", "armed_away", "pending", "triggered", "armed_away"],
    )
    .await;
    common::wait_until(
        PROMPTLY,
        "the sirens switched off",
        async || sirens(&js).await,
        |sirens| sirens.len() >= 4,
    )
    .await;
    assert!(sirens(&js).await[2..].iter().all(|(_, on, _, _)| !on));
    let reply = request(&client, "status").await;
    assert_eq!(reply.state.as_deref(), Some("armed_away"));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn disarming_within_the_entry_delay_leaves_nothing_to_do() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    arm_away(&js, &client, &clock).await;
    publish_event(&js, &device_event("door-1", "hall", "door", door(true))).await;
    wait_for_states(&js, &["arming", "armed_away", "pending"]).await;
    clock.advance(Duration::from_secs(10));
    let reply = request(&client, r#"{"action":"disarm","code":"1234"}"#).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.state.as_deref(), Some("disarmed"));
    clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        states(&js).await,
        ["arming", "armed_away", "pending", "disarmed"]
    );
    assert!(sirens(&js).await.is_empty());
    assert!(notifications(&js).await.is_empty());
    let disarmed = common::stored_events(&js)
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::AlarmState(state)) => Some(state),
            _ => None,
        })
        .next_back()
        .unwrap();
    assert_eq!(disarmed.user, "alice");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn smoke_while_disarmed_triggers() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    publish_event(
        &js,
        &device_event(
            "smoke-1",
            "kitchen",
            "smoke",
            Body::Smoke(v1::Smoke { detected: true }),
        ),
    )
    .await;
    wait_for_states(&js, &["triggered"]).await;
    common::wait_until(
        PROMPTLY,
        "two sirens and a notification",
        async || (sirens(&js).await, notifications(&js).await),
        |(sirens, notes)| sirens.len() >= 2 && !notes.is_empty(),
    )
    .await;
    // Disarmed again after the (disarmed) trigger time.
    clock.advance(Duration::from_secs(121));
    wait_for_states(&js, &["triggered", "disarmed"]).await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn wrong_codes_are_refused_and_lock_the_panel() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    for left in [2, 1] {
        let reply = request(&client, r#"{"action":"arm_away","code":"9999"}"#).await;
        assert!(!reply.ok);
        let error = reply.error.unwrap();
        assert!(error.contains(&format!("{left} tries left")), "{error}");
    }
    let reply = request(&client, r#"{"action":"arm_away","code":"9999"}"#).await;
    assert!(reply.error.unwrap().contains("wrong codes in a row"));
    let reply = request(&client, r#"{"action":"arm_away","code":"1234"}"#).await;
    assert!(
        reply.error.unwrap().contains("locked"),
        "the right code is refused while locked"
    );
    assert_eq!(reply.state.as_deref(), Some("disarmed"));
    let notices: Vec<String> = common::stored_events(&js)
        .await
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::AlarmNotice(notice)) => Some(notice.code),
            _ => None,
        })
        .collect();
    assert_eq!(notices, ["wrong_code", "wrong_code", "locked_out"]);
    clock.advance(Duration::from_secs(301));
    let reply = request(&client, r#"{"action":"arm_away","code":"1234"}"#).await;
    assert!(reply.ok, "{reply:?}");
    // Bad requests are answered, not dropped.
    let reply = request(&client, "ARM_SOMETHING").await;
    assert!(reply.error.unwrap().contains("unknown action"));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn open_zones_refuse_arming_and_force_bypasses_them_with_a_warning() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    publish_event(&js, &device_event("w-1", "kitchen", "window", door(true))).await;
    let refusal = common::wait_until(
        PROMPTLY,
        "arming refused",
        async || {
            let reply = request(&client, r#"{"action":"arm_away","code":"1234"}"#).await;
            if reply.ok {
                // The window event not handled yet: disarm and try again.
                request(&client, r#"{"action":"disarm","code":"1234"}"#).await;
            }
            reply
        },
        |reply| !reply.ok,
    )
    .await;
    assert!(refusal.error.unwrap().contains("kitchen/window"));
    let reply = request(
        &client,
        r#"{"action":"arm_away","code":"1234","force":true}"#,
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.bypassed, ["kitchen/window"]);
    clock.advance(Duration::from_secs(61));
    common::wait_until(
        PROMPTLY,
        "armed away",
        async || request(&client, "status").await,
        |reply| reply.state.as_deref() == Some("armed_away"),
    )
    .await;
    publish_event(&js, &device_event("w-2", "kitchen", "window", door(true))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        request(&client, "status").await.state.as_deref(),
        Some("armed_away"),
        "bypassed"
    );
    let bypassed = common::stored_events(&js).await.into_iter().any(|e| {
        matches!(e.body, Some(Body::AlarmNotice(notice)) if notice.code == "zones_bypassed" && notice.zones == ["kitchen/window"])
    });
    assert!(bypassed, "a warning event names the bypassed zone");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn an_entry_delay_that_ended_while_the_rule_was_down_triggers_once_when_it_is_back() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    arm_away(&js, &client, &clock).await;
    publish_event(&js, &device_event("door-1", "hall", "door", door(true))).await;
    wait_for_states(&js, &["arming", "armed_away", "pending"]).await;
    stop.cancel();
    task.await.unwrap();
    // Down through the entry delay and the trigger time.
    clock.advance(Duration::from_secs(500));
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    wait_for_states(
        &js,
        &["arming", "armed_away", "pending", "triggered", "armed_away"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sirens = sirens(&js).await;
    let ons = sirens.iter().filter(|s| s.1).count();
    let offs = sirens.iter().filter(|s| !s.1).count();
    assert_eq!((ons, offs), (2, 2), "{sirens:?}");
    assert_eq!(notifications(&js).await.len(), 1);
    stop.cancel();
    task.await.unwrap();
}

/// A crash after the effects were stored but before the new state was:
/// the event comes again to a rule that still has the old state. Two rule
/// instances loaded from the same bucket play the before and the after.
#[tokio::test]
async fn handling_an_event_again_with_the_old_state_stores_and_commands_nothing_new() {
    let (_nats, js, client) = setup().await;
    let clock = Clock::system();
    let homes = homes("");
    let (stop, task) = start(&js, &client, Arc::clone(&homes), &clock).await;
    arm_away(&js, &client, &clock).await;
    stop.cancel();
    task.await.unwrap();

    let first = open(&js, &client, Arc::clone(&homes), &clock).await;
    let stale = open(&js, &client, Arc::clone(&homes), &clock).await;
    let window = device_event("w-1", "kitchen", "window", door(true));
    let received = Received {
        event: window,
        subject: "hearth.evt.home.kitchen.contact.window".into(),
        stream_sequence: 1,
        attempt: 1,
    };
    first.handle(received.clone()).await.unwrap();
    let before = (
        states(&js).await,
        sirens(&js).await,
        notifications(&js).await.len(),
    );
    assert_eq!(before.0.last().map(String::as_str), Some("triggered"));
    assert_eq!(before.1.len(), 2);
    stale.handle(received).await.unwrap();
    let after = (
        states(&js).await,
        sirens(&js).await,
        notifications(&js).await.len(),
    );
    assert_eq!(before, after, "the second handling was deduplicated");
    // The same for a delay: both fire the trigger time's end.
    clock.advance(Duration::from_secs(121));
    let stop = CancellationToken::new();
    let a = tokio::spawn(first.run_timers(stop.clone()));
    let b = tokio::spawn(stale.run_timers(stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    a.await.unwrap();
    b.await.unwrap();
    let states = states(&js).await;
    assert_eq!(
        states.iter().filter(|s| *s == "triggered").count(),
        1,
        "{states:?}"
    );
    assert_eq!(states.last().map(String::as_str), Some("armed_away"));
    assert_eq!(sirens(&js).await.iter().filter(|s| !s.1).count(), 2);
}

/// Keypad, door sensor and siren are real MQTT clients of the real gateway.
#[tokio::test]
async fn end_to_end_a_keypad_arms_over_mqtt_and_a_door_sounds_the_siren_over_mqtt() {
    common::require_mosquitto_clients();
    let nats = TestNats::start().await;
    let gateway = common::start_gateway(&nats).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let clock = Clock::system();
    let (stop, task) = start(&js, &client, homes(""), &clock).await;
    let mqtt = gateway.mqtt_addr();

    // The keypad sees the state (retained), then arming.
    let keypad = common::spawn_mosquitto_sub(
        mqtt,
        "keypad",
        &["hearth/home/alarm/state", "hearth/home/alarm/result"],
        3,
        20,
    );
    let siren = common::spawn_mosquitto_sub(mqtt, "siren", &["hearth/home/hall/siren/set"], 1, 30);
    common::wait_for_mqtt_subscriptions(&gateway, 3).await;
    common::mosquitto_pub(
        mqtt,
        "hearth/home/alarm/set",
        r#"{"action":"ARM_AWAY","code":"1234"}"#,
    )
    .await;
    wait_for_states(&js, &["arming"]).await;
    let text =
        common::mosquitto_sub_output(keypad, Duration::from_secs(30), "the keypad hears back")
            .await;
    assert!(text.contains("hearth/home/alarm/state disarmed"), "{text}");
    assert!(text.contains("hearth/home/alarm/state arming"), "{text}");
    assert!(
        text.contains(r#"hearth/home/alarm/result {"ok":true,"state":"arming""#),
        "{text}"
    );
    // The code travelled, but was never stored.
    let stored = common::stored_events(&js).await;
    assert!(
        stored.iter().all(|e| !format!("{e:?}").contains("1234")),
        "the code is in HEARTH_EVENTS"
    );
    clock.advance(Duration::from_secs(61));
    wait_for_states(&js, &["arming", "armed_away"]).await;
    common::mosquitto_pub(
        mqtt,
        "hearth/home/kitchen/window/contact",
        r#"{"open":true}"#,
    )
    .await;
    let text =
        common::mosquitto_sub_output(siren, Duration::from_secs(30), "the siren is commanded")
            .await;
    assert!(text.starts_with("hearth/home/hall/siren/set {"), "{text}");
    assert!(text.contains(r#""on":true"#), "{text}");
    stop.cancel();
    task.await.unwrap();
    gateway.shutdown().await;
}
