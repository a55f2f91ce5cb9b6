//! Device conditions the rule turns into notifications itself.
//!
//! | condition                           | category         | severity |
//! |-------------------------------------|------------------|----------|
//! | `smoke` detected                    | `smoke`          | critical |
//! | `water_leak` detected               | `water_leak`     | critical |
//! | `availability` offline              | `device_offline` | warning  |
//! | `battery` below `battery_below`     | `battery_low`    | warning  |
//! | no report for `silent_after`        | `sensor_silent`  | warning  |
//!
//! Each is told once when it begins (a detector repeating "smoke" every
//! minute is one notification) and may be told again only after it has
//! cleared (no smoke, back online, a battery at or above the threshold, a
//! report).

use std::time::Duration;

use hearth_proto::v1::{self, event::Body, Notification, Severity};

use super::config::HomeConfig;
use super::records::{HomeState, Seen};
use crate::events::Cause;

/// A condition that began: the notification to store.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Begun {
    /// The latch that keeps it from being told again.
    pub(crate) latch: String,
    pub(crate) notification: Notification,
}

/// What a device event means for the conditions of its device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    Begun(Begun),
    /// A condition told before has cleared.
    Cleared(String),
}

/// The condition change an event brings, if any.
pub(crate) fn change(config: &HomeConfig, state: &HomeState, event: &v1::Event) -> Option<Change> {
    let (room, device) = (&event.room, &event.device);
    let place = format!("{room}/{device}");
    let begins = |category: &str, severity: Severity, title: &str, message: String| {
        let latch = format!("{category}/{place}");
        (!state.latched.contains(&latch)).then(|| {
            Change::Begun(Begun {
                latch,
                notification: Notification {
                    severity: severity as i32,
                    category: category.to_owned(),
                    title: title.to_owned(),
                    message,
                },
            })
        })
    };
    let clears = |category: &str| {
        let latch = format!("{category}/{place}");
        state
            .latched
            .contains(&latch)
            .then_some(Change::Cleared(latch))
    };
    match event.body.as_ref()? {
        Body::Smoke(smoke) if smoke.detected => begins(
            "smoke",
            Severity::Critical,
            "Smoke detected",
            format!("Smoke detected in {room} ({device})"),
        ),
        Body::Smoke(_) => clears("smoke"),
        Body::WaterLeak(leak) if leak.detected => begins(
            "water_leak",
            Severity::Critical,
            "Water leak",
            format!("Water detected in {room} ({device})"),
        ),
        Body::WaterLeak(_) => clears("water_leak"),
        Body::Availability(availability) if !availability.online => begins(
            "device_offline",
            Severity::Warning,
            "Device offline",
            format!("{device} in {room} is offline"),
        ),
        Body::Availability(_) => clears("device_offline"),
        Body::Battery(battery) if battery.percent < config.battery_below => begins(
            "battery_low",
            Severity::Warning,
            "Battery low",
            format!(
                "The battery of {device} in {room} is at {:.0} %",
                battery.percent
            ),
        ),
        Body::Battery(_) => clears("battery_low"),
        _ => None,
    }
}

/// Whether an event is a device reporting (what `silent_after` watches):
/// its observations, not what the gateway or the rules store about it.
pub(crate) fn is_report(event: &v1::Event) -> bool {
    match &event.body {
        Some(Body::Availability(availability)) => availability.online,
        Some(
            Body::Motion(_)
            | Body::Contact(_)
            | Body::Temperature(_)
            | Body::Humidity(_)
            | Body::Illuminance(_)
            | Body::Smoke(_)
            | Body::WaterLeak(_)
            | Body::Tamper(_)
            | Body::Battery(_)
            | Body::Button(_)
            | Body::Light(_),
        ) => true,
        _ => false,
    }
}

/// Notes that a device reported at `at` (ms).
pub(crate) fn seen(state: &mut HomeState, event: &v1::Event, at: u64) {
    state.seen.insert(
        format!("{}/{}", event.room, event.device),
        Seen {
            room: event.room.clone(),
            device: event.device.clone(),
            last_ms: at,
            cause: Cause::of(event),
            reported: false,
        },
    );
}

/// The notification of a device silent for `after`.
pub(crate) fn silent(seen: &Seen, after: Duration) -> Notification {
    Notification {
        severity: Severity::Warning as i32,
        category: "sensor_silent".to_owned(),
        title: "Device silent".to_owned(),
        message: format!(
            "{} in {} has not reported for {}",
            seen.device,
            seen.room,
            humantime_serde::re::humantime::format_duration(after)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: Body) -> v1::Event {
        v1::Event {
            id: "e".into(),
            room: "kitchen".into(),
            device: "sensor".into(),
            body: Some(body),
            ..Default::default()
        }
    }

    #[test]
    fn a_condition_is_told_once_until_it_clears() {
        let config = HomeConfig::default();
        let mut state = HomeState::default();
        let smoke = event(Body::Smoke(v1::Smoke { detected: true }));
        let Some(Change::Begun(begun)) = change(&config, &state, &smoke) else {
            panic!("smoke begins");
        };
        assert_eq!(begun.notification.severity(), Severity::Critical);
        assert_eq!(begun.latch, "smoke/kitchen/sensor");
        state.latched.insert(begun.latch.clone());
        assert_eq!(change(&config, &state, &smoke), None, "told already");
        let clear = event(Body::Smoke(v1::Smoke { detected: false }));
        assert_eq!(
            change(&config, &state, &clear),
            Some(Change::Cleared(begun.latch))
        );
    }

    #[test]
    fn a_battery_is_low_below_the_threshold_only() {
        let config = HomeConfig::default();
        let state = HomeState::default();
        let low = event(Body::Battery(v1::Battery { percent: 14.0 }));
        let Some(Change::Begun(begun)) = change(&config, &state, &low) else {
            panic!("low");
        };
        assert_eq!(begun.notification.category, "battery_low");
        assert!(begun.notification.message.contains("14 %"));
        let fine = event(Body::Battery(v1::Battery { percent: 15.0 }));
        assert_eq!(change(&config, &state, &fine), None);
    }

    #[test]
    fn only_device_observations_count_as_reports() {
        assert!(is_report(&event(Body::Temperature(v1::Temperature {
            celsius: 20.0
        }))));
        assert!(!is_report(&event(Body::Availability(v1::Availability {
            online: false
        }))));
        assert!(!is_report(&event(Body::Notification(
            Notification::default()
        ))));
    }
}
