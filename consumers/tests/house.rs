//! The whole house, for real: the gateway, `hearth-consumers all` as its
//! own process, MQTT devices (`mosquitto_pub`/`_sub`: a keypad, a door
//! contact, a siren) and a webhook receiver. A break-in while armed away
//! goes pending, triggers after the entry delay, sounds the siren over MQTT
//! and calls the webhook with a critical notification, once.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use hearth_test_support::TestNats;

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

async fn mosquitto_pub(port: &str, topic: &str, message: &str) {
    let status = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            message,
        ])
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success());
}

#[tokio::test]
async fn a_break_in_sounds_the_siren_over_mqtt_and_calls_the_webhook_once() {
    assert!(
        hearth_test_support::mosquitto_pub_available(),
        "mosquitto_pub is missing: scripts/setup.sh installs mosquitto-clients"
    );
    let nats = TestNats::start().await;
    let mut config = hearth_gateway::config::Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let gateway = hearth_gateway::Gateway::start(config)
        .await
        .expect("gateway");
    let port = gateway.mqtt_addr().port().to_string();
    let (hook, received) = webhook().await;
    let dir = tempfile::tempdir().unwrap();
    let homes = homes_file(dir.path(), hook);
    let mut rules = tokio::process::Command::new(env!("CARGO_BIN_EXE_hearth-consumers"))
        .args(["--nats-url", &nats.url(), "--view-listen", "127.0.0.1:0"])
        .args(["--notify-listen", "off", "--homes"])
        .arg(&homes)
        .arg("all")
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-consumers");

    // The rules are up once the panel answers (the consumers exist by then
    // or moments later; the keypad's request below waits for them).
    let client = async_nats::connect(nats.url()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    while client
        .request("hearth.alarm.home", "status".into())
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rules did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let js = async_nats::jetstream::new(client.clone());
    for consumer in ["hearth-security", "hearth-notify"] {
        let deadline = tokio::time::Instant::now() + PROMPTLY;
        while js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
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

    let siren = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "siren", "-q", "1"])
        .args([
            "-t",
            "hearth/home/hall/siren/set",
            "-v",
            "-C",
            "1",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub");
    let keypad = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "keypad", "-q", "1"])
        .args(["-t", "hearth/home/alarm/state", "-v", "-C", "4", "-W", "30"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub");
    tokio::time::sleep(Duration::from_millis(500)).await;

    mosquitto_pub(
        &port,
        "hearth/home/alarm/set",
        r#"{"action":"arm_away","code":"1234"}"#,
    )
    .await;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let reply = client
            .request("hearth.alarm.home", "status".into())
            .await
            .unwrap();
        if String::from_utf8_lossy(&reply.payload).contains("armed_away") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never armed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mosquitto_pub(&port, "hearth/home/hall/door/contact", r#"{"open":true}"#).await;

    let output = tokio::time::timeout(PROMPTLY, siren.wait_with_output())
        .await
        .expect("the siren is commanded over MQTT")
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.starts_with("hearth/home/hall/siren/set {"), "{text}");
    assert!(text.contains(r#""on":true"#), "{text}");

    let deadline = tokio::time::Instant::now() + PROMPTLY;
    while received.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the webhook was not called"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let output = tokio::time::timeout(PROMPTLY, keypad.wait_with_output())
        .await
        .expect("the keypad saw four states")
        .unwrap();
    rules.kill().await.unwrap();
    gateway.shutdown().await;
    let states: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            line.strip_prefix("hearth/home/alarm/state ")
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(states, ["disarmed", "armed_away", "pending", "triggered"]);
}
