//! The alarm state machine of one home, free of I/O: events, requests and
//! the clock go in, effects (state changes, notices, sirens, notification
//! requests) come out, for the rule to store and send.
//!
//! The semantics are those of Home Assistant's `manual` alarm panel, with
//! zones on top:
//! - arming goes through `arming` for the target mode's `arming_time` (none
//!   when it is 0), then to `armed_<mode>`;
//! - a trigger uses the current mode's `delay_time` (`pending`, for entry
//!   zones) and `trigger_time` (`triggered`), then goes back to the armed
//!   mode, or to disarmed with `disarm_after_trigger`; a mode whose
//!   `trigger_time` is 0 never reaches triggered;
//! - zones: see [`ZoneType`]; a zone open at arming refuses the arming
//!   unless forced, which bypasses it until disarmed; a zone still open when
//!   the exit delay ends counts as opened then;
//! - deadlines count from the previous deadline, not from when they were
//!   noticed: a rule that was down when they fell due catches up exactly.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::config::{Config, Mode, ZoneType};
use crate::clock::millis;

/// Where the alarm of a home is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Disarmed,
    Arming {
        mode: Mode,
        until: u64,
    },
    Armed {
        mode: Mode,
    },
    Pending {
        mode: Mode,
        until: u64,
        zone: String,
    },
    /// `mode` is the armed mode to go back to; none when triggered while
    /// disarmed (a 24-hour zone).
    Triggered {
        mode: Option<Mode>,
        until: u64,
        zone: String,
    },
}

/// The state the rule keeps per home (its KV value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    pub phase: Phase,
    /// Zones open now (`room/device`), whatever the phase.
    #[serde(default)]
    pub open: BTreeSet<String>,
    /// Zones bypassed until disarmed.
    #[serde(default)]
    pub bypassed: BTreeSet<String>,
    /// Wrong codes in a row.
    #[serde(default)]
    pub failed_codes: u32,
    /// Until when (ms since the epoch) every code is refused.
    #[serde(default)]
    pub locked_until: Option<u64>,
}

/// The status as people name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Disarmed,
    Arming,
    ArmedHome,
    ArmedAway,
    ArmedNight,
    ArmedVacation,
    Pending,
    Triggered,
}

impl Status {
    /// Home Assistant's state names: `disarmed`, `armed_away`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disarmed => "disarmed",
            Self::Arming => "arming",
            Self::ArmedHome => "armed_home",
            Self::ArmedAway => "armed_away",
            Self::ArmedNight => "armed_night",
            Self::ArmedVacation => "armed_vacation",
            Self::Pending => "pending",
            Self::Triggered => "triggered",
        }
    }

    fn armed(mode: Mode) -> Self {
        match mode {
            Mode::Home => Self::ArmedHome,
            Mode::Away => Self::ArmedAway,
            Mode::Night => Self::ArmedNight,
            Mode::Vacation => Self::ArmedVacation,
        }
    }
}

/// How serious a notification request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Critical,
}

/// What a step of the machine asks the world to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The alarm changed state; the fields describe the new one.
    State {
        previous: Status,
        status: Status,
        mode: Option<Mode>,
        until: Option<u64>,
        bypassed: Vec<String>,
        reason: String,
        zone: String,
        user: String,
    },
    Notice {
        code: &'static str,
        message: String,
        zones: Vec<String>,
    },
    Siren(bool),
    Notify {
        severity: Severity,
        category: &'static str,
        title: String,
        message: String,
    },
}

/// A person's request at the panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Arm { mode: Mode, force: bool },
    Disarm,
}

/// What a request came to: the effects, and the answer for the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub effects: Vec<Effect>,
    pub result: Result<(), String>,
}

impl Alarm {
    pub fn status(&self) -> Status {
        match &self.phase {
            Phase::Disarmed => Status::Disarmed,
            Phase::Arming { .. } => Status::Arming,
            Phase::Armed { mode } => Status::armed(*mode),
            Phase::Pending { .. } => Status::Pending,
            Phase::Triggered { .. } => Status::Triggered,
        }
    }

