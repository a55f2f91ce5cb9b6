//! Retained messages: the last retained publish of each topic, stored in the
//! `HEARTH_RETAINED` stream (one message per subject,
//! `hearth.retained.<topic levels>`) so that they outlive the gateway, and
//! mirrored in memory by every gateway, which follows the stream, so that a
//! new subscription is answered without a round trip to JetStream.
//!
//! A retained publish is stored by the connection's store pipeline like its
//! events, before the publisher is acknowledged; an empty payload stores an
//! empty message, which deletes the topic's retained message (MQTT 3.3.1.3)
//! and, being the last of its subject, keeps it deleted.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream;
use bytes::Bytes;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::subscriptions::matches;
use super::{parse_qos, QOS_HEADER};
use crate::jetstream::follow::follow;
use crate::jetstream::streams::RETAINED_STREAM;
use crate::subject;

/// The in-memory mirror of `HEARTH_RETAINED`.
#[derive(Debug, Default)]
pub(crate) struct Retained {
    /// Deleted topics stay as empty entries, so that a stale copy arriving
    /// late (by stream sequence) does not bring a message back.
    topics: RwLock<HashMap<Arc<str>, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    sequence: u64,
    payload: Bytes,
    qos: QoS,
}

impl Retained {
    /// Loads every retained message, then follows the stream in the
    /// background (until `shutdown`) to stay current with every gateway's
    /// retained publishes.
    pub(crate) async fn load(
        js: &jetstream::Context,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, async_nats::Error> {
        let retained = Arc::new(Self::default());
        let follower = Arc::clone(&retained);
        follow(
            js,
            RETAINED_STREAM,
            subject::RETAINED_SUBJECTS,
            "hearth gateway: mirror of the retained MQTT messages",
            shutdown,
            move |message| follower.apply_message(message),
        )
        .await?;
        Ok(retained)
    }

    fn apply_message(&self, message: &jetstream::Message) {
        let Ok(info) = message.info() else { return };
        let Ok(topic) = subject::subject_topic(&message.subject) else {
            debug!(subject = %message.subject, "not a retained topic; ignored");
            return;
        };
        let qos = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(QOS_HEADER))
            .and_then(|value| parse_qos(value.as_str()))
            .unwrap_or(QoS::AtMostOnce);
        self.apply(&topic, info.stream_sequence, message.payload.clone(), qos);
    }

    /// Records the retained message stored for `topic` at `sequence`, unless
    /// a later one is already known. An empty payload deletes.
    pub(crate) fn apply(&self, topic: &str, sequence: u64, payload: Bytes, qos: QoS) {
        let mut topics = self
            .topics
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if topics
            .get(topic)
            .is_some_and(|known| known.sequence >= sequence)
        {
            return;
        }
        topics.insert(
            topic.into(),
            Entry {
                sequence,
                payload,
                qos,
            },
        );
    }

    /// The retained messages matching `filter`: topic, payload and QoS.
    pub(crate) fn matching(&self, filter: &str) -> Vec<(Arc<str>, Bytes, QoS)> {
        let topics = self
            .topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut found: Vec<_> = topics
            .iter()
            .filter(|(topic, entry)| !entry.payload.is_empty() && matches(filter, topic))
            .map(|(topic, entry)| (Arc::clone(topic), entry.payload.clone(), entry.qos))
            .collect();
        // In the order they were retained, which is stable and familiar.
        found.sort_by_key(|(topic, _, _)| topics.get(topic).map_or(0, |entry| entry.sequence));
        found
    }

    /// Topics with a retained message.
    pub(crate) fn len(&self) -> usize {
        self.topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .filter(|entry| !entry.payload.is_empty())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_message_wins_whatever_the_order_it_arrives_in() {
        let retained = Retained::default();
        retained.apply("a/b", 5, Bytes::from_static(b"new"), QoS::AtLeastOnce);
        retained.apply("a/b", 3, Bytes::from_static(b"old"), QoS::AtMostOnce);
        let found = retained.matching("a/#");
        assert_eq!(found.len(), 1);
        assert_eq!(&found[0].1[..], b"new");
        assert_eq!(found[0].2, QoS::AtLeastOnce);
    }

    #[test]
    fn an_empty_payload_deletes_and_stays_deleted() {
        let retained = Retained::default();
        retained.apply("a/b", 1, Bytes::from_static(b"on"), QoS::AtMostOnce);
        retained.apply("a/b", 4, Bytes::new(), QoS::AtMostOnce);
        retained.apply("a/b", 2, Bytes::from_static(b"stale"), QoS::AtMostOnce);
        assert!(retained.matching("#").is_empty());
        assert_eq!(retained.len(), 0);
        retained.apply("a/b", 9, Bytes::from_static(b"back"), QoS::AtMostOnce);
        assert_eq!(retained.len(), 1);
    }

    #[test]
    fn matching_follows_the_filter_rules_and_retained_order() {
        let retained = Retained::default();
        retained.apply("$SYS/x", 1, Bytes::from_static(b"1"), QoS::AtMostOnce);
        retained.apply("home/b", 3, Bytes::from_static(b"3"), QoS::AtMostOnce);
        retained.apply("home/a", 2, Bytes::from_static(b"2"), QoS::AtMostOnce);
        retained.apply("home", 4, Bytes::from_static(b"4"), QoS::AtMostOnce);
        let topics = |filter| {
            retained
                .matching(filter)
                .into_iter()
                .map(|(topic, _, _)| topic.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(topics("home/#"), ["home/a", "home/b", "home"]);
        assert_eq!(topics("home/+"), ["home/a", "home/b"]);
        assert_eq!(topics("#"), ["home/a", "home/b", "home"]);
        assert_eq!(topics("$SYS/#"), ["$SYS/x"]);
    }
}
