//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::scenario::ScenarioName;

/// Which convention the homes' devices speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConventionChoice {
    /// hearth's own: `hearth/<home>/<room>/<device>/<kind>`.
    Native,
    /// Zigbee2MQTT objects on `zigbee2mqtt/<room>/<device>`: one home only,
    /// since the gateway files every Zigbee2MQTT device under its one
    /// `conventions.zigbee2mqtt.home` (default `home`, the first home's name).
    Zigbee2mqtt,
    /// The first home Zigbee2MQTT, the others native.
    Mixed,
}

/// Simulated smart homes speaking MQTT to hearth, and a judge of what the
/// system did.
///
/// Homes of five rooms (hall, kitchen, living, bedroom, bathroom; 27
/// devices each) with people following daily routines. Every device is its
/// own MQTT connection. Simulated time runs `--speed` times real time. At
/// the end: a summary, `--report` as JSON, and with `--check` the
/// scenario's verdict as the exit status.
#[derive(Debug, Clone, Parser)]
#[command(name = "hearth-sim", version, about, long_about)]
pub struct Options {
    /// The gateway's MQTT address: `mqtt://host:port`, or `mqtts://host:port`
    /// for TLS (port 8883 by default).
    #[arg(
        long,
        env = "HEARTH_SIM_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,

    /// With mqtts://: the CA certificate(s) to trust (PEM), instead of the
    /// system's.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,

    /// With mqtts://: a client certificate (PEM) every device presents
    /// (with --client-key); the gateway takes its common name as username.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// The NATS server hearth stores into (`nats://host:port`): when given,
    /// light commands are matched to the motion that caused them through
    /// the correlation id of the stored motion event; without it, by room
    /// and time.
    #[arg(long, env = "HEARTH_SIM_NATS_URL")]
    pub nats_url: Option<String>,

    /// MQTT username of every device (with --password).
    #[arg(long, env = "HEARTH_SIM_USERNAME")]
    pub username: Option<String>,

    /// MQTT password of every device.
    #[arg(long, env = "HEARTH_SIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// QoS of the devices' publishes: 0 (fire and forget) or 1 (acknowledged
    /// once stored; latencies are measured only with 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,

    /// MQTT keep-alive of each device.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub keep_alive: Duration,

    /// What happens (each scenario says what --check expects).
    #[arg(long, value_enum, default_value_t = ScenarioName::NormalDay)]
    pub scenario: ScenarioName,

    /// Number of homes (27 devices each: 371 homes are 10,017 connections).
    #[arg(long, default_value_t = 1)]
    pub homes: usize,

    /// People per home.
    #[arg(long, default_value_t = 2)]
    pub people: usize,

    /// The convention the devices speak.
    #[arg(long, value_enum, default_value_t = ConventionChoice::Native)]
    pub convention: ConventionChoice,

    /// The seed: the same seed gives the same homes, routines and readings.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// How many times faster than real time simulated time runs (1440: a day
    /// a minute; 1: real time).
    #[arg(long, default_value_t = 1440.0)]
    pub speed: f64,

    /// Simulated time of day to start at (`HH:MM`), instead of the scenario's.
    #[arg(long, value_parser = parse_time_of_day)]
    pub start: Option<u64>,

    /// Simulated time to run (`12h`, `1day`), instead of the scenario's.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// New device connections per second while ramping up.
    #[arg(long, default_value_t = 500.0)]
    pub ramp: f64,

    /// How often each device drops off the network, per day (its last will
    /// says offline; it comes back after 1-30 simulated minutes). Default:
    /// the scenario's (0.05, none in burglary, fire and storm).
    #[arg(long)]
    pub dropouts: Option<f64>,

    /// Heartbeat of temperature/humidity sensors, in simulated time (they
    /// report changes of 0.2 °C / 2 % sooner).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub climate_every: Duration,

    /// Heartbeat of lux sensors, in simulated time (changes of ~15% sooner).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub lux_every: Duration,

    /// How long a PIR stays "occupied" after the last movement (simulated).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub pir_cooldown: Duration,

    /// The households' alarm code.
    #[arg(long, default_value = "1234", hide_default_value = false)]
    pub code: String,

    /// The alarm's entry delay, real time: written into --write-homes, and
    /// what the burglary check allows (plus one second).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub entry_delay: Duration,

    /// The alarm's exit delay (arming away), real time, written into
    /// --write-homes. Default: 90 simulated seconds (a PIR's cool-down and
    /// the way out) at --speed, at least 2 s. Longer is more realistic, but
    /// the burglar waits for the alarm to be armed.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub exit_delay: Option<Duration>,

    /// Write the homes file for `hearth-consumers --homes` (lights, alarm
    /// zones, the code's hash, delays fit for --speed) to this path.
    #[arg(long)]
    pub write_homes: Option<PathBuf>,

    /// Only write the homes file, and exit.
    #[arg(long, requires = "write_homes")]
    pub only_write_homes: bool,

    /// Judge the run by the scenario's expectations; exit 1 if not met.
    #[arg(long)]
    pub check: bool,

    /// Write the JSON report here at the end.
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// How long devices wait for outstanding PUBACKs at the end.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,

    /// Log format on stderr: human (coloured on a terminal) or json (one
    /// object a line, for log collectors). The level is HEARTH_LOG or
    /// RUST_LOG (default info).
    #[arg(long, env = "HEARTH_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
}

fn parse_time_of_day(text: &str) -> Result<u64, String> {
    let (hours, minutes) = text.split_once(':').ok_or("expected HH:MM")?;
    let hours: u64 = hours.parse().map_err(|_| "hours are not a number")?;
    let minutes: u64 = minutes.parse().map_err(|_| "minutes are not a number")?;
    if hours > 23 || minutes > 59 {
        return Err("not a time of day".into());
    }
    Ok(hours * 3600 + minutes * 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_has_defaults() {
        Options::command().debug_assert();
        let options = Options::try_parse_from(["hearth-sim"]).unwrap();
        assert_eq!(options.mqtt_url, "mqtt://127.0.0.1:1883");
        assert_eq!(options.qos, 1);
        assert_eq!(options.scenario, ScenarioName::NormalDay);
        let options = Options::try_parse_from([
            "hearth-sim",
            "--scenario",
            "fire-at-night",
            "--start",
            "21:30",
            "--duration",
            "2h",
        ])
        .unwrap();
        assert_eq!(options.scenario, ScenarioName::FireAtNight);
        assert_eq!(options.start, Some(21 * 3600 + 1800));
        assert_eq!(options.duration, Some(Duration::from_secs(7200)));
        assert!(Options::try_parse_from(["hearth-sim", "--qos", "2"]).is_err());
        assert!(Options::try_parse_from(["hearth-sim", "--start", "25:00"]).is_err());
    }
}
