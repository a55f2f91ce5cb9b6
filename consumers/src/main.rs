//! `hearth-consumers`: runs a house rule as a durable JetStream consumer.
//! Built so far: `lights` (motion lighting). The security, notify and view
//! rules are the next steps (see the project's issues).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use hearth_consumers::commands::Commands;
use hearth_consumers::homes::Homes;
use hearth_consumers::lights::{self, Lights};
use hearth_consumers::runtime;
use hearth_proto::Encoding;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// hearth's house rules, each a durable consumer of HEARTH_EVENTS that
/// survives restarts and never acts twice on one event.
#[derive(Debug, Parser)]
#[command(name = "hearth-consumers", version, about, long_about)]
struct Cli {
    /// NATS server URL (the hearth gateway's).
    #[arg(long, env = "HEARTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The homes file: rooms, their lights, lux thresholds and delays (see
    /// the README).
    #[arg(long, env = "HEARTH_HOMES", value_name = "FILE")]
    homes: PathBuf,
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hearth-consumers: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let homes = Homes::load(&cli.homes)?;
    let client = async_nats::connect(&cli.nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cli.nats_url))?;
    let js = async_nats::jetstream::new(client);
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
    match cli.rule {
        Rule::Lights => {
            let lights = Lights::open(&js, homes, Commands::new(js.clone(), cli.encoding))
                .await
                .map_err(|error| anyhow!("cannot open the lights state: {error}"))?;
            let timers = tokio::spawn(lights.clone().run_timers(shutdown.clone()));
            runtime::run(
                &js,
                &lights::spec(),
                move |received| {
                    let lights = lights.clone();
                    async move { lights.handle(received).await }
                },
                shutdown,
            )
            .await?;
            let _ = timers.await;
        }
    }
    Ok(())
}
