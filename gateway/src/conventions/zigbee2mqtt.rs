//! Zigbee2MQTT's topics and payloads, so a Zigbee2MQTT instance can publish
//! to the gateway unchanged.
//!
//! Topics under `<base_topic>/` (default `zigbee2mqtt/`):
//!
//! - `<base_topic>/<friendly_name>`: a device report, one JSON object with
//!   many fields. Friendly names may contain `/`, so the depth varies.
//! - `<base_topic>/<friendly_name>/availability`: `online` / `offline`, or
//!   `{"state": "online"}` / `{"state": "offline"}`.
//! - `<base_topic>/<friendly_name>/set`, `/get`, `/set/<attribute>`,
//!   `/get/<attribute>`: commands to the device, acknowledged, not events.
//! - `<base_topic>/bridge` and `<base_topic>/bridge/...`: the bridge's own
//!   state, logs and device list, acknowledged, not events.
//!
//! Commands reach a device on `<base_topic>/<friendly_name>/set` in
//! Zigbee2MQTT's own shapes: `light_set` as `{"state": "ON", "brightness":
//! 102}` (brightness 0..=254, only when set), `siren_set` as a `warning`
//! (`{"mode": "emergency", "level": "very_high", "strobe": true, "duration":
//! 600}` on, `{"mode": "stop"}` off).
//!
//! Each recognised field of a report becomes one event, in this order:
//!
//! | field             | event         | notes                                                  |
//! |-------------------|---------------|--------------------------------------------------------|
//! | `occupancy`       | `motion`      |                                                        |
//! | `contact`         | `contact`     | inverted: Zigbee2MQTT's `contact: true` means *closed* |
//! | `illuminance_lux` | `illuminance` | or `illuminance` when there is no `illuminance_lux`; 0..=200000 |
//! | `temperature`     | `temperature` | -60..=100                                              |
//! | `humidity`        | `humidity`    | 0..=100                                                |
//! | `battery`         | `battery`     | 0..=100                                                |
//! | `smoke`           | `smoke`       |                                                        |
//! | `water_leak`      | `water_leak`  |                                                        |
//! | `tamper`          | `tamper`      |                                                        |
//! | `state`           | `light`       | only `ON` / `OFF`; `brightness` 0..=254 becomes a rounded percentage |
//! | `action`          | `button`      | skipped when empty                                     |
//!
//! A field that is `null` is skipped, as Zigbee2MQTT reports `"action": null`
//! or `""` between presses. Other fields (`linkquality`, `voltage`, `update`,
//! ...) are ignored, and so are `state` values other than `ON`/`OFF` (covers
//! and locks use the same field for `OPEN`, `LOCK`, ...) and a `brightness`
//! without a `state`. A report with no recognised field is acknowledged as
//! not an event. `last_seen`, when Zigbee2MQTT is configured to send it (ISO
//! 8601 string or epoch milliseconds), is the time of every event of the
//! report.
//!
//! One invalid recognised field (out of range, wrong type) rejects the whole
//! report, valid fields included: a device sending one impossible value is
//! suspect for all of them, and the report stays whole in `HEARTH_DLQ` to be
//! looked at and replayed, rather than half stored.
//!
//! Home, room and device: from the `devices` table entry for the friendly
//! name, field by field when present; otherwise a friendly name containing
//! `/` is `<room>/<device>`, split at its *last* `/` (`Upstairs/Bedroom/Lamp`
//! is room `Upstairs/Bedroom`, device `Lamp`); otherwise the room is
//! `default_room` and the device is the friendly name. The home is the
//! entry's or `home`. Spaces and dots in names are fine; subjects escape them.

use std::collections::BTreeMap;

use hearth_proto::v1::event::Body;
use hearth_proto::v1::{command, Command};
use hearth_proto::v1::{
    Availability, Battery, ButtonPress, Contact, Humidity, Illuminance, LightState, Motion, Smoke,
    Tamper, Temperature, WaterLeak,
};
use serde::Deserialize;

use super::{
    plain_availability, Convention, Decoded, Fields, Origin, RejectReason, Rejection,
    BATTERY_PERCENT, CELSIUS, HUMIDITY_PERCENT, LUX,
};

