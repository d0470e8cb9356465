//! Calibration metrics: accuracy, ECE (equal-width bins), ACE (equal-mass bins), MCE, NLL,
//! Brier, AURC, reliability tables and risk–coverage curves. All in f64, as fractions (the
//! report multiplies by 100).
//!
//! Conventions match the references the tests compare against (tests/fixtures/metrics): the
//! top label is the first index of a row's maximum (`np.argmax`), its confidence that maximum;
//! ECE/ACE are uncertainty-calibration 0.1.4's `get_ece` / `get_ece_em` (top-label), NLL and
//! Brier are scikit-learn 1.9's `log_loss` / `brier_score_loss` (multiclass, sum over classes).
//! Probabilities are row-major slices (samples × classes).

/// One bin of a reliability table. Empty bins have `count == 0` and zero means.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    /// Bin edges: the bin holds confidences in (lower, upper] (the first bin also holds 0).
    pub lower: f64,
    /// Upper bin edge (inclusive).
    pub upper: f64,
    /// Predictions in the bin.
    pub count: usize,
    /// Mean confidence of the predictions in the bin.
    pub mean_confidence: f64,
    /// Fraction of the predictions in the bin that are correct.
    pub accuracy: f64,
}

/// One point of a risk–coverage curve: keep the predictions with confidence ≥ `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RiskCoveragePoint {
    /// The confidence threshold.
    pub threshold: f64,
    /// Fraction of predictions kept.
    pub coverage: f64,
    /// Error rate among the kept predictions.
    pub risk: f64,
}

/// Invalid input to a metric. Metrics never panic on bad input; they return one of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    /// There are no samples.
    #[error("no predictions to evaluate")]
    Empty,
    /// Two inputs that must be of one length are not.
    #[error("length mismatch: {what} has {found} entries, expected {expected}")]
    LengthMismatch {
        /// The input that is off.
        what: &'static str,
        /// The length it should have.
        expected: usize,
        /// The length it has.
        found: usize,
    },
    /// A table of 0 bins was asked for.
    #[error("the number of bins must be at least 1")]
    ZeroBins,
    /// Probabilities over 0 classes were given.
    #[error("the number of classes must be at least 1")]
    ZeroClasses,
    /// A label is not a class index.
    #[error("label {label} (sample {index}) is not below the number of classes ({classes})")]
    LabelOutOfRange {
        /// The sample.
        index: usize,
        /// Its label.
        label: usize,
        /// The number of classes.
        classes: usize,
    },
    /// A confidence or probability is NaN, infinite or outside [0, 1].
    #[error("{what} {value} at index {index} is not a finite number in [0, 1]")]
    OutOfUnitInterval {
        /// Which input ("confidence", "probability", ...).
        what: &'static str,
        /// Its index in that input.
        index: usize,
        /// The value.
        value: f64,
    },
}

impl ReliabilityBin {
    /// |accuracy − mean confidence|; 0 for an empty bin.
    pub fn gap(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.accuracy - self.mean_confidence).abs()
        }
    }
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), MetricsError> {
    if expected == found {
        Ok(())
    } else {
        Err(MetricsError::LengthMismatch { what, expected, found })
    }
}

/// Every value finite and in [0, 1].
fn check_unit(what: &'static str, values: &[f64]) -> Result<(), MetricsError> {
    match values.iter().position(|v| !(0.0..=1.0).contains(v)) {
        Some(index) => Err(MetricsError::OutOfUnitInterval { what, index, value: values[index] }),
        None => Ok(()),
    }
}

fn check_confidences(confidences: &[f64], correct: &[bool]) -> Result<(), MetricsError> {
    if confidences.is_empty() {
        return Err(MetricsError::Empty);
    }
    check_len("correct", confidences.len(), correct.len())?;
    check_unit("confidence", confidences)
}

/// Checks a row-major (samples × classes) probability matrix against its labels.
fn check_probabilities(probabilities: &[f64], classes: usize, labels: &[usize]) -> Result<(), MetricsError> {
    if classes == 0 {
        return Err(MetricsError::ZeroClasses);
    }
    if labels.is_empty() {
        return Err(MetricsError::Empty);
    }
    check_len("probabilities", labels.len().saturating_mul(classes), probabilities.len())?;
    if let Some((index, &label)) = labels.iter().enumerate().find(|(_, &label)| label >= classes) {
        return Err(MetricsError::LabelOutOfRange { index, label, classes });
    }
    check_unit("probability", probabilities)
}

