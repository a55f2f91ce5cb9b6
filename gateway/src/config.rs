//! The gateway's configuration: typed, with every default in one place, read
//! from a TOML file (`--config`) and overridden by `HEARTH_*` environment
//! variables and command-line flags (flag > environment > file > default).
//! It is validated once at start; errors name the key and say what is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use hearth_proto::Encoding;
use serde::Deserialize;

use crate::auth::AuthConfig;
use crate::conventions::ConventionsConfig;

/// The whole configuration, as the TOML file spells it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub conventions: ConventionsConfig,
    pub commands: CommandsConfig,
    pub auth: AuthConfig,
    pub bridge: BridgeConfig,
}

/// Bridge mode: the gateway as a client of an MQTT broker the home already
/// runs (Mosquitto), storing what it subscribes to like a device's publishes
/// and acknowledging each message to the broker only once stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// The broker, `mqtt://host[:port]` (port 1883 by default) or
    /// `mqtts://host[:port]` for TLS (port 8883); absent: no bridge.
    pub url: Option<String>,
    /// CA certificates (PEM) that verify the broker's certificate with
    /// `mqtts://`; absent: the system's trusted roots.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM, with `tls_key`) for a broker that asks
    /// for one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The bridge's client id. Its persistent session on the broker keeps
    /// what arrives while the gateway is away, so it must stay the same
    /// across restarts and be unique on the broker.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Topic filters subscribed to (QoS 1) and stored.
    pub topics: Vec<String>,
    /// Topic filters of the gateway's own publishes (commands to devices)
    /// that are published on the broker, at QoS 1. A topic that decodes to
    /// events is never forwarded: coming back through `topics`, it would be
    /// stored twice.
    pub forward: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Messages from the broker being stored at once; the broker's own
    /// in-flight limit for the bridge (Mosquitto's `max_inflight_messages`,
    /// 20 by default) is usually lower.
    pub max_inflight: usize,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            url: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            client_id: "hearth-bridge".to_owned(),
            username: None,
            password: None,
            topics: vec!["zigbee2mqtt/#".to_owned(), "hearth/#".to_owned()],
            forward: vec![
                "hearth/+/+/+/set".to_owned(),
                "zigbee2mqtt/+/set".to_owned(),
                "zigbee2mqtt/+/+/set".to_owned(),
            ],
            keep_alive: Duration::from_secs(30),
            max_inflight: 1000,
        }
    }
}

/// Where the bridge connects, from `bridge.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl BridgeConfig {
    /// The broker from `url`, checked.
    pub fn broker(&self) -> Result<Option<Broker>, ConfigError> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        let invalid = |problem: String| ConfigError::Invalid {
            key: "bridge.url",
            problem,
        };
        let (tls, rest) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some(("mqtts" | "ssl", rest)) => (true, rest),
            Some((scheme, _)) => {
                return Err(invalid(format!(
                    "is {url:?}: the scheme must be mqtt:// or mqtts://, not {scheme}://"
                )))
            }
            None => (false, url.as_str()),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains(['/', '@', '?']) {
            return Err(invalid(format!(
                "is {url:?}: expected mqtt://host[:port] (credentials go in bridge.username \
                 and bridge.password)"
            )));
        }
        let port = |port: &str| {
            port.parse::<u16>()
                .map_err(|_| invalid(format!("is {url:?}: {port:?} is not a port number")))
        };
        // An IPv6 address is bracketed: `[::1]:1883`.
        let (host, port) = match rest.strip_prefix('[').map(|inner| inner.split_once(']')) {
            Some(Some((host, ""))) => (host, default_port),
            Some(Some((host, after))) => match after.strip_prefix(':') {
                Some(number) => (host, port(number)?),
                None => return Err(invalid(format!("is {url:?}: expected [address]:port"))),
            },
            Some(None) => return Err(invalid(format!("is {url:?}: the ']' is missing"))),
            None => match rest.rsplit_once(':') {
                Some((host, number)) => (host, port(number)?),
                None => (rest, default_port),
            },
        };
        if host.is_empty() {
            return Err(invalid(format!("is {url:?}: the host is missing")));
        }
        Ok(Some(Broker {
            host: host.to_owned(),
            port,
            tls,
        }))
    }
}

