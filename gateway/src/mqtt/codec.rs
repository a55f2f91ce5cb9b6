//! MQTT 3.1.1 and MQTT 5 on the wire, one model inside.
//!
//! The connection speaks MQTT 3.1.1's packets (rumqttc's `v4` types). For a
//! client whose CONNECT says protocol level 5, this codec reads MQTT 5
//! packets (rumqttc's `v5` codec) into their 3.1.1 counterparts, keeping
//! what MQTT 5 adds that hearth uses on the side ([`Extras`]), and writes
//! the connection's packets back as MQTT 5, with reason codes and the
//! CONNACK properties that tell the client what the gateway does not do
//! (topic aliases, shared subscriptions, subscription identifiers).
//!
//! Not done for MQTT 5 (yet): enhanced authentication (AUTH), the session
//! expiry timer (sessions are kept until a clean start), message expiry,
//! will delay, and the subscription options no-local, retain-as-published
//! and retain handling (ignored). A topic alias closes the connection with
//! reason 0x94: the CONNACK says the maximum is 0.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, v4, QoS};
use rumqttc::v5::mqttbytes as m5b;
use rumqttc::v5::mqttbytes::v5;
use tokio_util::codec::{Decoder, Encoder};
use tracing::debug;

/// What an MQTT 5 packet carries beyond its 3.1.1 counterpart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extras {
    /// User properties of a PUBLISH (routed as NATS headers) or of the will.
    pub(crate) user_properties: Vec<(String, String)>,
    /// The CONNECT's session expiry interval, seconds: 0 (or none) means the
    /// session ends with the connection.
    pub(crate) session_expiry: Option<u32>,
    /// The CONNECT's clean start.
    pub(crate) clean_start: bool,
}

/// A packet read from a client.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) packet: v4::Packet,
    /// Only for MQTT 5 clients.
    pub(crate) extras: Option<Box<Extras>>,
}

/// The reading and the writing half each have one; they share what the
/// CONNECT said.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    v4: v4::Codec,
    max_packet_size: usize,
    shared: Arc<Shared>,
    /// User properties for the next PUBLISH written (MQTT 5 only).
    properties: Vec<(String, String)>,
    /// The reason of a DISCONNECT written (MQTT 5 only).
    goodbye: Option<v5::DisconnectReasonCode>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Whether the first packet (CONNECT) was read.
    decided: AtomicBool,
    v5: AtomicBool,
    /// Why an MQTT 5 packet was refused, for the DISCONNECT that says so.
    refusal: Mutex<Option<v5::DisconnectReasonCode>>,
    /// Filters per UNSUBSCRIBE packet id: an MQTT 5 UNSUBACK has a reason
    /// code for each.
    unsubscribing: Mutex<HashMap<u16, usize>>,
}

impl Codec {
    pub(crate) fn new(max_packet_size: usize) -> Self {
        Self {
            v4: v4::Codec {
                max_incoming_size: max_packet_size,
                max_outgoing_size: max_packet_size,
            },
            max_packet_size,
            shared: Arc::default(),
            properties: Vec::new(),
            goodbye: None,
        }
    }

    /// Gives the next PUBLISH written these MQTT 5 user properties.
    pub(crate) fn attach_properties(&mut self, properties: Vec<(String, String)>) {
        self.properties = properties;
    }

    /// Makes the next DISCONNECT written carry `reason`. DISCONNECT is
    /// written for MQTT 5 clients only: 3.1.1 servers never send it.
    pub(crate) fn disconnect_with(&mut self, reason: v5::DisconnectReasonCode) {
        self.goodbye = Some(reason);
    }

    fn is_v5(&self) -> bool {
        self.shared.v5.load(Ordering::Relaxed)
    }

    fn limit(&self) -> Option<u32> {
        u32::try_from(self.max_packet_size).ok()
    }
}

/// The protocol level of a complete-enough CONNECT at the start of `src`.
fn connect_level(src: &[u8]) -> Option<u8> {
    if src.first()? >> 4 != 1 {
        return None;
    }
    // Skip the remaining-length varint (1 to 4 bytes).
    let mut at = 1;
    while *src.get(at)? & 0x80 != 0 {
        at += 1;
        if at > 4 {
            return None;
        }
    }
    at += 1;
    let name_length = usize::from(u16::from_be_bytes([*src.get(at)?, *src.get(at + 1)?]));
    src.get(at + 2 + name_length).copied()
}

