//! A home's view document, and how one event changes it: pure, no I/O.
//!
//! Everything in the document comes from the events themselves (their
//! times included, never the clock of the instance applying them), so a
//! rebuild from the stream yields the same document byte for byte.

use std::collections::BTreeMap;

use hearth_proto::v1::{self, event::Body};
use serde::{Deserialize, Serialize};

/// A home's live state, as stored under the home's key in `hearth_view`.
///
/// A field that is absent was never reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HomeView {
    pub home: String,
    /// The time of the last event applied (when the gateway or the rule
    /// received it; when the device observed it if that is all there is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// The `HEARTH_EVENTS` sequence of the last event applied: an event at
    /// or below it was applied already and is skipped.
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm: Option<AlarmView>,
    #[serde(default)]
    pub rooms: BTreeMap<String, RoomView>,
    /// Room, then device.
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, DeviceView>>,
    /// Failed logins to the gateway's MQTT server (`login_failed` events,
    /// room `gateway`): a client that cannot log in is not a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_failures: Option<LoginFailures>,
}

/// The alarm, from the security rule's `alarm_state` and `alarm_notice`
/// events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlarmView {
    /// `disarmed`, `arming`, `armed_home`, `armed_away`, `armed_night`,
    /// `armed_vacation`, `pending` or `triggered`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous: String,
    /// `home`, `away`, `night` or `vacation`; absent when disarmed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// When the alarm entered its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// When the current delay (exit, entry, trigger time) ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The zone (`room/device`) that caused the state.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bypassed: Vec<String>,
    /// Who armed or disarmed it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_notice: Option<NoticeView>,
}

/// The last `alarm_notice`: a wrong code, an arming refused, zones bypassed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoticeView {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoomView {
    /// Whether the room's last motion event was a detection (a clear
    /// resets it), from whichever of its sensors reported last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupied: Option<bool>,
    /// When motion was last detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_motion: Option<String>,
    /// Each light's last reported state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lights: BTreeMap<String, LightView>,
    /// The room's last reading, from whichever sensor reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub humidity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lux: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LightView {
    pub on: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brightness_pct: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    /// When it last reported anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Its last `availability` report; a device that reports anything else
    /// is online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_pct: Option<f64>,
    /// The last event of each kind (other than battery and availability,
    /// which have their fields above), as the body's proto3 JSON:
    /// `"motion": {"detected": true}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoginFailures {
    pub count: u64,
    pub last: LoginFailure,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoginFailure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    pub client_id: String,
    pub username: String,
    pub address: String,
    pub reason: String,
}

/// What applying an event came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The document changed: store it.
    Changed,
    /// Its sequence is at or below the document's: applied before (a
    /// redelivery after a crash, or a replay).
    AlreadyApplied,
    /// Nothing the view keeps (a notification, an event without a body).
    Ignored,
}

impl HomeView {
    pub fn new(home: &str) -> Self {
        Self {
            home: home.to_owned(),
            ..Self::default()
        }
    }

    /// Applies the event stored at `sequence` in `HEARTH_EVENTS`.
    pub fn apply(&mut self, sequence: u64, event: &v1::Event) -> Applied {
        if sequence <= self.sequence {
            return Applied::AlreadyApplied;
        }
        let Some(body) = &event.body else {
            return Applied::Ignored;
        };
        let at = event_time(event);
        match body {
            Body::AlarmState(state) => self.alarm_state(state, at.clone()),
            Body::AlarmNotice(notice) => {
                self.alarm
                    .get_or_insert_with(AlarmView::default)
                    .last_notice = Some(NoticeView {
                    code: notice.code.clone(),
                    message: notice.message.clone(),
                    zones: notice.zones.clone(),
                    at: at.clone(),
                });
            }
            Body::Notification(_) | Body::NotificationDelivery(_) | Body::NotificationAck(_) => {
                return Applied::Ignored;
            }
            Body::LoginFailed(failed) => {
                let failures = self
                    .login_failures
                    .get_or_insert_with(LoginFailures::default);
                failures.count += 1;
                failures.last = LoginFailure {
                    at: at.clone(),
                    client_id: event.device.clone(),
                    username: failed.username.clone(),
                    address: failed.address.clone(),
                    reason: failed.reason.clone(),
                };
            }
            device_body => self.device_event(event, device_body, at.clone()),
        }
        self.sequence = sequence;
        if at.is_some() {
            self.updated_at = at;
        }
        Applied::Changed
    }

