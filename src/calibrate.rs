//! Calibration: every formula cac-edge uses to turn logits into confidences lives here.
//!
//! Every method rescales the fine-tuned logits of one image by a positive scalar `w` before the
//! softmax, `p = softmax(w · l_ft)`, so the predicted class (the argmax of `l_ft`) never changes:
//!
//! | method | `w` |
//! |---|---|
//! | `none` | 1 |
//! | `ts` (temperature scaling) | 1 / T |
//! | `dac` (Wang et al., ICML 2024) | r(argmax l_ft), a per-class factor precomputed into the cache ([`dac_factors`]) |
//! | `cac` (Contrast-Aware Calibration) | α · exp(−d(x) / k), d(x) the contrast of `l_ft` with `l_zs` |
//!
//! **CAC is a reconstruction.** The paper's exact equations are not available to us; this follows
//! its abstract and published reviews: the L1 distance between the original (zero-shot) and the
//! fine-tuned logits of the same image, mapped through an exponential to a per-image weight on
//! the fine-tuned logits, with the reported defaults k = 15 and α = 1.10. Two contrasts are
//! offered: the mean absolute logit difference (default) and the L1 distance of the two softmax
//! distributions (`probs`, with its own k), and optional thresholds λ1 ≤ λ2 ("advanced CAC"):
//! below λ1 the weight is α, above λ2 it is held at α · exp(−λ2 / k).
//!
//! Softmax is computed with log-sum-exp in f64, so saturated logits (scale 100) do not overflow.

use ndarray::ArrayView2;

/// The paper's reported defaults for CAC.
pub const CAC_PAPER_ALPHA: f64 = 1.10;
/// The paper's reported default k for the logit distance, in logit units.
pub const CAC_PAPER_K: f64 = 15.0;
/// k for the probability-distance variant, whose contrast lies in [0, 2] instead of logit units.
/// Not from the paper: chosen so that the weight spans a range similar to the logit variant's;
/// to be set by measurement (onnx/demo/REPORT.md).
pub const CAC_PROBS_DEFAULT_K: f64 = 2.0;
/// DAC: neighbours averaged, and the fine-tuned distance under which a class counts as base.
pub const DAC_NEIGHBOURS: usize = 5;
/// DAC: a class this close (Euclidean, fine-tuned space) to a base class counts as base (r = 1).
pub const DAC_BASE_DISTANCE: f64 = 0.05;

/// How the contrast between fine-tuned and zero-shot logits is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContrastDistance {
    /// d = (1/C) Σ_c |l_ft,c − l_zs,c|
    Logits,
    /// d = ‖softmax(l_ft) − softmax(l_zs)‖₁
    Probs,
}

/// Contrast-Aware Calibration's parameters: `w = α · exp(−d(x) / k)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CacParams {
    /// α: the weight at zero contrast; positive.
    pub alpha: f64,
    /// k: the scale of the exponential map, in the units of the contrast; positive.
    pub k: f64,
    /// How the contrast d(x) is measured.
    pub distance: ContrastDistance,
    /// Advanced CAC thresholds (λ1, λ2), λ1 ≤ λ2.
    pub thresholds: Option<(f64, f64)>,
}

impl CacParams {
    /// α = 1.10, k = 15, logit distance, no thresholds.
    pub fn paper_defaults() -> Self {
        CacParams { alpha: CAC_PAPER_ALPHA, k: CAC_PAPER_K, distance: ContrastDistance::Logits, thresholds: None }
    }

    /// Checks that α and k are positive and 0 ≤ λ1 ≤ λ2; the error says which is not.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("CAC alpha must be a positive number, got {}", self.alpha));
        }
        if !(self.k.is_finite() && self.k > 0.0) {
            return Err(format!("CAC k must be a positive number, got {}", self.k));
        }
        if let Some((low, high)) = self.thresholds {
            if !(low.is_finite() && high.is_finite() && 0.0 <= low && low <= high) {
                return Err(format!("CAC thresholds need 0 <= lambda1 <= lambda2, got {low} and {high}"));
            }
        }
        Ok(())
    }
}

/// A calibration method with its parameters, resolved and ready to apply.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Calibration {
    /// The uncalibrated softmax of the fine-tuned logits (`w = 1`).
    None,
    /// Temperature scaling (`w = 1 / T`).
    Ts {
        /// T; positive.
        temperature: f64,
    },
    /// Distance-Aware Calibration: the cache's per-class factor of the predicted class.
    Dac,
    /// Contrast-Aware Calibration.
    Cac(CacParams),
}