/// Fraction of `predicted` equal to `labels`.
pub fn accuracy(predicted: &[usize], labels: &[usize]) -> Result<f64, MetricsError> {
    if labels.is_empty() {
        return Err(MetricsError::Empty);
    }
    check_len("predicted", labels.len(), predicted.len())?;
    let right = predicted.iter().zip(labels).filter(|(p, y)| p == y).count();
    Ok(right as f64 / labels.len() as f64)
}

/// Top-label prediction of each row of a row-major (samples × classes) probability matrix:
/// (predicted class, confidence). The predicted class is the first index of the maximum, as
/// `np.argmax`; the confidence is that maximum.
pub fn top_label(probabilities: &[f64], classes: usize) -> Result<(Vec<usize>, Vec<f64>), MetricsError> {
    if classes == 0 {
        return Err(MetricsError::ZeroClasses);
    }
    if probabilities.is_empty() {
        return Err(MetricsError::Empty);
    }
    check_len("probabilities", probabilities.len().div_ceil(classes) * classes, probabilities.len())?;
    check_unit("probability", probabilities)?;
    Ok(probabilities
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            for (class, &p) in row.iter().enumerate().skip(1) {
                if p > row[best] {
                    best = class;
                }
            }
            (best, row[best])
        })
        .unzip())
}

/// Bins the predictions by upper edges (sorted, the last one 1.0): a confidence goes to the first
/// bin whose upper edge is ≥ it — `np.searchsorted(edges, confidence)` (side left), so bins are
/// (lower, upper] and 0 falls in the first. Callers have checked confidences are in [0, 1].
fn table_from_edges(confidences: &[f64], correct: &[bool], uppers: &[f64]) -> Vec<ReliabilityBin> {
    let mut counts = vec![0usize; uppers.len()];
    let mut confidence_sums = vec![0.0f64; uppers.len()];
    let mut right = vec![0usize; uppers.len()];
    for (&confidence, &is_correct) in confidences.iter().zip(correct) {
        let bin = uppers.partition_point(|&upper| upper < confidence).min(uppers.len() - 1);
        counts[bin] += 1;
        confidence_sums[bin] += confidence;
        right[bin] += usize::from(is_correct);
    }
    (0..uppers.len())
        .map(|bin| {
            let count = counts[bin];
            let (mean_confidence, accuracy) =
                if count == 0 { (0.0, 0.0) } else { (confidence_sums[bin] / count as f64, right[bin] as f64 / count as f64) };
            let lower = if bin == 0 { 0.0 } else { uppers[bin - 1] };
            ReliabilityBin { lower, upper: uppers[bin], count, mean_confidence, accuracy }
        })
        .collect()
}

/// Reliability table with `bins` equal-width bins. Bin i holds confidences in (i/bins, (i+1)/bins],
/// the edges computed in f64 as `i as f64 / bins as f64` (so the last edge is exactly 1.0, and
/// e.g. 0.1 * 3 = 0.30000000000000004 lies above the edge 3/10 = 0.3); a confidence of 0 goes to
/// the first bin, 1.0 to the last. This is the binning of uncertainty-calibration's `get_ece`
/// (`get_equal_prob_bins` + `np.searchsorted`), Guo et al. and scikit-learn's calibration curve,
/// so `ece_from_table` of this table equals `get_ece(probs, labels, num_bins=bins)`.
pub fn reliability_table(confidences: &[f64], correct: &[bool], bins: usize) -> Result<Vec<ReliabilityBin>, MetricsError> {
    if bins == 0 {
        return Err(MetricsError::ZeroBins);
    }
    check_confidences(confidences, correct)?;
    let uppers: Vec<f64> = (1..=bins).map(|i| i as f64 / bins as f64).collect();
    Ok(table_from_edges(confidences, correct, &uppers))
}

/// Expected calibration error of a table: Σ (count / total) · |accuracy − mean confidence|.
/// 0 for a table without predictions.
pub fn ece_from_table(table: &[ReliabilityBin]) -> f64 {
    let total: usize = table.iter().map(|bin| bin.count).sum();
    if total == 0 {
        return 0.0;
    }
    table.iter().map(|bin| bin.count as f64 / total as f64 * bin.gap()).sum()
}

/// ECE with `bins` equal-width bins (see [`reliability_table`]); equals uncertainty-calibration's
/// `get_ece` in its default top-label mode.
pub fn expected_calibration_error(confidences: &[f64], correct: &[bool], bins: usize) -> Result<f64, MetricsError> {
    Ok(ece_from_table(&reliability_table(confidences, correct, bins)?))
}

