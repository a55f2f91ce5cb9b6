//! hearth's house rules as durable JetStream consumers.
//!
//! [`runtime`] is what every rule shares: a durable pull consumer on
//! `HEARTH_EVENTS`, named and described for `nats consumer ls`, events in
//! order, explicit acks, retries with back-off, and a poison event set aside
//! in `HEARTH_DLQ` (with the consumer's name and the error) rather than
//! blocking the rest. [`commands`] issues `hearth.v1.Command`s idempotently:
//! a redelivered event never sends a second command.
//!
//! The rules build on these: [`lights`] (motion lighting), [`security`]
//! (the alarm), [`notify`] (notifications) and [`view`] (the read side),
//! each configured by the [`homes`] file, keeping its state in a KV bucket
//! ([`state`]), storing its own events ([`events`]) and going by a
//! [`clock`] tests can move. [`telemetry`] is what an operator watches:
//! Prometheus metrics and health checks. [`partition`] shares the homes
//! between several processes.

pub mod clock;
pub mod commands;
pub mod daytime;
pub mod events;
pub mod homes;
pub mod lights;
pub mod notify;
pub mod partition;
pub mod runtime;
pub mod security;
pub mod state;
pub mod telemetry;
pub mod view;
