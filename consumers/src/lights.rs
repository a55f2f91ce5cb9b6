//! Motion lighting, room by room (`hearth-lights`).
//!
//! - Motion in a room of the homes file turns its lights on when the room
//!   is dark: its last illuminance reading below `lux_below`, or none yet.
//!   Lux only gates turning on: the room's own lights raise the reading, so
//!   brightness never turns a light off.
//! - Each motion event (detected or clear) sets the room's off time to
//!   `off_after` from then; when it comes, the room's lights go off, unless
//!   a sensor of the room still reports occupancy (presence sensors do not
//!   resend "on" while someone is there): then the lights stay on until it
//!   clears, or `occupied_max` after its last report for sensors that
//!   never clear.
//! - In a home's night hours (`night = "22:00-06:30"`, its `timezone`)
//!   every room counts as dark, and motion turns lights on at the room's
//!   `night_brightness`.
//! - When the alarm of a home triggers (an `alarm_state` event of the
//!   security rule), every light of the home not already on goes on at full
//!   brightness, whatever the lux, the hour or a manual override, and stays
//!   on (no off time).
//! - A command is sent only when it changes something: the rule follows
//!   each light's reported state (`light` events).
//! - A light reported in a state the rule did not ask for was switched by
//!   hand: the rule leaves that room alone for `override_for` (no on, no
//!   off), then takes over again at the next motion.
//! - The state of every room (last lux, lights, off time, the motion event
//!   that set it) is kept in memory and in the KV bucket `hearth_lights`
//!   (a lux reading is written only when it turns the room dark or bright,
//!   so chatty sensors cost no write), so a restarted
//!   rule resumes where it was, and an off time that came while it was down
//!   fires at once on restart.
//! - Commands are issued idempotently (see `commands`): the same event, or
//!   the same off time, never commands twice.
//! - Events come in batches (what is ready, see `runtime::run_batches`):
//!   their commands are in flight together and each room is written once,
//!   so a burst (or a slow moment of the server) drains in a few round
//!   trips rather than two per event.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use hearth_proto::v1::{self, command, event::Body};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::{millis, Clock};
use crate::commands::{Commands, Target};
use crate::events::Cause;
use crate::homes::Homes;
use crate::runtime::{HandlerError, Received, Spec};
use crate::state;

/// The rule's consumer name and its state bucket.
pub const CONSUMER: &str = "hearth-lights";
pub const BUCKET: &str = "hearth_lights";
/// How often due off times are looked for.
const TICK: Duration = Duration::from_millis(250);

/// What the rule keeps of a room.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoomState {
    /// The last illuminance reported in the room.
    pub lux: Option<f64>,
    /// Each light's last known state.
    pub lights: BTreeMap<String, bool>,
    /// When the lights go off, in milliseconds since the epoch.
    pub off_at: Option<u64>,
    /// The motion event that set the off time: the cause of the off command.
    pub cause: Option<Cause>,
    /// What the rule last asked of each light.
    #[serde(default)]
    pub commanded: BTreeMap<String, bool>,
    /// Until when (ms since the epoch) the rule leaves the room alone, after
    /// someone switched a light by hand.
    #[serde(default)]
    pub manual_until: Option<u64>,
    /// The motion sensors reporting occupancy now, and since when (ms since
    /// the epoch) they last said so.
    #[serde(default)]
    pub occupied: BTreeMap<String, u64>,
}

/// What a batch of events asks of NATS, and what to put back if it fails.
#[derive(Debug, Default)]
struct Work {
    /// In the order the events asked for them.
    commands: Vec<Planned>,
    /// The rooms to write.
    saves: BTreeSet<String>,
    /// Every room changed in memory, as it was before the batch.
    touched: BTreeMap<String, Option<RoomState>>,
    /// The events that changed a room.
    places: BTreeSet<usize>,
}

impl Work {
    /// Notes that event `place` changes room `key` (before it does).
    fn touch(&mut self, rooms: &BTreeMap<String, RoomState>, key: &str, place: usize) {
        self.touched
            .entry(key.to_owned())
            .or_insert_with(|| rooms.get(key).cloned());
        self.places.insert(place);
    }
}

