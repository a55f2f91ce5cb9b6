//! The world, stepped one simulated second at a time: people follow their
//! day plans through the rooms of their homes, and each device reports what
//! it would really report. Pure: what comes in is [`Feedback`], what goes
//! out is [`Output`]s, and all randomness is drawn from the run's seed.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::layout::{DeviceKind, Layout, RoomKind};
use super::routine::{plan_day, Activity, DayKind, DayPlan, Habits};
use super::sensors::{self, Battery, Pir, Reporter, RoomClimate};
use super::{
    rng, DeviceId, Feedback, KeypadAction, Mark, Output, SimTime, Value, DAY, HOUR, MINUTE,
};

/// Something a scenario makes happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Incident {
    /// Once `home` is empty and its alarm armed away (as its keypad saw),
    /// at `not_before` or later, someone breaks in through the front door;
    /// after `give_up_after` without the alarm armed, they come anyway.
    Burglary {
        home: usize,
        not_before: SimTime,
        give_up_after: SimTime,
    },
    /// The kitchen's smoke detector of `home` goes off at `at`.
    Fire { home: usize, at: SimTime },
    /// Every device loses its connection at `at` and comes straight back.
    ReconnectStorm { at: SimTime },
}

#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    /// The kind of every day of the run.
    pub days: DayKind,
    pub pir_cooldown: SimTime,
    /// Heartbeat of climate sensors (they report changes sooner).
    pub climate_every: SimTime,
    /// Heartbeat of lux sensors.
    pub lux_every: SimTime,
    /// How often a device drops off the network, per device and day.
    pub dropouts_per_day: f64,
    /// Water leaks per leak sensor and year (they dry up after a while).
    pub leaks_per_year: f64,
    /// Smoke alarms (burnt toast) per smoke detector and year.
    pub smoke_per_year: f64,
    pub incidents: Vec<Incident>,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 1,
            days: DayKind::Normal,
            pir_cooldown: 60,
            climate_every: 15 * MINUTE,
            lux_every: 10 * MINUTE,
            dropouts_per_day: 0.05,
            leaks_per_year: 0.5,
            smoke_per_year: 0.0,
            incidents: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Person {
    habits: Habits,
    plan: DayPlan,
    activity: Activity,
    entered_at: SimTime,
}

#[derive(Debug)]
struct Room {
    climate: RoomClimate,
}

#[derive(Debug)]
struct Intruder {
    room: Option<RoomKind>,
    entered: SimTime,
}

#[derive(Debug)]
struct Home {
    people: Vec<Person>,
    rooms: Vec<Room>,
    alarm: Option<String>,
    armed_by_keypad: bool,
    intruder: Option<Intruder>,
    burgled: bool,
    /// Seconds by which the home's periodic reports are offset.
    phase: SimTime,
    scheduled: Vec<(SimTime, Output)>,
    rng: ChaCha8Rng,
}

#[derive(Debug)]
struct Device {
    online: bool,
    back_at: Option<SimTime>,
    battery: Option<Battery>,
    /// Temperature (climate) or lux.
    primary: Option<Reporter>,
    /// Humidity (climate).
    secondary: Option<Reporter>,
    pir: Option<Pir>,
    /// Lights: on, brightness.
    light: (bool, u8),
    /// Contacts: open; smoke and leak: detected; until when.
    active: bool,
    active_until: Option<SimTime>,
    rng: ChaCha8Rng,
}

#[derive(Debug)]
struct Weather {
    cloud: f64,
    mean_celsius: f64,
    rng: ChaCha8Rng,
}

pub struct World {
    layout: Layout,
    config: WorldConfig,
    homes: Vec<Home>,
    devices: Vec<Device>,
    weather: Weather,
    /// The next second to simulate.
    t: SimTime,
    planned_day: Option<u64>,
}

const STEP_CLIMATE: SimTime = 60;
/// Seconds between a front door opening and the hall's PIR seeing who came
/// in.
const DOORWAY: SimTime = 10;
const STEP_LUX: SimTime = 10;
const STEP_DROPOUT: SimTime = 60;

