//! Which connection currently owns each client id. MQTT says a new
//! connection with a client id that is already connected takes over: the
//! server closes the old one. Each client id also has a session lock, held
//! by a connection while its store pipeline runs, so that the connection
//! taking over starts only once the old one has finished storing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

type SessionLock = Arc<tokio::sync::Mutex<()>>;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    // Held only for a map insert or remove, never across an await.
    owners: Mutex<HashMap<String, Owner>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Owner {
    connection: u64,
    taken_over: CancellationToken,
    session: SessionLock,
}

/// A connection's claim on its client id; gives it back on drop unless a
/// newer connection took it over.
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    registry: &'a Registry,
    client_id: String,
    connection: u64,
    session: SessionLock,
}

impl Registry {
    /// Claims `client_id` for a connection that `taken_over` cancels when
    /// another connection claims the same id.
    pub(crate) fn claim(&self, client_id: &str, taken_over: CancellationToken) -> Claim<'_> {
        let connection = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut owners = self
            .owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let session = match owners.get(client_id) {
            Some(previous) => {
                previous.taken_over.cancel();
                Arc::clone(&previous.session)
            }
            None => SessionLock::default(),
        };
        owners.insert(
            client_id.to_owned(),
            Owner {
                connection,
                taken_over,
                session: Arc::clone(&session),
            },
        );
        Claim {
            registry: self,
            client_id: client_id.to_owned(),
            connection,
            session,
        }
    }

    pub(crate) fn connected(&self) -> usize {
        self.owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

impl Claim<'_> {
    /// The client id's session lock (shared with the connection taken over).
    pub(crate) fn session(&self) -> SessionLock {
        Arc::clone(&self.session)
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
            .is_some_and(|owner| owner.connection == self.connection)
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

    #[test]
    fn a_connection_taking_over_shares_the_session_lock_of_the_one_it_replaces() {
        let registry = Registry::default();
        let first = registry.claim("dev", CancellationToken::new());
        let held = first.session().try_lock_owned().expect("free at first");
        let second = registry.claim("dev", CancellationToken::new());
        assert!(
            second.session().try_lock_owned().is_err(),
            "the newcomer waits for the old pipeline"
        );
        drop(held);
        assert!(second.session().try_lock_owned().is_ok());
        let other = registry.claim("other", CancellationToken::new());
        assert!(!Arc::ptr_eq(&other.session(), &second.session()));
    }
}