impl Calibration {
    /// Whether [`calibrate`] reads the zero-shot logits: only CAC does. A bundle with its own
    /// fine-tuned image encoder skips the zero-shot image pass for the others.
    pub fn reads_zero_shot_logits(&self) -> bool {
        matches!(self, Calibration::Cac(_))
    }

    /// `"none"`, `"ts"`, `"dac"` or `"cac"`, as in every output line.
    pub fn name(&self) -> &'static str {
        match self {
            Calibration::None => "none",
            Calibration::Ts { .. } => "ts",
            Calibration::Dac => "dac",
            Calibration::Cac(_) => "cac",
        }
    }

    /// Checks the parameters (a positive temperature, valid CAC parameters).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            // 1/T must be finite too: a subnormal T makes the weight infinite.
            Calibration::Ts { temperature }
                if !(temperature.is_finite() && *temperature > 0.0 && (1.0 / temperature).is_finite()) =>
            {
                Err(format!("temperature must be a positive number, got {temperature}"))
            }
            Calibration::Cac(params) => params.validate(),
            _ => Ok(()),
        }
    }
}

/// A calibration method, by name (`none`, `cac`, `ts`, `dac`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// The uncalibrated softmax of the fine-tuned logits.
    None,
    /// Contrast-Aware Calibration.
    Cac,
    /// Temperature scaling (needs a temperature).
    Ts,
    /// Distance-Aware Calibration's per-class factors.
    Dac,
}

impl std::str::FromStr for CalibrationMethod {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(CalibrationMethod::None),
            "cac" => Ok(CalibrationMethod::Cac),
            "ts" => Ok(CalibrationMethod::Ts),
            "dac" => Ok(CalibrationMethod::Dac),
            other => Err(format!("unknown calibration method '{other}': expected none, cac, ts or dac")),
        }
    }
}

impl ContrastDistance {
    /// The name `cac_distance` takes (`logits`, `probs`).
    pub fn name(&self) -> &'static str {
        match self {
            ContrastDistance::Logits => "logits",
            ContrastDistance::Probs => "probs",
        }
    }
}

impl std::str::FromStr for ContrastDistance {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "logits" => Ok(ContrastDistance::Logits),
            "probs" => Ok(ContrastDistance::Probs),
            other => Err(format!("unknown CAC distance '{other}': expected logits or probs")),
        }
    }
}

/// Calibration as asked for by a caller or a bundle's `[calibration]` table: every field
/// optional. [`CalibrationSettings::resolve`] fills the gaps from a fallback (the bundle, for the
/// caller) and then from the paper's defaults.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSettings {
    /// The method; CAC when unset everywhere.
    pub method: Option<CalibrationMethod>,
    /// CAC: the weight at zero contrast.
    pub alpha: Option<f64>,
    /// CAC: the scale of the exponential map.
    pub k: Option<f64>,
    /// CAC: how the contrast is measured.
    pub distance: Option<ContrastDistance>,
    /// Advanced CAC: below λ1 the weight is α.
    pub lambda1: Option<f64>,
    /// Advanced CAC: above λ2 the weight is held at α·exp(−λ2/k).
    pub lambda2: Option<f64>,
    /// TS: the temperature.
    pub temperature: Option<f64>,
}

impl CalibrationSettings {
    /// Settings that ask for `method` and leave everything else to the fallbacks.
    pub fn method(method: CalibrationMethod) -> Self {
        CalibrationSettings { method: Some(method), ..CalibrationSettings::default() }
    }

    /// The settings in force: `self`'s fields, else `fallback`'s — unless `self` names another
    /// method or contrast distance than `fallback`, whose parameters then do not apply (a k
    /// measured for probabilities means nothing for logits) — else the built-in defaults.
    /// `stored_temperature` is a TS temperature fitted by `eval` and kept in the cache.
    pub fn resolve(&self, fallback: &CalibrationSettings, stored_temperature: Option<f64>) -> Result<Calibration, String> {
        fn differs<T: PartialEq>(mine: &Option<T>, theirs: &Option<T>) -> bool {
            mine.is_some() && theirs.is_some() && mine != theirs
        }
        let merged = if differs(&self.method, &fallback.method) || differs(&self.distance, &fallback.distance) {
            self.clone()
        } else {
            CalibrationSettings {
                method: self.method.or(fallback.method),
                alpha: self.alpha.or(fallback.alpha),
                k: self.k.or(fallback.k),
                distance: self.distance.or(fallback.distance),
                lambda1: self.lambda1.or(fallback.lambda1),
                lambda2: self.lambda2.or(fallback.lambda2),
                temperature: self.temperature.or(fallback.temperature),
            }
        };
        let calibration = merged.to_calibration(stored_temperature)?;
        calibration.validate()?;
        Ok(calibration)
    }

