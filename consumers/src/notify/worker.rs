//! The delivery worker: sends what is due, with retries and backoff per
//! delivery, and runs the rule's timers, all by [`Clock`] time:
//!
//! - escalation steps of unacknowledged critical notifications;
//! - the summaries of what quiet hours or a rate limit held back;
//! - devices silent for `silent_after`;
//! - the outcome of each finished delivery, stored as a
//!   `NotificationDelivery` event, and a delivery given up dead-lettered to
//!   `HEARTH_DLQ` on `hearth.dlq.hearth-notify.undeliverable`.
//!
//! It looks every [`TICK`] (and at once when the consumer has something for
//! it), so a timer that came while the rule was down fires at the first
//! look after a restart. Sending happens outside the homes' locks, one task
//! per delivery, so a slow channel holds up nobody else.
//!
//! A message sent and not yet recorded when the rule crashes is sent again
//! after the restart, with the same idempotency key: the one duplicate
//! that cannot be ruled out, made as rare as possible by recording the
//! outcome right after the attempt.

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::HeaderMap;
use hearth_proto::headers;
use hearth_proto::v1::{self, event::Body, Notification, NotificationDelivery};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::channels::{Outgoing, SendError};
use super::conditions;
use super::escalation;
use super::policy::{self, HeldBy};
use super::records::{Delivery, Purpose, Record, Status};
use super::rule::{Home, Rule, Slot};
use super::{CONSUMER, DLQ_SUBJECT};
use crate::clock::{self, millis};
use crate::events::Place;

/// How often due work is looked for.
pub(super) const TICK: Duration = Duration::from_millis(250);
/// How long a finished critical notification is kept (for a late
/// acknowledgement and `GET /notifications/<id>`).
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// How long other finished notifications are kept.
const KEEP_OTHERS: Duration = Duration::from_secs(3600);
/// At most this many finished notifications are kept per home.
const MAX_FINISHED: usize = 200;

/// Runs until `shutdown`, then waits for the messages being sent and
/// records their outcome.
pub(super) async fn run(rule: Arc<Rule>, shutdown: CancellationToken) {
    let sending = TaskTracker::new();
    loop {
        for home in rule.homes.values() {
            tick(&rule, home, &sending).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(TICK) => {}
            () = rule.wake.notified() => {}
        }
    }
    sending.close();
    sending.wait().await;
    // The outcomes of the last attempts, stored while we still can.
    for home in rule.homes.values() {
        let mut slot = home.lock().await;
        report(&rule, home, &mut slot).await;
        if let Err(error) = rule.store(home, &mut slot).await {
            warn!(home = %home.name, %error, "the last changes were not stored");
        }
    }
    debug!("delivery worker stopped");
}

/// One look at a home: timers, outcomes to store, deliveries due.
async fn tick(rule: &Arc<Rule>, home: &Home, sending: &TaskTracker) {
    let mut slot = home.lock().await;
    let now = rule.clock.now_ms();
    let mut changed = false;
    for record in slot.state.notifications.values_mut() {
        if let Some(step) = escalation::escalate_if_due(record, &home.config, now) {
            info!(notification_id = %record.id, correlation_id = %record.correlation_id, step, "not acknowledged: escalating");
            changed = true;
        }
    }
    changed |= summaries(home, &mut slot, now);
    changed |= silent_devices(rule, home, &mut slot, now).await;
    changed |= report(rule, home, &mut slot).await;
    changed |= prune(home, &mut slot, now);
    if changed {
        slot.changed();
    }
    // Sent only once stored: a delivery never goes out before the rule
    // would find it again after a restart.
    if let Err(error) = rule.store(home, &mut slot).await {
        warn!(home = %home.name, %error, "storing the notify state failed; trying again");
        return;
    }
    for record in slot.state.notifications.values() {
        for delivery in &record.deliveries {
            if delivery.status != Status::Pending || delivery.next_at > now {
                continue;
            }
            let message = outgoing(record, delivery);
            let key = message.idempotency_key.clone();
            {
                let mut in_flight = rule.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if !in_flight.insert(key.clone()) {
                    continue;
                }
            }
            let span = info_span!(
                "delivery",
                notification_id = %record.id,
                recipient = %delivery.recipient,
                channel = %delivery.channel,
                step = delivery.step,
                correlation_id = %record.correlation_id,
            );
            let rule = rule.clone();
            let home_name = home.name.clone();
            sending.spawn(
                async move {
                    send(&rule, &home_name, message).await;
                    rule.in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    // Its outcome is to be reported, or its retry is due.
                    rule.wake.notify_one();
                }
                .instrument(span),
            );
        }
    }
}

