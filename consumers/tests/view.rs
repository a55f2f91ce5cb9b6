//! The view with a real nats-server: devices, rooms, battery, availability
//! and the alarm projected into the `hearth_view` bucket and served over
//! NATS request/reply and HTTP (a real socket); unknown names are errors
//! over both; a restarted view skips what it applied and picks up what is
//! new; a rebuild makes the same documents again.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use common::PROMPTLY;
use hearth_consumers::view::{self, Options, ViewError};
use hearth_proto::v1::{self, event::Body};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// 2027-01-15T08:00:00Z: event times are `T0` plus a few seconds.
const T0: i64 = 1_800_000_000;

struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), ViewError>>,
    http: SocketAddr,
}

impl Running {
    /// Stops the view and checks that it stopped cleanly.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PROMPTLY, self.task)
            .await
            .expect("the view stops promptly")
            .unwrap()
            .expect("the view stops without an error");
    }
}

/// Starts the view with HTTP on a free port; returns once HTTP answers.
async fn start(js: &jetstream::Context) -> Running {
    let http: SocketAddr = ([127, 0, 0, 1], hearth_test_support::free_port()).into();
    let stop = CancellationToken::new();
    let mut task = tokio::spawn(view::run(
        js.clone(),
        Options {
            http_listen: Some(http),
            ..Options::default()
        },
        stop.clone(),
    ));
    let http_answers = common::wait_until(
        PROMPTLY,
        format!("the view's HTTP on {http}"),
        async || {
            tokio::net::TcpStream::connect(http)
                .await
                .map(drop)
                .map_err(|error| error.to_string())
        },
        Result::is_ok,
    );
    tokio::select! {
        _ = http_answers => {}
        ended = &mut task => panic!("the view stopped at start: {ended:?}"),
    }
    Running { stop, task, http }
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// Stores an event as the gateway (or a rule, for bodies 40 and up) does;
/// returns its stream sequence.
async fn publish(
    js: &jetstream::Context,
    (home, room, device): (&str, &str, &str),
    seconds: i64,
    body: Body,
) -> u64 {
    let kind = body.kind();
    let id = format!("event-{}", IDS.fetch_add(1, Ordering::Relaxed));
    let convention = match body {
        Body::AlarmState(_) | Body::AlarmNotice(_) | Body::Notification(_) => "hearth-security",
        _ => "native",
    };
    let event = v1::Event {
        id: id.clone(),
        correlation_id: format!("corr-{id}"),
        received_at: Some(pbjson_types::Timestamp {
            seconds: T0 + seconds,
            nanos: 0,
        }),
        home: home.into(),
        room: room.into(),
        device: device.into(),
        source: Some(v1::Source {
            convention: convention.into(),
            ..Default::default()
        }),
        body: Some(body),
        ..Default::default()
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Hearth-Schema", v1::EVENT_SCHEMA);
    headers.insert("Hearth-Event-Id", id.as_str());
    headers.insert("Hearth-Kind", kind);
    headers.insert("Hearth-Correlation-Id", event.correlation_id.as_str());
    common::publish_event_with_headers(js, &event, headers).await
}

/// Waits until the view has acknowledged every event up to `last`.
async fn wait_consumed(js: &jetstream::Context, last: u64) {
    common::wait_until(
        PROMPTLY,
        format!("the view's ack floor to reach {last}"),
        async || match js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(
                view::CONSUMER,
                "HEARTH_EVENTS",
            )
            .await
        {
            Ok(mut consumer) => consumer.info().await.unwrap().ack_floor.stream_sequence,
            Err(_) => 0,
        },
        |&acked| acked >= last,
    )
    .await;
}

async fn bucket(js: &jetstream::Context) -> kv::Store {
    js.get_key_value(view::BUCKET).await.unwrap()
}

/// What `nats kv get hearth_view <home>` shows, as JSON.
async fn stored(js: &jetstream::Context, home: &str) -> Option<Value> {
    let key = hearth_consumers::state::key(&[home]);
    let bytes = bucket(js).await.get(key).await.unwrap()?;
    Some(serde_json::from_slice(&bytes).expect("the document is JSON"))
}

async fn request(js: &jetstream::Context, subject: String) -> (Value, Option<String>) {
    let reply = tokio::time::timeout(PROMPTLY, js.client().request(subject, "".into()))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.as_str().to_owned());
    (serde_json::from_slice(&reply.payload).unwrap(), code)
}

/// `GET path` over a real socket: the status and the JSON body.
async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let response = common::http_request(addr, "GET", path).await;
    assert!(
        response
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        response.head
    );
    let body = serde_json::from_str(&response.body).expect("a JSON body");
    (response.status, body)
}

