//! Properties of the calibration formulas (src/calibrate.rs) on arbitrary finite logits:
//! realistic CLIP ranges (logit scale 100 → about ±100), large magnitudes, and ties.
//!
//! * no method changes the prediction: the predicted class is the first argmax of the
//!   fine-tuned logits, and it keeps the largest calibrated probability;
//! * every probability vector is finite, within [0, 1] and sums to 1 within 1e-9;
//! * the contrast is ≥ 0 (and the probability contrast ≤ 2), the weight finite and > 0 (also
//!   where exp(−d/k) underflows: `cac_weight` floors it at the smallest positive normal f64).
//!
//! `PROPTEST_CASES=N` scales the case counts; failures are kept in
//! `proptest-regressions/properties.txt`.

mod fuzzing;

use cac_edge::calibrate::{
    argmax, cac_weight, calibrate, dac_factors, logit_contrast, probability_contrast, CacParams, Calibration, ContrastDistance,
};
use fuzzing::{check, uniform, uniform_f32};
use ndarray::Array2;
use proptest::prelude::*;
use proptest::sample::select;

const REGRESSIONS: &str = "properties";

/// One logit: mostly CLIP-like values, sometimes large magnitudes, often a value shared with
/// other classes (ties).
fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => uniform_f32(-100.0, 100.0),
        1 => uniform_f32(-1.0e6, 1.0e6),
        1 => select(vec![0.0f32, -0.0, 1.0, 25.0, 25.000002, 100.0, -100.0, 1.0e6, -1.0e6, 3.0e38, -3.0e38]),
    ]
}

/// (fine-tuned, zero-shot, DAC factors) for 2 to 64 classes.
fn image_logits() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, Vec<f32>)> {
    (2usize..64).prop_flat_map(|classes| {
        let factors = proptest::collection::vec(
            prop_oneof![Just(1.0f32), uniform_f32(-2.0, 2.0).prop_map(f32::exp), uniform_f32(1.0e-3, 1.0e3)],
            classes,
        );
        let ft = prop_oneof![
            proptest::collection::vec(logit(), classes),
            // Every class tied, or tied in pairs.
            logit().prop_map(move |value| vec![value; classes]),
            proptest::collection::vec(select(vec![10.0f32, 20.0, 20.0, 30.0]), classes),
        ];
        (ft, proptest::collection::vec(logit(), classes), factors)
    })
}

/// Every valid CAC parameter set (`CacParams::validate` accepts it), weighted towards the
/// ranges the paper and docs/CALIBRATION.md use.
fn cac_params() -> impl Strategy<Value = CacParams> {
    let positive = || {
        prop_oneof![uniform(0.05, 5.0), uniform(1.0e-3, 1.0e3), Just(1.10), Just(15.0), Just(2.0), Just(f64::MAX), Just(1.0e-300)]
    };
    let thresholds = prop_oneof![
        Just(None),
        (uniform(0.0, 200.0), uniform(0.0, 200.0)).prop_map(|(a, b)| Some((a.min(b), a.max(b)))),
        uniform(0.0, 2.0).prop_map(|a| Some((a, a))),
    ];
    (positive(), positive(), prop_oneof![Just(ContrastDistance::Logits), Just(ContrastDistance::Probs)], thresholds)
        .prop_map(|(alpha, k, distance, thresholds)| CacParams { alpha, k, distance, thresholds })
}

fn calibration() -> impl Strategy<Value = Calibration> {
    prop_oneof![
        Just(Calibration::None),
        prop_oneof![uniform(0.01, 100.0), Just(1.0), Just(1.0e-3), Just(1.0e3), Just(f64::MAX), Just(f64::MIN_POSITIVE)]
            .prop_map(|temperature| Calibration::Ts { temperature }),
        Just(Calibration::Dac),
        cac_params().prop_map(Calibration::Cac),
    ]
    .prop_filter("valid calibrations only", |calibration| calibration.validate().is_ok())
}

