//! Notification channels: one module per kind, each a [`Channel`].
//!
//! A channel sends one [`Outgoing`] message and says whether it went
//! through; retries, backoff and giving up are the worker's. Every message
//! carries an idempotency key made of the notification id, recipient,
//! channel and step: HTTP channels send it as an `Idempotency-Key` header
//! and e-mails as their `Message-ID`, so a message sent again after a crash
//! between sending and recording it can be recognised by the receiver.

mod email;
mod log;
mod ntfy;
mod sms;
mod webhook;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hearth_proto::v1::Severity;
use serde::Serialize;

use super::config::ChannelSpec;
use super::records::Purpose;

/// The header carrying [`Outgoing::idempotency_key`] on HTTP channels.
pub(crate) const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// One message to one recipient on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Outgoing {
    /// The same for every attempt at this message, different for every
    /// other message.
    pub(crate) idempotency_key: String,
    pub(crate) notification_id: String,
    /// "notification", "reminder" (an escalation step), "done" or
    /// "summary".
    pub(crate) kind: &'static str,
    pub(crate) step: u32,
    pub(crate) recipient: String,
    pub(crate) channel: String,
    pub(crate) home: String,
    pub(crate) room: String,
    pub(crate) device: String,
    #[serde(serialize_with = "severity_name")]
    pub(crate) severity: Severity,
    pub(crate) category: String,
    pub(crate) title: String,
    pub(crate) message: String,
    pub(crate) correlation_id: String,
    /// The event that caused the notification.
    pub(crate) causation_id: String,
}

impl Outgoing {
    /// `Purpose` and step as the `kind` field reads.
    pub(crate) fn kind_of(purpose: Purpose, step: u32) -> &'static str {
        match purpose {
            Purpose::Notify if step > 0 => "reminder",
            other => other.as_str(),
        }
    }
}

/// "critical", "warning", "info".
pub(crate) fn severity_word(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "critical",
        Severity::Warning => "warning",
        Severity::Info | Severity::Unspecified => "info",
    }
}

fn severity_name<S: serde::Serializer>(severity: &Severity, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(severity_word(*severity))
}

/// Why a message did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct SendError {
    pub(crate) message: String,
    /// Trying again cannot help (a 4xx answer, a refused address): given up
    /// at once.
    pub(crate) permanent: bool,
}

impl SendError {
    pub(crate) fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

/// A way to reach a recipient.
pub(crate) trait Channel: Send + Sync + fmt::Debug {
    fn send<'a>(&'a self, message: &'a Outgoing) -> BoxFuture<'a, Result<(), SendError>>;
}

/// The HTTP client the HTTP channels share (connections are reused).
pub(crate) fn http_client() -> Result<reqwest::Client, String> {
    // reqwest is built without a crypto provider of its own (its default,
    // aws-lc-rs, is a long C build); ring, which async-nats uses too. An
    // error means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("hearth-notify/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {e}"))
}

/// The channel a spec describes; `timeout` bounds one attempt.
pub(crate) fn build(
    spec: ChannelSpec,
    http: &reqwest::Client,
    timeout: Duration,
) -> Arc<dyn Channel> {
    match spec {
        ChannelSpec::Webhook(spec) => Arc::new(webhook::Webhook::new(spec, http.clone(), timeout)),
        ChannelSpec::Email(spec) => Arc::new(email::Email::new(spec, timeout)),
        ChannelSpec::Ntfy(spec) => Arc::new(ntfy::Ntfy::new(spec, http.clone(), timeout)),
        ChannelSpec::Sms(spec) => Arc::new(sms::Sms::new(spec, http.clone(), timeout)),
        ChannelSpec::Log => Arc::new(log::Log),
    }
}

/// The outcome of an HTTP request, as channels judge it: 2xx went
/// through; 408, 429 and 5xx may go through later; other answers will not.
async fn http_outcome(
    request: reqwest::RequestBuilder,
    message: &Outgoing,
) -> Result<(), SendError> {
    let response = request
        .header(IDEMPOTENCY_KEY, message.idempotency_key.as_str())
        .send()
        .await
        .map_err(|e| SendError::retry(describe(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let detail = format!(
        "answered {status}{}{}",
        if body.is_empty() { "" } else { ": " },
        body.chars().take(200).collect::<String>()
    );
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(SendError::retry(detail))
    } else {
        Err(SendError::permanent(detail))
    }
}

/// A reqwest error with its causes (reqwest's own text hides them).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A header value for any text: non-ASCII text as an RFC 2047 encoded word
/// (`=?UTF-8?Q?...?=`), which ntfy decodes; line breaks become spaces.
fn header_text(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.is_ascii() {
        return flat;
    }
    let mut encoded = String::from("=?UTF-8?Q?");
    for byte in flat.bytes() {
        match byte {
            b' ' => encoded.push('_'),
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'*' | b'+' | b'-' | b'/' => {
                encoded.push(char::from(byte));
            }
            _ => encoded.push_str(&format!("={byte:02X}")),
        }
    }
    encoded.push_str("?=");
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_header_text_is_an_encoded_word() {
        assert_eq!(header_text("Smoke in kitchen"), "Smoke in kitchen");
        assert_eq!(
            header_text("Rauch in Küche"),
            "=?UTF-8?Q?Rauch_in_K=C3=BCche?="
        );
        assert_eq!(header_text("two\nlines"), "two lines");
    }
}