fn motion(detected: bool) -> Body {
    Body::Motion(v1::Motion { detected })
}

fn temperature(celsius: f64) -> Body {
    Body::Temperature(v1::Temperature { celsius })
}

fn login_failed() -> Body {
    Body::LoginFailed(v1::LoginFailed {
        username: "bob".into(),
        address: "10.0.0.9:50000".into(),
        reason: "wrong_password".into(),
    })
}

#[tokio::test]
async fn devices_rooms_battery_availability_and_the_alarm_are_projected_into_the_bucket() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let view = start(&js).await;
    let hall = |device| ("home", "hall", device);
    publish(&js, hall("pir"), 0, motion(true)).await;
    publish(&js, hall("sensor"), 1, temperature(21.5)).await;
    publish(
        &js,
        hall("sensor"),
        2,
        Body::Humidity(v1::Humidity { percent: 40.0 }),
    )
    .await;
    publish(
        &js,
        hall("sensor"),
        3,
        Body::Illuminance(v1::Illuminance { lux: 12.0 }),
    )
    .await;
    let light = Body::Light(v1::LightState {
        on: true,
        brightness_pct: Some(40),
    });
    publish(&js, hall("ceiling"), 4, light).await;
    publish(
        &js,
        hall("pir"),
        5,
        Body::Battery(v1::Battery { percent: 80.0 }),
    )
    .await;
    let offline = Body::Availability(v1::Availability { online: false });
    publish(&js, ("home", "kitchen", "plug"), 6, offline).await;
    publish(
        &js,
        hall("front-door"),
        7,
        Body::Contact(v1::Contact { open: true }),
    )
    .await;
    let armed = Body::AlarmState(v1::AlarmState {
        state: v1::AlarmStatus::ArmedAway.into(),
        previous: v1::AlarmStatus::Arming.into(),
        mode: v1::AlarmMode::Away.into(),
        reason: "armed by alice".into(),
        zone: String::new(),
        until: Some(pbjson_types::Timestamp {
            seconds: T0 + 100,
            nanos: 0,
        }),
        bypassed: vec!["hall/window".into()],
        user: "alice".into(),
    });
    publish(&js, ("home", "_home", "alarm"), 8, armed).await;
    publish(&js, ("home", "kitchen", "pir"), 9, motion(true)).await;
    publish(&js, ("home", "kitchen", "pir"), 10, motion(false)).await;
    let last_applied = publish(&js, ("home", "gateway", "intruder"), 11, login_failed()).await;
    // A notification is nothing the view keeps.
    let notification = Body::Notification(v1::Notification {
        severity: v1::Severity::Info.into(),
        category: "battery_low".into(),
        title: "t".into(),
        message: "m".into(),
    });
    let last = publish(&js, ("home", "_home", "hearth-security"), 12, notification).await;
    wait_consumed(&js, last).await;

    let expected = json!({
        "home": "home",
        "updated_at": "2027-01-15T08:00:11Z",
        "sequence": last_applied,
        "alarm": {
            "state": "armed_away",
            "previous": "arming",
            "mode": "away",
            "since": "2027-01-15T08:00:08Z",
            "until": "2027-01-15T08:01:40Z",
            "reason": "armed by alice",
            "bypassed": ["hall/window"],
            "user": "alice"
        },
        "rooms": {
            "hall": {
                "occupied": true,
                "last_motion": "2027-01-15T08:00:00Z",
                "lights": {"ceiling": {"on": true, "brightness_pct": 40}},
                "temperature": 21.5,
                "humidity": 40.0,
                "lux": 12.0
            },
            "kitchen": {"occupied": false, "last_motion": "2027-01-15T08:00:09Z"}
        },
        "devices": {
            "hall": {
                "ceiling": {
                    "last_seen": "2027-01-15T08:00:04Z",
                    "online": true,
                    "values": {"light": {"on": true, "brightnessPct": 40}}
                },
                "front-door": {
                    "last_seen": "2027-01-15T08:00:07Z",
                    "online": true,
                    "values": {"contact": {"open": true}}
                },
                "pir": {
                    "last_seen": "2027-01-15T08:00:05Z",
                    "online": true,
                    "battery_pct": 80.0,
                    "values": {"motion": {"detected": true}}
                },
                "sensor": {
                    "last_seen": "2027-01-15T08:00:03Z",
                    "online": true,
                    "values": {
                        "temperature": {"celsius": 21.5},
                        "humidity": {"percent": 40.0},
                        "illuminance": {"lux": 12.0}
                    }
                }
            },
            "kitchen": {
                "pir": {
                    "last_seen": "2027-01-15T08:00:10Z",
                    "online": true,
                    "values": {"motion": {"detected": false}}
                },
                "plug": {"last_seen": "2027-01-15T08:00:06Z", "online": false}
            }
        },
        "login_failures": {
            "count": 1,
            "last": {
                "at": "2027-01-15T08:00:11Z",
                "client_id": "intruder",
                "username": "bob",
                "address": "10.0.0.9:50000",
                "reason": "wrong_password"
            }
        }
    });
    assert_eq!(stored(&js, "home").await, Some(expected));
    view.stop().await;
}

