//! The per-connection store pipeline.
//!
//! Publishes go to JetStream in arrival order with a reply subject of this
//! pipeline's own (`<inbox>.<entry>.<generation>.<message>`, one subscription per
//! connection), so that an acknowledgement costs a map-free index into the
//! queue instead of a future, a channel and a timer per message as the
//! request API would. Entries settle strictly from the front, which keeps
//! PUBACKs in arrival order.
//!
//! Failures are retried under the same message ids until JetStream stored
//! the message: an error reply after a back-off, a missing reply after
//! [`ACK_TIMEOUT`]. A late reply to an earlier attempt still counts, since
//! the ids make every attempt the same message.
//!
//! A new QoS 1 publish that is both stored as events (or a dead letter, or
//! a retained copy) and queued for persistent sessions is stored in two
//! steps: the queued copies only once the others said which generation of
//! its ids it has (see `jetstream::dedup`). The events are what tells a
//! repeat of an older identical publish; a session subscribed since that
//! one has no earlier copy, so its copy stored under the old generation and
//! again under the new one would reach it twice. A publish that is only
//! queued, or retained and queued (no events, no dead letter), has nothing
//! that tells its generation and is still published whole: a repeat of it
//! that finds some sessions new and some not stores the new ones' copies
//! under both generations (a copy twice rather than none).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, StatusCode, Subscriber};
use futures::StreamExt;
use rumqttc::QoS;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::{Done, Ingest, Outgoing, Prepared, Received};

/// How long a publish may wait for JetStream's reply before it is sent
/// again (under the same id, so at most one copy is stored).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(50);
/// How often a pipeline with publishes in flight looks for overdue ones.
const RETRY_TICK: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What JetStream answered for one message.
#[derive(Debug)]
enum Ack {
    Stored {
        sequence: u64,
        /// The stream, kept only for duplicates (they may need reading back).
        duplicate_in: Option<String>,
    },
    Failed(String),
}

/// JetStream's reply to a publish.
#[derive(Deserialize)]
struct ApiAck<'a> {
    #[serde(borrow)]
    stream: Option<&'a str>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
}

impl Ack {
    fn parse(message: &async_nats::Message) -> Self {
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            return Self::Failed("no stream answered (JetStream unavailable)".into());
        }
        match serde_json::from_slice::<ApiAck<'_>>(&message.payload) {
            Ok(ApiAck {
                error: Some(error), ..
            }) => Self::Failed(format!(
                "JetStream error {}: {}",
                error.code, error.description
            )),
            Ok(ApiAck {
                seq: Some(sequence),
                stream,
                duplicate,
                ..
            }) => Self::Stored {
                sequence,
                duplicate_in: duplicate.then(|| stream.unwrap_or_default().to_owned()),
            },
            _ => Self::Failed(format!(
                "unexpected reply from JetStream: {}",
                String::from_utf8_lossy(&message.payload)
            )),
        }
    }
}

/// One publish in flight.
struct Entry {
    id: u64,
    prepared: Prepared,
    generation: u32,
    acks: Vec<Option<Ack>>,
    /// Messages published and still without a reply.
    missing: usize,
    /// Messages `..released` are published; the rest (the copies queued for
    /// sessions) wait until the generation is known.
    released: usize,
    /// The generation is known to be this publish's own (its held copies
    /// were released): a duplicate from now on is an earlier attempt of it,
    /// never read back. A copy's reply lost and sent again must not be
    /// taken for an older publish's (the session may have consumed and
    /// purged the first one).
    settled: bool,
    /// When the messages without a reply are published again.
    deadline: Instant,
    backoff: Duration,
}

/// What settling the front entry came to.
enum Settle {
    Done,
    /// Not yet: it was published again, or waits for its retry.
    Again,
}

pub(crate) struct Pipeline {
    ingest: Arc<Ingest>,
    client: Client,
    inbox: String,
    replies: Subscriber,
    queue: VecDeque<Entry>,
    next_id: u64,
    /// From the publish's arrival to its being settled (stored).
    settled_after: metrics::Histogram,
}

