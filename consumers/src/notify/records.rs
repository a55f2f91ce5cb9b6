//! What the rule keeps of a home in the KV bucket `hearth_notify`, one key
//! per home (`home.<home>`): the notifications it is delivering or
//! escalating with each delivery's state, what each recipient's rate limit
//! and quiet hours hold back, the dedup window, the conditions already told
//! (a low battery, a device offline) and when each device last reported.
//!
//! One key per home is written in one put, so an event's effects (a
//! notification accepted, a recipient's count raised, the event marked as
//! handled) are stored together or not at all.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use hearth_proto::v1::Severity;
use serde::{Deserialize, Serialize};

use crate::events::Cause;

/// How many handled event ids a home remembers, to recognise an event
/// JetStream sends again after a crash: only the event in hand can come
/// again (the consumer has one unacknowledged event at a time).
const RECENT_EVENTS: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct HomeState {
    /// The last events whose effects are stored here.
    pub(crate) recent_events: VecDeque<String>,
    /// The notifications being delivered, escalated or kept for a while
    /// after, by id (the Notification event's id).
    pub(crate) notifications: BTreeMap<String, Record>,
    /// Rate limit and quiet hours state of each recipient, by name.
    pub(crate) recipients: BTreeMap<String, RecipientState>,
    /// The last notification sent per dedup key (category, room, device).
    pub(crate) dedup: BTreeMap<String, DedupEntry>,
    /// Conditions told once until they clear: `battery_low/<room>/<device>`.
    pub(crate) latched: BTreeSet<String>,
    /// When each device last reported (only with `silent_after`), by
    /// `<room>/<device>`.
    pub(crate) seen: BTreeMap<String, Seen>,
}

impl HomeState {
    /// Whether this event's effects are stored already.
    pub(crate) fn handled(&self, event_id: &str) -> bool {
        !event_id.is_empty() && self.recent_events.iter().any(|id| id == event_id)
    }

    /// Marks an event as handled (stored with its effects).
    pub(crate) fn mark_handled(&mut self, event_id: &str) {
        if event_id.is_empty() || self.handled(event_id) {
            return;
        }
        self.recent_events.push_back(event_id.to_owned());
        while self.recent_events.len() > RECENT_EVENTS {
            self.recent_events.pop_front();
        }
    }
}

/// One notification (or one summary of held ones) and its deliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: String,
    /// A summary of notifications held back by quiet hours or a rate limit,
    /// made by the rule (no Notification event of its own).
    #[serde(default)]
    pub(crate) summary: bool,
    pub(crate) home: String,
    pub(crate) room: String,
    pub(crate) device: String,
    pub(crate) severity: Severity,
    pub(crate) category: String,
    pub(crate) title: String,
    pub(crate) message: String,
    pub(crate) correlation_id: String,
    /// The event that caused the notification.
    pub(crate) causation_id: String,
    /// What the delivery outcomes follow from: the notification itself (a
    /// summary: the last notification it sums up).
    pub(crate) cause: Cause,
    pub(crate) created_ms: u64,
    /// When something last happened to it; finished records are dropped a
    /// while after.
    pub(crate) updated_ms: u64,
    pub(crate) deliveries: Vec<Delivery>,
    /// The next escalation step of an unacknowledged critical notification.
    pub(crate) escalation: Option<Escalation>,
    pub(crate) ack: Option<Ack>,
}

impl Record {
    pub(crate) fn critical(&self) -> bool {
        self.severity == Severity::Critical
    }

    /// Nothing left to send, escalate or report.
    pub(crate) fn finished(&self) -> bool {
        self.escalation.is_none()
            && self
                .deliveries
                .iter()
                .all(|d| d.status != Status::Pending && d.reported)
    }