/// Sends one message and records the attempt.
async fn send(rule: &Rule, home_name: &str, message: Outgoing) {
    let Some(home) = rule.homes.get(home_name) else {
        return;
    };
    // Acknowledged meanwhile: no longer to be sent.
    if !home
        .lock()
        .await
        .state
        .notifications
        .get(&message.notification_id)
        .is_some_and(|r| {
            r.deliveries.iter().any(|d| {
                d.same(&message.recipient, &message.channel, message.step)
                    && d.status == Status::Pending
            })
        })
    {
        return;
    }
    let channel = home.channel(&message.recipient, &message.channel);
    let outcome = match &channel {
        Some((channel, _)) => channel.send(&message).await,
        None => Err(SendError::permanent(
            "the recipient or channel is no longer in the homes file",
        )),
    };
    let retry = channel.map_or_else(|| home.config.retry.clone(), |(_, retry)| retry);
    let mut slot = home.lock().await;
    let now = rule.clock.now_ms();
    let Some(record) = slot.state.notifications.get_mut(&message.notification_id) else {
        return;
    };
    let Some(delivery) = record
        .deliveries
        .iter_mut()
        .find(|d| d.same(&message.recipient, &message.channel, message.step))
    else {
        return;
    };
    delivery.attempts += 1;
    record.updated_ms = now;
    let counted = match &outcome {
        Err(_) if delivery.status == Status::Cancelled => "cancelled",
        Ok(()) => "delivered",
        Err(error) if error.permanent || delivery.attempts >= retry.tries => "failed",
        Err(_) => "retrying",
    };
    metrics::counter!(
        "hearth_notify_deliveries_total",
        "channel" => message.channel.clone(),
        "outcome" => counted
    )
    .increment(1);
    match outcome {
        // Acknowledged while this attempt was under way, and it failed:
        // nothing more to do.
        Err(_) if delivery.status == Status::Cancelled => {}
        Ok(()) => {
            info!(attempts = delivery.attempts, "delivered");
            let late = delivery.status == Status::Cancelled;
            delivery.status = Status::Delivered;
            delivery.error.clear();
            delivery.reported = false;
            if late && delivery.purpose == Purpose::Notify {
                escalation::late_delivery(record, &message.recipient, &message.channel, now);
            }
        }
        Err(error) if error.permanent || delivery.attempts >= retry.tries => {
            warn!(attempts = delivery.attempts, %error, "giving up on this delivery");
            delivery.status = Status::Failed;
            delivery.error = error.message;
            delivery.reported = false;
        }
        Err(error) => {
            let wait = retry.delay_after(delivery.attempts);
            warn!(attempts = delivery.attempts, %error, retry_in = ?wait, "delivery failed; trying again");
            delivery.next_at = now.saturating_add(millis(wait));
            delivery.error = error.message;
        }
    }
    slot.changed();
    if let Err(error) = rule.store(home, &mut slot).await {
        warn!(%error, "storing a delivery's outcome failed; trying again");
    }
}

/// The message a delivery sends.
pub(super) fn outgoing(record: &Record, delivery: &Delivery) -> Outgoing {
    let (title, message, severity) = match delivery.purpose {
        Purpose::Done => (
            format!("Acknowledged: {}", record.title),
            format!(
                "{}: acknowledged by {}",
                record.title,
                record.ack.as_ref().map(|a| a.by()).unwrap_or_default()
            ),
            v1::Severity::Info,
        ),
        Purpose::Notify if delivery.step > 0 => (
            format!("Reminder: {}", record.title),
            ack_hint(record),
            record.severity,
        ),
        Purpose::Notify => (record.title.clone(), ack_hint(record), record.severity),
        Purpose::Summary => (
            record.title.clone(),
            record.message.clone(),
            record.severity,
        ),
    };
    Outgoing {
        idempotency_key: crate::state::key(&[
            &record.id,
            &delivery.recipient,
            &delivery.channel,
            &delivery.step.to_string(),
        ]),
        notification_id: record.id.clone(),
        kind: Outgoing::kind_of(delivery.purpose, delivery.step),
        step: delivery.step,
        recipient: delivery.recipient.clone(),
        channel: delivery.channel.clone(),
        home: record.home.clone(),
        room: record.room.clone(),
        device: record.device.clone(),
        severity,
        category: record.category.clone(),
        title,
        message,
        correlation_id: record.correlation_id.clone(),
        causation_id: record.causation_id.clone(),
    }
}

