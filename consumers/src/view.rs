//! The read side (`hearth-view`): the live state of every home.
//!
//! - A projection of `HEARTH_EVENTS` (consumer `hearth-view`, read from the
//!   stream's start): each home's devices (last value of each kind, last
//!   seen, battery, online), rooms (occupancy, lights, temperature,
//!   humidity, lux) and alarm, one JSON document per home in the KV bucket
//!   `hearth_view` under the home's name (`nats kv get hearth_view home`).
//!   The shape is [`document::HomeView`].
//! - Idempotent and in order: a document holds the stream sequence of the
//!   last event applied to it, and an event at or below it is skipped, so
//!   an event redelivered after a crash (stored, not yet acknowledged) is
//!   not applied twice, and a replay changes nothing already in.
//! - Served from the bucket, so any instance answers: over NATS
//!   request/reply (`hearth.view`, `hearth.view.<home>`,
//!   `hearth.view.<home>.<room>.<device>`) and over HTTP (`GET /homes`,
//!   `/homes/<home>`, `/homes/<home>/devices/<room>/<device>`).
//! - Rebuildable: [`rebuild`] drops the consumer and the documents, and the
//!   next [`run`] replays the stream from its start (what the stream still
//!   holds: events past its limits are gone).

mod bucket;
pub mod document;
mod http;
mod projection;
mod read;
mod requests;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use async_nats::jetstream::{self, ErrorCode};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::runtime::{self, RuntimeError, Spec, EVENTS_STREAM};
use projection::Projection;
use requests::Responder;

/// The consumer's name, and the bucket of the documents.
pub const CONSUMER: &str = "hearth-view";
pub const BUCKET: &str = "hearth_view";
/// Where the view answers NATS requests.
pub const SUBJECT: &str = "hearth.view";
/// Where the view answers HTTP requests unless told otherwise.
pub const DEFAULT_HTTP_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9881);

/// How the view runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Where to serve HTTP; `None`: no HTTP (NATS requests only).
    pub http_listen: Option<SocketAddr>,
    /// The homes this process projects; any process answers for every
    /// home, from the bucket.
    pub partition: crate::partition::Partition,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            http_listen: Some(DEFAULT_HTTP_LISTEN),
            partition: crate::partition::Partition::WHOLE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("cannot open the KV bucket {BUCKET}: {0}")]
    Bucket(String),
    #[error("cannot read the homes' views from {BUCKET}: {problem}")]
    Load { problem: String },
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP failed: {0}")]
    Http(#[source] std::io::Error),
    #[error("cannot answer requests on {subject}: {problem}")]
    Subscribe { subject: String, problem: String },
    #[error(transparent)]
    Consumer(#[from] RuntimeError),
    #[error("cannot rebuild the view: {0}")]
    Rebuild(String),
    #[error("a part of the view stopped unexpectedly: {0}")]
    Task(String),
}

/// The view's consumer: every event, from the stream's start.
pub fn spec() -> Spec {
    Spec {
        from_start: true,
        // Batches of up to half of it: a home's document (about 10 kB for
        // 80 devices) is written once per batch however many of its events
        // the batch holds, so while catching up (a backlog, a rebuild) a
        // bigger batch writes far less: over 200 homes, 8,192 events take
        // 200 writes, where 256 took 150 (measured: 2,900 events/s with
        // 256, 20,000 with 2,048, 35,000 with 8,192 on nats-server 2.9).
        // Live, batches are as small as what arrives meanwhile.
        prefetch: 16384,
        ..Spec::new(
            CONSUMER,
            &format!(
                "hearth view: the live state of every home (devices, rooms, alarm), in KV bucket {BUCKET}"
            ),
            hearth_proto::subject::EVENTS_SUBJECTS,
        )
    }
}

/// Runs the projection, the NATS responder and (when asked) the HTTP server
/// until `shutdown`, or until one of them fails, which stops the others.
pub async fn run(
    js: jetstream::Context,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), ViewError> {
    let store = bucket::open(&js).await?;
    let projection = Projection::load(store.clone()).await?;
    // Listening and subscribing before consuming: a port taken or a
    // subscription refused fails the start rather than a running view.
    let listener = match options.http_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ViewError::Listen { addr, source })?;
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "serving the view over HTTP");
            }
            Some(listener)
        }
        None => None,
    };
    let responder = Responder::subscribe(js.client()).await?;
    info!(subject = SUBJECT, "answering view requests over NATS");

    let stop = shutdown.child_token();
    let mut parts = JoinSet::new();
    if let Some(listener) = listener {
        let serving = http::serve(listener, store.clone(), stop.clone());
        parts.spawn(stopping_all_on_error(stop.clone(), async move {
            serving.await.map_err(ViewError::Http)
        }));
    }
    parts.spawn(stopping_all_on_error(
        stop.clone(),
        responder.run(store, stop.clone()),
    ));
    let consumed = runtime::run_batches(
        &js,
        &spec().partitioned(options.partition),
        move |events| {
            let projection = projection.clone();
            async move { projection.handle(events).await }
        },
        stop.clone(),
    )
    .await;
    let mut result = match consumed {
        Ok(_) => Ok(()),
        // Stopped while waiting for the gateway's stream: not a failure.
        Err(RuntimeError::Stream(_)) if stop.is_cancelled() => Ok(()),
        Err(error) => Err(ViewError::from(error)),
    };
    stop.cancel();
    while let Some(joined) = parts.join_next().await {
        let outcome = joined.unwrap_or_else(|e| Err(ViewError::Task(e.to_string())));
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}

/// `work`, stopping the other parts of the view if it fails.
async fn stopping_all_on_error(
    stop: CancellationToken,
    work: impl Future<Output = Result<(), ViewError>>,
) -> Result<(), ViewError> {
    let result = work.await;
    if result.is_err() {
        stop.cancel();
    }
    result
}

/// Makes the next [`run`] build the view again from the stream's start:
/// deletes the consumer, then purges the bucket. Returns how many homes'
/// documents were dropped. Run it with the view stopped (a running view
/// would lose its consumer).
///
/// The consumer goes first: interrupted between the two, the next run reads
/// the stream from its start and skips everything the documents already
/// hold, which leaves them as they were.
pub async fn rebuild(js: &jetstream::Context) -> Result<u64, ViewError> {
    match js
        .delete_consumer_from_stream(CONSUMER, EVENTS_STREAM)
        .await
    {
        Ok(_) => info!(consumer = CONSUMER, "consumer deleted"),
        Err(error) => {
            let gone = matches!(
                error.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(ref e)
                    if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                        || e.error_code() == ErrorCode::STREAM_NOT_FOUND
            );
            if !gone {
                return Err(ViewError::Rebuild(format!(
                    "cannot delete consumer {CONSUMER}: {error}"
                )));
            }
        }
    }
    bucket::open(js).await?;
    let purged = js
        .get_stream(format!("KV_{BUCKET}"))
        .await
        .map_err(|e| ViewError::Rebuild(format!("cannot find the bucket {BUCKET}: {e}")))?
        .purge()
        .await
        .map_err(|e| ViewError::Rebuild(format!("cannot purge the bucket {BUCKET}: {e}")))?
        .purged;
    info!(
        homes = purged,
        "view dropped; the next run replays {EVENTS_STREAM}"
    );
    Ok(purged)
}
