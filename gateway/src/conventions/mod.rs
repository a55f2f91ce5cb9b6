//! Payload conventions: how devices name their topics and shape their
//! payloads. Each convention is one module implementing [`Convention`]; the
//! gateway asks them in turn which one claims a topic.

use std::ops::RangeInclusive;

use hearth_proto::v1::event::Body;
use hearth_proto::v1::Command;
use pbjson_types::Timestamp;
use serde::Deserialize;
use serde_json::{Map, Value};

pub mod native;
pub mod zigbee2mqtt;

/// `[conventions]`: which payload conventions the gateway understands.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConventionsConfig {
    /// hearth's own topics and payloads, `hearth/<home>/<room>/<device>/<kind>`.
    pub native: native::Config,
    /// Zigbee2MQTT's device reports, `zigbee2mqtt/<friendly_name>`.
    pub zigbee2mqtt: zigbee2mqtt::Config,
}

/// The enabled conventions, asked in a fixed order: native first, then
/// Zigbee2MQTT. The first that claims a topic decodes it, so a native prefix
/// equal to the Zigbee2MQTT base topic would hide Zigbee2MQTT entirely.
#[derive(Debug)]
pub struct Conventions {
    enabled: Vec<Box<dyn Convention>>,
}

impl Conventions {
    pub fn new(config: &ConventionsConfig) -> Self {
        let mut enabled: Vec<Box<dyn Convention>> = Vec::new();
        if config.native.enabled {
            enabled.push(Box::new(native::Native::new(&config.native)));
        }
        if config.zigbee2mqtt.enabled {
            enabled.push(Box::new(zigbee2mqtt::Zigbee2Mqtt::new(&config.zigbee2mqtt)));
        }
        Self { enabled }
    }

    /// The enabled convention called `name`.
    pub fn get(&self, name: &str) -> Option<&dyn Convention> {
        self.enabled
            .iter()
            .find(|convention| convention.name() == name)
            .map(|convention| &**convention)
    }

    /// The convention of devices hearth knows nothing about: the native one
    /// when enabled.
    pub fn fallback(&self) -> Option<&dyn Convention> {
        self.get("native")
    }

