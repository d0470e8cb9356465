//! Evaluation of calibrators on labeled images: metrics per split (base, new, all), fitting of a
//! TS temperature and of CAC's (α, k) on base validation images, and threshold selection.
//!
//! Every calibrator is evaluated on the same logits, so accuracy is identical across them by
//! construction (calibration only rescales the fine-tuned logits). Images are classified among
//! all classes of the cache — the deployment view — and split by whether their true class is a
//! base class. Percentages are reported as papers do; NLL is in nats and Brier is the sum over
//! classes, averaged over images.

use ndarray::ArrayView2;
use serde::Serialize;

use crate::calibrate::{calibrate, CacParams, Calibration, CalibrationError, ContrastDistance};
use crate::calibrate::{logit_contrast, probability_contrast};
use crate::pipeline::row_slice;
use crate::tooling::metrics::{self, ReliabilityBin, RiskCoveragePoint};

/// Why an evaluation or a fit could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An image's logits could not be calibrated.
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    /// A metric's inputs are inconsistent.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// Logits, labels and classes disagree in size, or a fit has no images.
    #[error("{0}")]
    Input(String),
}

/// Logits of the evaluated images (rows) over all classes of the cache (columns).
#[derive(Debug, Clone, Copy)]
pub struct EvalData<'a> {
    /// The original CLIP's logits, `[N, C]`.
    pub zero_shot: ArrayView2<'a, f32>,
    /// The fine-tuned model's logits, `[N, C]`.
    pub fine_tuned: ArrayView2<'a, f32>,
    /// True class of each row.
    pub labels: &'a [usize],
    /// Per class: trained on (base) or added by name (new).
    pub class_is_base: &'a [bool],
    /// DAC's factor r(c) per class, from the cache.
    pub dac_factors: &'a [f32],
}

impl EvalData<'_> {
    fn check(&self) -> Result<(), EvalError> {
        let (rows, classes) = self.fine_tuned.dim();
        if self.zero_shot.dim() != (rows, classes) || self.labels.len() != rows || self.class_is_base.len() != classes {
            return Err(EvalError::Input("logits, labels and classes disagree in size".into()));
        }
        if let Some(&label) = self.labels.iter().find(|&&label| label >= classes) {
            return Err(EvalError::Input(format!("label {label} is not a class (there are {classes})")));
        }
        Ok(())
    }

    /// The rows whose true class is in `split`.
    fn rows_in(&self, split: Split) -> Vec<usize> {
        (0..self.labels.len()).filter(|&row| split.contains(self.class_is_base[self.labels[row]])).collect()
    }
}

/// Which images a number is about, by their true class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Images of classes the fine-tuned model was trained on.
    Base,
    /// Images of classes added by name only.
    New,
    /// Every image.
    All,
}

impl Split {
    /// Every split, in report order.
    pub const ALL: [Split; 3] = [Split::Base, Split::New, Split::All];

    /// `"base"`, `"new"` or `"all"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Base => "base",
            Split::New => "new",
            Split::All => "all",
        }
    }

    fn contains(self, is_base: bool) -> bool {
        match self {
            Split::Base => is_base,
            Split::New => !is_base,
            Split::All => true,
        }
    }
}

/// A calibration under evaluation, with a name for tables and where its parameters came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibrator {
    /// Its name in tables ("none", "ts", "cac-paper", "cac-fit", ...).
    pub name: String,
    /// The calibration evaluated.
    pub calibration: Calibration,
    /// Where its parameters came from, in words.
    pub origin: String,
}

/// Calibrated outputs of every image under one calibration.
struct Outputs {
    predicted: Vec<usize>,
    confidences: Vec<f64>,
    /// Row-major [images × classes].
    probabilities: Vec<f64>,
    classes: usize,
}

fn calibrated_outputs(calibration: &Calibration, data: &EvalData<'_>) -> Result<Outputs, EvalError> {
    let classes = data.fine_tuned.ncols();
    let mut outputs = Outputs {
        predicted: Vec::new(),
        confidences: Vec::new(),
        probabilities: Vec::with_capacity(data.labels.len() * classes),
        classes,
    };
    for (fine_tuned, zero_shot) in data.fine_tuned.outer_iter().zip(data.zero_shot.outer_iter()) {
        let calibrated = calibrate(calibration, &row_slice(fine_tuned), &row_slice(zero_shot), data.dac_factors)?;
        outputs.predicted.push(calibrated.predicted);
        outputs.confidences.push(calibrated.probabilities[calibrated.predicted]);
        outputs.probabilities.extend_from_slice(&calibrated.probabilities);
    }
    Ok(outputs)
}

