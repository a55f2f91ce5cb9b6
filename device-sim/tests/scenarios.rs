//! hearth-sim against the real thing: a nats-server (TestNats), the real
//! gateway (in-process, as the gateway's and the rules' tests start it),
//! the real `hearth-consumers all` binary with the homes file the simulator
//! wrote, and the simulator binary itself talking MQTT. A scenario run with
//! `--check` passes, and `HEARTH_EVENTS` holds exactly the events the
//! simulator says it sent and had acknowledged (plus one availability event
//! per last will).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use async_nats::jetstream;
use hearth_gateway::Gateway;
use hearth_test_support::TestNats;
use serde_json::Value;
use tokio::process::{Child, Command};

/// How long a test waits for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(30);

/// The `hearth-consumers` binary: `$HEARTH_CONSUMERS_BIN`, or built next to
/// this package's binary with the same profile (cargo only builds the
/// binaries of the package under test for its integration tests).
fn consumers_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("HEARTH_CONSUMERS_BIN") {
            return PathBuf::from(path);
        }
        let sim = Path::new(env!("CARGO_BIN_EXE_hearth-sim"));
        let dir = sim.parent().expect("the binary's directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "hearth-consumers",
                "--bin",
                "hearth-consumers",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo to build hearth-consumers");
        assert!(
            status.success(),
            "building hearth-consumers failed: {status}"
        );
        dir.join("hearth-consumers")
    })
}

async fn start_gateway(nats: &TestNats) -> Gateway {
    let mut config = hearth_gateway::config::Config::default();
    config.auth.allow_anonymous = true;
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    Gateway::start(config).await.expect("the gateway starts")
}

/// Runs the simulator with `args` against the gateway and waits for it.
async fn simulate(gateway: &Gateway, args: &[&str], within: Duration) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_hearth-sim"))
        .arg("--mqtt-url")
        .arg(format!("mqtt://{}", gateway.mqtt_addr()))
        .args(args)
        .env("HEARTH_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-sim");
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("hearth-sim {args:?} did not finish within {within:?}"))
        .expect("hearth-sim's output")
}

/// The simulator writes the homes file; the rules start with it and are
/// waited for (the alarm panel answers, the consumers exist).
async fn start_rules(nats: &TestNats, dir: &Path, sim_args: &[&str]) -> Child {
    let homes = dir.join("homes.toml");
    let mut args = vec![
        "--write-homes",
        homes.to_str().unwrap(),
        "--only-write-homes",
    ];
    args.extend_from_slice(sim_args);
    let status = Command::new(env!("CARGO_BIN_EXE_hearth-sim"))
        .args(&args)
        .status()
        .await
        .expect("run hearth-sim --only-write-homes");
    assert!(status.success(), "writing the homes file: {status}");
    let rules = Command::new(consumers_binary())
        .args(["--nats-url", &nats.url(), "--view-listen", "127.0.0.1:0"])
        .args([
            "--notify-listen",
            "off",
            "--metrics-listen",
            "off",
            "--homes",
        ])
        .arg(&homes)
        .arg("all")
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run hearth-consumers");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let panel = client
            .request("hearth.alarm.home", "status".into())
            .await
            .is_ok();
        let mut consumers = 0;
        for name in ["hearth-security", "hearth-lights"] {
            if js
                .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    name,
                    "HEARTH_EVENTS",
                )
                .await
                .is_ok()
            {
                consumers += 1;
            }
        }
        if panel && consumers == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rules did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rules
}

/// Every event in HEARTH_EVENTS, as stored (JSON).
async fn stored_events(js: &jetstream::Context) -> Vec<Value> {
    let mut stream = js.get_stream("HEARTH_EVENTS").await.expect("HEARTH_EVENTS");
    let state = stream.info().await.expect("stream info").state.clone();
    let mut events = Vec::new();
    if state.messages == 0 {
        return events;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream
            .get_raw_message(sequence)
            .await
            .expect("a stored event");
        events.push(serde_json::from_slice(&message.payload).expect("a JSON event"));
    }
    events
}