/// Delivering `hearth.v1.Command`s from `HEARTH_COMMANDS` to devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Whether this gateway delivers commands (every gateway of a cluster
    /// may: they share the work).
    pub enabled: bool,
    /// How long a device has to acknowledge a command before it is sent
    /// again.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// A command not delivered within this long after it was issued is
    /// given up (and dead-lettered): a light switched on an hour late is
    /// worse than one not switched on.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            delivery_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(600),
        }
    }
}

/// How the gateway reaches NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The NATS server(s), e.g. `nats://10.0.0.2:4222` (comma-separated for a
    /// cluster). When absent the gateway runs its own nats-server (embedded).
    pub url: Option<String>,
    /// A NATS credentials file (JWT + nkey), e.g. from `nsc`.
    pub creds: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the NATS server; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS with NATS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The embedded nats-server binary (only without `url`).
    pub server_binary: PathBuf,
    /// Where the embedded nats-server listens (only without `url`).
    pub embedded_listen: SocketAddr,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            creds: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            server_binary: PathBuf::from("nats-server"),
            embedded_listen: SocketAddr::from(([127, 0, 0, 1], 4222)),
        }
    }
}

/// The MQTT server devices connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Address of the MQTT listener.
    pub listen: SocketAddr,
    /// Connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes; a larger one closes the connection.
    pub max_packet_size: usize,
    /// Publishes per connection that may await storage at once. A device that
    /// sends more than this without waiting for its PUBACKs is no longer read
    /// from until some are stored. Keep it above the devices' own inflight
    /// window (mosquitto: 20, rumqttc: 100) so that their PINGREQs are still
    /// read while storage is slow. QoS 0 has a separate lane of this size;
    /// past it, QoS 0 publishes are dropped and counted.
    pub max_inflight: usize,
    /// How long a new connection has to send CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bytes of publishes awaiting storage across all connections (payload
    /// plus 1 KiB each). When storage is behind and this is spent, QoS 1/2
    /// devices are not read from and QoS 0 publishes are dropped and counted:
    /// the bound on the gateway's memory whatever the number of devices.
    pub max_inflight_bytes: usize,
    /// Messages per client waiting to be sent to it (matching its
    /// subscriptions) beyond those it has not acknowledged yet. When a client
    /// reads too slowly and this is full, newer messages for it are dropped,
    /// counted and logged: one slow subscriber never holds up the others.
    pub max_queued: usize,
    /// Messages kept per persistent session (clean session = false) while
    /// its client is away or has not acknowledged them; when full, the
    /// oldest are dropped.
    pub max_session_queue: usize,
    /// How long a message waits for a persistent session's client at most.
    #[serde(with = "humantime_serde")]
    pub session_queue_max_age: Duration,
    /// The home the gateway's own events (failed logins) are stored under.
    pub home: String,
    /// Publishes per second one client may make; a client above it is read
    /// more slowly (its TCP window fills, it waits), never dropped, so one
    /// flooding device cannot starve the others. 0: no limit.
    pub max_publish_rate: u32,
    /// The TLS listener (off unless `cert` and `key` are given).
    pub tls: crate::mqtt::tls::TlsConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_connections: 20_000,
            max_packet_size: 256 * 1024,
            max_inflight: 1024,
            connect_timeout: Duration::from_secs(10),
            max_inflight_bytes: 256 * 1024 * 1024,
            max_queued: 1000,
            max_session_queue: 1000,
            session_queue_max_age: Duration::from_secs(7 * 24 * 3600),
            home: "home".to_owned(),
            max_publish_rate: 1000,
            tls: crate::mqtt::tls::TlsConfig::default(),
        }
    }
}

