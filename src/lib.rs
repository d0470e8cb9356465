//! cac-edge: calibrated open-vocabulary CLIP classification for edge devices.
//!
//! The data path, one module per stage:
//! decode/preprocess ([`preprocess`]) → encode ([`runtime`], [`encode`]) → text-feature cache
//! ([`cache`]) → logits ([`logits`]) → calibrate ([`calibrate`]) → decide ([`decide`]) →
//! report ([`report`]). [`pipeline::Classifier`] ties them together: open a bundle and a cache
//! once, classify many images or frames. [`doctor`] checks a box before it is trusted.
//!
//! Before deployment, `eval` measures calibration on labeled images: [`dataset`] (labeled sets)
//! → [`features`] (image embeddings stored beside the cache) → [`eval`] (calibrators, fitting,
//! thresholds, using [`metrics`]) → [`eval_report`] (JSON, Markdown and [`plots`]). [`bench`]
//! measures the speed of each stage.

pub mod bench;
pub mod bundle;
pub mod cache;
pub mod calibrate;
pub mod dataset;
pub mod decide;
pub mod doctor;
pub mod encode;
pub mod eval;
pub mod eval_report;
pub mod features;
pub mod inputs;
pub mod logits;
pub mod metrics;
pub mod pipeline;
pub mod plots;
pub mod preprocess;
pub mod report;
pub mod runtime;
pub mod tokenize;

#[cfg(target_endian = "big")]
compile_error!("cac-edge reads little-endian safetensors caches in place and supports little-endian targets only");