/// Reliability table with equal-mass bins, formed exactly as uncertainty-calibration 0.1.4's
/// `get_equal_bins` (used by `get_ece_em`), quirks included:
/// - the number of bins is min(`bins`, number of predictions);
/// - the sorted confidences are cut as `np.array_split` cuts them (the first n mod bins parts hold
///   one more), and each inner edge is the midpoint (a + b) / 2.0 of the last confidence of a part
///   and the first of the next; the last edge is 1.0;
/// - duplicate edges (ties across a cut) are merged, so there may be fewer bins;
/// - bins are then (lower, upper] as in [`reliability_table`]: a confidence equal to an edge goes
///   to the lower bin, so a run of tied confidences across a cut lands wholly in the lower bin.
///   Bins can therefore be unequal in mass, and even empty (an empty bin adds nothing to ACE).
///
/// The first bin's lower edge is reported as 0.
pub fn equal_mass_table(confidences: &[f64], correct: &[bool], bins: usize) -> Result<Vec<ReliabilityBin>, MetricsError> {
    if bins == 0 {
        return Err(MetricsError::ZeroBins);
    }
    check_confidences(confidences, correct)?;
    let mut sorted = confidences.to_vec();
    sorted.sort_by(f64::total_cmp);
    let total = sorted.len();
    let parts = bins.min(total);
    let (size, larger) = (total / parts, total % parts);
    let mut uppers: Vec<f64> = (1..parts)
        .map(|part| {
            let start = part * size + part.min(larger);
            (sorted[start - 1] + sorted[start]) / 2.0
        })
        .collect();
    uppers.push(1.0);
    uppers.sort_by(f64::total_cmp);
    uppers.dedup();
    Ok(table_from_edges(confidences, correct, &uppers))
}

/// ACE: the ECE of [`equal_mass_table`] (count-weighted |accuracy − mean confidence|); equals
/// uncertainty-calibration's `get_ece_em` in its default top-label mode. (This is the top-label
/// equal-mass ECE, not Nixon et al.'s class-wise adaptive calibration error.)
pub fn adaptive_calibration_error(confidences: &[f64], correct: &[bool], bins: usize) -> Result<f64, MetricsError> {
    Ok(ece_from_table(&equal_mass_table(confidences, correct, bins)?))
}

/// MCE: the largest |accuracy − mean confidence| over the non-empty bins (0 if all are empty).
pub fn maximum_calibration_error(table: &[ReliabilityBin]) -> f64 {
    table.iter().filter(|bin| bin.count > 0).map(ReliabilityBin::gap).fold(0.0, f64::max)
}

/// Mean negative log-likelihood (nats) of the true classes, as scikit-learn 1.9's
/// `log_loss(labels, probabilities, labels=range(classes))`: the probability of the true class is
/// clipped to [ε, 1 − ε] with ε = `f64::EPSILON` (2.2e-16; so a probability of 0 costs
/// −ln ε ≈ 36.04 instead of infinity, and 1.0 costs ε); rows are NOT renormalised (sklearn only
/// warns when they do not sum to 1). `probabilities` is row-major, samples × `classes`.
pub fn negative_log_likelihood(probabilities: &[f64], classes: usize, labels: &[usize]) -> Result<f64, MetricsError> {
    check_probabilities(probabilities, classes, labels)?;
    let total: f64 = labels
        .iter()
        .enumerate()
        .map(|(sample, &label)| -probabilities[sample * classes + label].clamp(f64::EPSILON, 1.0 - f64::EPSILON).ln())
        .sum();
    Ok(total / labels.len() as f64)
}

/// Brier score: the mean over samples of Σ_c (p_c − 1[c = label])², in [0, 2]. This is
/// scikit-learn 1.9's multiclass `brier_score_loss(labels, probabilities, labels=range(classes),
/// scale_by_half=False)`; sklearn's default `scale_by_half="auto"` halves it when there are fewer
/// than 3 classes, which we never do. `probabilities` is row-major, samples × `classes`.
pub fn brier_score(probabilities: &[f64], classes: usize, labels: &[usize]) -> Result<f64, MetricsError> {
    check_probabilities(probabilities, classes, labels)?;
    let total: f64 = probabilities
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &label)| {
            row.iter()
                .enumerate()
                .map(|(class, &p)| {
                    let difference = p - if class == label { 1.0 } else { 0.0 };
                    difference * difference
                })
                .sum::<f64>()
        })
        .sum();
    Ok(total / labels.len() as f64)
}

