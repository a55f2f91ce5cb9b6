//! `--check`: what must have happened in a scenario, judged from what the
//! devices saw. Pure: the facts are gathered by the run, judged here.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::measure::Observed;
use crate::model::Mark;

#[derive(Debug, Clone, PartialEq)]
pub enum Expectation {
    /// The alarm never triggers and no siren is switched on.
    NoAlarm,
    /// After each incident of this kind, a siren of its home is switched on
    /// within `within`.
    SirenAfter { mark: Mark, within: Duration },
    /// Every QoS 1 publish was acknowledged.
    AllAcknowledged,
    /// At the end every device is connected again.
    AllReconnected,
    /// The devices other than a flooding one are acknowledged with a p99
    /// under this.
    OthersServed { p99_below: Duration },
}

impl Expectation {
    /// How long after the run's end an answer may still come.
    pub fn settle(&self) -> Duration {
        match self {
            Expectation::SirenAfter { within, .. } => *within,
            _ => Duration::from_secs(1),
        }
    }
}

/// What the run saw, for judging.
#[derive(Debug, Default)]
pub struct Facts {
    /// When the simulation began: alarm states and sirens before it (an
    /// earlier run's, retained) are not this run's doing.
    pub since: Option<Instant>,
    pub marks: Vec<Observed<Mark>>,
    pub sirens: Vec<Observed<bool>>,
    pub alarm_states: Vec<Observed<String>>,
    pub qos1: bool,
    pub outstanding: i64,
    pub unacknowledged: u64,
    pub devices: u64,
    pub connected: i64,
    pub others_p99: Duration,
    pub others_acked: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub expectation: String,
    pub passed: bool,
    pub detail: String,
}

/// Whether every siren expectation is decided by `now` (the run may stop
/// waiting).
pub fn decided(expectations: &[Expectation], facts: &Facts, now: Instant) -> bool {
    expectations.iter().all(|expectation| match expectation {
        Expectation::SirenAfter { mark, within } => facts
            .marks
            .iter()
            .filter(|m| m.what == *mark)
            .all(|m| siren_after(facts, m).is_some() || now >= m.at + *within),
        _ => true,
    })
}

fn siren_after(facts: &Facts, mark: &Observed<Mark>) -> Option<Duration> {
    facts
        .sirens
        .iter()
        .filter(|siren| siren.home == mark.home && siren.what && siren.at >= mark.at)
        .map(|siren| siren.at - mark.at)
        .min()
}

