//! Which connection currently owns each client id. MQTT says a new
//! connection with a client id that is already connected takes over: the
//! server closes the old one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    // Held only for a map insert or remove, never across an await.
    owners: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_id: AtomicU64,
}

/// A connection's claim on its client id; gives it back on drop unless a
/// newer connection took it over.
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    registry: &'a Registry,
    client_id: String,
    connection: u64,
}

impl Registry {
    /// Claims `client_id` for a connection that `taken_over` cancels when
    /// another connection claims the same id.
    pub(crate) fn claim(&self, client_id: &str, taken_over: CancellationToken) -> Claim<'_> {
        let connection = self.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(client_id.to_owned(), (connection, taken_over));
        if let Some((_, previous)) = previous {
            previous.cancel();
        }
        Claim {
            registry: self,
            client_id: client_id.to_owned(),
            connection,
        }
    }

    pub(crate) fn connected(&self) -> usize {
        self.owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut owners = self
            .registry
            .owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if owners
            .get(&self.client_id)
            .is_some_and(|(owner, _)| *owner == self.connection)
        {
            owners.remove(&self.client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_cancels_the_first_and_keeps_the_id() {
        let registry = Registry::default();
        let first = CancellationToken::new();
        let claim1 = registry.claim("dev", first.clone());
        let second = CancellationToken::new();
        let claim2 = registry.claim("dev", second.clone());
        assert!(first.is_cancelled());
        assert!(!second.is_cancelled());
        drop(claim1);
        assert_eq!(
            registry.connected(),
            1,
            "the old claim must not remove the new owner"
        );
        drop(claim2);
        assert_eq!(registry.connected(), 0);
    }
}
