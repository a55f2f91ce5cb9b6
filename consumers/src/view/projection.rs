//! Applying events to the homes' documents and storing them.
//!
//! The documents are kept in memory (read from the bucket once, at start),
//! so an event costs no read, and the runtime hands events over in
//! batches: each home changed by a batch is written once, every home at the
//! same time, so one round trip confirms many events. The write is the
//! confirmation: the runtime acknowledges an event only after its home's
//! write. Each write expects the revision this instance last wrote or read,
//! so a document changed by another writer meanwhile (a second process by
//! mistake, `nats kv put`) is not overwritten: the home is read again and
//! its events tried again on what is stored (skipped where already in it).
//! The view itself runs once per consumer, as every rule does (see
//! `runtime`).

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use futures::StreamExt;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::bucket;
use super::document::{Applied, HomeView};
use super::ViewError;
use crate::runtime::{HandlerError, Received};
use crate::state;

/// A home's document and the bucket revision it was stored at (0: none).
#[derive(Debug)]
struct Kept {
    view: HomeView,
    revision: u64,
}

#[derive(Debug, Clone)]
pub(super) struct Projection {
    store: kv::Store,
    /// Only the consumer's handler takes it, one event at a time; serving
    /// reads the bucket.
    homes: Arc<Mutex<HashMap<String, Kept>>>,
}

impl Projection {
    /// Reads every home's document from the bucket.
    pub(super) async fn load(store: kv::Store) -> Result<Self, ViewError> {
        let failed = |problem: String| ViewError::Load { problem };
        let mut homes = HashMap::new();
        let mut keys = store.keys().await.map_err(|e| failed(e.to_string()))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| failed(e.to_string()))?;
            let home = match state::split_key(&key) {
                Some(mut names) if names.len() == 1 => names.remove(0),
                _ => {
                    warn!(key, "not a home's key; left alone");
                    continue;
                }
            };
            if let Some(kept) = read(&store, &home).await.map_err(failed)? {
                homes.insert(home, kept);
            }
        }
        info!(homes = homes.len(), "view loaded");
        Ok(Self {
            store,
            homes: Arc::new(Mutex::new(homes)),
        })
    }

    /// The runtime's handler: applies a batch of events to their homes'
    /// documents in memory, then stores each home changed once, all homes
    /// at the same time. An event's outcome is its home's write: it is
    /// acknowledged only once the document holding it is stored.
    pub(super) async fn handle(&self, events: Vec<Received>) -> Vec<Result<(), HandlerError>> {
        let mut outcomes: Vec<Result<(), HandlerError>> = Vec::with_capacity(events.len());
        let mut homes = self.homes.lock().await;
        // The homes changed, each with the events (their places in
        // `outcomes`) its next write confirms.
        let mut changed: HashMap<String, Vec<usize>> = HashMap::new();
        // Homes that could not be read: their events wait for a retry, so
        // none is applied before an earlier one.
        let mut unreadable: HashMap<String, String> = HashMap::new();
        for (place, received) in events.iter().enumerate() {
            outcomes.push(Ok(()));
            let event = &received.event;
            let sequence = received.stream_sequence;
            if event.home.is_empty() {
                debug!(sequence, "an event without a home; nothing to project");
                continue;
            }
            let home = event.home.as_str();
            if let Some(problem) = unreadable.get(home) {
                outcomes[place] = Err(HandlerError::Retry(problem.clone()));
                continue;
            }
            if !homes.contains_key(home) {
                match read(&self.store, home).await {
                    Ok(kept) => {
                        let kept = kept.unwrap_or_else(|| Kept {
                            view: HomeView::new(home),
                            revision: 0,
                        });
                        homes.insert(home.to_owned(), kept);
                    }
                    Err(problem) => {
                        outcomes[place] = Err(HandlerError::Retry(problem.clone()));
                        unreadable.insert(home.to_owned(), problem);
                        continue;
                    }
                }
            }
            let Some(kept) = homes.get_mut(home) else {
                continue;
            };
            match kept.view.apply(sequence, event) {
                Applied::Changed => changed.entry(home.to_owned()).or_default().push(place),
                Applied::AlreadyApplied => debug!(
                    home,
                    sequence,
                    applied = kept.view.sequence,
                    "applied before; skipped"
                ),
                Applied::Ignored => {}
            }
        }
        // Each write is sent as soon as its document is serialised (a task
        // of its own), while the next is serialised.
        let mut writes = Vec::with_capacity(changed.len());
        for (home, confirms) in changed {
            let Some(kept) = homes.get(&home) else {
                continue;
            };
            match serde_json::to_vec(&kept.view) {
                Ok(bytes) => {
                    let store = self.store.clone();
                    let (key, revision) = (bucket::key(&home), kept.revision);
                    let write =
                        tokio::spawn(
                            async move { store.update(key, bytes.into(), revision).await },
                        );
                    writes.push((home, confirms, write));
                }
                Err(error) => {
                    // The last event made it so; the ones before it may
                    // go in without it when tried again.
                    homes.remove(&home);
                    let problem = format!("the view of {home:?} does not serialise: {error}");
                    if let Some((last, before)) = confirms.split_last() {
                        for &place in before {
                            outcomes[place] = Err(HandlerError::Retry(problem.clone()));
                        }
                        outcomes[*last] = Err(HandlerError::Poison(problem));
                    }
                }
            }
        }
        for (home, confirms, write) in writes {
            let written = match write.await {
                Ok(written) => written,
                Err(error) => {
                    homes.remove(&home);
                    let failure = format!("storing the view of {home:?} stopped: {error}");
                    for place in confirms {
                        outcomes[place] = Err(HandlerError::Retry(failure.clone()));
                    }
                    continue;
                }
            };
            let failure = match written {
                Ok(revision) => {
                    if let Some(kept) = homes.get_mut(&home) {
                        kept.revision = revision;
                    }
                    debug!(home, events = confirms.len(), revision, "stored");
                    continue;
                }
                Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                    warn!(
                        home,
                        "the home's view changed in the bucket; reading it again"
                    );
                    format!("the view of {home:?} changed in the bucket while applying the events")
                }
                Err(error) => format!("cannot store the view of {home:?}: {error}"),
            };
            // What is in memory is now ahead of the bucket: the home is
            // read again when its events are tried again, and applied to
            // what is stored (skipped where it already holds them).
            homes.remove(&home);
            for place in confirms {
                outcomes[place] = Err(HandlerError::Retry(failure.clone()));
            }
        }
        outcomes
    }
}

/// A home's document and revision from the bucket; `None` when it has none
/// (never stored, or purged).
async fn read(store: &kv::Store, home: &str) -> Result<Option<Kept>, String> {
    let entry = store
        .entry(bucket::key(home))
        .await
        .map_err(|e| format!("cannot read the view of {home:?}: {e}"))?;
    let Some(entry) = entry else {
        return Ok(None);
    };
    if entry.operation != Operation::Put {
        return Ok(Some(Kept {
            view: HomeView::new(home),
            revision: entry.revision,
        }));
    }
    let view = serde_json::from_slice(&entry.value).map_err(|e| {
        format!(
            "the stored view of {home:?} is not a view document ({e}); \
             `hearth-consumers view --rebuild` makes it again from the stream"
        )
    })?;
    Ok(Some(Kept {
        view,
        revision: entry.revision,
    }))
}
