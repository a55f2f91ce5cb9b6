//! Escalation of unacknowledged critical notifications, and what an
//! acknowledgement does.
//!
//! A critical notification goes to every recipient's first channel (step
//! 0). While nobody acknowledges it, it is sent again at each time of the
//! home's `escalate` schedule, counted from the first sending: at step `k`
//! each recipient gets it on their channel `k` (their next channel; the last
//! one again when they have no more), and backup recipients join at step 1
//! on their first channel, then move on the same way.
//!
//! An acknowledgement (from anyone, over MQTT, NATS or HTTP) ends the
//! escalation, cancels what is still waiting to be sent, and sends a "done"
//! message ("acknowledged by alice via mqtt") to everyone it was delivered
//! to, on the channel that last reached them.

use super::config::{ChannelConfig, HomeConfig, Recipient};
use super::records::{Ack, Delivery, Escalation, Purpose, Record, Status};
use crate::clock::millis;

/// The channel that gets step `step` for `recipient`, if any.
pub(crate) fn channel_for_step(recipient: &Recipient, step: u32) -> Option<&ChannelConfig> {
    let index = if recipient.backup {
        step.checked_sub(1)?
    } else {
        step
    };
    let index = usize::try_from(index).unwrap_or(usize::MAX);
    recipient
        .channels
        .get(index)
        .or_else(|| recipient.channels.last())
}

/// If the record's next escalation step is due, adds its deliveries and
/// schedules the one after; returns the step sent.
pub(crate) fn escalate_if_due(record: &mut Record, config: &HomeConfig, now: u64) -> Option<u32> {
    let Escalation { mut step, at } = record.escalation?;
    if record.ack.is_some() {
        record.escalation = None;
        return None;
    }
    if at > now {
        return None;
    }
    // Steps that all fell due while the rule was down: only the latest is
    // sent, not a burst of reminders.
    let due = |step: u32| {
        let index = usize::try_from(step).ok()?.checked_sub(1)?;
        let delay = config.escalate.get(index)?;
        (record.created_ms.saturating_add(millis(*delay)) <= now).then_some(step)
    };
    while let Some(later) = due(step + 1) {
        step = later;
    }
    for recipient in &config.recipients {
        let Some(channel) = channel_for_step(recipient, step) else {
            continue;
        };
        if record
            .deliveries
            .iter()
            .any(|d| d.same(&recipient.name, &channel.name, step))
        {
            continue;
        }
        record.deliveries.push(Delivery::new(
            &recipient.name,
            &channel.name,
            step,
            Purpose::Notify,
            now,
        ));
    }
    let next = usize::try_from(step).unwrap_or(usize::MAX);
    record.escalation = config.escalate.get(next).map(|delay| Escalation {
        step: step + 1,
        at: record.created_ms.saturating_add(millis(*delay)),
    });
    record.updated_ms = now;
    Some(step)
}

/// What an acknowledgement came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Acknowledged {
    /// Recorded; "done" messages go to these recipients.
    Now { done_to: Vec<String> },
    /// It was acknowledged before.
    Already(Ack),
}

/// Records an acknowledgement of `record`.
pub(crate) fn acknowledge(
    record: &mut Record,
    recipient: &str,
    via: &str,
    now: u64,
) -> Acknowledged {
    if let Some(ack) = &record.ack {
        return Acknowledged::Already(ack.clone());
    }
    record.ack = Some(Ack {
        recipient: recipient.to_owned(),
        via: via.to_owned(),
        at_ms: now,
    });
    record.escalation = None;
    record.updated_ms = now;
    for delivery in &mut record.deliveries {
        if delivery.status == Status::Pending && delivery.purpose == Purpose::Notify {
            delivery.status = Status::Cancelled;
            delivery.error = "acknowledged before it was sent".to_owned();
            // Nothing was sent: no outcome to store.
            delivery.reported = true;
        }
    }
    let mut done_to = Vec::new();
    if record.critical() {
        let step = record.next_step();
        let mut reached: Vec<(String, String, u32)> = Vec::new();
        for delivery in &record.deliveries {
            if delivery.status != Status::Delivered || delivery.purpose != Purpose::Notify {
                continue;
            }
            match reached
                .iter_mut()
                .find(|(r, _, _)| *r == delivery.recipient)
            {
                Some(entry) if entry.2 <= delivery.step => {
                    entry.1 = delivery.channel.clone();
                    entry.2 = delivery.step;
                }
                Some(_) => {}
                None => reached.push((
                    delivery.recipient.clone(),
                    delivery.channel.clone(),
                    delivery.step,
                )),
            }
        }
        for (recipient, channel, _) in reached {
            record.deliveries.push(Delivery::new(
                &recipient,
                &channel,
                step,
                Purpose::Done,
                now,
            ));
            done_to.push(recipient);
        }
    }
    Acknowledged::Now { done_to }
}

