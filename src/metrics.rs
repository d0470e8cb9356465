//! Calibration metrics: accuracy, ECE (equal-width bins), ACE (equal-mass bins), MCE, NLL,
//! Brier, AURC, reliability tables and risk–coverage curves. All in f64, as fractions (the
//! report multiplies by 100).
//!
//! (Types below are shared with `plots` and `eval`; the functions are being written.)

/// One bin of a reliability table. Empty bins have `count == 0` and zero means.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    /// Bin edges: the bin holds confidences in (lower, upper] (the first bin also holds 0).
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean confidence of the predictions in the bin.
    pub mean_confidence: f64,
    /// Fraction of the predictions in the bin that are correct.
    pub accuracy: f64,
}

/// One point of a risk–coverage curve: keep the predictions with confidence ≥ `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RiskCoveragePoint {
    pub threshold: f64,
    /// Fraction of predictions kept.
    pub coverage: f64,
    /// Error rate among the kept predictions.
    pub risk: f64,
}
