//! NATS subjects, and how home, room and device names become subject tokens.
//!
//! Events are stored on `hearth.evt.<home>.<room>.<kind>.<device>`, rejected
//! publishes on `hearth.dlq.gateway.<reason>`.
//!
//! A NATS subject token cannot contain `.`, `*`, `>` or whitespace, but a
//! Zigbee2MQTT friendly name like `Living Room.Lamp 2` contains all sorts of
//! things. Names are therefore percent-encoded into tokens, reversibly:
//!
//! | character                                    | becomes                      |
//! |----------------------------------------------|------------------------------|
//! | `%`                                          | `%25`                        |
//! | `.`                                          | `%2E`                        |
//! | `*`                                          | `%2A`                        |
//! | `>`                                          | `%3E`                        |
//! | space, any other whitespace, control chars   | `%XX` per UTF-8 byte         |
//! | anything else, non-ASCII letters included    | itself                       |
//!
//! So `Living Room.Lamp 2` is the token `Living%20Room%2ELamp%202`, and its
//! events are on `hearth.evt.home.Living%20Room%2ELamp%202...`; a consumer
//! subscribing to one device encodes the name the same way
//! ([`encode_token`]), and one reading names back from a subject decodes
//! them ([`decode_token`]). Names made only of letters, digits, `-`, `_`,
//! `/` and the like are their own token, which keeps the common subjects
//! readable.
//!
//! `encode_token("")` is `""`, which is not a valid token: the conventions
//! never produce an empty home, room or device (they reject the publish with
//! `empty_identifier`), so callers of [`event_subject`] do not have to check.

use std::borrow::Cow;

/// Every event (`HEARTH_EVENTS`).
pub const EVENTS_SUBJECTS: &str = "hearth.evt.>";
/// Every command (`HEARTH_COMMANDS`).
pub const COMMANDS_SUBJECTS: &str = "hearth.cmd.>";
/// Every dead-lettered message (`HEARTH_DLQ`).
pub const DLQ_SUBJECTS: &str = "hearth.dlq.>";
/// Every MQTT publish routed between MQTT clients (core NATS, not stored).
pub const MQTT_SUBJECTS: &str = "hearth.mqtt.>";
/// Every known device's route (`HEARTH_DEVICES`).
pub const DEVICES_SUBJECTS: &str = "hearth.device.>";
/// Every persistent MQTT session (`HEARTH_SESSIONS`).
pub const SESSIONS_SUBJECTS: &str = "hearth.session.>";
/// Every message queued for a persistent MQTT session (`HEARTH_SESSION_QUEUE`).
pub const QUEUE_SUBJECTS: &str = "hearth.queue.>";
/// Every retained MQTT message (`HEARTH_RETAINED`).
pub const RETAINED_SUBJECTS: &str = "hearth.retained.>";

/// The token of an empty topic level (`/a`, `a//b`): no level is encoded
/// to it, since MQTT forbids U+0000 in topics.
const EMPTY_LEVEL: &str = "%00";

/// A token that is not the output of [`encode_token`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("`%` at byte {at} is not followed by two hex digits")]
    BadEscape { at: usize },
    #[error("the escapes do not decode to UTF-8 text")]
    NotUtf8,
    #[error("not the subject of an MQTT topic")]
    NotATopic,
}

/// `hearth.evt.<home>.<room>.<kind>.<device>`, each part encoded with
/// [`encode_token`].
pub fn event_subject(home: &str, room: &str, kind: &str, device: &str) -> String {
    format!(
        "hearth.evt.{}.{}.{}.{}",
        encode_token(home),
        encode_token(room),
        encode_token(kind),
        encode_token(device)
    )
}

/// `hearth.cmd.<home>.<room>.<kind>.<device>`, each part encoded with
/// [`encode_token`]: where a command for a device is stored.
pub fn command_subject(home: &str, room: &str, kind: &str, device: &str) -> String {
    format!(
        "hearth.cmd.{}.{}.{}.{}",
        encode_token(home),
        encode_token(room),
        encode_token(kind),
        encode_token(device)
    )
}

/// `hearth.device.<home>.<room>.<device>`, each part encoded with
/// [`encode_token`]: where the gateway records how to reach a device.
pub fn device_subject(home: &str, room: &str, device: &str) -> String {
    format!(
        "hearth.device.{}.{}.{}",
        encode_token(home),
        encode_token(room),
        encode_token(device)
    )
}

/// `hearth.session.<client id>`: a persistent MQTT session's state.
pub fn session_subject(client_id: &str) -> String {
    format!("hearth.session.{}", encode_token(client_id))
}

/// `hearth.queue.<client id>`: the messages queued for a persistent session.
pub fn queue_subject(client_id: &str) -> String {
    format!("hearth.queue.{}", encode_token(client_id))
}

/// The client id in a `hearth.session.…` or `hearth.queue.…` subject.
pub fn subject_client_id(subject: &str) -> Option<String> {
    let token = subject
        .strip_prefix("hearth.session.")
        .or_else(|| subject.strip_prefix("hearth.queue."))?;
    if token.contains('.') {
        return None;
    }
    decode_token(token).ok().filter(|id| !id.is_empty())
}

