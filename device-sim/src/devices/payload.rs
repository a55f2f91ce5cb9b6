//! Topics and payloads as real devices of each convention send and take
//! them (the gateway's `conventions/`): pure, so every shape is tested here.

use serde_json::{json, Value as Json};

use crate::model::layout::{Convention, DeviceKind};
use crate::model::{KeypadAction, Value};

/// The native convention's topic prefix (the gateway's default).
pub const NATIVE_PREFIX: &str = "hearth";
/// Zigbee2MQTT's base topic (the gateway's default).
pub const Z2M_BASE: &str = "zigbee2mqtt";

/// Where a device lives, by name.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub convention: Convention,
    pub home: &'a str,
    pub room: &'a str,
    pub device: &'a str,
}

impl Place<'_> {
    /// The topic all of the device's topics start with.
    pub fn root(&self) -> String {
        match self.convention {
            Convention::Native => format!(
                "{NATIVE_PREFIX}/{}/{}/{}",
                self.home, self.room, self.device
            ),
            // The friendly name `room/device`: the gateway splits it at the
            // last `/` into room and device.
            Convention::Zigbee2mqtt => format!("{Z2M_BASE}/{}/{}", self.room, self.device),
        }
    }

    /// The topic hearth sends the device's commands to.
    pub fn command_topic(&self) -> String {
        format!("{}/set", self.root())
    }

    /// The availability topic (and of the device's last will).
    pub fn availability_topic(&self) -> String {
        format!("{}/availability", self.root())
    }

    /// The topic and payload of a reading: one publish, one event.
    pub fn reading(&self, value: &Value) -> (String, Vec<u8>) {
        match self.convention {
            Convention::Native => (format!("{}/{}", self.root(), value.kind()), native(value)),
            Convention::Zigbee2mqtt => match value {
                Value::Availability(_) => (self.availability_topic(), z2m(value)),
                _ => (self.root(), z2m(value)),
            },
        }
    }
}

/// The bare `online` / `offline` both conventions take for availability
/// (what last wills usually say).
pub fn availability_payload(online: bool) -> &'static [u8] {
    if online {
        b"online"
    } else {
        b"offline"
    }
}

fn native(value: &Value) -> Vec<u8> {
    let body = match value {
        Value::Motion(detected) | Value::Smoke(detected) | Value::WaterLeak(detected) => {
            json!({ "detected": detected })
        }
        Value::Contact { open } => json!({ "open": open }),
        Value::Temperature(celsius) => json!({ "celsius": celsius }),
        Value::Humidity(percent) => json!({ "percent": percent }),
        Value::Illuminance(lux) => json!({ "lux": lux }),
        Value::Battery(percent) => json!({ "percent": percent }),
        Value::Button(action) => json!({ "action": action }),
        Value::Light { on, brightness_pct } => {
            json!({ "on": on, "brightness_pct": brightness_pct })
        }
        Value::Availability(online) => return availability_payload(*online).to_vec(),
    };
    body.to_string().into_bytes()
}

fn z2m(value: &Value) -> Vec<u8> {
    let body = match value {
        Value::Motion(occupancy) => json!({ "occupancy": occupancy }),
        // Zigbee2MQTT's `contact: true` means closed.
        Value::Contact { open } => json!({ "contact": !open }),
        Value::Temperature(celsius) => json!({ "temperature": celsius }),
        Value::Humidity(percent) => json!({ "humidity": percent }),
        Value::Illuminance(lux) => json!({ "illuminance_lux": lux }),
        Value::Smoke(detected) => json!({ "smoke": detected }),
        Value::WaterLeak(detected) => json!({ "water_leak": detected }),
        Value::Battery(percent) => json!({ "battery": percent }),
        Value::Button(action) => json!({ "action": action }),
        Value::Light { on, brightness_pct } => json!({
            "state": if *on { "ON" } else { "OFF" },
            "brightness": (f64::from(*brightness_pct) * 254.0 / 100.0).round() as u32,
        }),
        Value::Availability(online) => return availability_payload(*online).to_vec(),
    };
    body.to_string().into_bytes()
}

/// The alarm keypad's topics (always the native prefix: the security rule's
/// panel, whatever the home's devices speak).
pub fn keypad_set_topic(home: &str) -> String {
    format!("{NATIVE_PREFIX}/{home}/alarm/set")
}

