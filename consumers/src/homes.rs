//! The homes file: what the rules know of each home, room by room.
//!
//! ```toml
//! [homes.home.rooms.hall]
//! lights = ["ceiling", "lamp"]
//! lux_below = 30          # motion turns the lights on only when darker than this
//! off_after = "3m"        # and they go off this long after the last motion
//! ```
//!
//! Read and checked at start; an error names the file, the line and what is
//! wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Homes {
    #[serde(default)]
    pub homes: BTreeMap<String, Home>,
    /// Which homes this process handles (`--partition`); the homes of
    /// other partitions are not in `homes`.
    #[serde(skip)]
    partition: crate::partition::Partition,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Home {
    #[serde(default)]
    pub rooms: BTreeMap<String, Room>,
    /// The IANA time zone of the home (`Europe/Berlin`) its hours are read
    /// in; default the system's.
    #[serde(default)]
    pub timezone: Option<String>,
    /// `timezone` resolved, once, when the file is read (see [`Home::zone`]).
    #[serde(skip)]
    resolved_zone: Option<jiff::tz::TimeZone>,
    /// Night hours, `"22:00-06:30"`: motion turns lights on whatever the
    /// lux, at each room's `night_brightness`.
    #[serde(default)]
    pub night: Option<crate::daytime::Hours>,
    /// The alarm (the security rule); none: the home has no alarm.
    #[serde(default)]
    pub security: Option<crate::security::config::Config>,
    /// Who is told what, and how (the notify rule).
    #[serde(default)]
    pub notify: crate::notify::HomeConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Room {
    /// The room's lights, by device name.
    pub lights: Vec<String>,
    /// Motion turns the lights on only below this illuminance (lux); a room
    /// with no reading yet counts as dark.
    pub lux_below: f64,
    /// The lights go off this long after the last motion.
    #[serde(with = "humantime_serde")]
    pub off_after: Duration,
    /// A light switched by hand (reported in a state the rule did not ask
    /// for) suspends the rule in its room for this long.
    #[serde(with = "humantime_serde")]
    pub override_for: Duration,
    /// Brightness (percent) of lights motion turns on in the night hours;
    /// none: the lights' own.
    pub night_brightness: Option<u32>,
    /// A motion sensor still reporting occupancy keeps the lights on, but
    /// at most this long after its last report (for sensors that never
    /// report clear).
    #[serde(with = "humantime_serde")]
    pub occupied_max: Duration,
}

impl Default for Room {
    fn default() -> Self {
        Self {
            lights: Vec::new(),
            lux_below: 30.0,
            off_after: Duration::from_secs(300),
            override_for: Duration::from_secs(1800),
            occupied_max: Duration::from_secs(3600),
            night_brightness: None,
        }
    }
}

impl Home {
    /// The home's time zone: `timezone`, or the system's.
    pub fn zone(&self) -> jiff::tz::TimeZone {
        self.resolved_zone
            .clone()
            .unwrap_or_else(jiff::tz::TimeZone::system)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HomesError {
    #[error("cannot read the homes file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid homes file {path}: {error}")]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error("invalid homes file {path}: home {home:?}: {problem}")]
    InvalidHome {
        path: PathBuf,
        home: String,
        problem: String,
    },
    #[error("invalid homes file {path}: home {home:?}, room {room:?}: {problem}")]
    Invalid {
        path: PathBuf,
        home: String,
        room: String,
        problem: String,
    },
}

impl Homes {
    /// Keeps the homes of `partition` only (see [`crate::partition`]).
    pub fn keep_partition(&mut self, partition: crate::partition::Partition) {
        self.homes.retain(|home, _| partition.owns(home));
        self.partition = partition;
    }

    /// The partition of homes this process handles.
    pub fn partition(&self) -> crate::partition::Partition {
        self.partition
    }

    /// Whether this process handles `home` (configured or not).
    pub fn owns(&self, home: &str) -> bool {
        self.partition.owns(home)
    }

    pub fn load(path: &Path) -> Result<Self, HomesError> {
        let text = std::fs::read_to_string(path).map_err(|error| HomesError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, HomesError> {
        let mut homes: Self = toml::from_str(text).map_err(|error| HomesError::Parse {
            path: path.to_owned(),
            error: Box::new(error),
        })?;
        for (home, config) in &mut homes.homes {
            let invalid = |problem: String| HomesError::InvalidHome {
                path: path.to_owned(),
                home: home.clone(),
                problem,
            };
            config.resolved_zone =
                Some(crate::daytime::time_zone(config.timezone.as_deref()).map_err(invalid)?);
            config
                .notify
                .validate()
                .map_err(|problem| HomesError::InvalidHome {
                    path: path.to_owned(),
                    home: home.clone(),
                    problem,
                })?;
            if let Some(security) = &config.security {
                security
                    .validate()
                    .map_err(|problem| HomesError::InvalidHome {
                        path: path.to_owned(),
                        home: home.clone(),
                        problem: format!("security: {problem}"),
                    })?;
            }
        }
        for (home, rooms) in &homes.homes {
            for (room, config) in &rooms.rooms {
                let invalid = |problem: &str| HomesError::Invalid {
                    path: path.to_owned(),
                    home: home.clone(),
                    room: room.clone(),
                    problem: problem.to_owned(),
                };
                if config.off_after.is_zero() {
                    return Err(invalid("off_after must be above 0"));
                }
                if config.lux_below.is_nan() || config.lux_below < 0.0 {
                    return Err(invalid("lux_below must be 0 or more"));
                }
                if config
                    .night_brightness
                    .is_some_and(|pct| !(1..=100).contains(&pct))
                {
                    return Err(invalid("night_brightness must be 1 to 100 (percent)"));
                }
                if config.lights.iter().any(String::is_empty) {
                    return Err(invalid("a light's name is empty"));
                }
            }
        }
        Ok(homes)
    }

    /// Whether it is night at `now_ms` in `home` (its night hours, in its
    /// time zone).
    pub fn is_night(&self, home: &str, now_ms: u64) -> bool {
        let Some(config) = self.homes.get(home) else {
            return false;
        };
        let Some(night) = &config.night else {
            return false;
        };
        night.contains(now_ms, &config.zone())
    }

    /// The configuration of a room, if it is in the file.
    pub fn room(&self, home: &str, room: &str) -> Option<&Room> {
        self.homes.get(home)?.rooms.get(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_read_with_defaults_and_units() {
        let homes = Homes::parse(
            Path::new("homes.toml"),
            r#"
            [homes.home.rooms.hall]
            lights = ["ceiling"]
            off_after = "90s"
            [homes.home.rooms."Living Room"]
            lights = ["lamp", "spots"]
            "#,
        )
        .unwrap();
        let hall = homes.room("home", "hall").unwrap();
        assert_eq!(hall.off_after, Duration::from_secs(90));
        assert_eq!(hall.lux_below, 30.0);
        assert_eq!(
            homes.room("home", "Living Room").unwrap().lights,
            ["lamp", "spots"]
        );
        assert!(homes.room("home", "attic").is_none());
    }

    #[test]
    fn the_example_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/homes.toml");
        let homes = Homes::load(&path).unwrap();
        assert_eq!(homes.room("home", "hall").unwrap().lights, ["ceiling"]);
    }

    #[test]
    fn errors_name_the_line_or_the_room() {
        let error = Homes::parse(
            Path::new("homes.toml"),
            "[homes.home.rooms.hall]\nlights = [\"a\"]\nofff_after = \"1m\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("line 3") && error.contains("offf_after"),
            "{error}"
        );
        let error = Homes::parse(
            Path::new("homes.toml"),
            "[homes.home]\ntimezone = \"Mars/Olympus\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("\"home\"") && error.contains("Mars/Olympus"),
            "{error}"
        );
        let error = Homes::parse(
            Path::new("homes.toml"),
            "[homes.home]\nnight = \"22:00-31:00\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("line 2") && error.contains("time of day"),
            "{error}"
        );
        let error = Homes::parse(
            Path::new("homes.toml"),
            "[homes.home.rooms.hall]\nnight_brightness = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("night_brightness"), "{error}");
        let error = Homes::parse(
            Path::new("homes.toml"),
            "[homes.home.security.zones.door]\ntype = \"entry\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("security") && error.contains("room/device"),
            "{error}"
        );
        let error = Homes::parse(
            Path::new("homes.toml"),
            "[homes.home.rooms.hall]\nlights = [\"a\"]\noff_after = \"0s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("\"hall\"") && error.contains("off_after"),
            "{error}"
        );
    }
}
