//! `hearth-consumers`: runs hearth's house rules, each a durable JetStream
//! consumer: `lights`, `security`, `notify`, `view`, or `all` of them in
//! one process; and `hash-code` for the homes file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use hearth_consumers::clock::Clock;
use hearth_consumers::commands::Commands;
use hearth_consumers::events::Events;
use hearth_consumers::homes::Homes;
use hearth_consumers::lights::{self, Lights};
use hearth_consumers::notify;
use hearth_consumers::partition::Partition;
use hearth_consumers::runtime;
use hearth_consumers::security::{self, panel, Security};
use hearth_consumers::telemetry;
use hearth_consumers::view;
use hearth_proto::Encoding;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// hearth's house rules, each a durable consumer of HEARTH_EVENTS that
/// survives restarts and never acts twice on one event.
#[derive(Debug, Parser)]
#[command(name = "hearth-consumers", version, about, long_about)]
struct Cli {
    /// NATS server URL (the hearth gateway's); several servers of a cluster
    /// comma-separated.
    #[arg(long, env = "HEARTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The homes file: rooms, lights, alarm zones and codes, recipients
    /// (see deploy/homes.toml and the README).
    #[arg(long, env = "HEARTH_HOMES", value_name = "FILE", global = true)]
    homes: Option<PathBuf>,
    /// The gateway's native MQTT topic prefix, under which keypads publish
    /// on `<prefix>/<home>/alarm/set`.
    #[arg(
        long,
        env = "HEARTH_MQTT_PREFIX",
        default_value = "hearth",
        global = true
    )]
    mqtt_prefix: String,
    /// Where the view serves its HTTP JSON (`view` and `all`).
    #[arg(long, env = "HEARTH_VIEW_LISTEN", value_name = "ADDR", default_value_t = view::DEFAULT_HTTP_LISTEN, global = true)]
    view_listen: std::net::SocketAddr,
    /// Where the notify rule's HTTP API (acknowledgements, status)
    /// listens; `off` for none. It has no authentication: keep it on
    /// loopback or behind a proxy.
    #[arg(long, env = "HEARTH_NOTIFY_LISTEN", value_name = "ADDR", default_value = notify::DEFAULT_HTTP_LISTEN, global = true)]
    notify_listen: String,
    /// Where /metrics (Prometheus), /healthz and /readyz are served; `off`
    /// for none.
    #[arg(long, env = "HEARTH_METRICS_LISTEN", value_name = "ADDR", default_value_t = telemetry::DEFAULT_LISTEN.to_string(), global = true)]
    metrics_listen: String,
    /// Log format: human (coloured on a terminal) or json (one object a
    /// line, with the event's span: consumer, event and correlation ids).
    #[arg(long, env = "HEARTH_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"], global = true)]
    log_format: String,
    /// This process's share of the homes when several run the rules (on
    /// one machine or several, on one NATS cluster): I/N handles the homes
    /// that hash to partition I of N, each rule on its own durable consumer
    /// (hearth-lights-1of2), so every home's events are handled by one
    /// process, in order. Start N processes, 1/N to N/N.
    #[arg(
        long,
        env = "HEARTH_PARTITION",
        value_name = "I/N",
        default_value = "1/1",
        global = true
    )]
    partition: Partition,
    /// How commands are stored: json (readable) or protobuf.
    #[arg(long, env = "HEARTH_ENCODING", default_value = "json")]
    encoding: Encoding,
    #[command(subcommand)]
    rule: Rule,
}

