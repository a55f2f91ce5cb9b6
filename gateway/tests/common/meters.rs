//! Meters: devices that send numbered QoS 1 readings the way a real device
//! does through faults. `WINDOW` in flight; when no PUBACK comes for 10 s or
//! the connection drops, a meter connects again (persistent session) and
//! resends every reading not acknowledged, with DUP set and the same packet
//! id, as MQTT 3.1.1 requires. What each had acknowledged is recorded, for
//! the fault tests to compare with what was stored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::codec::Framed;

/// Readings a meter has in flight at most.
pub const WINDOW: usize = 20;

/// The readings each meter had acknowledged, by meter number.
pub type Acked = Arc<Mutex<BTreeMap<u64, Vec<u64>>>>;

/// Readings acknowledged so far, all meters together.
pub fn count(acked: &Acked) -> u64 {
    acked.lock().unwrap().values().map(|v| v.len() as u64).sum()
}

/// The reading of a stored illuminance event.
pub fn lux(message: &StreamMessage) -> u64 {
    super::json(message)["illuminance"]["lux"]
        .as_f64()
        .expect("a reading") as u64
}

/// Every quota at once: the meter sends all its readings.
pub fn no_quota(each: u64) -> watch::Receiver<u64> {
    watch::channel(each).1
}

/// A device connection: MQTT 3.1.1 over TCP with rumqttc's codec.
type Connection = Framed<TcpStream, v4::Codec>;

/// Connects with a persistent session (clean session 0); `None` while the
/// gateway cannot take it.
async fn connect(mqtt: SocketAddr, client_id: &str) -> Option<Connection> {
    let stream = TcpStream::connect(mqtt).await.ok()?;
    let mut connection = Framed::new(
        stream,
        v4::Codec {
            max_incoming_size: 1 << 20,
            max_outgoing_size: 1 << 20,
        },
    );
    let mut connect = v4::Connect::new(client_id);
    connect.clean_session = false;
    connect.keep_alive = 30;
    connection.send(Packet::Connect(connect)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(5), connection.next()).await {
        Ok(Some(Ok(Packet::ConnAck(ack)))) if ack.code == v4::ConnectReturnCode::Success => {
            Some(connection)
        }
        _ => None,
    }
}

/// Meter `number` of `home` (client id `meter-<number>`, topic
/// `hearth/<home>/lab/meter-<number>/illuminance`) sending `each` readings,
/// `number * 10_000` on, as far as `quota` allows at the time; done once all
/// are acknowledged.
pub fn spawn(
    mqtt: SocketAddr,
    home: &str,
    number: u64,
    each: u64,
    mut quota: watch::Receiver<u64>,
    acked: Acked,
) -> tokio::task::JoinHandle<()> {
    let topic = format!("hearth/{home}/lab/meter-{number}/illuminance");
    tokio::spawn(async move {
        let client_id = format!("meter-{number}");
        let publish = |pkid: u16, value: u64, dup: bool| {
            let payload = format!(r#"{{"lux":{value}}}"#).into_bytes();
            let mut publish = v4::Publish::new(&topic, QoS::AtLeastOnce, payload);
            publish.pkid = pkid;
            publish.dup = dup;
            Packet::Publish(publish)
        };
        let mut unacked: BTreeMap<u16, u64> = BTreeMap::new();
        let mut sent = 0u64;
        'connection: loop {
            let Some(mut connection) = connect(mqtt, &client_id).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            for (&pkid, &value) in &unacked {
                if connection.send(publish(pkid, value, true)).await.is_err() {
                    continue 'connection;
                }
            }
            loop {
                let allowed = (*quota.borrow_and_update()).min(each);
                while unacked.len() < WINDOW && sent < allowed {
                    let value = number * 10_000 + sent;
                    // Packet ids 1..=WINDOW * 2, never one still in flight.
                    let pkid = (1..=(WINDOW as u16) * 2)
                        .find(|pkid| !unacked.contains_key(pkid))
                        .expect("a free packet id");
                    unacked.insert(pkid, value);
                    sent += 1;
                    if connection.send(publish(pkid, value, false)).await.is_err() {
                        continue 'connection;
                    }
                    if sent % 20 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if unacked.is_empty() {
                    if sent == each {
                        return;
                    }
                    if sent == allowed {
                        // Until the test allows more.
                        if quota.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
                match tokio::time::timeout(Duration::from_secs(10), connection.next()).await {
                    Ok(Some(Ok(Packet::PubAck(ack)))) => {
                        if let Some(value) = unacked.remove(&ack.pkid) {
                            acked.lock().unwrap().entry(number).or_default().push(value);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => continue 'connection,
                }
            }
        }
    })
}

/// Checks that `messages` (a stream's, in `place`) hold every reading the
/// meters had acknowledged, none twice, `total` readings in all.
pub fn assert_each_acknowledged_stored_once(
    messages: &[StreamMessage],
    acked: &Acked,
    total: u64,
    place: &str,
) {
    let mut stored: BTreeMap<u64, u32> = BTreeMap::new();
    for message in messages {
        *stored.entry(lux(message)).or_default() += 1;
    }
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{place}: stored twice: {twice:?}");
    for (meter, values) in acked.lock().unwrap().iter() {
        let missing: Vec<_> = values
            .iter()
            .filter(|value| !stored.contains_key(value))
            .collect();
        assert!(
            missing.is_empty(),
            "meter-{meter}: acknowledged, not in {place}: {missing:?}"
        );
    }
    assert_eq!(stored.len() as u64, total, "{place}: every reading, once");
}