/// The numbers of one calibrator on one split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitReport {
    /// Which images.
    pub split: Split,
    /// How many images.
    pub images: usize,
    /// Top-1 accuracy, in percent.
    pub accuracy_percent: f64,
    /// Expected calibration error over equal-width bins, in percent.
    pub ece_percent: f64,
    /// Adaptive calibration error (ECE over equal-mass bins), in percent.
    pub ace_percent: f64,
    /// Maximum calibration error over the equal-width bins, in percent.
    pub mce_percent: f64,
    /// Mean negative log-likelihood of the true class, in nats.
    pub nll: f64,
    /// Mean over images of Σ_c (p_c − 1[c = y])².
    pub brier: f64,
    /// Area under the risk–coverage curve, in percent; lower is better.
    pub aurc_percent: f64,
    /// Equal-width bins, as fractions.
    pub reliability: Vec<ReliabilityBin>,
    /// The risk–coverage curve, thinned to at most `CURVE_POINTS` points for the report.
    pub risk_coverage: Vec<RiskCoveragePoint>,
    /// The smallest threshold meeting the target, if any does.
    pub threshold: Option<ThresholdChoice>,
}

/// Every split of one calibrator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CalibratorReport {
    /// The calibrator evaluated.
    #[serde(flatten)]
    pub calibrator: Calibrator,
    /// Harmonic mean of base and new accuracy (0 when either split is empty).
    pub harmonic_mean_accuracy_percent: f64,
    /// One report per non-empty split, in [`Split::ALL`] order.
    pub splits: Vec<SplitReport>,
}

impl CalibratorReport {
    /// The report of `split`; `None` when it has no images.
    pub fn split(&self, split: Split) -> Option<&SplitReport> {
        self.splits.iter().find(|report| report.split == split)
    }
}

/// What a threshold must achieve on the labeled images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum ThresholdTarget {
    /// Accuracy among accepted predictions at least this (a fraction).
    Precision(f64),
    /// Fraction of predictions accepted at least this.
    Coverage(f64),
}

/// A threshold and what it keeps: accept when confidence ≥ `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThresholdChoice {
    /// The confidence threshold, 0..=1.
    pub threshold: f64,
    /// Predictions accepted, in percent of the images.
    pub coverage_percent: f64,
    /// Accuracy among the accepted predictions, in percent.
    pub precision_percent: f64,
    /// Number of predictions accepted.
    pub accepted: usize,
}

/// Maximum points of a risk–coverage curve kept in a report.
pub const CURVE_POINTS: usize = 200;

