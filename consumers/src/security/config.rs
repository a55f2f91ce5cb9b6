//! `[homes.<home>.security]`: the alarm of a home.
//!
//! ```toml
//! [homes.home.security]
//! codes = [{ name = "alice", hash = "$argon2id$v=19$..." }]  # hearth-consumers hash-code
//! sirens = ["hall/siren"]          # room/device of each siren
//! disarm_after_trigger = false
//!
//! [homes.home.security.away]       # and home, night, vacation, disarmed
//! arming_time = "60s"              # exit delay when arming to this mode
//! delay_time = "30s"               # entry delay when an entry zone opens in it
//! trigger_time = "3m"              # how long it stays triggered (0: never triggers)
//!
//! [homes.home.security.zones."hall/front-door"]
//! type = "entry"                   # entry, perimeter, interior, follower, 24h
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The alarm of one home.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The codes that arm and disarm, each an Argon2 PHC string with a name
    /// (who armed or disarmed is recorded). With none, no code is asked.
    pub codes: Vec<Code>,
    /// Whether arming needs a code too (disarming always does).
    pub code_arm_required: bool,
    /// Wrong codes in a row before the panel locks.
    pub max_code_attempts: u32,
    /// How long a locked panel refuses every code.
    #[serde(with = "humantime_serde")]
    pub lockout: Duration,
    /// After the trigger time, go to disarmed instead of back to the armed
    /// mode.
    pub disarm_after_trigger: bool,
    /// The sirens, `room/device`: switched on while triggered.
    pub sirens: Vec<String>,
    pub disarmed: Timing,
    pub home: Timing,
    pub away: Timing,
    pub night: Timing,
    pub vacation: Timing,
    /// The sensors that guard the home, by `room/device`.
    pub zones: BTreeMap<String, Zone>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            codes: Vec::new(),
            code_arm_required: true,
            max_code_attempts: 5,
            lockout: Duration::from_secs(300),
            disarm_after_trigger: false,
            sirens: Vec::new(),
            disarmed: Timing {
                arming_time: Duration::ZERO,
                delay_time: Duration::ZERO,
                trigger_time: Timing::default().trigger_time,
            },
            home: Timing::default(),
            away: Timing::default(),
            night: Timing::default(),
            vacation: Timing::default(),
            zones: BTreeMap::new(),
        }
    }
}

/// A named alarm code.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Code {
    pub name: String,
    /// `$argon2id$...`, as `hearth-consumers hash-code` prints it.
    pub hash: String,
}

/// The delays of one mode, as Home Assistant's `manual` alarm panel has
/// them: arming uses the target mode's `arming_time`; a trigger uses the
/// current mode's `delay_time` (entry zones) and `trigger_time`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    #[serde(with = "humantime_serde")]
    pub arming_time: Duration,
    #[serde(with = "humantime_serde")]
    pub delay_time: Duration,
    /// 0: a trigger in this mode is ignored (never reaches triggered).
    #[serde(with = "humantime_serde")]
    pub trigger_time: Duration,
}

impl Default for Timing {
    /// Home Assistant's defaults.
    fn default() -> Self {
        Self {
            arming_time: Duration::from_secs(60),
            delay_time: Duration::from_secs(60),
            trigger_time: Duration::from_secs(120),
        }
    }
}

/// How a sensor guards the home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneType {
    /// A door people come in by: opening it while armed starts the entry
    /// delay.
    Entry,
    /// A window or door nobody comes in by: triggers at once in every armed
    /// mode.
    Perimeter,
    /// Motion inside: triggers at once, ignored in armed_home.
    Interior,
    /// Motion on the way from an entry door: follows the entry delay when
    /// an entry zone opened first, triggers at once otherwise; ignored in
    /// armed_home.
    Follower,
    /// Smoke, water leak, tamper: triggers at once in every state, disarmed
    /// included.
    #[serde(rename = "24h")]
    Always,
}

/// One guarded sensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    #[serde(rename = "type")]
    pub kind: ZoneType,
    /// Whether it may open during the exit delay without consequence;
    /// default: yes for entry and follower zones, no for the others.
    #[serde(default)]
    pub exit_allowed: Option<bool>,
    /// The armed modes in which it is watched; default: all four for entry
    /// and perimeter, all but home for interior and follower.
    #[serde(default)]
    pub modes: Option<Vec<Mode>>,
}

/// An armed mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Home,
    Away,
    Night,
    Vacation,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Home, Mode::Away, Mode::Night, Mode::Vacation];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Home => "home",
            Self::Away => "away",
            Self::Night => "night",
            Self::Vacation => "vacation",
        }
    }
}

impl Zone {
    pub fn exit_allowed(&self) -> bool {
        self.exit_allowed
            .unwrap_or(matches!(self.kind, ZoneType::Entry | ZoneType::Follower))
    }

    /// Whether the zone is watched when armed in `mode`.
    pub fn watched_in(&self, mode: Mode) -> bool {
        match &self.modes {
            Some(modes) => modes.contains(&mode),
            None => match self.kind {
                ZoneType::Entry | ZoneType::Perimeter | ZoneType::Always => true,
                ZoneType::Interior | ZoneType::Follower => mode != Mode::Home,
            },
        }
    }
}

impl Config {
    /// The timing of an armed mode, or of disarmed (`None`).
    pub fn timing(&self, mode: Option<Mode>) -> &Timing {
        match mode {
            None => &self.disarmed,
            Some(Mode::Home) => &self.home,
            Some(Mode::Away) => &self.away,
            Some(Mode::Night) => &self.night,
            Some(Mode::Vacation) => &self.vacation,
        }
    }

    /// What is wrong with it, if anything.
    pub fn validate(&self) -> Result<(), String> {
        for code in &self.codes {
            if code.name.trim().is_empty() {
                return Err("a code has an empty name".to_owned());
            }
            if argon2::PasswordHash::new(&code.hash).is_err() {
                return Err(format!(
                    "code {:?}: hash is not an Argon2 PHC string (make one with `hearth-consumers hash-code`)",
                    code.name
                ));
            }
        }
        if self.max_code_attempts == 0 {
            return Err("max_code_attempts must be 1 or more".to_owned());
        }
        for name in self.sirens.iter().chain(self.zones.keys()) {
            if split_zone(name).is_none() {
                return Err(format!(
                    "{name:?} is not `room/device` (a siren or zone is named by its room and device)"
                ));
            }
        }
        for (name, zone) in &self.zones {
            if zone.modes.as_ref().is_some_and(Vec::is_empty) {
                return Err(format!(
                    "zone {name:?}: modes is empty (leave it out for the default)"
                ));
            }
        }
        Ok(())
    }
}

/// `room/device` → (room, device); the device is what follows the last `/`.
pub fn split_zone(name: &str) -> Option<(&str, &str)> {
    let (room, device) = name.rsplit_once('/')?;
    (!room.is_empty() && !device.is_empty()).then_some((room, device))
}
