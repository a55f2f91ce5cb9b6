use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

/// How a message's body is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// The proto3 JSON mapping: readable with `nats stream view`.
    #[default]
    Json,
    /// Protobuf binary: smaller and faster.
    Protobuf,
}

/// A stored body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Encoding {
    /// The value of the `Content-Type` header.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Protobuf => "application/x-protobuf",
        }
    }

    /// The encoding a `Content-Type` header names, if any.
    pub fn from_content_type(value: &str) -> Option<Self> {
        match value.split(';').next().map(str::trim) {
            Some("application/json") => Some(Self::Json),
            Some("application/x-protobuf" | "application/protobuf") => Some(Self::Protobuf),
            _ => None,
        }
    }

    pub fn encode<M: prost::Message + Serialize>(self, message: &M) -> Bytes {
        match self {
            Self::Protobuf => message.encode_to_vec().into(),
            // Serialising generated types into a Vec cannot fail: every field
            // has a JSON representation and no map has non-string keys.
            Self::Json => {
                // Sized for a typical event, so that it is written without
                // growing the buffer.
                let mut buffer = Vec::with_capacity(512);
                serde_json::to_writer(&mut buffer, message)
                    .expect("generated messages always serialise to JSON");
                buffer.into()
            }
        }
    }

    /// Decodes a stored message by its `Content-Type` header (JSON when
    /// there is none, as for a message published by hand).
    pub fn decode_stored<M: prost::Message + Default + DeserializeOwned>(
        content_type: Option<&str>,
        bytes: &[u8],
    ) -> Result<M, String> {
        let encoding = match content_type {
            None => Self::Json,
            Some(value) => Self::from_content_type(value)
                .ok_or_else(|| format!("unknown Content-Type {value:?}"))?,
        };
        encoding.decode(bytes).map_err(|error| error.to_string())
    }

    pub fn decode<M: prost::Message + Default + DeserializeOwned>(
        self,
        bytes: &[u8],
    ) -> Result<M, DecodeError> {
        Ok(match self {
            Self::Protobuf => M::decode(bytes)?,
            Self::Json => serde_json::from_slice(bytes)?,
        })
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "protobuf" | "proto" => Ok(Self::Protobuf),
            other => Err(format!(
                "unknown encoding `{other}`: expected `json` or `protobuf`"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{event::Body, Event, LightState, Source};

    fn sample() -> Event {
        Event {
            id: "0190f1c2-0000-7000-8000-000000000001".into(),
            correlation_id: "c1".into(),
            home: "home".into(),
            room: "Living Room".into(),
            device: "lamp".into(),
            received_at: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            source: Some(Source {
                convention: "native".into(),
                client_id: "dev1".into(),
                topic: "hearth/home/living/lamp/light".into(),
            }),
            body: Some(Body::Light(LightState {
                on: true,
                brightness_pct: Some(40),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn json_encoding_follows_the_proto3_json_mapping() {
        let json: serde_json::Value =
            serde_json::from_slice(&Encoding::Json.encode(&sample())).unwrap();
        assert_eq!(json["correlationId"], "c1");
        // pbjson writes the offset as `+00:00` where the mapping prefers `Z`;
        // both are RFC 3339 and every proto3 JSON parser accepts either.
        let received_at = json["receivedAt"].as_str().unwrap();
        assert!(
            received_at.starts_with("2023-11-14T22:13:20.005"),
            "{received_at}"
        );
        assert_eq!(json["light"]["on"], true);
        assert_eq!(json["light"]["brightnessPct"], 40);
        // Fields at their default are written too: a false reading is a
        // reading, and readers of `nats stream view` should see it.
        assert_eq!(json["causationId"], "");
        let off = Event {
            body: Some(Body::Light(LightState {
                on: false,
                brightness_pct: None,
            })),
            ..sample()
        };
        let json: serde_json::Value = serde_json::from_slice(&Encoding::Json.encode(&off)).unwrap();
        assert_eq!(json["light"]["on"], false);
    }

    #[test]
    fn both_encodings_round_trip() {
        for encoding in [Encoding::Json, Encoding::Protobuf] {
            let bytes = encoding.encode(&sample());
            let back: Event = encoding.decode(&bytes).unwrap();
            assert_eq!(back, sample(), "{encoding:?}");
        }
    }

    #[test]
    fn content_type_names_the_encoding_both_ways() {
        for encoding in [Encoding::Json, Encoding::Protobuf] {
            assert_eq!(
                Encoding::from_content_type(encoding.content_type()),
                Some(encoding)
            );
        }
        assert_eq!(
            Encoding::from_content_type("application/json; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(Encoding::Json.decode::<Event>(b"{not json").is_err());
        assert!(Encoding::Protobuf
            .decode::<Event>(&[0xff, 0xff, 0xff])
            .is_err());
    }
}