pub fn judge(expectations: &[Expectation], facts: &Facts) -> Vec<Verdict> {
    expectations
        .iter()
        .map(|expectation| {
            let (name, passed, detail) = match expectation {
                Expectation::NoAlarm => {
                    let recent = |at: Instant| facts.since.is_none_or(|since| at >= since);
                    let triggered = facts
                        .alarm_states
                        .iter()
                        .filter(|s| s.what == "triggered" && recent(s.at))
                        .count();
                    let sirens = facts.sirens.iter().filter(|s| s.what && recent(s.at)).count();
                    (
                        "no alarm".to_owned(),
                        triggered == 0 && sirens == 0,
                        format!("{triggered} triggered state(s) seen by keypads, {sirens} siren-on command(s)"),
                    )
                }
                Expectation::SirenAfter { mark, within } => {
                    let marks: Vec<_> = facts.marks.iter().filter(|m| m.what == *mark).collect();
                    let delays: Vec<Option<Duration>> = marks.iter().map(|m| siren_after(facts, m)).collect();
                    let passed = !marks.is_empty() && delays.iter().all(|d| d.is_some_and(|d| d <= *within));
                    let detail = if marks.is_empty() {
                        format!("no {mark:?} incident was published")
                    } else {
                        let seen: Vec<String> = delays
                            .iter()
                            .map(|d| d.map_or("no siren".to_owned(), |d| format!("siren after {:.3} s", d.as_secs_f64())))
                            .collect();
                        format!("{} incident(s): {}", marks.len(), seen.join(", "))
                    };
                    (format!("siren within {:.1} s of {mark:?}", within.as_secs_f64()), passed, detail)
                }
                Expectation::AllAcknowledged => (
                    "every publish acknowledged".to_owned(),
                    !facts.qos1 || (facts.outstanding == 0 && facts.unacknowledged == 0),
                    if facts.qos1 {
                        format!("{} outstanding, {} given up unacknowledged", facts.outstanding, facts.unacknowledged)
                    } else {
                        "QoS 0: nothing to acknowledge".to_owned()
                    },
                ),
                Expectation::AllReconnected => (
                    "every device connected at the end".to_owned(),
                    facts.connected == facts.devices as i64,
                    format!("{} of {} connected", facts.connected, facts.devices),
                ),
                Expectation::OthersServed { p99_below } => (
                    format!("other devices' PUBACK p99 under {} ms", p99_below.as_millis()),
                    facts.others_acked > 0 && facts.others_p99 < *p99_below,
                    format!("p99 {:.1} ms over {} acks", facts.others_p99.as_secs_f64() * 1000.0, facts.others_acked),
                ),
            };
            Verdict {
                expectation: name,
                passed,
                detail,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed<T>(home: usize, what: T, at: Instant) -> Observed<T> {
        Observed { home, what, at }
    }

    #[test]
    fn a_siren_in_time_passes_a_late_or_missing_one_or_another_homes_fails() {
        let t0 = Instant::now();
        let expectation = [Expectation::SirenAfter {
            mark: Mark::Smoke,
            within: Duration::from_secs(1),
        }];
        let mut facts = Facts {
            marks: vec![observed(0, Mark::Smoke, t0)],
            sirens: vec![observed(1, true, t0 + Duration::from_millis(100))],
            ..Facts::default()
        };
        assert!(
            !judge(&expectation, &facts)[0].passed,
            "another home's siren"
        );
        assert!(!decided(
            &expectation,
            &facts,
            t0 + Duration::from_millis(500)
        ));
        assert!(decided(&expectation, &facts, t0 + Duration::from_secs(1)));
        facts
            .sirens
            .push(observed(0, true, t0 + Duration::from_millis(1500)));
        assert!(!judge(&expectation, &facts)[0].passed, "too late");
        facts
            .sirens
            .push(observed(0, true, t0 + Duration::from_millis(300)));
        let verdict = &judge(&expectation, &facts)[0];
        assert!(verdict.passed, "{verdict:?}");
        assert!(verdict.detail.contains("0.300"), "{verdict:?}");
        assert!(decided(&expectation, &facts, t0));
    }

    #[test]
    fn no_incident_at_all_fails_a_siren_expectation() {
        let expectation = [Expectation::SirenAfter {
            mark: Mark::Intrusion,
            within: Duration::from_secs(5),
        }];
        assert!(!judge(&expectation, &Facts::default())[0].passed);
    }

    #[test]
    fn a_triggered_alarm_or_a_siren_fails_no_alarm() {
        let t0 = Instant::now();
        let mut facts = Facts {
            alarm_states: vec![
                observed(0, "armed_away".to_owned(), t0),
                observed(0, "pending".to_owned(), t0),
            ],
            ..Facts::default()
        };
        assert!(judge(&[Expectation::NoAlarm], &facts)[0].passed);
        facts
            .alarm_states
            .push(observed(0, "triggered".to_owned(), t0));
        assert!(!judge(&[Expectation::NoAlarm], &facts)[0].passed);
        facts.alarm_states.clear();
        facts.sirens.push(observed(0, true, t0));
        assert!(!judge(&[Expectation::NoAlarm], &facts)[0].passed);
        // What an earlier run left behind does not count.
        facts.since = Some(t0 + Duration::from_millis(1));
        assert!(judge(&[Expectation::NoAlarm], &facts)[0].passed);
    }

    #[test]
    fn acknowledgements_connections_and_flood_service_are_judged_from_counts() {
        let mut facts = Facts {
            qos1: true,
            devices: 3,
            connected: 3,
            others_acked: 10,
            others_p99: Duration::from_millis(20),
            ..Facts::default()
        };
        let all = [
            Expectation::AllAcknowledged,
            Expectation::AllReconnected,
            Expectation::OthersServed {
                p99_below: Duration::from_secs(1),
            },
        ];
        assert!(judge(&all, &facts).iter().all(|v| v.passed));
        facts.outstanding = 1;
        facts.connected = 2;
        facts.others_p99 = Duration::from_secs(2);
        assert!(judge(&all, &facts).iter().all(|v| !v.passed));
    }
}
