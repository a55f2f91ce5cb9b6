//! Times of day in a home's time zone: night hours (lights), quiet hours
//! (notifications). Written `"22:00-06:30"`; a window may run past
//! midnight. Daylight saving time is the time zone's business (jiff reads
//! the system's tz database).

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Deserialize;

/// A daily window, `start` included, `end` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hours {
    /// Minutes after midnight.
    start: u16,
    end: u16,
}

impl Hours {
    pub fn parse(text: &str) -> Result<Self, String> {
        let problem = || format!("{text:?} must read like \"22:00-07:00\"");
        let (start, end) = text.split_once('-').ok_or_else(problem)?;
        let minutes = |part: &str| -> Result<u16, String> {
            let (hours, minutes) = part.trim().split_once(':').ok_or_else(problem)?;
            let hours: u16 = hours.parse().map_err(|_| problem())?;
            let minutes: u16 = minutes.parse().map_err(|_| problem())?;
            if hours > 23 || minutes > 59 {
                return Err(format!(
                    "{text:?}: {:?} is not a time of day (00:00 to 23:59)",
                    part.trim()
                ));
            }
            Ok(hours * 60 + minutes)
        };
        let (start, end) = (minutes(start)?, minutes(end)?);
        if start == end {
            return Err(format!("{text:?} starts and ends at the same time"));
        }
        Ok(Self { start, end })
    }

    /// Whether `now_ms` (ms since the epoch) is within the window in `tz`.
    pub fn contains(&self, now_ms: u64, tz: &TimeZone) -> bool {
        self.end_if_within(now_ms, tz).is_some()
    }

    /// If `now_ms` is within the window, when it ends (ms since the epoch).
    pub fn end_if_within(&self, now_ms: u64, tz: &TimeZone) -> Option<u64> {
        let now = Timestamp::from_millisecond(i64::try_from(now_ms).ok()?).ok()?;
        let zoned = now.to_zoned(tz.clone());
        let minute = u16::try_from(zoned.hour()).ok()? * 60 + u16::try_from(zoned.minute()).ok()?;
        let within = if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        };
        if !within {
            return None;
        }
        let end = jiff::civil::time(
            i8::try_from(self.end / 60).ok()?,
            i8::try_from(self.end % 60).ok()?,
            0,
            0,
        );
        let mut date = zoned.date();
        if minute >= self.end {
            date = date.tomorrow().ok()?;
        }
        let ends = date.to_datetime(end).to_zoned(tz.clone()).ok()?;
        u64::try_from(ends.timestamp().as_millisecond()).ok()
    }
}

impl<'de> Deserialize<'de> for Hours {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The time zone called `name`, or the system's for `None`.
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None => Ok(TimeZone::system()),
        Some(name) => {
            TimeZone::get(name).map_err(|e| format!("time zone {name:?} is not known: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> u64 {
        let ts: Timestamp = text.parse().unwrap();
        u64::try_from(ts.as_millisecond()).unwrap()
    }

    #[test]
    fn a_window_past_midnight_contains_both_ends_of_the_night() {
        let night = Hours::parse("22:00-06:30").unwrap();
        let utc = TimeZone::UTC;
        assert!(night.contains(at("2026-12-02T23:00:00Z"), &utc));
        assert!(night.contains(at("2026-12-02T03:00:00Z"), &utc));
        assert!(!night.contains(at("2026-12-02T06:30:00Z"), &utc));
        assert!(!night.contains(at("2026-12-02T12:00:00Z"), &utc));
        assert_eq!(
            night.end_if_within(at("2026-12-02T23:00:00Z"), &utc),
            Some(at("2026-12-03T06:30:00Z"))
        );
        assert_eq!(
            night.end_if_within(at("2026-12-02T03:00:00Z"), &utc),
            Some(at("2026-12-02T06:30:00Z"))
        );
    }

    #[test]
    fn local_time_follows_the_time_zone() {
        let night = Hours::parse("22:00-06:30").unwrap();
        let berlin = time_zone(Some("Europe/Berlin")).unwrap();
        // 21:30 UTC is 22:30 in Berlin in winter.
        assert!(night.contains(at("2026-12-02T21:30:00Z"), &berlin));
        assert!(!night.contains(at("2026-12-02T21:30:00Z"), &TimeZone::UTC));
    }

    #[test]
    fn bad_windows_say_why() {
        assert!(Hours::parse("22:00").unwrap_err().contains("22:00-07:00"));
        assert!(Hours::parse("22:00-25:00")
            .unwrap_err()
            .contains("time of day"));
        assert!(Hours::parse("07:00-07:00")
            .unwrap_err()
            .contains("same time"));
        assert!(time_zone(Some("Mars/Olympus"))
            .unwrap_err()
            .contains("not known"));
    }
}