/// `hearth.dlq.gateway.<reason>`, the reason encoded with [`encode_token`].
pub fn dlq_subject(reason: &str) -> String {
    format!("hearth.dlq.gateway.{}", encode_token(reason))
}

/// `<prefix>.<level>.<level>...` for an MQTT topic, each level encoded with
/// [`encode_token`] and an empty level as `%00`; `None` for the empty topic,
/// which MQTT does not allow.
fn topic_subject(prefix: &str, topic: &str) -> Option<String> {
    if topic.is_empty() {
        return None;
    }
    let mut subject = String::with_capacity(prefix.len() + topic.len() + 8);
    subject.push_str(prefix);
    for level in topic.split('/') {
        subject.push('.');
        if level.is_empty() {
            subject.push_str(EMPTY_LEVEL);
        } else {
            subject.push_str(&encode_token(level));
        }
    }
    Some(subject)
}

/// `hearth.mqtt.<topic levels>`: where an MQTT publish is routed to
/// subscribers. `zigbee2mqtt/Living Room/set` is
/// `hearth.mqtt.zigbee2mqtt.Living%20Room.set`.
pub fn mqtt_subject(topic: &str) -> Option<String> {
    topic_subject("hearth.mqtt", topic)
}

/// `hearth.retained.<topic levels>`: the retained message of a topic.
pub fn retained_subject(topic: &str) -> Option<String> {
    topic_subject("hearth.retained", topic)
}

/// The MQTT topic a `hearth.mqtt.…` or `hearth.retained.…` subject names.
pub fn subject_topic(subject: &str) -> Result<String, SubjectError> {
    let levels = subject
        .strip_prefix("hearth.mqtt.")
        .or_else(|| subject.strip_prefix("hearth.retained."))
        .ok_or(SubjectError::NotATopic)?;
    let mut topic = String::with_capacity(levels.len());
    for (i, token) in levels.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        if token != EMPTY_LEVEL {
            let level = decode_token(token)?;
            if level.is_empty() || level.contains(['/', '+', '#', '\0']) {
                return Err(SubjectError::NotATopic);
            }
            topic.push_str(&level);
        }
    }
    Ok(topic)
}

fn needs_escape(c: char) -> bool {
    matches!(c, '%' | '.' | '*' | '>') || c.is_whitespace() || c.is_control()
}

