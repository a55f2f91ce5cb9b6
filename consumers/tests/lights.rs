//! The lights rule with a real nats-server: motion in a dark room turns
//! the lights on and, after the room's delay, off; a bright room stays as it
//! is; lights already on are not commanded again; an off time that came
//! while the rule was down fires when it is back.

mod common;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use common::PROMPTLY;
use hearth_consumers::clock::Clock;
use hearth_consumers::commands::Commands;
use hearth_consumers::homes::Homes;
use hearth_consumers::lights::{self, Lights};
use hearth_consumers::runtime;
use hearth_proto::v1::{self, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;
use tokio_util::sync::CancellationToken;

fn homes(off_after: &str) -> Homes {
    Homes::parse(
        Path::new("homes.toml"),
        &format!(
            "[homes.home.rooms.hall]\nlights = [\"ceiling\", \"lamp\"]\nlux_below = 30\noff_after = \"{off_after}\"\n"
        ),
    )
    .unwrap()
}

/// Starts the rule (consumer and off timer); returns what stops it.
async fn start(
    js: &jetstream::Context,
    homes: Homes,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    start_on(js, homes, Clock::system()).await
}

/// The same on a clock the test moves.
async fn start_on(
    js: &jetstream::Context,
    homes: Homes,
    clock: Clock,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let lights = Lights::open(js, homes, Commands::new(js.clone(), Encoding::Json))
        .await
        .expect("open the lights state")
        .with_clock(clock);
    let shutdown = CancellationToken::new();
    let timers = tokio::spawn(lights.clone().run_timers(shutdown.clone()));
    let js_for_run = js.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        runtime::run_batches(
            &js_for_run,
            &lights::spec(),
            move |events| {
                let lights = lights.clone();
                async move { lights.handle_batch(events).await }
            },
            stop,
        )
        .await
        .expect("the rule runs");
        let _ = timers.await;
    });
    common::wait_for_consumer(js, lights::CONSUMER, PROMPTLY).await;
    (shutdown, task)
}

/// Stores an event of device `device` in the hall.
async fn event(js: &jetstream::Context, id: &str, device: &str, body: Body) {
    common::publish_event(js, &common::device_event(id, "hall", device, body)).await;
}

fn light_state(on: bool) -> Body {
    Body::Light(v1::LightState {
        on,
        brightness_pct: None,
    })
}

fn motion(detected: bool) -> Body {
    Body::Motion(v1::Motion { detected })
}

fn lux(lux: f64) -> Body {
    Body::Illuminance(v1::Illuminance { lux })
}

/// Every light command stored so far: (device, on, causation id).
async fn commands(js: &jetstream::Context) -> Vec<(String, bool, String)> {
    common::stored_commands(js)
        .await
        .into_iter()
        .filter_map(|command| match command.body {
            Some(v1::command::Body::LightSet(set)) => {
                Some((command.device, set.on, command.causation_id))
            }
            _ => None,
        })
        .collect()
}

/// Waits until at least `count` light commands are stored; returns them all.
async fn wait_for_commands(js: &jetstream::Context, count: usize) -> Vec<(String, bool, String)> {
    common::wait_until(
        PROMPTLY,
        format!("{count} light commands"),
        async || commands(js).await,
        |found| found.len() >= count,
    )
    .await
}