#[tokio::test]
async fn the_view_is_served_over_nats_and_http_and_unknown_names_are_errors() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let view = start(&js).await;
    publish(&js, ("home", "hall", "pir"), 0, motion(true)).await;
    let flat = ("Flat 2.1", "Living Room", "lamp 1");
    let on = Body::Light(v1::LightState {
        on: true,
        brightness_pct: None,
    });
    let last = publish(&js, flat, 1, on).await;
    wait_consumed(&js, last).await;
    let home = stored(&js, "home").await.expect("home's document");
    let other = stored(&js, "Flat 2.1").await.expect("Flat 2.1's document");
    assert_eq!(
        other["rooms"]["Living Room"]["lights"]["lamp 1"],
        json!({"on": true})
    );
    let pir = json!({
        "home": "home",
        "room": "hall",
        "device": "pir",
        "last_seen": "2027-01-15T08:00:00Z",
        "online": true,
        "values": {"motion": {"detected": true}}
    });
    let homes = json!({"homes": ["Flat 2.1", "home"]});

    // NATS request/reply, names as subject tokens.
    assert_eq!(
        request(&js, "hearth.view".into()).await,
        (homes.clone(), None)
    );
    assert_eq!(
        request(&js, "hearth.view.home".into()).await,
        (home.clone(), None)
    );
    assert_eq!(
        request(&js, "hearth.view.Flat%202%2E1".into()).await,
        (other.clone(), None)
    );
    assert_eq!(
        request(&js, "hearth.view.home.hall.pir".into()).await,
        (pir.clone(), None)
    );
    let lamp = request(
        &js,
        "hearth.view.Flat%202%2E1.Living%20Room.lamp%201".into(),
    )
    .await;
    assert_eq!(lamp.0["last_seen"], json!("2027-01-15T08:00:01Z"));
    assert_eq!(
        request(&js, "hearth.view.nowhere".into()).await,
        (
            json!({"error": "no home named \"nowhere\""}),
            Some("404".into())
        )
    );
    assert_eq!(
        request(&js, "hearth.view.home.hall.nothing".into()).await,
        (
            json!({"error": "no device hall/nothing in home \"home\""}),
            Some("404".into())
        )
    );

    // HTTP, names percent-encoded in the path.
    assert_eq!(get(view.http, "/homes").await, (200, homes));
    assert_eq!(get(view.http, "/homes/home").await, (200, home));
    assert_eq!(get(view.http, "/homes/Flat%202.1").await, (200, other));
    assert_eq!(
        get(view.http, "/homes/home/devices/hall/pir").await,
        (200, pir)
    );
    assert_eq!(
        get(view.http, "/homes/nowhere").await,
        (404, json!({"error": "no home named \"nowhere\""}))
    );
    assert_eq!(
        get(view.http, "/homes/home/devices/hall/nothing").await,
        (
            404,
            json!({"error": "no device hall/nothing in home \"home\""})
        )
    );
    assert_eq!(get(view.http, "/elsewhere").await.0, 404);
    view.stop().await;
}

