//! The homes file `hearth-consumers` reads, written for the simulated
//! homes: each room's lights, and an alarm per home (front door an entry
//! zone, the hall's PIR a follower, windows the perimeter, the kitchen's
//! smoke detector a 24-hour zone, the hall's siren).
//!
//! Delays are real time (the rules run on the wall clock, whatever the
//! simulation's speed), chosen so that the simulated people manage: the
//! exit delay outlasts a PIR's cool-down in simulated time, and the keypad
//! disarms within the entry delay.

use std::fmt::Write as _;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::model::layout::{DeviceKind, Layout};

#[derive(Debug, Clone)]
pub struct Timings {
    /// Exit delay when arming away.
    pub exit_delay: Duration,
    /// Entry delay (the front door while armed).
    pub entry_delay: Duration,
    /// Lights go off this long after the last motion.
    pub off_after: Duration,
    /// A light found in another state than the rule asked for (a light
    /// that came back from a restart reports itself off) leaves its room
    /// to the people this long.
    pub override_for: Duration,
}

impl Timings {
    /// Delays for a run at `speed` with PIRs clearing after `pir_cooldown`
    /// simulated seconds.
    pub fn for_speed(speed: f64, pir_cooldown: u64, entry_delay: Duration) -> Self {
        let sim = |seconds: f64| Duration::from_secs_f64(seconds / speed);
        Timings {
            exit_delay: sim(pir_cooldown as f64 + 30.0).max(Duration::from_secs(2)),
            entry_delay,
            off_after: sim(5.0 * 60.0).max(Duration::from_secs(1)),
            override_for: sim(30.0 * 60.0).max(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HomesFileError {
    #[error("hashing the alarm code: {0}")]
    Hash(String),
}

/// An Argon2id hash of `code` at a low cost: the simulated keypads disarm
/// often and the rules may run unoptimised in tests. Not for real codes.
pub fn code_hash(code: &str) -> Result<String, HomesFileError> {
    let params = Params::new(1024, 1, 1, None).map_err(|e| HomesFileError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(b"hearth-sim-salt!")
        .map_err(|e| HomesFileError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(code.as_bytes(), &salt)
        .map_err(|e| HomesFileError::Hash(e.to_string()))?
        .to_string())
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// The homes file for `layout`.
pub fn render(layout: &Layout, code: &str, timings: &Timings) -> Result<String, HomesFileError> {
    let hash = code_hash(code)?;
    let mut out = String::from(
        "# Written by hearth-sim for its simulated homes (hearth-consumers --homes).\n",
    );
    for home in &layout.homes {
        let name = &home.name;
        let _ = writeln!(out, "\n[homes.\"{name}\"]");
        for room in &home.rooms {
            let lights: Vec<String> = room
                .devices
                .iter()
                .filter(|&&d| layout.devices[d].kind == DeviceKind::Light)
                .map(|&d| format!("\"{}\"", layout.devices[d].name))
                .collect();
            let _ = writeln!(out, "[homes.\"{name}\".rooms.{}]", room.kind.name());
            let _ = writeln!(out, "lights = [{}]", lights.join(", "));
            let _ = writeln!(out, "lux_below = 50");
            let _ = writeln!(out, "off_after = \"{}\"", millis(timings.off_after));
            let _ = writeln!(out, "override_for = \"{}\"", millis(timings.override_for));
        }
        let _ = writeln!(out, "[homes.\"{name}\".security]");
        let _ = writeln!(
            out,
            "codes = [{{ name = \"household\", hash = \"{hash}\" }}]"
        );
        let _ = writeln!(out, "sirens = [\"hall/siren\"]");
        let _ = writeln!(out, "[homes.\"{name}\".security.away]");
        let _ = writeln!(out, "arming_time = \"{}\"", millis(timings.exit_delay));
        let _ = writeln!(out, "delay_time = \"{}\"", millis(timings.entry_delay));
        let _ = writeln!(out, "trigger_time = \"3m\"");
        let _ = writeln!(out, "[homes.\"{name}\".security.disarmed]");
        let _ = writeln!(out, "trigger_time = \"3m\"");
        let zones = [
            ("hall/door", "entry"),
            ("hall/pir", "follower"),
            ("kitchen/window", "perimeter"),
            ("living/window", "perimeter"),
            ("bedroom/window", "perimeter"),
            ("kitchen/smoke", "24h"),
        ];
        for (zone, kind) in zones {
            let _ = writeln!(out, "[homes.\"{name}\".security.zones.\"{zone}\"]");
            let _ = writeln!(out, "type = \"{kind}\"");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layout::Convention;

    #[test]
    fn the_file_names_every_home_light_and_zone_with_scaled_delays() {
        let layout = Layout::new(2, 2, |_| Convention::Native);
        let timings = Timings::for_speed(1440.0, 60, Duration::from_secs(10));
        assert_eq!(timings.exit_delay, Duration::from_secs(2));
        assert_eq!(timings.off_after, Duration::from_secs(1));
        let slow = Timings::for_speed(1.0, 60, Duration::from_secs(10));
        assert_eq!(slow.exit_delay, Duration::from_secs(90));
        let text = render(&layout, "1234", &timings).unwrap();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        let homes = parsed["homes"].as_table().unwrap();
        assert_eq!(homes.len(), 2);
        let home = homes["home-2"].as_table().unwrap();
        assert_eq!(
            home["rooms"]["kitchen"]["lights"].as_array().unwrap()[0].as_str(),
            Some("spots")
        );
        assert_eq!(
            home["security"]["away"]["delay_time"].as_str(),
            Some("10000ms")
        );
        assert_eq!(
            home["security"]["zones"]["kitchen/smoke"]["type"].as_str(),
            Some("24h")
        );
        assert!(home["security"]["codes"][0]["hash"]
            .as_str()
            .unwrap()
            .starts_with("$argon2id$"));
    }
}