/// Evaluates each calibrator on each split with `bins` equal-width (and equal-mass) bins.
pub fn evaluate(
    data: &EvalData<'_>,
    calibrators: &[Calibrator],
    bins: usize,
    target: ThresholdTarget,
) -> Result<Vec<CalibratorReport>, EvalError> {
    data.check()?;
    calibrators
        .iter()
        .map(|calibrator| {
            let outputs = calibrated_outputs(&calibrator.calibration, data)?;
            let splits = Split::ALL
                .into_iter()
                .filter_map(|split| {
                    let rows = data.rows_in(split);
                    (!rows.is_empty()).then(|| split_report(split, &rows, &outputs, data.labels, bins, target))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let accuracy_of =
                |split| splits.iter().find(|report: &&SplitReport| report.split == split).map(|r| r.accuracy_percent);
            let harmonic_mean_accuracy_percent = match (accuracy_of(Split::Base), accuracy_of(Split::New)) {
                (Some(base), Some(new)) if base + new > 0.0 => 2.0 * base * new / (base + new),
                _ => 0.0,
            };
            Ok(CalibratorReport { calibrator: calibrator.clone(), harmonic_mean_accuracy_percent, splits })
        })
        .collect()
}

fn split_report(
    split: Split,
    rows: &[usize],
    outputs: &Outputs,
    labels: &[usize],
    bins: usize,
    target: ThresholdTarget,
) -> Result<SplitReport, EvalError> {
    let classes = outputs.classes;
    let labels: Vec<usize> = rows.iter().map(|&row| labels[row]).collect();
    let predicted: Vec<usize> = rows.iter().map(|&row| outputs.predicted[row]).collect();
    let confidences: Vec<f64> = rows.iter().map(|&row| outputs.confidences[row]).collect();
    let correct: Vec<bool> = predicted.iter().zip(&labels).map(|(p, y)| p == y).collect();
    let probabilities: Vec<f64> =
        rows.iter().flat_map(|&row| outputs.probabilities[row * classes..(row + 1) * classes].iter().copied()).collect();
    let reliability = metrics::reliability_table(&confidences, &correct, bins)?;
    let curve = metrics::risk_coverage_curve(&confidences, &correct)?;
    Ok(SplitReport {
        split,
        images: rows.len(),
        accuracy_percent: 100.0 * metrics::accuracy(&predicted, &labels)?,
        ece_percent: 100.0 * metrics::ece_from_table(&reliability),
        ace_percent: 100.0 * metrics::adaptive_calibration_error(&confidences, &correct, bins)?,
        mce_percent: 100.0 * metrics::maximum_calibration_error(&reliability),
        nll: metrics::negative_log_likelihood(&probabilities, classes, &labels)?,
        brier: metrics::brier_score(&probabilities, classes, &labels)?,
        aurc_percent: 100.0 * metrics::aurc(&confidences, &correct)?,
        reliability,
        risk_coverage: thin_curve(curve),
        threshold: select_threshold(&confidences, &correct, target),
    })
}

/// Keeps every n-th point (and the last) so a report stays small for large image sets.
fn thin_curve(curve: Vec<RiskCoveragePoint>) -> Vec<RiskCoveragePoint> {
    let step = curve.len().div_ceil(CURVE_POINTS).max(1);
    let last = curve.len().saturating_sub(1);
    curve.into_iter().enumerate().filter(|(index, _)| index % step == 0 || *index == last).map(|(_, point)| point).collect()
}

/// The threshold for `target`, candidates being the observed confidences (accept = confidence ≥
/// threshold). Precision: the SMALLEST threshold whose accepted predictions are at least that
/// accurate (so the most images are kept). Coverage: the LARGEST threshold that still accepts
/// at least that fraction (so the accepted ones are the most confident). `None` if unreachable.
pub fn select_threshold(confidences: &[f64], correct: &[bool], target: ThresholdTarget) -> Option<ThresholdChoice> {
    let total = confidences.len();
    let mut order: Vec<usize> = (0..total).collect();
    order.sort_by(|&a, &b| confidences[b].total_cmp(&confidences[a]));
    // Walk from the most confident down; a candidate is the end of a run of equal confidences.
    let mut right = 0usize;
    let mut best = None;
    for (position, &index) in order.iter().enumerate() {
        right += usize::from(correct[index]);
        let accepted = position + 1;
        if order.get(accepted).is_some_and(|&next| confidences[next] == confidences[index]) {
            continue;
        }
        let choice = ThresholdChoice {
            threshold: confidences[index],
            coverage_percent: 100.0 * accepted as f64 / total as f64,
            precision_percent: 100.0 * right as f64 / accepted as f64,
            accepted,
        };
        match target {
            ThresholdTarget::Precision(precision) if right as f64 >= precision * accepted as f64 => best = Some(choice),
            ThresholdTarget::Coverage(coverage) if accepted as f64 >= coverage * total as f64 => return Some(choice),
            _ => {}
        }
    }
    best
}

/// A fitted temperature and the NLL it reaches on the fitting images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TemperatureFit {
    /// T, within [0.01, 100].
    pub temperature: f64,
    /// Mean NLL at T = 1, in nats.
    pub nll_before: f64,
    /// Mean NLL at the fitted T, in nats.
    pub nll_after: f64,
}

/// Search range of log T for the temperature fit.
const LOG_TEMPERATURE_RANGE: (f64, f64) = (-4.605_170_185_988_091, 4.605_170_185_988_091); // T in [0.01, 100]

/// Fits T minimising the mean NLL of softmax(l_ft / T) by golden-section search on log T. The
/// NLL is convex in 1/T, hence unimodal in log T, so golden section finds the minimum.
pub fn fit_temperature(fine_tuned: ArrayView2<'_, f32>, labels: &[usize]) -> Result<TemperatureFit, EvalError> {
    if labels.is_empty() || fine_tuned.nrows() != labels.len() {
        return Err(EvalError::Input("fitting a temperature needs at least one labeled base image".into()));
    }
    let weights = vec![1.0; labels.len()];
    let nll_at = |log_temperature: f64| {
        let weight = (-log_temperature).exp();
        mean_nll(fine_tuned, labels, weights.iter().map(|w| w * weight))
    };
    let log_temperature = golden_section_minimum(nll_at, LOG_TEMPERATURE_RANGE.0, LOG_TEMPERATURE_RANGE.1, 1e-9);
    Ok(TemperatureFit { temperature: log_temperature.exp(), nll_before: nll_at(0.0), nll_after: nll_at(log_temperature) })
}

fn golden_section_minimum(function: impl Fn(f64) -> f64, mut low: f64, mut high: f64, tolerance: f64) -> f64 {
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let mut left = high - ratio * (high - low);
    let mut right = low + ratio * (high - low);
    let (mut f_left, mut f_right) = (function(left), function(right));
    while high - low > tolerance {
        if f_left <= f_right {
            high = right;
            right = left;
            f_right = f_left;
            left = high - ratio * (high - low);
            f_left = function(left);
        } else {
            low = left;
            left = right;
            f_left = f_right;
            right = low + ratio * (high - low);
            f_right = function(right);
        }
    }
    (low + high) / 2.0
}

/// Mean over images of −log softmax(w_i · l_i)[y_i], in f64 with log-sum-exp.
fn mean_nll(fine_tuned: ArrayView2<'_, f32>, labels: &[usize], weights: impl Iterator<Item = f64>) -> f64 {
    let mut total = 0.0;
    for ((row, &label), weight) in fine_tuned.outer_iter().zip(labels).zip(weights) {
        let max = row.iter().fold(f64::NEG_INFINITY, |max, &value| max.max(weight * f64::from(value)));
        let sum: f64 = row.iter().map(|&value| (weight * f64::from(value) - max).exp()).sum();
        total += max + sum.ln() - weight * f64::from(row[label]);
    }
    total / labels.len() as f64
}

/// CAC parameters fitted on base validation images, and the NLL they reach there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CacFit {
    /// The best parameters found (the starting ones if none does better).
    pub params: CacParams,
    /// Their mean NLL, in nats.
    pub nll: f64,
    /// NLL of the starting parameters on the same images.
    pub nll_start: f64,
    /// The best (α, k) lies on the edge of the grid: the optimum may lie beyond it (k at its
    /// upper end means the contrast term is effectively off: a constant weight α fits best).
    pub at_grid_edge: bool,
}

