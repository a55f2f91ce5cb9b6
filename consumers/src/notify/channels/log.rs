//! `kind = "log"`: a line in the rule's log (target `hearth_notify`), for
//! a home without other channels or as a record beside them.

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{severity_word, Channel, Outgoing, SendError};

#[derive(Debug)]
pub(super) struct Log;

impl Channel for Log {
    fn send<'a>(&'a self, message: &'a Outgoing) -> BoxFuture<'a, Result<(), SendError>> {
        async move {
            tracing::info!(
                target: "hearth_notify",
                severity = severity_word(message.severity),
                kind = message.kind,
                category = %message.category,
                title = %message.title,
                "{}",
                message.message
            );
            Ok(())
        }
        .boxed()
    }
}
