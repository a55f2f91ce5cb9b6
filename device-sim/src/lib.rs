//! hearth-sim: simulated smart homes speaking MQTT to hearth, and a judge of
//! what the system did with their events.
//!
//! [`model`] is the world without I/O (homes, people, sensors), stepped on
//! a [`clock`] that may run faster than real time; [`devices`] puts each
//! device on its own MQTT connection; [`scenario`] names what happens and
//! what must follow, [`check`] judges it; [`measure`], [`progress`] and
//! [`report`] say how it went; [`run`] ties them together.

pub mod check;
pub mod clock;
pub mod correlate;
pub mod devices;
pub mod homes_file;
pub mod measure;
pub mod model;
pub mod options;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenario;
pub mod tls;
