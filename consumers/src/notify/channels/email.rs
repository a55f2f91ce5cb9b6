//! `kind = "email"`: an e-mail over SMTP (STARTTLS, TLS or plain), with a
//! `Message-ID` made from the message's idempotency key, so a copy sent
//! twice is recognisable as the same message.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use lettre::message::{header::ContentType, Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Channel, Outgoing, SendError};
use crate::notify::config::{EmailSpec, SmtpTls};

#[derive(Debug)]
pub(super) struct Email {
    spec: EmailSpec,
    timeout: Duration,
}

impl Email {
    pub(super) fn new(spec: EmailSpec, timeout: Duration) -> Self {
        Self { spec, timeout }
    }

    /// A connection per message: notifications are rare, and a pooled
    /// connection would sit idle and be dropped by the server anyway.
    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, SendError> {
        let tls = match self.spec.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls | SmtpTls::Tls => {
                let parameters = TlsParameters::new(self.spec.server.clone())
                    .map_err(|e| SendError::permanent(format!("TLS: {e}")))?;
                if self.spec.tls == SmtpTls::Tls {
                    Tls::Wrapper(parameters)
                } else {
                    Tls::Required(parameters)
                }
            }
        };
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.spec.server.as_str())
                .port(self.spec.port)
                .tls(tls)
                .timeout(Some(self.timeout));
        if let Some((user, password)) = &self.spec.credentials {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        Ok(builder.build())
    }

    fn message(&self, message: &Outgoing) -> Result<Message, SendError> {
        let mailbox = |text: &str| {
            text.parse::<Mailbox>()
                .map_err(|e| SendError::permanent(format!("address {text:?}: {e}")))
        };
        let body = format!(
            "{}\n\n--\nhearth notification {} ({}), {} {}/{}\n",
            message.message,
            message.notification_id,
            message.category,
            message.home,
            message.room,
            message.device
        );
        Message::builder()
            .from(mailbox(&self.spec.from)?)
            .to(mailbox(&self.spec.to)?)
            .subject(message.title.clone())
            .message_id(Some(message_id(&message.idempotency_key)))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| SendError::permanent(format!("cannot build the e-mail: {e}")))
    }
}

/// `<key@hearth.notify>`: the idempotency key is made of `[A-Za-z0-9_=.-]`
/// (see `state::key`), all valid in a Message-ID.
pub(super) fn message_id(idempotency_key: &str) -> String {
    format!("<{idempotency_key}@hearth.notify>")
}

impl Channel for Email {
    fn send<'a>(&'a self, message: &'a Outgoing) -> BoxFuture<'a, Result<(), SendError>> {
        async move {
            let email = self.message(message)?;
            let transport = self.transport()?;
            match tokio::time::timeout(self.timeout * 3, transport.send(email)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) if error.is_permanent() => {
                    Err(SendError::permanent(format!("SMTP: {error}")))
                }
                Ok(Err(error)) => Err(SendError::retry(format!("SMTP: {error}"))),
                Err(_) => Err(SendError::retry("SMTP: timed out")),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttls_and_tls_transports_build_on_the_ring_provider() {
        for tls in [SmtpTls::Starttls, SmtpTls::Tls, SmtpTls::None] {
            let email = Email::new(
                EmailSpec {
                    server: "smtp.example.com".into(),
                    port: 587,
                    tls,
                    from: "hearth <hearth@example.com>".into(),
                    to: "alice@example.com".into(),
                    credentials: None,
                },
                Duration::from_secs(1),
            );
            assert!(email.transport().is_ok(), "{tls:?}");
        }
        assert_eq!(
            message_id("n1.alice.mail.0"),
            "<n1.alice.mail.0@hearth.notify>"
        );
    }
}
