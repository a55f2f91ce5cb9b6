//! The alarm (`hearth-security`): a state machine per home ([`machine`]),
//! configured in the homes file ([`config`]), driven by the home's sensors
//! (events in `HEARTH_EVENTS`), by people at a panel (arm/disarm requests
//! over MQTT and NATS, [`panel`]) and by its own delays.
//!
//! - Every state change is stored as an `alarm_state` event (room `_home`,
//!   device `alarm`), so the alarm's history, and its state, read back from
//!   the log; zones bypassed, wrong codes and lockouts as `alarm_notice`
//!   events; triggering switches the home's sirens on (`siren_set`
//!   commands) and stores a critical `notification` request, which the
//!   notify rule delivers.
//! - The state of each home is kept in the KV bucket `hearth_security`, so
//!   a restarted rule resumes where it was; a delay that ended while it was
//!   down takes effect when it is back, counted from when it ended.
//! - Idempotent: each effect is stored with a dedup id made of what caused
//!   it (the event id, the request id, or the deadline), so handling the
//!   same event again after a crash stores and commands nothing new.
//! - The current state is also published for keypads and dashboards on the
//!   retained MQTT topic `<prefix>/<home>/alarm/state` (Home Assistant's
//!   state names: `disarmed`, `arming`, `armed_away`, `pending`, ...).

pub mod config;
pub mod machine;
pub mod panel;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use hearth_proto::v1::{self, command, event::Body};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::{self, Clock};
use crate::commands::{Commands, Target};
use crate::events::{Cause, Events, Place, HOME_ROOM};
use crate::homes::Homes;
use crate::runtime::{HandlerError, Received, Spec};
use crate::state;
use config::{split_zone, Mode};
use machine::{Alarm, Effect, Severity, Status};

/// The rule's consumer name and its state bucket.
pub const CONSUMER: &str = "hearth-security";
pub const BUCKET: &str = "hearth_security";
/// The device of the alarm's own events.
pub const ALARM_DEVICE: &str = "alarm";
/// How often due delays are looked for.
const TICK: Duration = Duration::from_millis(250);

/// The consumer of this rule.
pub fn spec() -> Spec {
    Spec::new(
        CONSUMER,
        "hearth security: the alarm of each home (zones, entry and exit delays, sirens)",
        "hearth.evt.>",
    )
}

/// What the rule keeps of a home (the KV value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    alarm: Alarm,
    /// What led to the current phase: carried by what its delay causes.
    #[serde(default)]
    cause: Cause,
}

/// The rule.
#[derive(Debug, Clone)]
pub struct Security {
    homes: Arc<Homes>,
    state: kv::Store,
    events: Events,
    commands: Commands,
    clock: Clock,
    client: async_nats::Client,
    mqtt_prefix: String,
    /// Every configured home's alarm, loaded at start; the bucket is
    /// written on every change. Events, requests and delays take turns.
    alarms: Arc<Mutex<BTreeMap<String, Stored>>>,
}

