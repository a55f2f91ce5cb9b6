//! Edge to hub over a leaf-node link, with the deployment files in
//! `deploy/edge/`: a hub nats-server from `hub.conf` (JetStream domain
//! `hub`, a TLS leaf port with passwords), a home's nats-server from
//! `edge.conf` (domain `home1`, a leaf remote to the hub), the hub stream
//! created from `hub-events-stream.json` as it is (the stream-create request
//! `nats stream add --config` makes), and the gateway storing MQTT readings
//! at the home.
//! Only what differs on a test machine is substituted (ports, paths,
//! addresses, passwords, certificates); every placeholder must still be in
//! the files.
//!
//! The hub is killed (SIGKILL, as a crash or a power cut would) in the
//! middle of a burst: for the home, the WAN link is gone. Devices keep
//! getting PUBACKs from the home meanwhile. Once the hub is started again,
//! its stream catches up by itself: it ends up with every reading
//! acknowledged to a device exactly once, none lost, none twice, and the
//! same messages (ids and headers) as the home's `HEARTH_EVENTS`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use common::meters::{self, count, Acked};
use common::{gateway, header, stored, TestNats, PROMPTLY};
use hearth_test_support::free_port;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::sync::watch;
use tokio::time::Instant;

const HUB_CONF: &str = include_str!("../../deploy/edge/hub.conf");
const EDGE_CONF: &str = include_str!("../../deploy/edge/edge.conf");
const HUB_STREAM: &str = include_str!("../../deploy/edge/hub-events-stream.json");

/// The hub's own client, from `hub.conf`'s account.
const HUB_USER: &str = "hub";
const HUB_PASSWORD: &str = "hub-test-password";
const HOME_PASSWORD: &str = "home1-test-password";
/// The home's JetStream domain, as `edge.conf` and the hub stream name it.
const HOME_API: &str = "$JS.home1.API";

const DEVICES: u64 = 6;
/// Readings each device has sent by the end of each phase: before the
/// outage, when the hub is killed, while it is down, after it is back.
const BEFORE: u64 = 100;
const AT_KILL: u64 = 250;
const WHILE_DOWN: u64 = 400;
const EACH: u64 = 500;
/// How long the restarted hub may take to catch up. nats-server 2.9 takes
/// a few seconds; 2.14 and later about 40: the hub asks the home for a
/// source consumer as soon as it starts, before the home's leaf link is
/// back, and asks again only once that request timed out (30 s) and the
/// next health check (10 s) came round.
const CATCH_UP: Duration = Duration::from_secs(90);