/// Grids of the CAC fit: α from 0.5 to 2.0 in steps of 0.05, k geometric over [0.05, 1000].
fn cac_grid() -> (Vec<f64>, Vec<f64>) {
    let alphas = (10..=40).map(|step| f64::from(step) * 0.05).collect();
    let (low, high, points) = (0.05f64, 1000.0f64, 48);
    let ks = (0..points).map(|i| low * (high / low).powf(f64::from(i) / f64::from(points - 1))).collect();
    (alphas, ks)
}

/// Chooses (α, k) of CAC with `start`'s contrast distance (and thresholds) by minimising the
/// NLL over a grid on base validation images — a step beyond the paper, whose CAC needs no data.
pub fn fit_cac(
    fine_tuned: ArrayView2<'_, f32>,
    zero_shot: ArrayView2<'_, f32>,
    labels: &[usize],
    start: CacParams,
) -> Result<CacFit, EvalError> {
    if labels.is_empty() || fine_tuned.nrows() != labels.len() || zero_shot.dim() != fine_tuned.dim() {
        return Err(EvalError::Input("fitting CAC needs at least one labeled base image".into()));
    }
    let contrasts: Vec<f64> = fine_tuned
        .outer_iter()
        .zip(zero_shot.outer_iter())
        .map(|(ft, zs)| {
            let (ft, zs) = (row_slice(ft), row_slice(zs));
            match start.distance {
                ContrastDistance::Logits => logit_contrast(&ft, &zs),
                ContrastDistance::Probs => probability_contrast(&ft, &zs),
            }
        })
        .collect();
    let nll_of = |params: &CacParams| {
        mean_nll(fine_tuned, labels, contrasts.iter().map(|&contrast| crate::calibrate::cac_weight(contrast, params)))
    };
    let nll_start = nll_of(&start);
    let (alphas, ks) = cac_grid();
    let mut best = CacFit { params: start, nll: nll_start, nll_start, at_grid_edge: false };
    for &alpha in &alphas {
        for &k in &ks {
            let params = CacParams { alpha, k, ..start };
            let nll = nll_of(&params);
            if nll < best.nll {
                best = CacFit { params, nll, nll_start, at_grid_edge: false };
            }
        }
    }
    let edge = |value: f64, grid: &[f64]| grid.first() == Some(&value) || grid.last() == Some(&value);
    best.at_grid_edge = edge(best.params.alpha, &alphas) || edge(best.params.k, &ks);
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn threshold_for_precision_is_the_smallest_reaching_it() {
        // Sorted by confidence: 0.9 ✓, 0.8 ✓, 0.7 ✗, 0.6 ✓, 0.5 ✗.
        let confidences = [0.5, 0.9, 0.7, 0.6, 0.8];
        let correct = [false, true, false, true, true];
        // Precision at 0.9: 1/1, 0.8: 2/2, 0.7: 2/3, 0.6: 3/4, 0.5: 3/5.
        let choice = select_threshold(&confidences, &correct, ThresholdTarget::Precision(0.75)).unwrap();
        assert_eq!((choice.threshold, choice.accepted), (0.6, 4));
        assert_eq!(choice.precision_percent, 75.0);
        let strict = select_threshold(&confidences, &correct, ThresholdTarget::Precision(1.0)).unwrap();
        assert_eq!(strict.threshold, 0.8);
        let coverage = select_threshold(&confidences, &correct, ThresholdTarget::Coverage(0.5)).unwrap();
        assert_eq!((coverage.threshold, coverage.accepted, coverage.coverage_percent), (0.7, 3, 60.0));
        assert_eq!(select_threshold(&[0.6], &[false], ThresholdTarget::Precision(0.5)), None);
    }

    #[test]
    fn tied_confidences_are_accepted_together() {
        let choice = select_threshold(&[0.9, 0.7, 0.7], &[true, true, false], ThresholdTarget::Coverage(0.5)).unwrap();
        assert_eq!((choice.threshold, choice.accepted), (0.7, 3));
    }

    #[test]
    fn fitted_temperature_recovers_the_generating_one() {
        // Labels drawn so that softmax(l / 2) is calibrated: the NLL minimum is near T = 2. With a
        // two-class problem and logit gap g, P(correct) = σ(g / T); fix counts to match exactly.
        // Gap 2 ln 3 at T = 2 gives σ(ln 3) = 0.75: three correct, one wrong per group.
        let gap = 2.0 * 3f32.ln();
        let logits = array![[gap, 0.0], [gap, 0.0], [gap, 0.0], [gap, 0.0]];
        let labels = [0, 0, 0, 1];
        let fit = fit_temperature(logits.view(), &labels).unwrap();
        assert!((fit.temperature - 2.0).abs() < 1e-6, "{fit:?}");
        assert!(fit.nll_after < fit.nll_before);
    }

    #[test]
    fn cac_fit_never_worsens_the_starting_nll() {
        let ft = array![[9.0f32, 1.0, 0.0], [0.0, 8.0, 1.0], [2.0, 1.0, 7.0], [5.0, 4.0, 0.0]];
        let zs = array![[3.0f32, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 2.0], [2.0, 2.5, 0.0]];
        let labels = [0, 1, 2, 1];
        let fit = fit_cac(ft.view(), zs.view(), &labels, CacParams::paper_defaults()).unwrap();
        assert!(fit.nll <= fit.nll_start);
        assert_eq!(fit.params.distance, ContrastDistance::Logits);
    }
}