fn assert_probabilities(name: &str, probabilities: &[f64]) -> Result<(), TestCaseError> {
    prop_assert!(probabilities.iter().all(|p| p.is_finite() && (0.0..=1.0).contains(p)), "{}: {:?}", name, probabilities);
    let total: f64 = probabilities.iter().sum();
    prop_assert!((total - 1.0).abs() <= 1e-9, "{}: sum {}", name, total);
    Ok(())
}

#[test]
fn calibration_keeps_the_prediction_and_yields_distributions() {
    check("calibration_invariants", REGRESSIONS, 16.0, (calibration(), image_logits()), |(method, (ft, zs, factors))| {
        let calibrated = calibrate(&method, &ft, &zs, &factors).map_err(|error| TestCaseError::fail(error.to_string()))?;
        let predicted = argmax(&ft);
        prop_assert_eq!(calibrated.predicted, predicted);
        // The first largest logit: no earlier class ties it, no class exceeds it.
        prop_assert!(ft.iter().all(|&value| value <= ft[predicted]));
        prop_assert!(ft[..predicted].iter().all(|&value| value < ft[predicted]));
        for (name, probabilities) in [("calibrated", &calibrated.probabilities), ("uncalibrated", &calibrated.uncalibrated)] {
            assert_probabilities(name, probabilities)?;
            prop_assert_eq!(probabilities.len(), ft.len());
            let best = probabilities[predicted];
            prop_assert!(
                probabilities.iter().all(|&p| p <= best),
                "{}: class {} is not the most probable: {:?}",
                name,
                predicted,
                probabilities
            );
            // Order is kept: a lower logit never gets a higher probability.
            for (i, &pi) in probabilities.iter().enumerate() {
                for (j, &pj) in probabilities.iter().enumerate() {
                    if ft[i] < ft[j] {
                        prop_assert!(pi <= pj, "{}: p[{}]={} > p[{}]={} although l[{}] < l[{}]", name, i, pi, j, pj, i, j);
                    }
                }
            }
        }
        prop_assert!(calibrated.weight.is_finite() && calibrated.weight > 0.0, "weight {}", calibrated.weight);
        match method {
            Calibration::None => prop_assert_eq!(calibrated.weight, 1.0),
            Calibration::Ts { temperature } => prop_assert_eq!(calibrated.weight, 1.0 / temperature),
            Calibration::Dac => prop_assert_eq!(calibrated.weight, f64::from(factors[predicted])),
            Calibration::Cac(params) => {
                let contrast = calibrated.contrast.expect("CAC reports its contrast");
                prop_assert!(contrast.is_finite() && contrast >= 0.0, "contrast {}", contrast);
                prop_assert_eq!(calibrated.weight, cac_weight(contrast, &params));
                prop_assert!(calibrated.weight <= params.alpha.max(f64::MIN_POSITIVE));
            }
        }
        if !matches!(method, Calibration::Cac(_)) {
            prop_assert_eq!(calibrated.contrast, None);
        }
        Ok(())
    });
}

#[test]
fn weight_is_always_positive_finite_and_at_most_alpha() {
    // α·exp(−d/k) is positive in exact arithmetic, but exp() underflows to 0 in f64 once d/k
    // exceeds ~745 (e.g. k = 0.01 with a logit contrast of 8); before the floor in cac_weight
    // the weight was then exactly 0 (found by this property).
    check("cac_weight_positive", REGRESSIONS, 16.0, (cac_params(), uniform(0.0, 1.0e7)), |(params, contrast)| {
        let weight = cac_weight(contrast, &params);
        prop_assert!(weight.is_finite() && weight > 0.0, "weight {} for {:?}, d = {}", weight, params, contrast);
        prop_assert!(weight <= params.alpha.max(f64::MIN_POSITIVE), "weight {} for {:?}", weight, params);
        // The weight never grows with the contrast.
        prop_assert!(cac_weight(contrast * 2.0 + 1.0, &params) <= weight);
        Ok(())
    });
}

