//! A Notification event becomes a record with one delivery per recipient
//! it goes to now, after dedup, quiet hours and rate limits (see
//! [`super::policy`]). Every recipient who is not a backup is told, on
//! their first channel; a critical notification also gets its first
//! escalation step scheduled.

use hearth_proto::v1::{Notification, Severity};
use jiff::tz::TimeZone;

use super::config::HomeConfig;
use super::policy::{self, Admission};
use super::records::{Delivery, Escalation, Held, HomeState, Purpose, Record};
use crate::clock::millis;
use crate::events::Cause;

/// The event a notification came in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Incoming<'a> {
    pub(crate) id: &'a str,
    pub(crate) home: &'a str,
    pub(crate) room: &'a str,
    pub(crate) device: &'a str,
    pub(crate) correlation_id: &'a str,
    pub(crate) causation_id: &'a str,
    pub(crate) notification: &'a Notification,
}

/// What became of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Recorded: sent now to `sent`, held for `held`.
    Recorded {
        sent: Vec<String>,
        held: Vec<String>,
    },
    /// Dropped: the same as this earlier notification.
    Duplicate { of: String },
    /// Known already (the same event again).
    Known,
}

/// Takes a notification in.
pub(crate) fn accept(
    state: &mut HomeState,
    config: &HomeConfig,
    tz: &TimeZone,
    incoming: Incoming<'_>,
    now: u64,
) -> Accepted {
    if state.notifications.contains_key(incoming.id)
        || state.recipients.values().any(|r| r.holds(incoming.id))
    {
        return Accepted::Known;
    }
    let notification = incoming.notification;
    let severity = match notification.severity() {
        Severity::Unspecified => Severity::Info,
        severity => severity,
    };
    let critical = severity == Severity::Critical;
    let key = policy::dedup_key(&notification.category, incoming.room, incoming.device);
    let window = millis(config.dedup_window);
    if window > 0 && policy::is_duplicate(state, &key, critical, window, now) {
        let of = state
            .dedup
            .get(&key)
            .map(|e| e.notification_id.clone())
            .unwrap_or_default();
        return Accepted::Duplicate { of };
    }
    let mut record = Record {
        id: incoming.id.to_owned(),
        summary: false,
        home: incoming.home.to_owned(),
        room: incoming.room.to_owned(),
        device: incoming.device.to_owned(),
        severity,
        category: notification.category.clone(),
        title: notification.title.clone(),
        message: notification.message.clone(),
        correlation_id: incoming.correlation_id.to_owned(),
        causation_id: incoming.causation_id.to_owned(),
        cause: Cause {
            event_id: incoming.id.to_owned(),
            correlation_id: incoming.correlation_id.to_owned(),
        },
        created_ms: now,
        updated_ms: now,
        deliveries: Vec::new(),
        escalation: None,
        ack: None,
    };
    let (mut sent, mut held) = (Vec::new(), Vec::new());
    for recipient in config.recipients.iter().filter(|r| !r.backup) {
        let Some(channel) = recipient.channels.first() else {
            continue;
        };
        let recipient_state = state.recipients.entry(recipient.name.clone()).or_default();
        let hold = Held {
            notification_id: record.id.clone(),
            severity,
            title: record.title.clone(),
            message: record.message.clone(),
            correlation_id: record.correlation_id.clone(),
        };
        match policy::admit(recipient, recipient_state, tz, severity, now) {
            Admission::Send => {
                record.deliveries.push(Delivery::new(
                    &recipient.name,
                    &channel.name,
                    0,
                    Purpose::Notify,
                    now,
                ));
                sent.push(recipient.name.clone());
            }
            Admission::Quiet { until } => {
                recipient_state.quiet_held.push(hold);
                // Held ones not summed up yet (the worker was down) go
                // out at the earlier end.
                if recipient_state.quiet_until < now {
                    recipient_state.quiet_until = until;
                }
                held.push(recipient.name.clone());
            }
            Admission::Limited { until } => {
                recipient_state.rate_held.push(hold);
                if recipient_state.rate_until < now {
                    recipient_state.rate_until = until;
                }
                held.push(recipient.name.clone());
            }
        }
    }
    if critical {
        if let Some(first) = config.escalate.first() {
            record.escalation = Some(Escalation {
                step: 1,
                at: now.saturating_add(millis(*first)),
            });
        }
    }
    state.dedup.insert(
        key,
        super::records::DedupEntry {
            at_ms: now,
            notification_id: record.id.clone(),
        },
    );
    state.notifications.insert(record.id.clone(), record);
    Accepted::Recorded { sent, held }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> HomeConfig {
        let config: HomeConfig = toml::from_str(text).unwrap();
        config.validate().unwrap();
        config
    }

    const TWO: &str = r#"
        [[recipients]]
        name = "alice"
        rate_limit = { max = 1, period = "1h" }
        [[recipients.channels]]
        name = "a1"
        kind = "log"
        [[recipients]]
        name = "bob"
        [[recipients.channels]]
        name = "b1"
        kind = "log"
        [[recipients]]
        name = "carol"
        backup = true
        [[recipients.channels]]
        name = "c1"
        kind = "log"
    "#;

    fn notification(severity: Severity, category: &str) -> Notification {
        Notification {
            severity: severity as i32,
            category: category.into(),
            title: "t".into(),
            message: "m".into(),
        }
    }

    fn incoming<'a>(id: &'a str, n: &'a Notification) -> Incoming<'a> {
        Incoming {
            id,
            home: "home",
            room: "kitchen",
            device: "smoke-1",
            correlation_id: "corr",
            causation_id: "cause",
            notification: n,
        }
    }

    #[test]
    fn a_notification_goes_to_every_first_channel_but_not_to_backups() {
        let config = config(TWO);
        let mut state = HomeState::default();
        let n = notification(Severity::Critical, "smoke");
        let accepted = accept(
            &mut state,
            &config,
            &TimeZone::UTC,
            incoming("n1", &n),
            1000,
        );
        assert_eq!(
            accepted,
            Accepted::Recorded {
                sent: vec!["alice".into(), "bob".into()],
                held: vec![]
            }
        );
        let record = &state.notifications["n1"];
        let to: Vec<(&str, &str)> = record
            .deliveries
            .iter()
            .map(|d| (d.recipient.as_str(), d.channel.as_str()))
            .collect();
        assert_eq!(to, [("alice", "a1"), ("bob", "b1")]);
        assert_eq!(
            record.escalation,
            Some(Escalation {
                step: 1,
                at: 301_000
            })
        );
        // The same event again changes nothing.
        assert_eq!(
            accept(
                &mut state,
                &config,
                &TimeZone::UTC,
                incoming("n1", &n),
                2000
            ),
            Accepted::Known
        );
    }

    #[test]
    fn a_duplicate_within_the_window_is_dropped_unless_critical_and_acknowledged() {
        let config = config(TWO);
        let mut state = HomeState::default();
        let warning = notification(Severity::Warning, "battery_low");
        accept(
            &mut state,
            &config,
            &TimeZone::UTC,
            incoming("w1", &warning),
            0,
        );
        assert_eq!(
            accept(
                &mut state,
                &config,
                &TimeZone::UTC,
                incoming("w2", &warning),
                60_000
            ),
            Accepted::Duplicate { of: "w1".into() }
        );
        // After the window it goes out again.
        assert!(matches!(
            accept(
                &mut state,
                &config,
                &TimeZone::UTC,
                incoming("w3", &warning),
                600_000
            ),
            Accepted::Recorded { .. }
        ));

        let critical = notification(Severity::Critical, "smoke");
        accept(
            &mut state,
            &config,
            &TimeZone::UTC,
            incoming("c1", &critical),
            0,
        );
        assert!(matches!(
            accept(
                &mut state,
                &config,
                &TimeZone::UTC,
                incoming("c2", &critical),
                1000
            ),
            Accepted::Duplicate { .. }
        ));
        state.notifications.get_mut("c1").unwrap().ack = Some(super::super::records::Ack {
            recipient: "bob".into(),
            via: "http".into(),
            at_ms: 1500,
        });
        assert!(matches!(
            accept(
                &mut state,
                &config,
                &TimeZone::UTC,
                incoming("c3", &critical),
                2000
            ),
            Accepted::Recorded { .. }
        ));
    }

    #[test]
    fn a_rate_limited_recipient_has_it_held_and_others_do_not() {
        let config = config(TWO);
        let mut state = HomeState::default();
        let a = notification(Severity::Info, "a");
        let b = notification(Severity::Info, "b");
        accept(&mut state, &config, &TimeZone::UTC, incoming("i1", &a), 0);
        assert_eq!(
            accept(&mut state, &config, &TimeZone::UTC, incoming("i2", &b), 10),
            Accepted::Recorded {
                sent: vec!["bob".into()],
                held: vec!["alice".into()]
            }
        );
        let alice = &state.recipients["alice"];
        assert_eq!(alice.rate_held.len(), 1);
        assert_eq!(alice.rate_until, 3_600_000);
        assert!(alice.holds("i2"));
    }
}
