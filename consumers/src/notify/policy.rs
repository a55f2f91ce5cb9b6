//! The policies between a notification and a recipient: dedup, quiet hours
//! and rate limits, and the summaries of what they held back.
//!
//! - Dedup (per home): a notification of the same category about the same
//!   room and device as one sent within `dedup_window` is dropped. A
//!   critical one is dropped only while that earlier one is still
//!   unacknowledged (it escalates anyway); once acknowledged, a new critical
//!   notification is a new incident and goes out.
//! - Quiet hours (per recipient, local time in the home's `timezone`): a
//!   non-critical notification is held and the recipient gets one summary
//!   when the quiet hours end.
//! - Rate limit (per recipient): at most `max` non-critical notifications
//!   per `period` (a window opened by the first one); the rest are held and
//!   sent as one summary ("3 more held back: ...") when the window ends.
//! - Critical notifications ignore quiet hours and rate limits, and do not
//!   count towards a limit.
//!
//! Pure functions of the state and the time: no I/O, tested here.

use hearth_proto::v1::Severity;
use jiff::tz::TimeZone;

use super::config::Recipient;
use super::records::{Held, HomeState, Purpose, RecipientState, Record};
use crate::clock::millis;
use crate::events::Cause;

/// What happens to a notification for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Send,
    /// Held until the quiet hours end (ms).
    Quiet {
        until: u64,
    },
    /// Held until the rate limit window ends (ms).
    Limited {
        until: u64,
    },
}

/// Decides (and counts) a notification of `severity` for a recipient.
pub(crate) fn admit(
    recipient: &Recipient,
    state: &mut RecipientState,
    tz: &TimeZone,
    severity: Severity,
    now: u64,
) -> Admission {
    if severity == Severity::Critical {
        return Admission::Send;
    }
    if let Some(until) = recipient
        .quiet_hours
        .and_then(|quiet| quiet.end_if_within(now, tz))
    {
        return Admission::Quiet { until };
    }
    if let Some(limit) = recipient.rate_limit {
        let period = millis(limit.period);
        if now >= state.window_start.saturating_add(period) {
            state.window_start = now;
            state.sent_in_window = 0;
        }
        if state.sent_in_window >= limit.max {
            return Admission::Limited {
                until: state.window_start.saturating_add(period),
            };
        }
        state.sent_in_window += 1;
    }
    Admission::Send
}

/// The dedup key of a notification.
pub(crate) fn dedup_key(category: &str, room: &str, device: &str) -> String {
    format!("{category}/{room}/{device}")
}

/// Whether a notification with `key` is a duplicate of one sent within
/// `window_ms`.
pub(crate) fn is_duplicate(
    state: &HomeState,
    key: &str,
    critical: bool,
    window_ms: u64,
    now: u64,
) -> bool {
    let Some(entry) = state.dedup.get(key) else {
        return false;
    };
    if now >= entry.at_ms.saturating_add(window_ms) {
        return false;
    }
    if !critical {
        return true;
    }
    state
        .notifications
        .get(&entry.notification_id)
        .is_some_and(|earlier| earlier.critical() && earlier.ack.is_none())
}

/// Which kind of holding a summary sums up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeldBy {
    Quiet,
    Rate,
}

