//! cac-edge: calibrated open-vocabulary CLIP classification for edge devices.
//!
//! A [`Classifier`] opens a bundle (the ONNX encoders of the original and the fine-tuned CLIP)
//! and its text-feature cache once, then classifies any number of frames. Every [`Prediction`]
//! carries a confidence calibrated by Contrast-Aware Calibration (or another [`Calibration`]) and
//! a [`Decision`] against a threshold, so "act if confidence ≥ 0.8" means what it says.
//!
//! ```no_run
//! use std::path::Path;
//! use cac_edge::{Classifier, ClassifierOptions, Decision, Runtime};
//!
//! # fn main() -> Result<(), cac_edge::Error> {
//! // The ONNX Runtime library: ORT_DYLIB_PATH, or the default locations (see `runtime`).
//! let runtime = Runtime::load(None)?;
//! let mut classifier = Classifier::open(
//!     &runtime,
//!     Path::new("onnx/demo"),
//!     Path::new("calibration-cache/miniworld-demo.safetensors"),
//!     ClassifierOptions::default(),
//! )?;
//! # let next_frame = || -> Option<image::RgbImage> { None };
//! while let Some(frame) = next_frame() {
//!     let prediction = classifier.classify_frame(&frame)?;
//!     if prediction.decision == Decision::Accept {
//!         println!("{} ({:.2})", prediction.label, prediction.confidence);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The stages of the data path, one module each, for those who need a single step:
//! decode/preprocess ([`preprocess`]) → encode ([`runtime`], [`encode`]) → text-feature cache
//! ([`cache`], built with [`tokenize`] from a [`bundle`]) → logits ([`logits`]) → calibrate
//! ([`calibrate`]) → decide ([`decide`], with the [`threshold`] in force) → report ([`report`]).
//! [`inputs`] expands the paths a user gives into image files; [`doctor`] checks a box before it
//! is trusted.
//!
//! Cargo features: `cli` (the `cac-edge` binary's dependencies) and `tooling` (the `tooling`
//! module: `eval` reports with plots, and `bench`), both on by default. An embedder or a
//! camera-box build turns them off: `cac-edge = { default-features = false }`.
#![warn(missing_docs)]
// stdout carries the JSON lines consumers parse, and a print macro panics on a closed or full
// stream: output goes through `report` (library) or `cli_output` (binary), logs through tracing.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod bundle;
pub mod cache;
pub mod calibrate;
pub mod calibration_path;
pub mod decide;
pub mod doctor;
pub mod drift;
pub mod encode;
pub(crate) mod fsio;
pub mod inputs;
pub mod logits;
mod pipeline;
pub mod preprocess;
pub mod report;
pub mod runtime;
#[cfg(feature = "serve")]
pub mod serve;
pub mod stamp;
pub mod threshold;
pub mod tokenize;
#[cfg(feature = "tooling")]
pub mod tooling;

pub use bundle::Precision;
pub use calibrate::{CacParams, Calibration, CalibrationMethod, CalibrationSettings, ContrastDistance};
pub use decide::Decision;
pub use pipeline::{
    Classifier, ClassifierOptions, EncoderSchedule, ImageEmbeddings, PipelineError as Error, Prediction, RankedClass,
};
pub use preprocess::DecodeLimits;
pub use runtime::{ChosenDevice, Device, Provider, Runtime, SessionOptions};
pub use threshold::{Threshold, ThresholdSource};

#[cfg(target_endian = "big")]
compile_error!("cac-edge reads little-endian safetensors caches in place and supports little-endian targets only");
