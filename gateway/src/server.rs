//! The gateway as one service: NATS (embedded or remote), the streams, the
//! MQTT listener and the HTTP endpoint, started together and stopped
//! together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::conventions::Conventions;
use crate::embedded::{EmbeddedError, NatsServer, NatsServerConfig};
use crate::ingest::Ingest;
use crate::jetstream::{self as js, dedup::Generations, streams};
use crate::{http, mqtt};

/// How long a graceful stop waits for connections to acknowledge what they
/// are still storing.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes kept free in a NATS message for a dead letter's headers.
const HEADER_ROOM: usize = 8 * 1024;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    Connect(#[from] js::ConnectError),
    #[error(transparent)]
    Passwords(#[from] crate::auth::PasswordFileError),
    #[error("bridge: {0}")]
    Bridge(#[from] crate::bridge::BridgeError),
    #[error("mqtt.tls: {0}")]
    Tls(#[from] crate::mqtt::tls::TlsError),
    #[error("bridge TLS: {0}")]
    BridgeTls(crate::mqtt::tls::TlsError),
    #[error("JetStream is not ready at {url}: {source} (is JetStream enabled on that server?)")]
    Streams {
        url: String,
        source: streams::StreamsError,
    },
    #[error(
        "the NATS server at {url} cannot reserve the streams' storage (storage.events, \
         .commands, .dlq max_bytes: {configured} in all, plus up to 256 MiB of retained \
         messages and the persistent sessions' queues): lower those limits in the \
         configuration or raise the server's JetStream max_file_store ({source})"
    )]
    StorageTooSmall {
        url: String,
        configured: bytesize::ByteSize,
        source: streams::StreamsError,
    },
    #[error("cannot load {what} from {url}: {source}")]
    Load {
        what: &'static str,
        url: String,
        source: async_nats::Error,
    },
    #[error(
        "mqtt.max_packet_size is {max_packet_size} bytes but the NATS server accepts at most \
         {max_payload} bytes per message: lower mqtt.max_packet_size below {} or raise \
         max_payload in the nats-server configuration", .max_payload.saturating_sub(HEADER_ROOM)
    )]
    PacketLimit {
        max_packet_size: usize,
        max_payload: usize,
    },
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    mqtt_addr: SocketAddr,
    mqtt_tls_addr: Option<SocketAddr>,
    http_addr: SocketAddr,
    nats_url: String,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    connections: TaskTracker,
    embedded: Option<NatsServer>,
}

impl Gateway {
    /// Starts everything and returns once devices can connect.
    pub async fn start(config: Config) -> Result<Self, GatewayError> {
        // Certificates are read first: a wrong path fails the start at once.
        let bridge_tls =
            crate::bridge::tls_config(&config.bridge).map_err(GatewayError::BridgeTls)?;
        let (nats_url, embedded) = match &config.nats.url {
            Some(url) => (url.clone(), None),
            None => {
                let mut embedded = NatsServerConfig::new(config.storage.data_dir.join("nats"));
                embedded.binary.clone_from(&config.nats.server_binary);
                embedded.host = config.nats.embedded_listen.ip().to_string();
                embedded.port = Some(config.nats.embedded_listen.port());
                let server = NatsServer::start(embedded).await?;
                (server.url(), Some(server))
            }
        };
        let client = js::connect(&config.nats, &nats_url).await?;
        // Used for the streams, the dedup bucket and reading messages back;
        // events are published by the connections' pipelines on the client.
        let jetstream = async_nats::jetstream::new(client);

        let bucket = ensure_streams(&jetstream, &config, &nats_url).await?;
        // A publish NATS cannot carry would be retried forever: refuse a
        // packet limit above what the server accepts (with room for headers).
        let max_payload = jetstream.client().server_info().max_payload;
        if config.mqtt.max_packet_size + HEADER_ROOM > max_payload {
            return Err(GatewayError::PacketLimit {
                max_packet_size: config.mqtt.max_packet_size,
                max_payload,
            });
        }
        let shutdown = CancellationToken::new();
        let auth = Arc::new(crate::auth::Auth::new(&config.auth)?);
        info!(
            password_file = ?config.auth.password_file,
            users = auth.users(),
            anonymous = config.auth.allow_anonymous,
            acl_rules = auth.acl().rules(),
            "MQTT authentication"
        );
        let load_error = |what: &'static str| {
            let url = nats_url.clone();
            move |source| GatewayError::Load { what, url, source }
        };
        let devices = crate::devices::Devices::load(&jetstream, shutdown.clone())
            .await
            .map_err(load_error("the known devices (stream HEARTH_DEVICES)"))?;
        let retained = crate::broker::Retained::load(&jetstream, shutdown.clone())
            .await
            .map_err(load_error(
                "the retained MQTT messages (stream HEARTH_RETAINED)",
            ))?;
        let sessions = crate::sessions::Sessions::load(&jetstream, shutdown.clone())
            .await
            .map_err(load_error(
                "the persistent MQTT sessions (stream HEARTH_SESSIONS)",
            ))?;
        let ingest = Arc::new(Ingest::new(
            Conventions::new(&config.conventions),
            Arc::clone(&devices),
            Arc::clone(&sessions),
            jetstream.clone(),
            config.storage.encoding,
            Generations::new(bucket),
        ));

