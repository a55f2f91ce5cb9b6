//! The simulated world, without any I/O: homes made of rooms and devices,
//! people following daily routines, and the physics the sensors read
//! (daylight, heat, humidity, batteries). [`world::World`] steps it one
//! simulated second at a time and says what each device reports.
//!
//! Everything random comes from one seed, split into independent streams
//! per home, person and device ([`rng`]), so a seed reproduces a run (as long
//! as the feedback from hearth — light commands, the alarm state — is the
//! same).

pub mod layout;
pub mod rng;
pub mod routine;
pub mod sensors;
pub mod world;

pub use layout::{DeviceId, DeviceKind, DeviceSpec, HomeSpec, Layout, RoomKind};

/// Simulated time: seconds since midnight of day 0 (a Monday).
pub type SimTime = u64;

pub const MINUTE: SimTime = 60;
pub const HOUR: SimTime = 3600;
pub const DAY: SimTime = 86_400;

/// The time of day of `t`, in seconds since midnight.
pub fn time_of_day(t: SimTime) -> SimTime {
    t % DAY
}

/// `HH:MM` of `t`, for logs and reports.
pub fn clock_text(t: SimTime) -> String {
    let tod = time_of_day(t);
    format!(
        "day {} {:02}:{:02}",
        t / DAY,
        tod / HOUR,
        (tod % HOUR) / MINUTE
    )
}

/// What a device reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Motion(bool),
    Contact { open: bool },
    Temperature(f64),
    Humidity(f64),
    Illuminance(f64),
    Smoke(bool),
    WaterLeak(bool),
    Battery(u8),
    Button(&'static str),
    Light { on: bool, brightness_pct: u8 },
    Availability(bool),
}

impl Value {
    /// The event kind the gateway stores it as.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Motion(_) => "motion",
            Value::Contact { .. } => "contact",
            Value::Temperature(_) => "temperature",
            Value::Humidity(_) => "humidity",
            Value::Illuminance(_) => "illuminance",
            Value::Smoke(_) => "smoke",
            Value::WaterLeak(_) => "water_leak",
            Value::Battery(_) => "battery",
            Value::Button(_) => "button",
            Value::Light { .. } => "light",
            Value::Availability(_) => "availability",
        }
    }
}

/// Why a reading matters to `--check`: the moment it is published is the
/// start of a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// An intruder opened an entry door of an armed home.
    Intrusion,
    /// A smoke detector went off.
    Smoke,
}

/// What a person does at the keypad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeypadAction {
    ArmAway,
    Disarm,
}

/// What the world asks of the devices in one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// `device` publishes `value`.
    Reading {
        device: DeviceId,
        value: Value,
        mark: Option<Mark>,
    },
    /// The keypad of `home` sends `action` with the household's code.
    Keypad { home: usize, action: KeypadAction },
    /// `device` loses its connection without a goodbye (its last will is
    /// published) or comes back.
    Connectivity { device: DeviceId, online: bool },
}

/// What comes back from hearth into the world.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// A light obeyed a command.
    Light {
        device: DeviceId,
        on: bool,
        brightness_pct: u8,
    },
    /// The keypad of `home` saw the alarm state (Home Assistant's names).
    AlarmState { home: usize, state: String },
}
