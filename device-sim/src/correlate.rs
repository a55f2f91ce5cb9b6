//! Ties light commands to the motion that caused them through the
//! correlation id, when the simulator may read NATS (`--nats-url`).
//!
//! The gateway gives every publish a correlation id of its own making
//! (the device never learns it); the lights rule copies the motion event's
//! into its `light_set` command, and native commands carry it to the device
//! (`"correlation_id"` in the payload). So the simulator listens to the
//! stored motion events (`hearth.evt.*.*.motion.*`, the subjects JetStream
//! stores them on), notes which of its devices each is from and under which
//! correlation id, and a command carrying that id is matched exactly.
//! Zigbee2MQTT commands carry no ids: those, and any command whose motion
//! event was not seen on NATS first, are matched by room and time instead
//! ([`crate::measure::Matched::Room`]).

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::measure::Measure;
use crate::model::DeviceId;

/// The subjects of stored motion events, every home, room and device.
pub const MOTION_SUBJECTS: &str = "hearth.evt.*.*.motion.*";

/// The (client id, correlation id) of a stored motion event that says
/// motion was detected; `None` for anything else (protobuf-encoded events
/// included: the gateway stores JSON by default).
pub fn detected_motion(payload: &[u8]) -> Option<(String, String)> {
    let event: Value = serde_json::from_slice(payload).ok()?;
    if event["motion"]["detected"] != Value::Bool(true) {
        return None;
    }
    let client = event["source"]["clientId"].as_str()?.to_owned();
    let correlation = event["correlationId"].as_str()?.to_owned();
    Some((client, correlation))
}

/// Follows the motion events until `stop`; `devices` maps the simulated
/// devices' client ids to their ids.
pub async fn follow(
    subscriber: async_nats::Subscriber,
    devices: HashMap<String, DeviceId>,
    measure: Arc<Measure>,
    stop: CancellationToken,
) {
    let mut subscriber = subscriber;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = subscriber.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let Some((client, correlation)) = detected_motion(&message.payload) else {
            continue;
        };
        if let Some(&device) = devices.get(&client) {
            debug!(client_id = %client, correlation_id = %correlation, "motion stored");
            measure.motion_stored(device, correlation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_motion_is_read_from_the_stored_event() {
        let stored = br#"{"id":"e1","correlationId":"c1","home":"home","room":"hall","device":"pir",
            "source":{"convention":"native","clientId":"sim-home-hall-pir","topic":"hearth/home/hall/pir/motion"},
            "motion":{"detected":true}}"#;
        assert_eq!(
            detected_motion(stored),
            Some(("sim-home-hall-pir".to_owned(), "c1".to_owned()))
        );
        let clear =
            br#"{"correlationId":"c2","source":{"clientId":"x"},"motion":{"detected":false}}"#;
        assert_eq!(detected_motion(clear), None);
        assert_eq!(detected_motion(b"\x0a\x02pb"), None);
    }
}