        let listen = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Listen { what, addr, source })
        };
        let mqtt_listener = listen("MQTT", config.mqtt.listen).await?;
        let tls = if config.mqtt.tls.enabled() {
            let acceptor = config.mqtt.tls.acceptor()?;
            let listener = listen("MQTT over TLS", config.mqtt.tls.listen).await?;
            Some((listener, acceptor))
        } else {
            None
        };
        let http_listener = listen("HTTP", config.http.listen).await?;
        let mqtt_addr = local_addr(&mqtt_listener, config.mqtt.listen);
        let mqtt_tls_addr = tls
            .as_ref()
            .map(|(listener, _)| local_addr(listener, config.mqtt.tls.listen));
        let http_addr = local_addr(&http_listener, config.http.listen);

        let tasks = TaskTracker::new();
        let connections = TaskTracker::new();
        let router = crate::broker::Router::new(
            jetstream.client(),
            retained,
            config.mqtt.max_queued,
            shutdown.clone(),
        );
        let shared = Arc::new(mqtt::Shared {
            config: config.mqtt.clone(),
            ingest: Arc::clone(&ingest),
            router,
            sessions,
            auth: Arc::clone(&auth),
            registry: mqtt::Registry::default(),
            budget: Arc::new(tokio::sync::Semaphore::new(config.mqtt.max_inflight_bytes)),
        });
        if config.commands.enabled {
            let commands = crate::commands::Commands::start(
                jetstream.clone(),
                Arc::clone(&shared.router),
                Arc::clone(&devices),
                Arc::clone(&shared.sessions),
                Conventions::new(&config.conventions),
                config.commands.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(load_error("the commands consumer (stream HEARTH_COMMANDS)"))?;
            tasks.spawn(commands);
        }
        // Validated with the configuration: an invalid URL never gets here.
        if let Ok(Some(broker)) = config.bridge.broker() {
            let bridge = crate::bridge::Bridge::start(
                config.bridge.clone(),
                broker,
                bridge_tls,
                config.mqtt.max_packet_size,
                Arc::clone(&ingest),
                Arc::clone(&shared.router),
                shutdown.clone(),
            )
            .await?;
            tasks.spawn(bridge.run());
        }
        if let Some(watch) = auth.watch(shutdown.clone()) {
            tasks.spawn(watch);
        }
        let limit = Arc::new(tokio::sync::Semaphore::new(config.mqtt.max_connections));
        mqtt::log_listening(&mqtt_listener);
        tasks.spawn(
            mqtt::Listener::new(mqtt_listener, Arc::clone(&shared), Arc::clone(&limit), None)
                .run(shutdown.clone(), connections.clone()),
        );
        if let Some((listener, acceptor)) = tls {
            mqtt::log_listening(&listener);
            tasks.spawn(
                mqtt::Listener::new(listener, Arc::clone(&shared), limit, Some(acceptor))
                    .run(shutdown.clone(), connections.clone()),
            );
        }
        tasks.spawn(http::serve(
            http_listener,
            http::State {
                nats: jetstream.client(),
                mqtt: shared,
                devices,
            },
            shutdown.clone(),
        ));
        info!(%mqtt_addr, %http_addr, nats = %nats_url, embedded = embedded.is_some(), "hearth gateway started");
        Ok(Self {
            mqtt_addr,
            mqtt_tls_addr,
            http_addr,
            nats_url,
            shutdown,
            tasks,
            connections,
            embedded,
        })
    }

    /// Where devices connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where devices connect over TLS, when `mqtt.tls` is set up.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    /// Where `/healthz` is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The NATS server the gateway stores into.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// Stops accepting, lets connections acknowledge what they were storing
    /// (bounded), then stops the embedded nats-server if there is one.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.connections.close();
        let drained = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
            self.tasks.wait().await;
            self.connections.wait().await;
        })
        .await;
        if drained.is_err() {
            warn!("connections did not finish in time; closing anyway");
        }
        if let Some(server) = self.embedded.as_mut() {
            server.stop().await;
        }
        info!("hearth gateway stopped");
    }
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Creates or updates the streams, waiting for NATS while it is unreachable
/// (it may still be starting, e.g. under systemd) but failing at once on a
/// definite refusal such as a server without JetStream.
async fn ensure_streams(
    jetstream: &async_nats::jetstream::Context,
    config: &Config,
    url: &str,
) -> Result<async_nats::jetstream::kv::Store, GatewayError> {
    use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
    let mut attempt = 0u32;
    loop {
        match streams::ensure(jetstream, &config.storage, &config.mqtt).await {
            Ok(bucket) => return Ok(bucket),
            Err(streams::StreamsError::Stream { source, .. })
                if matches!(source.kind(), Kind::TimedOut | Kind::EmptyStreamName)
                    && attempt < 60 =>
            {
                attempt += 1;
                if attempt == 1 || attempt % 10 == 0 {
                    warn!(%url, error = %source, "waiting for NATS JetStream");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(source) if exceeds_storage(&source) => {
                let storage = &config.storage;
                return Err(GatewayError::StorageTooSmall {
                    url: url.to_owned(),
                    configured: bytesize::ByteSize(
                        storage.events.max_bytes.as_u64()
                            + storage.commands.max_bytes.as_u64()
                            + storage.dlq.max_bytes.as_u64(),
                    ),
                    source,
                });
            }
            Err(source) => {
                return Err(GatewayError::Streams {
                    url: url.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Whether the server refused a stream because its limits exceed the
/// storage JetStream may reserve (`max_file_store`, the account's limit).
fn exceeds_storage(error: &streams::StreamsError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
    use async_nats::jetstream::ErrorCode;
    matches!(
        error,
        streams::StreamsError::Stream { source, .. }
            if matches!(source.kind(), Kind::JetStream(error)
                if error.error_code() == ErrorCode::STORAGE_RESOURCES_EXCEEDED)
    )
}
