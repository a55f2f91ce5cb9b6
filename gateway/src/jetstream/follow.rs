//! Following a stream that keeps the last message of each subject
//! (`HEARTH_RETAINED`, `HEARTH_DEVICES`): every gateway reads all of it at
//! start, then each new message as it is stored, to keep an in-memory copy
//! that answers without a round trip to JetStream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long the first read of a stream may stall before start fails.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Hands every last-per-subject message of `stream` (whose subjects are
/// `subjects`) to `apply`, returns
/// once all stored at start were applied, and keeps applying new ones in
/// the background until `shutdown`. `apply` also sees messages it has seen
/// before (the consumer recreates itself after a NATS outage), so it must
/// be idempotent.
pub(crate) async fn follow(
    js: &jetstream::Context,
    stream: &'static str,
    subjects: &str,
    description: &str,
    shutdown: CancellationToken,
    apply: impl Fn(&jetstream::Message) + Send + 'static,
) -> Result<(), async_nats::Error> {
    let mut handle = js.get_stream(stream).await?;
    let stored = handle.info().await?.state.messages;
    let consumer = handle
        .create_consumer(consumer::pull::OrderedConfig {
            description: Some(description.to_owned()),
            // The stream's whole subject space: last-per-subject needs one.
            filter_subject: subjects.to_owned(),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut applied = 0usize;
    if stored > 0 {
        // Caught up when the server says nothing more is pending.
        loop {
            let Some(message) = tokio::time::timeout(LOAD_TIMEOUT, messages.next()).await? else {
                break;
            };
            let message = message?;
            let pending = message.info().map_or(0, |info| info.pending);
            apply(&message);
            applied += 1;
            if pending == 0 {
                break;
            }
        }
    }
    info!(stream, subjects = applied, "loaded");
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = messages.next() => message,
            };
            match message {
                Some(Ok(message)) => apply(&message),
                // The ordered consumer recreates itself and goes on from
                // where it was.
                Some(Err(error)) => debug!(stream, %error, "following"),
                None => {
                    warn!(stream, "stopped following: the NATS client closed");
                    return;
                }
            }
        }
    });
    Ok(())
}
