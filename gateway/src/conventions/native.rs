//! hearth's own convention, for devices and scripts written with hearth in
//! mind: one topic per device and kind, one small JSON object per reading.
//!
//! Topic: `<prefix>/<home>/<room>/<device>/<kind>`, prefix `hearth` by
//! default, so exactly five levels with a one-level prefix. The convention
//! claims everything under `<prefix>/`, so that a topic of the wrong depth is
//! rejected with a reason (`unknown_topic`) rather than ignored. Home, room
//! and device must not be blank (`empty_identifier`).
//!
//! | kind           | payload                                   | range           |
//! |----------------|-------------------------------------------|-----------------|
//! | `motion`       | `{"detected": true}`                      |                 |
//! | `contact`      | `{"open": true}`                          |                 |
//! | `temperature`  | `{"celsius": 21.5}`                       | -60..=100       |
//! | `humidity`     | `{"percent": 40}`                         | 0..=100         |
//! | `illuminance`  | `{"lux": 120}`                            | 0..=200000      |
//! | `smoke`        | `{"detected": false}`                     |                 |
//! | `water_leak`   | `{"detected": false}`                     |                 |
//! | `tamper`       | `{"detected": false}`                     |                 |
//! | `battery`      | `{"percent": 80}`                         | 0..=100         |
//! | `button`       | `{"action": "single"}` (non-empty)        |                 |
//! | `light`        | `{"on": true, "brightness_pct": 40}`      | whole 0..=100, optional |
//! | `availability` | `{"online": true}`, or `online` / `offline` as the bare payload | |
//! | `notification_ack` | `{"notification_id": "…", "recipient": "alice"}` (recipient optional) | |
//!
//! Every JSON payload may carry `"ts"`, the device's time of the reading: an
//! RFC 3339 string with an offset (`"2024-05-01T12:00:00Z"`) or epoch
//! milliseconds (`1714564800000`). Other fields are ignored, so devices can
//! send extra diagnostics. `<prefix>/<home>/<room>/<device>/set` and `/get`
//! are command topics: acknowledged, not events. So is `<prefix>/<home>/alarm/set`,
//! the alarm panel's arm/disarm topic: its payload carries a code, so it is
//! routed to the security rule and never stored.
//!
//! Commands reach a device on `<prefix>/<home>/<room>/<device>/set` in the
//! shape of its own reports, with the command's ids:
//!
//! | command      | payload                                                                   |
//! |--------------|---------------------------------------------------------------------------|
//! | `light_set`  | `{"on": true, "brightness_pct": 40, "command_id": "…", "correlation_id": "…"}` (brightness only when set) |
//! | `siren_set`  | `{"on": true, "command_id": "…", "correlation_id": "…"}`                  |
//!
//! Rejections: a payload that is not a JSON object is `bad_payload`; a field
//! missing or of the wrong type is `missing_field`; a value outside its range
//! is `out_of_range`; a `ts` that cannot be read is `bad_timestamp`; a kind
//! not in the table is `unknown_kind`.

use hearth_proto::v1::event::Body;
use hearth_proto::v1::{command, Command};
use hearth_proto::v1::{
    Availability, Battery, ButtonPress, Contact, Humidity, Illuminance, LightState, Motion,
    NotificationAck, Smoke, Tamper, Temperature, WaterLeak,
};
use serde::Deserialize;

use super::{
    plain_availability, Convention, Decoded, Fields, Origin, RejectReason, Rejection,
    BATTERY_PERCENT, BRIGHTNESS_PERCENT, CELSIUS, HUMIDITY_PERCENT, LUX,
};

/// `[conventions.native]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Whether the gateway decodes hearth's own topics.
    pub enabled: bool,
    /// The first topic level(s): topics are `<prefix>/<home>/<room>/<device>/<kind>`.
    pub prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix: "hearth".to_owned(),
        }
    }
}

/// The decoder of hearth's own topics.
#[derive(Debug, Clone)]
pub struct Native {
    prefix: String,
}

impl Native {
    pub fn new(config: &Config) -> Self {
        Self {
            prefix: config.prefix.clone(),
        }
    }