    fn to_calibration(&self, stored_temperature: Option<f64>) -> Result<Calibration, String> {
        match self.method.unwrap_or(CalibrationMethod::Cac) {
            CalibrationMethod::None => Ok(Calibration::None),
            CalibrationMethod::Dac => Ok(Calibration::Dac),
            CalibrationMethod::Ts => {
                self.temperature.or(stored_temperature).map(|temperature| Calibration::Ts { temperature }).ok_or_else(|| {
                    "calibration ts needs a temperature: give one, or fit one on base validation images (eval)".to_string()
                })
            }
            CalibrationMethod::Cac => {
                let distance = self.distance.unwrap_or(ContrastDistance::Logits);
                let default_k = match distance {
                    ContrastDistance::Logits => CAC_PAPER_K,
                    ContrastDistance::Probs => CAC_PROBS_DEFAULT_K,
                };
                let thresholds = match (self.lambda1, self.lambda2) {
                    (Some(low), Some(high)) => Some((low, high)),
                    (None, None) => None,
                    _ => return Err("advanced CAC needs both lambda1 and lambda2".into()),
                };
                Ok(Calibration::Cac(CacParams {
                    alpha: self.alpha.unwrap_or(CAC_PAPER_ALPHA),
                    k: self.k.unwrap_or(default_k),
                    distance,
                    thresholds,
                }))
            }
        }
    }
}

/// Why one image's logits could not be calibrated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CalibrationError {
    /// A fine-tuned or zero-shot logit is NaN or infinite.
    #[error("the model produced a non-finite logit (NaN or infinity) for class {class}; the encoder output is invalid")]
    NonFinite {
        /// The class index of the first such logit.
        class: usize,
    },
    /// The fine-tuned logits, zero-shot logits and DAC factors differ in length.
    #[error("logit vectors disagree in length ({fine_tuned} fine-tuned, {zero_shot} zero-shot, {factors} DAC factors)")]
    LengthMismatch {
        /// Number of fine-tuned logits.
        fine_tuned: usize,
        /// Number of zero-shot logits.
        zero_shot: usize,
        /// Number of DAC factors.
        factors: usize,
    },
    /// There are no logits at all.
    #[error("no classes to classify")]
    Empty,
}

/// The calibrated view of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibrated {
    /// argmax of the fine-tuned logits (first index on ties), identical for every method.
    pub predicted: usize,
    /// The multiplier `w` applied to the fine-tuned logits.
    pub weight: f64,
    /// CAC's contrast d(x); `None` for other methods.
    pub contrast: Option<f64>,
    /// softmax(w · l_ft).
    pub probabilities: Vec<f64>,
    /// softmax(l_ft), the uncalibrated confidences.
    pub uncalibrated: Vec<f64>,
}

/// Calibrates one image. `dac_factors` holds r(c) per class (only read by `dac`).
pub fn calibrate(
    calibration: &Calibration,
    fine_tuned: &[f32],
    zero_shot: &[f32],
    dac_factors: &[f32],
) -> Result<Calibrated, CalibrationError> {
    check_inputs(fine_tuned, zero_shot, dac_factors)?;
    let predicted = argmax(fine_tuned);
    let (weight, contrast) = match calibration {
        Calibration::None => (1.0, None),
        Calibration::Ts { temperature } => (1.0 / temperature, None),
        Calibration::Dac => (f64::from(dac_factors[predicted]), None),
        Calibration::Cac(params) => {
            let contrast = match params.distance {
                ContrastDistance::Logits => logit_contrast(fine_tuned, zero_shot),
                ContrastDistance::Probs => probability_contrast(fine_tuned, zero_shot),
            };
            (cac_weight(contrast, params), Some(contrast))
        }
    };
    Ok(Calibrated {
        predicted,
        weight,
        contrast,
        probabilities: softmax(fine_tuned, weight),
        uncalibrated: softmax(fine_tuned, 1.0),
    })
}

fn check_inputs(fine_tuned: &[f32], zero_shot: &[f32], dac_factors: &[f32]) -> Result<(), CalibrationError> {
    if fine_tuned.is_empty() {
        return Err(CalibrationError::Empty);
    }
    if fine_tuned.len() != zero_shot.len() || fine_tuned.len() != dac_factors.len() {
        return Err(CalibrationError::LengthMismatch {
            fine_tuned: fine_tuned.len(),
            zero_shot: zero_shot.len(),
            factors: dac_factors.len(),
        });
    }
    if let Some(class) = fine_tuned.iter().chain(zero_shot).position(|value| !value.is_finite()) {
        return Err(CalibrationError::NonFinite { class: class % fine_tuned.len() });
    }
    Ok(())
}