impl Decoder for Codec {
    type Item = Inbound;
    type Error = mqttbytes::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, Self::Error> {
        if !self.shared.decided.load(Ordering::Relaxed) {
            if src.len() < 2 {
                return Ok(None);
            }
            if connect_level(src) == Some(5) {
                self.shared.v5.store(true, Ordering::Relaxed);
            }
            if connect_level(src).is_some() || src[0] >> 4 != 1 {
                self.shared.decided.store(true, Ordering::Relaxed);
            }
        }
        if !self.is_v5() {
            return Ok(self.v4.decode(src)?.map(|packet| Inbound {
                packet,
                extras: None,
            }));
        }
        if src.starts_with(&[0xE0, 0x00]) {
            // A plain DISCONNECT (reason 0, no properties) as most clients
            // send it: rumqttc's reader wants a payload for it.
            let _ = src.split_to(2);
            return Ok(Some(Inbound {
                packet: v4::Packet::Disconnect,
                extras: None,
            }));
        }
        match v5::Packet::read(src, self.limit()) {
            Ok(packet) => from_v5(packet).map(Some).map_err(|Refused(error, reason)| {
                *self
                    .shared
                    .refusal
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
                error
            }),
            Err(m5b::Error::InsufficientBytes(more)) => {
                src.reserve(more);
                Ok(None)
            }
            Err(error) => Err(v4_error(error)),
        }
    }
}

impl Encoder<v4::Packet> for Codec {
    type Error = mqttbytes::Error;

    fn encode(&mut self, packet: v4::Packet, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let properties = std::mem::take(&mut self.properties);
        if !self.is_v5() {
            if packet == v4::Packet::Disconnect {
                return Ok(());
            }
            return self.v4.encode(packet, dst);
        }
        let packet = match (packet, self.goodbye.take()) {
            (v4::Packet::Disconnect, Some(reason)) => v5::Packet::Disconnect(goodbye(reason)),
            (packet, _) => self.to_v5(packet, properties),
        };
        packet
            .write(dst, self.limit())
            .map(|_| ())
            .map_err(v4_error)
    }
}

impl Codec {
    fn to_v5(&self, packet: v4::Packet, user_properties: Vec<(String, String)>) -> v5::Packet {
        match packet {
            v4::Packet::ConnAck(ack) => v5::Packet::ConnAck(v5::ConnAck {
                session_present: ack.session_present,
                code: connack_code(ack.code),
                properties: (ack.code == v4::ConnectReturnCode::Success).then(|| {
                    v5::ConnAckProperties {
                        session_expiry_interval: None,
                        receive_max: None,
                        max_qos: None,
                        retain_available: Some(1),
                        max_packet_size: self.limit(),
                        assigned_client_identifier: None,
                        // What the gateway does not do, said up front.
                        topic_alias_max: Some(0),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: Some(1),
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: Some(0),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    }
                }),
            }),
            v4::Packet::Publish(publish) => v5::Packet::Publish(v5::Publish {
                dup: publish.dup,
                qos: v5_qos(publish.qos),
                retain: publish.retain,
                topic: Bytes::from(publish.topic),
                pkid: publish.pkid,
                payload: publish.payload,
                properties: (!user_properties.is_empty()).then(|| v5::PublishProperties {
                    user_properties,
                    ..Default::default()
                }),
            }),
            v4::Packet::PubAck(ack) => v5::Packet::PubAck(v5::PubAck {
                pkid: ack.pkid,
                reason: v5::PubAckReason::Success,
                properties: None,
            }),
            v4::Packet::PubRec(rec) => v5::Packet::PubRec(v5::PubRec {
                pkid: rec.pkid,
                reason: v5::PubRecReason::Success,
                properties: None,
            }),
            v4::Packet::PubRel(rel) => v5::Packet::PubRel(v5::PubRel {
                pkid: rel.pkid,
                reason: v5::PubRelReason::Success,
                properties: None,
            }),
            v4::Packet::PubComp(comp) => v5::Packet::PubComp(v5::PubComp {
                pkid: comp.pkid,
                reason: v5::PubCompReason::Success,
                properties: None,
            }),
            v4::Packet::SubAck(ack) => v5::Packet::SubAck(v5::SubAck {
                pkid: ack.pkid,
                return_codes: ack
                    .return_codes
                    .into_iter()
                    .map(|code| match code {
                        v4::SubscribeReasonCode::Success(qos) => {
                            v5::SubscribeReasonCode::Success(v5_qos(qos))
                        }
                        // Refusals are invalid filters or the ACL.
                        v4::SubscribeReasonCode::Failure => v5::SubscribeReasonCode::NotAuthorized,
                    })
                    .collect(),
                properties: None,
            }),
            v4::Packet::UnsubAck(ack) => {
                let count = self
                    .shared
                    .unsubscribing
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(&ack.pkid)
                    .unwrap_or(1);
                v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: ack.pkid,
                    reasons: vec![v5::UnsubAckReason::Success; count],
                    properties: None,
                })
            }
            v4::Packet::PingResp => v5::Packet::PingResp(v5::PingResp),
            v4::Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
            v4::Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect {
                reason_code: v5::DisconnectReasonCode::NormalDisconnection,
                properties: None,
            }),
            // Client-to-server packets the gateway never writes.
            v4::Packet::Connect(_) | v4::Packet::Subscribe(_) | v4::Packet::Unsubscribe(_) => {
                v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: v5::DisconnectReasonCode::ImplementationSpecificError,
                    properties: None,
                })
            }
        }
    }
}

