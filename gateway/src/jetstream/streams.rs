//! The streams hearth stores into, created or updated at start so that a
//! configuration change (limits, replicas) takes effect on the next start.
//! Names, subjects and descriptions are what users read in `nats stream ls`.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::{Discard, MqttConfig, RetentionConfig, StorageConfig};
use crate::subject;

pub const EVENTS_STREAM: &str = "HEARTH_EVENTS";
pub const COMMANDS_STREAM: &str = "HEARTH_COMMANDS";
pub const DLQ_STREAM: &str = "HEARTH_DLQ";
pub const RETAINED_STREAM: &str = "HEARTH_RETAINED";
pub const DEVICES_STREAM: &str = "HEARTH_DEVICES";
pub const SESSIONS_STREAM: &str = "HEARTH_SESSIONS";
pub const QUEUE_STREAM: &str = "HEARTH_SESSION_QUEUE";
/// The most bytes of retained messages kept; past it the oldest go.
const RETAINED_MAX_BYTES: i64 = 256 * 1024 * 1024;
/// KV bucket of the gateway's exactly-once bookkeeping (see `dedup`).
pub const DEDUP_BUCKET: &str = "hearth_gateway_dedup";

#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error("cannot create or update stream {name}: {source}")]
    Stream {
        name: &'static str,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot open key-value bucket {name}: {source}")]
    Bucket {
        name: &'static str,
        source: jetstream::context::KeyValueError,
    },
}

/// The stream configurations, from the storage settings.
pub fn stream_configs(storage: &StorageConfig) -> [(&'static str, stream::Config); 3] {
    let config =
        |name: &'static str, subjects: &str, description: &str, limits: &RetentionConfig| {
            (
                name,
                stream::Config {
                    name: name.to_owned(),
                    description: Some(description.to_owned()),
                    subjects: vec![subjects.to_owned()],
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    discard: match limits.discard {
                        Discard::Old => stream::DiscardPolicy::Old,
                        Discard::New => stream::DiscardPolicy::New,
                    },
                    max_age: limits.max_age,
                    max_bytes: i64::try_from(limits.max_bytes.as_u64()).unwrap_or(i64::MAX),
                    num_replicas: storage.replicas,
                    duplicate_window: storage.duplicate_window,
                    // Lets consumers and `nats stream get` read single messages from
                    // any replica without going through the stream leader.
                    allow_direct: true,
                    // No per-subject limits: with one subject per device they would
                    // make JetStream track every device and slow it as homes grow.
                    ..Default::default()
                },
            )
        };
    [
        config(
            EVENTS_STREAM,
            subject::EVENTS_SUBJECTS,
            "hearth device events (hearth.v1.Event) on hearth.evt.<home>.<room>.<kind>.<device>",
            &storage.events,
        ),
        config(
            COMMANDS_STREAM,
            subject::COMMANDS_SUBJECTS,
            "hearth commands to devices (hearth.v1.Command) on hearth.cmd.<home>.<room>.<kind>.<device>",
            &storage.commands,
        ),
        config(
            DLQ_STREAM,
            subject::DLQ_SUBJECTS,
            "hearth dead letters: messages that could not be processed, original payload kept, Hearth-Reason header says why",
            &storage.dlq,
        ),
    ]
}

/// A stream that keeps the last `per_subject` messages of each subject,
/// read directly from any replica; full, it drops its oldest.
fn per_subject(
    name: &str,
    description: &str,
    subjects: &str,
    per_subject: i64,
    max_bytes: i64,
    storage: &StorageConfig,
) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        subjects: vec![subjects.to_owned()],
        max_messages_per_subject: per_subject,
        max_bytes,
        storage: stream::StorageType::File,
        num_replicas: storage.replicas,
        duplicate_window: storage.duplicate_window,
        allow_direct: true,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// `HEARTH_RETAINED`: the last retained MQTT message of each topic.
