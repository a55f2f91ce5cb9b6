//! The HTTP endpoint: `/healthz` tells whether the gateway is alive and
//! whether it can store events right now.

use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::mqtt::Shared;

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
        .with_state(state);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(%error, "HTTP endpoint failed");
    }
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
