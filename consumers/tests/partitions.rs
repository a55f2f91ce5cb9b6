//! Past one machine: two gateways and two `hearth-consumers` processes on
//! one NATS server, the rules' homes shared out by partition (`--partition
//! 1/2` and `2/2`). Motion sensors report to one gateway, the lamps listen
//! on the other; every home's lamp is switched on, then off, exactly once
//! each and in that order (one process handles each home, in stream
//! order), and each home's alarm panel answers once, from the process that
//! owns the home.

mod common;

use std::time::Duration;

use common::{start_gateway, stored_commands, wait_for_consumer, wait_until, PROMPTLY};
use hearth_consumers::partition::Partition;
use hearth_test_support::TestNats;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const HOMES: usize = 8;

fn home(n: usize) -> String {
    format!("flat-{n}")
}

/// Connects `client_id` to the MQTT server at `addr`; what it receives on
/// its subscriptions comes out of the receiver as `topic payload`.
fn mqtt_client(
    addr: std::net::SocketAddr,
    client_id: &str,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (received_tx, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(publish)) = event {
                let payload = String::from_utf8_lossy(&publish.payload).into_owned();
                let _ = received_tx.send(format!("{} {payload}", publish.topic));
            }
        }
    });
    (client, received)
}

#[tokio::test]
async fn two_gateways_and_two_rule_processes_handle_every_home_once_in_order() {
    let nats = TestNats::start().await;
    let gateways = [start_gateway(&nats).await, start_gateway(&nats).await];
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let partitions = [Partition::new(1, 2).unwrap(), Partition::new(2, 2).unwrap()];
    for partition in partitions {
        assert!(
            (0..HOMES).any(|n| partition.owns(&home(n))),
            "partition {partition} owns none of the test's homes: pick other names"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let homes_file = dir.path().join("homes.toml");
    let homes: String = (0..HOMES)
        .map(|n| {
            format!(
                "[homes.{}.rooms.hall]\nlights = [\"lamp\"]\noff_after = \"1s\"\n",
                home(n)
            )
        })
        .collect();
    std::fs::write(&homes_file, homes).unwrap();
    let _rules: Vec<_> = partitions
        .iter()
        .map(|partition| {
            common::spawn_rules(
                &nats.url(),
                &homes_file,
                &["--partition", &partition.to_string(), "all"],
            )
        })
        .collect();
    for name in ["hearth-lights-1of2", "hearth-lights-2of2"] {
        wait_for_consumer(&js, name, PROMPTLY).await;
    }

    // The lamps listen on one gateway, the sensors report to the other.
    let mut lamps = Vec::new();
    for n in 0..HOMES {
        let gateway = &gateways[n % 2];
        let (lamp, received) = mqtt_client(gateway.mqtt_addr(), &format!("lamp-{n}"));
        lamp.subscribe(
            format!("hearth/{}/hall/lamp/set", home(n)),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        lamps.push((lamp, received));
    }
    for (index, gateway) in gateways.iter().enumerate() {
        common::wait_for_mqtt_subscriptions(gateway, HOMES / 2 + HOMES % 2 * (1 - index)).await;
    }
    let mut sensors = Vec::new();
    for n in 0..HOMES {
        let gateway = &gateways[(n + 1) % 2];
        let (sensor, _) = mqtt_client(gateway.mqtt_addr(), &format!("pir-{n}"));
        for detected in [true, false] {
            sensor
                .publish(
                    format!("hearth/{}/hall/pir/motion", home(n)),
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"detected":{detected}}}"#),
                )
                .await
                .unwrap();
        }
        sensors.push(sensor);
    }

    // On, then off a second after the motion cleared: each home's
    // commands issued once, by one process, in order.
    wait_until(
        Duration::from_secs(20),
        format!("an on and an off command for each of {HOMES} homes"),
        async || stored_commands(&js).await,
        |commands| commands.len() >= 2 * HOMES,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let commands = stored_commands(&js).await;
    assert_eq!(commands.len(), 2 * HOMES, "{commands:?}");
    for n in 0..HOMES {
        let of_home: Vec<_> = commands
            .iter()
            .filter(|command| command.home == home(n))
            .map(|command| match &command.body {
                Some(hearth_proto::v1::command::Body::LightSet(set)) => set.on,
                other => panic!("not a light command: {other:?}"),
            })
            .collect();
        assert_eq!(of_home, [true, false], "{}: {commands:?}", home(n));
    }
    // And each lamp got them, through the other gateway.
    for (n, (_, received)) in lamps.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 2 {
            let message = tokio::time::timeout(PROMPTLY, received.recv())
                .await
                .unwrap_or_else(|_| panic!("lamp {n} got only {got:?}"))
                .unwrap();
            got.push(message.contains("\"on\":true"));
        }
        assert_eq!(got, [true, false], "lamp of {}", home(n));
    }

    // Each home's panel answers once, from its own process.
    let client = js.client();
    for n in 0..HOMES {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.unwrap();
        let subject = format!("hearth.alarm.{}", home(n));
        client
            .publish_with_reply(subject, inbox, "status".into())
            .await
            .unwrap();
        let first = tokio::time::timeout(PROMPTLY, futures::StreamExt::next(&mut replies))
            .await
            .expect("the owner answers");
        assert!(first.is_some());
        let second = tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut replies),
        )
        .await;
        assert!(second.is_err(), "{} answered twice", home(n));
    }
    for gateway in gateways {
        gateway.shutdown().await;
    }
}