/// `[conventions.zigbee2mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Whether the gateway decodes Zigbee2MQTT's topics.
    pub enabled: bool,
    /// Zigbee2MQTT's `mqtt.base_topic`.
    pub base_topic: String,
    /// The home of every Zigbee2MQTT device without its own in `devices`.
    pub home: String,
    /// The room of a device whose friendly name has no `/` and which has no
    /// room in `devices`.
    pub default_room: String,
    /// Per friendly name, where the device is, overriding what the name says.
    pub devices: BTreeMap<String, DeviceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            base_topic: "zigbee2mqtt".to_owned(),
            home: "home".to_owned(),
            default_room: "unassigned".to_owned(),
            devices: BTreeMap::new(),
        }
    }
}

/// `[conventions.zigbee2mqtt.devices."<friendly name>"]`; every field is
/// optional and falls back to what the friendly name and defaults give.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// The device's home, instead of the convention's `home`.
    pub home: Option<String>,
    /// The device's room, instead of the one from its friendly name.
    pub room: Option<String>,
    /// The device's name in hearth, instead of the one from its friendly name.
    pub device: Option<String>,
}

/// The decoder of Zigbee2MQTT's topics.
#[derive(Debug, Clone)]
pub struct Zigbee2Mqtt {
    config: Config,
}

/// What a topic under the base topic is, once the base is removed.
enum Route<'a> {
    Bridge,
    Command,
    Availability(&'a str),
    Report(&'a str),
}

fn route(levels: &str) -> Route<'_> {
    if levels == "bridge" || levels.starts_with("bridge/") {
        return Route::Bridge;
    }
    let Some((before, last)) = levels.rsplit_once('/') else {
        return Route::Report(levels);
    };
    let is_command = |level: &str| matches!(level, "set" | "get");
    if is_command(last)
        || before
            .rsplit_once('/')
            .is_some_and(|(_, level)| is_command(level))
    {
        Route::Command
    } else if last == "availability" {
        Route::Availability(before)
    } else {
        Route::Report(levels)
    }
}

impl Zigbee2Mqtt {
    pub fn new(config: &Config) -> Self {
        Self {
            config: config.clone(),
        }
    }

    fn decode_levels(&self, levels: &str, payload: &[u8]) -> Result<Decoded, Rejection> {
        match route(levels) {
            Route::Bridge => Ok(Decoded::NotAnEvent("zigbee2mqtt bridge traffic")),
            Route::Command => Ok(Decoded::NotAnEvent("command topic")),
            Route::Availability(friendly_name) => {
                let origin = self.origin(friendly_name)?;
                let online = availability(payload)?;
                let body = Body::Availability(Availability { online });
                Ok(Decoded::Events(vec![origin.reading(None, body)]))
            }
            Route::Report(friendly_name) => {
                let origin = self.origin(friendly_name)?;
                let fields = Fields::parse(payload)?;
                let bodies = report(&fields)?;
                if bodies.is_empty() {
                    return Ok(Decoded::NotAnEvent("no recognised field"));
                }
                let occurred_at = fields.timestamp("last_seen")?;
                let readings = bodies
                    .into_iter()
                    .map(|body| origin.reading(occurred_at, body))
                    .collect();
                Ok(Decoded::Events(readings))
            }
        }
    }

    fn origin(&self, friendly_name: &str) -> Result<Origin, Rejection> {
        let (room, device) = friendly_name
            .rsplit_once('/')
            .unwrap_or((&self.config.default_room, friendly_name));
        let entry = self.config.devices.get(friendly_name);
        Origin::new(
            entry
                .and_then(|e| e.home.as_deref())
                .unwrap_or(&self.config.home),
            entry.and_then(|e| e.room.as_deref()).unwrap_or(room),
            entry.and_then(|e| e.device.as_deref()).unwrap_or(device),
        )
    }
}

fn availability(payload: &[u8]) -> Result<bool, Rejection> {
    if let Some(online) = plain_availability(payload) {
        return Ok(online);
    }
    let state = Fields::parse(payload)?.string("state")?.to_owned();
    plain_availability(state.as_bytes()).ok_or_else(|| {
        Rejection::new(
            RejectReason::BadPayload,
            format!("availability state `{state}` is neither `online` nor `offline`"),
        )
    })
}

