//! `hearth-sim`: parses the command line, runs the scenario, prints the
//! summary, writes the report, and exits 1 when `--check` fails.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use hearth_sim::options::Options;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let options = Options::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal, plain text for files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if options.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    if options.only_write_homes {
        let layout = hearth_sim::run::layout(&options)?;
        hearth_sim::run::write_homes(&options, &layout)?;
        return Ok(ExitCode::SUCCESS);
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    let report_path = options.report.clone();
    let report = hearth_sim::run::run(options, shutdown).await?;
    println!("{}", report.summary());
    if let Some(path) = report_path {
        let json = serde_json::to_vec_pretty(&report).context("encoding the report")?;
        std::fs::write(&path, json)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(match report.passed {
        Some(false) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}
