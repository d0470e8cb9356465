//! The decision threshold in force, and the one `eval --write-threshold` stores in the cache.
//!
//! A stored threshold is kept beside the calibration it was chosen for (as JSON): it means nothing
//! under another calibration, so it is used only while that same calibration is in force. Reading
//! ([`resolve`]) and writing ([`stored_threshold_entries`]) both live here; the cache only keeps
//! the two metadata entries (see docs/FORMATS.md).

use crate::cache::TextFeatureCache;
use crate::calibrate::Calibration;
use crate::decide::validate_threshold;

/// Cache metadata key of a threshold chosen by `eval --write-threshold`.
pub const THRESHOLD_KEY: &str = "threshold";
/// Cache metadata key of the calibration (its JSON, [`calibration_key`]) the threshold was chosen for.
pub const THRESHOLD_CALIBRATION_KEY: &str = "threshold_calibration";
/// The threshold used when none is given and the cache holds none for the calibration in force.
pub const DEFAULT_THRESHOLD: f64 = 0.8;

/// Where a threshold came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdSource {
    /// Given by the caller (`--threshold`).
    Caller,
    /// Chosen by `eval --write-threshold` for the calibration in force, and stored in the cache.
    Cache,
    /// [`DEFAULT_THRESHOLD`].
    Default,
}

impl std::fmt::Display for ThresholdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThresholdSource::Caller => "command line",
            ThresholdSource::Cache => "cache",
            ThresholdSource::Default => "default",
        })
    }
}

/// A decision threshold and its origin.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Threshold {
    /// Accept a prediction whose calibrated confidence is at least this.
    pub value: f64,
    /// Where `value` came from.
    pub source: ThresholdSource,
}

/// The threshold in force: the caller's, else the one stored in the cache for this same
/// calibration, else [`DEFAULT_THRESHOLD`].
pub fn resolve(requested: Option<f64>, cache: &TextFeatureCache, calibration: &Calibration) -> Threshold {
    if let Some(value) = requested {
        return Threshold { value, source: ThresholdSource::Caller };
    }
    let metadata = cache.metadata();
    let stored = metadata.get(THRESHOLD_KEY).and_then(|value| value.parse::<f64>().ok());
    let chosen_for = metadata.get(THRESHOLD_CALIBRATION_KEY).map(String::as_str);
    match stored {
        Some(value) if validate_threshold(value).is_ok() && chosen_for == Some(calibration_key(calibration).as_str()) => {
            Threshold { value, source: ThresholdSource::Cache }
        }
        _ => Threshold { value: DEFAULT_THRESHOLD, source: ThresholdSource::Default },
    }
}

/// The cache metadata entries that store `threshold` for `calibration` (for
/// [`crate::cache::update_cache_metadata`]).
pub fn stored_threshold_entries(threshold: f64, calibration: &Calibration) -> [(&'static str, Option<String>); 2] {
    [(THRESHOLD_KEY, Some(threshold.to_string())), (THRESHOLD_CALIBRATION_KEY, Some(calibration_key(calibration)))]
}

/// How a calibration is written next to a stored threshold (JSON of its parameters).
pub fn calibration_key(calibration: &Calibration) -> String {
    serde_json::to_string(calibration).unwrap_or_default()
}
