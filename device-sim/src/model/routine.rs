//! People's days: when they sleep, wake, go from room to room, leave and
//! come back. A day is planned at midnight from the person's habits and the
//! kind of day; the plan is a list of segments, each an [`Activity`] from a
//! time of day on.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::layout::RoomKind;
use super::{SimTime, DAY, HOUR, MINUTE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// In bed, in the bedroom: does not move.
    Asleep,
    /// Awake in a room, moving about.
    In(RoomKind),
    /// Out of the home.
    Away,
}

impl Activity {
    /// The room the person is in, awake or asleep.
    pub fn room(self) -> Option<RoomKind> {
        match self {
            Activity::Asleep => Some(RoomKind::Bedroom),
            Activity::In(room) => Some(room),
            Activity::Away => None,
        }
    }
}

/// What kind of day the household has (the scenario decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayKind {
    /// Work (on weekdays, for those who work out), errands, evenings at home.
    Normal,
    /// Out after breakfast and back late in the evening.
    OutAllDay,
    /// Not home at all (on holiday).
    Holiday,
}

/// A person's habits, drawn once.
#[derive(Debug, Clone)]
pub struct Habits {
    pub wake: SimTime,
    pub bedtime: SimTime,
    pub works_out: bool,
}

impl Habits {
    pub fn draw(rng: &mut ChaCha8Rng) -> Self {
        Habits {
            wake: 6 * HOUR + 15 * MINUTE + rng.gen_range(0..90 * MINUTE),
            bedtime: 22 * HOUR + rng.gen_range(0..90 * MINUTE),
            works_out: rng.gen_bool(0.7),
        }
    }
}

/// One day of a person: segments sorted by start, the first at 00:00.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayPlan {
    segments: Vec<(SimTime, Activity)>,
}

impl DayPlan {
    /// What the person does at time of day `tod`.
    pub fn at(&self, tod: SimTime) -> Activity {
        let index = self.segments.partition_point(|&(start, _)| start <= tod);
        self.segments[index.saturating_sub(1)].1
    }

    pub fn segments(&self) -> &[(SimTime, Activity)] {
        &self.segments
    }
}

struct Planner<'a> {
    rng: &'a mut ChaCha8Rng,
    segments: Vec<(SimTime, Activity)>,
    now: SimTime,
}

impl Planner<'_> {
    fn push(&mut self, activity: Activity, duration: SimTime) {
        if self.now >= DAY - MINUTE {
            return;
        }
        if self.segments.last().map(|&(_, last)| last) != Some(activity) {
            self.segments.push((self.now, activity));
        }
        self.now = (self.now + duration).min(DAY - MINUTE);
    }

    fn minutes(&mut self, low: u64, high: u64) -> SimTime {
        self.rng.gen_range(low * MINUTE..=high * MINUTE)
    }

    /// Leaves through the hall and is away until `back`, then comes in
    /// through the hall.
    fn outing(&mut self, back: SimTime) {
        let hall = self.minutes(1, 3);
        self.push(Activity::In(RoomKind::Hall), hall);
        let away = back.saturating_sub(self.now).max(10 * MINUTE);
        self.push(Activity::Away, away);
        let hall = self.minutes(1, 3);
        self.push(Activity::In(RoomKind::Hall), hall);
    }

    /// Goes from room to room until `until`.
    fn wander(&mut self, until: SimTime) {
        while self.now + 3 * MINUTE < until {
            let tod = self.now;
            let evening = tod >= 18 * HOUR;
            // Weights: living, kitchen, bathroom, bedroom, hall.
            let weights: [(RoomKind, u32); 5] = [
                (RoomKind::Living, if evening { 50 } else { 35 }),
                (
                    RoomKind::Kitchen,
                    if (11 * HOUR..14 * HOUR).contains(&tod) {
                        40
                    } else {
                        20
                    },
                ),
                (RoomKind::Bathroom, 10),
                (RoomKind::Bedroom, if evening { 5 } else { 12 }),
                (RoomKind::Hall, 4),
            ];
            let total: u32 = weights.iter().map(|(_, w)| w).sum();
            let mut pick = self.rng.gen_range(0..total);
            let mut room = RoomKind::Living;
            for (candidate, weight) in weights {
                if pick < weight {
                    room = candidate;
                    break;
                }
                pick -= weight;
            }
            // Stays an exponentially distributed while, 3 to 90 minutes.
            let mean = 25.0 * MINUTE as f64;
            let stay = (-mean * (1.0 - self.rng.gen::<f64>()).ln()) as SimTime;
            let stay = stay.clamp(3 * MINUTE, 90 * MINUTE).min(until - self.now);
            self.push(Activity::In(room), stay);
        }
    }
}

