//! What the HTTP and NATS endpoints answer, read from the bucket (not from
//! this instance's memory), so any instance answers with what is stored.

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use super::bucket;
use super::document::HomeView;
use crate::state;

/// An answer, whatever carries it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Answer {
    /// A JSON document.
    Found(Bytes),
    /// No home or device by that name.
    NotFound(String),
    /// The request names nothing the view could have.
    Invalid(String),
    /// The bucket could not be read.
    Unavailable(String),
}

impl Answer {
    /// The answer's JSON; an error as `{"error": "..."}`.
    pub(super) fn into_body(self) -> Bytes {
        match self {
            Self::Found(body) => body,
            Self::NotFound(message) | Self::Invalid(message) | Self::Unavailable(message) => {
                json!({ "error": message }).to_string().into()
            }
        }
    }
}

/// `{"homes": [...]}`: the homes that have a document, sorted.
pub(super) async fn homes(store: &kv::Store) -> Answer {
    match home_names(store).await {
        Ok(homes) => Answer::Found(json!({ "homes": homes }).to_string().into()),
        Err(problem) => Answer::Unavailable(format!("cannot list the homes: {problem}")),
    }
}

async fn home_names(store: &kv::Store) -> Result<Vec<String>, String> {
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut homes = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| e.to_string())?;
        if let Some([home]) = state::split_key(&key).as_deref() {
            homes.push(home.clone());
        }
    }
    homes.sort();
    Ok(homes)
}

/// A home's document, as stored.
pub(super) async fn home(store: &kv::Store, home: &str) -> Answer {
    match store.get(bucket::key(home)).await {
        Ok(Some(document)) => Answer::Found(document),
        Ok(None) => Answer::NotFound(no_home(home)),
        Err(error) => Answer::Unavailable(format!("cannot read the view of {home:?}: {error}")),
    }
}

/// One device's entry, with its home, room and device names.
pub(super) async fn device(store: &kv::Store, home_name: &str, room: &str, device: &str) -> Answer {
    let document = match home(store, home_name).await {
        Answer::Found(document) => document,
        other => return other,
    };
    let view: HomeView = match serde_json::from_slice(&document) {
        Ok(view) => view,
        Err(error) => {
            return Answer::Unavailable(format!(
                "the stored view of {home_name:?} is not a view document: {error}"
            ))
        }
    };
    let Some(found) = view.device(room, device) else {
        return Answer::NotFound(format!("no device {room}/{device} in home {home_name:?}"));
    };
    let mut body = json!({ "home": home_name, "room": room, "device": device });
    if let (Some(body), Ok(serde_json::Value::Object(fields))) =
        (body.as_object_mut(), serde_json::to_value(found))
    {
        body.extend(fields);
    }
    Answer::Found(body.to_string().into())
}

fn no_home(home: &str) -> String {
    format!("no home named {home:?}")
}
