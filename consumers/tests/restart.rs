//! The real `hearth-consumers all` process killed (SIGKILL, no chance to
//! tidy up) in the middle of a scenario and started again: no action is
//! lost and none is repeated. The entry delay and the lights' off time run
//! out while it is down.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use async_nats::jetstream;
use hearth_proto::v1::{self, event::Body};
use hearth_proto::Encoding;
use hearth_test_support::TestNats;

const PROMPTLY: Duration = Duration::from_secs(15);

fn homes_file(dir: &Path) -> std::path::PathBuf {
    let params = Params::new(64, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"hearth-test-salt").unwrap();
    let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(b"1234", &salt)
        .unwrap()
        .to_string();
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
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth-consumers"))
        .args([
            "--nats-url",
            url,
            "--view-listen",
            "127.0.0.1:0",
            "--notify-listen",
            "off",
        ])
        .arg("--homes")
        .arg(homes)
        .arg("all")
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-consumers")
}

async fn publish(js: &jetstream::Context, id: &str, room: &str, device: &str, body: Body) {
    let kind = body.kind();
    let event = v1::Event {
        id: id.into(),
        correlation_id: format!("corr-{id}"),
        home: "home".into(),
        room: room.into(),
        device: device.into(),
        body: Some(body),
        ..Default::default()
    };
    let subject = hearth_proto::subject::event_subject("home", room, kind, device);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", Encoding::Json.content_type());
    js.publish_with_headers(subject, headers, Encoding::Json.encode(&event))
        .await
        .unwrap()
        .await
        .unwrap();
}

/// What the rules did: alarm states, and commands as `device=on|off`.
async fn actions(js: &jetstream::Context) -> (Vec<i32>, Vec<String>) {
    let mut states = Vec::new();
    let mut stream = js.get_stream("HEARTH_EVENTS").await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    for sequence in info.first_sequence..=info.last_sequence {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let event: v1::Event = Encoding::Json.decode(&message.payload).unwrap();
        if let Some(Body::AlarmState(state)) = event.body {
            states.push(state.state);
        }
    }
    let mut commands = Vec::new();
    let mut stream = js.get_stream("HEARTH_COMMANDS").await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    if info.messages > 0 {
        for sequence in info.first_sequence..=info.last_sequence {
            let message = stream.get_raw_message(sequence).await.unwrap();
            let command: v1::Command = Encoding::Json.decode(&message.payload).unwrap();
            let on = match command.body {
                Some(v1::command::Body::LightSet(set)) => set.on,
                Some(v1::command::Body::SirenSet(set)) => set.on,
                _ => continue,
            };
            commands.push(format!(
                "{}={}",
                command.device,
                if on { "on" } else { "off" }
            ));
        }
    }
    (states, commands)
}

async fn wait_for(
    js: &jetstream::Context,
    states: usize,
    commands: usize,
) -> (Vec<i32>, Vec<String>) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let found = actions(js).await;
        if found.0.len() >= states && found.1.len() >= commands {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {states} alarm states and {commands} commands, got {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_rule_process_loses_and_repeats_nothing() {
    let nats = TestNats::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let config = hearth_gateway::config::Config::default();
    hearth_gateway::jetstream::streams::ensure(&js, &config.storage, &config.mqtt)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let homes = homes_file(dir.path());
    let mut rules = spawn(&nats.url(), &homes);

    // Armed (no exit delay) once the panel answers.
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let answer = client
            .request(
                "hearth.alarm.home",
                r#"{"action":"arm_away","code":"1234"}"#.into(),
            )
            .await;
        if let Ok(message) = answer {
            let text = String::from_utf8_lossy(&message.payload).to_string();
            assert!(text.contains(r#""ok":true"#), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the panel never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let armed = v1::AlarmStatus::ArmedAway as i32;
    wait_for(&js, 1, 0).await;
    // The rules' consumers are there before their events.
    for consumer in ["hearth-lights", "hearth-security"] {
        let deadline = tokio::time::Instant::now() + PROMPTLY;
        while js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                consumer,
                "HEARTH_EVENTS",
            )
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no consumer {consumer}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    publish(
        &js,
        "m1",
        "hall",
        "pir",
        Body::Motion(v1::Motion { detected: true }),
    )
    .await;
    publish(
        &js,
        "m1c",
        "hall",
        "pir",
        Body::Motion(v1::Motion { detected: false }),
    )
    .await;
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
    publish(
        &js,
        "m2",
        "kitchen",
        "pir",
        Body::Motion(v1::Motion { detected: true }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let while_down = actions(&js).await;
    assert_eq!(
        while_down.1,
        ["ceiling=on"],
        "nothing acts while it is down"
    );

    let mut rules = spawn(&nats.url(), &homes);
    let (states, commands) = wait_for(&js, 3, 3).await;
    // A little longer: anything repeated would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = actions(&js).await;
    assert_eq!(again.0, states, "no alarm state repeated");
    assert_eq!(
        again.1.len(),
        commands.len(),
        "no command repeated: {:?}",
        again.1
    );
    assert_eq!(
        states,
        [
            armed,
            v1::AlarmStatus::Pending as i32,
            v1::AlarmStatus::Triggered as i32
        ]
    );
    // The alarm turns every light on and the hall's off time may come
    // before or after it: either order is right, but no device is ever told
    // the same thing twice in a row, and all ends lit.
    let mut last = std::collections::BTreeMap::new();
    for command in &commands {
        let (device, value) = command.split_once('=').unwrap();
        assert_ne!(
            last.insert(device, value),
            Some(value),
            "repeated: {commands:?}"
        );
    }
    assert_eq!(
        last.into_iter().collect::<Vec<_>>(),
        [("ceiling", "on"), ("siren", "on"), ("spots", "on")],
        "{commands:?}"
    );
    rules.kill().await.unwrap();
}