impl Pipeline {
    /// Starts the pipeline task. Publishes go in through the returned sender;
    /// settled ones come out, in the same order, through the receiver. The
    /// task ends when the sender is dropped and everything in flight settled,
    /// or when the receiver is dropped.
    pub(crate) async fn spawn(
        ingest: Arc<Ingest>,
        capacity: usize,
        stop: tokio_util::sync::CancellationToken,
        span: tracing::Span,
    ) -> Result<
        (
            mpsc::Sender<Received>,
            mpsc::Receiver<Done>,
            tokio::task::JoinHandle<()>,
        ),
        async_nats::SubscribeError,
    > {
        let client = ingest.js.client();
        let inbox = client.new_inbox();
        let replies = client.subscribe(format!("{inbox}.>")).await?;
        let pipeline = Self {
            ingest,
            client,
            inbox,
            replies,
            queue: VecDeque::new(),
            next_id: 0,
            settled_after: metrics::histogram!(crate::telemetry::STORE_SECONDS),
        };
        let (jobs_tx, jobs) = mpsc::channel(capacity);
        let (done_tx, done_rx) = mpsc::channel(capacity);
        let task = tokio::spawn(pipeline.run(jobs, done_tx, capacity, stop).instrument(span));
        Ok((jobs_tx, done_rx, task))
    }

    /// Runs until the jobs sender is dropped and everything settled, the
    /// done receiver is dropped, or `stop`. `stop` is only looked at between
    /// steps, never inside one: a step may be recording a generation that a
    /// later retransmission depends on.
    async fn run(
        mut self,
        mut jobs: mpsc::Receiver<Received>,
        done: mpsc::Sender<Done>,
        capacity: usize,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut open = true;
        // One coarse timer for the whole queue instead of one per entry: a
        // timer registration per publish showed in profiles. Retries are
        // therefore due to the nearest tick, well within a 5 s timeout.
        let mut tick = tokio::time::interval(RETRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while self.queue.front().is_some_and(|entry| entry.missing == 0) {
                match self.settle_front().await {
                    Settle::Done => {
                        let Some(entry) = self.queue.pop_front() else {
                            break;
                        };
                        if entry
                            .acks
                            .iter()
                            .all(|ack| matches!(ack, Some(Ack::Stored { .. })))
                        {
                            self.ingest.store_succeeded();
                        }
                        if let Ok(took) = entry.prepared.received_at.elapsed() {
                            self.settled_after.record(took);
                        }
                        let retained_sequence =
                            entry
                                .prepared
                                .retained
                                .and_then(|index| match entry.acks.get(index) {
                                    Some(Some(Ack::Stored { sequence, .. })) => Some(*sequence),
                                    _ => None,
                                });
                        if done
                            .send(entry.prepared.done(retained_sequence))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Settle::Again => break,
                }
            }
            if !open && self.queue.is_empty() {
                return;
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    self.hand_over_held().await;
                    return;
                }
                reply = self.replies.next() => match reply {
                    Some(reply) => {
                        if let Some(position) = self.record(&reply) {
                            self.release(position).await;
                        }
                    }
                    None => {
                        warn!("the NATS client closed; the store pipeline stops");
                        return;
                    }
                },
                job = jobs.recv(), if open && self.queue.len() < capacity => match job {
                    Some(received) => self.enqueue(received).await,
                    None => open = false,
                },
                _ = tick.tick(), if !self.queue.is_empty() => self.resend_overdue().await,
            }
        }
    }

    async fn enqueue(&mut self, received: Received) {
        let prepared = self.ingest.prepare(received);
        let mut generation = 0;
        if prepared.dup {
            if let Some(key) = &prepared.dedup {
                // A retransmission must be stored under its original's id.
                let mut backoff = RETRY_MIN;
                generation = loop {
                    match self.ingest.generations.get(key).await {
                        Ok(generation) => break generation,
                        Err(error @ crate::jetstream::dedup::DedupError::Corrupt(_)) => {
                            warn!(%error, "treating it as generation 0");
                            break 0;
                        }
                        Err(error) => {
                            warn!(%error, "retrying");
                            backoff = pause(backoff).await;
                        }
                    }
                };
            }
        }
        let count = prepared.messages.len();
        // A retransmission's generation is known already, and QoS 0 has none.
        let released = match prepared.messages.iter().position(Outgoing::is_queued) {
            Some(first)
                if prepared.dedup.is_some()
                    && !prepared.dup
                    && prepared.messages[..first]
                        .iter()
                        .any(Outgoing::tells_generation) =>
            {
                first
            }
            _ => count,
        };
        let mut entry = Entry {
            id: self.next_id,
            prepared,
            generation,
            acks: (0..count).map(|_| None).collect(),
            missing: released,
            released,
            settled: false,
            deadline: Instant::now() + ACK_TIMEOUT,
            backoff: RETRY_MIN,
        };
        self.next_id += 1;
        self.publish(&mut entry).await;
        self.queue.push_back(entry);
    }