/// Events the simulated devices published (or their last wills): their
/// convention is the device's, their client id one of the simulator's.
fn from_devices(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|event| {
            let source = &event["source"];
            matches!(
                source["convention"].as_str(),
                Some("native" | "zigbee2mqtt")
            ) && source["clientId"]
                .as_str()
                .is_some_and(|id| id.starts_with("sim-"))
        })
        .collect()
}

fn report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("the report was written"))
        .expect("a JSON report")
}

/// How many events from the simulated devices HEARTH_EVENTS must hold
/// after a run, by its report: every acknowledged event and one
/// availability event per last will, and at most also the publishes whose
/// PUBACK a simulated dropout or a connection error cut off (stored or
/// not: the device cannot know), and the wills of connections that ended
/// in an error.
fn expected_device_events(report: &Value) -> (u64, u64) {
    let count = |value: &Value| value.as_u64().unwrap_or(0);
    let errors = &report["errors"];
    let at_least = count(&report["events_acked"]) + count(&report["wills"]);
    (
        at_least,
        at_least
            + count(&errors["lost_in_dropout"])
            + count(&errors["cut_off_by_reconnect"])
            + count(&errors["will_after_connection_error"]),
    )
}

/// Waits until the devices' events in HEARTH_EVENTS number at least
/// `expected.0`, checks a moment later that they are at most `expected.1`,
/// and returns all events.
async fn wait_for_device_events(js: &jetstream::Context, expected: (u64, u64)) -> Vec<Value> {
    let (at_least, at_most) = expected;
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        let count = from_devices(&stored_events(js).await).len() as u64;
        if count >= at_least {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "HEARTH_EVENTS holds {count} events from the simulated devices, the simulator reports {at_least} acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Anything beyond would have been stored by now too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = stored_events(js).await;
    let count = from_devices(&events).len() as u64;
    assert!(
        (at_least..=at_most).contains(&count),
        "HEARTH_EVENTS holds {count} events from the simulated devices, the simulator reports {at_least} (at most {at_most})"
    );
    events
}

fn assert_success(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "hearth-sim failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burglary_sounds_the_siren_in_time_and_every_acknowledged_event_is_stored() {
    let nats = TestNats::start().await;
    let gateway = start_gateway(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let common = ["--entry-delay", "2s", "--speed", "1440", "--seed", "3"];
    let _rules = start_rules(&nats, dir.path(), &common).await;
    let report_path = dir.path().join("report.json");
    let mut args = vec![
        "--scenario",
        "burglary",
        "--duration",
        "6h",
        "--check",
        "--report",
    ];
    args.push(report_path.to_str().unwrap());
    args.extend_from_slice(&common);
    let output = simulate(&gateway, &args, Duration::from_secs(120)).await;
    assert_success(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("check PASS: siren within 3.0 s of Intrusion"),
        "{stdout}"
    );

    let report = report(&report_path);
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["scenario"], "burglary");
    let sent = report["events_sent"].as_u64().unwrap();
    let acked = report["events_acked"].as_u64().unwrap();
    assert!(
        acked > 100,
        "six simulated hours of a home say more: {report}"
    );
    assert_eq!(
        sent, acked,
        "QoS 1: everything sent was acknowledged: {report}"
    );
    assert_eq!(report["outstanding_at_end"], 0);
    assert!(
        report["puback"]["count"].as_u64().unwrap() >= acked,
        "{report}"
    );
    assert!(
        report["puback"]["p99_ms"].as_f64().unwrap() > 0.0,
        "{report}"
    );

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let expected = expected_device_events(&report);
    assert_eq!(
        expected.0, expected.1,
        "no dropouts in a burglary: {report}"
    );
    let events = wait_for_device_events(&js, expected).await;
    // The break-in itself is among them: the front door opened while armed,
    // and the alarm went off.
    let alarm_states: Vec<&str> = events
        .iter()
        .filter_map(|event| event["alarmState"]["state"].as_str())
        .collect();
    // The keypad armed it when the household left.
    assert!(
        alarm_states.contains(&"ALARM_STATUS_ARMED_AWAY"),
        "{alarm_states:?}"
    );
    assert!(
        alarm_states.contains(&"ALARM_STATUS_TRIGGERED"),
        "{alarm_states:?}"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_at_night_in_a_zigbee2mqtt_home_sounds_its_siren_within_a_second() {
    let nats = TestNats::start().await;
    let gateway = start_gateway(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    // Two homes: the first speaks Zigbee2MQTT (its siren gets Zigbee2MQTT's
    // warning command), the second native.
    let common = [
        "--convention",
        "mixed",
        "--homes",
        "2",
        "--speed",
        "600",
        "--seed",
        "5",
    ];
    let _rules = start_rules(&nats, dir.path(), &common).await;
    let report_path = dir.path().join("report.json");
    let mut args = vec![
        "--scenario",
        "fire-at-night",
        "--start",
        "02:40",
        "--duration",
        "40m",
        "--check",
        "--report",
    ];
    args.push(report_path.to_str().unwrap());
    args.extend_from_slice(&common);
    let output = simulate(&gateway, &args, Duration::from_secs(120)).await;
    assert_success(&output);
    let report = report(&report_path);
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["devices"], 54);
    let acked = report["events_acked"].as_u64().unwrap();
    assert_eq!(report["events_sent"].as_u64().unwrap(), acked);

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let events = wait_for_device_events(&js, expected_device_events(&report)).await;
    let devices = from_devices(&events);
    let z2m = devices
        .iter()
        .filter(|e| e["source"]["convention"] == "zigbee2mqtt")
        .count();
    assert!(
        z2m > 10,
        "the first home's devices speak Zigbee2MQTT: {z2m}"
    );
    assert!(devices
        .iter()
        .all(|e| (e["source"]["convention"] == "zigbee2mqtt") == (e["home"] == "home")));
    let smoke = devices
        .iter()
        .find(|e| e["smoke"]["detected"] == true)
        .expect("the smoke detector's event is stored");
    assert_eq!(smoke["room"], "kitchen");
    assert_eq!(smoke["source"]["topic"], "zigbee2mqtt/kitchen/smoke");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_storm_every_device_is_back_and_each_last_will_is_an_event() {
    let nats = TestNats::start().await;
    let gateway = start_gateway(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let common = ["--speed", "1440", "--seed", "7"];
    let _rules = start_rules(&nats, dir.path(), &common).await;
    let report_path = dir.path().join("report.json");
    let mut args = vec![
        "--scenario",
        "reconnect-storm",
        "--duration",
        "2h",
        "--check",
        "--report",
    ];
    args.push(report_path.to_str().unwrap());
    args.extend_from_slice(&common);
    let output = simulate(&gateway, &args, Duration::from_secs(120)).await;
    assert_success(&output);
    let report = report(&report_path);
    assert_eq!(report["passed"], true, "{report}");
    // Every device dropped once; all but the keypad have a last will.
    assert_eq!(report["wills"], 26, "{report}");
    assert_eq!(report["connects"], 54, "and came back: {report}");
    assert!(report["events_acked"].as_u64().unwrap() > 54, "{report}");

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let (at_least, at_most) = expected_device_events(&report);
    let wills = report["wills"].as_u64().unwrap();
    let after_errors = report["errors"]["will_after_connection_error"]
        .as_u64()
        .unwrap_or(0);
    let events = wait_for_device_events(&js, (at_least, at_most)).await;
    let (offline, readings): (Vec<&Value>, Vec<&Value>) = from_devices(&events)
        .into_iter()
        .partition(|e| e["availability"]["online"] == false);
    // One will per dropped connection: a connection abandoned between its
    // CONNECT and CONNACK would be one the device does not count.
    assert!(
        (wills..=wills + after_errors).contains(&(offline.len() as u64)),
        "{} wills stored, the simulator reports {wills} (and {after_errors} connection errors): {report}",
        offline.len()
    );
    let readings = readings.len() as u64;
    assert!(
        (at_least - wills..=at_most - wills).contains(&readings),
        "{readings} events besides the wills, the simulator reports {} acknowledged: {report}",
        at_least - wills
    );
    let devices: std::collections::BTreeSet<String> = offline
        .iter()
        .map(|e| format!("{}/{}", e["room"], e["device"]))
        .collect();
    assert_eq!(
        devices.len(),
        26,
        "a last will for every device: {devices:?}"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_commands_are_matched_to_their_motion_through_the_correlation_id() {
    let nats = TestNats::start().await;
    let gateway = start_gateway(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let common = ["--homes", "2", "--speed", "1440", "--seed", "2"];
    let _rules = start_rules(&nats, dir.path(), &common).await;
    let report_path = dir.path().join("report.json");
    // Dark early mornings: people get up and go to the bathroom and the
    // kitchen, whose lights the rule switches on.
    let nats_url = nats.url();
    let mut args = vec![
        "--scenario",
        "normal-day",
        "--start",
        "05:00",
        "--duration",
        "4h",
        "--dropouts",
        "0",
        "--check",
        "--nats-url",
        &nats_url,
        "--report",
    ];
    args.push(report_path.to_str().unwrap());
    args.extend_from_slice(&common);
    let output = simulate(&gateway, &args, Duration::from_secs(120)).await;
    assert_success(&output);
    let report = report(&report_path);
    assert_eq!(report["passed"], true, "{report}");
    let reactions = report["reaction"]["count"].as_u64().unwrap();
    let by_correlation = report["reactions_by_correlation"].as_u64().unwrap();
    assert!(
        by_correlation > 0,
        "native light commands carry the motion's correlation id: {report}"
    );
    assert_eq!(
        reactions,
        by_correlation + report["reactions_by_room"].as_u64().unwrap(),
        "{report}"
    );
    assert!(
        report["reaction"]["p50_ms"].as_f64().unwrap() > 0.0,
        "{report}"
    );

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let events = wait_for_device_events(&js, expected_device_events(&report)).await;
    // The lights obeyed and said so: a light event "on" from a simulated
    // light for each reaction at least.
    let lights_on = from_devices(&events)
        .iter()
        .filter(|event| event["light"]["on"] == true)
        .count() as u64;
    assert!(
        lights_on >= reactions,
        "{lights_on} lights reported on, {reactions} reactions"
    );
    gateway.shutdown().await;
}

/// A CA and a server certificate for localhost/127.0.0.1, as PEM files in
/// `dir`: (ca, cert, key).
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hearth-sim test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    (
        write("ca.pem", ca.pem()),
        write("server.pem", server.pem()),
        write("server-key.pem", server_key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_log_in_with_a_password_over_tls_and_every_event_is_stored() {
    let nats = TestNats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path());
    let passwords = dir.path().join("passwd");
    let hash = hearth_sim::homes_file::code_hash("device secret").unwrap();
    std::fs::write(&passwords, format!("sim:{hash}\n")).unwrap();
    let mut config = hearth_gateway::config::Config::default();
    config.nats.url = Some(nats.url());
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.tls.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.tls.cert = Some(cert);
    config.mqtt.tls.key = Some(key);
    config.auth.allow_anonymous = false;
    config.auth.password_file = Some(passwords);
    let gateway = Gateway::start(config).await.expect("the gateway starts");
    let tls_port = gateway.mqtt_tls_addr().expect("a TLS listener").port();

    let report_path = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_hearth-sim"))
        .arg("--mqtt-url")
        .arg(format!("mqtts://localhost:{tls_port}"))
        .arg("--ca-file")
        .arg(&ca)
        .args(["--username", "sim", "--password", "device secret"])
        .args([
            "--scenario",
            "holiday",
            "--duration",
            "3h",
            "--speed",
            "1440",
            "--dropouts",
            "0",
        ])
        .arg("--report")
        .arg(&report_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run hearth-sim");
    assert_success(&output);
    let report = report(&report_path);
    assert_eq!(report["connects"], 27, "every device got in: {report}");
    let acked = report["events_acked"].as_u64().unwrap();
    assert!(acked > 27, "{report}");
    assert_eq!(report["events_sent"].as_u64().unwrap(), acked);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let expected = expected_device_events(&report);
    assert_eq!(expected, (acked, acked), "{report}");
    wait_for_device_events(&js, expected).await;
    gateway.shutdown().await;
}
