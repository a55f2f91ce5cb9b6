//! Acknowledging a notification, over NATS and HTTP (MQTT comes through the
//! gateway as a `NotificationAck` event already).
//!
//! - NATS request/reply on `hearth.notify.ack`:
//!   `{"notification_id": "…", "recipient": "alice"}`, answered
//!   `{"ok": true}` or `{"ok": false, "error": "…"}`.
//! - HTTP: `POST /notifications/<id>/ack?recipient=alice` (200, 400 for a
//!   missing or unknown recipient, 404 for an unknown notification, 409
//!   for one acknowledged before); `GET /notifications/<id>` shows its
//!   deliveries; `GET /notifications` lists those the rule holds.
//!
//! Both store a `NotificationAck` event (via "nats" or "http") in
//! `HEARTH_EVENTS` and answer once it is stored; the rule's consumer then
//! applies it like one from MQTT, so every acknowledgement is in the log
//! and takes effect in event order.

use std::sync::Arc;

use async_nats::{Client, Subscriber};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use hearth_proto::v1::{event::Body, NotificationAck};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::channels::severity_word;
use super::records::{Record, Status};
use super::rule::Rule;
use crate::events::{Cause, Place};

/// The subject of acknowledgements over NATS.
pub const ACK_SUBJECT: &str = "hearth.notify.ack";

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum AckError {
    #[error("unknown notification {0:?} (never sent, or finished more than a day ago)")]
    Unknown(String),
    #[error("notification {id:?} was already acknowledged by {by}")]
    Already { id: String, by: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("cannot store the acknowledgement: {0}")]
    Store(String),
}

impl Rule {
    /// Stores an acknowledgement of notification `id` by `recipient`.
    pub(super) async fn request_ack(
        &self,
        id: &str,
        recipient: &str,
        via: &str,
    ) -> Result<(), AckError> {
        if id.trim().is_empty() {
            return Err(AckError::BadRequest(
                "notification_id is missing".to_owned(),
            ));
        }
        if recipient.trim().is_empty() {
            return Err(AckError::BadRequest("recipient is missing".to_owned()));
        }
        let (home, record, _) = self
            .find(id)
            .await
            .ok_or_else(|| AckError::Unknown(id.to_owned()))?;
        if home.config.recipient(recipient).is_none() {
            return Err(AckError::BadRequest(format!(
                "{recipient:?} is not a recipient in home {:?}",
                home.name
            )));
        }
        if let Some(ack) = &record.ack {
            return Err(AckError::Already {
                id: id.to_owned(),
                by: ack.by(),
            });
        }
        self.events
            .emit(
                Place {
                    home: &record.home,
                    room: &record.room,
                    device: &record.device,
                },
                &Cause {
                    event_id: record.id.clone(),
                    correlation_id: record.correlation_id.clone(),
                },
                &format!("ack-{id}-{via}-{recipient}"),
                Body::NotificationAck(NotificationAck {
                    notification_id: id.to_owned(),
                    recipient: recipient.to_owned(),
                    via: via.to_owned(),
                }),
            )
            .await
            .map_err(|e| AckError::Store(e.to_string()))?;
        info!(notification_id = %id, %recipient, via, correlation_id = %record.correlation_id, "acknowledgement stored");
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct AckRequest {
    notification_id: String,
    #[serde(default)]
    recipient: String,
}

/// Subscribes to [`ACK_SUBJECT`] (queue group `hearth-notify`).
pub(super) async fn subscribe(client: &Client) -> Result<Subscriber, String> {
    client
        .queue_subscribe(ACK_SUBJECT, super::CONSUMER.to_owned())
        .await
        .map_err(|e| format!("cannot subscribe to {ACK_SUBJECT}: {e}"))
}

/// Answers acknowledgement requests until `shutdown`.
pub(super) async fn serve_nats(
    rule: Arc<Rule>,
    client: Client,
    mut requests: Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            () = shutdown.cancelled() => break,
            request = requests.next() => request,
        };
        let Some(request) = request else {
            warn!("the {ACK_SUBJECT} subscription ended");
            break;
        };
        let outcome = match serde_json::from_slice::<AckRequest>(&request.payload) {
            Ok(ack) => {
                rule.request_ack(&ack.notification_id, &ack.recipient, "nats")
                    .await
            }
            Err(error) => Err(AckError::BadRequest(format!(
                "expected {{\"notification_id\": \"…\", \"recipient\": \"…\"}}: {error}"
            ))),
        };
        let answer = match &outcome {
            Ok(()) => json!({"ok": true}),
            Err(error) => json!({"ok": false, "error": error.to_string()}),
        };
        if let Err(error) = &outcome {
            info!(%error, "acknowledgement over NATS refused");
        }
        if let Some(reply) = request.reply {
            if let Err(error) = client.publish(reply, answer.to_string().into()).await {
                debug!(%error, "answering an acknowledgement failed");
            }
        }
    }
    let _ = requests.unsubscribe().await;
}

/// Serves the HTTP API until `shutdown`.
pub(super) async fn serve_http(
    rule: Arc<Rule>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/notifications", get(list))
        .route("/notifications/{id}", get(show))
        .route("/notifications/{id}/ack", post(acknowledge))
        .with_state(rule);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(%error, "the notify HTTP server stopped");
    }
}

async fn acknowledge(
    State(rule): State<Arc<Rule>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let recipient = query
        .and_then(|query| {
            reqwest::Url::parse(&format!("http://query/?{query}"))
                .ok()?
                .query_pairs()
                .find(|(name, _)| name == "recipient")
                .map(|(_, value)| value.into_owned())
        })
        .unwrap_or_default();
    match rule.request_ack(&id, &recipient, "http").await {
        Ok(()) => Json(json!({"ok": true})).into_response(),
        Err(error) => {
            let status = match error {
                AckError::Unknown(_) => StatusCode::NOT_FOUND,
                AckError::Already { .. } => StatusCode::CONFLICT,
                AckError::BadRequest(_) => StatusCode::BAD_REQUEST,
                AckError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            (
                status,
                Json(json!({"ok": false, "error": error.to_string()})),
            )
                .into_response()
        }
    }
}

#[derive(Debug, Serialize)]
struct Shown {
    notification: Record,
    /// Recipients who have it held back (quiet hours, rate limit).
    held_for: Vec<String>,
}

async fn show(State(rule): State<Arc<Rule>>, Path(id): Path<String>) -> Response {
    match rule.find(&id).await {
        Some((_, notification, held_for)) => Json(Shown {
            notification,
            held_for,
        })
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"ok": false, "error": AckError::Unknown(id).to_string()})),
        )
            .into_response(),
    }
}

async fn list(State(rule): State<Arc<Rule>>) -> Response {
    let mut out = Vec::new();
    for home in rule.homes.values() {
        let slot = home.lock().await;
        for record in slot.state.notifications.values() {
            out.push(json!({
                "id": record.id,
                "home": record.home,
                "severity": severity_word(record.severity),
                "category": record.category,
                "title": record.title,
                "created_ms": record.created_ms,
                "acknowledged_by": record.ack.as_ref().map(|a| a.by()),
                "pending": record.deliveries.iter().filter(|d| d.status == Status::Pending).count(),
                "escalating": record.escalation.is_some(),
            }));
        }
    }
    Json(out).into_response()
}
