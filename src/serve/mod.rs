//! The always-on camera service behind `cac-edge serve` (feature `serve`).
//!
//! Frame path: each camera's source thread ([`sources`]) puts the newest frame into the camera's
//! one-slot [`frame::Mailbox`]; one scheduler takes the frames that are due (fps cap, staleness),
//! classifies them in one encoder batch, debounces each camera's published state and hands every
//! decision to the outputs.

pub mod frame;
pub mod sources;

pub mod api;
pub mod camera;
pub mod config;
pub mod doctor;
pub mod metrics;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod output;
pub mod review;
mod scheduler;
pub mod service;
pub mod state;
pub mod systemd;

pub use config::{ConfigError, ServeConfig};
pub use service::{ServeError, Service};