pub fn keypad_state_topic(home: &str) -> String {
    format!("{NATIVE_PREFIX}/{home}/alarm/state")
}

pub fn keypad_result_topic(home: &str) -> String {
    format!("{NATIVE_PREFIX}/{home}/alarm/result")
}

/// A refusal in the panel's answer on the result topic: its error text.
pub fn keypad_refusal(payload: &[u8]) -> Option<String> {
    let json: Json = serde_json::from_slice(payload).ok()?;
    if json.get("ok").and_then(Json::as_bool) == Some(false) {
        Some(
            json.get("error")
                .and_then(Json::as_str)
                .unwrap_or("refused")
                .to_owned(),
        )
    } else {
        None
    }
}

pub fn keypad_request(action: KeypadAction, code: &str) -> Vec<u8> {
    let action = match action {
        KeypadAction::ArmAway => "arm_away",
        KeypadAction::Disarm => "disarm",
    };
    json!({ "action": action, "code": code })
        .to_string()
        .into_bytes()
}

/// A command as a device understands it.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Light {
        on: bool,
        brightness_pct: Option<u8>,
        /// The correlation id of the event that caused it (native only).
        correlation_id: Option<String>,
    },
    Siren {
        on: bool,
        correlation_id: Option<String>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommandError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("a {0:?} takes no commands")]
    NotCommandable(DeviceKind),
    #[error("missing or mistyped field `{0}`")]
    Field(&'static str),
}

