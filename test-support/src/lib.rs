//! Helpers for the integration tests of the hearth crates.
//!
//! ```no_run
//! # async fn example() {
//! let mut nats = hearth_test_support::TestNats::start().await;
//! let client = async_nats::connect(nats.url()).await.unwrap();
//! // ... the server can be restarted under the client:
//! nats.restart().await;
//! # drop(client);
//! # }
//! ```
//!
//! Tests use the `nats-server` on `PATH`, or the one `$HEARTH_NATS_SERVER`
//! names; `scripts/test.sh` runs the whole suite once per supported server
//! version that way.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Stdio};

use hearth_gateway::embedded::{NatsServer, NatsServerConfig};
use tempfile::TempDir;

mod mosquitto;
pub use mosquitto::TestMosquitto;

mod cluster;
pub use cluster::TestCluster;

/// A nats-server with JetStream for one test, on a free port with its own
/// temporary store; killed and removed on drop.
#[derive(Debug)]
pub struct TestNats {
    // Declared before the directory: the server goes first on drop.
    server: NatsServer,
    _dir: TempDir,
}

impl TestNats {
    /// Starts a server (and [`init_tracing`]).
    ///
    /// # Panics
    ///
    /// If the server cannot be started, e.g. `nats-server` is not installed.
    pub async fn start() -> TestNats {
        TestNats::start_with(|_| {}).await
    }

    /// Starts a server with a config adjusted by `adjust`, e.g. for
    /// `extra_config` or `jetstream_max_file`. The store directory is the
    /// test's temporary one whatever `adjust` does with it.
    ///
    /// # Panics
    ///
    /// If the server cannot be started.
    pub async fn start_with(adjust: impl FnOnce(&mut NatsServerConfig)) -> TestNats {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("hearth-nats-")
            .tempdir()
            .expect("creating a temporary directory for nats-server");
        let mut config = NatsServerConfig::new(dir.path());
        config.server_name = "hearth-test".to_owned();
        adjust(&mut config);
        config.binary = from_workspace(&config.binary);
        config.store_dir = dir.path().to_owned();
        let server = match NatsServer::start(config).await {
            Ok(server) => server,
            Err(error) => panic!(
                "could not start nats-server for this test: {error}\n\
                 (scripts/setup.sh installs it; HEARTH_NATS_SERVER=/path/to/nats-server picks one)"
            ),
        };
        TestNats { server, _dir: dir }
    }

    /// `nats://127.0.0.1:PORT`; the same after [`TestNats::restart`].
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Stops the server gracefully and starts it again on the same port and
    /// store.
    ///
    /// # Panics
    ///
    /// If it does not start again.
    pub async fn restart(&mut self) {
        if let Err(error) = self.server.restart().await {
            panic!("could not restart nats-server: {error}");
        }
    }

    /// Kills the server (SIGKILL); [`TestNats::restart`] brings it back.
    pub async fn kill(&mut self) {
        self.server.kill().await;
    }

    /// The server itself, for what the methods above do not cover.
    pub fn server_mut(&mut self) -> &mut NatsServer {
        &mut self.server
    }

    /// The server, e.g. for its [`NatsServer::version`] or
    /// [`NatsServer::pid`].
    pub fn server(&self) -> &NatsServer {
        &self.server
    }
}

/// Sends `tracing` output to the test harness's captured output, filtered by
/// `RUST_LOG` (default `info`). Safe to call from every test.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Fails when a subscriber is already set, by an earlier call or the test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// # Panics
///
/// If no port can be bound at all.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Whether `mosquitto_pub` (package `mosquitto-clients`) can be run, for
/// tests that drive the gateway with a real MQTT client and skip otherwise.
pub fn mosquitto_pub_available() -> bool {
    Command::new("mosquitto_pub")
        .arg("--help")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A relative path with a directory in it (`.tools/venv/bin/nats-server`,
/// as the README writes it) taken from the workspace root: cargo runs tests
/// and benches from their package's directory, not from where the command
/// was typed. A bare name (`nats-server`, looked up on `PATH`) and absolute
/// paths stay as they are.
fn from_workspace(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_absolute() || path.components().count() < 2 || path.exists() {
        return path.to_owned();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The Python of `.tools/venv`, which `scripts/setup.sh` gives the paho-mqtt
/// client; `None` when it is missing or has no paho-mqtt.
pub fn python_with_paho() -> Option<std::path::PathBuf> {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    Command::new(&python)
        .args(["-c", "import paho.mqtt"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
        .then_some(python)
}

/// The value of the sample `series` (a metric's name and labels exactly as
/// rendered, e.g. `hearth_gateway_events_total{convention="native",kind="motion"}`)
/// in a Prometheus text page; `None` when the page does not have it.
pub fn prometheus_sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