    /// The step after the last one sent (where a "done" message goes).
    pub(crate) fn next_step(&self) -> u32 {
        self.deliveries
            .iter()
            .map(|d| d.step + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Sending one message of a notification to one recipient on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    pub(crate) recipient: String,
    pub(crate) channel: String,
    /// 0 for the first sending, 1.. for escalation steps; a done message
    /// takes the step after the last one sent.
    pub(crate) step: u32,
    pub(crate) purpose: Purpose,
    pub(crate) attempts: u32,
    /// When to try (again), ms since the epoch.
    pub(crate) next_at: u64,
    pub(crate) status: Status,
    /// The last attempt's error.
    #[serde(default)]
    pub(crate) error: String,
    /// Whether its outcome (a NotificationDelivery event, a dead letter) is
    /// stored: an outcome is reported after the attempt, by the worker, so a
    /// NATS hiccup at that moment does not lose it.
    pub(crate) reported: bool,
}

impl Delivery {
    pub(crate) fn new(
        recipient: &str,
        channel: &str,
        step: u32,
        purpose: Purpose,
        now: u64,
    ) -> Self {
        Self {
            recipient: recipient.to_owned(),
            channel: channel.to_owned(),
            step,
            purpose,
            attempts: 0,
            next_at: now,
            status: Status::Pending,
            error: String::new(),
            reported: false,
        }
    }

    /// What identifies it within its notification.
    pub(crate) fn same(&self, recipient: &str, channel: &str, step: u32) -> bool {
        self.recipient == recipient && self.channel == channel && self.step == step
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Purpose {
    /// The notification, first or again (escalation).
    Notify,
    /// "acknowledged by alice via mqtt".
    Done,
    /// Notifications held back, in one message.
    Summary,
}

impl Purpose {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notification",
            Self::Done => "done",
            Self::Summary => "summary",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    Pending,
    Delivered,
    /// Given up after its tries (dead-lettered).
    Failed,
    /// Not sent: the notification was acknowledged first.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Escalation {
    /// The step to send next (1 for the first escalation).
    pub(crate) step: u32,
    /// When, ms since the epoch.
    pub(crate) at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ack {
    /// Who acknowledged; may be empty for an acknowledgement from a device
    /// that does not say.
    pub(crate) recipient: String,
    /// "mqtt", "nats" or "http".
    pub(crate) via: String,
    pub(crate) at_ms: u64,
}

impl Ack {
    /// "alice via mqtt".
    pub(crate) fn by(&self) -> String {
        if self.recipient.is_empty() {
            format!("someone via {}", self.via)
        } else {
            format!("{} via {}", self.recipient, self.via)
        }
    }
}

/// A recipient's rate limit window and what is held back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RecipientState {
    /// When the current rate limit window began.
    pub(crate) window_start: u64,
    /// Notifications sent in it.
    pub(crate) sent_in_window: u32,
    /// Held back by the rate limit, sent as a summary at `rate_until`.
    pub(crate) rate_held: Vec<Held>,
    pub(crate) rate_until: u64,
    /// Held back by quiet hours, sent as a summary at `quiet_until`.
    pub(crate) quiet_held: Vec<Held>,
    pub(crate) quiet_until: u64,
}

impl RecipientState {
    pub(crate) fn holds(&self, notification_id: &str) -> bool {
        self.rate_held
            .iter()
            .chain(&self.quiet_held)
            .any(|held| held.notification_id == notification_id)
    }
}

/// A notification held back for a recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Held {
    pub(crate) notification_id: String,
    pub(crate) severity: Severity,
    pub(crate) title: String,
    pub(crate) message: String,
    pub(crate) correlation_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DedupEntry {
    pub(crate) at_ms: u64,
    pub(crate) notification_id: String,
}

/// When a device last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Seen {
    pub(crate) room: String,
    pub(crate) device: String,
    pub(crate) last_ms: u64,
    /// Its last event: what a "silent" notification follows from.
    pub(crate) cause: Cause,
    /// Told as silent already (until it reports again).
    pub(crate) reported: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_remembers_only_its_last_events() {
        let mut state = HomeState::default();
        for n in 0..100 {
            state.mark_handled(&format!("e{n}"));
        }
        assert!(state.handled("e99"));
        assert!(state.handled("e36"));
        assert!(!state.handled("e35"));
        assert!(!state.handled(""));
    }

    #[test]
    fn the_state_reads_back_from_its_json() {
        let mut state = HomeState::default();
        state.latched.insert("battery_low/hall/sensor".to_owned());
        state.mark_handled("e1");
        let json = serde_json::to_vec(&state).unwrap();
        assert_eq!(serde_json::from_slice::<HomeState>(&json).unwrap(), state);
        // An older or partial value still reads.
        assert_eq!(
            serde_json::from_slice::<HomeState>(b"{}").unwrap(),
            HomeState::default()
        );
    }
}
