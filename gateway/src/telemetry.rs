//! Prometheus metrics for `/metrics`.
//!
//! Counted where things happen, with the `metrics` facade (free when no
//! recorder is installed): publishes by what became of them, dead letters
//! by reason, the time from a publish's arrival to its being stored, NATS
//! reconnects. What the gateway already keeps (connections, subscriptions,
//! sessions, refusals, drops) is read when `/metrics` is asked for. The
//! binary installs the recorder ([`install`]); a process that never does
//! answers `/metrics` with 404.
//!
//! - `hearth_gateway_events_total{convention, kind}`: device events
//!   decoded (stored before the PUBACK);
//! - `hearth_gateway_not_events_total{convention}`: publishes acknowledged
//!   without an event (bridge traffic, keypad commands);
//! - `hearth_gateway_dead_letters_total{reason}`: publishes set aside in
//!   `HEARTH_DLQ`;
//! - `hearth_gateway_store_seconds`: from a publish's arrival to its being
//!   stored (the PUBACK goes out then), histogram;
//! - `hearth_gateway_store_failures_total{reason}` (failed attempts:
//!   `storage_full`, `no_stream`, `timeout`, `error`) and
//!   `hearth_gateway_store_failing` (1 while devices wait for storage);
//! - `hearth_gateway_bridge_connected`, `_bridge_received_total{outcome}`,
//!   `_bridge_forwarded_total` in bridge mode;
//! - `hearth_gateway_backpressure_waits_total{cause}`: a connection not
//!   read from until storage caught up (`inflight_window`,
//!   `memory_budget`, `retained_backlog`);
//! - `hearth_gateway_nats_reconnects_total`;
//! - gauges `hearth_gateway_mqtt_clients`, `_mqtt_subscriptions`,
//!   `_retained_topics`, `_devices_known`, `_persistent_sessions`, and
//!   counters `_refused_connections_total`, `_denied_publishes_total`,
//!   `_denied_subscriptions_total`, `_throttled_total` (backpressure:
//!   clients slowed down), `_qos0_dropped_total`, `_queue_dropped_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const EVENTS: &str = "hearth_gateway_events_total";
pub(crate) const NOT_EVENTS: &str = "hearth_gateway_not_events_total";
pub(crate) const DEAD_LETTERS: &str = "hearth_gateway_dead_letters_total";
pub(crate) const STORE_SECONDS: &str = "hearth_gateway_store_seconds";
/// Failed attempts to store a publish, by reason (`storage_full`, `no_stream`,
/// `timeout`, `error`); QoS 1 publishes are retried, QoS 0 dropped.
pub(crate) const STORE_FAILURES: &str = "hearth_gateway_store_failures_total";
/// Times a connection stopped being read until storage caught up, by cause:
/// `inflight_window` (`mqtt.max_inflight` publishes awaiting storage),
/// `memory_budget` (`mqtt.max_inflight_bytes` spent across connections),
/// `retained_backlog` (retained messages for new subscriptions unsent).
pub(crate) const BACKPRESSURE: &str = "hearth_gateway_backpressure_waits_total";
/// 1 while storing fails (devices wait for their acknowledgements).
pub(crate) const STORE_FAILING: &str = "hearth_gateway_store_failing";

/// Store times: 100 µs to 30 s.
const STORE_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder for this process, once (later calls
/// return the same). An error when another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(STORE_SECONDS.to_owned()), STORE_BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            keep_up(&handle);
            Ok(handle)
        })
        .clone()
}

/// Folds the histograms' recorded samples into their buckets every few
/// seconds. The recorder keeps every sample until then (a scrape does it
/// too): a gateway nobody scrapes would otherwise grow by one sample per
/// stored publish, for ever.
fn keep_up(handle: &PrometheusHandle) {
    let handle = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the metrics upkeep; histograms drain only when scraped");
    }
}

/// How often [`keep_up`] drains the histograms.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder's handle, when installed.
pub(crate) fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get().and_then(|installed| installed.as_ref().ok())
}

/// Counts a NATS client event: every connection after the first is a
/// reconnect.
pub(crate) fn nats_event(event: &async_nats::Event) {
    static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
    if matches!(event, async_nats::Event::Connected)
        && CONNECTIONS.fetch_add(1, Ordering::Relaxed) > 0
    {
        metrics::counter!("hearth_gateway_nats_reconnects_total").increment(1);
    }
}