#[tokio::test]
async fn a_hub_that_was_down_catches_up_with_every_acknowledged_reading_exactly_once() {
    let started = Instant::now();
    let tls = tempfile::tempdir().unwrap();
    let pki = pki(tls.path());
    let leaf_port = free_port();
    let mut hub = start_hub(leaf_port, &pki).await;
    let edge = start_edge(leaf_port, &pki).await;
    let gateway = gateway(&edge, |_| {}).await;
    let edge_js = common::jetstream(&edge).await;
    let hub_js = jetstream::new(
        async_nats::ConnectOptions::with_user_and_password(HUB_USER.into(), HUB_PASSWORD.into())
            .connect(hub.url())
            .await
            .expect("the hub's client connects with hub.conf's account"),
    );
    wait_for_home_api(&hub_js).await;
    let hub_stream = create_hub_stream(&hub_js).await;
    tracing::info!(elapsed = ?started.elapsed(), "hub, home and gateway up; the hub reaches $JS.home1.API");

    let acked: Acked = Arc::default();
    let (quota, quota_rx) = watch::channel(BEFORE);
    let devices: Vec<_> = (0..DEVICES)
        .map(|n| {
            meters::spawn(
                gateway.mqtt_addr(),
                "home1",
                n,
                EACH,
                quota_rx.clone(),
                Arc::clone(&acked),
            )
        })
        .collect();
    wait_for_acked(&acked, DEVICES * BEFORE, "with the hub up").await;
    wait_for_stream(
        &hub_js,
        &hub_stream,
        DEVICES * BEFORE,
        PROMPTLY,
        "before the outage",
    )
    .await;
    tracing::info!(elapsed = ?started.elapsed(), "the hub has the first readings");

    // The hub goes away in the middle of a burst.
    quota.send_replace(AT_KILL);
    wait_for_acked(&acked, DEVICES * (BEFORE + AT_KILL) / 2, "before the kill").await;
    hub.kill().await;
    let at_kill = count(&acked);
    assert!(at_kill < DEVICES * AT_KILL, "killed mid-burst");

    // The home carries on alone: every reading acknowledged and stored.
    quota.send_replace(WHILE_DOWN);
    wait_for_acked(&acked, DEVICES * WHILE_DOWN, "while the hub is down").await;
    wait_for_stream(
        &edge_js,
        "HEARTH_EVENTS",
        DEVICES * WHILE_DOWN,
        PROMPTLY,
        "at home",
    )
    .await;
    tracing::info!(elapsed = ?started.elapsed(), at_kill, "the home acknowledged everything while the hub was down");

    hub.restart().await;
    quota.send_replace(EACH);
    for device in devices {
        tokio::time::timeout(Duration::from_secs(30), device)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} readings acknowledged after the hub came back",
                    count(&acked),
                    DEVICES * EACH
                )
            })
            .expect("a device task panicked");
    }
    let hub_js = jetstream::new(
        async_nats::ConnectOptions::with_user_and_password(HUB_USER.into(), HUB_PASSWORD.into())
            .connect(hub.url())
            .await
            .expect("the hub's client connects again"),
    );
    wait_for_stream(
        &hub_js,
        &hub_stream,
        DEVICES * EACH,
        CATCH_UP,
        "after catching up",
    )
    .await;
    tracing::info!(elapsed = ?started.elapsed(), "the hub caught up");

    // Every acknowledged reading at the hub, exactly once.
    let at_hub = stored(&hub_js, &hub_stream).await;
    meters::assert_each_acknowledged_stored_once(&at_hub, &acked, DEVICES * EACH, "the hub");

    // The same messages as at home: message ids and event ids.
    let ids = |messages: &[StreamMessage]| -> BTreeMap<String, String> {
        messages
            .iter()
            .map(|message| {
                let id = header(message, "Nats-Msg-Id").expect("a Nats-Msg-Id");
                let event = header(message, "Hearth-Event-Id").expect("a Hearth-Event-Id");
                (id.to_owned(), event.to_owned())
            })
            .collect()
    };
    let at_home = stored(&edge_js, "HEARTH_EVENTS").await;
    assert_eq!(at_hub.len(), at_home.len(), "as many messages as at home");
    assert_eq!(ids(&at_hub), ids(&at_home), "the same messages as at home");
    tracing::info!(elapsed = ?started.elapsed(), at_kill, "edge to hub test done");
}

/// Certificates for the hub's leaf port: a CA (the home trusts it) and the
/// hub's certificate for 127.0.0.1, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hearth test hub CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut hub = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    hub.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let hub_key = KeyPair::generate().unwrap();
    let hub_cert = hub.signed_by(&hub_key, &ca, &ca_key).unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("hub-ca.crt", ca.pem()),
        cert: write("hub.crt", hub_cert.pem()),
        key: write("hub.key", hub_key.serialize_pem()),
    }
}

/// `text` (the deploy file `name`) with every placeholder replaced by its
/// value; each must be there, or the file and this test have drifted apart.
fn substitute(name: &str, text: &str, replacements: &[(&str, String)]) -> String {
    let mut text = text.to_owned();
    for (placeholder, value) in replacements {
        assert!(
            text.contains(placeholder),
            "deploy/edge/{name} no longer has {placeholder:?}"
        );
        text = text.replace(placeholder, value);
    }
    text
}

