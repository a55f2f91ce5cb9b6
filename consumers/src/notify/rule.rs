//! The rule's state and its handling of events.
//!
//! Each configured home has its state in memory, behind its own lock, and in
//! the KV bucket (one key per home, written whole after each change). The
//! memory is what the rule goes by; the bucket is where a restarted rule
//! finds it again. An event is acknowledged only once its effects are in
//! the bucket; an event JetStream sends again (after a crash, or because
//! storing failed) is recognised by its id and changes nothing twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex as StdMutex};

use async_nats::jetstream::{self, kv};
use hearth_proto::v1::{self, event::Body, NotificationAck};
use hearth_proto::Encoding;
use jiff::tz::TimeZone;
use tokio::sync::{Mutex, MutexGuard, Notify};
use tracing::{debug, info, warn};

use super::channels::{self, Channel};
use super::conditions::{self, Change};
use super::config::{HomeConfig, Retry};
use super::escalation::{self, Acknowledged};
use super::fanout::{self, Accepted, Incoming};
use super::records::{HomeState, Record};
use super::{NotifyError, BUCKET, CONSUMER};
use crate::clock::Clock;
use crate::events::{Cause, Events, Place};
use crate::homes::Homes;
use crate::runtime::{HandlerError, Received};
use crate::state;

/// A home with recipients, and what the rule keeps of it.
#[derive(Debug)]
pub(super) struct Home {
    pub(super) name: String,
    pub(super) config: HomeConfig,
    pub(super) tz: TimeZone,
    /// By (recipient, channel).
    channels: BTreeMap<(String, String), (Arc<dyn Channel>, Retry)>,
    slot: Mutex<Slot>,
}

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) state: HomeState,
    /// Changed in memory and not yet stored.
    dirty: bool,
}

impl Slot {
    pub(super) fn changed(&mut self) {
        self.dirty = true;
    }
}

impl Home {
    pub(super) fn channel(
        &self,
        recipient: &str,
        channel: &str,
    ) -> Option<(Arc<dyn Channel>, Retry)> {
        self.channels
            .get(&(recipient.to_owned(), channel.to_owned()))
            .cloned()
    }

    pub(super) async fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().await
    }
}

/// The notify rule.
#[derive(Debug)]
pub(super) struct Rule {
    pub(super) homes: BTreeMap<String, Home>,
    store: kv::Store,
    pub(super) events: Events,
    pub(super) js: jetstream::Context,
    pub(super) encoding: Encoding,
    pub(super) clock: Clock,
    /// Wakes the worker when there is something to send.
    pub(super) wake: Notify,
    /// Deliveries being sent (by idempotency key): not picked up twice.
    pub(super) in_flight: StdMutex<BTreeSet<String>>,
}

impl Rule {
    /// Builds the channels and loads every home's state.
    pub(super) async fn open(
        js: &jetstream::Context,
        homes: &Homes,
        encoding: Encoding,
        clock: Clock,
    ) -> Result<Self, NotifyError> {
        let store = state::open_bucket(
            js,
            BUCKET,
            "hearth notify: notifications being delivered or escalated, rate limits, quiet hours and dedup (the notify rule's state)",
        )
        .await
        .map_err(|e| NotifyError::State(e.to_string()))?;
        let http = channels::http_client().map_err(NotifyError::Channels)?;
        let mut built = BTreeMap::new();
        for (name, home) in &homes.homes {
            let config = &home.notify;
            if config.recipients.is_empty() {
                continue;
            }
            let invalid = |problem: String| NotifyError::Config {
                home: name.clone(),
                problem,
            };
            config.validate().map_err(invalid)?;
            // Quiet hours are local time of the home.
            let tz = home.zone();
            let mut channels = BTreeMap::new();
            for recipient in &config.recipients {
                for channel in &recipient.channels {
                    let spec = channel.spec().map_err(|problem| {
                        invalid(format!(
                            "notify: recipient {:?}, channel {:?}: {problem}",
                            recipient.name, channel.name
                        ))
                    })?;
                    let retry = config.retry_of(channel);
                    channels.insert(
                        (recipient.name.clone(), channel.name.clone()),
                        (channels::build(spec, &http, retry.timeout), retry),
                    );
                }
            }
            let state = match store.get(key(name)).await {
                Ok(Some(bytes)) => serde_json::from_slice(&bytes).map_err(|e| {
                    NotifyError::State(format!("the state of home {name:?} does not read: {e}"))
                })?,
                Ok(None) => HomeState::default(),
                Err(e) => return Err(NotifyError::State(e.to_string())),
            };
            info!(
                home = %name,
                notifications = state.notifications.len(),
                "notify state loaded"
            );
            built.insert(
                name.clone(),
                Home {
                    name: name.clone(),
                    config: config.clone(),
                    tz,
                    channels,
                    slot: Mutex::new(Slot {
                        state,
                        dirty: false,
                    }),
                },
            );
        }
        Ok(Self {
            homes: built,
            store,
            events: Events::new(js.clone(), encoding, CONSUMER, clock.clone()),
            js: js.clone(),
            encoding,
            clock,
            wake: Notify::new(),
            in_flight: StdMutex::new(BTreeSet::new()),
        })
    }