    fn alarm_state(&mut self, state: &v1::AlarmState, at: Option<String>) {
        let last_notice = self.alarm.take().and_then(|alarm| alarm.last_notice);
        self.alarm = Some(AlarmView {
            state: alarm_status(state.state),
            previous: alarm_status(state.previous),
            mode: alarm_mode(state.mode),
            since: at,
            until: state.until.as_ref().and_then(timestamp),
            reason: state.reason.clone(),
            zone: state.zone.clone(),
            bypassed: state.bypassed.clone(),
            user: state.user.clone(),
            last_notice,
        });
    }

    fn device_event(&mut self, event: &v1::Event, body: &Body, at: Option<String>) {
        let room = self.rooms.entry(event.room.clone()).or_default();
        match body {
            Body::Motion(motion) => {
                room.occupied = Some(motion.detected);
                if motion.detected {
                    room.last_motion.clone_from(&at);
                }
            }
            Body::Light(light) => {
                room.lights.insert(
                    event.device.clone(),
                    LightView {
                        on: light.on,
                        brightness_pct: light.brightness_pct,
                    },
                );
            }
            Body::Temperature(reading) => room.temperature = Some(reading.celsius),
            Body::Humidity(reading) => room.humidity = Some(reading.percent),
            Body::Illuminance(reading) => room.lux = Some(reading.lux),
            _ => {}
        }
        let device = self
            .devices
            .entry(event.room.clone())
            .or_default()
            .entry(event.device.clone())
            .or_default();
        if at.is_some() {
            device.last_seen = at;
        }
        match body {
            Body::Availability(availability) => device.online = Some(availability.online),
            Body::Battery(battery) => {
                device.online = Some(true);
                device.battery_pct = Some(battery.percent);
            }
            body => {
                device.online = Some(true);
                if let Some(value) = body_value(body) {
                    device.values.insert(body.kind().to_owned(), value);
                }
            }
        }
    }

    /// One device's entry.
    pub fn device(&self, room: &str, device: &str) -> Option<&DeviceView> {
        self.devices.get(room)?.get(device)
    }
}

/// A device body's proto3 JSON (what `nats stream view` shows of it).
fn body_value(body: &Body) -> Option<serde_json::Value> {
    let value = match body {
        Body::Motion(m) => serde_json::to_value(m),
        Body::Contact(m) => serde_json::to_value(m),
        Body::Temperature(m) => serde_json::to_value(m),
        Body::Humidity(m) => serde_json::to_value(m),
        Body::Illuminance(m) => serde_json::to_value(m),
        Body::Smoke(m) => serde_json::to_value(m),
        Body::WaterLeak(m) => serde_json::to_value(m),
        Body::Tamper(m) => serde_json::to_value(m),
        Body::Button(m) => serde_json::to_value(m),
        Body::Light(m) => serde_json::to_value(m),
        Body::Battery(m) => serde_json::to_value(m),
        Body::Availability(m) => serde_json::to_value(m),
        Body::LoginFailed(_)
        | Body::AlarmState(_)
        | Body::AlarmNotice(_)
        | Body::Notification(_)
        | Body::NotificationDelivery(_)
        | Body::NotificationAck(_) => return None,
    };
    // Generated messages always serialise (see `Encoding::encode`).
    value.ok()
}

/// When the event happened, as far as hearth knows: when the gateway (or
/// the rule) received it, else when the device says it observed it.
fn event_time(event: &v1::Event) -> Option<String> {
    event
        .received_at
        .as_ref()
        .or(event.occurred_at.as_ref())
        .and_then(timestamp)
}

/// RFC 3339, UTC: `2026-11-23T10:00:00Z`, with a fraction when there is one.
fn timestamp(ts: &pbjson_types::Timestamp) -> Option<String> {
    jiff::Timestamp::new(ts.seconds, ts.nanos)
        .ok()
        .map(|ts| ts.to_string())
}

