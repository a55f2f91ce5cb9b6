//! Homes, rooms and devices: every home of a run has the same five rooms
//! (a typical flat), each with the devices such a room has.

use serde::Serialize;

/// An index into [`Layout::devices`].
pub type DeviceId = usize;

/// How a home's devices speak MQTT (the gateway's conventions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// `hearth/<home>/<room>/<device>/<kind>`, one small JSON object each.
    Native,
    /// `zigbee2mqtt/<Room>/<device>`, Zigbee2MQTT's objects.
    Zigbee2mqtt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomKind {
    Hall,
    Kitchen,
    Living,
    Bedroom,
    Bathroom,
}

impl RoomKind {
    pub const ALL: [RoomKind; 5] = [
        RoomKind::Hall,
        RoomKind::Kitchen,
        RoomKind::Living,
        RoomKind::Bedroom,
        RoomKind::Bathroom,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RoomKind::Hall => "hall",
            RoomKind::Kitchen => "kitchen",
            RoomKind::Living => "living",
            RoomKind::Bedroom => "bedroom",
            RoomKind::Bathroom => "bathroom",
        }
    }

    /// How much of the daylight outside reaches the room (windows, aspect).
    pub fn daylight_factor(self) -> f64 {
        match self {
            RoomKind::Hall => 0.004,
            RoomKind::Kitchen => 0.015,
            RoomKind::Living => 0.02,
            RoomKind::Bedroom => 0.012,
            RoomKind::Bathroom => 0.006,
        }
    }

    /// The devices the room has: (name, kind).
    fn devices(self) -> &'static [(&'static str, DeviceKind)] {
        use DeviceKind::*;
        match self {
            RoomKind::Hall => &[
                ("door", Door),
                ("pir", Pir),
                ("ceiling", Light),
                ("siren", Siren),
                ("doorbell", Button),
                ("keypad", Keypad),
            ],
            RoomKind::Kitchen => &[
                ("pir", Pir),
                ("window", Window),
                ("spots", Light),
                ("climate", Climate),
                ("lux", Lux),
                ("smoke", Smoke),
                ("leak", Leak),
            ],
            RoomKind::Living => &[
                ("pir", Pir),
                ("window", Window),
                ("lamp", Light),
                ("climate", Climate),
                ("lux", Lux),
                ("remote", Button),
            ],
            RoomKind::Bedroom => &[
                ("pir", Pir),
                ("window", Window),
                ("lamp", Light),
                ("climate", Climate),
            ],
            RoomKind::Bathroom => &[
                ("pir", Pir),
                ("ceiling", Light),
                ("climate", Climate),
                ("leak", Leak),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Pir,
    Door,
    Window,
    Light,
    Siren,
    Button,
    Keypad,
    Climate,
    Lux,
    Smoke,
    Leak,
}

impl DeviceKind {
    /// Runs on a battery (and reports its level).
    pub fn battery_powered(self) -> bool {
        !matches!(
            self,
            DeviceKind::Light | DeviceKind::Siren | DeviceKind::Keypad
        )
    }

    /// Listens for commands from hearth.
    pub fn takes_commands(self) -> bool {
        matches!(self, DeviceKind::Light | DeviceKind::Siren)
    }
}

#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub home: usize,
    pub room: usize,
    pub name: &'static str,
    pub kind: DeviceKind,
}

#[derive(Debug, Clone)]
pub struct RoomSpec {
    pub kind: RoomKind,
    pub devices: Vec<DeviceId>,
}

#[derive(Debug, Clone)]
pub struct HomeSpec {
    pub name: String,
    pub convention: Convention,
    pub people: usize,
    pub rooms: Vec<RoomSpec>,
}

impl HomeSpec {
    pub fn room_index(&self, kind: RoomKind) -> usize {
        self.rooms
            .iter()
            .position(|room| room.kind == kind)
            .expect("every home has every room kind")
    }
}

/// Every home and device of a run.
#[derive(Debug, Clone)]
pub struct Layout {
    pub homes: Vec<HomeSpec>,
    pub devices: Vec<DeviceSpec>,
}

impl Layout {
    /// `homes` homes of `people` people each. The first is named `home` (the
    /// gateway's default home for Zigbee2MQTT and its own events), the
    /// others `home-2`, `home-3`, ...; `convention` gives each home's.
    pub fn new(homes: usize, people: usize, convention: impl Fn(usize) -> Convention) -> Self {
        let mut layout = Layout {
            homes: Vec::with_capacity(homes),
            devices: Vec::new(),
        };
        for home in 0..homes {
            let name = if home == 0 {
                "home".to_owned()
            } else {
                format!("home-{}", home + 1)
            };
            let mut rooms = Vec::new();
            for (room, kind) in RoomKind::ALL.into_iter().enumerate() {
                let mut devices = Vec::new();
                for &(name, device_kind) in kind.devices() {
                    devices.push(layout.devices.len());
                    layout.devices.push(DeviceSpec {
                        home,
                        room,
                        name,
                        kind: device_kind,
                    });
                }
                rooms.push(RoomSpec { kind, devices });
            }
            layout.homes.push(HomeSpec {
                name,
                convention: convention(home),
                people,
                rooms,
            });
        }
        layout
    }

    /// The room's name of a device.
    pub fn room_name(&self, device: DeviceId) -> &'static str {
        let spec = &self.devices[device];
        self.homes[spec.home].rooms[spec.room].kind.name()
    }

    /// The device of `kind` named `name` in room `room` of `home`.
    pub fn find(&self, home: usize, room: RoomKind, name: &str) -> Option<DeviceId> {
        let home_spec = &self.homes[home];
        home_spec.rooms[home_spec.room_index(room)]
            .devices
            .iter()
            .copied()
            .find(|&device| self.devices[device].name == name)
    }

    /// Devices per home.
    pub fn devices_per_home() -> usize {
        RoomKind::ALL.iter().map(|room| room.devices().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_get_every_room_and_unique_device_names_per_room() {
        let layout = Layout::new(3, 2, |_| Convention::Native);
        assert_eq!(layout.homes.len(), 3);
        assert_eq!(layout.homes[0].name, "home");
        assert_eq!(layout.homes[2].name, "home-3");
        assert_eq!(layout.devices.len(), 3 * Layout::devices_per_home());
        for home in &layout.homes {
            for room in &home.rooms {
                let mut names: Vec<_> = room
                    .devices
                    .iter()
                    .map(|&d| layout.devices[d].name)
                    .collect();
                names.sort_unstable();
                names.dedup();
                assert_eq!(names.len(), room.devices.len(), "{:?}", room.kind);
            }
        }
        let door = layout.find(1, RoomKind::Hall, "door").unwrap();
        assert_eq!(layout.devices[door].kind, DeviceKind::Door);
        assert_eq!(layout.devices[door].home, 1);
    }
}
