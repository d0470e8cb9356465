//! Metric parity: our metrics against uncertainty-calibration 0.1.4 (`get_ece`, `get_ece_em`, its
//! bins), scikit-learn 1.9.1 (`log_loss`, `brier_score_loss` with `labels=`) and a numpy AURC, on
//! the stored vectors of tests/fixtures/metrics (make_vectors.py → vectors.json; this test only
//! reads them). Run with `--nocapture` to see the worst difference per metric.

use cac_edge::tooling::metrics::{self, ReliabilityBin};
use serde_json::Value;

const TOLERANCE: f64 = 1e-9;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics/vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read vectors.json")).expect("parse vectors.json")
}

/// Rows are strings of Python repr floats: `str::parse` rounds correctly, so confidences placed
/// exactly on bin edges arrive bit for bit.
fn probabilities(case: &Value) -> Vec<f64> {
    let rows = case["probabilities"].as_array().expect("probabilities");
    let row = |row: &Value| -> Vec<f64> {
        row.as_str().expect("row string").split(' ').map(|v| v.parse::<f64>().expect("float")).collect()
    };
    rows.iter().flat_map(row).collect()
}

fn usizes(value: &Value) -> Vec<usize> {
    value.as_array().expect("array").iter().map(|v| v.as_u64().expect("integer") as usize).collect()
}

fn counts(table: &[ReliabilityBin]) -> Vec<usize> {
    table.iter().map(|bin| bin.count).collect()
}

/// Absolute difference, relative for values above 1 (NLL reaches ~36 per clipped sample).
fn difference(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected.abs().max(1.0)
}

struct Worst(Vec<(&'static str, f64, String)>);

impl Worst {
    fn check(&mut self, metric: &'static str, case: &str, actual: f64, expected: f64) {
        let diff = difference(actual, expected);
        assert!(diff <= TOLERANCE, "{case}: {metric} = {actual:e}, reference {expected:e} (difference {diff:e})");
        match self.0.iter_mut().find(|(name, _, _)| *name == metric) {
            Some(entry) if diff > entry.1 => *entry = (metric, diff, case.to_string()),
            Some(_) => {}
            None => self.0.push((metric, diff, case.to_string())),
        }
    }
}

#[test]
fn metrics_match_uncertainty_calibration_and_sklearn() {
    let vectors = vectors();
    let cases = vectors["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10, "expected the full set of cases");
    let mut worst = Worst(Vec::new());
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let classes = case["classes"].as_u64().expect("classes") as usize;
        let probabilities = probabilities(case);
        let labels = usizes(&case["labels"]);
        assert_eq!(probabilities.len(), labels.len() * classes, "{name}: shape");
        let (predicted, confidences) = metrics::top_label(&probabilities, classes).unwrap();
        let correct: Vec<bool> = predicted.iter().zip(&labels).map(|(p, y)| p == y).collect();

        worst.check("accuracy", name, metrics::accuracy(&predicted, &labels).unwrap(), case["accuracy"].as_f64().unwrap());
        let nll = metrics::negative_log_likelihood(&probabilities, classes, &labels).unwrap();
        worst.check("nll (log_loss)", name, nll, case["log_loss"].as_f64().unwrap());
        let brier = metrics::brier_score(&probabilities, classes, &labels).unwrap();
        worst.check("brier (brier_score_loss)", name, brier, case["brier"].as_f64().unwrap());
        worst.check("aurc", name, metrics::aurc(&confidences, &correct).unwrap(), case["aurc"].as_f64().unwrap());

        for (index, bins) in usizes(&case["bins"]).into_iter().enumerate() {
            let table = metrics::reliability_table(&confidences, &correct, bins).unwrap();
            assert_eq!(counts(&table), usizes(&case["ece_counts"][index]), "{name}: equal-width bin counts, {bins} bins");
            worst.check("ece (get_ece)", name, metrics::ece_from_table(&table), case["ece"][index].as_f64().unwrap());
            let ece = metrics::expected_calibration_error(&confidences, &correct, bins).unwrap();
            assert_eq!(ece, metrics::ece_from_table(&table));
            worst.check("mce", name, metrics::maximum_calibration_error(&table), case["mce"][index].as_f64().unwrap());

            let mass = metrics::equal_mass_table(&confidences, &correct, bins).unwrap();
            assert_eq!(counts(&mass), usizes(&case["ece_em_counts"][index]), "{name}: equal-mass bin counts, {bins} bins");
            let ace = metrics::adaptive_calibration_error(&confidences, &correct, bins).unwrap();
            worst.check("ace (get_ece_em)", name, ace, case["ece_em"][index].as_f64().unwrap());
        }

        let curve = metrics::risk_coverage_curve(&confidences, &correct).unwrap();
        assert_eq!(curve.len() as u64, case["curve_points"].as_u64().unwrap(), "{name}: curve points");
        assert_eq!(curve.last().unwrap().coverage, 1.0);
        if let Some(reference) = case.get("curve").and_then(Value::as_array) {
            for (point, expected) in curve.iter().zip(reference) {
                // (serde_json's float parsing may be an ulp off: compare thresholds with the tolerance.)
                worst.check("curve threshold", name, point.threshold, expected[0].as_f64().unwrap());
                worst.check("curve coverage", name, point.coverage, expected[1].as_f64().unwrap());
                worst.check("curve risk", name, point.risk, expected[2].as_f64().unwrap());
            }
        }
    }
    for (metric, diff, case) in &worst.0 {
        println!("{metric:>26}: worst difference {diff:.3e} ({case})");
    }
}

/// The vectors cover what the issue asks for.
#[test]
fn vectors_cover_the_edge_cases() {
    let vectors = vectors();
    let names: Vec<&str> = vectors["cases"].as_array().unwrap().iter().map(|case| case["name"].as_str().unwrap()).collect();
    for wanted in [
        "dirichlet_random", "peaked_softmax", "confidence_exactly_one", "confidences_on_bin_edges", "classes_absent_from_labels",
        "single_sample", "ties_between_classes", "tied_confidences",
    ] {
        assert!(names.contains(&wanted), "missing case {wanted}");
    }
    let cases = vectors["cases"].as_array().unwrap();
    let edges = cases.iter().find(|case| case["name"] == "confidences_on_bin_edges").unwrap();
    let classes = edges["classes"].as_u64().unwrap() as usize;
    let (_, confidences) = metrics::top_label(&probabilities(edges), classes).unwrap();
    for i in 1..=15 {
        assert!(confidences.contains(&(i as f64 / 15.0)), "edge {i}/15 missing");
    }
    assert!(confidences.contains(&(0.1 * 3.0)) && confidences.contains(&0.3));
}