    /// Handles one event of `HEARTH_EVENTS`.
    pub(super) async fn handle(&self, received: Received) -> Result<(), HandlerError> {
        let event = &received.event;
        let (Some(home), Some(body)) = (self.homes.get(&event.home), &event.body) else {
            return Ok(());
        };
        if matches!(body, Body::NotificationDelivery(_)) {
            // Its own outcomes, coming back.
            return Ok(());
        }
        let mut slot = home.lock().await;
        if slot.state.handled(&event.id) {
            debug!("handled before");
            return self.store(home, &mut slot).await;
        }
        let now = self.clock.now_ms();
        let changed = match body {
            Body::Notification(notification) => {
                let incoming = Incoming {
                    id: &event.id,
                    home: &event.home,
                    room: &event.room,
                    device: &event.device,
                    correlation_id: &event.correlation_id,
                    causation_id: &event.causation_id,
                    notification,
                };
                let accepted =
                    fanout::accept(&mut slot.state, &home.config, &home.tz, incoming, now);
                match &accepted {
                    Accepted::Recorded { sent, held } => info!(
                        notification_id = %event.id,
                        category = %notification.category,
                        severity = ?notification.severity(),
                        ?sent,
                        ?held,
                        "notification accepted"
                    ),
                    Accepted::Duplicate { of } => info!(
                        notification_id = %event.id,
                        category = %notification.category,
                        duplicate_of = %of,
                        "notification dropped: the same was sent within the dedup window"
                    ),
                    Accepted::Known => debug!(notification_id = %event.id, "known already"),
                }
                matches!(accepted, Accepted::Recorded { .. })
            }
            Body::NotificationAck(ack) => self.acknowledged(&mut slot, ack, now),
            _ => self.observe(home, &mut slot, event, now).await?,
        };
        if changed {
            slot.state.mark_handled(&event.id);
            slot.changed();
            self.store(home, &mut slot).await?;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// An acknowledgement event (from the gateway, or stored by this rule
    /// for a NATS or HTTP one).
    fn acknowledged(&self, slot: &mut Slot, ack: &NotificationAck, now: u64) -> bool {
        let Some(record) = slot.state.notifications.get_mut(&ack.notification_id) else {
            warn!(notification_id = %ack.notification_id, via = %ack.via, "acknowledgement of an unknown notification ignored");
            return false;
        };
        match escalation::acknowledge(record, &ack.recipient, &ack.via, now) {
            Acknowledged::Now { done_to } => {
                info!(
                    notification_id = %ack.notification_id,
                    recipient = %ack.recipient,
                    via = %ack.via,
                    correlation_id = %record.correlation_id,
                    ?done_to,
                    "notification acknowledged"
                );
                true
            }
            Acknowledged::Already(earlier) => {
                info!(notification_id = %ack.notification_id, by = %earlier.by(), "acknowledged before");
                false
            }
        }
    }

    /// A device event: conditions that begin or clear, and when it was seen.
    async fn observe(
        &self,
        home: &Home,
        slot: &mut Slot,
        event: &v1::Event,
        now: u64,
    ) -> Result<bool, HandlerError> {
        let mut changed = false;
        match conditions::change(&home.config, &slot.state, event) {
            Some(Change::Begun(begun)) => {
                // Stored before the latch: a crash in between stores it
                // again, which the stream's duplicate window (same id) and
                // then the dedup window catch.
                let emitted = self
                    .events
                    .emit(
                        Place {
                            home: &event.home,
                            room: &event.room,
                            device: &event.device,
                        },
                        &Cause::of(event),
                        &format!("{}-{}", begun.notification.category, event.id),
                        Body::Notification(begun.notification.clone()),
                    )
                    .await
                    .map_err(|e| HandlerError::Retry(e.to_string()))?;
                info!(category = %begun.notification.category, ?emitted, "condition began: notification stored");
                slot.state.latched.insert(begun.latch);
                changed = true;
            }
            Some(Change::Cleared(latch)) => {
                debug!(%latch, "condition cleared");
                slot.state.latched.remove(&latch);
                changed = true;
            }
            None => {}
        }
        if home.config.silent_after.is_some() && conditions::is_report(event) {
            let at = event
                .received_at
                .as_ref()
                .and_then(|t| u64::try_from(t.seconds).ok())
                .map_or(now, |seconds| seconds.saturating_mul(1000).min(now));
            conditions::seen(&mut slot.state, event, at);
            changed = true;
        }
        Ok(changed)
    }

    /// Stores a home's state if it changed.
    pub(super) async fn store(&self, home: &Home, slot: &mut Slot) -> Result<(), HandlerError> {
        if !slot.dirty {
            return Ok(());
        }
        let bytes =
            serde_json::to_vec(&slot.state).map_err(|e| HandlerError::Poison(e.to_string()))?;
        self.store
            .put(key(&home.name), bytes.into())
            .await
            .map_err(|e| HandlerError::Retry(format!("storing the state of {}: {e}", home.name)))?;
        slot.dirty = false;
        Ok(())
    }

    /// The home a notification is in, with a copy of its record.
    pub(super) async fn find(&self, notification_id: &str) -> Option<(&Home, Record, Vec<String>)> {
        for home in self.homes.values() {
            let slot = home.lock().await;
            if let Some(record) = slot.state.notifications.get(notification_id) {
                let held_for = slot
                    .state
                    .recipients
                    .iter()
                    .filter(|(_, r)| r.holds(notification_id))
                    .map(|(name, _)| name.clone())
                    .collect();
                return Some((home, record.clone(), held_for));
            }
        }
        None
    }
}

/// The KV key of a home: `home.<home>`.
fn key(home: &str) -> String {
    state::key(&["home", home])
}