/// Percent-encodes `s` into a NATS subject token (see the module docs).
/// Borrows when there is nothing to encode, which is nearly always.
pub fn encode_token(s: &str) -> Cow<'_, str> {
    let Some(first) = s.find(needs_escape) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        if needs_escape(c) {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                out.push('%');
                out.push(hex_digit(byte >> 4));
                out.push(hex_digit(byte & 0x0f));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(nibble & 0x0f)])
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// The name a token was encoded from. Lower-case hex digits are accepted;
/// a `%` not followed by two hex digits, or escapes that are not UTF-8, are
/// errors.
pub fn decode_token(s: &str) -> Result<String, SubjectError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = match bytes.get(i + 1..i + 3) {
                Some(&[hi, lo]) => hex_value(hi).zip(hex_value(lo)).map(|(h, l)| h << 4 | l),
                _ => None,
            }
            .ok_or(SubjectError::BadEscape { at: i })?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SubjectError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_valid_token(token: &str) -> bool {
        !token.is_empty()
            && !token
                .chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
    }

    #[test]
    fn a_friendly_name_with_spaces_and_dots_is_encoded_as_documented() {
        assert_eq!(
            encode_token("Living Room.Lamp 2"),
            "Living%20Room%2ELamp%202"
        );
    }

    #[test]
    fn wildcards_and_percent_are_escaped() {
        assert_eq!(encode_token("a*b>c%d"), "a%2Ab%3Ec%25d");
    }

    #[test]
    fn control_characters_and_unicode_whitespace_are_escaped_per_utf8_byte() {
        assert_eq!(encode_token("a\tb\nc\u{7f}"), "a%09b%0Ac%7F");
        assert_eq!(encode_token("a\u{a0}b"), "a%C2%A0b");
        assert_eq!(encode_token("\u{3000}"), "%E3%80%80");
    }

    #[test]
    fn plain_names_are_borrowed_not_copied() {
        for name in [
            "kitchen",
            "hall-sensor_2",
            "Küche",
            "bedroom/lamp",
            "温度计",
        ] {
            assert!(
                matches!(encode_token(name), Cow::Borrowed(b) if b == name),
                "{name}"
            );
        }
    }

    #[test]
    fn non_ascii_letters_pass_through() {
        assert_eq!(encode_token("Küche Süd"), "Küche%20Süd");
    }

    #[test]
    fn the_empty_name_encodes_to_the_empty_token() {
        assert_eq!(encode_token(""), "");
        assert_eq!(decode_token(""), Ok(String::new()));
    }

    #[test]
    fn encoding_round_trips_and_yields_valid_tokens_for_tricky_strings() {
        let tricky = [
            '.', '*', '>', '%', ' ', '\t', '\n', '\r', '\0', '\u{1b}', '\u{7f}', '\u{85}',
            '\u{a0}', '\u{2028}', '\u{3000}', 'a', 'Z', '0', '/', '-', '_', '$', 'ü', '温', '🦀',
            '+', '#',
        ];
        // Every string of up to three tricky characters.
        let mut strings = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> = strings
                .iter()
                .flat_map(|s| {
                    tricky.iter().map(move |c| {
                        let mut s = s.clone();
                        s.push(*c);
                        s
                    })
                })
                .collect();
            strings.extend(longer);
        }
        strings.sort();
        strings.dedup();
        assert!(strings.len() > 19_000);
        for s in strings.iter().filter(|s| !s.is_empty()) {
            let token = encode_token(s);
            assert!(is_valid_token(&token), "{s:?} -> {token:?}");
            assert_eq!(decode_token(&token).as_deref(), Ok(s.as_str()), "{s:?}");
        }
    }

    #[test]
    fn names_that_look_like_escapes_round_trip() {
        for s in ["%", "%25", "100%", "%2E", "%%", "%zz", "50% off.sale"] {
            assert_eq!(decode_token(&encode_token(s)).as_deref(), Ok(s));
        }
    }

    #[test]
    fn lower_case_escapes_decode() {
        assert_eq!(
            decode_token("Living%20Room%2eLamp").as_deref(),
            Ok("Living Room.Lamp")
        );
    }

    #[test]
    fn malformed_escapes_are_errors() {
        assert_eq!(decode_token("a%"), Err(SubjectError::BadEscape { at: 1 }));
        assert_eq!(decode_token("a%2"), Err(SubjectError::BadEscape { at: 1 }));
        assert_eq!(decode_token("%zz"), Err(SubjectError::BadEscape { at: 0 }));
        assert_eq!(decode_token("%+1"), Err(SubjectError::BadEscape { at: 0 }));
        assert_eq!(
            decode_token("ok%2%41"),
            Err(SubjectError::BadEscape { at: 2 })
        );
    }

    #[test]
    fn escapes_that_are_not_utf8_are_errors() {
        assert_eq!(decode_token("%FF"), Err(SubjectError::NotUtf8));
        assert_eq!(decode_token("%C3"), Err(SubjectError::NotUtf8));
    }

    #[test]
    fn event_subjects_encode_every_part() {
        assert_eq!(
            event_subject("home", "Living Room", "motion", "Lamp.2"),
            "hearth.evt.home.Living%20Room.motion.Lamp%2E2"
        );
        assert_eq!(
            event_subject("home", "kitchen", "temperature", "sensor"),
            "hearth.evt.home.kitchen.temperature.sensor"
        );
    }

    #[test]
    fn mqtt_topics_map_to_subjects_level_by_level_and_back() {
        for (topic, subject) in [
            ("a/b/c", "hearth.mqtt.a.b.c"),
            (
                "zigbee2mqtt/Living Room.Lamp/set",
                "hearth.mqtt.zigbee2mqtt.Living%20Room%2ELamp.set",
            ),
            ("/a", "hearth.mqtt.%00.a"),
            ("a//b/", "hearth.mqtt.a.%00.b.%00"),
            ("/", "hearth.mqtt.%00.%00"),
            ("$SYS/x*>", "hearth.mqtt.$SYS.x%2A%3E"),
            ("100%", "hearth.mqtt.100%25"),
        ] {
            assert_eq!(mqtt_subject(topic).as_deref(), Some(subject), "{topic}");
            assert_eq!(subject_topic(subject).as_deref(), Ok(topic), "{subject}");
        }
        assert_eq!(mqtt_subject(""), None);
        assert_eq!(
            retained_subject("a/b").as_deref(),
            Some("hearth.retained.a.b")
        );
        assert_eq!(subject_topic("hearth.retained.a.b").as_deref(), Ok("a/b"));
    }

    #[test]
    fn subjects_that_name_no_topic_are_errors() {
        for subject in [
            "hearth.evt.a",
            "hearth.mqtt.a.%2F",
            "hearth.mqtt.%2B",
            "hearth.mqtt.%23.b",
        ] {
            assert_eq!(
                subject_topic(subject),
                Err(SubjectError::NotATopic),
                "{subject}"
            );
        }
        assert_eq!(
            subject_topic("hearth.mqtt.a%"),
            Err(SubjectError::BadEscape { at: 1 })
        );
    }

    #[test]
    fn dlq_subjects_carry_the_reason() {
        assert_eq!(
            dlq_subject("unknown_topic"),
            "hearth.dlq.gateway.unknown_topic"
        );
    }

    #[test]
    fn every_subject_is_under_its_stream_wildcard() {
        let under =
            |wildcard: &str, subject: &str| subject.starts_with(wildcard.trim_end_matches('>'));
        assert!(under(
            EVENTS_SUBJECTS,
            &event_subject("h", "r", "motion", "d")
        ));
        assert!(under(DLQ_SUBJECTS, &dlq_subject("bad_payload")));
        assert!(COMMANDS_SUBJECTS.starts_with("hearth.cmd."));
    }
}