    /// The armed mode the phase belongs to.
    pub fn mode(&self) -> Option<Mode> {
        match &self.phase {
            Phase::Disarmed => None,
            Phase::Arming { mode, .. } | Phase::Armed { mode } | Phase::Pending { mode, .. } => {
                Some(*mode)
            }
            Phase::Triggered { mode, .. } => *mode,
        }
    }

    /// When the current delay ends, if the phase has one.
    pub fn until(&self) -> Option<u64> {
        match &self.phase {
            Phase::Arming { until, .. }
            | Phase::Pending { until, .. }
            | Phase::Triggered { until, .. } => Some(*until),
            Phase::Disarmed | Phase::Armed { .. } => None,
        }
    }

    /// The next time [`Alarm::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.until()
    }

    /// A sensor of the home reported open (door open, motion, smoke) or
    /// closed (door closed, motion clear, smoke gone).
    pub fn sensor(&mut self, config: &Config, zone: &str, open: bool, now: u64) -> Vec<Effect> {
        if !config.zones.contains_key(zone) {
            return Vec::new();
        }
        if !open {
            self.open.remove(zone);
            return Vec::new();
        }
        self.open.insert(zone.to_owned());
        self.opened(config, zone, now)
    }

    fn opened(&mut self, config: &Config, name: &str, now: u64) -> Vec<Effect> {
        let Some(zone) = config.zones.get(name) else {
            return Vec::new();
        };
        if self.bypassed.contains(name) {
            return Vec::new();
        }
        let delayed = zone.kind == ZoneType::Entry;
        if zone.kind == ZoneType::Always {
            return self.trigger(config, name, false, now);
        }
        match self.phase.clone() {
            Phase::Disarmed | Phase::Triggered { .. } => Vec::new(),
            Phase::Arming { mode, .. } => {
                if zone.exit_allowed() || !zone.watched_in(mode) {
                    Vec::new()
                } else {
                    self.trigger(config, name, delayed, now)
                }
            }
            Phase::Armed { mode } if zone.watched_in(mode) => {
                self.trigger(config, name, delayed, now)
            }
            Phase::Pending { mode, .. } if zone.watched_in(mode) => match zone.kind {
                // The entry delay runs on; a follower follows it.
                ZoneType::Entry | ZoneType::Follower => Vec::new(),
                _ => self.trigger(config, name, false, now),
            },
            Phase::Armed { .. } | Phase::Pending { .. } => Vec::new(),
        }
    }

    /// A zone calls for the alarm: the entry delay when `delayed` and the
    /// mode has one, triggered otherwise.
    fn trigger(&mut self, config: &Config, zone: &str, delayed: bool, now: u64) -> Vec<Effect> {
        let mode = match &self.phase {
            Phase::Triggered { .. } => return Vec::new(),
            Phase::Pending { .. } if delayed => return Vec::new(),
            _ => self.mode(),
        };
        let timing = config.timing(mode);
        if timing.trigger_time.is_zero() {
            tracing::info!(
                zone,
                mode = mode.map_or("disarmed", Mode::as_str),
                "trigger ignored: the mode's trigger_time is 0"
            );
            return Vec::new();
        }
        if delayed && !timing.delay_time.is_zero() {
            let mode = mode.unwrap_or(Mode::Away);
            let until = now + millis(timing.delay_time);
            return vec![self.go(
                Phase::Pending {
                    mode,
                    until,
                    zone: zone.to_owned(),
                },
                format!("entry delay: {zone} opened"),
                zone,
                "",
            )];
        }
        let was_pending = matches!(self.phase, Phase::Pending { .. });
        let until = now + millis(timing.trigger_time);
        let reason = if was_pending {
            format!("{zone} opened during the entry delay")
        } else {
            format!("{zone} opened")
        };
        let mut effects = vec![self.go(
            Phase::Triggered {
                mode,
                until,
                zone: zone.to_owned(),
            },
            reason,
            zone,
            "",
        )];
        effects.push(Effect::Siren(true));
        effects.push(Effect::Notify {
            severity: Severity::Critical,
            category: "alarm_triggered",
            title: "Alarm triggered".to_owned(),
            message: format!("The alarm was triggered by {zone}."),
        });
        effects
    }

    /// Moves to `phase`, describing the change.
    fn go(&mut self, phase: Phase, reason: String, zone: &str, user: &str) -> Effect {
        let previous = self.status();
        self.phase = phase;
        if self.phase == Phase::Disarmed {
            self.bypassed.clear();
        }
        Effect::State {
            previous,
            status: self.status(),
            mode: self.mode(),
            until: self.until(),
            bypassed: self.bypassed.iter().cloned().collect(),
            reason,
            zone: zone.to_owned(),
            user: user.to_owned(),
        }
    }

    /// Fires every deadline due at `now`, in order, each from the time it
    /// fell due.
    pub fn tick(&mut self, config: &Config, now: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        // Each pass moves the phase on; a phase has at most one deadline.
        for _ in 0..8 {
            match self.phase.clone() {
                Phase::Arming { mode, until } if until <= now => {
                    effects.push(self.go(
                        Phase::Armed { mode },
                        "exit delay over".to_owned(),
                        "",
                        "",
                    ));
                    // Zones still open when the exit delay ends count as
                    // opened now.
                    let open: Vec<String> = self.open.iter().cloned().collect();
                    for zone in open {
                        let watched = config
                            .zones
                            .get(&zone)
                            .is_some_and(|z| z.kind != ZoneType::Always && z.watched_in(mode));
                        if watched {
                            effects.extend(self.opened(config, &zone, until));
                        }
                    }
                }
                Phase::Pending { mode, until, zone } if until <= now => {
                    let trigger_time = config.timing(Some(mode)).trigger_time;
                    let triggered_until = until + millis(trigger_time);
                    effects.push(self.go(
                        Phase::Triggered {
                            mode: Some(mode),
                            until: triggered_until,
                            zone: zone.clone(),
                        },
                        format!("entry delay over, not disarmed ({zone})"),
                        &zone,
                        "",
                    ));
                    effects.push(Effect::Siren(true));
                    effects.push(Effect::Notify {
                        severity: Severity::Critical,
                        category: "alarm_triggered",
                        title: "Alarm triggered".to_owned(),
                        message: format!(
                            "The alarm was triggered: {zone} opened and nobody disarmed it."
                        ),
                    });
                }
                Phase::Triggered { mode, until, zone } if until <= now => {
                    let back = match mode {
                        Some(mode) if !config.disarm_after_trigger => Phase::Armed { mode },
                        _ => Phase::Disarmed,
                    };
                    effects.push(self.go(back, "trigger time over".to_owned(), &zone, ""));
                    effects.push(Effect::Siren(false));
                }
                _ => break,
            }
        }
        effects
    }

    /// A request at the panel, with the code given; `verify` tells whose
    /// code it is (`None`: nobody's).
    pub fn request(
        &mut self,
        config: &Config,
        action: Action,
        code: Option<&str>,
        now: u64,
        verify: impl Fn(&str) -> Option<String>,
    ) -> Answer {
        let needs_code =
            !config.codes.is_empty() && (action == Action::Disarm || config.code_arm_required);
        let mut effects = Vec::new();
        let user = if needs_code {
            match self.authorize(config, code, now, &verify, &mut effects) {
                Ok(user) => user,
                Err(refusal) => {
                    return Answer {
                        effects,
                        result: Err(refusal),
                    }
                }
            }
        } else {
            code.and_then(&verify).unwrap_or_default()
        };
        let result = match action {
            Action::Disarm => {
                if self.phase == Phase::Disarmed {
                    Ok(())
                } else {
                    let was_triggered = matches!(self.phase, Phase::Triggered { .. });
                    let reason = if user.is_empty() {
                        "disarmed".to_owned()
                    } else {
                        format!("disarmed by {user}")
                    };
                    effects.push(self.go(Phase::Disarmed, reason, "", &user));
                    if was_triggered {
                        effects.push(Effect::Siren(false));
                    }
                    Ok(())
                }
            }
            Action::Arm { mode, force } => self.arm(config, mode, force, &user, now, &mut effects),
        };
        Answer { effects, result }
    }

    fn authorize(
        &mut self,
        config: &Config,
        code: Option<&str>,
        now: u64,
        verify: &impl Fn(&str) -> Option<String>,
        effects: &mut Vec<Effect>,
    ) -> Result<String, String> {
        if let Some(until) = self.locked_until {
            if until > now {
                let seconds = (until - now).div_ceil(1000);
                return Err(format!(
                    "the panel is locked after too many wrong codes; try again in {seconds} s"
                ));
            }
            self.locked_until = None;
        }
        if let Some(user) = code.filter(|c| !c.is_empty()).and_then(verify) {
            self.failed_codes = 0;
            return Ok(user);
        }
        self.failed_codes += 1;
        if self.failed_codes >= config.max_code_attempts {
            let attempts = self.failed_codes;
            self.failed_codes = 0;
            self.locked_until = Some(now + millis(config.lockout));
            let message = format!(
                "{attempts} wrong codes in a row: the panel refuses every code for {}",
                humantime_serde::re::humantime::format_duration(config.lockout)
            );
            effects.push(Effect::Notice {
                code: "locked_out",
                message: message.clone(),
                zones: Vec::new(),
            });
            effects.push(Effect::Notify {
                severity: Severity::Warning,
                category: "alarm_locked_out",
                title: "Alarm panel locked".to_owned(),
                message: message.clone(),
            });
            return Err(message);
        }
        let left = config.max_code_attempts - self.failed_codes;
        let message = if code.is_none_or(str::is_empty) {
            format!("a code is needed ({left} tries left before the panel locks)")
        } else {
            format!("wrong code ({left} tries left before the panel locks)")
        };
        effects.push(Effect::Notice {
            code: "wrong_code",
            message: message.clone(),
            zones: Vec::new(),
        });
        Err(message)
    }

    fn arm(
        &mut self,
        config: &Config,
        mode: Mode,
        force: bool,
        user: &str,
        now: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<(), String> {
        match &self.phase {
            Phase::Pending { .. } | Phase::Triggered { .. } => {
                return Err(format!(
                    "disarm first: the alarm is {}",
                    self.status().as_str()
                ));
            }
            Phase::Armed { mode: armed } if *armed == mode => return Ok(()),
            Phase::Arming { mode: arming, .. } if *arming == mode => return Ok(()),
            _ => {}
        }
        let arming_time = config.timing(Some(mode)).arming_time;
        // Zones that would call for the alarm as soon as it is armed; one
        // people may walk through during the exit delay is fine if there is
        // an exit delay.
        let open: Vec<String> = self
            .open
            .iter()
            .filter(|name| !self.bypassed.contains(*name))
            .filter(|name| {
                config.zones.get(*name).is_some_and(|zone| {
                    zone.kind != ZoneType::Always
                        && zone.watched_in(mode)
                        && (arming_time.is_zero() || !zone.exit_allowed())
                })
            })
            .cloned()
            .collect();
        if !open.is_empty() {
            if !force {
                let message = format!(
                    "cannot arm {}: open {} ({}); close them or force-arm to bypass them",
                    mode.as_str(),
                    if open.len() == 1 { "zone" } else { "zones" },
                    open.join(", ")
                );
                effects.push(Effect::Notice {
                    code: "arm_refused",
                    message: message.clone(),
                    zones: open,
                });
                return Err(message);
            }
            self.bypassed.extend(open.iter().cloned());
            effects.push(Effect::Notice {
                code: "zones_bypassed",
                message: format!(
                    "armed {} with open zones bypassed until disarmed: {}",
                    mode.as_str(),
                    open.join(", ")
                ),
                zones: open,
            });
        }
        let reason = if user.is_empty() {
            format!("armed {}", mode.as_str())
        } else {
            format!("armed {} by {user}", mode.as_str())
        };
        let phase = if arming_time.is_zero() {
            Phase::Armed { mode }
        } else {
            Phase::Arming {
                mode,
                until: now + millis(arming_time),
            }
        };
        effects.push(self.go(phase, reason, "", user));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::config::{Code, Zone};
    use std::time::Duration;

    const S: u64 = 1000;

    fn config() -> Config {
        let mut config: Config = toml::from_str(
            r#"
            codes = [{ name = "alice", hash = "unused in these tests" }]
            sirens = ["hall/siren"]
            [away]
            arming_time = "60s"
            delay_time = "30s"
            trigger_time = "120s"
            [home]
            arming_time = "0s"
            delay_time = "10s"
            trigger_time = "60s"
            [zones."hall/door"]
            type = "entry"
            [zones."kitchen/window"]
            type = "perimeter"
            [zones."hall/pir"]
            type = "follower"
            [zones."lounge/pir"]
            type = "interior"
            [zones."kitchen/smoke"]
            type = "24h"
            "#,
        )
        .unwrap();
        config.codes = vec![Code {
            name: "alice".into(),
            hash: String::new(),
        }];
        config
    }

    fn verify(code: &str) -> Option<String> {
        (code == "1234").then(|| "alice".to_owned())
    }

    fn arm(alarm: &mut Alarm, config: &Config, mode: Mode, now: u64) -> Answer {
        alarm.request(
            config,
            Action::Arm { mode, force: false },
            Some("1234"),
            now,
            verify,
        )
    }

    fn armed_away(config: &Config) -> Alarm {
        let mut alarm = Alarm::default();
        assert_eq!(arm(&mut alarm, config, Mode::Away, 0).result, Ok(()));
        assert_eq!(alarm.status(), Status::Arming);
        alarm.tick(config, 60 * S);
        assert_eq!(alarm.status(), Status::ArmedAway);
        alarm
    }

    fn statuses(effects: &[Effect]) -> Vec<Status> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::State { status, .. } => Some(*status),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn arming_uses_the_target_modes_arming_time() {
        let config = config();
        let mut alarm = Alarm::default();
        let answer = arm(&mut alarm, &config, Mode::Away, 0);
        assert_eq!(statuses(&answer.effects), [Status::Arming]);
        assert_eq!(alarm.until(), Some(60 * S));
        assert!(alarm.tick(&config, 59 * S).is_empty());
        assert_eq!(statuses(&alarm.tick(&config, 60 * S)), [Status::ArmedAway]);
        // Home has no arming time: armed at once.
        let mut alarm = Alarm::default();
        let answer = arm(&mut alarm, &config, Mode::Home, 0);
        assert_eq!(statuses(&answer.effects), [Status::ArmedHome]);
    }

    #[test]
    fn an_entry_zone_starts_the_entry_delay_then_triggers() {
        let config = config();
        let mut alarm = armed_away(&config);
        let effects = alarm.sensor(&config, "hall/door", true, 100 * S);
        assert_eq!(statuses(&effects), [Status::Pending]);
        assert_eq!(alarm.until(), Some(130 * S));
        // The follower follows the entry delay.
        assert!(alarm.sensor(&config, "hall/pir", true, 105 * S).is_empty());
        let effects = alarm.tick(&config, 130 * S);
        assert_eq!(statuses(&effects), [Status::Triggered]);
        assert!(effects.contains(&Effect::Siren(true)));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Notify {
                severity: Severity::Critical,
                category: "alarm_triggered",
                ..
            }
        )));
        assert_eq!(alarm.until(), Some(250 * S));
        let effects = alarm.tick(&config, 250 * S);
        assert_eq!(statuses(&effects), [Status::ArmedAway]);
        assert!(effects.contains(&Effect::Siren(false)));
    }

    #[test]
    fn disarming_within_the_entry_delay_stops_it() {
        let config = config();
        let mut alarm = armed_away(&config);
        alarm.sensor(&config, "hall/door", true, 100 * S);
        let answer = alarm.request(&config, Action::Disarm, Some("1234"), 110 * S, verify);
        assert_eq!(answer.result, Ok(()));
        assert_eq!(statuses(&answer.effects), [Status::Disarmed]);
        assert!(matches!(&answer.effects[0], Effect::State { user, .. } if user == "alice"));
        assert!(alarm.tick(&config, 1000 * S).is_empty());
    }

    #[test]
    fn instant_zones_trigger_at_once_and_cut_the_entry_delay_short() {
        let config = config();
        let mut alarm = armed_away(&config);
        assert_eq!(
            statuses(&alarm.sensor(&config, "kitchen/window", true, 100 * S)),
            [Status::Triggered]
        );
        let mut alarm = armed_away(&config);
        alarm.sensor(&config, "hall/door", true, 100 * S);
        assert_eq!(
            statuses(&alarm.sensor(&config, "lounge/pir", true, 101 * S)),
            [Status::Triggered]
        );
        // A follower without an entry zone opened first is instant.
        let mut alarm = armed_away(&config);
        assert_eq!(
            statuses(&alarm.sensor(&config, "hall/pir", true, 100 * S)),
            [Status::Triggered]
        );
    }

    #[test]
    fn interior_zones_are_ignored_in_armed_home() {
        let config = config();
        let mut alarm = Alarm::default();
        arm(&mut alarm, &config, Mode::Home, 0);
        assert!(alarm.sensor(&config, "lounge/pir", true, S).is_empty());
        assert!(alarm.sensor(&config, "hall/pir", true, S).is_empty());
        assert_eq!(
            statuses(&alarm.sensor(&config, "hall/door", true, 2 * S)),
            [Status::Pending]
        );
    }

    #[test]
    fn a_24h_zone_triggers_while_disarmed_and_goes_back_to_disarmed() {
        let config = config();
        let mut alarm = Alarm::default();
        assert!(alarm.sensor(&config, "hall/door", true, 0).is_empty());
        let effects = alarm.sensor(&config, "kitchen/smoke", true, S);
        assert_eq!(statuses(&effects), [Status::Triggered]);
        assert_eq!(alarm.mode(), None);
        assert_eq!(statuses(&alarm.tick(&config, 121 * S)), [Status::Disarmed]);
    }

    #[test]
    fn a_trigger_time_of_0_never_reaches_triggered() {
        let mut config = config();
        config.disarmed.trigger_time = Duration::ZERO;
        let mut alarm = Alarm::default();
        assert!(alarm.sensor(&config, "kitchen/smoke", true, S).is_empty());
        assert_eq!(alarm.status(), Status::Disarmed);
    }

    #[test]
    fn disarm_after_trigger_goes_to_disarmed() {
        let mut config = config();
        config.disarm_after_trigger = true;
        let mut alarm = armed_away(&config);
        alarm.sensor(&config, "kitchen/window", true, 100 * S);
        assert_eq!(statuses(&alarm.tick(&config, 220 * S)), [Status::Disarmed]);
    }

    #[test]
    fn missed_deadlines_fire_in_order_from_when_they_fell_due() {
        let config = config();
        let mut alarm = armed_away(&config);
        alarm.sensor(&config, "hall/door", true, 100 * S);
        // Down from 101 s to 1000 s: pending ended at 130, triggered at 250.
        let effects = alarm.tick(&config, 1000 * S);
        assert_eq!(statuses(&effects), [Status::Triggered, Status::ArmedAway]);
        assert_eq!(
            effects
                .iter()
                .filter(|e| matches!(e, Effect::Siren(_)))
                .count(),
            2
        );
    }

    #[test]
    fn the_exit_delay_lets_entry_zones_open_but_not_others() {
        let config = config();
        let mut alarm = Alarm::default();
        arm(&mut alarm, &config, Mode::Away, 0);
        assert!(alarm.sensor(&config, "hall/door", true, S).is_empty());
        assert!(alarm.sensor(&config, "hall/door", false, 2 * S).is_empty());
        assert_eq!(
            statuses(&alarm.sensor(&config, "kitchen/window", true, 3 * S)),
            [Status::Triggered]
        );
        // A per-sensor setting allows it.
        let mut config = config;
        config.zones.insert(
            "kitchen/window".into(),
            Zone {
                kind: ZoneType::Perimeter,
                exit_allowed: Some(true),
                modes: None,
            },
        );
        let mut alarm = Alarm::default();
        arm(&mut alarm, &config, Mode::Away, 0);
        assert!(alarm.sensor(&config, "kitchen/window", true, S).is_empty());
    }

    #[test]
    fn a_zone_still_open_when_the_exit_delay_ends_counts_as_opened() {
        let config = config();
        let mut alarm = Alarm::default();
        arm(&mut alarm, &config, Mode::Away, 0);
        alarm.sensor(&config, "hall/door", true, 50 * S);
        let effects = alarm.tick(&config, 61 * S);
        assert_eq!(statuses(&effects), [Status::ArmedAway, Status::Pending]);
        // The entry delay counts from the end of the exit delay.
        assert_eq!(alarm.until(), Some(90 * S));
    }

    #[test]
    fn open_zones_refuse_arming_unless_forced_which_bypasses_them() {
        let config = config();
        let mut alarm = Alarm::default();
        alarm.sensor(&config, "kitchen/window", true, 0);
        let answer = arm(&mut alarm, &config, Mode::Away, S);
        let error = answer.result.unwrap_err();
        assert!(error.contains("kitchen/window"), "{error}");
        assert_eq!(alarm.status(), Status::Disarmed);
        assert!(matches!(
            &answer.effects[0],
            Effect::Notice {
                code: "arm_refused",
                ..
            }
        ));

        let answer = alarm.request(
            &config,
            Action::Arm {
                mode: Mode::Away,
                force: true,
            },
            Some("1234"),
            2 * S,
            verify,
        );
        assert_eq!(answer.result, Ok(()));
        assert!(
            matches!(&answer.effects[0], Effect::Notice { code: "zones_bypassed", zones, .. } if zones == &["kitchen/window"])
        );
        alarm.tick(&config, 62 * S);
        assert_eq!(alarm.status(), Status::ArmedAway);
        alarm.sensor(&config, "kitchen/window", false, 70 * S);
        assert!(alarm
            .sensor(&config, "kitchen/window", true, 80 * S)
            .is_empty());
        // Disarming ends the bypass.
        alarm.request(&config, Action::Disarm, Some("1234"), 90 * S, verify);
        assert!(alarm.bypassed.is_empty());
    }

    #[test]
    fn wrong_codes_are_counted_and_lock_the_panel() {
        let config = config();
        let mut alarm = armed_away(&config);
        for left in (1..5).rev() {
            let answer = alarm.request(&config, Action::Disarm, Some("0000"), 100 * S, verify);
            let error = answer.result.unwrap_err();
            assert!(error.contains(&format!("{left} tries left")), "{error}");
        }
        let answer = alarm.request(&config, Action::Disarm, Some("0000"), 100 * S, verify);
        assert!(answer.effects.iter().any(|e| matches!(
            e,
            Effect::Notice {
                code: "locked_out",
                ..
            }
        )));
        // Locked: even the right code is refused, until the lockout ends.
        let answer = alarm.request(&config, Action::Disarm, Some("1234"), 200 * S, verify);
        assert!(answer.result.unwrap_err().contains("locked"));
        assert_eq!(alarm.status(), Status::ArmedAway);
        let answer = alarm.request(&config, Action::Disarm, Some("1234"), 400 * S, verify);
        assert_eq!(answer.result, Ok(()));
        assert_eq!(alarm.failed_codes, 0);
    }

    #[test]
    fn arming_without_a_code_is_refused_when_codes_are_required() {
        let config = config();
        let mut alarm = Alarm::default();
        let answer = alarm.request(
            &config,
            Action::Arm {
                mode: Mode::Away,
                force: false,
            },
            None,
            0,
            verify,
        );
        assert!(answer.result.unwrap_err().contains("code is needed"));
        let mut config = config;
        config.code_arm_required = false;
        let answer = alarm.request(
            &config,
            Action::Arm {
                mode: Mode::Away,
                force: false,
            },
            None,
            0,
            verify,
        );
        assert_eq!(answer.result, Ok(()));
    }

    #[test]
    fn a_triggered_alarm_must_be_disarmed_before_arming_again() {
        let config = config();
        let mut alarm = armed_away(&config);
        alarm.sensor(&config, "kitchen/window", true, 100 * S);
        let answer = arm(&mut alarm, &config, Mode::Home, 101 * S);
        assert!(answer.result.unwrap_err().contains("disarm first"));
        let answer = alarm.request(&config, Action::Disarm, Some("1234"), 102 * S, verify);
        assert!(answer.effects.contains(&Effect::Siren(false)));
    }
}
