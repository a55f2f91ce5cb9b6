//! hearth's event and command contracts.
//!
//! The schema lives in `proto/hearth/v1/*.proto`; this crate holds the types
//! generated from it and the two wire encodings a stored message can use
//! ([`Encoding`]), together with the NATS header names every stored message
//! carries so that `nats stream view` is legible whichever encoding is used.

mod encoding;
pub mod subject;

pub use encoding::{DecodeError, Encoding};

/// Version 1 of the contracts (`package hearth.v1`).
#[allow(clippy::all, unreachable_pub, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/hearth.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/hearth.v1.serde.rs"));

    /// The fully qualified name of [`Event`], for the `Hearth-Schema` header.
    pub const EVENT_SCHEMA: &str = "hearth.v1.Event";
    /// The fully qualified name of [`Command`], for the `Hearth-Schema` header.
    pub const COMMAND_SCHEMA: &str = "hearth.v1.Command";

    impl event::Body {
        /// The kind of observation, as used in subjects and the `Hearth-Kind`
        /// header: `motion`, `contact`, `temperature`, ...
        pub fn kind(&self) -> &'static str {
            match self {
                Self::Motion(_) => "motion",
                Self::Contact(_) => "contact",
                Self::Temperature(_) => "temperature",
                Self::Humidity(_) => "humidity",
                Self::Illuminance(_) => "illuminance",
                Self::Smoke(_) => "smoke",
                Self::WaterLeak(_) => "water_leak",
                Self::Tamper(_) => "tamper",
                Self::Battery(_) => "battery",
                Self::Button(_) => "button",
                Self::Light(_) => "light",
                Self::Availability(_) => "availability",
                Self::LoginFailed(_) => "login_failed",
                Self::AlarmState(_) => "alarm_state",
                Self::AlarmNotice(_) => "alarm_notice",
                Self::Notification(_) => "notification",
                Self::NotificationDelivery(_) => "notification_delivery",
                Self::NotificationAck(_) => "notification_ack",
            }
        }
    }

    impl command::Body {
        /// The kind of command, as used in subjects and the `Hearth-Kind` header.
        pub fn kind(&self) -> &'static str {
            match self {
                Self::LightSet(_) => "light_set",
                Self::SirenSet(_) => "siren_set",
                Self::AlarmArm(_) => "alarm_arm",
                Self::AlarmDisarm(_) => "alarm_disarm",
            }
        }
    }
}

/// Names of the NATS headers on every message hearth stores.
pub mod headers {
    /// `application/json` (proto3 JSON mapping) or `application/x-protobuf`.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// The fully qualified message name, e.g. `hearth.v1.Event`.
    pub const SCHEMA: &str = "Hearth-Schema";
    /// The event or command id.
    pub const EVENT_ID: &str = "Hearth-Event-Id";
    /// The body kind, e.g. `motion`.
    pub const KIND: &str = "Hearth-Kind";
    /// The correlation id of the chain the message belongs to.
    pub const CORRELATION_ID: &str = "Hearth-Correlation-Id";
    /// Why a message was dead-lettered (on `HEARTH_DLQ` only).
    pub const REASON: &str = "Hearth-Reason";
    /// A human-readable explanation of the reason (on `HEARTH_DLQ` only).
    pub const DETAIL: &str = "Hearth-Detail";
    /// The MQTT topic the original message was published on.
    pub const MQTT_TOPIC: &str = "Hearth-Mqtt-Topic";
    /// The MQTT client id of the original publisher.
    pub const MQTT_CLIENT_ID: &str = "Hearth-Mqtt-Client-Id";
    /// The QoS (`0`, `1` or `2`) of an MQTT publish routed on
    /// `hearth.mqtt.>` or retained on `hearth.retained.>`; absent means 0.
    pub const MQTT_QOS: &str = "Hearth-Mqtt-Qos";
    /// An MQTT 5 user property, `name=value`, percent-encoded where needed;
    /// one header per property.
    pub const MQTT_USER_PROPERTY: &str = "Hearth-Mqtt-User-Property";
    /// On a QoS 1/2 message a gateway routes on `hearth.mqtt.>`: persistent
    /// sessions got their copy through their queue, not this one.
    pub const MQTT_QUEUED: &str = "Hearth-Mqtt-Queued";
    /// On a routed message with a reply subject: only this client's
    /// acknowledgement answers it (a command for its device).
    pub const CONFIRM_CLIENT: &str = "Hearth-Confirm-Client";

    /// The longest header value copied from device input.
    pub const MAX_HEADER_VALUE: usize = 1024;

    /// Header values cannot carry line breaks, and must leave the message room
    /// for its payload; device-chosen strings may be long or contain anything.
    pub fn safe_value(value: &str) -> std::borrow::Cow<'_, str> {
        let clean = !value.chars().any(char::is_control);
        if clean && value.len() <= MAX_HEADER_VALUE {
            return value.into();
        }
        let mut safe: String = value
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if safe.len() > MAX_HEADER_VALUE {
            let mut end = MAX_HEADER_VALUE;
            while !safe.is_char_boundary(end) {
                end -= 1;
            }
            safe.truncate(end);
            safe.push('…');
        }
        safe.into()
    }
}
