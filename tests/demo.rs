//! The committed mini-world demo bundle (onnx/demo, built by onnx/miniworld/build_demo.py):
//! its manifest matches its files, and the runtime classifies clearly drawn demo images as
//! onnxruntime-on-open_clip-preprocessing does (onnx/demo/images/clear.csv, chosen by
//! onnx/miniworld/select_clear_examples.py).

mod common;

use std::path::{Path, PathBuf};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{build_cache, ClassList, FeaturePrecision};
use cac_edge::calibrate::{CacParams, Calibration, ContrastDistance};
use cac_edge::{Classifier, ClassifierOptions};
use common::{cpu, runtime};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/demo")
}

#[test]
fn demo_manifest_hashes_match_its_files() {
    let bundle = Bundle::open(&demo()).expect("onnx/demo opens");
    let names: Vec<&str> = bundle.file_names().collect();
    // The four exported graphs and tokenizer, and the int8 image-encoder variant (onnx/quantize.py).
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(bundle.precisions(), [cac_edge::Precision::Fp32, cac_edge::Precision::Int8]);
    bundle.verify_files(names).expect("every file matches its sha256 in bundle.toml");
}

#[test]
fn clearly_drawn_demo_images_get_their_labels_with_the_measured_calibration() {
    let bundle = Bundle::open(&demo()).unwrap();
    let classes = ClassList::from_files(&demo().join("classes.txt"), &demo().join("base.txt")).unwrap();
    assert_eq!(classes.names.len(), 60);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("demo.safetensors");
    build_cache(&runtime(), &bundle, &classes, &cpu(), &cache, FeaturePrecision::F32).unwrap();

    let options = ClassifierOptions { session: cpu(), ..ClassifierOptions::default() };
    let mut classifier = Classifier::open(&runtime(), &demo(), &cache, options).unwrap();
    // The bundle's [calibration] (chosen on validation, onnx/demo/REPORT.md) is the default.
    let measured = CacParams { alpha: 0.9, k: 0.75, distance: ContrastDistance::Probs, thresholds: None };
    assert_eq!(classifier.calibration(), &Calibration::Cac(measured));

    let clear = std::fs::read_to_string(demo().join("images/clear.csv")).unwrap();
    let expected: Vec<(PathBuf, String)> = clear
        .lines()
        .skip(1)
        .map(|line| {
            let (path, label) = line.split_once(',').unwrap();
            (demo().join("images").join(path), label.to_string())
        })
        .collect();
    assert!(expected.len() >= 9, "base, val-new and test-new examples");
    let paths: Vec<PathBuf> = expected.iter().map(|(path, _)| path.clone()).collect();
    let mut outcomes = Vec::new();
    classifier.classify_files(&paths, |path, outcome| {
        outcomes.push((path.to_path_buf(), outcome));
        std::ops::ControlFlow::Continue(())
    });
    for ((path, label), (reported, outcome)) in expected.iter().zip(outcomes) {
        assert_eq!(path, &reported);
        let prediction = outcome.unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(&prediction.label, label, "{}", path.display());
        assert_eq!(prediction.is_base, path.components().any(|part| part.as_os_str() == "base"));
    }
}
