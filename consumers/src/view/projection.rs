//! Applying events to the homes' documents and storing them.
//!
//! The documents are kept in memory (read from the bucket once, at start),
//! so an event costs one KV write and no read. The write is the
//! confirmation: the runtime acknowledges the event only after it. Each
//! write expects the revision this instance last wrote or read, so a
//! document changed by another writer meanwhile (a second process by
//! mistake, `nats kv put`) is not overwritten: the home is read again and
//! the event applied to what is stored (and skipped if already in it).
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

/// How often an event is applied again after the home changed under it.
const CONFLICT_ATTEMPTS: usize = 3;

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

    /// The runtime's handler: applies one event to its home's document and
    /// stores the document.
    pub(super) async fn handle(&self, received: Received) -> Result<(), HandlerError> {
        let event = &received.event;
        let sequence = received.stream_sequence;
        if event.home.is_empty() {
            debug!(sequence, "an event without a home; nothing to project");
            return Ok(());
        }
        let home = event.home.as_str();
        let mut homes = self.homes.lock().await;
        for _ in 0..CONFLICT_ATTEMPTS {
            if !homes.contains_key(home) {
                let kept = read(&self.store, home)
                    .await
                    .map_err(HandlerError::Retry)?
                    .unwrap_or_else(|| Kept {
                        view: HomeView::new(home),
                        revision: 0,
                    });
                homes.insert(home.to_owned(), kept);
            }
            let Some(kept) = homes.get_mut(home) else {
                continue;
            };
            match kept.view.apply(sequence, event) {
                Applied::Changed => {}
                Applied::AlreadyApplied => {
                    debug!(
                        home,
                        sequence,
                        applied = kept.view.sequence,
                        "applied before; skipped"
                    );
                    return Ok(());
                }
                Applied::Ignored => return Ok(()),
            }
            let bytes = match serde_json::to_vec(&kept.view) {
                Ok(bytes) => bytes,
                Err(error) => {
                    homes.remove(home);
                    return Err(HandlerError::Poison(format!(
                        "the view of {home:?} does not serialise: {error}"
                    )));
                }
            };
            match self
                .store
                .update(bucket::key(home), bytes.into(), kept.revision)
                .await
            {
                Ok(revision) => {
                    kept.revision = revision;
                    debug!(home, room = %event.room, sequence, "applied");
                    return Ok(());
                }
                Err(error) => {
                    // What is in memory is now ahead of the bucket: read the
                    // home again before anything else is applied to it.
                    homes.remove(home);
                    if error.kind() == UpdateErrorKind::WrongLastRevision {
                        warn!(
                            home,
                            "the home's view changed in the bucket; reading it again"
                        );
                        continue;
                    }
                    return Err(HandlerError::Retry(format!(
                        "cannot store the view of {home:?}: {error}"
                    )));
                }
            }
        }
        Err(HandlerError::Retry(format!(
            "the view of {home:?} kept changing in the bucket while applying the event"
        )))
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