#[tokio::test]
async fn a_restarted_view_skips_what_it_applied_and_picks_up_new_events() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let view = start(&js).await;
    publish(&js, ("home", "hall", "pir"), 0, motion(true)).await;
    publish(&js, ("home", "gateway", "intruder"), 1, login_failed()).await;
    let last = publish(&js, ("home", "gateway", "intruder"), 2, login_failed()).await;
    wait_consumed(&js, last).await;
    view.stop().await;
    let before = stored(&js, "home").await.unwrap();
    assert_eq!(before["login_failures"]["count"], json!(2));
    let key = hearth_consumers::state::key(&["home"]);
    let revision = bucket(&js)
        .await
        .entry(&key)
        .await
        .unwrap()
        .unwrap()
        .revision;

    // Every event comes again, as if none had been acknowledged before a
    // crash; and one new event arrives while the view is down.
    js.delete_consumer_from_stream(view::CONSUMER, "HEARTH_EVENTS")
        .await
        .unwrap();
    let new = publish(&js, ("home", "hall", "sensor"), 3, temperature(19.0)).await;
    let view = start(&js).await;
    wait_consumed(&js, new).await;
    view.stop().await;

    let mut expected = before;
    expected["sequence"] = json!(new);
    expected["updated_at"] = json!("2027-01-15T08:00:03Z");
    expected["rooms"]["hall"]["temperature"] = json!(19.0);
    expected["devices"]["hall"]["sensor"] = json!({
        "last_seen": "2027-01-15T08:00:03Z",
        "online": true,
        "values": {"temperature": {"celsius": 19.0}}
    });
    assert_eq!(
        stored(&js, "home").await,
        Some(expected),
        "the failed logins are not counted twice"
    );
    let entry = bucket(&js).await.entry(&key).await.unwrap().unwrap();
    assert_eq!(
        entry.revision,
        revision + 1,
        "one write, for the new event; the events applied before wrote nothing"
    );
}

#[tokio::test]
async fn a_rebuild_reproduces_the_same_documents() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let view = start(&js).await;
    publish(&js, ("home", "hall", "pir"), 0, motion(true)).await;
    publish(
        &js,
        ("home", "hall", "pir"),
        1,
        Body::Battery(v1::Battery { percent: 55.5 }),
    )
    .await;
    publish(
        &js,
        ("cabin", "porch", "door"),
        2,
        Body::Contact(v1::Contact { open: false }),
    )
    .await;
    let disarmed = Body::AlarmState(v1::AlarmState {
        state: v1::AlarmStatus::Disarmed.into(),
        previous: v1::AlarmStatus::ArmedHome.into(),
        user: "alice".into(),
        ..Default::default()
    });
    publish(&js, ("home", "_home", "alarm"), 3, disarmed).await;
    let last = publish(&js, ("home", "gateway", "intruder"), 4, login_failed()).await;
    wait_consumed(&js, last).await;
    view.stop().await;
    let store = bucket(&js).await;
    let key = |home| hearth_consumers::state::key(&[home]);
    let home = store.get(key("home")).await.unwrap().expect("home");
    let cabin = store.get(key("cabin")).await.unwrap().expect("cabin");

    assert_eq!(view::rebuild(&js).await.unwrap(), 2, "two homes dropped");
    assert_eq!(store.get(key("home")).await.unwrap(), None);
    assert!(
        js.get_consumer_from_stream::<consumer::pull::Config, _, _>(
            view::CONSUMER,
            "HEARTH_EVENTS"
        )
        .await
        .is_err(),
        "the consumer is gone"
    );

    let view = start(&js).await;
    wait_consumed(&js, last).await;
    view.stop().await;
    assert_eq!(store.get(key("home")).await.unwrap(), Some(home));
    assert_eq!(store.get(key("cabin")).await.unwrap(), Some(cabin));
    assert_eq!(view::rebuild(&js).await.unwrap(), 2, "and again");
}

