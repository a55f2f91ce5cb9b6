//! A connection's side of a persistent session (see `crate::sessions`):
//! where it is in the session's queue, what of it the client has not
//! acknowledged, and what to keep when the client goes.

use std::collections::BTreeMap;
use std::sync::Arc;

use rumqttc::QoS;
use tokio::sync::watch;
use tracing::warn;

use crate::sessions::{level_of, Queued, Record, SessionError, Sessions};

/// Purge the acknowledged part of the queue once this many messages are
/// acknowledged past the last purge (and when the client goes).
const PURGE_EVERY: u64 = 64;

#[derive(Debug)]
pub(crate) struct Persistent {
    sessions: Arc<Sessions>,
    client_id: Arc<str>,
    record: Record,
    /// The next queue sequence to read.
    cursor: u64,
    /// Queue sequence → packet id, sent and not acknowledged.
    unacked: BTreeMap<u64, u16>,
    purged_below: u64,
    /// Told when the queue grows.
    wake: watch::Receiver<u64>,
    attachment: u64,
    /// Whether the queue may hold more than was read.
    pub(crate) unread: bool,
}

impl Persistent {
    /// Resumes (or starts) `client_id`'s session.
    pub(crate) fn resume(sessions: Arc<Sessions>, client_id: Arc<str>, record: Record) -> Self {
        let (wake, attachment) = sessions.attach(&client_id);
        Self {
            sessions,
            client_id,
            record,
            cursor: 1,
            unacked: BTreeMap::new(),
            purged_below: 1,
            wake,
            attachment,
            // Whatever was queued while the client was away.
            unread: true,
        }
    }

    /// The subscriptions to restore.
    pub(crate) fn subscriptions(&self) -> Vec<(String, QoS)> {
        self.record
            .subscriptions
            .iter()
            .map(|(filter, level)| (filter.clone(), crate::sessions::qos_of(*level)))
            .collect()
    }

    /// Records subscription changes; returns once they are stored.
    pub(crate) async fn update_subscriptions(
        &mut self,
        added: &[(String, QoS)],
        removed: &[String],
    ) -> Result<(), SessionError> {
        let mut record = self.record.clone();
        for (filter, qos) in added {
            record.subscriptions.insert(filter.clone(), level_of(*qos));
        }
        for filter in removed {
            record.subscriptions.remove(filter);
        }
        if record != self.record {
            self.sessions.save(&self.client_id, &record).await?;
            self.record = record;
        }
        Ok(())
    }

    /// Resolves when the queue grew.
    pub(crate) async fn woken(&mut self) {
        if self.wake.changed().await.is_err() {
            // Detached: never again.
            std::future::pending::<()>().await;
        }
    }

    /// The next queued message to send, if any; `unread` turns false once
    /// the queue is read to its end. Messages the client acknowledged
    /// before it went away (but not yet purged) are passed over.
    pub(crate) async fn next(&mut self) -> Option<Queued> {
        loop {
            match self.sessions.next(&self.client_id, self.cursor).await {
                Ok(Some(queued)) => {
                    self.cursor = queued.sequence + 1;
                    let acknowledged = queued.sequence <= self.record.sent_through
                        && !self.record.inflight.contains_key(&queued.sequence);
                    if acknowledged {
                        continue;
                    }
                    return Some(queued);
                }
                Ok(None) => {
                    self.unread = false;
                    return None;
                }
                Err(error) => {
                    warn!(%error, "reading the session queue failed; trying again when woken");
                    self.unread = false;
                    return None;
                }
            }
        }
    }

    /// Packet ids the client may still hold from before: not to be given
    /// to other messages, and the QoS 2 ones awaiting PUBCOMP, whose PUBREL
    /// is sent again.
    pub(crate) fn held_packet_ids(&self) -> (Vec<u16>, Vec<u16>) {
        (
            self.record.inflight.values().copied().collect(),
            self.record.released.iter().copied().collect(),
        )
    }

    /// Whether a queued message was sent before, and under which packet id.
    pub(crate) fn resent(&self, sequence: u64) -> (bool, Option<u16>) {
        (
            sequence <= self.record.sent_through,
            self.record.inflight.get(&sequence).copied(),
        )
    }

    pub(crate) fn sent(&mut self, sequence: u64, pkid: u16) {
        self.unacked.insert(sequence, pkid);
    }

    /// The client has queue message `sequence`; purges in batches.
    pub(crate) async fn acknowledged(&mut self, sequence: u64) {
        self.unacked.remove(&sequence);
        let floor = self.floor();
        if floor >= self.purged_below + PURGE_EVERY {
            self.purge(floor).await;
        }
    }

    /// Everything below this is acknowledged.
    fn floor(&self) -> u64 {
        self.unacked.keys().next().copied().unwrap_or(self.cursor)
    }

    async fn purge(&mut self, below: u64) {
        match self.sessions.purge_below(&self.client_id, below).await {
            Ok(()) => self.purged_below = below,
            Err(error) => {
                warn!(%error, "purging acknowledged messages failed; they may come again")
            }
        }
    }

    /// The client is gone: keeps what was in flight for its return (and the
    /// packet ids of QoS 2 messages awaiting PUBCOMP) and purges what it
    /// acknowledged.
    pub(crate) async fn suspend(mut self, released: Vec<u16>) {
        self.sessions.detach(&self.client_id, self.attachment);
        let floor = self.floor();
        if floor > self.purged_below {
            self.purge(floor).await;
        }
        let mut record = self.record.clone();
        // What an earlier connection sent and this one did not reach is
        // still "sent before".
        record.sent_through = record.sent_through.max(self.cursor.saturating_sub(1));
        record
            .inflight
            .retain(|sequence, _| *sequence >= self.cursor);
        record.inflight.append(&mut self.unacked);
        record.released = released.into_iter().collect();
        if let Err(error) = self.sessions.save(&self.client_id, &record).await {
            warn!(%error, "could not keep what was in flight; it comes again without DUP");
        }
    }
}