/// Reads a command sent to a device of `kind` speaking `convention`.
pub fn parse_command(
    convention: Convention,
    kind: DeviceKind,
    payload: &[u8],
) -> Result<Command, CommandError> {
    let json: Json =
        serde_json::from_slice(payload).map_err(|e| CommandError::NotJson(e.to_string()))?;
    let correlation_id = json
        .get("correlation_id")
        .and_then(Json::as_str)
        .map(str::to_owned);
    match (convention, kind) {
        (Convention::Native, DeviceKind::Light) => Ok(Command::Light {
            on: json
                .get("on")
                .and_then(Json::as_bool)
                .ok_or(CommandError::Field("on"))?,
            brightness_pct: json
                .get("brightness_pct")
                .and_then(Json::as_u64)
                .map(|b| b.min(100) as u8),
            correlation_id,
        }),
        (Convention::Native, DeviceKind::Siren) => Ok(Command::Siren {
            on: json
                .get("on")
                .and_then(Json::as_bool)
                .ok_or(CommandError::Field("on"))?,
            correlation_id,
        }),
        (Convention::Zigbee2mqtt, DeviceKind::Light) => {
            let state = json
                .get("state")
                .and_then(Json::as_str)
                .ok_or(CommandError::Field("state"))?;
            Ok(Command::Light {
                on: state.eq_ignore_ascii_case("ON"),
                brightness_pct: json
                    .get("brightness")
                    .and_then(Json::as_u64)
                    .map(|level| ((level.min(254) as f64) * 100.0 / 254.0).round() as u8),
                correlation_id,
            })
        }
        (Convention::Zigbee2mqtt, DeviceKind::Siren) => {
            let mode = json
                .get("warning")
                .and_then(|warning| warning.get("mode"))
                .and_then(Json::as_str)
                .ok_or(CommandError::Field("warning.mode"))?;
            Ok(Command::Siren {
                on: mode != "stop",
                correlation_id,
            })
        }
        (_, other) => Err(CommandError::NotCommandable(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(convention: Convention) -> Place<'static> {
        Place {
            convention,
            home: "home",
            room: "kitchen",
            device: "spots",
        }
    }

    fn json_of(bytes: &[u8]) -> Json {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn native_readings_go_to_one_topic_per_kind_in_the_gateways_shapes() {
        let native = place(Convention::Native);
        let (topic, payload) = native.reading(&Value::Motion(true));
        assert_eq!(topic, "hearth/home/kitchen/spots/motion");
        assert_eq!(json_of(&payload), json!({"detected": true}));
        let (topic, payload) = native.reading(&Value::Contact { open: true });
        assert_eq!(topic, "hearth/home/kitchen/spots/contact");
        assert_eq!(json_of(&payload), json!({"open": true}));
        let (_, payload) = native.reading(&Value::Temperature(21.5));
        assert_eq!(json_of(&payload), json!({"celsius": 21.5}));
        let (_, payload) = native.reading(&Value::Illuminance(120.0));
        assert_eq!(json_of(&payload), json!({"lux": 120.0}));
        let (_, payload) = native.reading(&Value::Light {
            on: true,
            brightness_pct: 40,
        });
        assert_eq!(json_of(&payload), json!({"on": true, "brightness_pct": 40}));
        let (topic, payload) = native.reading(&Value::Availability(false));
        assert_eq!(topic, "hearth/home/kitchen/spots/availability");
        assert_eq!(payload, b"offline");
        assert_eq!(native.command_topic(), "hearth/home/kitchen/spots/set");
    }

    #[test]
    fn zigbee2mqtt_readings_are_fields_of_the_friendly_names_object() {
        let z2m = place(Convention::Zigbee2mqtt);
        let (topic, payload) = z2m.reading(&Value::Motion(true));
        assert_eq!(topic, "zigbee2mqtt/kitchen/spots");
        assert_eq!(json_of(&payload), json!({"occupancy": true}));
        let (_, payload) = z2m.reading(&Value::Contact { open: true });
        assert_eq!(
            json_of(&payload),
            json!({"contact": false}),
            "inverted: true means closed"
        );
        let (_, payload) = z2m.reading(&Value::Light {
            on: true,
            brightness_pct: 40,
        });
        assert_eq!(json_of(&payload), json!({"state": "ON", "brightness": 102}));
        let (topic, payload) = z2m.reading(&Value::Availability(true));
        assert_eq!(topic, "zigbee2mqtt/kitchen/spots/availability");
        assert_eq!(payload, b"online");
        assert_eq!(z2m.command_topic(), "zigbee2mqtt/kitchen/spots/set");
    }

    #[test]
    fn commands_in_both_conventions_are_understood() {
        let native = br#"{"on":true,"brightness_pct":40,"command_id":"c","correlation_id":"k"}"#;
        assert_eq!(
            parse_command(Convention::Native, DeviceKind::Light, native),
            Ok(Command::Light {
                on: true,
                brightness_pct: Some(40),
                correlation_id: Some("k".into())
            })
        );
        assert_eq!(
            parse_command(
                Convention::Zigbee2mqtt,
                DeviceKind::Light,
                br#"{"state":"ON","brightness":102}"#
            ),
            Ok(Command::Light {
                on: true,
                brightness_pct: Some(40),
                correlation_id: None
            })
        );
        assert_eq!(
            parse_command(
                Convention::Zigbee2mqtt,
                DeviceKind::Siren,
                br#"{"warning":{"mode":"emergency","level":"very_high"}}"#
            ),
            Ok(Command::Siren {
                on: true,
                correlation_id: None
            })
        );
        assert_eq!(
            parse_command(
                Convention::Zigbee2mqtt,
                DeviceKind::Siren,
                br#"{"warning":{"mode":"stop"}}"#
            ),
            Ok(Command::Siren {
                on: false,
                correlation_id: None
            })
        );
        assert_eq!(
            parse_command(Convention::Native, DeviceKind::Siren, br#"{"on":false}"#),
            Ok(Command::Siren {
                on: false,
                correlation_id: None
            })
        );
        assert!(parse_command(Convention::Native, DeviceKind::Light, b"on").is_err());
        assert_eq!(
            parse_command(Convention::Native, DeviceKind::Pir, br#"{"on":true}"#),
            Err(CommandError::NotCommandable(DeviceKind::Pir))
        );
    }

    #[test]
    fn keypad_requests_are_what_the_panel_reads() {
        assert_eq!(keypad_set_topic("home"), "hearth/home/alarm/set");
        assert_eq!(
            json_of(&keypad_request(KeypadAction::ArmAway, "1234")),
            json!({"action": "arm_away", "code": "1234"})
        );
        assert_eq!(keypad_refusal(br#"{"ok":true,"state":"arming"}"#), None);
        assert_eq!(
            keypad_refusal(
                br#"{"ok":false,"error":"cannot arm away: open zone (kitchen/window)"}"#
            )
            .as_deref(),
            Some("cannot arm away: open zone (kitchen/window)")
        );
    }
}