/// Plans day number `day` (0 is a Monday) of a person with `habits`.
pub fn plan_day(habits: &Habits, day: u64, kind: DayKind, rng: &mut ChaCha8Rng) -> DayPlan {
    if kind == DayKind::Holiday {
        return DayPlan {
            segments: vec![(0, Activity::Away)],
        };
    }
    let weekend = day % 7 >= 5;
    let mut planner = Planner {
        rng,
        segments: Vec::new(),
        now: 0,
    };
    let lie_in = if weekend { HOUR } else { 0 };
    let wake = habits.wake + lie_in + planner.minutes(0, 30);
    planner.push(Activity::Asleep, wake);
    let bathroom = planner.minutes(10, 25);
    planner.push(Activity::In(RoomKind::Bathroom), bathroom);
    let breakfast = planner.minutes(15, 30);
    planner.push(Activity::In(RoomKind::Kitchen), breakfast);
    let bedtime = habits.bedtime.min(DAY - 30 * MINUTE);
    match kind {
        DayKind::OutAllDay => {
            let back = 21 * HOUR + planner.minutes(0, 60);
            planner.outing(back);
        }
        DayKind::Normal if habits.works_out && !weekend => {
            let back = 17 * HOUR + planner.minutes(0, 120);
            planner.outing(back);
        }
        _ => {
            // An errand late in the morning, every other day or so.
            if planner.rng.gen_bool(0.5) {
                let start = 10 * HOUR + planner.minutes(0, 120);
                planner.wander(start);
                let back = planner.now + planner.minutes(30, 120);
                planner.outing(back);
            }
        }
    }
    planner.wander(bedtime);
    let bathroom = planner.minutes(5, 15);
    planner.push(Activity::In(RoomKind::Bathroom), bathroom);
    planner.push(Activity::Asleep, DAY);
    DayPlan {
        segments: planner.segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rng;

    fn plans(kind: DayKind) -> Vec<DayPlan> {
        (0..50)
            .map(|person| {
                let mut rng = rng::stream(1, person);
                let habits = Habits::draw(&mut rng);
                plan_day(&habits, person % 7, kind, &mut rng)
            })
            .collect()
    }

    #[test]
    fn everyone_is_asleep_in_the_small_hours_and_up_at_noon_or_away() {
        for plan in plans(DayKind::Normal) {
            assert_eq!(plan.at(3 * HOUR), Activity::Asleep, "{plan:?}");
            assert_eq!(plan.at(DAY - 1), Activity::Asleep, "{plan:?}");
            assert_ne!(plan.at(12 * HOUR), Activity::Asleep, "{plan:?}");
        }
    }

    #[test]
    fn segments_are_ordered_and_leaving_and_coming_back_go_through_the_hall() {
        for plan in plans(DayKind::Normal)
            .into_iter()
            .chain(plans(DayKind::OutAllDay))
        {
            let segments = plan.segments();
            assert_eq!(segments[0].0, 0);
            for pair in segments.windows(2) {
                assert!(pair[0].0 < pair[1].0, "{plan:?}");
                assert_ne!(pair[0].1, pair[1].1, "{plan:?}");
                if pair[1].1 == Activity::Away || pair[0].1 == Activity::Away {
                    let other = if pair[1].1 == Activity::Away {
                        pair[0].1
                    } else {
                        pair[1].1
                    };
                    assert_eq!(other, Activity::In(RoomKind::Hall), "{plan:?}");
                }
            }
        }
    }

    #[test]
    fn out_all_day_means_away_in_the_afternoon_and_holiday_means_never_home() {
        for plan in plans(DayKind::OutAllDay) {
            assert_eq!(plan.at(15 * HOUR), Activity::Away, "{plan:?}");
        }
        for plan in plans(DayKind::Holiday) {
            for hour in 0..24 {
                assert_eq!(plan.at(hour * HOUR), Activity::Away);
            }
        }
    }

    #[test]
    fn workers_leave_on_weekdays_but_not_every_day_is_the_same() {
        let plans = plans(DayKind::Normal);
        assert!(plans
            .iter()
            .any(|plan| plan.at(11 * HOUR) == Activity::Away));
        assert!(plans
            .iter()
            .any(|plan| plan.at(11 * HOUR) != Activity::Away));
        assert_ne!(plans[0], plans[7]);
    }
}
