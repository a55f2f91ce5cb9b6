//! hearth-gateway: an MQTT server for devices whose every publish is decoded
//! by a payload convention, normalised into `hearth.v1.Event` and stored in
//! NATS JetStream before the device is acknowledged.
//!
//! The pieces, from the wire inwards:
//! - [`mqtt`]: the listener (limits, shutdown) and one handler per connection
//!   speaking MQTT 3.1.1 through rumqttc's codec;
//! - the store pipeline (`ingest`): per connection, decode → encode → publish
//!   to JetStream, many in flight, acknowledged to the device in order only
//!   once JetStream stored them;
//! - the router (`broker`): publish/subscribe between MQTT clients, through
//!   NATS so that gateways on one cluster act as one broker;
//! - the bridge (`bridge`): the gateway as a client of an existing broker
//!   (Mosquitto), storing what it subscribes to through the same pipeline;
//! - [`conventions`]: topic and payload conventions (native, Zigbee2MQTT);
//! - [`jetstream`]: the streams and the exactly-once publishing;
//! - [`embedded`]: a supervised local nats-server when no NATS URL is given.

pub mod auth;
mod bridge;
mod broker;
mod commands;
pub mod config;
pub mod conventions;
mod deadline;
mod devices;
pub mod embedded;
mod http;
mod ingest;
pub mod jetstream;
pub mod mqtt;
mod server;
mod sessions;
pub mod telemetry;
/// NATS subjects and how names become subject tokens (part of the contract,
/// in `hearth-proto`).
pub use hearth_proto::subject;

pub use server::{Gateway, GatewayError};
