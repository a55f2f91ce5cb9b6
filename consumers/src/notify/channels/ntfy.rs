//! `kind = "ntfy"`: a push through an ntfy server: the message as the POST
//! body to `<server>/<topic>`, with `Title`, `Priority` (5 for critical, 4
//! warning, 3 otherwise) and `Tags` headers, and the token, if any, as a
//! bearer token.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use hearth_proto::v1::Severity;

use super::{header_text, http_outcome, Channel, Outgoing, SendError};
use crate::notify::config::{NtfySpec, Secret};

#[derive(Debug)]
pub(super) struct Ntfy {
    url: String,
    token: Option<Secret>,
    http: reqwest::Client,
    timeout: Duration,
}

impl Ntfy {
    pub(super) fn new(spec: NtfySpec, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            url: format!("{}/{}", spec.server, spec.topic),
            token: spec.token,
            http,
            timeout,
        }
    }
}

/// ntfy's priority (1 to 5) and tags (emoji short codes shown on phones).
fn priority_and_tags(message: &Outgoing) -> (&'static str, String) {
    let (priority, tag) = match message.severity {
        _ if message.kind == "done" => ("3", "white_check_mark"),
        Severity::Critical => ("5", "rotating_light"),
        Severity::Warning => ("4", "warning"),
        Severity::Info | Severity::Unspecified => ("3", "information_source"),
    };
    (priority, format!("{tag},{}", message.category))
}

impl Channel for Ntfy {
    fn send<'a>(&'a self, message: &'a Outgoing) -> BoxFuture<'a, Result<(), SendError>> {
        async move {
            let (priority, tags) = priority_and_tags(message);
            let mut request = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .header("Title", header_text(&message.title))
                .header("Priority", priority)
                .header("Tags", header_text(&tags))
                .body(message.message.clone());
            if let Some(token) = &self.token {
                request = request.bearer_auth(token.expose());
            }
            http_outcome(request, message).await
        }
        .boxed()
    }
}