/// The summary record of what was held for `recipient`, sent on `channel`.
pub(crate) fn summary(
    home: &str,
    recipient: &str,
    channel: &str,
    held: &[Held],
    by: HeldBy,
    due: u64,
    now: u64,
) -> Option<Record> {
    let last = held.last()?;
    let severity = held
        .iter()
        .map(|h| h.severity)
        .max()
        .unwrap_or(Severity::Info);
    let lines: Vec<String> = held
        .iter()
        .map(|h| format!("- {}: {}", h.title, h.message))
        .collect();
    let (tag, title) = match by {
        HeldBy::Quiet => (
            "quiet",
            format!(
                "{} notification{} during quiet hours",
                held.len(),
                if held.len() == 1 { "" } else { "s" }
            ),
        ),
        HeldBy::Rate => ("rate", format!("{} more held back", held.len())),
    };
    let id = format!(
        "summary-{tag}-{due}-{}",
        crate::state::key(&[home, recipient])
    );
    let mut delivery = super::records::Delivery::new(recipient, channel, 0, Purpose::Summary, now);
    delivery.next_at = now;
    Some(Record {
        id,
        summary: true,
        home: home.to_owned(),
        room: crate::events::HOME_ROOM.to_owned(),
        device: super::CONSUMER.to_owned(),
        severity,
        category: "summary".to_owned(),
        message: format!("{title}:\n{}", lines.join("\n")),
        title,
        correlation_id: last.correlation_id.clone(),
        causation_id: last.notification_id.clone(),
        cause: Cause {
            event_id: last.notification_id.clone(),
            correlation_id: last.correlation_id.clone(),
        },
        created_ms: now,
        updated_ms: now,
        deliveries: vec![delivery],
        escalation: None,
        ack: None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::daytime::Hours;
    use crate::notify::config::RateLimit;

    const HOUR: u64 = 3_600_000;

    fn utc_ms(text: &str) -> u64 {
        let ts: jiff::Timestamp = text.parse().unwrap();
        u64::try_from(ts.as_millisecond()).unwrap()
    }

    fn recipient(quiet: Option<&str>, limit: Option<(u32, u64)>) -> Recipient {
        Recipient {
            name: "alice".into(),
            channels: Vec::new(),
            quiet_hours: quiet.map(|q| Hours::parse(q).unwrap()),
            rate_limit: limit.map(|(max, secs)| RateLimit {
                max,
                period: Duration::from_secs(secs),
            }),
            backup: false,
        }
    }

    #[test]
    fn quiet_hours_hold_until_they_end_in_the_homes_time_zone() {
        let alice = recipient(Some("13:00-14:00"), None);
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let mut state = RecipientState::default();
        // 11:30 UTC is 13:30 in Berlin in summer.
        assert_eq!(
            admit(
                &alice,
                &mut state,
                &berlin,
                Severity::Info,
                utc_ms("2024-07-01T11:30:00Z")
            ),
            Admission::Quiet {
                until: utc_ms("2024-07-01T12:00:00Z")
            }
        );
        assert_eq!(
            admit(
                &alice,
                &mut state,
                &berlin,
                Severity::Info,
                utc_ms("2024-07-01T12:00:00Z")
            ),
            Admission::Send
        );
    }

    #[test]
    fn critical_notifications_pass_quiet_hours_and_rate_limits() {
        let alice = recipient(Some("00:00-23:59"), Some((1, 3600)));
        let mut state = RecipientState::default();
        let now = utc_ms("2024-05-01T12:00:00Z");
        for _ in 0..3 {
            assert_eq!(
                admit(&alice, &mut state, &TimeZone::UTC, Severity::Critical, now),
                Admission::Send
            );
        }
        assert_eq!(state.sent_in_window, 0, "critical ones are not counted");
        assert!(matches!(
            admit(&alice, &mut state, &TimeZone::UTC, Severity::Warning, now),
            Admission::Quiet { .. }
        ));
    }

    #[test]
    fn a_rate_limit_holds_the_rest_of_its_window() {
        let alice = recipient(None, Some((2, 3600)));
        let mut state = RecipientState::default();
        let start = utc_ms("2024-05-01T12:00:00Z");
        let tz = TimeZone::UTC;
        assert_eq!(
            admit(&alice, &mut state, &tz, Severity::Info, start),
            Admission::Send
        );
        assert_eq!(
            admit(&alice, &mut state, &tz, Severity::Info, start + 1000),
            Admission::Send
        );
        assert_eq!(
            admit(&alice, &mut state, &tz, Severity::Warning, start + 2000),
            Admission::Limited {
                until: start + HOUR
            }
        );
        // A new window opens when the last one is over.
        assert_eq!(
            admit(&alice, &mut state, &tz, Severity::Info, start + HOUR),
            Admission::Send
        );
        assert_eq!(state.window_start, start + HOUR);
    }

    #[test]
    fn a_summary_lists_what_was_held() {
        let held: Vec<Held> = (1..=3)
            .map(|n| Held {
                notification_id: format!("n{n}"),
                severity: if n == 2 {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                title: format!("title {n}"),
                message: format!("message {n}"),
                correlation_id: format!("c{n}"),
            })
            .collect();
        let record = summary("home", "alice", "phone", &held, HeldBy::Rate, 99, 100).unwrap();
        assert_eq!(record.title, "3 more held back");
        assert!(
            record.message.contains("- title 2: message 2"),
            "{}",
            record.message
        );
        assert_eq!(record.severity, Severity::Warning);
        assert_eq!(record.cause.event_id, "n3");
        assert_eq!(record.deliveries.len(), 1);
        assert!(summary("home", "alice", "phone", &[], HeldBy::Quiet, 1, 1).is_none());
    }
}