/// Runs of equal confidence, most confident first: (confidence, samples in the run, errors in it).
fn confidence_runs(confidences: &[f64], correct: &[bool]) -> Vec<(f64, usize, usize)> {
    let mut order: Vec<usize> = (0..confidences.len()).collect();
    order.sort_by(|&a, &b| confidences[b].total_cmp(&confidences[a]));
    let mut runs: Vec<(f64, usize, usize)> = Vec::new();
    for index in order {
        let error = usize::from(!correct[index]);
        match runs.last_mut() {
            Some((confidence, samples, errors)) if *confidence == confidences[index] => {
                *samples += 1;
                *errors += error;
            }
            _ => runs.push((confidences[index], 1, error)),
        }
    }
    runs
}

/// Risk–coverage curve: one point per distinct confidence t, most confident first, for the
/// selection "confidence ≥ t" — coverage = kept / n, risk = errors among the kept / kept. Tied
/// confidences enter together (a selection by threshold cannot split them), so the curve does not
/// depend on the order of the input.
pub fn risk_coverage_curve(confidences: &[f64], correct: &[bool]) -> Result<Vec<RiskCoveragePoint>, MetricsError> {
    check_confidences(confidences, correct)?;
    let total = confidences.len() as f64;
    let (mut kept, mut errors) = (0usize, 0usize);
    Ok(confidence_runs(confidences, correct)
        .into_iter()
        .map(|(threshold, samples, run_errors)| {
            kept += samples;
            errors += run_errors;
            RiskCoveragePoint { threshold, coverage: kept as f64 / total, risk: errors as f64 / kept as f64 }
        })
        .collect())
}

