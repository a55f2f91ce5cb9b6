//! What an operator watches: Prometheus metrics (`GET /metrics`), whether
//! the process is alive (`GET /healthz`) and whether it can work
//! (`GET /readyz`: connected to NATS, `HEARTH_EVENTS` there).
//!
//! The rules count with the `metrics` facade wherever the thing happens;
//! the binary installs the Prometheus recorder ([`install`]) and serves it
//! ([`serve`]). Without a recorder (the library in tests) the counts cost
//! nothing. The metrics:
//!
//! - `hearth_consumer_events_total{consumer, outcome}`: events `handled`,
//!   `retried` (an attempt failed) and `dead_lettered`;
//! - `hearth_consumer_handler_seconds{consumer}`: how long the rule took
//!   over an event (or a batch of them);
//! - `hearth_consumer_pending_events{consumer}` and
//!   `hearth_consumer_ack_pending_events{consumer}`: the lag, from the
//!   consumer's info every [`LAG_EVERY`];
//! - `hearth_dlq_events_total{consumer, reason}`;
//! - `hearth_commands_total{kind, outcome}`: device commands `stored`,
//!   `duplicate` (the same action for the same event, not stored again) or
//!   `failed`;
//! - `hearth_rule_events_total{rule, kind}`: events the rules stored
//!   (alarm states, notices, notification requests and outcomes);
//! - `hearth_notify_deliveries_total{channel, outcome}`: notification
//!   attempts `delivered`, `retrying` or `failed` (given up);
//! - `hearth_nats_reconnects_total`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::runtime::EVENTS_STREAM;

/// Where the endpoints listen unless told otherwise (the gateway's are on
/// 9880, the view's on 9881, notify's on 9882).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9883);
/// How often the consumers' lag is read.
pub const LAG_EVERY: Duration = Duration::from_secs(5);
/// How long /readyz waits for JetStream to say the events stream is there.
const READY_WAIT: Duration = Duration::from_secs(2);

/// Handler times: 50 µs to 10 s.
const HANDLER_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the metrics recorder: {0}")]
    Install(String),
    #[error("cannot listen for metrics and health checks on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the Prometheus recorder for this process.
pub fn install() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("hearth_consumer_handler_seconds".to_owned()),
            HANDLER_BUCKETS,
        )
        .map_err(|e| TelemetryError::Install(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    // The recorder keeps every histogram sample until upkeep (or a scrape)
    // folds them into buckets: without it, rules nobody scrapes would grow
    // by one sample per event handled, for ever.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .map_err(|e| TelemetryError::Install(format!("cannot start the metrics upkeep: {e}")))?;
    Ok(handle)
}

#[derive(Clone)]
struct Served {
    metrics: PrometheusHandle,
    js: jetstream::Context,
}

/// Binds `addr` (a port taken fails the start, not a running process).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TelemetryError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Listen { addr, source })?;
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    Ok(listener)
}

/// Serves the endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    js: jetstream::Context,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "alive\n" }))
        .route("/readyz", get(ready))
        .with_state(Served { metrics, js });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render(State(served): State<Served>) -> String {
    served.metrics.render()
}

/// Ready when connected to NATS and the events stream is there.
async fn ready(State(served): State<Served>) -> (StatusCode, String) {
    let state = served.js.client().connection_state();
    if state != async_nats::connection::State::Connected {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: NATS is {state}\n"),
        );
    }
    // A probe answers promptly: NATS's own request timeout is 10 s, and a
    // connection that has just died still reads as connected.
    match tokio::time::timeout(READY_WAIT, served.js.get_stream(EVENTS_STREAM)).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: stream {EVENTS_STREAM}: {error}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: NATS did not answer within {READY_WAIT:?}\n"),
        ),
    }
}

/// Reads each of `consumers`' lag into its gauges every [`LAG_EVERY`],
/// until `shutdown`. A consumer not made yet is skipped.
pub async fn follow_lag(
    js: jetstream::Context,
    consumers: Vec<String>,
    shutdown: CancellationToken,
) {
    loop {
        for name in &consumers {
            let consumer: Result<jetstream::consumer::PullConsumer, _> =
                js.get_consumer_from_stream(name, EVENTS_STREAM).await;
            match consumer {
                Ok(mut consumer) => match consumer.info().await {
                    Ok(info) => {
                        metrics::gauge!("hearth_consumer_pending_events", "consumer" => name.clone())
                            .set(info.num_pending as f64);
                        metrics::gauge!("hearth_consumer_ack_pending_events", "consumer" => name.clone())
                            .set(info.num_ack_pending as f64);
                    }
                    Err(error) => debug!(consumer = name, %error, "cannot read the consumer's lag"),
                },
                Err(error) => debug!(consumer = name, %error, "cannot read the consumer's lag"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LAG_EVERY) => {}
        }
    }
}

/// Counts a NATS client event: every connection after the first is a
/// reconnect.
pub fn nats_event(event: &async_nats::Event) {
    static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
    if matches!(event, async_nats::Event::Connected)
        && CONNECTIONS.fetch_add(1, Ordering::Relaxed) > 0
    {
        metrics::counter!("hearth_nats_reconnects_total").increment(1);
    }
}
