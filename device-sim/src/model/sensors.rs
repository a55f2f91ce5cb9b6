//! What sensors measure and when they report, the way real ones do: a PIR
//! reports motion once and "clear" after its cool-down, re-triggered by any
//! movement meanwhile; lux and climate sensors report on a change beyond a
//! threshold or after a while regardless; batteries drain.

use super::{SimTime, HOUR, MINUTE};

/// A passive infrared motion sensor (Aqara/Hue-like): `detected` on the
/// first movement, then quiet while movement goes on, `clear` once nothing
/// moved for the cool-down.
#[derive(Debug, Clone)]
pub struct Pir {
    cooldown: SimTime,
    occupied: bool,
    last_motion: SimTime,
}

impl Pir {
    pub fn new(cooldown: SimTime) -> Self {
        Pir {
            cooldown,
            occupied: false,
            last_motion: 0,
        }
    }

    /// One second at `t`: `moving` whether anything moved in view. Returns
    /// what the sensor reports, if anything.
    pub fn step(&mut self, t: SimTime, moving: bool) -> Option<bool> {
        if moving {
            self.last_motion = t;
            if !self.occupied {
                self.occupied = true;
                return Some(true);
            }
        } else if self.occupied && t.saturating_sub(self.last_motion) >= self.cooldown {
            self.occupied = false;
            return Some(false);
        }
        None
    }
}

pub const SUNRISE: SimTime = 6 * HOUR + 30 * MINUTE;
pub const SUNSET: SimTime = 19 * HOUR + 30 * MINUTE;

/// Daylight outside at time of day `tod` under `cloud` (0 clear .. 1
/// overcast), in lux: a sine arch from sunrise to sunset, up to ~30,000 lux
/// at noon on a clear day, with half an hour of twilight each side.
pub fn daylight(tod: SimTime, cloud: f64) -> f64 {
    let twilight = 30 * MINUTE;
    let clear_sky = if (SUNRISE..SUNSET).contains(&tod) {
        let phase = (tod - SUNRISE) as f64 / (SUNSET - SUNRISE) as f64;
        400.0 + 29_600.0 * (std::f64::consts::PI * phase).sin()
    } else if tod + twilight >= SUNRISE && tod < SUNRISE {
        400.0 * (1.0 - (SUNRISE - tod) as f64 / twilight as f64)
    } else if tod >= SUNSET && tod < SUNSET + twilight {
        400.0 * (1.0 - (tod - SUNSET) as f64 / twilight as f64)
    } else {
        0.0
    };
    clear_sky * (1.0 - 0.75 * cloud.clamp(0.0, 1.0))
}

/// Lux a light adds to its room at full brightness.
pub const LIGHT_LUX: f64 = 250.0;

/// Outdoor temperature at `tod`: coolest before dawn, warmest mid
/// afternoon, around `mean` (the weather's).
pub fn outdoor_celsius(tod: SimTime, mean: f64) -> f64 {
    let phase = (tod as f64 - 9.0 * HOUR as f64) / (24.0 * HOUR as f64);
    mean + 4.0 * (2.0 * std::f64::consts::PI * phase).sin()
}

/// A room's air: heated towards a setpoint with hysteresis, losing heat to
/// the outside, humidity drifting and raised by showers.
#[derive(Debug, Clone)]
pub struct RoomClimate {
    pub celsius: f64,
    pub humidity: f64,
    heating: bool,
}

impl RoomClimate {
    pub fn new(celsius: f64, humidity: f64) -> Self {
        RoomClimate {
            celsius,
            humidity,
            heating: false,
        }
    }

    /// Advances `seconds`: `setpoint` of the heating, `outdoor` °C,
    /// `steam` whether someone showers (bathroom), `drift` a small random
    /// number in -1..1 for humidity.
    pub fn step(&mut self, seconds: f64, setpoint: f64, outdoor: f64, steam: bool, drift: f64) {
        let hours = seconds / HOUR as f64;
        if self.celsius < setpoint - 0.3 {
            self.heating = true;
        } else if self.celsius > setpoint + 0.3 {
            self.heating = false;
        }
        let heat = if self.heating { 1.5 } else { 0.0 };
        let loss = 0.06 * (self.celsius - outdoor);
        self.celsius += (heat - loss) * hours;
        let target = if steam { 85.0 } else { 45.0 };
        self.humidity += (target - self.humidity) * (if steam { 2.0 } else { 0.3 }) * hours;
        self.humidity = (self.humidity + drift * 0.5 * hours).clamp(5.0, 99.0);
    }
}

/// When a sensor reports a measured value: after it moved by `threshold`
/// since the last report, but not more often than `min_interval`, and after
/// `max_interval` regardless (the heartbeat).
#[derive(Debug, Clone)]
pub struct Reporter {
    threshold: f64,
    min_interval: SimTime,
    max_interval: SimTime,
    last: Option<(SimTime, f64)>,
}

