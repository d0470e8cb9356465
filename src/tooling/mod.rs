//! Before deployment (cargo feature `tooling`, on by default): measuring calibration and speed.
//! A camera box does not need any of it, and its build leaves it out (`--no-default-features`).
//!
//! `eval`: [`dataset`] (labeled sets) → [`features`] (image embeddings stored beside the cache)
//! → [`eval`] (calibrators, fitting, thresholds, using [`metrics`]) → [`eval_report`] (JSON,
//! Markdown and [`plots`]). [`bench`](mod@bench) measures the speed of each stage.

pub mod bench;
pub mod dataset;
pub mod eval;
pub mod eval_report;
pub mod eval_run;
pub mod features;
pub mod metrics;
pub mod plots;