/// A quoted path in the nats-server config syntax.
fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The hub, from `hub.conf`, on a free client port and `leaf_port`.
async fn start_hub(leaf_port: u16, pki: &Pki) -> TestNats {
    let port = free_port();
    TestNats::start_with(|config| {
        config.port = Some(port);
        config.extra_config = substitute(
            "hub.conf",
            HUB_CONF,
            &[
                (
                    "listen: 127.0.0.1:4222",
                    format!("listen: 127.0.0.1:{port}"),
                ),
                ("127.0.0.1:8222", format!("127.0.0.1:{}", free_port())),
                ("/var/lib/hearth/hub", quoted(&config.store_dir)),
                ("0.0.0.0:7422", format!("127.0.0.1:{leaf_port}")),
                ("/etc/hearth/tls/hub.crt", quoted(&pki.cert)),
                ("/etc/hearth/tls/hub.key", quoted(&pki.key)),
                ("CHANGE-ME-hub-password", HUB_PASSWORD.to_owned()),
                ("CHANGE-ME-home1-password", HOME_PASSWORD.to_owned()),
            ],
        );
    })
    .await
}

/// The home's server, from `edge.conf`, dialling the hub on `leaf_port`.
async fn start_edge(leaf_port: u16, pki: &Pki) -> TestNats {
    let port = free_port();
    TestNats::start_with(|config| {
        config.port = Some(port);
        config.extra_config = substitute(
            "edge.conf",
            EDGE_CONF,
            &[
                (
                    "listen: 127.0.0.1:4222",
                    format!("listen: 127.0.0.1:{port}"),
                ),
                ("127.0.0.1:8222", format!("127.0.0.1:{}", free_port())),
                ("/var/lib/hearth/nats", quoted(&config.store_dir)),
                ("hub.example.net:7422", format!("127.0.0.1:{leaf_port}")),
                ("/etc/hearth/tls/hub-ca.crt", quoted(&pki.ca)),
                ("CHANGE-ME-home1-password", HOME_PASSWORD.to_owned()),
            ],
        );
    })
    .await
}

/// Waits until a request from the hub to the home's JetStream API, the
/// way the hub stream's source goes, is answered: the leaf link is up and
/// the domains are apart.
async fn wait_for_home_api(hub_js: &jetstream::Context) {
    let subject = format!("{HOME_API}.STREAM.INFO.HEARTH_EVENTS");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(1),
            hub_js.client().request(subject.clone(), "".into()),
        )
        .await;
        let detail = match answer {
            Ok(Ok(reply)) => {
                let info: serde_json::Value =
                    serde_json::from_slice(&reply.payload).unwrap_or_default();
                if info["config"]["name"] == "HEARTH_EVENTS" {
                    return;
                }
                format!("answered {info}")
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => "no answer within 1 s".to_owned(),
        };
        assert!(
            Instant::now() < deadline,
            "the hub cannot reach the home's HEARTH_EVENTS on {subject}: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the hub stream from `hub-events-stream.json` as it is, as
/// `nats stream add --config` does; returns its name.
async fn create_hub_stream(hub_js: &jetstream::Context) -> String {
    let config: serde_json::Value =
        serde_json::from_str(HUB_STREAM).expect("hub-events-stream.json is JSON");
    let name = config["name"].as_str().expect("a stream name").to_owned();
    let external = &config["sources"][0]["external"]["api"];
    assert_eq!(
        external, HOME_API,
        "the hub stream sources the home's domain"
    );
    let reply = hub_js
        .client()
        .request(
            format!("$JS.API.STREAM.CREATE.{name}"),
            HUB_STREAM.as_bytes().to_vec().into(),
        )
        .await
        .expect("the hub answers the stream creation");
    let answer: serde_json::Value =
        serde_json::from_slice(&reply.payload).expect("a JSON stream creation response");
    assert!(
        answer.get("error").is_none(),
        "the hub refused hub-events-stream.json: {answer}"
    );
    name
}

/// Waits until `stream` holds at least `count` messages.
async fn wait_for_stream(
    js: &jetstream::Context,
    stream: &str,
    count: u64,
    within: Duration,
    when: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let messages = match js.get_stream(stream).await {
            Ok(handle) => Some(handle.cached_info().state.messages),
            Err(_) => None,
        };
        if messages.is_some_and(|messages| messages >= count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{stream} holds {messages:?} of {count} messages {when}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until devices have `count` readings acknowledged.
async fn wait_for_acked(acked: &Acked, count: u64, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while self::count(acked) < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} readings acknowledged {when}",
            self::count(acked)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