/// The HTTP endpoint (`/healthz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9880)),
        }
    }
}

/// The JetStream streams and how events are stored in them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `json` (proto3 JSON mapping, readable in `nats stream view`) or `protobuf`.
    #[serde(deserialize_with = "deserialize_encoding")]
    pub encoding: Encoding,
    /// Stream replicas; 3 on a three-node cluster, 1 on a single server.
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id`: a device's retransmission
    /// arriving later than this after the original is stored again.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    pub events: RetentionConfig,
    pub commands: RetentionConfig,
    pub dlq: RetentionConfig,
    /// Where the embedded nats-server keeps its data.
    pub data_dir: PathBuf,
}

/// Limits of one stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_bytes: bytesize::ByteSize,
    /// What happens at `max_bytes`: `old` (the default) drops the oldest
    /// messages; `new` keeps every message and refuses new ones, so the
    /// gateway stops acknowledging (devices wait) until there is room again.
    #[serde(default)]
    pub discard: Discard,
}

/// What a full stream gives up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// The oldest messages: a rolling window of history.
    #[default]
    Old,
    /// Nothing: new messages are refused until there is room.
    New,
}

impl Default for StorageConfig {
    fn default() -> Self {
        // Sized for a Raspberry Pi's SD card: about 1.3 GiB in all.
        Self {
            encoding: Encoding::Json,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            events: RetentionConfig {
                max_age: Duration::from_secs(30 * 24 * 3600),
                max_bytes: bytesize::ByteSize::gib(1),

                discard: Discard::Old,
            },
            commands: RetentionConfig {
                max_age: Duration::from_secs(7 * 24 * 3600),
                max_bytes: bytesize::ByteSize::mib(128),

                discard: Discard::Old,
            },
            dlq: RetentionConfig {
                max_age: Duration::from_secs(30 * 24 * 3600),
                max_bytes: bytesize::ByteSize::mib(256),

                discard: Discard::Old,
            },
            data_dir: default_data_dir(),
        }
    }
}

fn deserialize_encoding<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Encoding, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// `/var/lib/hearth` for root (a system service), else the XDG data directory.
fn default_data_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let is_root = home.as_deref() == Some(Path::new("/root"));
    match (std::env::var_os("XDG_DATA_HOME"), home) {
        _ if is_root => PathBuf::from("/var/lib/hearth"),
        (Some(xdg), _) => PathBuf::from(xdg).join("hearth"),
        (None, Some(home)) => home.join(".local/share/hearth"),
        (None, None) => PathBuf::from("/var/lib/hearth"),
    }
}

/// hearth-gateway: MQTT devices in, validated events stored in NATS JetStream.
///
/// Devices connect to the MQTT listener; every publish is decoded by a payload
/// convention (native `hearth/<home>/<room>/<device>/<kind>` or Zigbee2MQTT),
/// stored in the HEARTH_EVENTS stream, and only then acknowledged. Anything
/// that cannot become an event is kept in HEARTH_DLQ with the reason.
///
/// Without --nats-url the gateway runs its own nats-server (found on PATH) with
/// JetStream, listening on loopback, with its data under --data-dir.
///
/// Every option can also be set in the --config file (TOML, same names in
/// sections) or as a HEARTH_* environment variable; flags win over the
/// environment, which wins over the file.
#[derive(Debug, Parser, Default)]
#[command(name = "hearth-gateway", version, about, long_about)]
pub struct Cli {
    /// TOML configuration file (see the README for every key).
    #[arg(long, env = "HEARTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// NATS server URL(s), comma-separated [default: run an embedded nats-server]
    #[arg(long, env = "HEARTH_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS credentials file (JWT and nkey seed).
    #[arg(long, env = "HEARTH_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "HEARTH_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "HEARTH_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "HEARTH_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// CA certificate (PEM) to verify the NATS server; turns TLS on.
    #[arg(long, env = "HEARTH_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with NATS (with --nats-tls-key).
    #[arg(long, env = "HEARTH_NATS_TLS_CERT", value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS with NATS.
    #[arg(long, env = "HEARTH_NATS_TLS_KEY", value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
    /// The nats-server binary to run when no --nats-url is given [default: nats-server]
    #[arg(long, env = "HEARTH_NATS_SERVER", value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// Where that embedded nats-server listens [default: 127.0.0.1:4222]
    #[arg(long, env = "HEARTH_EMBEDDED_NATS_LISTEN", value_name = "ADDR")]
    pub embedded_nats_listen: Option<SocketAddr>,

    /// Address of the MQTT listener devices connect to [default: 0.0.0.0:1883]
    #[arg(long, env = "HEARTH_MQTT_LISTEN", value_name = "ADDR")]
    pub mqtt_listen: Option<SocketAddr>,
    /// Address of the HTTP endpoint serving /healthz [default: 127.0.0.1:9880]
    #[arg(long, env = "HEARTH_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,

    /// How stored events are encoded: json (readable) or protobuf [default: json]
    #[arg(long, env = "HEARTH_ENCODING", value_name = "ENCODING")]
    pub encoding: Option<Encoding>,
    /// Stream replicas (3 on a three-node NATS cluster) [default: 1]
    #[arg(long, env = "HEARTH_REPLICAS", value_name = "N")]
    pub replicas: Option<usize>,
    /// Data directory of the embedded nats-server [default: /var/lib/hearth for root, else ~/.local/share/hearth]
    #[arg(long, env = "HEARTH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Password file of the MQTT clients (`username:argon2-hash` lines, see
    /// the passwd command).
    #[arg(long, env = "HEARTH_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Let MQTT clients in without a username and password.
    #[arg(long, env = "HEARTH_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Bridge mode: also store what this MQTT broker (e.g. Mosquitto) carries,
    /// as its client, e.g. mqtt://localhost:1883 [default: no bridge]
    #[arg(long, env = "HEARTH_BRIDGE_URL", value_name = "URL")]
    pub bridge_url: Option<String>,
    /// Topic filters the bridge subscribes to, comma-separated [default: zigbee2mqtt/#,hearth/#]
    #[arg(
        long,
        env = "HEARTH_BRIDGE_TOPICS",
        value_name = "FILTERS",
        value_delimiter = ','
    )]
    pub bridge_topics: Option<Vec<String>>,
    /// The bridge's client id on the broker; keep it stable, its persistent
    /// session holds what arrives while the gateway is away [default: hearth-bridge]
    #[arg(long, env = "HEARTH_BRIDGE_CLIENT_ID", value_name = "ID")]
    pub bridge_client_id: Option<String>,
    /// User name on the broker (with --bridge-password).
    #[arg(long, env = "HEARTH_BRIDGE_USERNAME")]
    pub bridge_username: Option<String>,
    /// Password on the broker.
    #[arg(long, env = "HEARTH_BRIDGE_PASSWORD", hide_env_values = true)]
    pub bridge_password: Option<String>,
    /// CA certificate (PEM) that verifies an mqtts:// broker [default: the system's roots]
    #[arg(long, env = "HEARTH_BRIDGE_TLS_CA", value_name = "FILE")]
    pub bridge_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an mqtts:// broker that asks for one (with --bridge-tls-key).
    #[arg(long, env = "HEARTH_BRIDGE_TLS_CERT", value_name = "FILE")]
    pub bridge_tls_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "HEARTH_BRIDGE_TLS_KEY", value_name = "FILE")]
    pub bridge_tls_key: Option<PathBuf>,

    /// Log format: human or json.
    #[arg(long, env = "HEARTH_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What else `hearth-gateway` can do besides running the gateway.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Adds a user to a password file (or changes their password), asking
    /// for the password; the file holds only Argon2id hashes. A running
    /// gateway picks the change up within seconds.
    ///
    /// Example: hearth-gateway passwd /etc/hearth/passwd kitchen-sensor
    Passwd {
        /// The password file (created if missing).
        file: PathBuf,
        /// The MQTT username.
        username: String,
        /// Read the password from the first line of standard input instead
        /// of asking (for scripts).
        #[arg(long)]
        password_stdin: bool,
        /// Remove the user instead.
        #[arg(long, conflicts_with = "password_stdin")]
        delete: bool,
    },
}

/// The configuration could not be loaded; the message says which key and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl Config {
    fn validate_bridge(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: String| ConfigError::Invalid { key, problem };
        let bridge = &self.bridge;
        let Some(broker) = bridge.broker()? else {
            return Ok(());
        };
        if bridge.tls_cert.is_some() != bridge.tls_key.is_some() {
            return Err(invalid(
                "bridge.tls_cert",
                "and bridge.tls_key must be given together".into(),
            ));
        }
        if !broker.tls && (bridge.tls_ca.is_some() || bridge.tls_cert.is_some()) {
            return Err(invalid(
                "bridge.url",
                format!(
                    "is {broker}, without TLS, while bridge.tls_ca or bridge.tls_cert is set: \
                     use mqtts://"
                ),
            ));
        }
        if bridge.client_id.is_empty() || bridge.client_id.len() > 65_535 {
            return Err(invalid(
                "bridge.client_id",
                "must be set: the bridge's persistent session on the broker is found by it".into(),
            ));
        }
        if bridge.topics.is_empty() {
            return Err(invalid(
                "bridge.topics",
                "is empty: the bridge would store nothing".into(),
            ));
        }
        for (key, filters) in [
            ("bridge.topics", &bridge.topics),
            ("bridge.forward", &bridge.forward),
        ] {
            if let Some(bad) = filters
                .iter()
                .find(|filter| !crate::bridge::valid_filter(filter))
            {
                return Err(invalid(
                    key,
                    format!("holds {bad:?}, which is not an MQTT topic filter"),
                ));
            }
        }
        if bridge.keep_alive < Duration::from_secs(5)
            || bridge.keep_alive > Duration::from_secs(65_535)
        {
            return Err(invalid(
                "bridge.keep_alive",
                "must be between 5s and 65535s".into(),
            ));
        }
        if !(1..=65_535).contains(&bridge.max_inflight) {
            return Err(invalid(
                "bridge.max_inflight",
                "must be between 1 and 65535".into(),
            ));
        }
        Ok(())
    }

    /// The file named by `--config` (if any) with the flags and environment
    /// variables on top, validated.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(cli);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    fn apply(&mut self, cli: &Cli) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(value) = value {
                *target = value.clone();
            }
        }
        fn set_opt<T: Clone>(target: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                target.clone_from(value);
            }
        }
        set_opt(&mut self.nats.url, &cli.nats_url);
        set_opt(&mut self.nats.creds, &cli.nats_creds);
        set_opt(&mut self.nats.user, &cli.nats_user);
        set_opt(&mut self.nats.password, &cli.nats_password);
        set_opt(&mut self.nats.token, &cli.nats_token);
        set_opt(&mut self.nats.tls_ca, &cli.nats_tls_ca);
        set_opt(&mut self.nats.tls_cert, &cli.nats_tls_cert);
        set_opt(&mut self.nats.tls_key, &cli.nats_tls_key);
        set(&mut self.nats.server_binary, &cli.nats_server);
        set(&mut self.nats.embedded_listen, &cli.embedded_nats_listen);
        set(&mut self.mqtt.listen, &cli.mqtt_listen);
        set(&mut self.http.listen, &cli.http_listen);
        set(&mut self.storage.encoding, &cli.encoding);
        set(&mut self.storage.replicas, &cli.replicas);
        set(&mut self.storage.data_dir, &cli.data_dir);
        set_opt(&mut self.auth.password_file, &cli.password_file);
        set_opt(&mut self.bridge.url, &cli.bridge_url);
        set(&mut self.bridge.topics, &cli.bridge_topics);
        set(&mut self.bridge.client_id, &cli.bridge_client_id);
        set_opt(&mut self.bridge.username, &cli.bridge_username);
        set_opt(&mut self.bridge.password, &cli.bridge_password);
        set_opt(&mut self.bridge.tls_ca, &cli.bridge_tls_ca);
        set_opt(&mut self.bridge.tls_cert, &cli.bridge_tls_cert);
        set_opt(&mut self.bridge.tls_key, &cli.bridge_tls_key);
        if cli.allow_anonymous {
            self.auth.allow_anonymous = true;
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| ConfigError::Invalid {
            key,
            problem: problem.to_owned(),
        };
        if !(1..=65_535).contains(&self.mqtt.max_inflight) {
            return Err(invalid(
                "mqtt.max_inflight",
                "must be between 1 and 65535 (MQTT's packet ids)",
            ));
        }
        if self.auth.password_file.is_none()
            && !self.auth.allow_anonymous
            && self.mqtt.tls.client_ca.is_none()
        {
            return Err(invalid(
                "auth",
                "lets no MQTT client in: give a password file (auth.password_file, \
                 --password-file; create it with `hearth-gateway passwd FILE USER`), client \
                 certificates (mqtt.tls.client_ca) or allow anonymous clients \
                 (auth.allow_anonymous = true, --allow-anonymous)",
            ));
        }
        if self.commands.delivery_timeout.is_zero() || self.commands.max_age.is_zero() {
            return Err(invalid(
                "commands.delivery_timeout",
                "commands.delivery_timeout and commands.max_age must be above 0",
            ));
        }
        if !(1..=1_000_000).contains(&self.mqtt.max_session_queue) {
            return Err(invalid(
                "mqtt.max_session_queue",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=1_000_000).contains(&self.mqtt.max_queued) {
            return Err(invalid("mqtt.max_queued", "must be between 1 and 1000000"));
        }
        if !(1..=1_000_000).contains(&self.mqtt.max_connections) {
            return Err(invalid(
                "mqtt.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if self.mqtt.max_inflight_bytes < self.mqtt.max_packet_size + 1024
            || self.mqtt.max_inflight_bytes > (u32::MAX as usize)
        {
            return Err(invalid(
                "mqtt.max_inflight_bytes",
                "must hold at least one packet of mqtt.max_packet_size (plus 1 KiB) and be below 4 GiB",
            ));
        }
        if self.mqtt.connect_timeout.is_zero() {
            return Err(invalid("mqtt.connect_timeout", "must be positive"));
        }
        if self.mqtt.max_packet_size < 128 {
            return Err(invalid(
                "mqtt.max_packet_size",
                "must be at least 128 bytes",
            ));
        }
        if !(1..=5).contains(&self.storage.replicas) {
            return Err(invalid(
                "storage.replicas",
                "must be between 1 and 5 (JetStream's limit)",
            ));
        }
        if self.storage.duplicate_window.is_zero() {
            return Err(invalid(
                "storage.duplicate_window",
                "must be positive: it is what makes retransmissions stored once",
            ));
        }
        self.validate_bridge()?;
        for (key, retention) in [
            ("storage.events.max_age", &self.storage.events),
            ("storage.commands.max_age", &self.storage.commands),
            ("storage.dlq.max_age", &self.storage.dlq),
        ] {
            // 0 means no age limit.
            if !retention.max_age.is_zero() && retention.max_age < self.storage.duplicate_window {
                return Err(invalid(
                    key,
                    "must be 0 (no limit) or at least storage.duplicate_window (JetStream requires it)",
                ));
            }
        }
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            return Err(invalid(
                "nats.tls_cert",
                "and nats.tls_key must be given together",
            ));
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return Err(invalid(
                "nats.user",
                "and nats.password must be given together",
            ));
        }
        for (key, root) in [
            ("conventions.native.prefix", &self.conventions.native.prefix),
            (
                "conventions.zigbee2mqtt.base_topic",
                &self.conventions.zigbee2mqtt.base_topic,
            ),
        ] {
            if root.is_empty() || root.contains(['+', '#']) || root.ends_with('/') {
                return Err(invalid(
                    key,
                    "must be a non-empty MQTT topic without wildcards or a trailing `/`",
                ));
            }
        }
        if self.nats.url.is_some() && self.nats.url.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("nats.url", "is empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults, with anonymous clients allowed: otherwise nobody gets in.
    fn open() -> Config {
        let mut config = Config::default();
        config.auth.allow_anonymous = true;
        config
    }

    #[test]
    fn by_default_nobody_gets_in_and_the_error_says_what_to_do() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("hearth-gateway passwd"), "{err}");
        assert!(err.contains("--allow-anonymous"), "{err}");
        let mut config = Config::default();
        config.auth.password_file = Some("/etc/hearth/passwd".into());
        config.validate().unwrap();
    }

    #[test]
    fn defaults_are_valid_and_listen_where_documented() {
        let config = open();
        config.validate().unwrap();
        assert_eq!(config.mqtt.listen.to_string(), "0.0.0.0:1883");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:9880");
        assert_eq!(config.storage.encoding, Encoding::Json);
        assert!(config.nats.url.is_none(), "embedded nats-server by default");
    }

    #[test]
    fn a_file_sets_nested_keys_with_units() {
        let config: Config = toml::from_str(
            r#"
            [mqtt]
            listen = "127.0.0.1:11883"
            [storage]
            encoding = "protobuf"
            duplicate_window = "5m"
            events = { max_age = "90d", max_bytes = "8 GiB" }
            "#,
        )
        .unwrap();
        assert_eq!(config.mqtt.listen.port(), 11883);
        assert_eq!(config.storage.encoding, Encoding::Protobuf);
        assert_eq!(config.storage.duplicate_window, Duration::from_secs(300));
        assert_eq!(config.storage.events.max_bytes, bytesize::ByteSize::gib(8));
        assert_eq!(
            config.mqtt.max_inflight, 1024,
            "untouched keys keep defaults"
        );
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = toml::from_str::<Config>("[mqtt]\nlisten_addr = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let mut config: Config = toml::from_str("[storage]\nreplicas = 3\n").unwrap();
        let cli = Cli::try_parse_from([
            "hearth-gateway",
            "--replicas",
            "1",
            "--encoding",
            "protobuf",
        ])
        .unwrap();
        config.apply(&cli);
        assert_eq!(config.storage.replicas, 1);
        assert_eq!(config.storage.encoding, Encoding::Protobuf);
    }

    #[test]
    fn the_example_file_in_deploy_is_valid_and_spells_out_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/hearth.toml");
        let example = Config::from_file(&path).unwrap();
        example.validate().unwrap();
        let defaults = Config::default();
        assert_eq!(example.mqtt.listen, defaults.mqtt.listen);
        assert_eq!(example.mqtt.max_inflight, defaults.mqtt.max_inflight);
        assert_eq!(example.http.listen, defaults.http.listen);
        assert_eq!(
            example.storage.duplicate_window,
            defaults.storage.duplicate_window
        );
        assert_eq!(
            example.storage.events.max_bytes,
            defaults.storage.events.max_bytes
        );
        assert_eq!(example.storage.dlq.max_age, defaults.storage.dlq.max_age);
        assert_eq!(example.nats.embedded_listen, defaults.nats.embedded_listen);
    }

    #[test]
    fn the_commented_bridge_example_is_valid_once_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/hearth.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("# [bridge]").expect("a bridge example");
        let uncommented: String = text[start..]
            .lines()
            .map(|line| line.trim_start_matches("# "))
            .collect::<Vec<_>>()
            .join("\n");
        let mut config: Config = toml::from_str(&uncommented).unwrap();
        config.auth.allow_anonymous = true;
        config.validate().unwrap();
        assert_eq!(
            config.bridge.broker().unwrap().unwrap().to_string(),
            "mqtt://localhost:1883"
        );
        assert_eq!(config.bridge.topics, BridgeConfig::default().topics);
        assert_eq!(config.bridge.forward, BridgeConfig::default().forward);
    }

    #[test]
    fn bridge_settings_are_checked_with_the_key_named() {
        let bridged = |adjust: fn(&mut BridgeConfig)| {
            let mut config = open();
            config.bridge.url = Some("mqtt://[::1]:1884".into());
            adjust(&mut config.bridge);
            config.validate().map_err(|e| e.to_string())
        };
        assert!(bridged(|_| {}).is_ok());
        assert_eq!(
            open().bridge.broker().unwrap(),
            None,
            "no bridge by default"
        );
        let mut config = open();
        let broker = |config: &Config| config.bridge.broker().unwrap().unwrap();
        config.bridge.url = Some("[::1]:1884".into());
        assert_eq!(
            broker(&config),
            Broker {
                host: "::1".to_owned(),
                port: 1884,
                tls: false
            }
        );
        config.bridge.url = Some("mqtt://[fe80::1]".into());
        assert_eq!(broker(&config).to_string(), "mqtt://[fe80::1]:1883");
        config.bridge.url = Some("mqtts://broker.lan".into());
        assert_eq!(
            broker(&config),
            Broker {
                host: "broker.lan".to_owned(),
                port: 8883,
                tls: true
            }
        );
        config.bridge.url = Some("mqtt://broker.lan:".into());
        assert!(config.bridge.broker().is_err());
        config.bridge.url = Some("ws://broker.lan".into());
        let err = config.bridge.broker().unwrap_err().to_string();
        assert!(err.contains("mqtt:// or mqtts://"), "{err}");
        let err = bridged(|b| b.tls_ca = Some("ca.pem".into())).unwrap_err();
        assert!(
            err.contains("bridge.url") && err.contains("use mqtts://"),
            "{err}"
        );
        let err = bridged(|b| {
            b.url = Some("mqtts://broker.lan".into());
            b.tls_cert = Some("client.pem".into());
        })
        .unwrap_err();
        assert!(err.contains("bridge.tls_key"), "{err}");
        let err = bridged(|b| b.topics = vec!["a/#/b".into()]).unwrap_err();
        assert!(
            err.contains("bridge.topics") && err.contains("a/#/b"),
            "{err}"
        );
        let err = bridged(|b| b.forward = vec!["x+".into()]).unwrap_err();
        assert!(err.contains("bridge.forward"), "{err}");
        let err = bridged(|b| b.topics.clear()).unwrap_err();
        assert!(err.contains("would store nothing"), "{err}");
        let err = bridged(|b| b.client_id.clear()).unwrap_err();
        assert!(err.contains("bridge.client_id"), "{err}");
        let err = bridged(|b| b.keep_alive = Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("bridge.keep_alive"), "{err}");
    }

    #[test]
    fn validation_names_the_wrong_key() {
        let mut config = open();
        config.storage.replicas = 7;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("storage.replicas"), "{err}");

        let mut config = open();
        config.conventions.zigbee2mqtt.base_topic = "z2m/#".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("conventions.zigbee2mqtt.base_topic"), "{err}");

        let mut config = open();
        config.storage.dlq.max_age = Duration::from_secs(10);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("storage.dlq.max_age"), "{err}");
    }
}