/// A critical message says how to stop the reminders.
fn ack_hint(record: &Record) -> String {
    if record.critical() {
        format!(
            "{}\n(acknowledge notification {})",
            record.message, record.id
        )
    } else {
        record.message.clone()
    }
}

/// Summaries of what quiet hours and rate limits held, when they end.
fn summaries(home: &Home, slot: &mut Slot, now: u64) -> bool {
    let mut made = Vec::new();
    for (name, recipient) in slot.state.recipients.iter_mut() {
        let Some(channel) = home
            .config
            .recipient(name)
            .and_then(|r| r.channels.first())
            .map(|c| c.name.clone())
        else {
            // No longer in the homes file: nobody to tell.
            recipient.quiet_held.clear();
            recipient.rate_held.clear();
            continue;
        };
        if !recipient.quiet_held.is_empty() && recipient.quiet_until <= now {
            let held = std::mem::take(&mut recipient.quiet_held);
            made.extend(policy::summary(
                &home.name,
                name,
                &channel,
                &held,
                HeldBy::Quiet,
                recipient.quiet_until,
                now,
            ));
        }
        if !recipient.rate_held.is_empty() && recipient.rate_until <= now {
            let held = std::mem::take(&mut recipient.rate_held);
            made.extend(policy::summary(
                &home.name,
                name,
                &channel,
                &held,
                HeldBy::Rate,
                recipient.rate_until,
                now,
            ));
        }
    }
    let changed = !made.is_empty();
    for record in made {
        info!(notification_id = %record.id, recipient = %record.deliveries[0].recipient, "sending a summary of what was held back");
        slot.state.notifications.insert(record.id.clone(), record);
    }
    changed
}

/// Devices silent for `silent_after`: a notification each, stored as an
/// event like any other (it comes back to the consumer and is delivered
/// from there).
async fn silent_devices(rule: &Rule, home: &Home, slot: &mut Slot, now: u64) -> bool {
    let Some(after) = home.config.silent_after else {
        return false;
    };
    let mut changed = false;
    for seen in slot.state.seen.values_mut() {
        if seen.reported || seen.last_ms.saturating_add(millis(after)) > now {
            continue;
        }
        let emitted = rule
            .events
            .emit(
                Place {
                    home: &home.name,
                    room: &seen.room,
                    device: &seen.device,
                },
                &seen.cause,
                &format!(
                    "sensor_silent-{}-{}-{}",
                    seen.room, seen.device, seen.last_ms
                ),
                Body::Notification(conditions::silent(seen, after)),
            )
            .await;
        match emitted {
            Ok(emitted) => {
                info!(room = %seen.room, device = %seen.device, ?emitted, "device silent: notification stored");
                seen.reported = true;
                changed = true;
            }
            Err(error) => {
                warn!(%error, "storing a silent-device notification failed; trying again")
            }
        }
    }
    changed
}

/// Stores the outcome of every finished delivery not reported yet.
async fn report(rule: &Rule, home: &Home, slot: &mut Slot) -> bool {
    let mut changed = false;
    for record in slot.state.notifications.values_mut() {
        for index in 0..record.deliveries.len() {
            let delivery = &record.deliveries[index];
            if delivery.reported || delivery.status == Status::Pending {
                continue;
            }
            if delivery.status == Status::Failed {
                if let Err(error) = dead_letter(rule, record, delivery).await {
                    warn!(%error, "dead-lettering a delivery failed; trying again");
                    continue;
                }
            }
            let outcome = NotificationDelivery {
                notification_id: record.id.clone(),
                recipient: delivery.recipient.clone(),
                channel: delivery.channel.clone(),
                delivered: delivery.status == Status::Delivered,
                attempts: delivery.attempts,
                error: delivery.error.clone(),
                step: delivery.step,
            };
            let stored = rule
                .events
                .emit(
                    Place {
                        home: &home.name,
                        room: &record.room,
                        device: &record.device,
                    },
                    &record.cause,
                    &format!(
                        "delivery-{}-{}-{}-{}",
                        record.id, delivery.recipient, delivery.channel, delivery.step
                    ),
                    Body::NotificationDelivery(outcome),
                )
                .await;
            match stored {
                Ok(_) => {
                    record.deliveries[index].reported = true;
                    changed = true;
                }
                Err(error) => warn!(%error, "storing a delivery outcome failed; trying again"),
            }
        }
    }
    changed
}