/// A light command of a batch, caused by its event `place`.
#[derive(Debug)]
struct Planned {
    place: usize,
    room: String,
    light: String,
    set: v1::LightSet,
    action: String,
}

/// The consumer of this rule.
pub fn spec() -> Spec {
    Spec::new(
        CONSUMER,
        "hearth lights: motion lighting per room (on when dark, off after the room's delay)",
        "hearth.evt.>",
    )
}

/// The rule: the homes file, the state bucket, and a way to command lights.
#[derive(Debug, Clone)]
pub struct Lights {
    homes: Arc<Homes>,
    clock: Clock,
    state: kv::Store,
    commands: Commands,
    /// Every room's state by room key, read from the bucket once, at
    /// start, and written through to it on every change that matters.
    /// Event handling and the off timer take turns on it.
    rooms: Arc<Mutex<BTreeMap<String, RoomState>>>,
}

impl Lights {
    /// Opens (or creates) the state bucket.
    pub async fn open(
        js: &jetstream::Context,
        homes: impl Into<Arc<Homes>>,
        commands: Commands,
    ) -> Result<Self, async_nats::Error> {
        let homes: Arc<Homes> = homes.into();
        let state = state::open_bucket(
            js,
            BUCKET,
            "hearth lights: each room's last lux, lights and off time (the lights rule's state)",
        )
        .await?;
        // Every room as the rule last left it, off times pending included.
        let mut rooms = BTreeMap::new();
        let mut keys = state.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            // Rooms of another partition's homes are its process's.
            let owned = state::split_key(&key)
                .and_then(|names| names.into_iter().next())
                .is_none_or(|home| homes.owns(&home));
            if !owned {
                continue;
            }
            if let Some(entry) = state.get(&key).await? {
                match serde_json::from_slice::<RoomState>(&entry) {
                    Ok(room) => {
                        rooms.insert(key, room);
                    }
                    Err(error) => warn!(key, %error, "unreadable room state; starting afresh"),
                }
            }
        }
        let pending = rooms.values().filter(|room| room.off_at.is_some()).count();
        info!(
            rooms = rooms.len(),
            pending_off_times = pending,
            "lights state loaded"
        );
        Ok(Self {
            homes,
            clock: Clock::system(),
            state,
            commands,
            rooms: Arc::new(Mutex::new(rooms)),
        })
    }

    /// The rule on `clock` rather than the system clock (tests move it).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Handles one event (see [`Lights::handle_batch`]).
    pub async fn handle(&self, received: Received) -> Result<(), HandlerError> {
        self.handle_batch(vec![received])
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Handles events in order: works out each one's effect on its room in
    /// memory, then issues the batch's commands (all in flight at once, in
    /// order), then writes each room changed once. A command or a write
    /// that fails puts every room the batch touched back as it was, and
    /// the events that touched one are tried again (the commands issued
    /// meanwhile are not issued twice: same cause, same dedup id).
    pub async fn handle_batch(&self, events: Vec<Received>) -> Vec<Result<(), HandlerError>> {
        let mut outcomes: Vec<Result<(), HandlerError>> = events.iter().map(|_| Ok(())).collect();
        let mut rooms = self.rooms.lock().await;
        let mut work = Work::default();
        for (place, received) in events.iter().enumerate() {
            self.plan(&mut rooms, place, &received.event, &mut work);
        }
        if let Err(error) = self.carry_out(&rooms, &events, &work).await {
            for (key, before) in work.touched {
                match before {
                    Some(state) => rooms.insert(key, state),
                    None => rooms.remove(&key),
                };
            }
            for place in work.places {
                outcomes[place] = Err(HandlerError::Retry(error.clone()));
            }
        }
        outcomes
    }

    /// The effect of event `place` on the rooms, in memory, and the
    /// commands and writes it needs, in `work`.
    fn plan(
        &self,
        rooms: &mut BTreeMap<String, RoomState>,
        place: usize,
        event: &v1::Event,
        work: &mut Work,
    ) {
        let Some(body) = &event.body else {
            return;
        };
        if let Body::AlarmState(alarm) = body {
            if alarm.state() == v1::AlarmStatus::Triggered {
                self.plan_alarm_triggered(rooms, place, event, work);
            }
            return;
        }
        let Some(room) = self.homes.room(&event.home, &event.room) else {
            return;
        };
        let key = key(&event.home, &event.room);
        let mut state = rooms.get(&key).cloned().unwrap_or_default();
        let before = state.clone();
        let now = self.clock.now_ms();
        match body {
            Body::Illuminance(reading) => {
                let dark = |lux: Option<f64>| lux.is_none_or(|lux| lux < room.lux_below);
                let flips = dark(state.lux) != dark(Some(reading.lux));
                state.lux = Some(reading.lux);
                if !flips {
                    // Kept in memory only: what the bucket holds still
                    // says dark or bright rightly, and a sensor reporting
                    // every few seconds costs no write.
                    work.touch(rooms, &key, place);
                    rooms.insert(key, state);
                    return;
                }
            }
            Body::Light(light) if room.lights.contains(&event.device) => {
                state.lights.insert(event.device.clone(), light.on);
                // A state the rule did not ask for: switched by hand.
                if state.commanded.get(&event.device).copied().unwrap_or(false) != light.on {
                    info!(light = %event.device, on = light.on, "switched by hand: the room is left alone for a while");
                    state.manual_until = Some(now + millis(room.override_for));
                    state.off_at = None;
                }
            }
            Body::Motion(_) if state.manual_until.is_some_and(|until| until > now) => {
                debug!("the room is under manual control; motion ignored");
                return;
            }
            Body::Motion(motion) => {
                state.manual_until = None;
                let night = self.homes.is_night(&event.home, now);
                let dark = night || state.lux.is_none_or(|lux| lux < room.lux_below);
                let brightness = if night { room.night_brightness } else { None };
                if motion.detected && dark {
                    for light in &room.lights {
                        if state.lights.get(light) == Some(&true) {
                            continue;
                        }
                        work.commands.push(Planned {
                            place,
                            room: event.room.clone(),
                            light: light.clone(),
                            set: switch(true, brightness),
                            action: format!("on-{light}"),
                        });
                        state.lights.insert(light.clone(), true);
                        state.commanded.insert(light.clone(), true);
                    }
                }
                if motion.detected {
                    state.occupied.insert(event.device.clone(), now);
                } else {
                    state.occupied.remove(&event.device);
                }
                // Any motion, detected or clear, starts the room's delay
                // again.
                state.off_at = Some(now + millis(room.off_after));
                state.cause = Some(Cause::of(event));
            }
            _ => return,
        }
        if state != before {
            work.touch(rooms, &key, place);
            work.saves.insert(key.clone());
            rooms.insert(key, state);
        }
    }

    /// Every light of the home on, whatever the lux, hour or override,
    /// and left on (no off time).
    fn plan_alarm_triggered(
        &self,
        rooms: &mut BTreeMap<String, RoomState>,
        place: usize,
        event: &v1::Event,
        work: &mut Work,
    ) {
        let Some(home) = self.homes.homes.get(&event.home) else {
            return;
        };
        for (room, config) in &home.rooms {
            if config.lights.is_empty() {
                continue;
            }
            let key = key(&event.home, room);
            work.touch(rooms, &key, place);
            let mut state = rooms.get(&key).cloned().unwrap_or_default();
            // Lit until someone switches them off.
            state.off_at = None;
            for light in &config.lights {
                if state.lights.get(light) == Some(&true) {
                    continue;
                }
                work.commands.push(Planned {
                    place,
                    room: room.clone(),
                    light: light.clone(),
                    set: switch(true, Some(100)),
                    action: format!("alarm-on-{room}-{light}"),
                });
                state.lights.insert(light.clone(), true);
                state.commanded.insert(light.clone(), true);
            }
            work.saves.insert(key.clone());
            rooms.insert(key, state);
        }
        info!(home = %event.home, "the alarm triggered: every light on");
    }

    /// Issues `work`'s commands, then writes its rooms: commands first, so
    /// that a room is never stored as commanded when its command is not.
    async fn carry_out(
        &self,
        rooms: &BTreeMap<String, RoomState>,
        events: &[Received],
        work: &Work,
    ) -> Result<(), String> {
        // Sent in order on the one connection: a light's on and off in the
        // same batch reach it in that order.
        let issued = work.commands.iter().map(|planned| {
            let cause = &events[planned.place].event;
            let target = Target {
                home: &cause.home,
                room: &planned.room,
                device: &planned.light,
            };
            self.command(cause, target, planned.set, &planned.action)
        });
        for outcome in futures::future::join_all(issued).await {
            outcome.map_err(|error| error.to_string())?;
        }
        let saved = work
            .saves
            .iter()
            .filter_map(|key| Some(self.save(key, rooms.get(key)?)));
        for outcome in futures::future::join_all(saved).await {
            outcome.map_err(|error| error.to_string())?;
        }
        Ok(())
    }

    /// Turns off the lights of every room whose off time came, until
    /// `shutdown`; at start, first those that came while the rule was down.
    pub async fn run_timers(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.fire_due().await {
                warn!(%error, "checking the lights' off times failed; trying again");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn fire_due(&self) -> Result<(), HandlerError> {
        let now = self.clock.now_ms();
        let due: Vec<String> = self
            .rooms
            .lock()
            .await
            .iter()
            .filter(|(_, room)| room.off_at.is_some_and(|at| at <= now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            // One room at a time: events for other rooms are not held up
            // behind every due room's commands.
            let mut rooms = self.rooms.lock().await;
            let mut state = rooms.get(&key).cloned().unwrap_or_default();
            let (Some(off_at), Some((home, room))) = (state.off_at, split_key(&key)) else {
                continue;
            };
            // Motion may have moved the off time since the rooms were
            // looked at.
            if off_at > now {
                continue;
            }
            // Someone is still there: look again a delay later.
            let room_config = self.homes.room(&home, &room);
            let still_occupied = room_config.and_then(|config| {
                let latest = state.occupied.values().copied().max()?;
                let hold_until = latest.saturating_add(millis(config.occupied_max));
                (hold_until > now).then(|| (now + millis(config.off_after)).min(hold_until))
            });
            if let Some(look_again) = still_occupied {
                debug!(home, room, "the room is still occupied: the lights stay on");
                state.off_at = Some(look_again);
                self.save(&key, &state).await?;
                rooms.insert(key, state);
                continue;
            }
            let event = state.cause.clone().unwrap_or_default().as_event();
            let on: Vec<String> = state
                .lights
                .iter()
                .filter(|(_, on)| **on)
                .map(|(light, _)| light.clone())
                .collect();
            for light in on {
                // Per off time: the same timer never commands twice.
                let action = format!("off-{light}-{off_at}");
                let target = Target {
                    home: &home,
                    room: &room,
                    device: &light,
                };
                self.command(&event, target, switch(false, None), &action)
                    .await?;
                state.lights.insert(light.clone(), false);
                state.commanded.insert(light, false);
            }
            state.off_at = None;
            state.occupied.clear();
            self.save(&key, &state).await?;
            rooms.insert(key, state);
            info!(home, room, "no motion for the room's delay: lights off");
        }
        Ok(())
    }

    async fn command(
        &self,
        cause: &v1::Event,
        target: Target<'_>,
        set: v1::LightSet,
        action: &str,
    ) -> Result<(), HandlerError> {
        let (on, brightness) = (set.on, set.brightness_pct);
        let body = command::Body::LightSet(set);
        let issued = self
            .commands
            .issue(cause, target, action, body)
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        debug!(
            home = target.home,
            room = target.room,
            light = target.device,
            on,
            ?brightness,
            ?issued,
            "light command"
        );
        Ok(())
    }

    async fn save(&self, key: &str, state: &RoomState) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(state).map_err(|e| HandlerError::Poison(e.to_string()))?;
        self.state
            .put(key, bytes.into())
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        Ok(())
    }
}

fn switch(on: bool, brightness_pct: Option<u32>) -> v1::LightSet {
    v1::LightSet { on, brightness_pct }
}

/// The KV key of a room: `<home>.<room>` (see [`state::key`]).
pub fn key(home: &str, room: &str) -> String {
    state::key(&[home, room])
}

fn split_key(key: &str) -> Option<(String, String)> {
    match <[String; 2]>::try_from(state::split_key(key)?) {
        Ok([home, room]) => Some((home, room)),
        Err(_) => None,
    }
}
