//! The MQTT server devices connect to: the accept loop ([`Listener`]) owns
//! the connection limit and shutdown; each connection is one
//! [`connection::Connection`] task; [`registry::Registry`] makes a second
//! connection with the same client id take over the first.

mod codec;
mod connection;
mod persistent;
mod registry;
mod throttle;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::MqttConfig;
use crate::ingest::Ingest;

pub(crate) use registry::Registry;

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: MqttConfig,
    pub(crate) ingest: Arc<Ingest>,
    /// Publish/subscribe between clients.
    pub(crate) router: Arc<crate::broker::Router>,
    /// Persistent sessions.
    pub(crate) sessions: Arc<crate::sessions::Sessions>,
    /// Logins and the ACL.
    pub(crate) auth: Arc<crate::auth::Auth>,
    pub(crate) registry: Registry,
    /// Bytes of publishes in flight across all connections
    /// (`mqtt.max_inflight_bytes`): what bounds the gateway's memory when
    /// storage is slow, whatever the number of devices.
    pub(crate) budget: Arc<Semaphore>,
}

pub(crate) struct Listener {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// One permit per open connection, shared by the plain and the TLS
    /// listener: past the limit, new devices wait in the kernel's accept
    /// queue instead of exhausting memory or descriptors.
    limit: Arc<Semaphore>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listener {
    pub(crate) fn new(
        listener: TcpListener,
        shared: Arc<Shared>,
        limit: Arc<Semaphore>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        Self {
            listener,
            shared,
            limit,
            tls,
        }
    }

    /// Accepts until `shutdown`; every connection task is tracked by
    /// `connections` so the caller can wait for them to finish.
    pub(crate) async fn run(self, shutdown: CancellationToken, connections: TaskTracker) {
        let mut accept_errors = 0u32;
        loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                permit = Arc::clone(&self.limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    accept_errors = 0;
                    let _ = stream.set_nodelay(true);
                    let connection = connection::Connection::new(
                        stream,
                        peer,
                        Arc::clone(&self.shared),
                        shutdown.child_token(),
                        self.tls.clone(),
                    );
                    connections.spawn(async move {
                        connection.run().await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead
                    // of spinning, the condition usually clears as
                    // connections close.
                    accept_errors += 1;
                    let wait = Duration::from_millis(10 * 2u64.pow(accept_errors.min(8)));
                    if accept_errors == 1 {
                        warn!(%error, "accepting an MQTT connection failed; backing off");
                    } else if accept_errors == 8 {
                        error!(%error, "accepting MQTT connections keeps failing");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

pub(crate) fn log_listening(listener: &TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "MQTT listener ready");
    }
}
