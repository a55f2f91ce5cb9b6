//! Everything hearth keeps in JetStream: the streams ([`streams`]) and the
//! exactly-once bookkeeping for device retransmissions ([`dedup`]).

pub mod dedup;
pub(crate) mod follow;
pub mod streams;

use std::time::Duration;

use crate::config::NatsConfig;

/// The NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
}

/// Connects to NATS with reconnection forever: a gateway outlives NATS
/// restarts, and devices see delay, never errors, while NATS is away.
pub async fn connect(config: &NatsConfig, url: &str) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("hearth-gateway")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            crate::telemetry::nats_event(&event);
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; publishes wait until it is back")
                }
                other => tracing::info!(event = %other, "NATS connection event"),
            }
        });
    if let Some(path) = &config.creds {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    // Several servers of a cluster, comma-separated: the gateway starts
    // (and reconnects) while any of them answers.
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .collect();
    options
        .connect(servers)
        .await
        .map_err(|source| ConnectError::Connect {
            url: url.to_owned(),
            source,
        })
}