/// CAC's weight: w = α · exp(−d / k), with the optional advanced thresholds. The weight is
/// floored at the smallest positive normal f64, so it stays > 0 where `exp` underflows
/// (d / k beyond ~745, e.g. a tiny k): the distribution is then uniform to double precision,
/// which is the w → 0 limit, and the weight still says "scaled", never "zero".
pub fn cac_weight(contrast: f64, params: &CacParams) -> f64 {
    let effective = match params.thresholds {
        Some((low, _)) if contrast < low => 0.0,
        Some((_, high)) if contrast > high => high,
        _ => contrast,
    };
    (params.alpha * (-effective / params.k).exp()).max(f64::MIN_POSITIVE)
}

/// d = (1/C) Σ_c |l_ft,c − l_zs,c|, accumulated in f64.
pub fn logit_contrast(fine_tuned: &[f32], zero_shot: &[f32]) -> f64 {
    let total: f64 = fine_tuned.iter().zip(zero_shot).map(|(&ft, &zs)| (f64::from(ft) - f64::from(zs)).abs()).sum();
    total / fine_tuned.len() as f64
}

/// d = ‖softmax(l_ft) − softmax(l_zs)‖₁.
pub fn probability_contrast(fine_tuned: &[f32], zero_shot: &[f32]) -> f64 {
    let ft = softmax(fine_tuned, 1.0);
    let zs = softmax(zero_shot, 1.0);
    ft.iter().zip(&zs).map(|(a, b)| (a - b).abs()).sum()
}

/// softmax(scale · logits) in f64 via log-sum-exp (max subtracted first).
///
/// The max is subtracted before scaling (`scale > 0` keeps it the max): a large weight (TS with
/// a tiny temperature) times large logits overflows to −∞ for every class, and −∞ − (−∞) is NaN.
pub fn softmax(logits: &[f32], scale: f64) -> Vec<f64> {
    let max = logits.iter().map(|&value| f64::from(value)).fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|&value| (scale * (f64::from(value) - max)).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.into_iter().map(|value| value / total).collect()
}

/// Index of the largest value; the first one on ties (so a tie resolves the same way for every
/// calibration method and every run).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (index, value) in values.iter().enumerate().skip(1) {
        if *value > values[best] {
            best = index;
        }
    }
    best
}

/// Class indices ordered by descending logit, ties by index; the first `k`.
pub fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// DAC's per-class factors r(c) = exp(D0(c) − Dft(c)) from L2-normalised text features
/// (rows = classes) of the zero-shot and fine-tuned models. D(c) is the mean Euclidean distance
/// from class c to its `DAC_NEIGHBOURS` nearest base classes in the same space (c itself
/// included when it is a base class, as in the official code); r(c) = 1 when the nearest
/// fine-tuned base distance is below `DAC_BASE_DISTANCE`, so base classes keep their logits.
pub fn dac_factors(zero_shot: ArrayView2<'_, f32>, fine_tuned: ArrayView2<'_, f32>, is_base: &[bool]) -> Vec<f32> {
    let base: Vec<usize> = (0..is_base.len()).filter(|&class| is_base[class]).collect();
    (0..is_base.len())
        .map(|class| {
            let zs_distances = sorted_base_distances(zero_shot, class, &base);
            let ft_distances = sorted_base_distances(fine_tuned, class, &base);
            if ft_distances.first().is_some_and(|&nearest| nearest < DAC_BASE_DISTANCE) {
                return 1.0;
            }
            (mean_of_nearest(&zs_distances) - mean_of_nearest(&ft_distances)).exp() as f32
        })
        .collect()
}

fn sorted_base_distances(features: ArrayView2<'_, f32>, class: usize, base: &[usize]) -> Vec<f64> {
    let row = features.row(class);
    let mut distances: Vec<f64> = base
        .iter()
        .map(|&other| {
            let squared: f64 = row.iter().zip(features.row(other)).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
            squared.sqrt()
        })
        .collect();
    distances.sort_by(f64::total_cmp);
    distances
}