impl Security {
    /// Opens (or creates) the state bucket and loads every home's alarm.
    /// `mqtt_prefix` is the gateway's native topic prefix (`hearth`).
    pub async fn open(
        js: &jetstream::Context,
        client: async_nats::Client,
        homes: Arc<Homes>,
        events: Events,
        commands: Commands,
        clock: Clock,
        mqtt_prefix: &str,
    ) -> Result<Self, async_nats::Error> {
        let state = state::open_bucket(
            js,
            BUCKET,
            "hearth security: the alarm state of each home (the security rule's state)",
        )
        .await?;
        let mut alarms = BTreeMap::new();
        for (home, config) in &homes.homes {
            if config.security.is_none() {
                continue;
            }
            let stored = match state.get(state::key(&[home])).await? {
                Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                    warn!(home, %error, "unreadable alarm state; starting disarmed");
                    Stored::default()
                }),
                None => Stored::default(),
            };
            info!(home, state = stored.alarm.status().as_str(), "alarm loaded");
            alarms.insert(home.clone(), stored);
        }
        let security = Self {
            homes,
            state,
            events,
            commands,
            clock,
            client,
            mqtt_prefix: mqtt_prefix.to_owned(),
            alarms: Arc::new(Mutex::new(alarms)),
        };
        // Keypads learn the state at once (retained).
        let alarms = security.alarms.lock().await;
        for (home, stored) in alarms.iter() {
            security.publish_state(home, &stored.alarm).await;
        }
        drop(alarms);
        Ok(security)
    }

    /// Handles one event: a guarded sensor opening or closing.
    pub async fn handle(&self, received: Received) -> Result<(), HandlerError> {
        let event = &received.event;
        let Some(open) = event.body.as_ref().and_then(sensor_open) else {
            return Ok(());
        };
        let Some(config) = self.config(&event.home) else {
            return Ok(());
        };
        let zone = format!("{}/{}", event.room, event.device);
        let mut alarms = self.alarms.lock().await;
        let Some(stored) = alarms.get_mut(&event.home) else {
            return Ok(());
        };
        let mut next = stored.clone();
        let effects = next.alarm.sensor(config, &zone, open, self.clock.now_ms());
        if !effects.is_empty() {
            next.cause = Cause::of(event);
        }
        if next == *stored {
            return Ok(());
        }
        let cause = next.cause.clone();
        self.apply(&event.home, &cause, &event.id, &next.alarm, effects)
            .await?;
        self.save(&event.home, &next).await?;
        *stored = next;
        Ok(())
    }

    /// Ends every delay that is over, until `shutdown`; at start, first
    /// those that ended while the rule was down.
    pub async fn run_timers(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.fire_due().await {
                warn!(%error, "checking the alarm delays failed; trying again");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn fire_due(&self) -> Result<(), HandlerError> {
        let now = self.clock.now_ms();
        let mut alarms = self.alarms.lock().await;
        for (home, stored) in alarms.iter_mut() {
            if stored.alarm.next_deadline().is_none_or(|at| at > now) {
                continue;
            }
            let Some(config) = self.config(home) else {
                continue;
            };
            let mut next = stored.clone();
            let effects = next.alarm.tick(config, now);
            let cause = next.cause.clone();
            // Named after what started the phase and the phase, not after
            // the deadline: the same delay ending again (after a crash) has
            // the same name, even if the deadline was computed anew.
            let base = format!(
                "{}-{}-end-{}",
                home,
                cause.event_id_or_correlation(),
                stored.alarm.status().as_str()
            );
            self.apply(home, &cause, &base, &next.alarm, effects)
                .await?;
            self.save(home, &next).await?;
            *stored = next;
        }
        Ok(())
    }

    /// A request at the panel; the answer for the person.
    pub async fn request(&self, request: panel::Request) -> panel::Reply {
        let Some(config) = self.config(&request.home) else {
            return panel::Reply::error(format!("no alarm configured for home {:?}", request.home));
        };
        let Some(action) = request.action else {
            let alarms = self.alarms.lock().await;
            return match alarms.get(&request.home) {
                Some(stored) => panel::Reply::state(&stored.alarm, Ok(())),
                None => panel::Reply::error("no alarm state".to_owned()),
            };
        };
        // Argon2 is slow on purpose: checked off the async threads, before
        // taking the lock.
        let user = match request.code.clone() {
            Some(code) => {
                let codes = config.codes.clone();
                tokio::task::spawn_blocking(move || panel::whose_code(&codes, &code))
                    .await
                    .unwrap_or(None)
            }
            None => None,
        };
        let mut alarms = self.alarms.lock().await;
        let Some(stored) = alarms.get_mut(&request.home) else {
            return panel::Reply::error("no alarm state".to_owned());
        };
        let mut next = stored.clone();
        let answer = next.alarm.request(
            config,
            action,
            request.code.as_deref(),
            self.clock.now_ms(),
            |_| user.clone(),
        );
        if next == *stored && answer.effects.is_empty() {
            return panel::Reply::state(&next.alarm, answer.result);
        }
        let cause = Cause::fresh();
        if answer
            .effects
            .iter()
            .any(|e| matches!(e, Effect::State { .. }))
        {
            next.cause = cause.clone();
        }
        let stored_ok = match self
            .apply(
                &request.home,
                &cause,
                &cause.correlation_id,
                &next.alarm,
                answer.effects,
            )
            .await
        {
            Ok(()) => self.save(&request.home, &next).await,
            Err(error) => Err(error),
        };
        if let Err(error) = stored_ok {
            return panel::Reply::error(format!(
                "could not store the change, nothing done: {error}"
            ));
        }
        *stored = next;
        panel::Reply::state(&stored.alarm, answer.result)
    }

    /// Stores and sends what a step of the machine asked for, each effect
    /// once per `base` (what caused the step).
    async fn apply(
        &self,
        home: &str,
        cause: &Cause,
        base: &str,
        alarm: &Alarm,
        effects: Vec<Effect>,
    ) -> Result<(), HandlerError> {
        let retry = |e: &dyn std::fmt::Display| HandlerError::Retry(e.to_string());
        let alarm_place = Place {
            home,
            room: HOME_ROOM,
            device: ALARM_DEVICE,
        };
        let mut state_changed = false;
        for (i, effect) in effects.into_iter().enumerate() {
            let dedup = format!("{base}-{i}");
            match effect {
                Effect::State {
                    previous,
                    status,
                    mode,
                    until,
                    bypassed,
                    reason,
                    zone,
                    user,
                } => {
                    info!(home, from = previous.as_str(), to = status.as_str(), %reason, "alarm");
                    let body = Body::AlarmState(v1::AlarmState {
                        state: proto_status(status).into(),
                        previous: proto_status(previous).into(),
                        mode: mode.map_or(v1::AlarmMode::Unspecified, proto_mode).into(),
                        reason,
                        zone,
                        until: until.map(clock::timestamp),
                        bypassed,
                        user,
                    });
                    self.events
                        .emit(alarm_place, cause, &dedup, body)
                        .await
                        .map_err(|e| retry(&e))?;
                    state_changed = true;
                }
                Effect::Notice {
                    code,
                    message,
                    zones,
                } => {
                    info!(home, code, %message, "alarm notice");
                    let body = Body::AlarmNotice(v1::AlarmNotice {
                        code: code.to_owned(),
                        message,
                        zones,
                    });
                    self.events
                        .emit(alarm_place, cause, &dedup, body)
                        .await
                        .map_err(|e| retry(&e))?;
                }
                Effect::Siren(on) => {
                    let sirens = self
                        .config(home)
                        .map(|config| config.sirens.clone())
                        .unwrap_or_default();
                    for siren in sirens {
                        let Some((room, device)) = split_zone(&siren) else {
                            continue;
                        };
                        let target = Target { home, room, device };
                        let body = command::Body::SirenSet(v1::SirenSet { on });
                        self.commands
                            .issue(&cause.as_event(), target, &format!("{dedup}-{siren}"), body)
                            .await
                            .map_err(|e| retry(&e))?;
                    }
                }
                Effect::Notify {
                    severity,
                    category,
                    title,
                    message,
                } => {
                    let body = Body::Notification(v1::Notification {
                        severity: match severity {
                            Severity::Warning => v1::Severity::Warning,
                            Severity::Critical => v1::Severity::Critical,
                        }
                        .into(),
                        category: category.to_owned(),
                        title,
                        message,
                    });
                    let place = Place {
                        home,
                        room: HOME_ROOM,
                        device: CONSUMER,
                    };
                    self.events
                        .emit(place, cause, &dedup, body)
                        .await
                        .map_err(|e| retry(&e))?;
                }
            }
        }
        if state_changed {
            self.publish_state(home, alarm).await;
        }
        Ok(())
    }

    /// The state on the retained MQTT topic `<prefix>/<home>/alarm/state`.
    async fn publish_state(&self, home: &str, alarm: &Alarm) {
        let topic = format!("{}/{home}/alarm/state", self.mqtt_prefix);
        panel::publish_retained(&self.client, &topic, alarm.status().as_str()).await;
    }

    async fn save(&self, home: &str, stored: &Stored) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(stored).map_err(|e| HandlerError::Poison(e.to_string()))?;
        self.state
            .put(state::key(&[home]), bytes.into())
            .await
            .map_err(|e| HandlerError::Retry(format!("cannot store the alarm state: {e}")))?;
        Ok(())
    }

    /// Whether this process handles `home` (see [`crate::partition`]): the
    /// panel of another partition's home is its process's to answer.
    pub fn owns(&self, home: &str) -> bool {
        self.homes.owns(home)
    }

    fn config(&self, home: &str) -> Option<&config::Config> {
        self.homes.homes.get(home)?.security.as_ref()
    }

    /// The NATS client requests come in on.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The gateway's native MQTT topic prefix.
    pub fn mqtt_prefix(&self) -> &str {
        &self.mqtt_prefix
    }
}