/// `ALARM_STATUS_ARMED_AWAY` as `armed_away`; empty when unspecified.
fn alarm_status(value: i32) -> String {
    match v1::AlarmStatus::try_from(value) {
        Ok(v1::AlarmStatus::Unspecified) => String::new(),
        Ok(status) => short_name(status.as_str_name(), "ALARM_STATUS_"),
        Err(_) => format!("unknown_{value}"),
    }
}

/// `ALARM_MODE_AWAY` as `away`; empty when unspecified.
fn alarm_mode(value: i32) -> String {
    match v1::AlarmMode::try_from(value) {
        Ok(v1::AlarmMode::Unspecified) => String::new(),
        Ok(mode) => short_name(mode.as_str_name(), "ALARM_MODE_"),
        Err(_) => format!("unknown_{value}"),
    }
}

fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(room: &str, device: &str, seconds: i64, body: Body) -> v1::Event {
        v1::Event {
            id: format!("e{seconds}"),
            home: "home".into(),
            room: room.into(),
            device: device.into(),
            received_at: Some(pbjson_types::Timestamp { seconds, nanos: 0 }),
            body: Some(body),
            ..Default::default()
        }
    }

    fn motion(detected: bool) -> Body {
        Body::Motion(v1::Motion { detected })
    }

    #[test]
    fn a_clear_resets_occupancy_but_keeps_the_last_detection() {
        let mut view = HomeView::new("home");
        view.apply(1, &event("hall", "pir", 1_800_000_000, motion(true)));
        view.apply(2, &event("hall", "pir", 1_800_000_060, motion(false)));
        let hall = &view.rooms["hall"];
        assert_eq!(hall.occupied, Some(false));
        assert_eq!(hall.last_motion.as_deref(), Some("2027-01-15T08:00:00Z"));
        assert_eq!(view.updated_at.as_deref(), Some("2027-01-15T08:01:00Z"));
        assert_eq!(
            view.device("hall", "pir").unwrap().values["motion"],
            json!({"detected": false})
        );
    }

    #[test]
    fn an_event_at_or_below_the_last_sequence_is_skipped() {
        let mut view = HomeView::new("home");
        let failed = |seconds| {
            event(
                "gateway",
                "intruder",
                seconds,
                Body::LoginFailed(v1::LoginFailed {
                    username: "bob".into(),
                    address: "10.0.0.9:5000".into(),
                    reason: "wrong_password".into(),
                }),
            )
        };
        assert_eq!(view.apply(5, &failed(1)), Applied::Changed);
        assert_eq!(view.apply(5, &failed(1)), Applied::AlreadyApplied);
        assert_eq!(view.apply(4, &failed(0)), Applied::AlreadyApplied);
        assert_eq!(view.login_failures.as_ref().unwrap().count, 1);
        assert_eq!(view.sequence, 5);
        assert!(view.devices.is_empty(), "a failed login is not a device");
    }

    #[test]
    fn notifications_change_nothing() {
        let mut view = HomeView::new("home");
        let body = Body::Notification(v1::Notification::default());
        assert_eq!(
            view.apply(1, &event("_home", "security", 1, body)),
            Applied::Ignored
        );
        assert_eq!(view, HomeView::new("home"));
    }

    #[test]
    fn alarm_states_and_modes_read_as_short_names() {
        let mut view = HomeView::new("home");
        let state = Body::AlarmState(v1::AlarmState {
            state: v1::AlarmStatus::ArmedNight.into(),
            previous: v1::AlarmStatus::Arming.into(),
            mode: v1::AlarmMode::Night.into(),
            ..Default::default()
        });
        view.apply(1, &event("_home", "alarm", 1_800_000_000, state));
        let alarm = view.alarm.as_ref().unwrap();
        assert_eq!(
            (&*alarm.state, &*alarm.previous, &*alarm.mode),
            ("armed_night", "arming", "night")
        );
        assert!(view.rooms.is_empty() && view.devices.is_empty());
        let disarmed = Body::AlarmState(v1::AlarmState {
            state: v1::AlarmStatus::Disarmed.into(),
            ..Default::default()
        });
        view.apply(2, &event("_home", "alarm", 1_800_000_001, disarmed));
        let alarm = view.alarm.as_ref().unwrap();
        assert_eq!((&*alarm.state, &*alarm.mode), ("disarmed", ""));
        assert_eq!(alarm.since.as_deref(), Some("2027-01-15T08:00:01Z"));
    }
}
