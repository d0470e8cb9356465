//! Reports: one JSON line per image on stdout, flushed as soon as it is known (a killed run
//! keeps every finished line), and a summary for stderr.

use std::io::Write;

use serde::Serialize;

use crate::decide::Decision;

/// One alternative in `top_k`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ranked {
    pub label: String,
    /// Calibrated confidence.
    pub confidence: f64,
}

/// A classified image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictionRecord {
    pub path: String,
    pub label: String,
    /// Whether the predicted class is a base (trained) class or a new one added by name.
    pub base: bool,
    pub confidence: f64,
    pub uncalibrated_confidence: f64,
    pub decision: Decision,
    pub threshold: f64,
    pub calibration: &'static str,
    /// The multiplier applied to the fine-tuned logits.
    pub weight: f64,
    /// CAC's contrast d(x), when CAC is the method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast: Option<f64>,
    pub top_k: Vec<Ranked>,
    pub device: &'static str,
}

/// An image that could not be classified.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailureRecord {
    pub path: String,
    pub error: String,
}

/// Writes `record` as one line and flushes.
pub fn write_json_line(out: &mut impl Write, record: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, record).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Counts for the end-of-run summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub accepted: usize,
    pub abstained: usize,
    pub failed: usize,
}

impl Summary {
    pub fn record(&mut self, decision: Option<Decision>) {
        match decision {
            Some(Decision::Accept) => self.accepted += 1,
            Some(Decision::Abstain) => self.abstained += 1,
            None => self.failed += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.accepted + self.abstained + self.failed
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images: {} accepted, {} abstained, {} failed",
            self.total(),
            self.accepted,
            self.abstained,
            self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_one_line_with_fixed_fields() {
        let record = FailureRecord { path: "a\nb.jpg".into(), error: "bad".into() };
        let mut out = Vec::new();
        write_json_line(&mut out, &record).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"path\":\"a\\nb.jpg\",\"error\":\"bad\"}\n");
    }

    #[test]
    fn summary_counts() {
        let mut summary = Summary::default();
        summary.record(Some(Decision::Accept));
        summary.record(None);
        assert_eq!(summary.to_string(), "2 images: 1 accepted, 0 abstained, 1 failed");
    }
}