/// AURC: the mean of the selective risk over the coverages k/n, k = 1..n (Geifman & El-Yaniv), the
/// predictions sorted by confidence, most confident first. Ties enter together as in
/// [`risk_coverage_curve`]: the risk at coverage k/n is that of all predictions with confidence ≥
/// the k-th largest, so AURC = Σ_runs (run size / n) · risk after the run. Without ties this is
/// the usual (1/n) Σ_k errors(k) / k.
pub fn aurc(confidences: &[f64], correct: &[bool]) -> Result<f64, MetricsError> {
    check_confidences(confidences, correct)?;
    let (mut kept, mut errors, mut area) = (0usize, 0usize, 0.0f64);
    for (_, samples, run_errors) in confidence_runs(confidences, correct) {
        kept += samples;
        errors += run_errors;
        area += samples as f64 * (errors as f64 / kept as f64);
    }
    Ok(area / confidences.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Hand-checked: 6 predictions, 3 equal-width bins with edges 1/3, 2/3, 1 (bins (lo, hi]).
    ///   confidence: 0.0   0.3   0.5   2/3   0.9   1.0
    ///   correct:    no    yes   yes   no    yes   yes
    /// bin (0, 1/3] (+ 0):  {0.0, 0.3}  count 2, mean conf 0.15,         accuracy 1/2, gap 0.35
    /// bin (1/3, 2/3]:      {0.5, 2/3}  count 2, mean conf 7/12 ≈ 0.5833, accuracy 1/2, gap 1/12
    ///                      (2/3 sits on the upper edge, so it stays in this bin)
    /// bin (2/3, 1]:        {0.9, 1.0}  count 2, mean conf 0.95,         accuracy 1,   gap 0.05
    /// ECE = 2/6 · (0.35 + 1/12 + 0.05) = 29/180 ≈ 0.16111; MCE = 0.35.
    #[test]
    fn hand_checked_reliability_table() {
        let confidences = [0.0, 0.3, 0.5, 2.0 / 3.0, 0.9, 1.0];
        let correct = [false, true, true, false, true, true];
        let table = reliability_table(&confidences, &correct, 3).unwrap();
        assert_eq!(table.len(), 3);
        let third = 1.0 / 3.0;
        let expected = [(0.0, third, 2, 0.15, 0.5), (third, 2.0 * third, 2, 7.0 / 12.0, 0.5), (2.0 * third, 1.0, 2, 0.95, 1.0)];
        for (bin, &(lower, upper, count, mean_confidence, accuracy)) in table.iter().zip(&expected) {
            assert_eq!((bin.lower, bin.upper, bin.count), (lower, upper, count));
            assert!(close(bin.mean_confidence, mean_confidence), "{bin:?}");
            assert!(close(bin.accuracy, accuracy), "{bin:?}");
        }
        assert!(close(ece_from_table(&table), 29.0 / 180.0));
        assert!(close(expected_calibration_error(&confidences, &correct, 3).unwrap(), 29.0 / 180.0));
        assert!(close(maximum_calibration_error(&table), 0.35));
        // Equal mass, 3 bins of 2: edges (0.3 + 0.5)/2 = 0.4, (2/3 + 0.9)/2, 1 — the same groups.
        let mass = equal_mass_table(&confidences, &correct, 3).unwrap();
        assert_eq!(mass.iter().map(|bin| bin.count).collect::<Vec<_>>(), [2, 2, 2]);
        assert_eq!(mass[0].upper, 0.4);
        assert!(close(adaptive_calibration_error(&confidences, &correct, 3).unwrap(), 29.0 / 180.0));
    }

    #[test]
    fn empty_bins_and_edges() {
        // 10 bins: 0.3 = 3/10 sits on the upper edge of (0.2, 0.3]; 0.1 * 3 = 0.30000000000000004 is
        // above it, in (0.3, 0.4]; 0.2 in (0.1, 0.2]; 1.0 in the last bin.
        let table = reliability_table(&[0.1 * 3.0, 0.3, 0.2, 1.0], &[true; 4], 10).unwrap();
        let counts: Vec<usize> = table.iter().map(|bin| bin.count).collect();
        assert_eq!(counts, [0, 1, 1, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!((table[0].mean_confidence, table[0].accuracy), (0.0, 0.0));
        assert_eq!(table[9].upper, 1.0);
    }

    /// get_ece_em's duplicate-edge quirk: sorted [.5 .5 | .5 .5 | .8 .9] gives edges .5, .65, 1
    /// (the two cuts' midpoints and 1; had two cuts fallen inside the run of 0.5 they would merge);
    /// all four 0.5 sit on the edge .5 and go to (0, .5], so the bin (.5, .65] is empty.
    #[test]
    fn equal_mass_merges_duplicate_edges() {
        let confidences = [0.5, 0.9, 0.5, 0.5, 0.8, 0.5];
        let correct = [true, true, false, true, true, false];
        let table = equal_mass_table(&confidences, &correct, 3).unwrap();
        let summary: Vec<(f64, f64, usize)> = table.iter().map(|bin| (bin.lower, bin.upper, bin.count)).collect();
        assert_eq!(summary, [(0.0, 0.5, 4), (0.5, 0.65, 0), (0.65, 1.0, 2)]);
        // 4/6 · |1/2 − 0.5| + 0 + 2/6 · |1 − 0.85| = 0.05.
        assert!(close(adaptive_calibration_error(&confidences, &correct, 3).unwrap(), 0.05));
        // More bins than predictions: min(bins, n) parts.
        assert_eq!(equal_mass_table(&[0.7], &[true], 15).unwrap().len(), 1);
    }

    /// confidence 0.9 0.8 0.8 0.5, correct yes no yes no. Runs: {0.9} risk 0; {0.8, 0.8} enter
    /// together: 1 error in 3 kept; {0.5}: 2 in 4. AURC = (1·0 + 2·1/3 + 1·1/2) / 4 = 7/24.
    #[test]
    fn risk_coverage_with_ties() {
        let confidences = [0.8, 0.9, 0.5, 0.8];
        let correct = [false, true, false, true];
        let curve = risk_coverage_curve(&confidences, &correct).unwrap();
        let expected = [(0.9, 0.25, 0.0), (0.8, 0.75, 1.0 / 3.0), (0.5, 1.0, 0.5)];
        assert_eq!(curve.len(), 3);
        for (point, &(threshold, coverage, risk)) in curve.iter().zip(&expected) {
            assert_eq!(point.threshold, threshold);
            assert!(close(point.coverage, coverage) && close(point.risk, risk), "{point:?}");
        }
        assert!(close(aurc(&confidences, &correct).unwrap(), 7.0 / 24.0));
        // Order of ties does not matter.
        assert_eq!(aurc(&[0.8, 0.9, 0.5, 0.8], &[true, true, false, false]), aurc(&confidences, &correct));
    }

    /// Rows [.7 .2 .1] and [0 1 0], both labelled 0: NLL = (−ln .7 − ln ε) / 2 (sklearn clips to
    /// [ε, 1 − ε]); Brier = ((.09 + .04 + .01) + (1 + 1 + 0)) / 2 = 1.07.
    #[test]
    fn nll_and_brier_by_hand() {
        let probabilities = [0.7, 0.2, 0.1, 0.0, 1.0, 0.0];
        let nll = negative_log_likelihood(&probabilities, 3, &[0, 0]).unwrap();
        assert!(close(nll, (-(0.7f64).ln() - f64::EPSILON.ln()) / 2.0));
        assert!(close(brier_score(&probabilities, 3, &[0, 0]).unwrap(), 1.07));
        assert!(close(negative_log_likelihood(&probabilities, 3, &[0, 1]).unwrap(), (-(0.7f64).ln() + f64::EPSILON) / 2.0));
        assert_eq!(top_label(&[0.4, 0.4, 0.2, 0.1, 0.45, 0.45], 3).unwrap(), (vec![0, 1], vec![0.4, 0.45]));
        assert_eq!(accuracy(&[0, 1, 2, 2], &[0, 1, 1, 2]).unwrap(), 0.75);
    }

    #[test]
    fn errors_instead_of_panics() {
        use MetricsError::*;
        assert_eq!(accuracy(&[], &[]), Err(Empty));
        assert_eq!(accuracy(&[1], &[1, 2]), Err(LengthMismatch { what: "predicted", expected: 2, found: 1 }));
        assert_eq!(reliability_table(&[0.5], &[true], 0), Err(ZeroBins));
        assert_eq!(equal_mass_table(&[0.5], &[true], 0), Err(ZeroBins));
        assert_eq!(reliability_table(&[], &[], 15), Err(Empty));
        let mismatch = LengthMismatch { what: "correct", expected: 2, found: 1 };
        assert_eq!(equal_mass_table(&[0.5, 0.6], &[true], 15), Err(mismatch));
        assert_eq!(risk_coverage_curve(&[], &[]), Err(Empty));
        assert_eq!(aurc(&[0.5], &[]), Err(LengthMismatch { what: "correct", expected: 1, found: 0 }));
        for bad in [f64::NAN, f64::INFINITY, -0.1, 1.0 + f64::EPSILON] {
            let error = OutOfUnitInterval { what: "confidence", index: 1, value: bad };
            let matches = |result: Result<f64, MetricsError>| match result {
                Err(OutOfUnitInterval { what, index, value }) => {
                    what == "confidence" && index == 1 && (value == bad || value.is_nan() && bad.is_nan())
                }
                _ => false,
            };
            assert!(matches(expected_calibration_error(&[0.5, bad], &[true, true], 15)), "{error}");
            assert!(matches(adaptive_calibration_error(&[0.5, bad], &[true, true], 15)), "{error}");
            assert!(matches(aurc(&[0.5, bad], &[true, true])), "{error}");
            assert!(matches(risk_coverage_curve(&[0.5, bad], &[true, true]).map(|_| 0.0)));
        }
        let probabilities = [0.5, 0.5, 0.2, 0.8];
        let out_of_range = |index| Err(LabelOutOfRange { index, label: 2, classes: 2 });
        assert_eq!(negative_log_likelihood(&probabilities, 2, &[0, 2]), out_of_range(1));
        assert_eq!(brier_score(&probabilities, 2, &[2, 0]), out_of_range(0));
        let mismatch = LengthMismatch { what: "probabilities", expected: 6, found: 4 };
        assert_eq!(brier_score(&probabilities, 3, &[0, 0]), Err(mismatch));
        assert_eq!(negative_log_likelihood(&probabilities, 0, &[0, 0]), Err(ZeroClasses));
        assert_eq!(negative_log_likelihood(&[], 2, &[]), Err(Empty));
        assert_eq!(brier_score(&[0.5, 1.5], 2, &[0]), Err(OutOfUnitInterval { what: "probability", index: 1, value: 1.5 }));
        assert!(matches!(negative_log_likelihood(&[f64::NAN, 0.5], 2, &[0]), Err(OutOfUnitInterval { index: 0, .. })));
        assert_eq!(top_label(&[0.5, 0.5, 0.2], 2), Err(LengthMismatch { what: "probabilities", expected: 4, found: 3 }));
        assert_eq!(top_label(&[0.5], 0), Err(ZeroClasses));
        assert_eq!(ece_from_table(&[]), 0.0);
        assert_eq!(maximum_calibration_error(&[]), 0.0);
    }
}