    fn decode_levels(&self, levels: &str, payload: &[u8]) -> Result<Decoded, Rejection> {
        let levels: Vec<&str> = levels.split('/').collect();
        // A keypad's or panel's arm/disarm request carries a code: it is
        // routed to the security rule (`hearth-consumers security`
        // subscribes to it) and never stored.
        if let [_, "alarm", "set"] = levels[..] {
            return Ok(Decoded::NotAnEvent("alarm panel command"));
        }
        let [home, room, device, kind] = levels[..] else {
            return Err(Rejection::new(
                RejectReason::UnknownTopic,
                format!(
                    "expected `{}/<home>/<room>/<device>/<kind>`, got {} levels after `{}/`",
                    self.prefix,
                    levels.len(),
                    self.prefix
                ),
            ));
        };
        if matches!(kind, "set" | "get") {
            return Ok(Decoded::NotAnEvent("command topic"));
        }
        let origin = Origin::new(home, room, device)?;
        let Some((_, body)) = KINDS.iter().find(|(name, _)| *name == kind) else {
            let known: Vec<&str> = KINDS.iter().map(|(name, _)| *name).collect();
            return Err(Rejection::new(
                RejectReason::UnknownKind,
                format!("unknown kind `{kind}`; known kinds: {}", known.join(", ")),
            ));
        };
        if kind == "availability" {
            if let Some(online) = plain_availability(payload) {
                let body = Body::Availability(Availability { online });
                return Ok(Decoded::Events(vec![origin.reading(None, body)]));
            }
        }
        let fields = Fields::parse(payload)?;
        let body = body(&fields)?;
        let occurred_at = fields.timestamp("ts")?;
        Ok(Decoded::Events(vec![origin.reading(occurred_at, body)]))
    }
}

type BodyDecoder = fn(&Fields) -> Result<Body, Rejection>;

/// The kinds, in the order the `unknown_kind` detail lists them.
const KINDS: &[(&str, BodyDecoder)] = &[
    ("motion", |f| {
        Ok(Body::Motion(Motion {
            detected: f.bool("detected")?,
        }))
    }),
    ("contact", |f| {
        Ok(Body::Contact(Contact {
            open: f.bool("open")?,
        }))
    }),
    ("temperature", |f| {
        Ok(Body::Temperature(Temperature {
            celsius: f.number("celsius", CELSIUS)?,
        }))
    }),
    ("humidity", |f| {
        Ok(Body::Humidity(Humidity {
            percent: f.number("percent", HUMIDITY_PERCENT)?,
        }))
    }),
    ("illuminance", |f| {
        Ok(Body::Illuminance(Illuminance {
            lux: f.number("lux", LUX)?,
        }))
    }),
    ("smoke", |f| {
        Ok(Body::Smoke(Smoke {
            detected: f.bool("detected")?,
        }))
    }),
    ("water_leak", |f| {
        Ok(Body::WaterLeak(WaterLeak {
            detected: f.bool("detected")?,
        }))
    }),
    ("tamper", |f| {
        Ok(Body::Tamper(Tamper {
            detected: f.bool("detected")?,
        }))
    }),
    ("battery", |f| {
        Ok(Body::Battery(Battery {
            percent: f.number("percent", BATTERY_PERCENT)?,
        }))
    }),
    ("button", |f| {
        Ok(Body::Button(ButtonPress {
            action: f.string("action")?.to_owned(),
        }))
    }),
    ("light", |f| {
        Ok(Body::Light(LightState {
            on: f.bool("on")?,
            brightness_pct: f.opt_integer("brightness_pct", BRIGHTNESS_PERCENT)?,
        }))
    }),
    ("availability", |f| {
        Ok(Body::Availability(Availability {
            online: f.bool("online")?,
        }))
    }),
    // A person saw a critical notification (from a phone app or a button):
    // `{"notification_id":"…","recipient":"alice"}`.
    ("notification_ack", |f| {
        Ok(Body::NotificationAck(NotificationAck {
            notification_id: f.string("notification_id")?.to_owned(),
            recipient: f.opt_string("recipient")?.unwrap_or_default().to_owned(),
            via: "mqtt".to_owned(),
        }))
    }),
];

