//! The view over NATS request/reply:
//!
//! - `hearth.view` answers `{"homes": [...]}`;
//! - `hearth.view.<home>` the home's document;
//! - `hearth.view.<home>.<room>.<device>` one device's entry;
//!
//! each name one subject token ([`subject::encode_token`]). Errors are
//! `{"error": "..."}` with the `Nats-Service-Error` and
//! `Nats-Service-Error-Code` headers (404, 400 or 503) that NATS services
//! use. The instances of the view answer as one queue group.

use async_nats::jetstream::kv;
use async_nats::{Client, HeaderMap, Message, Subscriber};
use futures::StreamExt;
use hearth_proto::subject;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::read::{self, Answer};
use super::{ViewError, SUBJECT};

const QUEUE_GROUP: &str = "hearth-view";

/// Subscribed, not yet answering: subscribing is part of starting, so a
/// failure to subscribe fails the start.
pub(super) struct Responder {
    client: Client,
    homes: Subscriber,
    named: Subscriber,
}

impl Responder {
    pub(super) async fn subscribe(client: Client) -> Result<Self, ViewError> {
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .queue_subscribe(subject.clone(), QUEUE_GROUP.to_owned())
                    .await
                    .map_err(|e| ViewError::Subscribe {
                        subject,
                        problem: e.to_string(),
                    })
            }
        };
        let homes = subscribe(SUBJECT.to_owned()).await?;
        let named = subscribe(format!("{SUBJECT}.>")).await?;
        Ok(Self {
            client,
            homes,
            named,
        })
    }

    /// Answers requests until `shutdown`; a request in hand is answered.
    pub(super) async fn run(
        self,
        store: kv::Store,
        shutdown: CancellationToken,
    ) -> Result<(), ViewError> {
        let Self {
            client,
            homes,
            named,
        } = self;
        let mut requests = futures::stream::select(homes, named);
        loop {
            let request = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                request = requests.next() => request,
            };
            let Some(request) = request else {
                return Err(ViewError::Subscribe {
                    subject: format!("{SUBJECT}, {SUBJECT}.>"),
                    problem: "the subscription ended (the NATS connection closed)".to_owned(),
                });
            };
            let span = info_span!("view_request", subject = %request.subject);
            answer(&client, &store, request).instrument(span).await;
        }
    }
}

async fn answer(client: &Client, store: &kv::Store, request: Message) {
    let Some(reply) = request.reply else {
        debug!("a request without a reply subject; nothing to answer");
        return;
    };
    let answer = match names(&request.subject) {
        Ok(names) => match names.as_slice() {
            [] => read::homes(store).await,
            [home] => read::home(store, home).await,
            [home, room, device] => read::device(store, home, room, device).await,
            _ => Answer::Invalid(format!(
                "ask {SUBJECT}, {SUBJECT}.<home> or {SUBJECT}.<home>.<room>.<device>"
            )),
        },
        Err(problem) => Answer::Invalid(problem),
    };
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let code = match &answer {
        Answer::Found(_) => None,
        Answer::NotFound(message) => Some(("404", message.clone())),
        Answer::Invalid(message) => Some(("400", message.clone())),
        Answer::Unavailable(message) => Some(("503", message.clone())),
    };
    if let Some((code, message)) = code {
        headers.insert(
            "Nats-Service-Error",
            &*hearth_proto::headers::safe_value(&message),
        );
        headers.insert("Nats-Service-Error-Code", code);
    }
    if let Err(error) = client
        .publish_with_headers(reply, headers, answer.into_body())
        .await
    {
        warn!(%error, "answering a view request failed");
    }
}

/// The names after `hearth.view`, decoded.
fn names(subject: &str) -> Result<Vec<String>, String> {
    let Some(rest) = subject.strip_prefix(SUBJECT) else {
        return Err(format!("not a view subject: {subject}"));
    };
    let Some(tokens) = rest.strip_prefix('.') else {
        return Ok(Vec::new());
    };
    tokens
        .split('.')
        .map(|token| {
            subject::decode_token(token).map_err(|e| format!("{token:?} is not a name: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_from_subject_tokens() {
        assert_eq!(names("hearth.view"), Ok(vec![]));
        assert_eq!(names("hearth.view.home"), Ok(vec!["home".to_owned()]));
        assert_eq!(
            names("hearth.view.Flat%202%2E1.Living%20Room.lamp"),
            Ok(vec![
                "Flat 2.1".to_owned(),
                "Living Room".to_owned(),
                "lamp".to_owned()
            ])
        );
        assert!(names("hearth.view.bad%zz").is_err());
    }
}
