//! The whole house, for real: the gateway, `hearth-consumers all` as its
//! own process, MQTT devices (`mosquitto_pub`/`_sub`: a keypad, a door
//! contact, a siren) and a webhook receiver. A break-in while armed away
//! goes pending, triggers after the entry delay, sounds the siren over MQTT
//! and calls the webhook with a critical notification, once.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_test_support::TestNats;

/// Longer than `common::PROMPTLY`: a whole process starts and acts.
const PROMPTLY: Duration = Duration::from_secs(20);

type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// A webhook receiver on a free port: every JSON body POSTed to /hook.
async fn webhook() -> (SocketAddr, Received) {
    let received: Received = Arc::default();
    let store = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let store = Arc::clone(&store);
            async move {
                store.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

fn homes_file(dir: &Path, hook: SocketAddr) -> std::path::PathBuf {
    let hash = common::cheap_code_hash("1234");
    let path = dir.join("homes.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[homes.home.security]
codes = [{{ name = "alice", hash = "{hash}" }}]
sirens = ["hall/siren"]
[homes.home.security.away]
arming_time = "0s"
delay_time = "1s"
trigger_time = "1h"
[homes.home.security.zones."hall/door"]
type = "entry"
[homes.home.notify]
[[homes.home.notify.recipients]]
name = "alice"
[[homes.home.notify.recipients.channels]]
name = "hook"
kind = "webhook"
url = "http://{hook}/hook"
"#
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn a_break_in_sounds_the_siren_over_mqtt_and_calls_the_webhook_once() {
    common::require_mosquitto_clients();
    let nats = TestNats::start().await;
    let gateway = common::start_gateway(&nats).await;
    let mqtt = gateway.mqtt_addr();
    let (hook, received) = webhook().await;
    let dir = tempfile::tempdir().unwrap();
    let homes = homes_file(dir.path(), hook);
    let mut rules = common::spawn_rules(&nats.url(), &homes, &["all"]);

    // The rules are up once the panel answers (the consumers exist by then
    // or moments later; the keypad's request below waits for them).
    let client = async_nats::connect(nats.url()).await.unwrap();
    common::ask_alarm_panel(&client, "status", PROMPTLY).await;
    let js = async_nats::jetstream::new(client.clone());
    for consumer in ["hearth-security", "hearth-notify"] {
        common::wait_for_consumer(&js, consumer, PROMPTLY).await;
    }

    let siren = common::spawn_mosquitto_sub(mqtt, "siren", &["hearth/home/hall/siren/set"], 1, 30);
    let keypad = common::spawn_mosquitto_sub(mqtt, "keypad", &["hearth/home/alarm/state"], 4, 30);
    tokio::time::sleep(Duration::from_millis(500)).await;

    common::mosquitto_pub(
        mqtt,
        "hearth/home/alarm/set",
        r#"{"action":"arm_away","code":"1234"}"#,
    )
    .await;
    common::wait_until(
        PROMPTLY,
        "the alarm armed away",
        async || {
            let reply = client
                .request("hearth.alarm.home", "status".into())
                .await
                .unwrap();
            String::from_utf8_lossy(&reply.payload).into_owned()
        },
        |status| status.contains("armed_away"),
    )
    .await;
    common::mosquitto_pub(mqtt, "hearth/home/hall/door/contact", r#"{"open":true}"#).await;

    let text =
        common::mosquitto_sub_output(siren, PROMPTLY, "the siren is commanded over MQTT").await;
    assert!(text.starts_with("hearth/home/hall/siren/set {"), "{text}");
    assert!(text.contains(r#""on":true"#), "{text}");

    common::wait_until(
        PROMPTLY,
        "the webhook to be called",
        async || received.lock().unwrap().len(),
        |calls| *calls > 0,
    )
    .await;
    // Nothing more comes (no second call for the same break-in).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = received.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let call = &calls[0];
    assert_eq!(call["severity"], "critical", "{call}");
    assert_eq!(call["category"], "alarm_triggered", "{call}");
    assert_eq!(call["recipient"], "alice", "{call}");
    assert!(
        call["message"].as_str().unwrap().contains("hall/door"),
        "{call}"
    );

    // The keypad saw the whole story on the retained state topic.
    let output = common::mosquitto_sub_output(keypad, PROMPTLY, "the keypad saw four states").await;
    rules.kill().await.unwrap();
    gateway.shutdown().await;
    let states: Vec<String> = output
        .lines()
        .filter_map(|line| {
            line.strip_prefix("hearth/home/alarm/state ")
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(states, ["disarmed", "armed_away", "pending", "triggered"]);
}