#[tokio::test]
async fn motion_in_a_dark_room_turns_the_lights_on_then_off_after_the_delay() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let (stop, task) = start(&js, homes("1s")).await;
    event(&js, "m1", "pir", motion(true)).await;
    let on = wait_for_commands(&js, 2).await;
    assert_eq!(
        on,
        [
            ("ceiling".to_owned(), true, "m1".to_owned()),
            ("lamp".to_owned(), true, "m1".to_owned())
        ]
    );
    // Motion again restarts the delay, and commands nothing new.
    event(&js, "m2", "pir", motion(false)).await;
    let all = wait_for_commands(&js, 4).await;
    assert_eq!(
        all[2..],
        [
            ("ceiling".to_owned(), false, "m2".to_owned()),
            ("lamp".to_owned(), false, "m2".to_owned())
        ],
        "off after the delay, caused by the last motion"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(commands(&js).await.len(), 4, "nothing more");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_bright_room_stays_as_it_is_and_lights_already_on_are_left_alone() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let (stop, task) = start(&js, homes("1h")).await;
    event(&js, "lux1", "sensor", lux(500.0)).await;
    event(&js, "m1", "pir", motion(true)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(commands(&js).await.is_empty(), "bright: nothing to do");

    event(&js, "lux2", "sensor", lux(5.0)).await;
    event(&js, "m2", "pir", motion(true)).await;
    wait_for_commands(&js, 2).await;
    // The lights confirm; the room gets bright from them; motion again.
    for light in ["ceiling", "lamp"] {
        event(&js, &format!("{light}-on"), light, light_state(true)).await;
    }
    event(&js, "lux3", "sensor", lux(400.0)).await;
    event(&js, "m3", "pir", motion(true)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        commands(&js).await.len(),
        2,
        "on already: not commanded again, and brightness turns nothing off"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_light_switched_by_hand_leaves_the_room_alone_for_a_while() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let homes = Homes::parse(
        Path::new("homes.toml"),
        "[homes.home.rooms.hall]\nlights = [\"ceiling\"]\noff_after = \"1h\"\noverride_for = \"1500ms\"\n",
    )
    .unwrap();
    let (stop, task) = start(&js, homes).await;
    event(&js, "m1", "pir", motion(true)).await;
    wait_for_commands(&js, 1).await;
    // Someone switches it off by hand: not what the rule asked for.
    event(&js, "by-hand", "ceiling", light_state(false)).await;
    event(&js, "m2", "pir", motion(true)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        commands(&js).await.len(),
        1,
        "left alone after a manual switch"
    );
    // Once the override has run out, motion works again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    event(&js, "m3", "pir", motion(true)).await;
    let all = wait_for_commands(&js, 2).await;
    assert_eq!(all[1], ("ceiling".to_owned(), true, "m3".to_owned()));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn an_off_time_that_came_while_the_rule_was_down_fires_when_it_is_back() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let (stop, task) = start(&js, homes("2s")).await;
    event(&js, "m1", "pir", motion(true)).await;
    wait_for_commands(&js, 2).await;
    event(&js, "m1-clear", "pir", motion(false)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Down before the delay runs out...
    stop.cancel();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        commands(&js).await.len(),
        2,
        "nobody turned them off meanwhile"
    );
    // ...and back after it: the lights go off at once.
    let (stop, task) = start(&js, homes("2s")).await;
    let all = wait_for_commands(&js, 4).await;
    assert!(
        all[2..]
            .iter()
            .all(|(_, on, cause)| !on && cause == "m1-clear"),
        "{all:?}"
    );
    stop.cancel();
    task.await.unwrap();
}

/// A command that cannot be stored puts the room back as it was and the
/// events are tried again: once it can, the lights are commanded once each
/// and the room is stored as lit.
#[tokio::test]
async fn a_command_that_cannot_be_stored_leaves_the_room_as_it_was_until_tried_again() {
    let (_nats, js) = common::start_nats_with_streams().await;
    js.delete_stream("HEARTH_COMMANDS")
        .await
        .expect("no commands stream");
    let (stop, task) = start(&js, homes("1h")).await;
    event(&js, "l1", "lux", lux(5.0)).await;
    event(&js, "m1", "pir", motion(true)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = js.get_key_value(lights::BUCKET).await.unwrap();
    assert_eq!(
        state.get(lights::key("home", "hall")).await.unwrap(),
        None,
        "not stored as commanded while the command is not"
    );
    let config = hearth_gateway::config::Config::default();
    hearth_gateway::jetstream::streams::ensure(&js, &config.storage, &config.mqtt)
        .await
        .unwrap();
    let on = wait_for_commands(&js, 2).await;
    assert_eq!(
        on,
        [
            ("ceiling".to_owned(), true, "m1".to_owned()),
            ("lamp".to_owned(), true, "m1".to_owned())
        ]
    );
    let stored = common::wait_until(
        PROMPTLY,
        "the room stored as lit",
        async || state.get(lights::key("home", "hall")).await.unwrap(),
        Option::is_some,
    )
    .await
    .unwrap();
    let room: lights::RoomState = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        room.lights.values().copied().collect::<Vec<_>>(),
        [true, true]
    );
    assert_eq!(room.lux, Some(5.0), "the reading before it kept");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(commands(&js).await.len(), 2, "commanded once");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_room_still_occupied_keeps_its_lights_until_the_sensor_clears() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let clock = Clock::system();
    let homes = Homes::parse(
        Path::new("homes.toml"),
        "[homes.home.rooms.hall]\nlights = [\"ceiling\"]\noff_after = \"5m\"\noccupied_max = \"2h\"\n",
    )
    .unwrap();
    let (stop, task) = start_on(&js, homes, clock.clone()).await;
    // A presence sensor: "occupied" once, nothing while someone stays.
    event(&js, "m1", "presence", motion(true)).await;
    wait_for_commands(&js, 1).await;
    clock.advance(Duration::from_secs(30 * 60));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        commands(&js).await.len(),
        1,
        "occupied: still on after 30 min"
    );
    // It clears: off the room's delay later.
    event(&js, "m2", "presence", motion(false)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    clock.advance(Duration::from_secs(4 * 60));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(commands(&js).await.len(), 1, "not before the delay");
    clock.advance(Duration::from_secs(61));
    let all = wait_for_commands(&js, 2).await;
    assert_eq!(all[1], ("ceiling".to_owned(), false, "m2".to_owned()));
    // A sensor that never clears keeps them on at most occupied_max.
    event(&js, "m3", "presence", motion(true)).await;
    wait_for_commands(&js, 3).await;
    clock.advance(Duration::from_secs(60 * 60));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(commands(&js).await.len(), 3, "within occupied_max");
    clock.advance(Duration::from_secs(61 * 60));
    let all = wait_for_commands(&js, 4).await;
    assert_eq!(all[3], ("ceiling".to_owned(), false, "m3".to_owned()));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn at_night_motion_lights_even_a_bright_room_at_night_brightness() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let clock = Clock::system();
    // Night from two to four hours from now (UTC), whatever the hour.
    let hour = |ahead: u64| {
        let ms = clock.now_ms() + ahead * 3_600_000;
        format!("{:02}:00", (ms / 3_600_000) % 24)
    };
    let homes = Homes::parse(
        Path::new("homes.toml"),
        &format!(
            "[homes.home]\ntimezone = \"UTC\"\nnight = \"{}-{}\"\n[homes.home.rooms.hall]\nlights = [\"ceiling\"]\nnight_brightness = 20\n",
            hour(2),
            hour(4)
        ),
    )
    .unwrap();
    let (stop, task) = start_on(&js, homes, clock.clone()).await;
    event(&js, "lux", "sensor", lux(900.0)).await;
    event(&js, "m1", "pir", motion(true)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(commands(&js).await.is_empty(), "bright by day: nothing");
    clock.advance(Duration::from_secs(3 * 3600));
    event(&js, "m2", "pir", motion(true)).await;
    wait_for_commands(&js, 1).await;
    assert_eq!(brightness(&js).await, [Some(20)]);
    stop.cancel();
    task.await.unwrap();
}

/// The brightness of every light command stored so far.
async fn brightness(js: &jetstream::Context) -> Vec<Option<u32>> {
    common::stored_commands(js)
        .await
        .into_iter()
        .filter_map(|command| match command.body {
            Some(v1::command::Body::LightSet(set)) => Some(set.brightness_pct),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn every_light_of_the_home_goes_on_when_the_alarm_triggers() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let homes = Homes::parse(
        Path::new("homes.toml"),
        "[homes.home.rooms.hall]\nlights = [\"ceiling\"]\n[homes.home.rooms.garden]\nlights = [\"flood\"]\n",
    )
    .unwrap();
    let (stop, task) = start(&js, homes).await;
    // Bright, and switched by hand: neither matters to the alarm.
    event(&js, "lux", "sensor", lux(900.0)).await;
    event(&js, "by-hand", "ceiling", light_state(false)).await;
    let alarm = v1::Event {
        id: "alarm-1".into(),
        correlation_id: "corr-door".into(),
        home: "home".into(),
        room: "_home".into(),
        device: "alarm".into(),
        body: Some(Body::AlarmState(v1::AlarmState {
            state: v1::AlarmStatus::Triggered.into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    // Stored on hearth.evt.home._home.alarm_state.alarm.
    common::publish_event(&js, &alarm).await;
    let mut all = wait_for_commands(&js, 2).await;
    all.sort();
    assert_eq!(brightness(&js).await, [Some(100), Some(100)]);
    assert_eq!(
        all,
        [
            ("ceiling".to_owned(), true, "alarm-1".to_owned()),
            ("flood".to_owned(), true, "alarm-1".to_owned())
        ]
    );
    stop.cancel();
    task.await.unwrap();
}

/// Device to gateway to rule to gateway to device: a real `mosquitto_pub`
/// motion sensor and a real `mosquitto_sub` light.
#[tokio::test]
async fn end_to_end_a_motion_sensor_over_mqtt_switches_a_light_over_mqtt() {
    common::require_mosquitto_clients();
    let nats = TestNats::start().await;
    let gateway = common::start_gateway(&nats).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let (stop, task) = start(&js, homes("1h")).await;

    let mqtt = gateway.mqtt_addr();
    let light = common::spawn_mosquitto_sub(mqtt, "ceiling", &["hearth/home/hall/+/set"], 2, 20);
    common::wait_for_mqtt_subscriptions(&gateway, 1).await;
    common::mosquitto_pub(mqtt, "hearth/home/hall/pir/motion", r#"{"detected":true}"#).await;
    let text =
        common::mosquitto_sub_output(light, Duration::from_secs(30), "both lights commanded").await;
    for device in ["ceiling", "lamp"] {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("hearth/home/hall/{device}/set ")))
            .unwrap_or_else(|| panic!("no command for {device}: {text}"));
        assert!(line.contains(r#""on":true"#), "{line}");
    }
    stop.cancel();
    task.await.unwrap();
    gateway.shutdown().await;
}
