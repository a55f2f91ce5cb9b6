//! Scenarios by name: what kind of day the households have, what happens
//! to them, and what hearth must then do (for `--check`).

use std::time::Duration;

use crate::check::Expectation;
use crate::model::routine::DayKind;
use crate::model::world::{Incident, WorldConfig};
use crate::model::{Mark, SimTime, DAY, HOUR};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioName {
    /// A weekday: sleep, work, errands, evenings at home; the alarm armed
    /// when the last one leaves. Nothing may trigger the alarm.
    NormalDay,
    /// The household is out; once the alarm is armed away, someone breaks
    /// in through the front door (first home). The siren must sound within
    /// the entry delay plus one second.
    Burglary,
    /// Everyone asleep; at 03:00 the kitchen's smoke detector goes off
    /// (first home). The siren must sound within one second.
    FireAtNight,
    /// Nobody home all day, the alarm armed. Nothing may trigger it.
    Holiday,
    /// A normal morning; an hour in, every device loses its connection at
    /// once and comes straight back. All must be back, every publish
    /// acknowledged, no alarm.
    ReconnectStorm,
    /// A normal morning with one misbehaving device (the first home's
    /// kitchen climate sensor) publishing as fast as it can. The other
    /// devices must still be acknowledged promptly (p99 under 1 s).
    Flood,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: ScenarioName,
    pub start: SimTime,
    pub duration: SimTime,
    pub world: WorldConfig,
    /// The flooding device, when there is one: (home, room, device).
    pub flood: Option<(usize, crate::model::RoomKind, &'static str)>,
    pub expectations: Vec<Expectation>,
}

/// What a scenario depends on from the command line.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub seed: u64,
    /// `--start`, instead of the scenario's own start.
    pub start: Option<SimTime>,
    pub entry_delay: Duration,
    pub dropouts_per_day: Option<f64>,
    pub base: WorldConfig,
}

impl Scenario {
    pub fn new(name: ScenarioName, knobs: &Knobs) -> Self {
        let mut world = WorldConfig {
            seed: knobs.seed,
            ..knobs.base.clone()
        };
        let mut flood = None;
        let (default_start, duration, expectations) = match name {
            ScenarioName::NormalDay => {
                world.smoke_per_year = 0.0;
                (
                    5 * HOUR,
                    DAY,
                    vec![Expectation::NoAlarm, Expectation::AllAcknowledged],
                )
            }
            ScenarioName::Burglary => {
                world.days = DayKind::OutAllDay;
                world.dropouts_per_day = 0.0;
                let start = knobs.start.unwrap_or(6 * HOUR);
                world.incidents.push(Incident::Burglary {
                    home: 0,
                    not_before: (10 * HOUR).max(start + HOUR),
                    give_up_after: 4 * HOUR,
                });
                (
                    6 * HOUR,
                    12 * HOUR,
                    vec![Expectation::SirenAfter {
                        mark: Mark::Intrusion,
                        within: knobs.entry_delay + Duration::from_secs(1),
                    }],
                )
            }
            ScenarioName::FireAtNight => {
                world.dropouts_per_day = 0.0;
                // The first 03:00 after the start.
                let start = knobs.start.unwrap_or(22 * HOUR);
                let at = if start < 3 * HOUR {
                    3 * HOUR
                } else {
                    DAY + 3 * HOUR
                };
                world.incidents.push(Incident::Fire { home: 0, at });
                (
                    22 * HOUR,
                    8 * HOUR,
                    vec![Expectation::SirenAfter {
                        mark: Mark::Smoke,
                        within: Duration::from_secs(1),
                    }],
                )
            }
            ScenarioName::Holiday => {
                world.days = DayKind::Holiday;
                world.smoke_per_year = 0.0;
                (
                    0,
                    DAY,
                    vec![Expectation::NoAlarm, Expectation::AllAcknowledged],
                )
            }
            ScenarioName::ReconnectStorm => {
                world.smoke_per_year = 0.0;
                world.dropouts_per_day = 0.0;
                let start = knobs.start.unwrap_or(8 * HOUR);
                world
                    .incidents
                    .push(Incident::ReconnectStorm { at: start + HOUR });
                (
                    8 * HOUR,
                    4 * HOUR,
                    vec![
                        Expectation::AllReconnected,
                        Expectation::AllAcknowledged,
                        Expectation::NoAlarm,
                    ],
                )
            }
            ScenarioName::Flood => {
                world.smoke_per_year = 0.0;
                flood = Some((0, crate::model::RoomKind::Kitchen, "climate"));
                (
                    8 * HOUR,
                    2 * HOUR,
                    vec![Expectation::OthersServed {
                        p99_below: Duration::from_secs(1),
                    }],
                )
            }
        };
        if let Some(dropouts) = knobs.dropouts_per_day {
            world.dropouts_per_day = dropouts;
        }
        Scenario {
            name,
            start: knobs.start.unwrap_or(default_start),
            duration,
            world,
            flood,
            expectations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(start: Option<SimTime>) -> Knobs {
        Knobs {
            seed: 1,
            start,
            entry_delay: Duration::from_secs(10),
            dropouts_per_day: None,
            base: WorldConfig::default(),
        }
    }

    #[test]
    fn incidents_follow_the_start_and_checks_follow_the_entry_delay() {
        let fire = Scenario::new(ScenarioName::FireAtNight, &knobs(Some(2 * HOUR + 50 * 60)));
        assert_eq!(
            fire.world.incidents,
            vec![Incident::Fire {
                home: 0,
                at: 3 * HOUR
            }]
        );
        let fire = Scenario::new(ScenarioName::FireAtNight, &knobs(None));
        assert_eq!(fire.start, 22 * HOUR);
        assert_eq!(
            fire.world.incidents,
            vec![Incident::Fire {
                home: 0,
                at: DAY + 3 * HOUR
            }]
        );
        let burglary = Scenario::new(ScenarioName::Burglary, &knobs(None));
        assert_eq!(
            burglary.expectations,
            vec![Expectation::SirenAfter {
                mark: Mark::Intrusion,
                within: Duration::from_secs(11)
            }]
        );
        assert_eq!(burglary.world.dropouts_per_day, 0.0);
        let storm = Scenario::new(ScenarioName::ReconnectStorm, &knobs(Some(HOUR)));
        assert_eq!(
            storm.world.incidents,
            vec![Incident::ReconnectStorm { at: 2 * HOUR }]
        );
        let normal = Scenario::new(
            ScenarioName::NormalDay,
            &Knobs {
                dropouts_per_day: Some(0.0),
                ..knobs(None)
            },
        );
        assert_eq!(normal.world.dropouts_per_day, 0.0);
        assert_eq!(normal.world.smoke_per_year, 0.0);
    }
}
