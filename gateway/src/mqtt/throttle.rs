//! A client's allowance of publishes per second (`mqtt.max_publish_rate`):
//! a token bucket holding one second's worth, so short bursts pass and a
//! sustained flood is slowed to the rate by not reading the client's socket.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Throttle {
    rate: f64,
    /// May go below zero: the debt is the wait.
    tokens: f64,
    last: Instant,
    /// Whether the client is being slowed down: from its first wait until
    /// it has let the allowance refill halfway (one count per episode).
    pub(crate) throttling: bool,
    /// When the last warning about this client was logged.
    pub(crate) warned_at: Option<Instant>,
}

impl Throttle {
    /// `None` for no limit (a rate of 0).
    pub(crate) fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            last: Instant::now(),
            throttling: false,
            warned_at: None,
        })
    }

    /// Takes one publish's token; how long to wait before handling it, and
    /// whether that starts a new episode of throttling.
    pub(crate) fn take(&mut self, now: Instant) -> (Duration, bool) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - 1.0;
        if self.tokens >= 0.0 {
            if self.tokens >= self.rate / 2.0 {
                self.throttling = false;
            }
            return (Duration::ZERO, false);
        }
        let started = !self.throttling;
        self.throttling = true;
        (Duration::from_secs_f64(-self.tokens / self.rate), started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_seconds_worth_passes_then_publishes_are_spaced() {
        let start = Instant::now();
        let mut throttle = Throttle::new(10).unwrap();
        for _ in 0..10 {
            assert_eq!(throttle.take(start), (Duration::ZERO, false));
        }
        let (wait, started) = throttle.take(start);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(started, "the first wait starts an episode");
        // After waiting it out, the next one waits another tenth, in the
        // same episode.
        let later = start + wait;
        let (wait, started) = throttle.take(later);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(!started);
        // A quiet second refills the bucket and ends the episode.
        let quiet = later + Duration::from_secs(2);
        assert_eq!(throttle.take(quiet), (Duration::ZERO, false));
        assert!(!throttle.throttling);
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(Throttle::new(0).is_none());
    }
}