    /// Publishes every released message of `entry` that has no reply yet.
    async fn publish(&self, entry: &mut Entry) {
        let encoding = self.ingest.encoding;
        for index in 0..entry.released {
            if entry.acks[index].is_some() {
                continue;
            }
            let message = &entry.prepared.messages[index];
            let headers = entry.prepared.headers(index, entry.generation, encoding);
            let reply = format!("{}.{}.{}.{index}", self.inbox, entry.id, entry.generation);
            // The hand-over waits while the NATS client's buffer is full (it
            // is during a reconnect); bounded, so that timeouts and QoS 0
            // accounting keep running.
            let handed_over = crate::deadline::within(
                ACK_TIMEOUT,
                self.client.publish_with_reply_and_headers(
                    message.subject.clone(),
                    reply,
                    headers,
                    message.payload.clone(),
                ),
            )
            .await;
            let error = match handed_over {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error.to_string(),
                Err(_) => "the NATS client did not take the message in time".to_owned(),
            };
            entry.acks[index] = Some(Ack::Failed(error));
            entry.missing -= 1;
        }
        entry.deadline = Instant::now() + ACK_TIMEOUT;
    }

    /// Files a reply under its entry and message. Replies to an earlier
    /// generation of an entry are ignored: they answer a message id the
    /// entry has moved on from. Returns the position of an entry whose held
    /// copies can go now: everything else of it was stored afresh, so its
    /// generation stands.
    fn record(&mut self, reply: &async_nats::Message) -> Option<usize> {
        let (id, generation, index) = reply
            .subject
            .as_str()
            .strip_prefix(self.inbox.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(parse_reply_token)?;
        let front = self.queue.front().map(|entry| entry.id)?;
        // Replies for entries already settled (a late reply to an earlier
        // attempt) fall outside the queue and are ignored.
        let position = usize::try_from(id.checked_sub(front)?).ok()?;
        let entry = self.queue.get_mut(position)?;
        if entry.generation != generation || index >= entry.released {
            return None;
        }
        if let Some(slot @ None) = entry.acks.get_mut(index) {
            *slot = Some(Ack::parse(reply));
            entry.missing -= 1;
        }
        // A failure or a duplicate is for `settle_front` to decide.
        let fresh = |ack: &Option<Ack>| {
            matches!(
                ack,
                Some(Ack::Stored {
                    duplicate_in: None,
                    ..
                })
            )
        };
        (entry.missing == 0
            && entry.released < entry.acks.len()
            && entry.acks[..entry.released].iter().all(fresh))
        .then_some(position)
    }

    /// Publishes the held copies of the entry at `position`.
    async fn release(&mut self, position: usize) {
        let mut queue = std::mem::take(&mut self.queue);
        if let Some(entry) = queue.get_mut(position) {
            entry.missing += entry.acks.len() - entry.released;
            entry.released = entry.acks.len();
            entry.settled = true;
            self.publish(entry).await;
        }
        self.queue = queue;
    }

    /// Decides the front entry, all of whose messages have a reply.
    async fn settle_front(&mut self) -> Settle {
        let ingest = Arc::clone(&self.ingest);
        let Some(entry) = self.queue.front_mut() else {
            return Settle::Again;
        };
        let failure = entry.acks.iter().find_map(|ack| match ack {
            Some(Ack::Failed(error)) => Some(error.clone()),
            _ => None,
        });
        if let Some(error) = failure {
            ingest.store_failed(&error);
            if entry.prepared.qos == QoS::AtMostOnce {
                ingest.count_qos0_drop(&error);
                return Settle::Done;
            }
            debug!(
                %error,
                retry_in = ?entry.backoff,
                correlation_id = %entry.prepared.correlation_id,
                "storing a publish failed; retrying under the same message ids"
            );
            let deadline = Instant::now() + entry.backoff;
            let backoff = (entry.backoff * 2).min(RETRY_MAX);
            // Those behind that failed too (a full stream refuses them all)
            // are tried again with it, not one retry tick each once they
            // reach the front: a connection with hundreds in flight must
            // recover at once when JetStream does.
            for entry in &mut self.queue {
                if entry.prepared.qos == QoS::AtMostOnce {
                    continue;
                }
                let mut failed = 0;
                for ack in &mut entry.acks {
                    if matches!(ack, Some(Ack::Failed(_))) {
                        *ack = None;
                        failed += 1;
                    }
                }
                if failed > 0 {
                    entry.missing += failed;
                    entry.deadline = deadline;
                    entry.backoff = backoff;
                }
            }
            return Settle::Again;
        }

        let duplicate = entry.acks.iter().find_map(|ack| match ack {
            Some(Ack::Stored {
                sequence,
                duplicate_in: Some(stream),
            }) => Some((stream.clone(), *sequence)),
            _ => None,
        });
        // A duplicate is the expected outcome for a retransmission; for a new
        // publish it is either an earlier attempt of this one, or an older
        // identical publish (see `jetstream::dedup`).
        let (Some((stream, sequence)), Some(key), false, false) = (
            duplicate,
            &entry.prepared.dedup,
            entry.prepared.dup,
            entry.settled,
        ) else {
            return self.settled_or_release().await;
        };
        match stored_correlation_id(&ingest, &stream, sequence).await {
            Ok(Some(id)) if id == entry.prepared.correlation_id => {
                return self.settled_or_release().await
            }
            // Another publish's message, or one already gone from the stream
            // (which this attempt's could not be: it was just acknowledged).
            Ok(_) => {
                // Skip straight past the generations already recorded rather
                // than reading back each one in turn. The recorded value is
                // only ever raised: a lookup that fails is retried, never
                // taken for 0.
                let recorded = match ingest.generations.get(key).await {
                    Ok(recorded) => recorded,
                    Err(error) => {
                        warn!(%error, "cannot read the recorded generation; retrying");
                        entry.backoff = pause(entry.backoff).await;
                        return Settle::Again;
                    }
                };
                entry.generation = entry.generation.max(recorded).saturating_add(1);
                debug!(
                    generation = entry.generation,
                    "identical repeat of an earlier publish"
                );
                let mut backoff = RETRY_MIN;
                while let Err(error) = ingest.generations.record(key, entry.generation).await {
                    warn!(%error, "retrying");
                    backoff = pause(backoff).await;
                }
            }
            Err(error) => {
                warn!(%error, "cannot read back a duplicate; retrying");
                entry.backoff = pause(entry.backoff).await;
            }
        }
        entry.acks.iter_mut().for_each(|ack| *ack = None);
        entry.missing = entry.released;
        // Re-borrow through `self` for publishing.
        let mut entry = match self.queue.pop_front() {
            Some(entry) => entry,
            None => return Settle::Again,
        };
        self.publish(&mut entry).await;
        self.queue.push_front(entry);
        Settle::Again
    }

    /// On a stop (the connection is gone): the copies still held are handed
    /// to NATS under the generation they have, so that a publish whose
    /// events were handed over is not left without its sessions' copies
    /// (a clean-session device need not send it again). Bounded: a stop
    /// must not wait out a NATS outage.
    async fn hand_over_held(&mut self) {
        let handed = tokio::time::timeout(ACK_TIMEOUT, async {
            for position in 0..self.queue.len() {
                if self
                    .queue
                    .get(position)
                    .is_some_and(|entry| entry.released < entry.acks.len())
                {
                    self.release(position).await;
                }
            }
        })
        .await;
        if handed.is_err() {
            warn!("stopping: NATS did not take every session copy in time");
        }
    }

    /// The front entry, stored under its final generation, is done, or has
    /// its held copies to publish first.
    async fn settled_or_release(&mut self) -> Settle {
        match self.queue.front() {
            Some(entry) if entry.released < entry.acks.len() => {
                self.release(0).await;
                Settle::Again
            }
            _ => Settle::Done,
        }
    }

    /// Publishes again whatever has waited past its deadline.
    async fn resend_overdue(&mut self) {
        let now = Instant::now();
        if self
            .queue
            .iter()
            .all(|e| e.missing == 0 || e.deadline > now)
        {
            return;
        }
        let mut queue = std::mem::take(&mut self.queue);
        for entry in queue
            .iter_mut()
            .filter(|e| e.missing > 0 && e.deadline <= now)
        {
            if entry.prepared.qos == QoS::AtMostOnce {
                // At most once: one attempt, and no reply means not stored
                // as far as anyone can tell.
                for ack in entry.acks.iter_mut().filter(|ack| ack.is_none()) {
                    *ack = Some(Ack::Failed(format!(
                        "no reply from JetStream within {ACK_TIMEOUT:?}"
                    )));
                }
                entry.missing = 0;
                continue;
            }
            debug!(correlation_id = %entry.prepared.correlation_id, "publishing again under the same ids");
            self.publish(entry).await;
        }
        self.queue = queue;
    }
}

/// `<entry>.<generation>.<message>` from a reply subject.
fn parse_reply_token(token: &str) -> Option<(u64, u32, usize)> {
    let mut parts = token.split('.');
    let id = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((id, generation, index))
}

/// The correlation id of a stored message; `None` when it has none or is
/// no longer stored.
async fn stored_correlation_id(
    ingest: &Ingest,
    stream: &str,
    sequence: u64,
) -> Result<Option<String>, async_nats::Error> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let stream = ingest.js.get_stream_no_info(stream).await?;
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    Ok(message
        .headers
        .get(hearth_proto::headers::CORRELATION_ID)
        .map(|value| value.as_str().to_owned()))
}

async fn pause(backoff: Duration) -> Duration {
    tokio::time::sleep(backoff).await;
    (backoff * 2).min(RETRY_MAX)
}