pub fn retained_config(storage: &StorageConfig) -> stream::Config {
    per_subject(
        RETAINED_STREAM,
        "hearth retained MQTT messages, the last of each topic, on hearth.retained.<topic levels> (empty = deleted)",
        subject::RETAINED_SUBJECTS,
        1,
        RETAINED_MAX_BYTES,
        storage,
    )
}

/// `HEARTH_SESSIONS`: the subscriptions and delivery state of each
/// persistent MQTT session.
pub fn sessions_config(storage: &StorageConfig) -> stream::Config {
    per_subject(
        SESSIONS_STREAM,
        "hearth persistent MQTT sessions (clean session = false): subscriptions and delivery state, on hearth.session.<client id>",
        subject::SESSIONS_SUBJECTS,
        1,
        256 * 1024 * 1024,
        storage,
    )
}

/// `HEARTH_SESSION_QUEUE`: QoS 1/2 messages for persistent sessions until
/// their clients acknowledge them; at most `mqtt.max_session_queue` per
/// session, the oldest dropped first.
pub fn queue_config(storage: &StorageConfig, mqtt: &MqttConfig) -> stream::Config {
    stream::Config {
        max_age: mqtt.session_queue_max_age,
        ..per_subject(
            QUEUE_STREAM,
            "hearth messages for persistent MQTT sessions, until acknowledged, on hearth.queue.<client id>",
            subject::QUEUE_SUBJECTS,
            i64::try_from(mqtt.max_session_queue).unwrap_or(i64::MAX),
            1024 * 1024 * 1024,
            storage,
        )
    }
}

/// `HEARTH_DEVICES`: how to reach each device hearth has seen.
pub fn devices_config(storage: &StorageConfig) -> stream::Config {
    per_subject(
        DEVICES_STREAM,
        "hearth devices seen by the gateway: convention, MQTT topic and client id, on hearth.device.<home>.<room>.<device>",
        subject::DEVICES_SUBJECTS,
        1,
        64 * 1024 * 1024,
        storage,
    )
}

/// Creates or updates the streams and the dedup bucket; returns the bucket.
pub async fn ensure(
    js: &jetstream::Context,
    storage: &StorageConfig,
    mqtt: &MqttConfig,
) -> Result<kv::Store, StreamsError> {
    let broker = [
        (RETAINED_STREAM, retained_config(storage)),
        (SESSIONS_STREAM, sessions_config(storage)),
        (QUEUE_STREAM, queue_config(storage, mqtt)),
        (DEVICES_STREAM, devices_config(storage)),
    ];
    for (name, config) in stream_configs(storage).into_iter().chain(broker) {
        js.create_or_update_stream(config)
            .await
            .map_err(|source| StreamsError::Stream { name, source })?;
    }
    // The bucket's stream is made here rather than by
    // `create_or_update_key_value`, which first queries account limits in a
    // shape nats-server 2.9 does not answer.
    js.create_or_update_stream(stream::Config {
        name: format!("KV_{DEDUP_BUCKET}"),
        description: Some(
            "hearth gateway: how often a device repeated an identical QoS 1/2 publish under one \
             packet id, kept for the duplicate window (exactly-once ingest)"
                .to_owned(),
        ),
        subjects: vec![format!("$KV.{DEDUP_BUCKET}.>")],
        max_messages_per_subject: 1,
        // Entries only matter while JetStream still remembers the message
        // ids they disambiguate.
        max_age: storage.duplicate_window.max(Duration::from_secs(1)),
        max_bytes: 64 * 1024 * 1024,
        storage: stream::StorageType::File,
        num_replicas: storage.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        // Full, it forgets its oldest entries rather than refusing new ones:
        // a refused record would hold up the publish that needs it.
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    })
    .await
    .map_err(|source| StreamsError::Stream {
        name: "KV_hearth_gateway_dedup",
        source,
    })?;
    js.get_key_value(DEDUP_BUCKET)
        .await
        .map_err(|source| StreamsError::Bucket {
            name: DEDUP_BUCKET,
            source,
        })
}