    /// Decodes one publish with the convention that claims its topic, and
    /// names that convention (`"none"` when no convention claims it).
    pub fn decode(
        &self,
        topic: &str,
        payload: &[u8],
    ) -> (&'static str, Result<Decoded, Rejection>) {
        for convention in &self.enabled {
            if let Some(decoded) = convention.decode(topic, payload) {
                return (convention.name(), decoded);
            }
        }
        let roots = if self.enabled.is_empty() {
            "none, every convention is disabled".to_owned()
        } else {
            self.enabled
                .iter()
                .map(|c| format!("`{}/...` ({})", c.topic_root(), c.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let detail = format!("no convention claims topic `{topic}`; accepted roots: {roots}");
        (
            "none",
            Err(Rejection::new(RejectReason::UnknownTopic, detail)),
        )
    }
}

/// One observation decoded from a publish, before the gateway gives it ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub home: String,
    pub room: String,
    pub device: String,
    /// The device's own time for the observation, when the payload had one.
    pub occurred_at: Option<pbjson_types::Timestamp>,
    pub body: Body,
}

/// What a convention made of one publish it claimed.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Device events, in the order the convention documents.
    Events(Vec<Reading>),
    /// Traffic that belongs to the convention but is not a device event (the
    /// Zigbee2MQTT bridge's own topics, command topics, a report with no field
    /// hearth knows): acknowledged and counted, not stored.
    NotAnEvent(&'static str),
}

/// Why a publish could not become an event; it goes to `HEARTH_DLQ`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The reasons a message is dead-lettered; each is a subject token of
/// `hearth.dlq.gateway.<reason>` and the `Hearth-Reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No convention claims the topic.
    UnknownTopic,
    /// The payload is not the JSON (or plain value) the convention expects.
    BadPayload,
    /// The topic names a kind of event hearth does not know.
    UnknownKind,
    /// A required field is missing or has the wrong type.
    MissingField,
    /// A value is outside what a real sensor can report.
    OutOfRange,
    /// The `ts` field is not RFC 3339 or epoch milliseconds.
    BadTimestamp,
    /// Home, room or device would be empty.
    EmptyIdentifier,
    /// Home, room or device names so long that the subject would exceed
    /// what NATS accepts on one protocol line.
    NameTooLong,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownTopic => "unknown_topic",
            Self::BadPayload => "bad_payload",
            Self::UnknownKind => "unknown_kind",
            Self::MissingField => "missing_field",
            Self::OutOfRange => "out_of_range",
            Self::BadTimestamp => "bad_timestamp",
            Self::EmptyIdentifier => "empty_identifier",
            Self::NameTooLong => "name_too_long",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A payload convention.
pub trait Convention: Send + Sync + std::fmt::Debug {
    /// Short name, recorded in `Event.source.convention`: `native`, `zigbee2mqtt`.
    fn name(&self) -> &'static str;

    /// The topic level(s) under which the convention claims every topic,
    /// e.g. `hearth`; named in the detail of an `unknown_topic` rejection.
    fn topic_root(&self) -> &str;

    /// What a publish under the topic root decodes to; `levels` is the
    /// topic after `<root>/`.
    fn decode_claimed(&self, levels: &str, payload: &[u8]) -> Result<Decoded, Rejection>;

    /// The part of a device's topic that names the device, which its
    /// command topic extends with `/set`: for native
    /// `hearth/<home>/<room>/<device>`, for Zigbee2MQTT
    /// `zigbee2mqtt/<friendly name>`. `None` for a topic that is not a
    /// device's report.
    fn device_root<'t>(&self, topic: &'t str) -> Option<&'t str>;

    /// The payload of `command` in this convention's `/set` shape; `None`
    /// for a command that is not for devices (arming the alarm).
    fn command_payload(&self, command: &Command) -> Option<Vec<u8>>;

    /// `None` when the topic is not this convention's (not under
    /// `<root>/`); otherwise what the publish decodes to.
    fn decode(&self, topic: &str, payload: &[u8]) -> Option<Result<Decoded, Rejection>> {
        let levels = topic.strip_prefix(self.topic_root())?.strip_prefix('/')?;
        Some(self.decode_claimed(levels, payload))
    }
}

// What follows is shared by the conventions so that a value means the same,
// and is refused for the same reason, whichever convention carried it.

/// Plausible values: a sensor reporting outside them is broken or
/// misconfigured, and storing its reading would only mislead whoever reads
/// the history. Documented in the README.
pub(crate) const CELSIUS: RangeInclusive<f64> = -60.0..=100.0;
pub(crate) const HUMIDITY_PERCENT: RangeInclusive<f64> = 0.0..=100.0;
pub(crate) const LUX: RangeInclusive<f64> = 0.0..=200_000.0;
pub(crate) const BATTERY_PERCENT: RangeInclusive<f64> = 0.0..=100.0;
pub(crate) const BRIGHTNESS_PERCENT: RangeInclusive<u32> = 0..=100;

/// Where a reading comes from, checked to be usable as subject tokens.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Origin {
    home: String,
    room: String,
    device: String,
}

impl Origin {
    /// Refuses blank names: an empty token would make an invalid subject,
    /// and a name of only spaces is a configuration or firmware mistake.
    pub(crate) fn new(home: &str, room: &str, device: &str) -> Result<Self, Rejection> {
        for (what, name) in [("home", home), ("room", room), ("device", device)] {
            if name.trim().is_empty() {
                return Err(Rejection::new(
                    RejectReason::EmptyIdentifier,
                    format!("the {what} name is empty (home `{home}`, room `{room}`, device `{device}`)"),
                ));
            }
        }
        Ok(Self {
            home: home.to_owned(),
            room: room.to_owned(),
            device: device.to_owned(),
        })
    }

    pub(crate) fn reading(&self, occurred_at: Option<Timestamp>, body: Body) -> Reading {
        Reading {
            home: self.home.clone(),
            room: self.room.clone(),
            device: self.device.clone(),
            occurred_at,
            body,
        }
    }
}

