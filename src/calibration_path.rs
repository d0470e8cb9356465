//! The inference path a calibration was measured on.
//!
//! A temperature, threshold or drift baseline that `eval` fits is a fact about the confidences
//! of one path through the pipeline: which image encoders ran (fp32 or int8, by content), how
//! frames were decoded (exact or DCT-scaled) and at which precision the text features were kept.
//! An int8 encoder or a scaled decode moves the logits a little, which is enough to move a
//! threshold chosen for 95 % precision. So `eval` records the path beside what it fits
//! (`calibration_path` in the cache, docs/FORMATS.md §3), and `classify` and `serve` compare it
//! with the path they run: a difference is a warning, or an error under `strict`.

use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, Precision};

/// The cache metadata key of the path the stored calibration was measured on.
pub const CALIBRATION_PATH_KEY: &str = "calibration_path";

/// One path through the pipeline, as far as it changes the confidences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationPath {
    /// The image encoders' precision.
    pub precision: Precision,
    /// The manifest sha256 of each image encoder that ran (zero-shot, then fine-tuned if the
    /// bundle has its own), so a re-quantised variant is a different path.
    pub image_encoders: Vec<String>,
    /// How JPEG frames were decoded: "exact" or "scaled".
    pub decode: String,
    /// The text features' precision in the cache: "f32" or "f16".
    pub features: String,
}

impl CalibrationPath {
    /// The path of `bundle`'s image encoders at `precision`, decoded and scored as given; `None`
    /// when the bundle has no encoders of that precision.
    pub fn of(bundle: &Bundle, precision: Precision, decode: &str, features: &str) -> Option<CalibrationPath> {
        let (zero_shot, fine_tuned) = bundle.image_encoder_names(precision).ok()?;
        let image_encoders = std::iter::once(zero_shot)
            .chain(fine_tuned)
            .map(|name| bundle.declared_sha256(name).unwrap_or_default().to_string())
            .collect();
        Some(CalibrationPath { precision, image_encoders, decode: decode.to_string(), features: features.to_string() })
    }

    /// The stored path in a cache's metadata value. Caches written before this key existed were
    /// fitted on the only path there was: fp32 encoders, exact decoding, f32 features.
    pub fn stored(value: Option<&String>, bundle: &Bundle) -> Option<CalibrationPath> {
        match value {
            Some(json) => serde_json::from_str(json).ok(),
            None => CalibrationPath::of(bundle, Precision::Fp32, "exact", "f32"),
        }
    }

    /// The metadata value `eval` writes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// What differs between `self` (the path that runs) and `fitted`, in words; empty when
    /// they are the same path.
    pub fn differences(&self, fitted: &CalibrationPath) -> Vec<String> {
        let mut differences = Vec::new();
        if self.precision != fitted.precision {
            differences.push(format!("{} image encoders (fitted on {})", self.precision, fitted.precision));
        } else if self.image_encoders != fitted.image_encoders {
            differences.push(format!("other {} image encoder files than those it was fitted on", self.precision));
        }
        if self.decode != fitted.decode {
            differences.push(format!("{} decoding (fitted with {})", self.decode, fitted.decode));
        }
        if self.features != fitted.features {
            differences.push(format!("{} text features (fitted with {})", self.features, fitted.features));
        }
        differences
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(precision: Precision, encoder: &str, decode: &str) -> CalibrationPath {
        CalibrationPath { precision, image_encoders: vec![encoder.into()], decode: decode.into(), features: "f32".into() }
    }

    #[test]
    fn differences_name_what_changed_and_a_round_trip_is_equal() {
        let fitted = path(Precision::Fp32, "aa", "exact");
        assert!(fitted.differences(&fitted).is_empty());
        let json = fitted.to_json();
        assert_eq!(serde_json::from_str::<CalibrationPath>(&json).expect("parses"), fitted);
        let running = path(Precision::Int8, "bb", "scaled");
        assert_eq!(
            running.differences(&fitted),
            vec!["int8 image encoders (fitted on fp32)".to_string(), "scaled decoding (fitted with exact)".to_string()]
        );
        let requantised = path(Precision::Fp32, "cc", "exact");
        assert_eq!(requantised.differences(&fitted).len(), 1);
    }
}