/// A DISCONNECT with `reason` and a reason string saying it in words.
/// (Always with properties: rumqttc 0.25 miscounts the length of a
/// DISCONNECT with a reason code and no properties.)
fn goodbye(reason: v5::DisconnectReasonCode) -> v5::Disconnect {
    let words = match reason {
        v5::DisconnectReasonCode::TopicAliasInvalid => {
            Some("topic aliases are not supported (Topic Alias Maximum is 0)")
        }
        v5::DisconnectReasonCode::ProtocolError => Some("protocol error"),
        v5::DisconnectReasonCode::ImplementationSpecificError => {
            Some("not supported by hearth (enhanced authentication, AUTH)")
        }
        _ => None,
    };
    v5::Disconnect {
        reason_code: reason,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: words.map(str::to_owned),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }
}

/// An MQTT 5 packet the gateway does not take, and the reason to give.
struct Refused(mqttbytes::Error, Option<v5::DisconnectReasonCode>);

impl From<mqttbytes::Error> for Refused {
    fn from(error: mqttbytes::Error) -> Self {
        Self(error, None)
    }
}

/// An MQTT 5 packet as its 3.1.1 counterpart.
fn from_v5(packet: v5::Packet) -> Result<Inbound, Refused> {
    let plain = |packet| {
        Ok(Inbound {
            packet,
            extras: None,
        })
    };
    match packet {
        v5::Packet::Connect(connect, will, login) => {
            let properties = connect
                .properties
                .unwrap_or_else(v5::ConnectProperties::new);
            let mut extras = Extras {
                session_expiry: properties.session_expiry_interval,
                clean_start: connect.clean_start,
                ..Extras::default()
            };
            let last_will = will
                .map(|will| {
                    if let Some(properties) = will.properties {
                        extras.user_properties = properties.user_properties;
                    }
                    Ok::<_, mqttbytes::Error>(v4::LastWill {
                        topic: utf8(will.topic)?,
                        message: will.message,
                        qos: v4_qos(will.qos),
                        retain: will.retain,
                    })
                })
                .transpose()?;
            Ok(Inbound {
                packet: v4::Packet::Connect(v4::Connect {
                    protocol: mqttbytes::Protocol::V4,
                    keep_alive: connect.keep_alive,
                    client_id: connect.client_id,
                    // A session is kept when it is to outlive the connection.
                    clean_session: properties.session_expiry_interval.unwrap_or(0) == 0,
                    last_will,
                    login: login.map(|login| v4::Login {
                        username: login.username,
                        password: login.password,
                    }),
                }),
                extras: Some(Box::new(extras)),
            })
        }
        v5::Packet::Publish(publish) => {
            let properties = publish.properties.unwrap_or_default();
            if properties.topic_alias.is_some() {
                // The CONNACK said the maximum is 0.
                return Err(Refused(
                    mqttbytes::Error::MalformedPacket,
                    Some(v5::DisconnectReasonCode::TopicAliasInvalid),
                ));
            }
            let extras = (!properties.user_properties.is_empty()).then(|| {
                Box::new(Extras {
                    user_properties: properties.user_properties,
                    ..Extras::default()
                })
            });
            Ok(Inbound {
                packet: v4::Packet::Publish(v4::Publish {
                    dup: publish.dup,
                    qos: v4_qos(publish.qos),
                    retain: publish.retain,
                    topic: utf8(publish.topic)?,
                    pkid: publish.pkid,
                    payload: publish.payload,
                }),
                extras,
            })
        }
        v5::Packet::Subscribe(subscribe) => plain(v4::Packet::Subscribe(v4::Subscribe {
            pkid: subscribe.pkid,
            filters: subscribe
                .filters
                .into_iter()
                .map(|filter| v4::SubscribeFilter::new(filter.path, v4_qos(filter.qos)))
                .collect(),
        })),
        v5::Packet::Unsubscribe(unsubscribe) => plain(v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: unsubscribe.pkid,
            topics: unsubscribe.filters,
        })),
        v5::Packet::PubAck(ack) => plain(v4::Packet::PubAck(v4::PubAck::new(ack.pkid))),
        v5::Packet::PubRec(rec) => plain(v4::Packet::PubRec(v4::PubRec::new(rec.pkid))),
        v5::Packet::PubRel(rel) => plain(v4::Packet::PubRel(v4::PubRel::new(rel.pkid))),
        v5::Packet::PubComp(comp) => plain(v4::Packet::PubComp(v4::PubComp::new(comp.pkid))),
        v5::Packet::PingReq(_) => plain(v4::Packet::PingReq),
        v5::Packet::Disconnect(disconnect) => {
            if disconnect.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage {
                // Asks for the will: as if the connection were lost.
                return Err(mqttbytes::Error::Io(std::io::Error::other(
                    "the client disconnected asking for its will",
                ))
                .into());
            }
            plain(v4::Packet::Disconnect)
        }
        v5::Packet::Auth(_) => Err(Refused(
            mqttbytes::Error::InvalidPacketType(15),
            Some(v5::DisconnectReasonCode::ImplementationSpecificError),
        )),
        // Server-to-client packets.
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => Err(mqttbytes::Error::MalformedPacket.into()),
    }
}