impl Reporter {
    pub fn new(threshold: f64, min_interval: SimTime, max_interval: SimTime) -> Self {
        Reporter {
            threshold,
            min_interval,
            max_interval,
            last: None,
        }
    }

    /// Whether `value` at `t` is to be reported (and then remembers it).
    pub fn offer(&mut self, t: SimTime, value: f64) -> bool {
        let due = match self.last {
            None => true,
            Some((at, last)) => {
                let since = t.saturating_sub(at);
                since >= self.max_interval
                    || (since >= self.min_interval && (value - last).abs() >= self.threshold)
            }
        };
        if due {
            self.last = Some((t, value));
        }
        due
    }
}

/// A battery: drains a little every day and with every message sent.
#[derive(Debug, Clone)]
pub struct Battery {
    pub percent: f64,
    per_day: f64,
    reported: Option<u8>,
}

impl Battery {
    pub fn new(percent: f64, per_day: f64) -> Self {
        Battery {
            percent,
            per_day,
            reported: None,
        }
    }

    pub fn step(&mut self, seconds: f64) {
        self.percent = (self.percent - self.per_day * seconds / 86_400.0).max(0.0);
    }

    pub fn sent_message(&mut self) {
        self.percent = (self.percent - 0.002).max(0.0);
    }

    /// The level to report, when it changed by a whole percent.
    pub fn report(&mut self) -> Option<u8> {
        let level = self.percent.floor() as u8;
        if self.reported != Some(level) {
            self.reported = Some(level);
            Some(level)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pir_reports_once_while_retriggered_and_clears_after_its_cooldown() {
        let mut pir = Pir::new(60);
        assert_eq!(pir.step(100, true), Some(true));
        // Movement within the cool-down re-triggers it silently.
        assert_eq!(pir.step(130, true), None);
        assert_eq!(pir.step(170, false), None);
        assert_eq!(pir.step(189, false), None);
        assert_eq!(pir.step(190, false), Some(false));
        assert_eq!(pir.step(191, false), None);
        assert_eq!(pir.step(300, true), Some(true));
    }

    #[test]
    fn daylight_is_dark_at_night_bright_at_noon_and_dimmer_under_cloud() {
        assert_eq!(daylight(2 * HOUR, 0.0), 0.0);
        assert_eq!(daylight(23 * HOUR, 0.0), 0.0);
        let noon = daylight(13 * HOUR, 0.0);
        assert!(noon > 25_000.0, "{noon}");
        assert!(daylight(8 * HOUR, 0.0) < noon);
        assert!(daylight(8 * HOUR, 0.0) > daylight(7 * HOUR, 0.0));
        assert!(daylight(13 * HOUR, 1.0) < noon / 2.0);
        // Twilight: some light just before sunrise, none an hour before.
        assert!(daylight(SUNRISE - 10 * MINUTE, 0.0) > 0.0);
        assert_eq!(daylight(SUNRISE - HOUR, 0.0), 0.0);
    }

    #[test]
    fn heating_holds_a_room_near_its_setpoint_and_it_cools_without() {
        let mut room = RoomClimate::new(16.0, 45.0);
        for _ in 0..(6 * 3600) {
            room.step(1.0, 20.5, 5.0, false, 0.0);
        }
        assert!((room.celsius - 20.5).abs() < 0.6, "{}", room.celsius);
        for _ in 0..(6 * 3600) {
            room.step(1.0, 10.0, 5.0, false, 0.0);
        }
        assert!(room.celsius < 18.0, "{}", room.celsius);
    }

    #[test]
    fn a_shower_raises_humidity() {
        let mut room = RoomClimate::new(21.0, 45.0);
        for _ in 0..900 {
            room.step(1.0, 21.0, 5.0, true, 0.0);
        }
        assert!(room.humidity > 60.0, "{}", room.humidity);
    }

    #[test]
    fn reporters_send_on_change_and_heartbeat_but_not_too_often() {
        let mut reporter = Reporter::new(0.5, 30, 600);
        assert!(reporter.offer(0, 20.0));
        assert!(!reporter.offer(10, 25.0), "within min_interval");
        assert!(reporter.offer(30, 25.0));
        assert!(!reporter.offer(100, 25.2));
        assert!(reporter.offer(630, 25.2), "heartbeat");
    }

    #[test]
    fn batteries_drain_and_report_whole_percent_changes() {
        let mut battery = Battery::new(50.5, 1.0);
        assert_eq!(battery.report(), Some(50));
        assert_eq!(battery.report(), None);
        battery.step(86_400.0);
        assert_eq!(battery.report(), Some(49));
    }
}