/// Each write expects the revision the view last wrote or read: a document
/// written by someone else meanwhile (a second writer, `nats kv put`) is
/// read again and the event applied to it, not overwritten.
#[tokio::test]
async fn a_document_changed_in_the_bucket_under_the_view_is_read_again_not_overwritten() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let view = start(&js).await;
    let first = publish(&js, ("home", "hall", "pir"), 0, motion(true)).await;
    wait_consumed(&js, first).await;
    let mut document = stored(&js, "home").await.unwrap();
    document["rooms"]["hall"]["lux"] = json!(7.0);
    let key = hearth_consumers::state::key(&["home"]);
    bucket(&js)
        .await
        .put(&key, serde_json::to_vec(&document).unwrap().into())
        .await
        .unwrap();
    let second = publish(&js, ("home", "hall", "sensor"), 1, temperature(18.0)).await;
    wait_consumed(&js, second).await;
    view.stop().await;

    document["sequence"] = json!(second);
    document["updated_at"] = json!("2027-01-15T08:00:01Z");
    document["rooms"]["hall"]["temperature"] = json!(18.0);
    document["devices"]["hall"]["sensor"] = json!({
        "last_seen": "2027-01-15T08:00:01Z",
        "online": true,
        "values": {"temperature": {"celsius": 18.0}}
    });
    assert_eq!(stored(&js, "home").await, Some(document));
}

#[tokio::test]
async fn a_taken_http_port_fails_the_start() {
    let (_nats, js) = common::start_nats_with_streams().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let error = view::run(
        js,
        Options {
            http_listen: Some(addr),
            ..Options::default()
        },
        CancellationToken::new(),
    )
    .await
    .expect_err("the port is taken");
    assert!(
        matches!(error, ViewError::Listen { addr: a, .. } if a == addr),
        "{error}"
    );
}

/// How fast the view applies a backlog (one KV write per event). Not a
/// pass/fail test: `cargo test -p hearth-consumers --test view -- --ignored
/// --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a test"]
async fn throughput_of_the_projection() {
    const EVENTS: u64 = 5_000;
    let (_nats, js) = common::start_nats_with_streams().await;
    let mut last = 0;
    for i in 0..EVENTS {
        let room = format!("room-{}", i % 50);
        let body = if i % 2 == 0 {
            motion(i % 4 == 0)
        } else {
            temperature(20.0 + (i % 10) as f64)
        };
        last = publish(&js, ("home", &room, "sensor"), i as i64, body).await;
    }
    let started = std::time::Instant::now();
    let view = start(&js).await;
    common::wait_until(
        Duration::from_secs(300),
        format!("the view's document at sequence {last}"),
        async || {
            stored(&js, "home")
                .await
                .map_or(0, |document| document["sequence"].as_u64().unwrap())
        },
        |&sequence| sequence >= last,
    )
    .await;
    let elapsed = started.elapsed();
    eprintln!(
        "{EVENTS} events applied in {:.2} s: {:.0} events/s",
        elapsed.as_secs_f64(),
        EVENTS as f64 / elapsed.as_secs_f64()
    );
    view.stop().await;
}
