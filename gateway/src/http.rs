//! The HTTP endpoint: `/healthz` tells whether the gateway is alive and
//! whether it can store events right now (with its numbers, as JSON),
//! `/readyz` whether it is ready to take devices' events (NATS connected,
//! `HEARTH_EVENTS` there), `/metrics` its Prometheus metrics (see
//! `telemetry`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::jetstream::streams::EVENTS_STREAM;
use crate::mqtt::Shared;

/// How long /readyz waits for JetStream to say the events stream is there.
const READY_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct State {
    pub(crate) nats: async_nats::Client,
    pub(crate) mqtt: Arc<Shared>,
    pub(crate) devices: Arc<crate::devices::Devices>,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    nats: String,
    mqtt_clients: usize,
    mqtt_subscriptions: usize,
    /// Topics with a retained message.
    retained_topics: usize,
    /// Devices whose convention and topic the gateway knows (for commands).
    devices_known: usize,
    /// Persistent MQTT sessions kept (connected or not).
    persistent_sessions: usize,
    /// Connections refused since start (failed logins).
    refused_connections: u64,
    /// Publishes and subscriptions the ACL denied since start.
    denied_publishes: u64,
    denied_subscriptions: u64,
    /// Times a client was slowed down for publishing faster than
    /// `mqtt.max_publish_rate`.
    throttled: u64,
    qos0_dropped: u64,
    /// Messages for subscribers dropped because the subscriber's queue was
    /// full (`mqtt.max_queued`).
    queue_dropped: u64,
}

pub(crate) async fn serve(listener: TcpListener, state: State, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(state);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(%error, "HTTP endpoint failed");
    }
}

/// 200 when NATS is connected, storing works and the events stream is
/// there; 503 with the reason otherwise.
async fn readyz(Extract(state): Extract<State>) -> (StatusCode, String) {
    let connection = state.nats.connection_state();
    if !matches!(connection, async_nats::connection::State::Connected) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: NATS is {connection}\n"),
        );
    }
    if let Some(trouble) = state.mqtt.ingest.store_trouble() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {trouble}\n"),
        );
    }
    let js = async_nats::jetstream::new(state.nats.clone());
    // A probe answers promptly: NATS's own request timeout is 10 s, and a
    // connection that has just died still reads as connected.
    match tokio::time::timeout(READY_WAIT, js.get_stream(EVENTS_STREAM)).await {
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

/// The Prometheus page: what was counted, and the gateway's own numbers
/// read now.
async fn metrics_page(Extract(state): Extract<State>) -> (StatusCode, String) {
    let Some(handle) = crate::telemetry::handle() else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n".to_owned(),
        );
    };
    let gauge = |name: &'static str, value: usize| metrics::gauge!(name).set(value as f64);
    gauge(
        "hearth_gateway_mqtt_clients",
        state.mqtt.registry.connected(),
    );
    gauge(
        "hearth_gateway_mqtt_subscriptions",
        state.mqtt.router.subscriptions(),
    );
    gauge(
        "hearth_gateway_retained_topics",
        state.mqtt.router.retained().len(),
    );
    gauge("hearth_gateway_devices_known", state.devices.len());
    gauge(
        "hearth_gateway_persistent_sessions",
        state.mqtt.sessions.len(),
    );
    let counters = &state.mqtt.auth.counters;
    let total = |name: &'static str, value: u64| metrics::counter!(name).absolute(value);
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    total(
        "hearth_gateway_refused_connections_total",
        load(&counters.refused_connections),
    );
    total(
        "hearth_gateway_denied_publishes_total",
        load(&counters.denied_publishes),
    );
    total(
        "hearth_gateway_denied_subscriptions_total",
        load(&counters.denied_subscriptions),
    );
    total("hearth_gateway_throttled_total", load(&counters.throttled));
    total(
        "hearth_gateway_qos0_dropped_total",
        state.mqtt.ingest.qos0_dropped(),
    );
    total(
        "hearth_gateway_queue_dropped_total",
        state.mqtt.router.dropped(),
    );
    (StatusCode::OK, handle.render())
}

/// 200 while NATS is connected, 503 otherwise; the body says more.
async fn healthz(Extract(state): Extract<State>) -> (StatusCode, Json<Health>) {
    let connection = state.nats.connection_state();
    let connected = matches!(connection, async_nats::connection::State::Connected);
    let counters = &state.mqtt.auth.counters;
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    let health = Health {
        status: if connected { "ok" } else { "degraded" },
        nats: connection.to_string(),
        mqtt_clients: state.mqtt.registry.connected(),
        mqtt_subscriptions: state.mqtt.router.subscriptions(),
        retained_topics: state.mqtt.router.retained().len(),
        devices_known: state.devices.len(),
        persistent_sessions: state.mqtt.sessions.len(),
        refused_connections: load(&counters.refused_connections),
        denied_publishes: load(&counters.denied_publishes),
        denied_subscriptions: load(&counters.denied_subscriptions),
        throttled: load(&counters.throttled),
        qos0_dropped: state.mqtt.ingest.qos0_dropped(),
        queue_dropped: state.mqtt.router.dropped(),
    };
    let code = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health))
}
