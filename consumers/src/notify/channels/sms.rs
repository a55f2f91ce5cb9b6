//! `kind = "sms"`: an SMS through a provider's HTTP API, described by a
//! template rather than code per provider: `url`, `method`, `body` and
//! `headers`, with `{to}` and `{message}` replaced. In the URL they are
//! URL-encoded; in a JSON body escaped as JSON string content; in a form
//! body (`application/x-www-form-urlencoded`) URL-encoded.
//!
//! ```toml
//! kind = "sms"
//! url = "https://api.sms.example/v1/messages"
//! to = "+491701234567"
//! body = '{"to": "{to}", "text": "{message}"}'
//! headers_env = { Authorization = "SMS_API_AUTH" }
//! ```

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{http_outcome, Channel, Outgoing, SendError};
use crate::notify::config::SmsSpec;

#[derive(Debug)]
pub(super) struct Sms {
    spec: SmsSpec,
    http: reqwest::Client,
    timeout: Duration,
}

impl Sms {
    pub(super) fn new(spec: SmsSpec, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            spec,
            http,
            timeout,
        }
    }

    /// The text of the SMS: title and message, short.
    fn text(message: &Outgoing) -> String {
        format!("{}: {}", message.title, message.message)
    }
}

/// `{to}` and `{message}` replaced in `template`, each through `escape`.
pub(super) fn fill(template: &str, to: &str, message: &str, escape: fn(&str) -> String) -> String {
    template
        .replace("{to}", &escape(to))
        .replace("{message}", &escape(message))
}

fn url_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn json_escaped(text: &str) -> String {
    let quoted = serde_json::Value::from(text).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

impl Channel for Sms {
    fn send<'a>(&'a self, message: &'a Outgoing) -> BoxFuture<'a, Result<(), SendError>> {
        async move {
            let text = Self::text(message);
            let url = fill(&self.spec.url, &self.spec.to, &text, url_encoded);
            let method = reqwest::Method::from_bytes(self.spec.method.as_bytes())
                .map_err(|e| SendError::permanent(format!("method: {e}")))?;
            let mut request = self.http.request(method, url).timeout(self.timeout);
            if let Some(template) = &self.spec.body {
                let escape = if self.spec.content_type.contains("json") {
                    json_escaped
                } else if self.spec.content_type.contains("x-www-form-urlencoded") {
                    url_encoded
                } else {
                    str::to_owned
                };
                request = request
                    .header("Content-Type", self.spec.content_type.as_str())
                    .body(fill(template, &self.spec.to, &text, escape));
            }
            for (name, value) in &self.spec.headers {
                request = request.header(name.as_str(), value.expose());
            }
            http_outcome(request, message).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_escaped_for_where_they_stand() {
        let message = "Smoke \"kitchen\"\n& more";
        assert_eq!(
            fill(
                r#"{"to":"{to}","text":"{message}"}"#,
                "+49 1",
                message,
                json_escaped
            ),
            r#"{"to":"+49 1","text":"Smoke \"kitchen\"\n& more"}"#
        );
        assert_eq!(
            fill(
                "https://x/send?to={to}&text={message}",
                "+49 1",
                "a b&c",
                url_encoded
            ),
            "https://x/send?to=%2B49%201&text=a%20b%26c"
        );
    }
}