/// The events of one device report, in the documented field order.
fn report(fields: &Fields) -> Result<Vec<Body>, Rejection> {
    let illuminance = match fields.opt_number("illuminance_lux", LUX)? {
        Some(lux) => Some(lux),
        None => fields.opt_number("illuminance", LUX)?,
    };
    let bodies = [
        fields
            .opt_bool("occupancy")?
            .map(|detected| Body::Motion(Motion { detected })),
        fields
            .opt_bool("contact")?
            .map(|closed| Body::Contact(Contact { open: !closed })),
        illuminance.map(|lux| Body::Illuminance(Illuminance { lux })),
        fields
            .opt_number("temperature", CELSIUS)?
            .map(|celsius| Body::Temperature(Temperature { celsius })),
        fields
            .opt_number("humidity", HUMIDITY_PERCENT)?
            .map(|percent| Body::Humidity(Humidity { percent })),
        fields
            .opt_number("battery", BATTERY_PERCENT)?
            .map(|percent| Body::Battery(Battery { percent })),
        fields
            .opt_bool("smoke")?
            .map(|detected| Body::Smoke(Smoke { detected })),
        fields
            .opt_bool("water_leak")?
            .map(|detected| Body::WaterLeak(WaterLeak { detected })),
        fields
            .opt_bool("tamper")?
            .map(|detected| Body::Tamper(Tamper { detected })),
        light(fields)?,
        fields.opt_string("action")?.map(|action| {
            Body::Button(ButtonPress {
                action: action.to_owned(),
            })
        }),
    ];
    Ok(bodies.into_iter().flatten().collect())
}

/// Zigbee brightness runs 0..=254.
const ZIGBEE_BRIGHTNESS: std::ops::RangeInclusive<u32> = 0..=254;

fn light(fields: &Fields) -> Result<Option<Body>, Rejection> {
    let on = match fields.raw_str("state") {
        Some(state) if state.eq_ignore_ascii_case("on") => true,
        Some(state) if state.eq_ignore_ascii_case("off") => false,
        _ => return Ok(None),
    };
    let brightness_pct = fields
        .opt_integer("brightness", ZIGBEE_BRIGHTNESS)?
        .map(|level| (f64::from(level) * 100.0 / 254.0).round() as u32);
    Ok(Some(Body::Light(LightState { on, brightness_pct })))
}