/// Sets a delivery given up aside in `HEARTH_DLQ`: the notification as it
/// would have been sent (a `hearth.v1.Event`), why in the headers.
async fn dead_letter(rule: &Rule, record: &Record, delivery: &Delivery) -> Result<(), String> {
    let message = outgoing(record, delivery);
    warn!(
        notification_id = %record.id,
        recipient = %delivery.recipient,
        channel = %delivery.channel,
        attempts = delivery.attempts,
        error = %delivery.error,
        "delivery given up: dead-lettered"
    );
    let event = v1::Event {
        id: record.id.clone(),
        correlation_id: record.correlation_id.clone(),
        causation_id: record.causation_id.clone(),
        occurred_at: None,
        received_at: Some(clock::timestamp(record.created_ms)),
        home: record.home.clone(),
        room: record.room.clone(),
        device: record.device.clone(),
        source: Some(v1::Source {
            convention: CONSUMER.to_owned(),
            client_id: String::new(),
            topic: String::new(),
        }),
        body: Some(Body::Notification(Notification {
            severity: message.severity as i32,
            category: message.category.clone(),
            title: message.title.clone(),
            message: message.message.clone(),
        })),
    };
    let detail = format!(
        "{}/{} step {}: gave up after {} attempt{}: {}",
        delivery.recipient,
        delivery.channel,
        delivery.step,
        delivery.attempts,
        if delivery.attempts == 1 { "" } else { "s" },
        delivery.error
    );
    let mut map = HeaderMap::new();
    map.insert(HeaderName::from_static(headers::REASON), "undeliverable");
    map.insert(
        HeaderName::from_static(headers::DETAIL),
        &*headers::safe_value(&detail),
    );
    map.insert("Hearth-Consumer", CONSUMER);
    map.insert(
        HeaderName::from_static(headers::CONTENT_TYPE),
        rule.encoding.content_type(),
    );
    map.insert(HeaderName::from_static(headers::SCHEMA), v1::EVENT_SCHEMA);
    map.insert(
        HeaderName::from_static(headers::CORRELATION_ID),
        &*headers::safe_value(&record.correlation_id),
    );
    map.insert("Hearth-Notification-Id", &*headers::safe_value(&record.id));
    map.insert(
        "Hearth-Recipient",
        &*headers::safe_value(&delivery.recipient),
    );
    map.insert("Hearth-Channel", &*headers::safe_value(&delivery.channel));
    map.insert(
        NATS_MESSAGE_ID,
        &*headers::safe_value(&format!("{CONSUMER}-dlq-{}", message.idempotency_key)),
    );
    let payload = rule.encoding.encode(&event);
    rule.js
        .publish_with_headers(DLQ_SUBJECT, map, payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Drops finished records after [`KEEP`] and dedup entries past their
/// window.
fn prune(home: &Home, slot: &mut Slot, now: u64) -> bool {
    let before = slot.state.notifications.len() + slot.state.dedup.len();
    slot.state.notifications.retain(|_, record| {
        // A critical one stays acknowledgeable for a day; others need
        // keeping only for a look at how they went.
        let keep = millis(if record.critical() { KEEP } else { KEEP_OTHERS });
        !record.finished() || record.updated_ms.saturating_add(keep) > now
    });
    // A home's state is one KV value: a flood of notifications must not
    // make it grow without bound. The oldest finished ones go first.
    let finished = slot
        .state
        .notifications
        .values()
        .filter(|record| record.finished())
        .count();
    if finished > MAX_FINISHED {
        let mut oldest: Vec<(u64, String)> = slot
            .state
            .notifications
            .values()
            .filter(|record| record.finished())
            .map(|record| (record.updated_ms, record.id.clone()))
            .collect();
        oldest.sort();
        for (_, id) in oldest.into_iter().take(finished - MAX_FINISHED) {
            slot.state.notifications.remove(&id);
        }
    }
    let window = millis(home.config.dedup_window);
    slot.state
        .dedup
        .retain(|_, entry| entry.at_ms.saturating_add(window) > now);
    before != slot.state.notifications.len() + slot.state.dedup.len()
}
