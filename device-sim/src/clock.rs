//! The simulated clock: simulated time runs `speed` times as fast as real
//! time from a start, so `--speed 1440` is a day a minute and `--speed 1`
//! real time. The world is stepped in whole simulated seconds up to where
//! the clock says it should be.

use std::time::{Duration, Instant};

use crate::model::SimTime;

#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    start: SimTime,
    started: Instant,
    speed: f64,
}

impl SimClock {
    pub fn new(start: SimTime, started: Instant, speed: f64) -> Self {
        SimClock {
            start,
            started,
            speed,
        }
    }

    /// The simulated time at real time `now`.
    pub fn at(&self, now: Instant) -> SimTime {
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
        self.start + (elapsed * self.speed) as SimTime
    }

    /// The real time a simulated span takes.
    pub fn real(&self, span: SimTime) -> Duration {
        Duration::from_secs_f64(span as f64 / self.speed)
    }

    pub fn speed(&self) -> f64 {
        self.speed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerated_time_runs_a_day_a_minute_at_1440() {
        let started = Instant::now();
        let clock = SimClock::new(3600, started, 1440.0);
        assert_eq!(clock.at(started), 3600);
        assert_eq!(clock.at(started + Duration::from_secs(60)), 3600 + 86_400);
        assert_eq!(clock.real(86_400), Duration::from_secs(60));
        let real_time = SimClock::new(0, started, 1.0);
        assert_eq!(real_time.at(started + Duration::from_millis(2500)), 2);
    }
}