impl Convention for Zigbee2Mqtt {
    fn name(&self) -> &'static str {
        "zigbee2mqtt"
    }

    fn topic_root(&self) -> &str {
        &self.config.base_topic
    }

    fn decode_claimed(&self, levels: &str, payload: &[u8]) -> Result<Decoded, Rejection> {
        self.decode_levels(levels, payload)
    }

    fn device_root<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let base = self.config.base_topic.as_str();
        let levels = topic.strip_prefix(base)?.strip_prefix('/')?;
        match route(levels) {
            Route::Report(name) | Route::Availability(name) => {
                Some(&topic[..base.len() + 1 + name.len()])
            }
            Route::Bridge | Route::Command => None,
        }
    }

    fn command_payload(&self, command: &Command) -> Option<Vec<u8>> {
        let payload = match command.body.as_ref()? {
            command::Body::LightSet(set) => {
                let mut payload = serde_json::json!({ "state": if set.on { "ON" } else { "OFF" } });
                if let Some(percent) = set.brightness_pct {
                    let level = (f64::from(percent.min(100)) * 254.0 / 100.0).round() as u32;
                    payload["brightness"] = level.into();
                }
                payload
            }
            command::Body::SirenSet(set) if set.on => serde_json::json!({
                "warning": { "mode": "emergency", "level": "very_high", "strobe": true, "duration": 600 }
            }),
            command::Body::SirenSet(_) => serde_json::json!({ "warning": { "mode": "stop" } }),
            command::Body::AlarmArm(_) | command::Body::AlarmDisarm(_) => return None,
        };
        serde_json::to_vec(&payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conventions::Reading;
    use pbjson_types::Timestamp;

    fn z2m() -> Zigbee2Mqtt {
        Zigbee2Mqtt::new(&Config::default())
    }

    fn decode_with(
        z2m: &Zigbee2Mqtt,
        topic: &str,
        payload: &str,
    ) -> Option<Result<Decoded, Rejection>> {
        z2m.decode(topic, payload.as_bytes())
    }

    fn readings_with(z2m: &Zigbee2Mqtt, topic: &str, payload: &str) -> Vec<Reading> {
        match decode_with(z2m, topic, payload) {
            Some(Ok(Decoded::Events(readings))) => readings,
            other => panic!("{topic} {payload}: expected events, got {other:?}"),
        }
    }

    fn readings(topic: &str, payload: &str) -> Vec<Reading> {
        readings_with(&z2m(), topic, payload)
    }

    fn bodies(payload: &str) -> Vec<Body> {
        readings("zigbee2mqtt/sensor", payload)
            .into_iter()
            .map(|r| r.body)
            .collect()
    }

    fn rejected(topic: &str, payload: &str) -> Rejection {
        match decode_with(&z2m(), topic, payload) {
            Some(Err(rejection)) => rejection,
            other => panic!("{topic} {payload}: expected a rejection, got {other:?}"),
        }
    }

    fn not_an_event(topic: &str, payload: &str) -> &'static str {
        match decode_with(&z2m(), topic, payload) {
            Some(Ok(Decoded::NotAnEvent(why))) => why,
            other => panic!("{topic} {payload}: expected not an event, got {other:?}"),
        }
    }

    fn place(reading: &Reading) -> (&str, &str, &str) {
        (&reading.home, &reading.room, &reading.device)
    }

    #[test]
    fn every_recognised_field_becomes_one_event_in_the_documented_order() {
        let payload = r#"{
            "action": "single", "state": "ON", "brightness": 127, "tamper": false,
            "water_leak": false, "smoke": false, "battery": 91, "humidity": 48.5,
            "temperature": 21.3, "illuminance_lux": 310, "contact": true, "occupancy": true,
            "linkquality": 120, "voltage": 2900
        }"#;
        assert_eq!(
            bodies(payload),
            vec![
                Body::Motion(Motion { detected: true }),
                Body::Contact(Contact { open: false }),
                Body::Illuminance(Illuminance { lux: 310.0 }),
                Body::Temperature(Temperature { celsius: 21.3 }),
                Body::Humidity(Humidity { percent: 48.5 }),
                Body::Battery(Battery { percent: 91.0 }),
                Body::Smoke(Smoke { detected: false }),
                Body::WaterLeak(WaterLeak { detected: false }),
                Body::Tamper(Tamper { detected: false }),
                Body::Light(LightState {
                    on: true,
                    brightness_pct: Some(50)
                }),
                Body::Button(ButtonPress {
                    action: "single".into()
                }),
            ]
        );
    }

    #[test]
    fn zigbee2mqtt_contact_true_means_closed() {
        assert_eq!(
            bodies(r#"{"contact":true}"#),
            vec![Body::Contact(Contact { open: false })]
        );
        assert_eq!(
            bodies(r#"{"contact":false}"#),
            vec![Body::Contact(Contact { open: true })]
        );
    }

    #[test]
    fn illuminance_lux_wins_over_raw_illuminance() {
        assert_eq!(
            bodies(r#"{"illuminance":30000,"illuminance_lux":120}"#),
            vec![Body::Illuminance(Illuminance { lux: 120.0 })]
        );
        assert_eq!(
            bodies(r#"{"illuminance":95}"#),
            vec![Body::Illuminance(Illuminance { lux: 95.0 })]
        );
    }

    #[test]
    fn state_on_off_is_a_light_and_brightness_is_scaled_to_percent() {
        assert_eq!(
            bodies(r#"{"state":"OFF"}"#),
            vec![Body::Light(LightState {
                on: false,
                brightness_pct: None
            })]
        );
        for (brightness, pct) in [(0, 0), (1, 0), (2, 1), (254, 100), (127, 50), (64, 25)] {
            assert_eq!(
                bodies(&format!(r#"{{"state":"ON","brightness":{brightness}}}"#)),
                vec![Body::Light(LightState {
                    on: true,
                    brightness_pct: Some(pct)
                })],
                "{brightness}"
            );
        }
    }

    #[test]
    fn other_states_and_brightness_without_state_are_not_lights() {
        for payload in [
            r#"{"state":"OPEN"}"#,
            r#"{"state":"LOCK"}"#,
            r#"{"brightness":100}"#,
            r#"{"state":1}"#,
        ] {
            assert_eq!(
                not_an_event("zigbee2mqtt/thing", payload),
                "no recognised field",
                "{payload}"
            );
        }
    }

    #[test]
    fn null_fields_and_an_empty_action_are_skipped() {
        assert_eq!(
            bodies(r#"{"action":null,"occupancy":null,"temperature":null,"battery":80}"#),
            vec![Body::Battery(Battery { percent: 80.0 })]
        );
        assert_eq!(
            bodies(r#"{"action":"","occupancy":false}"#),
            vec![Body::Motion(Motion { detected: false })]
        );
    }

    #[test]
    fn a_report_with_no_recognised_field_is_not_an_event() {
        for payload in [
            "{}",
            r#"{"linkquality":87,"update":{"state":"idle"}}"#,
            r#"{"action":""}"#,
        ] {
            assert_eq!(
                not_an_event("zigbee2mqtt/thing", payload),
                "no recognised field"
            );
        }
    }

    #[test]
    fn last_seen_is_the_time_of_every_event_in_both_forms() {
        let expected = Some(Timestamp {
            seconds: 1_714_564_800,
            nanos: 0,
        });
        for last_seen in [
            r#""2024-05-01T12:00:00.000Z""#,
            r#""2024-05-01T14:00:00+02:00""#,
            "1714564800000",
        ] {
            let payload = format!(r#"{{"occupancy":true,"battery":50,"last_seen":{last_seen}}}"#);
            let readings = readings("zigbee2mqtt/sensor", &payload);
            assert_eq!(readings.len(), 2);
            assert!(
                readings.iter().all(|r| r.occurred_at == expected),
                "{last_seen}"
            );
        }
        assert!(readings("zigbee2mqtt/sensor", r#"{"occupancy":true}"#)[0]
            .occurred_at
            .is_none());
    }

    #[test]
    fn an_unreadable_last_seen_is_a_bad_timestamp() {
        let rejection = rejected(
            "zigbee2mqtt/sensor",
            r#"{"occupancy":true,"last_seen":"soon"}"#,
        );
        assert_eq!(rejection.reason, RejectReason::BadTimestamp);
    }

    #[test]
    fn one_out_of_range_field_rejects_the_whole_report() {
        let rejection = rejected(
            "zigbee2mqtt/sensor",
            r#"{"occupancy":true,"temperature":250}"#,
        );
        assert_eq!(rejection.reason, RejectReason::OutOfRange);
        assert_eq!(rejection.detail, "temperature 250 is outside -60..=100");
        let rejection = rejected("zigbee2mqtt/lamp", r#"{"state":"ON","brightness":255}"#);
        assert_eq!(rejection.detail, "brightness 255 is outside 0..=254");
        for payload in [
            r#"{"humidity":-3}"#,
            r#"{"battery":101}"#,
            r#"{"illuminance_lux":250000}"#,
        ] {
            let rejection = rejected("zigbee2mqtt/sensor", payload);
            assert_eq!(rejection.reason, RejectReason::OutOfRange, "{payload}");
        }
    }

    #[test]
    fn a_recognised_field_of_the_wrong_type_is_a_missing_field() {
        for payload in [
            r#"{"occupancy":"yes"}"#,
            r#"{"temperature":"21"}"#,
            r#"{"action":3}"#,
            r#"{"state":"ON","brightness":12.5}"#,
        ] {
            let rejection = rejected("zigbee2mqtt/sensor", payload);
            assert_eq!(rejection.reason, RejectReason::MissingField, "{payload}");
        }
    }

    #[test]
    fn invalid_json_or_a_non_object_is_a_bad_payload() {
        for payload in ["", "not json", "[]", "42", r#""ON""#, "{\"occupancy\":"] {
            let rejection = rejected("zigbee2mqtt/sensor", payload);
            assert_eq!(rejection.reason, RejectReason::BadPayload, "{payload:?}");
        }
    }

    #[test]
    fn availability_accepts_plain_and_json_forms() {
        for (payload, online) in [
            ("online", true),
            ("offline", false),
            (r#"{"state":"online"}"#, true),
            (r#"{"state":"offline"}"#, false),
        ] {
            let readings = readings("zigbee2mqtt/Hall/Lamp/availability", payload);
            assert_eq!(readings.len(), 1);
            assert_eq!(place(&readings[0]), ("home", "Hall", "Lamp"));
            assert_eq!(
                readings[0].body,
                Body::Availability(Availability { online }),
                "{payload}"
            );
        }
    }

    #[test]
    fn availability_with_another_state_is_rejected() {
        assert_eq!(
            rejected("zigbee2mqtt/lamp/availability", r#"{"state":"sleepy"}"#).reason,
            RejectReason::BadPayload
        );
        assert_eq!(
            rejected("zigbee2mqtt/lamp/availability", "maybe").reason,
            RejectReason::BadPayload
        );
        assert_eq!(
            rejected("zigbee2mqtt/lamp/availability", r#"{"online":true}"#).reason,
            RejectReason::MissingField
        );
    }

    #[test]
    fn set_and_get_topics_are_commands() {
        for topic in [
            "zigbee2mqtt/lamp/set",
            "zigbee2mqtt/lamp/get",
            "zigbee2mqtt/Living Room/Lamp 2/set",
            "zigbee2mqtt/lamp/set/brightness",
            "zigbee2mqtt/lamp/get/state",
        ] {
            assert_eq!(
                not_an_event(topic, r#"{"state":"ON"}"#),
                "command topic",
                "{topic}"
            );
        }
    }

    #[test]
    fn bridge_topics_are_bridge_traffic() {
        for topic in [
            "zigbee2mqtt/bridge",
            "zigbee2mqtt/bridge/state",
            "zigbee2mqtt/bridge/devices",
            "zigbee2mqtt/bridge/response/device/rename",
        ] {
            assert_eq!(
                not_an_event(topic, r#"{"state":"online"}"#),
                "zigbee2mqtt bridge traffic"
            );
        }
    }

    #[test]
    fn a_plain_friendly_name_is_the_device_in_the_default_room() {
        let reading = &readings("zigbee2mqtt/Living Room.Lamp 2", r#"{"state":"ON"}"#)[0];
        assert_eq!(place(reading), ("home", "unassigned", "Living Room.Lamp 2"));
    }

    #[test]
    fn a_friendly_name_with_slashes_splits_into_room_and_device_at_the_last_slash() {
        let reading = &readings("zigbee2mqtt/Living Room/Lamp 2", r#"{"state":"ON"}"#)[0];
        assert_eq!(place(reading), ("home", "Living Room", "Lamp 2"));
        let reading = &readings("zigbee2mqtt/Upstairs/Bed.room/Lamp", r#"{"state":"ON"}"#)[0];
        assert_eq!(place(reading), ("home", "Upstairs/Bed.room", "Lamp"));
    }

    #[test]
    fn the_device_map_overrides_home_room_and_device_field_by_field() {
        let mut config = Config {
            home: "cabin".into(),
            default_room: "hall".into(),
            ..Config::default()
        };
        config.devices.insert(
            "0x00158d0001a2b3c4".into(),
            DeviceConfig {
                home: None,
                room: Some("Kitchen".into()),
                device: Some("Fridge door".into()),
            },
        );
        config.devices.insert(
            "Garden/Gate".into(),
            DeviceConfig {
                home: Some("barn".into()),
                room: None,
                device: None,
            },
        );
        let z2m = Zigbee2Mqtt::new(&config);
        let reading = &readings_with(
            &z2m,
            "zigbee2mqtt/0x00158d0001a2b3c4",
            r#"{"contact":false}"#,
        )[0];
        assert_eq!(place(reading), ("cabin", "Kitchen", "Fridge door"));
        let reading = &readings_with(&z2m, "zigbee2mqtt/Garden/Gate", r#"{"contact":false}"#)[0];
        assert_eq!(place(reading), ("barn", "Garden", "Gate"));
        let reading = &readings_with(&z2m, "zigbee2mqtt/Porch", r#"{"contact":false}"#)[0];
        assert_eq!(place(reading), ("cabin", "hall", "Porch"));
    }

    #[test]
    fn the_device_map_applies_to_availability_too() {
        let mut config = Config::default();
        config.devices.insert(
            "lamp".into(),
            DeviceConfig {
                home: None,
                room: Some("Attic".into()),
                device: None,
            },
        );
        let reading = &readings_with(
            &Zigbee2Mqtt::new(&config),
            "zigbee2mqtt/lamp/availability",
            "online",
        )[0];
        assert_eq!(place(reading), ("home", "Attic", "lamp"));
    }

    #[test]
    fn a_friendly_name_giving_a_blank_room_or_device_is_an_empty_identifier() {
        for topic in [
            "zigbee2mqtt/",
            "zigbee2mqtt/Kitchen/",
            "zigbee2mqtt//Lamp",
            "zigbee2mqtt/ /availability",
        ] {
            let rejection = rejected(topic, r#"{"occupancy":true}"#);
            assert_eq!(rejection.reason, RejectReason::EmptyIdentifier, "{topic}");
        }
    }

    #[test]
    fn a_blank_override_is_an_empty_identifier() {
        let mut config = Config::default();
        config.devices.insert(
            "lamp".into(),
            DeviceConfig {
                home: Some(String::new()),
                room: None,
                device: None,
            },
        );
        let z2m = Zigbee2Mqtt::new(&config);
        assert!(matches!(
            decode_with(&z2m, "zigbee2mqtt/lamp", r#"{"state":"ON"}"#),
            Some(Err(Rejection {
                reason: RejectReason::EmptyIdentifier,
                ..
            }))
        ));
    }

    #[test]
    fn only_topics_under_the_base_topic_are_claimed() {
        for topic in [
            "zigbee2mqtt",
            "zigbee2mqttx/lamp",
            "hearth/home/hall/lamp/motion",
            "other/zigbee2mqtt/lamp",
        ] {
            assert_eq!(decode_with(&z2m(), topic, "{}"), None, "{topic}");
        }
    }

    #[test]
    fn the_base_topic_is_configurable() {
        let z2m = Zigbee2Mqtt::new(&Config {
            base_topic: "zb".into(),
            ..Config::default()
        });
        assert_eq!(readings_with(&z2m, "zb/lamp", r#"{"state":"ON"}"#).len(), 1);
        assert_eq!(decode_with(&z2m, "zigbee2mqtt/lamp", "{}"), None);
        assert_eq!(z2m.topic_root(), "zb");
    }

    #[test]
    fn config_reads_from_toml_shaped_json_and_refuses_unknown_fields() {
        let config: Config = serde_json::from_str(
            r#"{"home":"cabin","devices":{"Living Room.Lamp 2":{"room":"Lounge"}}}"#,
        )
        .expect("valid config");
        assert!(config.enabled);
        assert_eq!(config.base_topic, "zigbee2mqtt");
        assert_eq!(
            config.devices["Living Room.Lamp 2"].room.as_deref(),
            Some("Lounge")
        );
        assert!(serde_json::from_str::<Config>(r#"{"basetopic":"z"}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"devices":{"x":{"rooms":"a"}}}"#).is_err());
    }

    #[test]
    fn the_device_root_is_the_base_topic_and_friendly_name() {
        let z2m = z2m();
        assert_eq!(
            z2m.device_root("zigbee2mqtt/Hall/Lamp 2"),
            Some("zigbee2mqtt/Hall/Lamp 2")
        );
        assert_eq!(
            z2m.device_root("zigbee2mqtt/Hall/Lamp 2/availability"),
            Some("zigbee2mqtt/Hall/Lamp 2")
        );
        assert_eq!(z2m.device_root("zigbee2mqtt/Hall/Lamp 2/set"), None);
        assert_eq!(z2m.device_root("zigbee2mqtt/bridge/state"), None);
        assert_eq!(z2m.device_root("hearth/a/b/c/motion"), None);
    }

    #[test]
    fn commands_are_written_in_zigbee2mqtt_shapes() {
        use hearth_proto::v1::{AlarmDisarm, LightSet, SirenSet};
        let json = |body| -> serde_json::Value {
            let command = Command {
                body: Some(body),
                ..Default::default()
            };
            serde_json::from_slice(&z2m().command_payload(&command).unwrap()).unwrap()
        };
        assert_eq!(
            json(command::Body::LightSet(LightSet {
                on: true,
                brightness_pct: Some(100)
            })),
            serde_json::json!({"state": "ON", "brightness": 254})
        );
        assert_eq!(
            json(command::Body::LightSet(LightSet {
                on: false,
                brightness_pct: None
            })),
            serde_json::json!({"state": "OFF"})
        );
        assert_eq!(
            json(command::Body::SirenSet(SirenSet { on: false })),
            serde_json::json!({"warning": {"mode": "stop"}})
        );
        assert_eq!(
            json(command::Body::SirenSet(SirenSet { on: true }))["warning"]["mode"],
            "emergency"
        );
        let disarm = Command {
            body: Some(command::Body::AlarmDisarm(AlarmDisarm::default())),
            ..Default::default()
        };
        assert!(z2m().command_payload(&disarm).is_none());
    }
}
