//! The run as it goes: on a terminal, one line redrawn every second
//! (connected devices, messages/s, acks outstanding, errors); otherwise a
//! plain log line every ten seconds.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::measure::{Measure, Snapshot};
use crate::model::clock_text;

/// One line about the run, `rate` publishes acknowledged per second.
pub fn line(now: &Snapshot, rate: f64) -> String {
    format!(
        "{}  connected {}/{}  sent {}  acked {} ({:.0}/s)  outstanding {}  commands {}  errors {}",
        clock_text(now.sim_now),
        now.connected,
        now.devices,
        now.publishes_sent,
        now.publishes_acked,
        rate,
        now.outstanding,
        now.commands,
        now.errors
    )
}

/// Shows progress until `stop`.
pub async fn show(measure: Arc<Measure>, stop: CancellationToken) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = measure.snapshot();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = measure.snapshot();
        let rate = (now.publishes_acked - last.publishes_acked) as f64 / every.as_secs_f64();
        last = now;
        if terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", line(&now, rate));
            let _ = err.flush();
        } else {
            info!(
                sim_time = %clock_text(now.sim_now),
                connected = now.connected,
                devices = now.devices,
                acked_per_s = rate as u64,
                outstanding = now.outstanding,
                errors = now.errors,
                "progress"
            );
        }
    }
    if terminal {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_connections_rates_outstanding_and_errors() {
        let snapshot = Snapshot {
            devices: 27,
            connected: 25,
            publishes_sent: 100,
            publishes_acked: 98,
            outstanding: 2,
            commands: 3,
            errors: 1,
            sim_now: 86_400 + 3_600 * 7 + 60 * 5,
        };
        let text = line(&snapshot, 12.4);
        assert_eq!(
            text,
            "day 1 07:05  connected 25/27  sent 100  acked 98 (12/s)  outstanding 2  commands 3  errors 1"
        );
    }
}