impl Codec {
    /// Notes an UNSUBSCRIBE's filter count for its MQTT 5 UNSUBACK.
    pub(crate) fn unsubscribing(&self, pkid: u16, filters: usize) {
        if self.is_v5() {
            self.shared
                .unsubscribing
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(pkid, filters);
        }
    }

    /// Why the last MQTT 5 packet was refused, when the reason is specific.
    pub(crate) fn refusal(&self) -> v5::DisconnectReasonCode {
        self.shared
            .refusal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .unwrap_or(v5::DisconnectReasonCode::ProtocolError)
    }

    /// Whether the client speaks MQTT 5.
    pub(crate) fn v5(&self) -> bool {
        self.is_v5()
    }
}

fn utf8(bytes: Bytes) -> Result<String, mqttbytes::Error> {
    String::from_utf8(bytes.to_vec()).map_err(|_| mqttbytes::Error::TopicNotUtf8)
}

fn v4_qos(qos: m5b::QoS) -> QoS {
    match qos {
        m5b::QoS::AtMostOnce => QoS::AtMostOnce,
        m5b::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m5b::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: QoS) -> m5b::QoS {
    match qos {
        QoS::AtMostOnce => m5b::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5b::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5b::QoS::ExactlyOnce,
    }
}

fn connack_code(code: v4::ConnectReturnCode) -> v5::ConnectReturnCode {
    match code {
        v4::ConnectReturnCode::Success => v5::ConnectReturnCode::Success,
        v4::ConnectReturnCode::RefusedProtocolVersion => {
            v5::ConnectReturnCode::UnsupportedProtocolVersion
        }
        v4::ConnectReturnCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
        v4::ConnectReturnCode::ServiceUnavailable => v5::ConnectReturnCode::ServerUnavailable,
        v4::ConnectReturnCode::BadUserNamePassword => v5::ConnectReturnCode::BadUserNamePassword,
        v4::ConnectReturnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
    }
}

fn v4_error(error: m5b::Error) -> mqttbytes::Error {
    match error {
        m5b::Error::Io(error) => mqttbytes::Error::Io(error),
        m5b::Error::PayloadSizeLimitExceeded { pkt_size, .. } => {
            mqttbytes::Error::PayloadSizeLimitExceeded(pkt_size)
        }
        m5b::Error::OutgoingPacketTooLarge { pkt_size, max } => {
            mqttbytes::Error::OutgoingPacketTooLarge {
                pkt_size: pkt_size as usize,
                max: max as usize,
            }
        }
        other => {
            debug!(error = %other, "MQTT 5 packet not understood");
            mqttbytes::Error::MalformedPacket
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_bytes(packet: v5::Packet) -> BytesMut {
        let mut bytes = BytesMut::new();
        packet.write(&mut bytes, None).unwrap();
        bytes
    }

    #[test]
    fn the_connect_decides_the_protocol() {
        let mut codec = Codec::new(1 << 16);
        let mut connect = v5::Connect {
            keep_alive: 30,
            client_id: "five".into(),
            clean_start: false,
            properties: None,
        };
        connect.properties = Some(v5::ConnectProperties {
            session_expiry_interval: Some(3600),
            ..v5::ConnectProperties::new()
        });
        let mut src = v5_bytes(v5::Packet::Connect(connect, None, None));
        let inbound = codec.decode(&mut src).unwrap().unwrap();
        let v4::Packet::Connect(connect) = inbound.packet else {
            panic!("{inbound:?}")
        };
        assert_eq!(connect.client_id, "five");
        assert!(!connect.clean_session, "a session expiry keeps the session");
        assert_eq!(inbound.extras.unwrap().session_expiry, Some(3600));
        assert!(codec.v5());

        // Written back as MQTT 5, with what the gateway supports.
        let mut out = BytesMut::new();
        codec
            .encode(
                v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, true)),
                &mut out,
            )
            .unwrap();
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::ConnAck(ack) => {
                assert!(ack.session_present);
                assert_eq!(ack.properties.unwrap().topic_alias_max, Some(0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mqtt_3_1_1_passes_through() {
        let mut codec = Codec::new(1 << 16);
        let mut src = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("four"))
            .write(&mut src, 1 << 16)
            .unwrap();
        let inbound = codec.decode(&mut src).unwrap().unwrap();
        assert!(inbound.extras.is_none());
        assert!(!codec.v5());
    }

    #[test]
    fn user_properties_come_through_and_topic_aliases_are_refused() {
        let mut codec = Codec::new(1 << 16);
        codec.shared.v5.store(true, Ordering::Relaxed);
        let publish = |alias| {
            v5::Packet::Publish(v5::Publish {
                dup: false,
                qos: m5b::QoS::AtLeastOnce,
                retain: false,
                topic: Bytes::from_static(b"a/b"),
                pkid: 3,
                payload: Bytes::from_static(b"x"),
                properties: Some(v5::PublishProperties {
                    topic_alias: alias,
                    user_properties: vec![("room".into(), "hall".into())],
                    ..Default::default()
                }),
            })
        };
        let inbound = codec.decode(&mut v5_bytes(publish(None))).unwrap().unwrap();
        assert!(
            matches!(inbound.packet, v4::Packet::Publish(ref p) if p.topic == "a/b" && p.pkid == 3)
        );
        assert_eq!(
            inbound.extras.unwrap().user_properties,
            [("room".to_owned(), "hall".to_owned())]
        );
        assert!(codec.decode(&mut v5_bytes(publish(Some(1)))).is_err());
    }

    #[test]
    fn a_plain_mqtt5_disconnect_is_a_disconnect() {
        let mut codec = Codec::new(1 << 16);
        codec.shared.v5.store(true, Ordering::Relaxed);
        codec.shared.decided.store(true, Ordering::Relaxed);
        let mut src = BytesMut::from(&[0xE0u8, 0x00, 0xC0, 0x00][..]);
        let first = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!(first.packet, v4::Packet::Disconnect);
        let second = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!(
            second.packet,
            v4::Packet::PingReq,
            "the stream stays in step"
        );
    }

    #[test]
    fn a_partial_connect_waits_for_more_bytes() {
        let mut codec = Codec::new(1 << 16);
        let full = v5_bytes(v5::Packet::Connect(
            v5::Connect {
                keep_alive: 5,
                client_id: "x".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        ));
        for cut in 1..full.len() {
            let mut codec = codec.clone();
            codec.shared = Arc::default();
            let mut partial = BytesMut::from(&full[..cut]);
            assert!(
                codec.decode(&mut partial).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        assert!(codec.decode(&mut full.clone()).unwrap().is_some());
    }
}