impl World {
    /// A world at `start` (seconds since midnight of day 0).
    pub fn new(layout: Layout, config: WorldConfig, start: SimTime) -> Self {
        let seed = config.seed;
        let mut weather_rng = rng::stream(seed, rng::id(&[0xea7]));
        let weather = Weather {
            cloud: weather_rng.gen_range(0.0..1.0),
            mean_celsius: weather_rng.gen_range(2.0..14.0),
            rng: weather_rng,
        };
        let homes = layout
            .homes
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let mut rng = rng::stream(seed, rng::id(&[1, index as u64]));
                let people = (0..spec.people)
                    .map(|person| {
                        let mut rng = rng::stream(seed, rng::id(&[2, index as u64, person as u64]));
                        Person {
                            habits: Habits::draw(&mut rng),
                            plan: DayPlan::default_asleep(),
                            activity: Activity::Asleep,
                            entered_at: 0,
                        }
                    })
                    .collect();
                let rooms = spec
                    .rooms
                    .iter()
                    .map(|_| Room {
                        climate: RoomClimate::new(
                            rng.gen_range(18.0..21.0),
                            rng.gen_range(40.0..55.0),
                        ),
                    })
                    .collect();
                Home {
                    people,
                    rooms,
                    alarm: None,
                    armed_by_keypad: false,
                    intruder: None,
                    burgled: false,
                    phase: rng.gen_range(0..HOUR),
                    scheduled: Vec::new(),
                    rng,
                }
            })
            .collect();
        let devices = layout
            .devices
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let mut rng = rng::stream(seed, rng::id(&[3, index as u64]));
                let battery = spec
                    .kind
                    .battery_powered()
                    .then(|| Battery::new(rng.gen_range(40.0..100.0), rng.gen_range(0.02..0.2)));
                let (primary, secondary) = match spec.kind {
                    DeviceKind::Climate => (
                        Some(Reporter::new(0.2, 60, config.climate_every)),
                        Some(Reporter::new(2.0, 60, config.climate_every)),
                    ),
                    // On a log scale: a change of ~15% is worth reporting.
                    DeviceKind::Lux => (Some(Reporter::new(0.15, 30, config.lux_every)), None),
                    _ => (None, None),
                };
                Device {
                    online: true,
                    back_at: None,
                    battery,
                    primary,
                    secondary,
                    pir: (spec.kind == DeviceKind::Pir).then(|| Pir::new(config.pir_cooldown)),
                    light: (false, 0),
                    active: false,
                    active_until: None,
                    rng,
                }
            })
            .collect();
        World {
            layout,
            config,
            homes,
            devices,
            weather,
            t: start,
            planned_day: None,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The next second to be simulated.
    pub fn now(&self) -> SimTime {
        self.t
    }

    /// How many people of `home` are in (not away).
    pub fn people_home(&self, home: usize) -> usize {
        self.homes[home]
            .people
            .iter()
            .filter(|person| person.activity != Activity::Away)
            .count()
    }

    /// Takes what came back from hearth into account.
    pub fn feedback(&mut self, feedback: Feedback) {
        match feedback {
            Feedback::Light {
                device,
                on,
                brightness_pct,
            } => {
                if let Some(state) = self.devices.get_mut(device) {
                    state.light = (on, brightness_pct);
                }
            }
            Feedback::AlarmState { home, state } => {
                if let Some(home) = self.homes.get_mut(home) {
                    home.alarm = Some(state);
                }
            }
        }
    }

    /// Simulates one second and appends what the devices do to `out`.
    pub fn step(&mut self, out: &mut Vec<Output>) {
        let t = self.t;
        self.t += 1;
        let day = t / DAY;
        if self.planned_day != Some(day) {
            self.plan(day);
        }
        if t % (10 * MINUTE) == 0 {
            let w = &mut self.weather;
            w.cloud = (w.cloud + w.rng.gen_range(-0.08..0.08)).clamp(0.0, 1.0);
            w.mean_celsius = (w.mean_celsius + w.rng.gen_range(-0.2..0.2)).clamp(-10.0, 30.0);
        }
        for incident in self.config.incidents.clone() {
            if let Incident::ReconnectStorm { at } = incident {
                if at == t {
                    for device in 0..self.devices.len() {
                        if self.devices[device].online {
                            self.devices[device].online = false;
                            self.devices[device].back_at = Some(t + 1);
                            out.push(Output::Connectivity {
                                device,
                                online: false,
                            });
                        }
                    }
                }
            }
        }
        for home in 0..self.homes.len() {
            self.step_home(home, t, out);
        }
        self.step_connectivity(t, out);
    }

    fn plan(&mut self, day: u64) {
        let seed = self.config.seed;
        for (h, home) in self.homes.iter_mut().enumerate() {
            for (p, person) in home.people.iter_mut().enumerate() {
                let mut rng = rng::stream(seed, rng::id(&[4, h as u64, p as u64, day]));
                person.plan = plan_day(&person.habits, day, self.config.days, &mut rng);
            }
        }
        // The first plan of a run: everyone starts where the plan has them.
        if self.planned_day.is_none() {
            let tod = super::time_of_day(self.t);
            let now = self.t;
            for (h, home) in self.homes.iter_mut().enumerate() {
                for person in &mut home.people {
                    person.activity = person.plan.at(tod);
                }
                // An alarm left armed or triggered by an earlier run (as the
                // keypad saw it when it connected) is disarmed first.
                let mut at = now;
                if home
                    .alarm
                    .as_deref()
                    .is_some_and(|state| state != "disarmed")
                {
                    home.scheduled.push((
                        at,
                        Output::Keypad {
                            home: h,
                            action: KeypadAction::Disarm,
                        },
                    ));
                    at += 1;
                }
                // Out already: they armed the alarm as they left.
                home.armed_by_keypad = home.people.iter().all(|p| p.activity == Activity::Away);
                if home.armed_by_keypad {
                    home.scheduled.push((
                        at,
                        Output::Keypad {
                            home: h,
                            action: KeypadAction::ArmAway,
                        },
                    ));
                }
            }
        }
        self.planned_day = Some(day);
    }

    fn device(&self, home: usize, room: RoomKind, name: &str) -> DeviceId {
        self.layout
            .find(home, room, name)
            .expect("the layout has every device the world drives")
    }

    /// Emits `value` from `device` unless it is offline; drains its battery.
    fn emit(&mut self, device: DeviceId, value: Value, mark: Option<Mark>, out: &mut Vec<Output>) {
        let state = &mut self.devices[device];
        if !state.online {
            return;
        }
        if let Some(battery) = &mut state.battery {
            battery.sent_message();
        }
        out.push(Output::Reading {
            device,
            value,
            mark,
        });
    }

    fn step_home(&mut self, h: usize, t: SimTime, out: &mut Vec<Output>) {
        let tod = super::time_of_day(t);
        let door = self.device(h, RoomKind::Hall, "door");
        let spec_rooms: Vec<RoomKind> = self.layout.homes[h].rooms.iter().map(|r| r.kind).collect();

        // Comings and goings.
        let mut present = self.people_home(h);
        for p in 0..self.homes[h].people.len() {
            let home = &mut self.homes[h];
            let person = &mut home.people[p];
            let next = person.plan.at(tod);
            let last = person.activity;
            if next == last {
                continue;
            }
            person.activity = next;
            person.entered_at = t;
            if next == Activity::Away {
                present -= 1;
                if present == 0 {
                    // The last one out closes the windows, arms, and leaves.
                    home.armed_by_keypad = true;
                    home.scheduled.push((
                        t,
                        Output::Keypad {
                            home: h,
                            action: KeypadAction::ArmAway,
                        },
                    ));
                    home.scheduled.push((t + 5, door_reading(door, true, None)));
                    home.scheduled
                        .push((t + 20, door_reading(door, false, None)));
                    for window in self.windows(h) {
                        if self.devices[window].active {
                            self.devices[window].active = false;
                            self.devices[window].active_until = None;
                            self.emit(window, Value::Contact { open: false }, None, out);
                        }
                    }
                } else {
                    home.scheduled.push((t, door_reading(door, true, None)));
                    home.scheduled
                        .push((t + 15, door_reading(door, false, None)));
                }
            } else if last == Activity::Away {
                // In the doorway first: the hall's PIR sees them only once
                // the door is open (the alarm's follower zone relies on the
                // entry zone opening first).
                person.entered_at = t + DOORWAY;
                present += 1;
                home.scheduled.push((t, door_reading(door, true, None)));
                home.scheduled
                    .push((t + 15, door_reading(door, false, None)));
                if present == 1 && home.armed_by_keypad {
                    home.armed_by_keypad = false;
                    home.scheduled.push((
                        t + 5,
                        Output::Keypad {
                            home: h,
                            action: KeypadAction::Disarm,
                        },
                    ));
                }
            }
        }

        self.step_incidents(h, t, door, out);

        // Motion: people awake in a room move about; sleepers do not.
        for (r, &kind) in spec_rooms.iter().enumerate() {
            let home = &mut self.homes[h];
            let mut moving = false;
            for person in &home.people {
                if person.activity == Activity::In(kind)
                    && t >= person.entered_at
                    && (person.entered_at == t || home.rng.gen_bool(0.2))
                {
                    moving = true;
                }
            }
            if let Some(intruder) = &home.intruder {
                let seen_from = intruder.entered + DOORWAY;
                if intruder.room == Some(kind)
                    && t >= seen_from
                    && (seen_from == t || home.rng.gen_bool(0.5))
                {
                    moving = true;
                }
            }
            let pir = self.device(h, kind, "pir");
            if let Some(report) = self.devices[pir]
                .pir
                .as_mut()
                .and_then(|pir| pir.step(t, moving))
            {
                self.emit(pir, Value::Motion(report), None, out);
            }
            let awake_here = self.homes[h]
                .people
                .iter()
                .any(|person| person.activity == Activity::In(kind));
            let phased = t + self.homes[h].phase;
            if phased % STEP_CLIMATE == 0 {
                self.step_climate(h, r, kind, awake_here, tod, t, out);
            }
            if phased % STEP_LUX == 0 {
                self.step_lux(h, r, kind, tod, t, out);
            }
            self.step_room_devices(h, r, kind, awake_here, tod, t, out);
        }

        // What was scheduled for now.
        let due: Vec<Output> = {
            let scheduled = &mut self.homes[h].scheduled;
            let mut due = Vec::new();
            scheduled.retain(|(at, output)| {
                if *at <= t {
                    due.push(output.clone());
                    false
                } else {
                    true
                }
            });
            due
        };
        for output in due {
            match output {
                Output::Reading {
                    device,
                    value,
                    mark,
                } => {
                    if let Value::Contact { open } = value {
                        self.devices[device].active = open;
                    }
                    self.emit(device, value, mark, out);
                }
                other => out.push(other),
            }
        }
    }

    fn windows(&self, h: usize) -> Vec<DeviceId> {
        self.layout.homes[h]
            .rooms
            .iter()
            .flat_map(|room| room.devices.iter().copied())
            .filter(|&d| self.layout.devices[d].kind == DeviceKind::Window)
            .collect()
    }

    fn step_incidents(&mut self, h: usize, t: SimTime, door: DeviceId, out: &mut Vec<Output>) {
        for incident in self.config.incidents.clone() {
            match incident {
                Incident::Burglary {
                    home,
                    not_before,
                    give_up_after,
                } if home == h && !self.homes[h].burgled && t >= not_before => {
                    let empty = self.people_home(h) == 0;
                    let armed = self.homes[h].alarm.as_deref() == Some("armed_away");
                    if (empty && armed) || t >= not_before + give_up_after {
                        let home = &mut self.homes[h];
                        home.burgled = true;
                        home.intruder = Some(Intruder {
                            room: Some(RoomKind::Hall),
                            entered: t,
                        });
                        home.scheduled
                            .push((t + 20, door_reading(door, false, None)));
                        self.devices[door].active = true;
                        self.emit(
                            door,
                            Value::Contact { open: true },
                            Some(Mark::Intrusion),
                            out,
                        );
                    }
                }
                Incident::Fire { home, at } if home == h && at == t => {
                    let smoke = self.device(h, RoomKind::Kitchen, "smoke");
                    self.devices[smoke].active = true;
                    self.devices[smoke].active_until = Some(t + 20 * MINUTE);
                    self.emit(smoke, Value::Smoke(true), Some(Mark::Smoke), out);
                }
                _ => {}
            }
        }
        // The intruder goes from the hall to the living room, then leaves.
        let home = &mut self.homes[h];
        if let Some(intruder) = &mut home.intruder {
            let inside = t - intruder.entered;
            if inside == 3 * MINUTE {
                intruder.room = Some(RoomKind::Living);
            } else if inside == 10 * MINUTE {
                intruder.room = Some(RoomKind::Hall);
                home.scheduled
                    .push((t + 30, door_reading(door, true, None)));
                home.scheduled
                    .push((t + 45, door_reading(door, false, None)));
            } else if inside == 10 * MINUTE + 40 {
                home.intruder = None;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step_climate(
        &mut self,
        h: usize,
        r: usize,
        kind: RoomKind,
        awake_here: bool,
        tod: SimTime,
        t: SimTime,
        out: &mut Vec<Output>,
    ) {
        let anyone_home = self.people_home(h) > 0;
        let day_hours = (6 * HOUR..22 * HOUR + 30 * MINUTE).contains(&tod);
        let setpoint = if anyone_home && day_hours { 20.5 } else { 17.0 };
        let outdoor = sensors::outdoor_celsius(tod, self.weather.mean_celsius);
        let steam = kind == RoomKind::Bathroom && awake_here && tod < 10 * HOUR;
        let home = &mut self.homes[h];
        let drift = home.rng.gen_range(-1.0..1.0);
        let climate = &mut home.rooms[r].climate;
        climate.step(STEP_CLIMATE as f64, setpoint, outdoor, steam, drift);
        let (celsius, humidity) = (climate.celsius, climate.humidity);
        let Some(device) = self.layout.find(h, kind, "climate") else {
            return;
        };
        let state = &mut self.devices[device];
        let noise = state.rng.gen_range(-0.05..0.05);
        let celsius = ((celsius + noise) * 10.0).round() / 10.0;
        let humidity = humidity.round();
        if state
            .primary
            .as_mut()
            .is_some_and(|rep| rep.offer(t, celsius))
        {
            self.emit(device, Value::Temperature(celsius), None, out);
        }
        let state = &mut self.devices[device];
        if state
            .secondary
            .as_mut()
            .is_some_and(|rep| rep.offer(t, humidity))
        {
            self.emit(device, Value::Humidity(humidity), None, out);
        }
    }

    /// The illuminance in room `r` of home `h` at `tod`: daylight through
    /// the windows plus the room's lights.
    pub fn room_lux(&self, h: usize, r: usize, tod: SimTime) -> f64 {
        let spec = &self.layout.homes[h].rooms[r];
        let daylight = sensors::daylight(tod, self.weather.cloud) * spec.kind.daylight_factor();
        let lights: f64 = spec
            .devices
            .iter()
            .filter(|&&d| self.layout.devices[d].kind == DeviceKind::Light)
            .map(|&d| match self.devices[d].light {
                (true, brightness) => sensors::LIGHT_LUX * f64::from(brightness) / 100.0,
                (false, _) => 0.0,
            })
            .sum();
        daylight + lights
    }

    fn step_lux(
        &mut self,
        h: usize,
        r: usize,
        kind: RoomKind,
        tod: SimTime,
        t: SimTime,
        out: &mut Vec<Output>,
    ) {
        let Some(device) = self.layout.find(h, kind, "lux") else {
            return;
        };
        let lux = self.room_lux(h, r, tod);
        let state = &mut self.devices[device];
        let lux = (lux * state.rng.gen_range(0.97..1.03)).round();
        if state
            .primary
            .as_mut()
            .is_some_and(|rep| rep.offer(t, (1.0 + lux).ln()))
        {
            self.emit(device, Value::Illuminance(lux), None, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step_room_devices(
        &mut self,
        h: usize,
        r: usize,
        kind: RoomKind,
        awake_here: bool,
        tod: SimTime,
        t: SimTime,
        out: &mut Vec<Output>,
    ) {
        // Each home's heartbeats at its own second of the hour, as real
        // devices are not in step with each other.
        let phased = t + self.homes[h].phase;
        let anyone_home = self.people_home(h) > 0;
        let devices = self.layout.homes[h].rooms[r].devices.clone();
        for device in devices {
            let spec_kind = self.layout.devices[device].kind;
            let state = &mut self.devices[device];
            let mut value = None;
            match spec_kind {
                DeviceKind::Window => {
                    if state.active && state.active_until.is_some_and(|until| until <= t) {
                        state.active = false;
                        state.active_until = None;
                        value = Some(Value::Contact { open: false });
                    } else if !state.active
                        && awake_here
                        && state.rng.gen_bool(1.0 / (4.0 * HOUR as f64))
                    {
                        state.active = true;
                        state.active_until = Some(t + state.rng.gen_range(5 * MINUTE..40 * MINUTE));
                        value = Some(Value::Contact { open: true });
                    } else if phased % HOUR == 0 {
                        value = Some(Value::Contact { open: state.active });
                    }
                }
                DeviceKind::Door if phased % HOUR == 0 => {
                    value = Some(Value::Contact { open: state.active })
                }
                DeviceKind::Button => {
                    let per_hour = match kind {
                        RoomKind::Hall if anyone_home && (9 * HOUR..20 * HOUR).contains(&tod) => {
                            0.15
                        }
                        RoomKind::Living if awake_here => 0.5,
                        _ => 0.0,
                    };
                    if per_hour > 0.0 && state.rng.gen_bool(per_hour / HOUR as f64) {
                        let action =
                            ["single", "single", "double", "hold"][state.rng.gen_range(0..4)];
                        value = Some(Value::Button(action));
                    }
                }
                DeviceKind::Smoke | DeviceKind::Leak => {
                    let per_year = if spec_kind == DeviceKind::Smoke {
                        self.config.smoke_per_year
                    } else {
                        self.config.leaks_per_year
                    };
                    if state.active && state.active_until.is_some_and(|until| until <= t) {
                        state.active = false;
                        state.active_until = None;
                        value = Some(detection(spec_kind, false));
                    } else if !state.active
                        && per_year > 0.0
                        && state
                            .rng
                            .gen_bool((per_year / (365.0 * DAY as f64)).min(1.0))
                    {
                        state.active = true;
                        state.active_until = Some(t + state.rng.gen_range(10 * MINUTE..2 * HOUR));
                        value = Some(detection(spec_kind, true));
                    } else if phased % (6 * HOUR) == 0 {
                        value = Some(detection(spec_kind, state.active));
                    }
                }
                _ => {}
            }
            if phased % HOUR == 0 {
                if let Some(battery) = &mut state.battery {
                    battery.step(HOUR as f64);
                }
            }
            let battery = if phased % HOUR == 0 {
                state.battery.as_mut().and_then(Battery::report)
            } else {
                None
            };
            if let Some(value) = value {
                self.emit(device, value, None, out);
            }
            if let Some(percent) = battery {
                self.emit(device, Value::Battery(percent), None, out);
            }
        }
    }

    fn step_connectivity(&mut self, t: SimTime, out: &mut Vec<Output>) {
        for device in 0..self.devices.len() {
            let per_day = self.config.dropouts_per_day;
            let state = &mut self.devices[device];
            if let Some(back) = state.back_at {
                if back <= t {
                    state.back_at = None;
                    state.online = true;
                    out.push(Output::Connectivity {
                        device,
                        online: true,
                    });
                }
                continue;
            }
            if t % STEP_DROPOUT == 0
                && per_day > 0.0
                && state
                    .rng
                    .gen_bool((per_day * STEP_DROPOUT as f64 / DAY as f64).min(1.0))
            {
                state.online = false;
                state.back_at = Some(t + state.rng.gen_range(MINUTE..30 * MINUTE));
                out.push(Output::Connectivity {
                    device,
                    online: false,
                });
            }
        }
    }
}

fn door_reading(device: DeviceId, open: bool, mark: Option<Mark>) -> Output {
    Output::Reading {
        device,
        value: Value::Contact { open },
        mark,
    }
}

fn detection(kind: DeviceKind, detected: bool) -> Value {
    if kind == DeviceKind::Smoke {
        Value::Smoke(detected)
    } else {
        Value::WaterLeak(detected)
    }
}

impl DayPlan {
    /// Before the first plan: asleep.
    fn default_asleep() -> Self {
        let mut rng = rng::stream(0, 0);
        let habits = Habits::draw(&mut rng);
        plan_day(&habits, 0, DayKind::Normal, &mut rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layout::Convention;

    fn world(seed: u64, homes: usize, config: impl FnOnce(&mut WorldConfig)) -> World {
        let mut world_config = WorldConfig {
            seed,
            ..WorldConfig::default()
        };
        config(&mut world_config);
        World::new(
            Layout::new(homes, 2, |_| Convention::Native),
            world_config,
            0,
        )
    }

    fn run(world: &mut World, seconds: SimTime) -> Vec<(SimTime, Output)> {
        let mut all = Vec::new();
        let mut out = Vec::new();
        for _ in 0..seconds {
            let t = world.now();
            world.step(&mut out);
            all.extend(out.drain(..).map(|output| (t, output)));
        }
        all
    }

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_others() {
        let a = run(&mut world(42, 2, |_| {}), DAY);
        let b = run(&mut world(42, 2, |_| {}), DAY);
        let c = run(&mut world(43, 2, |_| {}), DAY);
        assert!(
            a.len() > 200,
            "a day of two homes says something: {}",
            a.len()
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn motion_happens_only_where_someone_is_awake_and_never_while_all_sleep() {
        let mut world = world(7, 3, |config| config.dropouts_per_day = 0.0);
        let mut out = Vec::new();
        let mut detections = 0;
        for _ in 0..(2 * DAY) {
            let t = world.now();
            world.step(&mut out);
            for output in out.drain(..) {
                let Output::Reading {
                    device,
                    value: Value::Motion(true),
                    ..
                } = output
                else {
                    continue;
                };
                detections += 1;
                let spec = &world.layout.devices[device];
                let room = world.layout.homes[spec.home].rooms[spec.room].kind;
                let there = world.homes[spec.home]
                    .people
                    .iter()
                    .any(|person| person.activity == Activity::In(room));
                assert!(
                    there,
                    "motion in {room:?} at {} with nobody awake there",
                    super::super::clock_text(t)
                );
                let tod = super::super::time_of_day(t);
                assert!(
                    !(3 * HOUR..5 * HOUR).contains(&tod),
                    "motion at {} while all sleep",
                    super::super::clock_text(t)
                );
            }
        }
        assert!(
            detections > 50,
            "two days of three homes have motion: {detections}"
        );
    }

    #[test]
    fn lux_follows_daylight_and_the_lights() {
        let mut world = world(3, 1, |config| config.dropouts_per_day = 0.0);
        let living = world.layout.homes[0].room_index(RoomKind::Living);
        let night = world.room_lux(0, living, 2 * HOUR);
        let noon = world.room_lux(0, living, 13 * HOUR);
        assert!(night < 1.0, "{night}");
        assert!(noon > 100.0, "{noon}");
        let lamp = world.layout.find(0, RoomKind::Living, "lamp").unwrap();
        world.feedback(Feedback::Light {
            device: lamp,
            on: true,
            brightness_pct: 100,
        });
        let lit = world.room_lux(0, living, 2 * HOUR);
        assert!((lit - sensors::LIGHT_LUX).abs() < 1.0, "{lit}");

        // And the lux sensor reports it: its readings at night are low, by day high.
        let mut world = self::world(3, 1, |config| config.dropouts_per_day = 0.0);
        let sensor = world.layout.find(0, RoomKind::Living, "lux").unwrap();
        let readings: Vec<(SimTime, f64)> = run(&mut world, DAY)
            .into_iter()
            .filter_map(|(t, output)| match output {
                Output::Reading {
                    device,
                    value: Value::Illuminance(lux),
                    ..
                } if device == sensor => Some((t, lux)),
                _ => None,
            })
            .collect();
        assert!(
            readings
                .iter()
                .filter(|(t, _)| *t < 4 * HOUR)
                .all(|(_, lux)| *lux < 1.0),
            "{readings:?}"
        );
        assert!(
            readings
                .iter()
                .any(|(t, lux)| (11 * HOUR..15 * HOUR).contains(t) && *lux > 100.0),
            "{readings:?}"
        );
    }

    #[test]
    fn the_last_one_out_arms_and_the_first_one_back_disarms() {
        let mut world = world(11, 1, |config| {
            config.days = DayKind::OutAllDay;
            config.dropouts_per_day = 0.0;
        });
        let keypad: Vec<(SimTime, KeypadAction)> = run(&mut world, DAY)
            .into_iter()
            .filter_map(|(t, output)| match output {
                Output::Keypad { action, .. } => Some((t, action)),
                _ => None,
            })
            .collect();
        assert_eq!(keypad.len(), 2, "{keypad:?}");
        assert_eq!(keypad[0].1, KeypadAction::ArmAway);
        assert_eq!(keypad[1].1, KeypadAction::Disarm);
        assert!(
            keypad[0].0 < 12 * HOUR && keypad[1].0 > 20 * HOUR,
            "{keypad:?}"
        );
    }

    #[test]
    fn coming_home_the_door_opens_before_the_hall_sees_anyone() {
        let mut world = world(11, 1, |config| {
            config.days = DayKind::OutAllDay;
            config.dropouts_per_day = 0.0;
        });
        let door = world.layout.find(0, RoomKind::Hall, "door").unwrap();
        let pir = world.layout.find(0, RoomKind::Hall, "pir").unwrap();
        let outputs = run(&mut world, DAY);
        let disarm = outputs
            .iter()
            .find(|(_, o)| {
                matches!(
                    o,
                    Output::Keypad {
                        action: KeypadAction::Disarm,
                        ..
                    }
                )
            })
            .map(|(t, _)| *t)
            .expect("they come home and disarm");
        let opened = outputs
            .iter()
            .rev()
            .filter(|(t, o)| *t <= disarm && matches!(o, Output::Reading { device, value: Value::Contact { open: true }, .. } if *device == door))
            .map(|(t, _)| *t)
            .next()
            .expect("the door opened before the disarm");
        let hall_motion = outputs
            .iter()
            .find(|(t, o)| *t >= opened && matches!(o, Output::Reading { device, value: Value::Motion(true), .. } if *device == pir))
            .map(|(t, _)| *t)
            .expect("the hall sees them");
        assert!(
            disarm < hall_motion,
            "disarmed at {disarm}, hall motion at {hall_motion}"
        );
        assert!(hall_motion >= opened + DOORWAY);
    }

    #[test]
    fn a_burglar_comes_once_the_alarm_is_armed_and_a_fire_at_its_time() {
        let mut world = world(5, 1, |config| {
            config.days = DayKind::OutAllDay;
            config.dropouts_per_day = 0.0;
            config.incidents = vec![
                Incident::Burglary {
                    home: 0,
                    not_before: 11 * HOUR,
                    give_up_after: 6 * HOUR,
                },
                Incident::Fire {
                    home: 0,
                    at: 23 * HOUR,
                },
            ];
        });
        run(&mut world, 12 * HOUR);
        assert!(
            !world.homes[0].burgled,
            "not before the keypad saw the alarm armed"
        );
        world.feedback(Feedback::AlarmState {
            home: 0,
            state: "armed_away".into(),
        });
        let marks: Vec<(SimTime, Mark)> = run(&mut world, 12 * HOUR)
            .into_iter()
            .filter_map(|(t, output)| match output {
                Output::Reading {
                    mark: Some(mark), ..
                } => Some((t, mark)),
                _ => None,
            })
            .collect();
        assert_eq!(
            marks,
            vec![(12 * HOUR, Mark::Intrusion), (23 * HOUR, Mark::Smoke)]
        );
    }

    #[test]
    fn an_alarm_left_armed_by_an_earlier_run_is_disarmed_first() {
        let mut world = world(11, 1, |config| config.days = DayKind::Holiday);
        world.feedback(Feedback::AlarmState {
            home: 0,
            state: "triggered".into(),
        });
        let keypad: Vec<KeypadAction> = run(&mut world, 10)
            .into_iter()
            .filter_map(|(_, output)| match output {
                Output::Keypad { action, .. } => Some(action),
                _ => None,
            })
            .collect();
        assert_eq!(keypad, vec![KeypadAction::Disarm, KeypadAction::ArmAway]);
    }

    #[test]
    fn devices_drop_off_and_come_back() {
        let mut world = world(9, 1, |config| config.dropouts_per_day = 2.0);
        let changes: Vec<(DeviceId, bool)> = run(&mut world, DAY)
            .into_iter()
            .filter_map(|(_, output)| match output {
                Output::Connectivity { device, online } => Some((device, online)),
                _ => None,
            })
            .collect();
        assert!(changes.len() > 10, "{changes:?}");
        for device in 0..world.layout.devices.len() {
            let mine: Vec<bool> = changes
                .iter()
                .filter(|(d, _)| *d == device)
                .map(|(_, o)| *o)
                .collect();
            for pair in mine.windows(2) {
                assert_ne!(pair[0], pair[1], "offline and online alternate");
            }
        }
    }
}