#[test]
fn contrasts_are_non_negative_symmetric_and_bounded() {
    check("contrast_bounds", REGRESSIONS, 16.0, image_logits(), |(ft, zs, _)| {
        let logits = logit_contrast(&ft, &zs);
        prop_assert!(logits.is_finite() && logits >= 0.0, "{}", logits);
        prop_assert_eq!(logits, logit_contrast(&zs, &ft));
        prop_assert_eq!(logit_contrast(&ft, &ft), 0.0);
        let probs = probability_contrast(&ft, &zs);
        prop_assert!(probs.is_finite() && (0.0..=2.0 + 1e-12).contains(&probs), "{}", probs);
        prop_assert!(probability_contrast(&ft, &ft) == 0.0);
        Ok(())
    });
}

#[test]
fn dac_factors_of_normalised_features_are_bounded_and_base_classes_keep_one() {
    // Distances between unit vectors are ≤ 2, so r(c) = exp(D0 − Dft) lies in [e^-2, e^2];
    // a base class is its own nearest base class (distance 0), so it keeps r = 1.
    let features = (2usize..12, 1usize..8).prop_flat_map(|(classes, dim)| {
        (
            proptest::collection::vec(uniform_f32(-1.0, 1.0), 2 * classes * dim),
            proptest::collection::vec(any::<bool>(), classes),
            Just((classes, dim)),
        )
    });
    check("dac_factor_bounds", REGRESSIONS, 4.0, features, |(values, is_base, (classes, dim))| {
        let mut matrix = Array2::from_shape_vec((2 * classes, dim), values).expect("shape from the strategy");
        for mut row in matrix.rows_mut() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm < 1e-3 {
                row.fill(0.0);
                row[0] = 1.0;
            } else {
                row.mapv_inplace(|v| v / norm);
            }
        }
        let factors = dac_factors(matrix.slice(ndarray::s![..classes, ..]), matrix.slice(ndarray::s![classes.., ..]), &is_base);
        prop_assert_eq!(factors.len(), classes);
        let (low, high) = ((-2.0f32).exp() * 0.999, 2.0f32.exp() * 1.001);
        for (class, &factor) in factors.iter().enumerate() {
            prop_assert!(factor.is_finite() && (low..=high).contains(&factor), "r({}) = {}", class, factor);
            if is_base[class] {
                prop_assert_eq!(factor, 1.0, "base class {}", class);
            }
        }
        Ok(())
    });
}

#[test]
fn invalid_inputs_are_errors() {
    // Non-finite logits and mismatched lengths are refused, never turned into NaN confidences.
    check(
        "calibration_invalid_inputs",
        REGRESSIONS,
        4.0,
        (calibration(), image_logits(), any::<usize>(), select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY])),
        |(method, (mut ft, zs, factors), at, bad)| {
            let mut zs_bad = zs.clone();
            let index = at % ft.len();
            zs_bad[index] = bad;
            prop_assert!(calibrate(&method, &ft, &zs_bad, &factors).is_err());
            prop_assert!(calibrate(&method, &ft, &zs[1..], &factors).is_err());
            ft[index] = bad;
            prop_assert!(calibrate(&method, &ft, &zs, &factors).is_err());
            Ok(())
        },
    );
}

#[test]
fn tiny_temperature_gives_a_distribution_not_nan() {
    // Found by calibration_invariants: T = f64::MIN_POSITIVE passed validation, 1/T = 4.5e307
    // times a logit of −51 overflowed to −∞ for every class, and softmax returned [NaN, NaN].
    // A TS temperature also comes from disk (the cache's `ts_temperature` metadata).
    let ft = [-51.338127f32, -41.292564];
    let calibrated =
        calibrate(&Calibration::Ts { temperature: f64::MIN_POSITIVE }, &ft, &[0.0, 0.0], &[1.0, 1.0]).expect("finite inputs");
    assert_eq!(calibrated.probabilities, vec![0.0, 1.0]);
    // A subnormal temperature, whose reciprocal is infinite, is refused by validation.
    assert!(Calibration::Ts { temperature: 1.0e-310 }.validate().is_err());
    assert!(Calibration::Ts { temperature: f64::MIN_POSITIVE }.validate().is_ok());
}
