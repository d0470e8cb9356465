//! Reports: one JSON line per image on stdout, flushed as soon as it is known (a killed run
//! keeps every finished line), and a summary for stderr.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::bundle::Precision;
use crate::decide::Decision;
use crate::pipeline::Prediction;
use crate::runtime::Provider;

/// A file path as written in a record: `path` is the path as text; when the path is not valid
/// UTF-8 (Linux file names are bytes), `path` shows replacement characters and `path_bytes`
/// holds the exact bytes, so every output line maps back to its file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecordPath {
    /// The path as text (lossy only when `path_bytes` is present).
    pub path: String,
    /// The path's exact bytes, when they are not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<Vec<u8>>,
}

impl RecordPath {
    /// The record form of `path`.
    pub fn new(path: &Path) -> RecordPath {
        match path.to_str() {
            Some(text) => RecordPath { path: text.to_string(), path_bytes: None },
            None => RecordPath { path: path.to_string_lossy().into_owned(), path_bytes: Some(path_bytes(path)) },
        }
    }
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().into_owned().into_bytes()
}

/// A classified image: one JSON line of `classify` (fields in docs/FORMATS.md).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictionRecord<'a> {
    /// The image file.
    #[serde(flatten)]
    pub path: RecordPath,
    /// The prediction (label, confidences, decision, weight, contrast, top k).
    #[serde(flatten)]
    pub prediction: &'a Prediction,
    /// The threshold the decision was taken against.
    pub threshold: f64,
    /// The calibration method in force.
    pub calibration: &'static str,
    /// The execution provider the encoder ran on.
    pub device: Provider,
    /// The image encoders' precision (fp32 or int8).
    pub precision: Precision,
}

/// An image that could not be classified.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailureRecord {
    /// The image file.
    #[serde(flatten)]
    pub path: RecordPath,
    /// Why it failed.
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
    /// Predictions accepted.
    pub accepted: usize,
    /// Predictions below the threshold.
    pub abstained: usize,
    /// Images that could not be classified.
    pub failed: usize,
}

impl Summary {
    /// Counts one image: its decision, or `None` when it failed.
    pub fn record(&mut self, decision: Option<Decision>) {
        match decision {
            Some(Decision::Accept) => self.accepted += 1,
            Some(Decision::Abstain) => self.abstained += 1,
            None => self.failed += 1,
        }
    }

    /// Images counted.
    pub fn total(&self) -> usize {
        self.accepted + self.abstained + self.failed
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} images: {} accepted, {} abstained, {} failed", self.total(), self.accepted, self.abstained, self.failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_one_line_with_fixed_fields() {
        let record = FailureRecord { path: RecordPath::new(Path::new("a\nb.jpg")), error: "bad".into() };
        let mut out = Vec::new();
        write_json_line(&mut out, &record).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"path\":\"a\\nb.jpg\",\"error\":\"bad\"}\n");
    }

    #[cfg(unix)]
    #[test]
    fn a_non_utf8_path_keeps_its_exact_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg"));
        let record = FailureRecord { path: RecordPath::new(path), error: "bad".into() };
        let line = serde_json::to_value(&record).unwrap();
        assert_eq!(line["path"], "caf\u{fffd}.jpg");
        let bytes: Vec<u8> = line["path_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, b"caf\xe9.jpg");
    }

    #[test]
    fn summary_counts() {
        let mut summary = Summary::default();
        summary.record(Some(Decision::Accept));
        summary.record(None);
        assert_eq!(summary.to_string(), "2 images: 1 accepted, 0 abstained, 1 failed");
    }
}
