//! The `hearth_view` bucket: one key per home, its document as JSON.

use async_nats::jetstream::{self, kv};

use super::ViewError;
use crate::state;

/// The bucket, created when missing.
pub(super) async fn open(js: &jetstream::Context) -> Result<kv::Store, ViewError> {
    state::open_bucket(
        js,
        super::BUCKET,
        "hearth view: the live state of every home (devices, rooms, alarm), one key per home",
    )
    .await
    .map_err(|e| ViewError::Bucket(e.to_string()))
}

/// The key of a home's document: the home's name (see [`state::key`]).
pub(super) fn key(home: &str) -> String {
    state::key(&[home])
}
