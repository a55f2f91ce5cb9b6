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
    /// Whether the previous publish had to wait (one count per episode).
    pub(crate) throttling: bool,
}

impl Throttle {
    /// `None` for no limit (a rate of 0).
    pub(crate) fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            last: Instant::now(),
            throttling: false,
        })
    }

    /// Takes one publish's token; how long to wait before handling it.
    pub(crate) fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
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
            assert_eq!(throttle.take(start), Duration::ZERO);
        }
        let wait = throttle.take(start);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After waiting it out, the next one waits another tenth.
        let later = start + wait;
        let wait = throttle.take(later);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // A quiet second refills the bucket.
        let quiet = later + Duration::from_secs(2);
        assert_eq!(throttle.take(quiet), Duration::ZERO);
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(Throttle::new(0).is_none());
    }
}
