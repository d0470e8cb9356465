//! The calibration formulas against reference values computed independently with numpy/scipy
//! (tests/fixtures/calibration/make_vectors.py → vectors.json).

use cac_edge::calibrate::{calibrate, dac_factors, CacParams, Calibration, ContrastDistance};
use ndarray::Array2;
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/calibration/vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read vectors.json")).expect("parse vectors.json")
}

fn floats(value: &Value) -> Vec<f64> {
    value.as_array().expect("array").iter().map(|v| v.as_f64().expect("number")).collect()
}

fn method(spec: &Value) -> Calibration {
    match spec["method"].as_str().expect("method") {
        "none" => Calibration::None,
        "ts" => Calibration::Ts { temperature: spec["temperature"].as_f64().expect("temperature") },
        "dac" => Calibration::Dac,
        "cac" => Calibration::Cac(CacParams {
            alpha: spec["alpha"].as_f64().expect("alpha"),
            k: spec["k"].as_f64().expect("k"),
            distance: if spec["distance"] == "probs" { ContrastDistance::Probs } else { ContrastDistance::Logits },
            thresholds: spec.get("thresholds").map(|t| (t[0].as_f64().unwrap(), t[1].as_f64().unwrap())),
        }),
        other => panic!("unknown method {other}"),
    }
}

/// Relative-or-absolute closeness: probabilities near 1e-40 are compared absolutely.
fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= tolerance * expected.abs().max(1e-12) || (actual - expected).abs() <= 1e-15
}

#[test]
fn calibration_matches_numpy_reference() {
    let vectors = vectors();
    let cases = vectors["cases"].as_array().expect("cases");
    assert!(cases.len() >= 60, "expected the full vector set, got {}", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let ft: Vec<f32> = floats(&case["fine_tuned"]).iter().map(|&v| v as f32).collect();
        let zs: Vec<f32> = floats(&case["zero_shot"]).iter().map(|&v| v as f32).collect();
        let factors: Vec<f32> = floats(&case["dac_factors"]).iter().map(|&v| v as f32).collect();
        let calibrated = calibrate(&method(&case["method"]), &ft, &zs, &factors).expect(name);
        assert_eq!(calibrated.predicted as u64, case["predicted"].as_u64().unwrap(), "{name}: predicted");
        let weight = case["weight"].as_f64().unwrap();
        assert!(close(calibrated.weight, weight, 1e-12), "{name}: weight {} vs {weight}", calibrated.weight);
        if let Some(expected) = case["contrast"].as_f64() {
            let contrast = calibrated.contrast.expect("CAC reports its contrast");
            assert!(close(contrast, expected, 1e-12), "{name}: contrast {contrast} vs {expected}");
        }
        for (field, actual) in [("probabilities", &calibrated.probabilities), ("uncalibrated", &calibrated.uncalibrated)] {
            let expected = floats(&case[field]);
            assert_eq!(actual.len(), expected.len());
            for (class, (a, e)) in actual.iter().zip(&expected).enumerate() {
                // Weights differ from numpy's in the last bits; with logits of 100 that moves
                // exp() by ~1e-13 relative.
                assert!(close(*a, *e, 1e-9), "{name}: {field}[{class}] = {a}, numpy {e}");
            }
        }
    }
}

#[test]
fn dac_factors_match_numpy_reference() {
    let vectors = vectors();
    let dac = &vectors["dac"];
    let matrix = |key: &str| {
        let rows: Vec<Vec<f64>> = dac[key].as_array().unwrap().iter().map(floats).collect();
        Array2::from_shape_fn((rows.len(), rows[0].len()), |(r, c)| rows[r][c] as f32)
    };
    let is_base: Vec<bool> = dac["is_base"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    let factors = dac_factors(matrix("zero_shot").view(), matrix("fine_tuned").view(), &is_base);
    let expected = floats(&dac["factors"]);
    for (class, (actual, expected)) in factors.iter().zip(&expected).enumerate() {
        assert!(close(f64::from(*actual), *expected, 1e-6), "class {class}: {actual} vs numpy {expected}");
    }
    // The fixture is built so that base classes and the new class sitting on a base class get 1,
    // and the other new classes do not.
    assert!(factors[..7].iter().all(|&f| f == 1.0));
    assert_eq!(factors[9], 1.0);
    assert!(factors[7] != 1.0 && factors[8] != 1.0);
}