/// `online` or `offline` as a bare payload, the way MQTT last wills and
/// birth messages usually say it.
pub(crate) fn plain_availability(payload: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    if text.eq_ignore_ascii_case("online") {
        Some(true)
    } else if text.eq_ignore_ascii_case("offline") {
        Some(false)
    } else {
        None
    }
}

/// The fields of a JSON object payload, read with the checks every
/// convention applies. A field that is `null` counts as absent, since
/// Zigbee2MQTT sends `null` for values it does not have.
#[derive(Debug)]
pub(crate) struct Fields(Map<String, Value>);

impl Fields {
    pub(crate) fn parse(payload: &[u8]) -> Result<Self, Rejection> {
        match serde_json::from_slice(payload) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(other) => Err(Rejection::new(
                RejectReason::BadPayload,
                format!("expected a JSON object, got {}", type_name(&other)),
            )),
            Err(e) => Err(Rejection::new(
                RejectReason::BadPayload,
                format!("not valid JSON: {e}"),
            )),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn bool(&self, field: &str) -> Result<bool, Rejection> {
        self.opt_bool(field)?
            .ok_or_else(|| missing(field, "a boolean"))
    }

    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>, Rejection> {
        self.get(field)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(field, "a boolean", v)))
            .transpose()
    }

    pub(crate) fn number(&self, field: &str, range: RangeInclusive<f64>) -> Result<f64, Rejection> {
        self.opt_number(field, range)?
            .ok_or_else(|| missing(field, "a number"))
    }

    pub(crate) fn opt_number(
        &self,
        field: &str,
        range: RangeInclusive<f64>,
    ) -> Result<Option<f64>, Rejection> {
        self.get(field)
            .map(|v| {
                let number = v.as_f64().ok_or_else(|| wrong_type(field, "a number", v))?;
                in_range(field, number, range)
            })
            .transpose()
    }

    /// A whole number; `40.0` counts, `40.5` does not.
    pub(crate) fn opt_integer(
        &self,
        field: &str,
        range: RangeInclusive<u32>,
    ) -> Result<Option<u32>, Rejection> {
        self.get(field)
            .map(|v| {
                let number = v
                    .as_f64()
                    .filter(|n| n.fract() == 0.0)
                    .ok_or_else(|| wrong_type(field, "an integer", v))?;
                let range = f64::from(*range.start())..=f64::from(*range.end());
                // In range, so a whole number that fits.
                in_range(field, number, range).map(|n| n as u32)
            })
            .transpose()
    }

    /// A string that is not empty.
    pub(crate) fn string(&self, field: &str) -> Result<&str, Rejection> {
        self.opt_string(field)?
            .ok_or_else(|| missing(field, "a non-empty string"))
    }

    /// `None` for an empty string too: Zigbee2MQTT clears `action` with `""`.
    pub(crate) fn opt_string(&self, field: &str) -> Result<Option<&str>, Rejection> {
        self.get(field)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(field, "a string", v)))
            .transpose()
            .map(|s| s.filter(|s| !s.is_empty()))
    }

    /// A string without checks, for fields whose shape varies with the
    /// device and which only mean something to hearth in some shapes.
    pub(crate) fn raw_str(&self, field: &str) -> Option<&str> {
        self.get(field).and_then(Value::as_str)
    }

    /// An RFC 3339 / ISO 8601 date-time with a UTC offset, or a number of
    /// milliseconds since the Unix epoch.
    pub(crate) fn timestamp(&self, field: &str) -> Result<Option<Timestamp>, Rejection> {
        self.get(field)
            .map(|v| parse_timestamp(field, v))
            .transpose()
    }
}

/// The range protobuf's `Timestamp` allows: years 1 to 9999.
const TIMESTAMP_SECONDS: RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