/// A critical notification delivered to `recipient` after it was
/// acknowledged (the message was on its way): they get the "done" message
/// too, unless they have it already.
pub(crate) fn late_delivery(record: &mut Record, recipient: &str, channel: &str, now: u64) {
    if record.ack.is_none() || !record.critical() {
        return;
    }
    if record
        .deliveries
        .iter()
        .any(|d| d.purpose == Purpose::Done && d.recipient == recipient)
    {
        return;
    }
    let step = record.next_step();
    record
        .deliveries
        .push(Delivery::new(recipient, channel, step, Purpose::Done, now));
}

#[cfg(test)]
mod tests {
    use hearth_proto::v1::Severity;

    use super::*;
    use crate::events::Cause;

    fn config() -> HomeConfig {
        let config: HomeConfig = toml::from_str(
            r#"
            escalate = ["5m", "15m", "30m"]
            [[recipients]]
            name = "alice"
            [[recipients.channels]]
            name = "push"
            kind = "log"
            [[recipients.channels]]
            name = "sms"
            kind = "log"
            [[recipients]]
            name = "bob"
            [[recipients.channels]]
            name = "push"
            kind = "log"
            [[recipients]]
            name = "neighbour"
            backup = true
            [[recipients.channels]]
            name = "call"
            kind = "log"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        config
    }

    fn record(now: u64) -> Record {
        Record {
            id: "n1".into(),
            summary: false,
            home: "home".into(),
            room: "kitchen".into(),
            device: "smoke".into(),
            severity: Severity::Critical,
            category: "smoke".into(),
            title: "Smoke".into(),
            message: "Smoke in the kitchen".into(),
            correlation_id: "c".into(),
            causation_id: "e".into(),
            cause: Cause::default(),
            created_ms: now,
            updated_ms: now,
            deliveries: vec![
                Delivery::new("alice", "push", 0, Purpose::Notify, now),
                Delivery::new("bob", "push", 0, Purpose::Notify, now),
            ],
            escalation: Some(Escalation {
                step: 1,
                at: now + 300_000,
            }),
            ack: None,
        }
    }

    fn sent_at(record: &Record, step: u32) -> Vec<(String, String)> {
        record
            .deliveries
            .iter()
            .filter(|d| d.step == step)
            .map(|d| (d.recipient.clone(), d.channel.clone()))
            .collect()
    }

    #[test]
    fn each_step_moves_to_the_next_channel_and_brings_in_backups() {
        let config = config();
        let mut record = record(0);
        assert_eq!(escalate_if_due(&mut record, &config, 299_999), None);
        assert_eq!(escalate_if_due(&mut record, &config, 300_000), Some(1));
        assert_eq!(
            sent_at(&record, 1),
            [
                ("alice".to_owned(), "sms".to_owned()),
                ("bob".to_owned(), "push".to_owned()),
                ("neighbour".to_owned(), "call".to_owned())
            ]
        );
        assert_eq!(
            record.escalation,
            Some(Escalation {
                step: 2,
                at: 900_000
            })
        );
        assert_eq!(escalate_if_due(&mut record, &config, 900_000), Some(2));
        assert_eq!(escalate_if_due(&mut record, &config, 1_800_000), Some(3));
        assert_eq!(record.escalation, None, "the schedule is over");
        assert_eq!(escalate_if_due(&mut record, &config, 9_000_000), None);
    }

    #[test]
    fn steps_that_all_fell_due_while_down_send_only_the_latest() {
        let config = config();
        let mut record = record(0);
        assert_eq!(escalate_if_due(&mut record, &config, 1_000_000), Some(2));
        assert!(sent_at(&record, 1).is_empty());
        assert_eq!(sent_at(&record, 2).len(), 3);
        assert_eq!(
            record.escalation,
            Some(Escalation {
                step: 3,
                at: 1_800_000
            })
        );
    }

    #[test]
    fn an_acknowledgement_stops_escalation_and_tells_those_reached() {
        let config = config();
        let mut record = record(0);
        record.deliveries[0].status = Status::Delivered;
        escalate_if_due(&mut record, &config, 300_000);
        record.deliveries[2].status = Status::Delivered; // alice, sms, step 1
        let outcome = acknowledge(&mut record, "bob", "mqtt", 310_000);
        assert_eq!(
            outcome,
            Acknowledged::Now {
                done_to: vec!["alice".into()]
            }
        );
        let done: Vec<&Delivery> = record
            .deliveries
            .iter()
            .filter(|d| d.purpose == Purpose::Done)
            .collect();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].channel.as_str(), done[0].step), ("sms", 2));
        assert!(record
            .deliveries
            .iter()
            .filter(|d| d.purpose == Purpose::Notify && d.status != Status::Delivered)
            .all(|d| d.status == Status::Cancelled));
        assert_eq!(record.escalation, None);
        assert!(matches!(
            acknowledge(&mut record, "alice", "http", 320_000),
            Acknowledged::Already(Ack { ref recipient, .. }) if recipient == "bob"
        ));
        // Bob's message was on its way when he acknowledged.
        late_delivery(&mut record, "bob", "push", 330_000);
        late_delivery(&mut record, "bob", "push", 340_000);
        assert_eq!(
            record
                .deliveries
                .iter()
                .filter(|d| d.purpose == Purpose::Done)
                .count(),
            2
        );
    }
}
