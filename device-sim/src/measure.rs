//! What the run measures, shared by every device task: counters (atomics),
//! latencies in HDR histograms (publish → PUBACK, sensor event → command at
//! the device), errors by kind, and what `--check` needs to judge: when
//! incidents were published, when sirens were told to sound, which alarm
//! states the keypads saw.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::model::{DeviceId, Mark};

/// Latencies are recorded in microseconds, up to a minute, 3 significant
/// digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// How long after a motion event a light command still counts as its
/// reaction when matched by room (the command carries no correlation id the
/// simulator knows).
pub const REACTION_WINDOW: Duration = Duration::from_secs(5);

/// Correlation ids of stored motion events kept for matching at most.
const MAX_CORRELATIONS: usize = 100_000;

/// How a light command was tied to the motion that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// Through the correlation id the gateway gave the motion event (read
    /// from NATS) and the rule copied into the command.
    Correlation,
    /// The last motion sent in the light's room, within [`REACTION_WINDOW`].
    Room,
}

/// Motions sent, for tying light commands to them.
#[derive(Debug, Default)]
struct Motions {
    by_room: HashMap<(usize, usize), Instant>,
    by_device: HashMap<DeviceId, (Instant, usize, usize)>,
    by_correlation: HashMap<String, (Instant, usize, usize)>,
    /// The alarm state each home's keypad saw last: a triggered alarm
    /// switches every light on, which is no reaction to motion.
    alarm: HashMap<usize, String>,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if histogram.is_empty() {
            return Latency::default();
        }
        Latency {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observed<T> {
    pub home: usize,
    pub what: T,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct Observations {
    /// Incidents, when their reading was sent.
    pub marks: Vec<Observed<Mark>>,
    /// Siren commands as they arrived: on or off.
    pub sirens: Vec<Observed<bool>>,
    /// Alarm states as the keypads saw them.
    pub alarm_states: Vec<Observed<String>>,
}

/// The counters of a run.
#[derive(Debug)]
pub struct Measure {
    pub started: Instant,
    pub devices: AtomicU64,
    pub connected: AtomicI64,
    pub connects: AtomicU64,
    pub publishes_sent: AtomicU64,
    pub events_sent: AtomicU64,
    pub publishes_acked: AtomicU64,
    pub events_acked: AtomicU64,
    pub outstanding: AtomicI64,
    pub commands_received: AtomicU64,
    /// Connections dropped without DISCONNECT: each makes the gateway
    /// publish the device's last will (an availability event).
    pub wills: AtomicU64,
    /// The simulated time reached.
    pub sim_now: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    puback: Mutex<Histogram<u64>>,
    puback_flood: Mutex<Histogram<u64>>,
    reaction: Mutex<Histogram<u64>>,
    motions: Mutex<Motions>,
    pub reactions_by_correlation: AtomicU64,
    pub reactions_by_room: AtomicU64,
    pub observations: Mutex<Observations>,
}

impl Default for Measure {
    fn default() -> Self {
        Measure {
            started: Instant::now(),
            devices: AtomicU64::new(0),
            connected: AtomicI64::new(0),
            connects: AtomicU64::new(0),
            publishes_sent: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
            publishes_acked: AtomicU64::new(0),
            events_acked: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
            commands_received: AtomicU64::new(0),
            wills: AtomicU64::new(0),
            sim_now: AtomicU64::new(0),
            errors: Mutex::default(),
            puback: Mutex::new(histogram()),
            puback_flood: Mutex::new(histogram()),
            reaction: Mutex::new(histogram()),
            motions: Mutex::default(),
            reactions_by_correlation: AtomicU64::new(0),
            reactions_by_room: AtomicU64::new(0),
            observations: Mutex::default(),
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 60_000_000)
}

/// A snapshot of the counters, for the progress view.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    pub devices: u64,
    pub connected: i64,
    pub publishes_sent: u64,
    pub publishes_acked: u64,
    pub outstanding: i64,
    pub commands: u64,
    pub errors: u64,
    pub sim_now: u64,
}

impl Measure {
    pub fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(kind)
            .or_default() += 1;
    }

    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        self.errors.lock().expect("errors lock").clone()
    }

    /// A publish was written to the connection.
    pub fn sent(&self, events: u32, acked_later: bool) {
        self.publishes_sent.fetch_add(1, Ordering::Relaxed);
        self.events_sent
            .fetch_add(u64::from(events), Ordering::Relaxed);
        if acked_later {
            self.outstanding.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A QoS 1 publish was acknowledged `latency` after it was written.
    pub fn acked(&self, events: u32, latency: Duration, flood: bool) {
        self.publishes_acked.fetch_add(1, Ordering::Relaxed);
        self.events_acked
            .fetch_add(u64::from(events), Ordering::Relaxed);
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        let histogram = if flood {
            &self.puback_flood
        } else {
            &self.puback
        };
        let _ = histogram
            .lock()
            .expect("histogram lock")
            .record(micros(latency));
    }

    /// Publishes that will never be acknowledged (the connection was dropped
    /// on purpose, or the run ended).
    pub fn abandoned(&self, publishes: usize, why: &'static str) {
        if publishes == 0 {
            return;
        }
        self.outstanding
            .fetch_sub(publishes as i64, Ordering::Relaxed);
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(why)
            .or_default() += publishes as u64;
    }

    /// `device` in (home, room) published motion at `at`.
    pub fn motion_sent(&self, device: DeviceId, home: usize, room: usize, at: Instant) {
        let mut motions = self.motions.lock().expect("motion lock");
        motions.by_room.insert((home, room), at);
        motions.by_device.insert(device, (at, home, room));
    }

    /// The gateway stored the last motion of `device` with `correlation_id`.
    pub fn motion_stored(&self, device: DeviceId, correlation_id: String) {
        let mut motions = self.motions.lock().expect("motion lock");
        let Some(&motion) = motions.by_device.get(&device) else {
            return;
        };
        if motions.by_correlation.len() >= MAX_CORRELATIONS {
            let now = Instant::now();
            motions
                .by_correlation
                .retain(|_, (at, _, _)| now.duration_since(*at) < Duration::from_secs(60));
        }
        motions.by_correlation.insert(correlation_id, motion);
    }

    /// A light of (home, room) was told to go on at `at`, by a command
    /// carrying `correlation_id` (native commands do). Its reaction latency
    /// is from the motion of that correlation id, or else from the last
    /// motion sent in the room if within [`REACTION_WINDOW`] and the home's
    /// alarm is not triggered; each motion counts for one reaction.
    pub fn light_commanded(
        &self,
        home: usize,
        room: usize,
        correlation_id: Option<&str>,
        at: Instant,
    ) -> Option<(Duration, Matched)> {
        let mut motions = self.motions.lock().expect("motion lock");
        let exact = correlation_id.and_then(|id| motions.by_correlation.remove(id));
        let (latency, matched) = match exact {
            Some((motion, motion_home, motion_room)) => {
                if motions.by_room.get(&(motion_home, motion_room)) == Some(&motion) {
                    motions.by_room.remove(&(motion_home, motion_room));
                }
                (at.checked_duration_since(motion)?, Matched::Correlation)
            }
            None => {
                if motions
                    .alarm
                    .get(&home)
                    .is_some_and(|state| state == "triggered")
                {
                    return None;
                }
                let motion = motions.by_room.remove(&(home, room))?;
                let latency = at.checked_duration_since(motion)?;
                if latency > REACTION_WINDOW {
                    return None;
                }
                (latency, Matched::Room)
            }
        };
        drop(motions);
        let counter = match matched {
            Matched::Correlation => &self.reactions_by_correlation,
            Matched::Room => &self.reactions_by_room,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .reaction
            .lock()
            .expect("histogram lock")
            .record(micros(latency));
        Some((latency, matched))
    }

    pub fn observe_mark(&self, home: usize, mark: Mark, at: Instant) {
        self.observations
            .lock()
            .expect("observations lock")
            .marks
            .push(Observed {
                home,
                what: mark,
                at,
            });
    }

    pub fn observe_siren(&self, home: usize, on: bool, at: Instant) {
        self.observations
            .lock()
            .expect("observations lock")
            .sirens
            .push(Observed { home, what: on, at });
    }

    pub fn observe_alarm(&self, home: usize, state: String, at: Instant) {
        self.motions
            .lock()
            .expect("motion lock")
            .alarm
            .insert(home, state.clone());
        self.observations
            .lock()
            .expect("observations lock")
            .alarm_states
            .push(Observed {
                home,
                what: state,
                at,
            });
    }

    pub fn puback(&self) -> Latency {
        Latency::of(&self.puback.lock().expect("histogram lock"))
    }

    pub fn puback_flood(&self) -> Latency {
        Latency::of(&self.puback_flood.lock().expect("histogram lock"))
    }

    pub fn reaction(&self) -> Latency {
        Latency::of(&self.reaction.lock().expect("histogram lock"))
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            devices: self.devices.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            publishes_sent: self.publishes_sent.load(Ordering::Relaxed),
            publishes_acked: self.publishes_acked.load(Ordering::Relaxed),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            commands: self.commands_received.load(Ordering::Relaxed),
            errors: self.errors.lock().expect("errors lock").values().sum(),
            sim_now: self.sim_now.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_counted_with_their_latency_in_percentiles() {
        let measure = Measure::default();
        for ms in 1..=100 {
            measure.sent(1, true);
            measure.acked(1, Duration::from_millis(ms), false);
        }
        let latency = measure.puback();
        assert_eq!(latency.count, 100);
        assert!((latency.p50_ms - 50.0).abs() < 1.0, "{latency:?}");
        assert!((latency.p99_ms - 99.0).abs() < 1.0, "{latency:?}");
        assert!((latency.max_ms - 100.0).abs() < 1.0, "{latency:?}");
        assert_eq!(measure.snapshot().outstanding, 0);
        assert_eq!(measure.puback_flood().count, 0);
    }

    #[test]
    fn a_light_command_matches_the_last_motion_of_its_room_once_and_only_soon_after() {
        let measure = Measure::default();
        let motion = Instant::now();
        let ms = Duration::from_millis;
        measure.motion_sent(7, 0, 1, motion);
        assert_eq!(
            measure.light_commanded(0, 2, None, motion + ms(5)),
            None,
            "another room"
        );
        assert_eq!(
            measure.light_commanded(0, 1, None, motion + ms(5)),
            Some((ms(5), Matched::Room))
        );
        assert_eq!(
            measure.light_commanded(0, 1, None, motion + ms(6)),
            None,
            "used up"
        );
        measure.motion_sent(7, 0, 1, motion);
        assert_eq!(
            measure.light_commanded(0, 1, None, motion + REACTION_WINDOW + ms(1)),
            None
        );
        measure.motion_sent(7, 0, 1, motion);
        measure.observe_alarm(0, "triggered".into(), motion);
        assert_eq!(
            measure.light_commanded(0, 1, None, motion + ms(5)),
            None,
            "the alarm's lights"
        );
        assert_eq!(measure.reaction().count, 1);
    }

    #[test]
    fn a_light_command_matches_its_motion_by_correlation_id_first() {
        let measure = Measure::default();
        let first = Instant::now();
        let ms = Duration::from_millis;
        measure.motion_sent(7, 0, 1, first);
        measure.motion_stored(7, "corr-1".into());
        // A later motion in the same room, not yet stored.
        measure.motion_sent(8, 0, 1, first + ms(3));
        assert_eq!(
            measure.light_commanded(0, 1, Some("corr-1"), first + ms(20)),
            Some((ms(20), Matched::Correlation))
        );
        // The later motion is still there to be matched by room.
        assert_eq!(
            measure.light_commanded(0, 1, Some("unknown"), first + ms(23)),
            Some((ms(20), Matched::Room))
        );
        assert_eq!(measure.reactions_by_correlation.load(Ordering::Relaxed), 1);
        assert_eq!(measure.reactions_by_room.load(Ordering::Relaxed), 1);
    }
}
