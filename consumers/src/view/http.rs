//! The view over HTTP: `GET /homes`, `GET /homes/<home>`,
//! `GET /homes/<home>/devices/<room>/<device>`; JSON, errors as
//! `{"error": "..."}` with 404 (nothing by that name) or 503 (the bucket
//! cannot be read).

use async_nats::jetstream::kv;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::read::{self, Answer};

/// Serves until `shutdown`, letting requests in hand finish.
pub(super) async fn serve(
    listener: TcpListener,
    store: kv::Store,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/homes", get(homes))
        .route("/homes/{home}", get(home))
        .route("/homes/{home}/devices/{room}/{device}", get(device))
        .fallback(|| async {
            Answer::NotFound("nothing here: try /homes or /homes/<home>".to_owned())
        })
        .with_state(store);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = match &self {
            Answer::Found(_) => StatusCode::OK,
            Answer::NotFound(_) => StatusCode::NOT_FOUND,
            Answer::Invalid(_) => StatusCode::BAD_REQUEST,
            Answer::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let json = [(header::CONTENT_TYPE, "application/json")];
        (status, json, self.into_body()).into_response()
    }
}

async fn homes(State(store): State<kv::Store>) -> Answer {
    read::homes(&store).await
}

async fn home(State(store): State<kv::Store>, Path(home): Path<String>) -> Answer {
    read::home(&store, &home).await
}

async fn device(
    State(store): State<kv::Store>,
    Path((home, room, device)): Path<(String, String, String)>,
) -> Answer {
    read::device(&store, &home, &room, &device).await
}
