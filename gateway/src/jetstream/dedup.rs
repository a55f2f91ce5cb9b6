//! Exactly-once ingest of QoS 1/2 publishes.
//!
//! JetStream drops a message whose `Nats-Msg-Id` it has seen within the
//! stream's duplicate window. The id must therefore be the same for a device's
//! retransmission (DUP set, same packet id, same topic and payload: after a
//! lost PUBACK, a reconnect or a gateway restart) and different for a new
//! reading, even one that repeats an earlier one byte for byte.
//!
//! The id is `<client>-<packet id>-<content>-<generation>-<index>`: hashes of
//! the client id and of topic and payload, the packet id, which generation of
//! this exact content under this packet id it is, and the index of the event
//! within the publish (a Zigbee2MQTT report becomes several events).
//!
//! The generation is 0 for almost every publish, so the common path needs no
//! state at all. A non-DUP publish is by definition new: if JetStream says its
//! id is a duplicate, the gateway reads the stored message and compares its
//! correlation id (unique per received publish) with its own. The same one
//! means an earlier attempt of this very publish was stored (a retry after a
//! lost ack); another means an older identical reading (say a deep-sleeping
//! sensor that always uses packet id 1), so the generation goes up and the
//! publish is stored under the new id. Before publishing under a generation
//! above 0 the gateway records it in a KV bucket, so that a DUP
//! retransmission, which does not know its original's generation, finds it
//! there, also after a gateway restart or on another gateway instance.

use async_nats::jetstream::kv;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// What identifies one publish's content for deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupKey {
    client: u64,
    packet_id: u16,
    content: u64,
}

impl DedupKey {
    pub fn new(client_id: &str, packet_id: u16, topic: &str, payload: &[u8]) -> Self {
        // Length-prefixing the topic keeps ("ab", "c") and ("a", "bc") apart.
        // Streamed: the same digest as hashing the concatenation, without
        // copying the payload.
        let mut content = Xxh3::new();
        content.update(&(topic.len() as u64).to_be_bytes());
        content.update(topic.as_bytes());
        content.update(payload);
        Self {
            client: xxh3_64(client_id.as_bytes()),
            packet_id,
            content: content.digest(),
        }
    }

    /// The `Nats-Msg-Id` of event `index` of this publish at `generation`.
    pub fn message_id(&self, generation: u32, index: usize) -> String {
        format!(
            "{:016x}-{}-{:016x}-{generation}-{index}",
            self.client, self.packet_id, self.content
        )
    }

    /// The `Nats-Msg-Id` of this publish's copy queued for the persistent
    /// session of `target` at `generation`: by the session, not by position,
    /// so that a retry that finds other sessions subscribed cannot mistake
    /// one session's copy for another's.
    pub fn queued_id(&self, generation: u32, target: &str) -> String {
        format!(
            "{:016x}-{}-{:016x}-{generation}-q{:016x}",
            self.client,
            self.packet_id,
            self.content,
            xxh3_64(target.as_bytes())
        )
    }

    fn kv_key(&self) -> String {
        format!(
            "{:016x}.{}.{:016x}",
            self.client, self.packet_id, self.content
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("cannot read the generation of a retransmitted publish: {0}")]
    Read(#[from] kv::EntryError),
    #[error("cannot record the generation of a repeated publish: {0}")]
    Write(#[from] kv::PutError),
    #[error("corrupt generation entry {0:?} in the dedup bucket")]
    Corrupt(String),
}

/// The generations of repeated publishes, in a KV bucket.
#[derive(Debug, Clone)]
pub struct Generations {
    bucket: kv::Store,
}

impl Generations {
    pub fn new(bucket: kv::Store) -> Self {
        Self { bucket }
    }

    /// The generation a retransmission's original was stored under.
    pub async fn get(&self, key: &DedupKey) -> Result<u32, DedupError> {
        match self.bucket.get(key.kv_key()).await? {
            None => Ok(0),
            Some(value) => std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| DedupError::Corrupt(String::from_utf8_lossy(&value).into_owned())),
        }
    }

    /// Records `generation` before anything is published under it.
    pub async fn record(&self, key: &DedupKey, generation: u32) -> Result<(), DedupError> {
        self.bucket
            .put(key.kv_key(), generation.to_string().into())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retransmission_gets_the_same_id_as_its_original() {
        let original = DedupKey::new(
            "sensor-1",
            7,
            "hearth/h/r/d/motion",
            br#"{"detected":true}"#,
        );
        let retransmission = DedupKey::new(
            "sensor-1",
            7,
            "hearth/h/r/d/motion",
            br#"{"detected":true}"#,
        );
        assert_eq!(original.message_id(0, 0), retransmission.message_id(0, 0));
    }

    #[test]
    fn ids_differ_by_client_packet_id_content_generation_and_index() {
        let base = DedupKey::new("c", 1, "t", b"p");
        let id = base.message_id(0, 0);
        assert_ne!(id, DedupKey::new("c2", 1, "t", b"p").message_id(0, 0));
        assert_ne!(id, DedupKey::new("c", 2, "t", b"p").message_id(0, 0));
        assert_ne!(id, DedupKey::new("c", 1, "t", b"q").message_id(0, 0));
        assert_ne!(id, DedupKey::new("c", 1, "u", b"p").message_id(0, 0));
        assert_ne!(id, base.message_id(1, 0));
        assert_ne!(id, base.message_id(0, 1));
    }

    #[test]
    fn topic_and_payload_boundaries_are_not_ambiguous() {
        assert_ne!(
            DedupKey::new("c", 1, "ab", b"c").message_id(0, 0),
            DedupKey::new("c", 1, "a", b"bc").message_id(0, 0)
        );
    }

    #[test]
    fn ids_are_stable_across_releases() {
        // Ids stored before an upgrade must match after it: this pins the
        // hash function and the layout.
        assert_eq!(
            DedupKey::new("sensor-1", 7, "t", b"p").message_id(2, 1),
            "bb05c9a08b99653a-7-4a716c44f8506cb3-2-1"
        );
    }

    #[test]
    fn kv_keys_use_only_characters_nats_kv_allows() {
        let key = DedupKey::new("weird id with spaces.and*dots>", 65535, "t", b"p").kv_key();
        assert!(key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=' | '/')));
    }
}
