//! Which convention each device speaks, learned from what it publishes, so
//! that a command for `home/room/device` goes to the topic that device
//! listens on.
//!
//! Kept in the `HEARTH_DEVICES` stream, one message per device on
//! `hearth.device.<home>.<room>.<device>` (JSON: convention, topic, client
//! id), written when a gateway first sees a device or sees it change, and
//! followed by every gateway. So a command finds its device whichever
//! gateway it is connected to, also after a restart, and `nats stream view
//! HEARTH_DEVICES` lists the devices hearth knows.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::jetstream::follow::follow;
use crate::jetstream::streams::DEVICES_STREAM;
use crate::subject;

/// Where a device is, in hearth's names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Place {
    pub(crate) home: String,
    pub(crate) room: String,
    pub(crate) device: String,
}

/// How to reach a device: its convention and the topic its command topic
/// extends (`<topic>/set`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Route {
    pub(crate) convention: String,
    pub(crate) topic: String,
    #[serde(default)]
    pub(crate) client_id: String,
}

#[derive(Debug, Default)]
struct Known {
    /// By device topic: what this gateway has recorded, to write only news.
    by_topic: HashMap<String, Place>,
    by_place: HashMap<Place, Route>,
}

#[derive(Debug)]
pub(crate) struct Devices {
    js: jetstream::Context,
    known: RwLock<Known>,
}

impl Devices {
    /// Loads the known devices and follows `HEARTH_DEVICES` until
    /// `shutdown`.
    pub(crate) async fn load(
        js: &jetstream::Context,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, async_nats::Error> {
        let devices = Arc::new(Self {
            js: js.clone(),
            known: RwLock::default(),
        });
        let follower = Arc::clone(&devices);
        follow(
            js,
            DEVICES_STREAM,
            subject::DEVICES_SUBJECTS,
            "hearth gateway: which convention and topic each device uses",
            shutdown,
            move |message| follower.apply_message(message),
        )
        .await?;
        Ok(devices)
    }

    fn apply_message(&self, message: &jetstream::Message) {
        let Some(place) = place_of(&message.subject) else {
            debug!(subject = %message.subject, "not a device subject; ignored");
            return;
        };
        match serde_json::from_slice::<Route>(&message.payload) {
            Ok(route) => self.remember(place, route),
            Err(error) => {
                warn!(subject = %message.subject, %error, "unreadable device record; ignored")
            }
        }
    }

    fn remember(&self, place: Place, route: Route) {
        let mut known = self.write();
        known.by_topic.insert(route.topic.clone(), place.clone());
        known.by_place.insert(place, route);
    }

    /// The devices last seen publishing through `client_id`, at most
    /// `limit`: whose availability its will speaks for.
    pub(crate) fn of_client(&self, client_id: &str, limit: usize) -> Vec<Place> {
        self.read()
            .by_place
            .iter()
            .filter(|(_, route)| route.client_id == client_id)
            .map(|(place, _)| place.clone())
            .take(limit)
            .collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the device at `place` reports on `topic` (its device
    /// topic, see `Convention::device_root`) in `convention`. Costs a map
    /// lookup when nothing changed, which is nearly always; news is stored
    /// in the background.
    pub(crate) fn learn(
        &self,
        convention: &str,
        topic: &str,
        (home, room, device): (&str, &str, &str),
        client_id: &str,
    ) {
        let same =
            |known: &Place| known.home == home && known.room == room && known.device == device;
        if self.read().by_topic.get(topic).is_some_and(same) {
            return;
        }
        let place = Place {
            home: home.to_owned(),
            room: room.to_owned(),
            device: device.to_owned(),
        };
        let route = Route {
            convention: convention.to_owned(),
            topic: topic.to_owned(),
            client_id: client_id.to_owned(),
        };
        self.remember(place.clone(), route.clone());
        let subject = subject::device_subject(&place.home, &place.room, &place.device);
        let js = self.js.clone();
        info!(device = %place.device, room = %place.room, home = %place.home, convention, topic, "new device");
        tokio::spawn(async move {
            let Ok(payload) = serde_json::to_vec(&route) else {
                return;
            };
            let stored = match js.publish(subject, payload.into()).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = stored {
                // Known to this gateway still; others learn it when the
                // device reports again after a restart of this one.
                warn!(topic = %route.topic, %error, "could not record the device in {DEVICES_STREAM}");
            }
        });
    }

    /// How to reach the device at `place`, if it was ever seen.
    pub(crate) fn route(&self, place: &Place) -> Option<Route> {
        self.read().by_place.get(place).cloned()
    }

    /// Devices known.
    pub(crate) fn len(&self) -> usize {
        self.read().by_place.len()
    }
}

/// The place a `hearth.device.<home>.<room>.<device>` subject names.
fn place_of(subject_name: &str) -> Option<Place> {
    let rest = subject_name.strip_prefix("hearth.device.")?;
    let mut tokens = rest.split('.');
    let (home, room, device) = (tokens.next()?, tokens.next()?, tokens.next()?);
    if tokens.next().is_some() {
        return None;
    }
    let decode = |token| {
        subject::decode_token(token)
            .ok()
            .filter(|name| !name.is_empty())
    };
    Some(Place {
        home: decode(home)?,
        room: decode(room)?,
        device: decode(device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_subjects_name_their_place_and_back() {
        let place = Place {
            home: "home".into(),
            room: "Living Room".into(),
            device: "Lamp.2".into(),
        };
        let subject = subject::device_subject(&place.home, &place.room, &place.device);
        assert_eq!(subject, "hearth.device.home.Living%20Room.Lamp%2E2");
        assert_eq!(place_of(&subject), Some(place));
        assert_eq!(place_of("hearth.device.a.b"), None);
        assert_eq!(place_of("hearth.device.a.b.c.d"), None);
        assert_eq!(place_of("hearth.evt.a.b.c"), None);
    }
}