fn parse_timestamp(field: &str, value: &Value) -> Result<Timestamp, Rejection> {
    use time::format_description::well_known::{Iso8601, Rfc3339};
    use time::OffsetDateTime;

    let bad = || {
        Rejection::new(
            RejectReason::BadTimestamp,
            format!("`{field}` {value} is neither an RFC 3339 date-time with an offset nor epoch milliseconds"),
        )
    };
    let timestamp = match value {
        Value::String(text) => {
            let parsed = OffsetDateTime::parse(text, &Rfc3339)
                .or_else(|_| OffsetDateTime::parse(text, &Iso8601::PARSING))
                .map_err(|_| bad())?;
            Timestamp {
                seconds: parsed.unix_timestamp(),
                nanos: i32::try_from(parsed.nanosecond()).map_err(|_| bad())?,
            }
        }
        Value::Number(number) => {
            let millis = match number.as_i64() {
                Some(millis) => millis,
                None => number
                    .as_f64()
                    .filter(|n| n.fract() == 0.0 && n.abs() < 1e18)
                    .map(|n| n as i64)
                    .ok_or_else(bad)?,
            };
            Timestamp {
                seconds: millis.div_euclid(1000),
                nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).map_err(|_| bad())?,
            }
        }
        _ => return Err(bad()),
    };
    if TIMESTAMP_SECONDS.contains(&timestamp.seconds) {
        Ok(timestamp)
    } else {
        Err(Rejection::new(
            RejectReason::BadTimestamp,
            format!("`{field}` {value} is outside the years 1 to 9999"),
        ))
    }
}

fn in_range(field: &str, value: f64, range: RangeInclusive<f64>) -> Result<f64, Rejection> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(Rejection::new(
            RejectReason::OutOfRange,
            format!(
                "{field} {value} is outside {}..={}",
                range.start(),
                range.end()
            ),
        ))
    }
}