#[derive(Debug, Subcommand)]
enum Rule {
    /// Motion lighting: lights on at motion in a dark room, off after the
    /// room's delay without motion.
    Lights,
    /// The alarm of each home: zones, exit and entry delays, sirens; armed
    /// and disarmed with a code over MQTT (`<prefix>/<home>/alarm/set`) or
    /// NATS (`hearth.alarm.<home>`).
    Security,
    /// Notifications: each home's recipients told (webhook, e-mail, ntfy,
    /// SMS, log) with retries, dedup, rate limits, quiet hours, and
    /// escalation until acknowledged.
    Notify,
    /// The read side: every home's live state (devices, rooms, alarm) in
    /// the KV bucket hearth_view, served over HTTP (`--view-listen`) and NATS
    /// (`hearth.view.<home>`). Needs no homes file.
    View {
        /// Drop the view and build it again from the stream's start (with
        /// no other view running).
        #[arg(long)]
        rebuild: bool,
    },
    /// Every rule in this one process.
    All,
    /// Prints the hash of an alarm code (read from standard input) for the
    /// homes file's `codes`.
    HashCode,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal, plain text for journald and files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hearth-consumers: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Rule::HashCode = cli.rule {
        return hash_code();
    }
    let mut homes = match (&cli.homes, &cli.rule) {
        // The view follows the events alone.
        (None, Rule::View { .. }) => Homes::default(),
        (path, _) => {
            let path = path.as_ref().ok_or_else(|| {
                anyhow!("--homes FILE (or HEARTH_HOMES) is needed: the homes file the rules follow")
            })?;
            Homes::load(path)?
        }
    };
    if !cli.partition.is_whole() {
        let configured = homes.homes.len();
        homes.keep_partition(cli.partition);
        tracing::info!(
            partition = %cli.partition,
            homes = ?homes.homes.keys().collect::<Vec<_>>(),
            of_configured = configured,
            "handling this partition's homes"
        );
    }
    let homes = Arc::new(homes);
    let metrics_listen = match cli.metrics_listen.as_str() {
        "off" | "" => None,
        text => Some(
            text.parse::<std::net::SocketAddr>()
                .with_context(|| format!("--metrics-listen {text:?} is not host:port (or off)"))?,
        ),
    };
    // Several servers of a cluster, comma-separated.
    let servers: Vec<&str> = cli
        .nats_url
        .split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .collect();
    let client = async_nats::ConnectOptions::new()
        .event_callback(|event| async move { telemetry::nats_event(&event) })
        .connect(servers)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cli.nats_url))?;
    let js = async_nats::jetstream::new(client.clone());
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        tracing::info!("stopping (signal received)");
        signals.cancel();
    });
    let context = Started {
        js,
        client,
        homes,
        encoding: cli.encoding,
        clock: Clock::system(),
        mqtt_prefix: cli.mqtt_prefix,
    };
    let mut rules = tokio::task::JoinSet::new();
    let wanted = |rule: &Rule| {
        matches!(cli.rule, Rule::All)
            || std::mem::discriminant(rule) == std::mem::discriminant(&cli.rule)
    };
    if let Some(addr) = metrics_listen {
        let metrics = telemetry::install()?;
        let listener = telemetry::bind(addr).await?;
        let (js, stop) = (context.js.clone(), shutdown.clone());
        rules.spawn(async move {
            telemetry::serve(listener, metrics, js, stop)
                .await
                .context("serving /metrics failed")
        });
        let consumers = [
            (Rule::Lights, lights::CONSUMER),
            (Rule::Security, security::CONSUMER),
            (Rule::Notify, notify::CONSUMER),
            (Rule::View { rebuild: false }, view::CONSUMER),
        ]
        .into_iter()
        .filter(|(rule, _)| wanted(rule))
        .map(|(_, name)| cli.partition.durable(name))
        .collect();
        tokio::spawn(telemetry::follow_lag(
            context.js.clone(),
            consumers,
            shutdown.clone(),
        ));
    }
    if wanted(&Rule::Lights) {
        rules.spawn(run_lights(context.clone(), shutdown.clone()));
    }
    if wanted(&Rule::Security) {
        rules.spawn(run_security(context.clone(), shutdown.clone()));
    }
    if wanted(&Rule::Notify) {
        let http_listen =
            match cli.notify_listen.as_str() {
                "off" | "" => None,
                text => Some(text.parse::<std::net::SocketAddr>().with_context(|| {
                    format!("--notify-listen {text:?} is not host:port (or off)")
                })?),
            };
        rules.spawn(run_notify(context.clone(), http_listen, shutdown.clone()));
    }
    if wanted(&Rule::View { rebuild: false }) {
        let rebuild = matches!(cli.rule, Rule::View { rebuild: true });
        let options = view::Options {
            http_listen: Some(cli.view_listen),
            partition: cli.partition,
        };
        rules.spawn(run_view(
            context.clone(),
            rebuild,
            options,
            shutdown.clone(),
        ));
    }
    // One rule failing stops the others: a process runs all it was asked
    // to or none.
    let mut outcome = Ok(());
    while let Some(joined) = rules.join_next().await {
        let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(error) = result {
            shutdown.cancel();
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    outcome
}

/// What every rule is started with.
#[derive(Debug, Clone)]
struct Started {
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
    homes: Arc<Homes>,
    encoding: Encoding,
    clock: Clock,
    mqtt_prefix: String,
}

async fn run_lights(context: Started, shutdown: CancellationToken) -> anyhow::Result<()> {
    let commands = Commands::new(context.js.clone(), context.encoding);
    let lights = Lights::open(&context.js, (*context.homes).clone(), commands)
        .await
        .map_err(|error| anyhow!("cannot open the lights state: {error}"))?;
    let timers = tokio::spawn(lights.clone().run_timers(shutdown.clone()));
    runtime::run_batches(
        &context.js,
        &lights::spec().partitioned(context.homes.partition()),
        move |events| {
            let lights = lights.clone();
            async move { lights.handle_batch(events).await }
        },
        shutdown,
    )
    .await?;
    let _ = timers.await;
    Ok(())
}

async fn run_security(context: Started, shutdown: CancellationToken) -> anyhow::Result<()> {
    let events = Events::new(
        context.js.clone(),
        context.encoding,
        security::CONSUMER,
        context.clock.clone(),
    );
    let security = Security::open(
        &context.js,
        context.client.clone(),
        Arc::clone(&context.homes),
        events,
        Commands::new(context.js.clone(), context.encoding),
        context.clock.clone(),
        &context.mqtt_prefix,
    )
    .await
    .map_err(|error| anyhow!("cannot open the security state: {error}"))?;
    let timers = tokio::spawn(security.clone().run_timers(shutdown.clone()));
    let panel = tokio::spawn(panel::serve(security.clone(), shutdown.clone()));
    runtime::run(
        &context.js,
        &security::spec().partitioned(context.homes.partition()),
        move |received| {
            let security = security.clone();
            async move { security.handle(received).await }
        },
        shutdown,
    )
    .await?;
    let _ = timers.await;
    panel
        .await
        .context("the alarm panel task failed")?
        .context("cannot serve alarm panel requests")?;
    Ok(())
}

async fn run_notify(
    context: Started,
    http_listen: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    notify::run(
        context.js.clone(),
        Arc::clone(&context.homes),
        context.encoding,
        context.clock.clone(),
        notify::Options { http_listen },
        shutdown,
    )
    .await?;
    Ok(())
}

async fn run_view(
    context: Started,
    rebuild: bool,
    options: view::Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if rebuild {
        let dropped = view::rebuild(&context.js).await?;
        tracing::info!(dropped, "view dropped; rebuilding from the stream's start");
    }
    view::run(context.js, options, shutdown).await?;
    Ok(())
}

/// `hash-code`: the code from standard input (first line), hashed.
fn hash_code() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the code from standard input")?;
    let code = line.trim_end_matches(['\r', '\n']);
    if code.is_empty() {
        return Err(anyhow!(
            "no code on standard input (e.g. `echo 1234 | hearth-consumers hash-code`)"
        ));
    }
    let hash = panel::hash_code(code).map_err(|e| anyhow!("cannot hash the code: {e}"))?;
    println!("{hash}");
    Ok(())
}
