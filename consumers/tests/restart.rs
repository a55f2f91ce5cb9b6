//! The real `hearth-consumers all` process killed (SIGKILL, no chance to
//! tidy up) in the middle of a scenario and started again: no action is
//! lost and none is repeated. The entry delay and the lights' off time run
//! out while it is down.

mod common;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use hearth_proto::v1::{self, event::Body};

/// Longer than `common::PROMPTLY`: a whole process starts (twice) and acts.
const PROMPTLY: Duration = Duration::from_secs(15);

fn homes_file(dir: &Path) -> std::path::PathBuf {
    let hash = common::cheap_code_hash("1234");
    let path = dir.join("homes.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[homes.home.rooms.hall]
lights = ["ceiling"]
off_after = "2s"
[homes.home.rooms.kitchen]
lights = ["spots"]
off_after = "1h"
[homes.home.security]
codes = [{{ name = "alice", hash = "{hash}" }}]
sirens = ["hall/siren"]
[homes.home.security.away]
arming_time = "0s"
delay_time = "2s"
trigger_time = "1h"
[homes.home.security.zones."hall/door"]
type = "entry"
"#
        ),
    )
    .unwrap();
    path
}

fn spawn(url: &str, homes: &Path) -> tokio::process::Child {
    common::spawn_rules(url, homes, &["all"])
}

async fn publish(js: &jetstream::Context, id: &str, room: &str, device: &str, body: Body) {
    common::publish_event(js, &common::device_event(id, room, device, body)).await;
}

fn motion(detected: bool) -> Body {
    Body::Motion(v1::Motion { detected })
}

/// What the rules did: alarm states, and commands as `device=on|off`.
async fn actions(js: &jetstream::Context) -> (Vec<i32>, Vec<String>) {
    let states = common::stored_events(js)
        .await
        .into_iter()
        .filter_map(|event| match event.body {
            Some(Body::AlarmState(state)) => Some(state.state),
            _ => None,
        })
        .collect();
    let commands = common::stored_commands(js)
        .await
        .into_iter()
        .filter_map(|command| {
            let on = match command.body {
                Some(v1::command::Body::LightSet(set)) => set.on,
                Some(v1::command::Body::SirenSet(set)) => set.on,
                _ => return None,
            };
            Some(format!(
                "{}={}",
                command.device,
                if on { "on" } else { "off" }
            ))
        })
        .collect();
    (states, commands)
}

/// Waits until the rules did at least `states` alarm states and `commands`
/// commands; returns all they did. Looks every 100 ms: the commands after
/// the restart come in a burst, which the test compares with what is there
/// a little later.
async fn wait_for(
    js: &jetstream::Context,
    states: usize,
    commands: usize,
) -> (Vec<i32>, Vec<String>) {
    common::wait_until_every(
        PROMPTLY,
        Duration::from_millis(100),
        format!("{states} alarm states and {commands} commands"),
        async || actions(js).await,
        |found| found.0.len() >= states && found.1.len() >= commands,
    )
    .await
}

#[tokio::test]
async fn a_killed_rule_process_loses_and_repeats_nothing() {
    let (nats, js) = common::start_nats_with_streams().await;
    let client = js.client();
    let dir = tempfile::tempdir().unwrap();
    let homes = homes_file(dir.path());
    let mut rules = spawn(&nats.url(), &homes);

    // Armed (no exit delay) once the panel answers.
    let answer =
        common::ask_alarm_panel(&client, r#"{"action":"arm_away","code":"1234"}"#, PROMPTLY).await;
    let text = String::from_utf8_lossy(&answer.payload).to_string();
    assert!(text.contains(r#""ok":true"#), "{text}");
    let armed = v1::AlarmStatus::ArmedAway as i32;
    wait_for(&js, 1, 0).await;
    // The rules' consumers are there before their events.
    for consumer in ["hearth-lights", "hearth-security"] {
        common::wait_for_consumer(&js, consumer, PROMPTLY).await;
    }
    publish(&js, "m1", "hall", "pir", motion(true)).await;
    publish(&js, "m1c", "hall", "pir", motion(false)).await;
    publish(
        &js,
        "d1",
        "hall",
        "door",
        Body::Contact(v1::Contact { open: true }),
    )
    .await;
    let (states, commands) = wait_for(&js, 2, 1).await;
    assert_eq!(states, [armed, v1::AlarmStatus::Pending as i32]);
    assert_eq!(commands, ["ceiling=on"]);

    // Killed within the entry delay and the lights' off time.
    rules.kill().await.unwrap();
    publish(&js, "m2", "kitchen", "pir", motion(true)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let while_down = actions(&js).await;
    assert_eq!(
        while_down.1,
        ["ceiling=on"],
        "nothing acts while it is down"
    );

    let mut rules = spawn(&nats.url(), &homes);
    // Until every device ends as it should: the alarm turns every light
    // on, and the hall's off time may come before or after it (either
    // order is right).
    let lit = [("ceiling", "on"), ("siren", "on"), ("spots", "on")];
    // Events the killed process held unacknowledged (handled, the
    // acknowledgement not yet at the server) come back only after the ack
    // wait, and the rule takes them first: up to that much more.
    let ack_wait = hearth_consumers::lights::spec()
        .ack_wait
        .max(hearth_consumers::security::spec().ack_wait);
    let deadline = tokio::time::Instant::now() + ack_wait + PROMPTLY;
    loop {
        let (states, commands) = actions(&js).await;
        if states.len() >= 3 && last_of_each(&commands) == lit {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached the end: {states:?} {commands:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer: anything repeated would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (states, commands) = actions(&js).await;
    assert_eq!(
        states,
        [
            armed,
            v1::AlarmStatus::Pending as i32,
            v1::AlarmStatus::Triggered as i32
        ],
        "each alarm state once"
    );
    // No device is ever told the same thing twice in a row.
    let mut last = std::collections::BTreeMap::new();
    for command in &commands {
        let (device, value) = command.split_once('=').unwrap();
        assert_ne!(
            last.insert(device, value),
            Some(value),
            "repeated: {commands:?}"
        );
    }
    assert_eq!(last_of_each(&commands), lit, "{commands:?}");
    rules.kill().await.unwrap();
}

/// Each device's last command, by device.
fn last_of_each(commands: &[String]) -> Vec<(&str, &str)> {
    let mut last = std::collections::BTreeMap::new();
    for command in commands {
        if let Some((device, value)) = command.split_once('=') {
            last.insert(device, value);
        }
    }
    last.into_iter().collect()
}