fn mean_of_nearest(sorted: &[f64]) -> f64 {
    let nearest = &sorted[..sorted.len().min(DAC_NEIGHBOURS)];
    if nearest.is_empty() {
        return 0.0;
    }
    nearest.iter().sum::<f64>() / nearest.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-checked: softmax([0, ln 3]) = [1/4, 3/4].
    #[test]
    fn softmax_hand_case() {
        let probabilities = softmax(&[0.0, 3f32.ln()], 1.0);
        assert!((probabilities[0] - 0.25).abs() < 1e-7 && (probabilities[1] - 0.75).abs() < 1e-7);
    }

    #[test]
    fn saturated_logits_do_not_overflow() {
        let probabilities = softmax(&[100.0, -100.0, 99.0], 20.0);
        assert!(probabilities.iter().all(|p| p.is_finite()));
        assert!((probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn argmax_takes_first_of_ties_and_top_k_is_stable() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
    }

    // Hand-checked: d = (|1-0| + |-1-1|)/2 = 1.5; w = 1.1 · e^(−1.5/15) = 0.99532...
    #[test]
    fn cac_weight_hand_case() {
        let params = CacParams::paper_defaults();
        let d = logit_contrast(&[1.0, -1.0], &[0.0, 1.0]);
        assert_eq!(d, 1.5);
        assert!((cac_weight(d, &params) - 1.1 * (-0.1f64).exp()).abs() < 1e-15);
    }

    #[test]
    fn advanced_thresholds_clamp_the_weight() {
        let params = CacParams { thresholds: Some((1.0, 4.0)), ..CacParams::paper_defaults() };
        assert_eq!(cac_weight(0.5, &params), 1.1);
        assert_eq!(cac_weight(10.0, &params), cac_weight(4.0, &params));
        assert_eq!(cac_weight(2.0, &params), 1.1 * (-2.0f64 / 15.0).exp());
    }

    #[test]
    fn every_method_keeps_the_argmax() {
        let ft = [2.0f32, 5.0, -1.0];
        let zs = [4.0f32, 1.0, 0.0];
        let factors = [1.0f32, 0.5, 2.0];
        for method in [
            Calibration::None,
            Calibration::Ts { temperature: 3.0 },
            Calibration::Dac,
            Calibration::Cac(CacParams::paper_defaults()),
        ] {
            let calibrated = calibrate(&method, &ft, &zs, &factors).unwrap();
            assert_eq!(calibrated.predicted, 1);
            let best = argmax(&calibrated.probabilities.iter().map(|&p| p as f32).collect::<Vec<_>>());
            assert_eq!(best, 1, "{method:?}");
        }
    }

    fn settings(method: &str, distance: Option<&str>, k: Option<f64>) -> CalibrationSettings {
        let method = Some(method.parse().unwrap());
        CalibrationSettings { method, distance: distance.map(|distance| distance.parse().unwrap()), k, ..Default::default() }
    }

    #[test]
    fn settings_fall_back_to_the_bundle_then_to_the_paper() {
        let none = CalibrationSettings::default();
        assert_eq!(none.resolve(&none, None).unwrap(), Calibration::Cac(CacParams::paper_defaults()));
        let bundle = CalibrationSettings { alpha: Some(0.9), ..settings("cac", Some("probs"), Some(0.75)) };
        let expected = CacParams { alpha: 0.9, k: 0.75, distance: ContrastDistance::Probs, thresholds: None };
        assert_eq!(none.resolve(&bundle, None).unwrap(), Calibration::Cac(expected));
        // The command line overrides one field and keeps the bundle's others.
        let cli = CalibrationSettings { alpha: Some(1.2), ..Default::default() };
        assert_eq!(cli.resolve(&bundle, None).unwrap(), Calibration::Cac(CacParams { alpha: 1.2, ..expected }));
        // Another distance on the command line: the bundle's probs k does not carry over.
        let logits = settings("cac", Some("logits"), None);
        assert_eq!(logits.resolve(&bundle, None).unwrap(), Calibration::Cac(CacParams::paper_defaults()));
        // TS takes the command line's temperature, else the stored one, else it is an error.
        assert_eq!(settings("ts", None, None).resolve(&none, Some(1.5)).unwrap(), Calibration::Ts { temperature: 1.5 });
        assert!(settings("ts", None, None).resolve(&none, None).unwrap_err().contains("needs a temperature"));
        assert!("platt".parse::<CalibrationMethod>().unwrap_err().contains("expected none, cac, ts or dac"));
        assert!("l2".parse::<ContrastDistance>().is_err());
    }

    #[test]
    fn non_finite_logits_are_refused() {
        let error = calibrate(&Calibration::None, &[1.0, f32::NAN], &[0.0, 0.0], &[1.0, 1.0]).unwrap_err();
        assert_eq!(error, CalibrationError::NonFinite { class: 1 });
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(Calibration::Ts { temperature: 0.0 }.validate().is_err());
        let params = CacParams { thresholds: Some((3.0, 1.0)), ..CacParams::paper_defaults() };
        assert!(Calibration::Cac(params).validate().is_err());
    }
}
