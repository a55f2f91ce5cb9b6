//! `hearth-gateway`: parses the configuration, runs the gateway until
//! SIGINT/SIGTERM, then stops it gracefully.

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use hearth_gateway::config::{Cli, Command, Config};
use hearth_gateway::Gateway;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The library's errors already say what caused them, so only the
            // outermost message is printed (`{:#}` would repeat the causes).
            eprintln!("hearth-gateway: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Passwd {
        file,
        username,
        password_stdin,
        delete,
    }) = &cli.command
    {
        return passwd(file, username, *password_stdin, *delete);
    }
    let config = Config::load(&cli)?;
    // Before starting: the first NATS connection is counted as such.
    hearth_gateway::telemetry::install().map_err(anyhow::Error::msg)?;
    let gateway = Gateway::start(config)
        .await
        .map_err(|error| anyhow!("the gateway could not start: {error}"))?;
    wait_for_signal().await?;
    tracing::info!("stopping (signal received)");
    gateway.shutdown().await;
    Ok(())
}

/// `hearth-gateway passwd FILE USER`.
fn passwd(
    file: &std::path::Path,
    username: &str,
    password_stdin: bool,
    delete: bool,
) -> anyhow::Result<()> {
    use hearth_gateway::auth::set_password;
    if delete {
        if set_password(file, username, None)? {
            eprintln!("removed {username} from {}", file.display());
        } else {
            eprintln!("{username} was not in {}", file.display());
        }
        return Ok(());
    }
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        let password = rpassword::prompt_password(format!("password for {username}: "))
            .context("cannot read the password (no terminal? use --password-stdin)")?;
        let again = rpassword::prompt_password("again: ").context("cannot read the password")?;
        if password != again {
            return Err(anyhow!("the passwords differ; nothing changed"));
        }
        password
    };
    if password.is_empty() {
        return Err(anyhow!(
            "an empty password is not a password; nothing changed"
        ));
    }
    let existed = set_password(file, username, Some(password.as_bytes()))?;
    eprintln!(
        "{} {username} in {}",
        if existed {
            "changed the password of"
        } else {
            "added"
        },
        file.display()
    );
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("HEARTH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr, coloured only on a terminal (journald and files get
    // plain text).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