fn missing(field: &str, expected: &str) -> Rejection {
    Rejection::new(
        RejectReason::MissingField,
        format!("`{field}` is missing; expected {expected}"),
    )
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> Rejection {
    Rejection::new(
        RejectReason::MissingField,
        format!("`{field}` must be {expected}, got {}", type_name(got)),
    )
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::v1::{Availability, Motion};

    fn decode(
        conventions: &Conventions,
        topic: &str,
        payload: &str,
    ) -> (&'static str, Result<Decoded, Rejection>) {
        conventions.decode(topic, payload.as_bytes())
    }

    fn timestamp(json: &str) -> Result<Option<Timestamp>, Rejection> {
        Fields::parse(format!(r#"{{"ts":{json}}}"#).as_bytes())?.timestamp("ts")
    }

    #[test]
    fn each_convention_decodes_its_own_topics_and_is_named() {
        let conventions = Conventions::new(&ConventionsConfig::default());
        let (name, decoded) = decode(
            &conventions,
            "hearth/home/hall/pir/motion",
            r#"{"detected":true}"#,
        );
        assert_eq!(name, "native");
        assert!(
            matches!(decoded, Ok(Decoded::Events(r)) if r[0].body == Body::Motion(Motion { detected: true }))
        );
        let (name, decoded) = decode(&conventions, "zigbee2mqtt/hall/pir/availability", "offline");
        assert_eq!(name, "zigbee2mqtt");
        assert!(
            matches!(decoded, Ok(Decoded::Events(r)) if r[0].body == Body::Availability(Availability { online: false }))
        );
    }

    #[test]
    fn a_topic_no_convention_claims_is_unknown_naming_the_accepted_roots() {
        let conventions = Conventions::new(&ConventionsConfig::default());
        let (name, decoded) = decode(&conventions, "tasmota/plug/STATE", "{}");
        assert_eq!(name, "none");
        let rejection = decoded.expect_err("unclaimed");
        assert_eq!(rejection.reason, RejectReason::UnknownTopic);
        assert_eq!(
            rejection.detail,
            "no convention claims topic `tasmota/plug/STATE`; accepted roots: \
             `hearth/...` (native), `zigbee2mqtt/...` (zigbee2mqtt)"
        );
    }

    #[test]
    fn a_disabled_convention_claims_nothing() {
        let mut config = ConventionsConfig::default();
        config.zigbee2mqtt.enabled = false;
        let conventions = Conventions::new(&config);
        let (name, decoded) = decode(&conventions, "zigbee2mqtt/lamp", r#"{"state":"ON"}"#);
        assert_eq!(name, "none");
        let rejection = decoded.expect_err("unclaimed");
        assert!(
            !rejection.detail.contains("zigbee2mqtt/..."),
            "{}",
            rejection.detail
        );

        config.native.enabled = false;
        let (_, decoded) = decode(&Conventions::new(&config), "hearth/h/r/d/motion", "{}");
        assert!(decoded
            .expect_err("unclaimed")
            .detail
            .ends_with("every convention is disabled"));
    }

    #[test]
    fn the_first_convention_claiming_a_topic_wins() {
        let mut config = ConventionsConfig::default();
        config.native.prefix = "zigbee2mqtt".into();
        let (name, _) = decode(&Conventions::new(&config), "zigbee2mqtt/lamp", "{}");
        assert_eq!(name, "native");
    }

    #[test]
    fn config_defaults_apply_and_unknown_fields_are_refused() {
        let config: ConventionsConfig =
            serde_json::from_str(r#"{"native":{"prefix":"h"}}"#).expect("valid config");
        assert_eq!(config.native.prefix, "h");
        assert!(config.native.enabled);
        assert!(config.zigbee2mqtt.enabled);
        assert!(serde_json::from_str::<ConventionsConfig>(r#"{"tasmota":{}}"#).is_err());
        assert!(serde_json::from_str::<ConventionsConfig>(r#"{"native":{"prefx":"h"}}"#).is_err());
    }

    #[test]
    fn timestamps_read_rfc3339_iso8601_and_epoch_milliseconds() {
        let noon = Timestamp {
            seconds: 1_714_564_800,
            nanos: 0,
        };
        assert_eq!(timestamp(r#""2024-05-01T12:00:00Z""#), Ok(Some(noon)));
        assert_eq!(
            timestamp(r#""2024-05-01T12:00:00.123456789Z""#),
            Ok(Some(Timestamp {
                nanos: 123_456_789,
                ..noon
            }))
        );
        assert_eq!(timestamp(r#""2024-05-01T08:00:00-04:00""#), Ok(Some(noon)));
        assert_eq!(timestamp(r#""20240501T120000Z""#), Ok(Some(noon)));
        assert_eq!(timestamp("1714564800000"), Ok(Some(noon)));
        assert_eq!(timestamp("1714564800000.0"), Ok(Some(noon)));
        assert_eq!(
            timestamp("-1"),
            Ok(Some(Timestamp {
                seconds: -1,
                nanos: 999_000_000
            }))
        );
        assert_eq!(timestamp("null"), Ok(None));
    }

    #[test]
    fn timestamps_without_offset_or_outside_years_1_to_9999_are_refused() {
        for json in [
            r#""2024-05-01T12:00:00""#,
            r#""2024-05-01""#,
            r#""""#,
            "253402300800000",
            "-62135596800001",
            "{}",
        ] {
            let rejection = timestamp(json).expect_err(json);
            assert_eq!(rejection.reason, RejectReason::BadTimestamp, "{json}");
        }
    }

    #[test]
    fn plain_availability_is_case_and_whitespace_tolerant() {
        assert_eq!(plain_availability(b" Online\r\n"), Some(true));
        assert_eq!(plain_availability(b"OFFLINE"), Some(false));
        assert_eq!(plain_availability(b"on"), None);
        assert_eq!(plain_availability(&[0xff, 0xfe]), None);
    }

    #[test]
    fn origins_refuse_blank_names_and_say_which() {
        let rejection = Origin::new("home", "\t", "lamp").expect_err("blank room");
        assert_eq!(rejection.reason, RejectReason::EmptyIdentifier);
        assert!(
            rejection.detail.starts_with("the room name is empty"),
            "{}",
            rejection.detail
        );
        assert!(Origin::new("home", "hall", "lamp").is_ok());
    }

    #[test]
    fn rejections_display_reason_and_detail() {
        let rejection =
            Rejection::new(RejectReason::OutOfRange, "celsius 250 is outside -60..=100");
        assert_eq!(
            rejection.to_string(),
            "out_of_range: celsius 250 is outside -60..=100"
        );
    }
}
