//! People at the alarm panel: arm and disarm requests with a code, over
//! MQTT (a keypad publishing on `<prefix>/<home>/alarm/set`, as Home
//! Assistant's MQTT alarm panel does) and over NATS request/reply
//! (`hearth.alarm.<home>`), and the state published back.
//!
//! A request is a JSON object `{"action": "arm_away", "code": "1234",
//! "force": false}` or just the action (`ARM_AWAY`, `DISARM`, `status`);
//! actions are `arm_home`, `arm_away`, `arm_night`, `arm_vacation`,
//! `disarm` and `status`, in any case. The answer (the NATS reply, and on
//! MQTT `<prefix>/<home>/alarm/result`) is `{"ok": true, "state":
//! "arming", "mode": "away", "until": "2026-…Z"}` or `{"ok": false,
//! "error": "wrong code (4 tries left before the panel locks)", ...}`.
//! Requests carry codes: the gateway routes the keypad topic without
//! storing it, and the rule logs no code.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use futures::StreamExt;
use hearth_proto::{headers, subject};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::{Code, Mode};
use super::machine::{Action, Alarm};
use super::Security;

const QOS: HeaderName = HeaderName::from_static(headers::MQTT_QOS);

/// A request, its home known from the subject or topic it came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub home: String,
    /// `None`: only asks the state.
    pub action: Option<Action>,
    pub code: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    action: String,
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    force: bool,
}

impl Request {
    /// Reads a request's payload.
    pub fn parse(home: &str, payload: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| "the request is not UTF-8 text".to_owned())?
            .trim();
        let (action, code, force) = if text.starts_with('{') {
            let json: JsonRequest = serde_json::from_str(text).map_err(|e| {
                format!(
                    "the request is not {{\"action\": ..., \"code\": ..., \"force\": ...}}: {e}"
                )
            })?;
            let code = match json.code {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(code)) => Some(code),
                Some(serde_json::Value::Number(code)) => Some(code.to_string()),
                Some(_) => return Err("`code` must be a string or a number".to_owned()),
            };
            (json.action, code, json.force)
        } else {
            (text.to_owned(), None, false)
        };
        let action = match action.to_ascii_lowercase().as_str() {
            "status" | "state" => None,
            "disarm" => Some(Action::Disarm),
            other => {
                let mode = match other {
                    "arm_home" => Mode::Home,
                    "arm_away" => Mode::Away,
                    "arm_night" => Mode::Night,
                    "arm_vacation" => Mode::Vacation,
                    _ => {
                        return Err(format!(
                            "unknown action {action:?}; known: arm_home, arm_away, arm_night, arm_vacation, disarm, status"
                        ))
                    }
                };
                Some(Action::Arm { mode, force })
            }
        };
        Ok(Self {
            home: home.to_owned(),
            action,
            code: code.filter(|c| !c.is_empty()),
        })
    }
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// When the current delay ends (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bypassed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn error(error: String) -> Self {
        Self {
            ok: false,
            state: None,
            mode: None,
            until: None,
            bypassed: Vec::new(),
            error: Some(error),
        }
    }

    pub fn state(alarm: &Alarm, result: Result<(), String>) -> Self {
        let until = alarm.until().and_then(|ms| {
            jiff::Timestamp::from_millisecond(i64::try_from(ms).ok()?)
                .ok()
                .map(|ts| ts.to_string())
        });
        Self {
            ok: result.is_ok(),
            state: Some(alarm.status().as_str().to_owned()),
            mode: alarm.mode().map(|mode| mode.as_str().to_owned()),
            until,
            bypassed: alarm.bypassed.iter().cloned().collect(),
            error: result.err(),
        }
    }
}

/// The name of the code `code` matches, if any.
pub fn whose_code(codes: &[Code], code: &str) -> Option<String> {
    codes.iter().find_map(|entry| {
        let hash = PasswordHash::new(&entry.hash).ok()?;
        Argon2::default()
            .verify_password(code.as_bytes(), &hash)
            .is_ok()
            .then(|| entry.name.clone())
    })
}