/// Whether a body opens (`Some(true)`) or closes a zone; `None` for bodies
/// that say nothing about it.
fn sensor_open(body: &Body) -> Option<bool> {
    match body {
        Body::Contact(contact) => Some(contact.open),
        Body::Motion(motion) => Some(motion.detected),
        Body::Smoke(smoke) => Some(smoke.detected),
        Body::WaterLeak(leak) => Some(leak.detected),
        Body::Tamper(tamper) => Some(tamper.detected),
        _ => None,
    }
}

fn proto_status(status: Status) -> v1::AlarmStatus {
    match status {
        Status::Disarmed => v1::AlarmStatus::Disarmed,
        Status::Arming => v1::AlarmStatus::Arming,
        Status::ArmedHome => v1::AlarmStatus::ArmedHome,
        Status::ArmedAway => v1::AlarmStatus::ArmedAway,
        Status::ArmedNight => v1::AlarmStatus::ArmedNight,
        Status::ArmedVacation => v1::AlarmStatus::ArmedVacation,
        Status::Pending => v1::AlarmStatus::Pending,
        Status::Triggered => v1::AlarmStatus::Triggered,
    }
}

fn proto_mode(mode: Mode) -> v1::AlarmMode {
    match mode {
        Mode::Home => v1::AlarmMode::Home,
        Mode::Away => v1::AlarmMode::Away,
        Mode::Night => v1::AlarmMode::Night,
        Mode::Vacation => v1::AlarmMode::Vacation,
    }
}