impl Convention for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn topic_root(&self) -> &str {
        &self.prefix
    }

    fn decode_claimed(&self, levels: &str, payload: &[u8]) -> Result<Decoded, Rejection> {
        self.decode_levels(levels, payload)
    }

    fn device_root<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let levels = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let (place, kind) = levels.rsplit_once('/')?;
        if place.split('/').count() != 3 || matches!(kind, "set" | "get") {
            return None;
        }
        Some(&topic[..topic.len() - kind.len() - 1])
    }

    fn command_payload(&self, command: &Command) -> Option<Vec<u8>> {
        let mut payload = serde_json::Map::new();
        match command.body.as_ref()? {
            command::Body::LightSet(set) => {
                payload.insert("on".into(), set.on.into());
                if let Some(brightness) = set.brightness_pct {
                    payload.insert("brightness_pct".into(), brightness.into());
                }
            }
            command::Body::SirenSet(set) => {
                payload.insert("on".into(), set.on.into());
            }
            command::Body::AlarmArm(_) | command::Body::AlarmDisarm(_) => return None,
        }
        // So that a device can tie what it reports back to the command.
        payload.insert("command_id".into(), command.id.clone().into());
        payload.insert(
            "correlation_id".into(),
            command.correlation_id.clone().into(),
        );
        serde_json::to_vec(&payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conventions::Reading;
    use pbjson_types::Timestamp;

    fn native() -> Native {
        Native::new(&Config::default())
    }

    fn decode(topic: &str, payload: &str) -> Option<Result<Decoded, Rejection>> {
        native().decode(topic, payload.as_bytes())
    }

    /// The one reading a valid publish decodes to.
    fn reading(topic: &str, payload: &str) -> Reading {
        match decode(topic, payload) {
            Some(Ok(Decoded::Events(mut readings))) if readings.len() == 1 => readings.remove(0),
            other => panic!("{topic} {payload}: expected one reading, got {other:?}"),
        }
    }

    fn body(kind: &str, payload: &str) -> Body {
        reading(&format!("hearth/home/kitchen/sensor/{kind}"), payload).body
    }

    fn rejected(topic: &str, payload: &str) -> Rejection {
        match decode(topic, payload) {
            Some(Err(rejection)) => rejection,
            other => panic!("{topic} {payload}: expected a rejection, got {other:?}"),
        }
    }

    fn kind_rejection(kind: &str, payload: &str) -> Rejection {
        rejected(&format!("hearth/home/kitchen/sensor/{kind}"), payload)
    }

    #[test]
    fn a_reading_carries_home_room_and_device_from_the_topic() {
        let reading = reading(
            "hearth/cabin/Living Room/Lamp.2/motion",
            r#"{"detected":true}"#,
        );
        assert_eq!(reading.home, "cabin");
        assert_eq!(reading.room, "Living Room");
        assert_eq!(reading.device, "Lamp.2");
        assert_eq!(reading.occurred_at, None);
        assert_eq!(reading.body, Body::Motion(Motion { detected: true }));
    }

    #[test]
    fn every_kind_decodes() {
        let cases = [
            (
                "motion",
                r#"{"detected":false}"#,
                Body::Motion(Motion { detected: false }),
            ),
            (
                "contact",
                r#"{"open":true}"#,
                Body::Contact(Contact { open: true }),
            ),
            (
                "temperature",
                r#"{"celsius":21.5}"#,
                Body::Temperature(Temperature { celsius: 21.5 }),
            ),
            (
                "humidity",
                r#"{"percent":40}"#,
                Body::Humidity(Humidity { percent: 40.0 }),
            ),
            (
                "illuminance",
                r#"{"lux":120}"#,
                Body::Illuminance(Illuminance { lux: 120.0 }),
            ),
            (
                "smoke",
                r#"{"detected":true}"#,
                Body::Smoke(Smoke { detected: true }),
            ),
            (
                "water_leak",
                r#"{"detected":true}"#,
                Body::WaterLeak(WaterLeak { detected: true }),
            ),
            (
                "tamper",
                r#"{"detected":true}"#,
                Body::Tamper(Tamper { detected: true }),
            ),
            (
                "battery",
                r#"{"percent":80}"#,
                Body::Battery(Battery { percent: 80.0 }),
            ),
            (
                "button",
                r#"{"action":"single"}"#,
                Body::Button(ButtonPress {
                    action: "single".into(),
                }),
            ),
            (
                "light",
                r#"{"on":true,"brightness_pct":40}"#,
                Body::Light(LightState {
                    on: true,
                    brightness_pct: Some(40),
                }),
            ),
            (
                "availability",
                r#"{"online":true}"#,
                Body::Availability(Availability { online: true }),
            ),
            (
                "notification_ack",
                r#"{"notification_id":"0193"}"#,
                Body::NotificationAck(NotificationAck {
                    notification_id: "0193".into(),
                    recipient: String::new(),
                    via: "mqtt".into(),
                }),
            ),
        ];
        assert_eq!(cases.len(), KINDS.len());
        for (kind, payload, expected) in cases {
            let decoded = body(kind, payload);
            assert_eq!(decoded.kind(), kind);
            assert_eq!(decoded, expected, "{kind}");
        }
    }

    #[test]
    fn a_light_without_brightness_has_none() {
        assert_eq!(
            body("light", r#"{"on":false}"#),
            Body::Light(LightState {
                on: false,
                brightness_pct: None
            })
        );
        assert_eq!(
            body("light", r#"{"on":true,"brightness_pct":null}"#),
            Body::Light(LightState {
                on: true,
                brightness_pct: None
            })
        );
    }

    #[test]
    fn availability_also_accepts_the_bare_online_and_offline_payloads() {
        assert_eq!(
            body("availability", "online"),
            Body::Availability(Availability { online: true })
        );
        assert_eq!(
            body("availability", "offline\n"),
            Body::Availability(Availability { online: false })
        );
    }

    #[test]
    fn ts_as_rfc3339_becomes_occurred_at() {
        let reading = reading(
            "hearth/home/kitchen/sensor/motion",
            r#"{"detected":true,"ts":"2024-05-01T14:00:00.250+02:00"}"#,
        );
        assert_eq!(
            reading.occurred_at,
            Some(Timestamp {
                seconds: 1_714_564_800,
                nanos: 250_000_000
            })
        );
    }

    #[test]
    fn ts_as_epoch_milliseconds_becomes_occurred_at() {
        let reading = reading(
            "hearth/home/kitchen/sensor/temperature",
            r#"{"celsius":20,"ts":1714564800250}"#,
        );
        assert_eq!(
            reading.occurred_at,
            Some(Timestamp {
                seconds: 1_714_564_800,
                nanos: 250_000_000
            })
        );
    }

    #[test]
    fn an_unreadable_ts_is_a_bad_timestamp() {
        for ts in [
            r#""yesterday""#,
            r#""2024-05-01T12:00:00""#,
            "true",
            "1.5",
            "1e30",
        ] {
            let payload = format!(r#"{{"detected":true,"ts":{ts}}}"#);
            let rejection = kind_rejection("motion", &payload);
            assert_eq!(rejection.reason, RejectReason::BadTimestamp, "{ts}");
            assert!(rejection.detail.contains("`ts`"), "{}", rejection.detail);
        }
    }

    #[test]
    fn unknown_extra_fields_are_ignored() {
        assert_eq!(
            body("contact", r#"{"open":false,"rssi":-70,"fw":"1.2"}"#),
            Body::Contact(Contact { open: false })
        );
    }

    #[test]
    fn the_alarm_panel_topic_is_routed_not_stored() {
        assert_eq!(
            decode(
                "hearth/home/alarm/set",
                r#"{"action":"DISARM","code":"1234"}"#
            ),
            Some(Ok(Decoded::NotAnEvent("alarm panel command")))
        );
    }

    #[test]
    fn a_notification_ack_names_the_notification() {
        assert_eq!(
            body(
                "notification_ack",
                r#"{"notification_id":"0193","recipient":"alice"}"#
            ),
            Body::NotificationAck(NotificationAck {
                notification_id: "0193".into(),
                recipient: "alice".into(),
                via: "mqtt".into(),
            })
        );
        let rejection = kind_rejection("notification_ack", r#"{"recipient":"alice"}"#);
        assert_eq!(rejection.reason, RejectReason::MissingField);
    }

    #[test]
    fn set_and_get_are_command_topics() {
        for topic in ["hearth/home/hall/lamp/set", "hearth/home/hall/lamp/get"] {
            assert_eq!(
                decode(topic, "{}"),
                Some(Ok(Decoded::NotAnEvent("command topic")))
            );
        }
    }

    #[test]
    fn an_unknown_kind_is_rejected_listing_the_known_kinds() {
        let rejection = kind_rejection("co2", r#"{"ppm":400}"#);
        assert_eq!(rejection.reason, RejectReason::UnknownKind);
        assert!(rejection.detail.contains("`co2`"), "{}", rejection.detail);
        assert!(
            rejection.detail.contains("water_leak"),
            "{}",
            rejection.detail
        );
    }

    #[test]
    fn a_topic_of_the_wrong_depth_under_the_prefix_is_an_unknown_topic() {
        for topic in [
            "hearth/home/kitchen/motion",
            "hearth/home/kitchen/sensor/motion/extra",
            "hearth/",
        ] {
            let rejection = rejected(topic, r#"{"detected":true}"#);
            assert_eq!(rejection.reason, RejectReason::UnknownTopic, "{topic}");
            assert!(rejection.detail.contains("<kind>"), "{}", rejection.detail);
        }
    }

    #[test]
    fn topics_outside_the_prefix_are_not_claimed() {
        for topic in [
            "zigbee2mqtt/lamp",
            "hearthling/home/kitchen/sensor/motion",
            "hearth",
        ] {
            assert_eq!(decode(topic, "{}"), None, "{topic}");
        }
    }

    #[test]
    fn the_prefix_is_configurable_and_may_span_levels() {
        let native = Native::new(&Config {
            enabled: true,
            prefix: "site/a".into(),
        });
        assert!(matches!(
            native.decode("site/a/home/kitchen/sensor/motion", br#"{"detected":true}"#),
            Some(Ok(Decoded::Events(_)))
        ));
        assert_eq!(
            native.decode("hearth/home/kitchen/sensor/motion", b"{}"),
            None
        );
        assert_eq!(native.topic_root(), "site/a");
    }

    #[test]
    fn blank_home_room_or_device_is_an_empty_identifier() {
        for topic in [
            "hearth//kitchen/sensor/motion",
            "hearth/home//sensor/motion",
            "hearth/home/kitchen//motion",
            "hearth/home/ /sensor/motion",
        ] {
            let rejection = rejected(topic, r#"{"detected":true}"#);
            assert_eq!(rejection.reason, RejectReason::EmptyIdentifier, "{topic}");
        }
    }

    #[test]
    fn non_json_and_non_object_payloads_are_bad_payloads() {
        for payload in ["", "true", "[1]", "{\"detected\":", "online", "\"yes\""] {
            let rejection = kind_rejection("motion", payload);
            assert_eq!(rejection.reason, RejectReason::BadPayload, "{payload:?}");
        }
    }

    #[test]
    fn availability_that_is_neither_bare_nor_json_is_a_bad_payload() {
        assert_eq!(
            kind_rejection("availability", "maybe").reason,
            RejectReason::BadPayload
        );
    }

    #[test]
    fn a_missing_field_is_named_with_its_expected_type() {
        let rejection = kind_rejection("temperature", r#"{"fahrenheit":70}"#);
        assert_eq!(rejection.reason, RejectReason::MissingField);
        assert_eq!(rejection.detail, "`celsius` is missing; expected a number");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_a_missing_field() {
        let cases = [
            (
                "motion",
                r#"{"detected":"yes"}"#,
                "`detected` must be a boolean, got a string",
            ),
            (
                "humidity",
                r#"{"percent":"40"}"#,
                "`percent` must be a number, got a string",
            ),
            (
                "button",
                r#"{"action":""}"#,
                "`action` is missing; expected a non-empty string",
            ),
            (
                "button",
                r#"{"action":1}"#,
                "`action` must be a string, got a number",
            ),
            (
                "light",
                r#"{"on":true,"brightness_pct":40.5}"#,
                "`brightness_pct` must be an integer, got a number",
            ),
            (
                "availability",
                r#"{"online":null}"#,
                "`online` is missing; expected a boolean",
            ),
        ];
        for (kind, payload, detail) in cases {
            let rejection = kind_rejection(kind, payload);
            assert_eq!(rejection.reason, RejectReason::MissingField, "{payload}");
            assert_eq!(rejection.detail, detail);
        }
    }

    #[test]
    fn implausible_values_are_out_of_range() {
        let cases = [
            (
                "temperature",
                r#"{"celsius":250}"#,
                "celsius 250 is outside -60..=100",
            ),
            (
                "temperature",
                r#"{"celsius":-60.5}"#,
                "celsius -60.5 is outside -60..=100",
            ),
            (
                "humidity",
                r#"{"percent":101}"#,
                "percent 101 is outside 0..=100",
            ),
            (
                "illuminance",
                r#"{"lux":-1}"#,
                "lux -1 is outside 0..=200000",
            ),
            (
                "battery",
                r#"{"percent":120}"#,
                "percent 120 is outside 0..=100",
            ),
            (
                "light",
                r#"{"on":true,"brightness_pct":101}"#,
                "brightness_pct 101 is outside 0..=100",
            ),
        ];
        for (kind, payload, detail) in cases {
            let rejection = kind_rejection(kind, payload);
            assert_eq!(rejection.reason, RejectReason::OutOfRange, "{payload}");
            assert_eq!(rejection.detail, detail);
        }
    }

    #[test]
    fn range_bounds_are_inclusive() {
        assert_eq!(
            body("temperature", r#"{"celsius":-60}"#),
            Body::Temperature(Temperature { celsius: -60.0 })
        );
        assert_eq!(
            body("illuminance", r#"{"lux":200000}"#),
            Body::Illuminance(Illuminance { lux: 200_000.0 })
        );
        assert_eq!(
            body("battery", r#"{"percent":0}"#),
            Body::Battery(Battery { percent: 0.0 })
        );
    }

    #[test]
    fn numbers_json_cannot_hold_are_bad_payloads() {
        // JSON has no NaN or infinity; a literal too big for f64 is refused by
        // the parser rather than becoming infinity.
        for payload in [
            r#"{"celsius":NaN}"#,
            r#"{"celsius":1e400}"#,
            r#"{"celsius":Infinity}"#,
        ] {
            assert_eq!(
                kind_rejection("temperature", payload).reason,
                RejectReason::BadPayload
            );
        }
    }

    #[test]
    fn the_device_root_is_the_topic_without_its_kind() {
        let native = native();
        assert_eq!(
            native.device_root("hearth/home/hall/pir/motion"),
            Some("hearth/home/hall/pir")
        );
        assert_eq!(native.device_root("hearth/home/hall/pir/set"), None);
        assert_eq!(native.device_root("hearth/home/hall/motion"), None);
        assert_eq!(native.device_root("zigbee2mqtt/x"), None);
    }

    #[test]
    fn commands_are_written_in_the_shape_of_the_readings() {
        use hearth_proto::v1::{AlarmArm, LightSet, SirenSet};
        let command = |body| Command {
            id: "c1".into(),
            correlation_id: "k1".into(),
            body: Some(body),
            ..Default::default()
        };
        let json = |body| -> serde_json::Value {
            serde_json::from_slice(&native().command_payload(&command(body)).unwrap()).unwrap()
        };
        assert_eq!(
            json(command::Body::LightSet(LightSet {
                on: true,
                brightness_pct: Some(40)
            })),
            serde_json::json!({"on": true, "brightness_pct": 40, "command_id": "c1", "correlation_id": "k1"})
        );
        assert_eq!(
            json(command::Body::LightSet(LightSet {
                on: false,
                brightness_pct: None
            })),
            serde_json::json!({"on": false, "command_id": "c1", "correlation_id": "k1"})
        );
        assert_eq!(
            json(command::Body::SirenSet(SirenSet { on: true })),
            serde_json::json!({"on": true, "command_id": "c1", "correlation_id": "k1"})
        );
        assert!(native()
            .command_payload(&command(command::Body::AlarmArm(AlarmArm::default())))
            .is_none());
    }
}