/// The Argon2id hash of a code, with a random salt, for the homes file.
pub fn hash_code(code: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(code.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

/// Serves requests over NATS (`hearth.alarm.<home>`) and MQTT (the keypad
/// topic, routed by the gateway on `hearth.mqtt.…`) until `shutdown`.
pub async fn serve(
    security: Security,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let client = security.client().clone();
    let prefix = security.mqtt_prefix().to_owned();
    let mut nats = client.subscribe("hearth.alarm.*").await?;
    let keypad_subject = subject::mqtt_subject(&format!("{prefix}/HOME/alarm/set"))
        .unwrap_or_default()
        .replace(".HOME.", ".*.");
    let mut mqtt = client.subscribe(keypad_subject.clone()).await?;
    info!(nats = "hearth.alarm.<home>", mqtt = %format!("{prefix}/<home>/alarm/set"), "alarm panel requests served");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            Some(message) = nats.next() => {
                let home = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|token| subject::decode_token(token).ok())
                    .unwrap_or_default();
                if !security.owns(&home) {
                    continue;
                }
                let security = security.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let reply = answer(&security, &home, &message.payload, "nats").await;
                    if let Some(inbox) = message.reply {
                        let body = serde_json::to_vec(&reply).unwrap_or_default();
                        if let Err(error) = client.publish(inbox, body.into()).await {
                            debug!(%error, "answering an alarm request failed");
                        }
                    }
                });
            }
            Some(message) = mqtt.next() => {
                let Some(home) = subject::subject_topic(&message.subject)
                    .ok()
                    .and_then(|topic| {
                        let rest = topic.strip_prefix(&prefix)?.strip_prefix('/')?;
                        Some(rest.split('/').next()?.to_owned())
                    })
                else {
                    continue;
                };
                if !security.owns(&home) {
                    continue;
                }
                let security = security.clone();
                let client = client.clone();
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let reply = answer(&security, &home, &message.payload, "mqtt").await;
                    let topic = format!("{prefix}/{home}/alarm/result");
                    let body = serde_json::to_vec(&reply).unwrap_or_default();
                    if let Some(subject) = subject::mqtt_subject(&topic) {
                        if let Err(error) = client.publish(subject, body.into()).await {
                            debug!(%error, "answering a keypad failed");
                        }
                    }
                });
            }
            // Both subscriptions ended: the connection is closed for good.
            else => return Ok(()),
        }
    }
}

async fn answer(security: &Security, home: &str, payload: &[u8], via: &str) -> Reply {
    match Request::parse(home, payload) {
        Ok(request) => {
            let action = format!("{:?}", request.action);
            let reply = security.request(request).await;
            info!(
                home,
                via,
                action,
                ok = reply.ok,
                error = reply.error.as_deref().unwrap_or(""),
                "alarm panel request"
            );
            reply
        }
        Err(error) => {
            warn!(home, via, %error, "unreadable alarm panel request");
            Reply::error(error)
        }
    }
}

/// Publishes `payload` on MQTT `topic` as a retained QoS 1 message: stored
/// in the gateway's retained stream (new subscribers get it) and routed to
/// the current subscribers.
pub async fn publish_retained(client: &async_nats::Client, topic: &str, payload: &str) {
    let (Some(retained), Some(live)) = (
        subject::retained_subject(topic),
        subject::mqtt_subject(topic),
    ) else {
        return;
    };
    let mut map = HeaderMap::new();
    map.insert(QOS, "1");
    let js = async_nats::jetstream::new(client.clone());
    let stored = match js
        .publish_with_headers(retained, map.clone(), payload.to_owned().into())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = stored {
        warn!(topic, %error, "could not retain the alarm state for keypads");
    }
    if let Err(error) = client
        .publish_with_headers(live, map, payload.to_owned().into())
        .await
    {
        debug!(topic, %error, "could not route the alarm state to keypads");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_json_or_a_bare_action() {
        let request = Request::parse("home", br#"{"action":"ARM_AWAY","code":1234}"#).unwrap();
        assert_eq!(
            request.action,
            Some(Action::Arm {
                mode: Mode::Away,
                force: false
            })
        );
        assert_eq!(request.code.as_deref(), Some("1234"));
        let request = Request::parse(
            "home",
            br#"{"action":"arm_night","code":"0042","force":true}"#,
        )
        .unwrap();
        assert_eq!(
            request.action,
            Some(Action::Arm {
                mode: Mode::Night,
                force: true
            })
        );
        assert_eq!(request.code.as_deref(), Some("0042"));
        assert_eq!(
            Request::parse("home", b" DISARM\n").unwrap().action,
            Some(Action::Disarm)
        );
        assert_eq!(Request::parse("home", b"status").unwrap().action, None);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let error = Request::parse("home", b"ARM_CUSTOM_BYPASS").unwrap_err();
        assert!(
            error.contains("unknown action") && error.contains("arm_vacation"),
            "{error}"
        );
        let error = Request::parse("home", br#"{"action":"disarm","pin":"1"}"#).unwrap_err();
        assert!(error.contains("pin"), "{error}");
        let error = Request::parse("home", &[0xff, 0xfe]).unwrap_err();
        assert!(error.contains("UTF-8"), "{error}");
    }

    #[test]
    fn a_hashed_code_is_recognised_and_others_are_not() {
        let codes = vec![Code {
            name: "alice".into(),
            hash: hash_code("1234").unwrap(),
        }];
        assert_eq!(whose_code(&codes, "1234").as_deref(), Some("alice"));
        assert_eq!(whose_code(&codes, "4321"), None);
    }
}
