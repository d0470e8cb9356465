//! Bundles whose fine-tuned model has its own image encoder: MaPLe and PromptSRC, exported by
//! onnx/export.py from random-weight checkpoints in the official Dassl layouts
//! (onnx/fixtures/make_deep_prompt_bundles.py), checked against the plain-PyTorch reference
//! forward written from the official code (onnx/fixtures/deep_prompt_reference.py), whose outputs
//! are stored beside the bundles. Both image encoders, the cache, the logits under each
//! calibration and encoder schedule, and `cache build`, `classify`, `eval`, `bench` and `doctor`
//! end to end. Needs the ONNX Runtime library (scripts/test installs it).

mod common;

use std::path::{Path, PathBuf};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{CacheOpenOptions, TextFeatureCache};
use cac_edge::calibrate::{calibrate, Calibration};
use cac_edge::encode::Encoder;
use cac_edge::preprocess::{decode_file, DecodeLimits};
use cac_edge::runtime::{Device, SessionOptions};
use cac_edge::{CalibrationMethod, CalibrationSettings, Classifier, ClassifierOptions, EncoderSchedule};
use common::*;
use image::RgbImage;
use ndarray::{Array2, Ix2, Ix4};
use serde_json::Value;

/// The deep-prompt fixtures: bundle directory and its reference file.
const BUNDLES: [(&str, &str); 2] =
    [("bundle-maple-tiny", "tiny_maple.safetensors"), ("bundle-promptsrc-tiny", "tiny_promptsrc.safetensors")];

/// Decoded photos and preprocessing in Rust against open_clip's in PyTorch: the bar for image
/// embeddings after our own preprocessing is cosine >= 0.9999 (tests/pipeline.rs), times a
/// logit scale of 100. The encoders alone are held to 1e-6 on the reference pixels.
const LOGIT_TOLERANCE: f32 = 1e-2;

fn names(reference: &Reference, key: &str) -> Vec<String> {
    serde_json::from_str(&reference.metadata(key)).expect("JSON list in reference metadata")
}

fn photos(reference: &Reference) -> Vec<PathBuf> {
    names(reference, "images").iter().map(|name| fixture("images/photos").join(name)).collect()
}

fn frames(reference: &Reference) -> Vec<RgbImage> {
    photos(reference).iter().map(|path| decode_file(path, &DecodeLimits::default()).unwrap()).collect()
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn matrix(reference: &Reference, key: &str) -> Array2<f32> {
    reference.f32(key).into_dimensionality::<Ix2>().unwrap()
}

fn options(method: CalibrationMethod, schedule: EncoderSchedule, session: SessionOptions) -> ClassifierOptions {
    ClassifierOptions {
        session,
        calibration: CalibrationSettings::method(method),
        encoder_schedule: schedule,
        ..ClassifierOptions::default()
    }
}

/// ONNX Runtime's default thread count: the concurrent schedule then splits the cores.
fn default_threads() -> SessionOptions {
    SessionOptions { device: Device::Cpu, ..SessionOptions::default() }
}

#[test]
fn both_image_encoders_reproduce_the_reference_forward() {
    let pixels = Reference::load().f32("pixel_values").into_dimensionality::<Ix4>().unwrap();
    for (bundle_name, reference_name) in BUNDLES {
        let reference = Reference::load_file(reference_name);
        assert_eq!(names(&reference, "images"), names(&Reference::load(), "images"), "same photos, same order");
        let bundle = Bundle::open(&fixture(bundle_name)).unwrap();
        let image_ft = bundle.image_ft_path().unwrap_or_else(|| panic!("{bundle_name}: no [fine_tuned] image_encoder"));
        for (path, key) in [(bundle.image_zs_path(), "image_embeds_zs"), (image_ft, "image_embeds_ft")] {
            let mut encoder = Encoder::open_image(&runtime(), &path, &cpu(), 224, bundle.embed_dim()).unwrap();
            let ours = encoder.encode_images(pixels.view()).unwrap();
            let expected = matrix(&reference, key);
            for (row, (a, b)) in ours.outer_iter().zip(expected.outer_iter()).enumerate() {
                let cos = cosine(&a.to_vec(), &b.to_vec());
                assert!(cos >= 0.999_999, "{bundle_name} {key} image {row}: cosine {cos}");
            }
        }
        // The check above can tell the prompted encoder from the plain one: the prompts move
        // every embedding far more than its bound (on random weights a few prompt tokens among
        // 50 patches move the class token by 1 - cosine ~ 3e-4 to 2e-3).
        let (zs, ft) = (matrix(&reference, "image_embeds_zs"), matrix(&reference, "image_embeds_ft"));
        for (row, (a, b)) in zs.outer_iter().zip(ft.outer_iter()).enumerate() {
            let cos = cosine(&a.to_vec(), &b.to_vec());
            assert!(1.0 - cos > 100.0 * (1.0 - 0.999_999), "{bundle_name} image {row}: prompts barely move it ({cos})");
        }
    }
}

#[test]
fn cac_logits_match_the_reference_under_both_schedules() {
    for (bundle_name, reference_name) in BUNDLES {
        let reference = Reference::load_file(reference_name);
        let bundle = fixture(bundle_name);
        let dir = tempfile::tempdir().unwrap();
        let cache_path = build_test_cache(&bundle, dir.path());
        let cache = TextFeatureCache::open(&cache_path, CacheOpenOptions::default()).unwrap();
        assert_eq!(cache.class_names(), names(&reference, "classes").as_slice());
        let stacked = cache.stacked_text_features().to_f32();
        let classes = cache.num_classes();
        for (offset, key) in [(0, "text_embeds_zs"), (classes, "text_embeds_ft")] {
            let expected = matrix(&reference, key);
            for class in 0..classes {
                let cos = cosine(&stacked.row(offset + class).to_vec(), &expected.row(class).to_vec());
                assert!(cos >= 0.999_999, "{bundle_name} {key} class {class}: cosine {cos}");
            }
        }

        let frames = frames(&reference);
        let (expected_zs, expected_ft) = (matrix(&reference, "logits_zs"), matrix(&reference, "logits_ft"));
        let mut by_schedule = Vec::new();
        for schedule in [EncoderSchedule::Concurrent, EncoderSchedule::Sequential] {
            let mut classifier =
                Classifier::open(&runtime(), &bundle, &cache_path, options(CalibrationMethod::Cac, schedule, default_threads()))
                    .unwrap();
            let logits = classifier.logits(&frames).unwrap();
            for (ours, expected, key) in [(&logits.zero_shot, &expected_zs, "zs"), (&logits.fine_tuned, &expected_ft, "ft")] {
                let worst = max_abs_diff(ours, expected);
                println!("{bundle_name} {schedule:?}: logits_{key} max |Δ| vs the PyTorch reference {worst:.2e}");
                assert!(worst < LOGIT_TOLERANCE, "{bundle_name} {schedule:?} logits_{key}: max |Δ| {worst}");
            }
            // The decisions follow from the reference logits through the calibration formula.
            let predictions = classifier.classify_frames(&frames).unwrap();
            let Calibration::Cac(_) = classifier.calibration() else { panic!("CAC was asked for") };
            for (image, prediction) in predictions.iter().enumerate() {
                let expected = calibrate(
                    classifier.calibration(),
                    &expected_ft.row(image).to_vec(),
                    &expected_zs.row(image).to_vec(),
                    cache.dac_factors(),
                )
                .unwrap();
                assert_eq!(prediction.class, expected.predicted, "{bundle_name} image {image}");
                assert!((prediction.confidence - expected.probabilities[expected.predicted]).abs() < 1e-3);
                let contrast = prediction.contrast.expect("CAC reports its contrast");
                assert!((contrast - expected.contrast.unwrap()).abs() < 0.05 * (1.0 + contrast), "{bundle_name} image {image}");
            }
            by_schedule.push(logits);
        }
        let (concurrent, sequential) = (&by_schedule[0], &by_schedule[1]);
        assert!(max_abs_diff(&concurrent.fine_tuned, &sequential.fine_tuned) < 1e-4);
        assert!(max_abs_diff(&concurrent.zero_shot, &sequential.zero_shot) < 1e-4);
    }
}

#[test]
fn calibrations_that_ignore_the_zero_shot_logits_skip_the_zero_shot_pass() {
    let (bundle_name, reference_name) = BUNDLES[0];
    let reference = Reference::load_file(reference_name);
    let bundle = fixture(bundle_name);
    let dir = tempfile::tempdir().unwrap();
    let cache_path = build_test_cache(&bundle, dir.path());
    let frames = frames(&reference);
    let expected_ft = matrix(&reference, "logits_ft");
    let open = |options: ClassifierOptions| Classifier::open(&runtime(), &bundle, &cache_path, options).unwrap();

    let mut uncalibrated = open(options(CalibrationMethod::None, EncoderSchedule::Concurrent, cpu()));
    let logits = uncalibrated.logits(&frames).unwrap();
    assert_eq!(logits.zero_shot.nrows(), 0, "none never reads the zero-shot logits: that pass is skipped");
    assert!(max_abs_diff(&logits.fine_tuned, &expected_ft) < LOGIT_TOLERANCE);
    for (image, prediction) in uncalibrated.classify_frames(&frames).unwrap().iter().enumerate() {
        let row = expected_ft.row(image).to_vec();
        let expected = calibrate(&Calibration::None, &row, &row, &vec![1.0; row.len()]).unwrap();
        assert_eq!(prediction.class, expected.predicted, "image {image}");
        assert!((prediction.confidence - expected.probabilities[expected.predicted]).abs() < 1e-3, "image {image}");
        assert_eq!(prediction.contrast, None);
    }

    // TS with a given temperature: the same single pass, the same argmax.
    let ts = ClassifierOptions {
        calibration: CalibrationSettings { temperature: Some(2.0), ..CalibrationSettings::method(CalibrationMethod::Ts) },
        ..options(CalibrationMethod::Ts, EncoderSchedule::Concurrent, cpu())
    };
    let mut scaled = open(ts);
    assert_eq!(scaled.logits(&frames).unwrap().zero_shot.nrows(), 0);
    let (plain, tempered) = (uncalibrated.classify_frames(&frames).unwrap(), scaled.classify_frames(&frames).unwrap());
    for (plain, tempered) in plain.iter().zip(&tempered) {
        assert_eq!(plain.class, tempered.class);
        assert!(tempered.confidence <= plain.confidence + 1e-12, "T = 2 softens");
    }

    // What eval asks for: both passes whatever the calibration.
    let both =
        ClassifierOptions { encode_both_images: true, ..options(CalibrationMethod::None, EncoderSchedule::Sequential, cpu()) };
    let logits = open(both).logits(&frames).unwrap();
    assert!(max_abs_diff(&logits.zero_shot, &matrix(&reference, "logits_zs")) < LOGIT_TOLERANCE);
}

/// Labelled photos of the test classes, as `eval` reads them.
fn labelled_photos(dir: &Path) -> PathBuf {
    let rows = [
        ("astronaut.png", "astronaut"),
        ("camera.png", "camera"),
        ("chelsea.png", "cat"),
        ("coffee.png", "coffee mug"),
        ("rocket.jpg", "rocket"),
        ("china.jpg", "building"),
    ];
    let mut csv = String::from("path,label\n");
    for (file, label) in rows {
        csv.push_str(&format!("{},{label}\n", fixture("images/photos").join(file).display()));
    }
    let path = dir.join("labels.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

#[test]
fn cache_classify_eval_bench_and_doctor_run_on_deep_prompt_bundles() {
    for (bundle_name, reference_name) in BUNDLES {
        let reference = Reference::load_file(reference_name);
        let bundle = fixture(bundle_name);
        let bundle_arg = bundle.to_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache.safetensors");
        let built = cache_build_cli(&bundle, &fixture("classes.txt"), &fixture("base.txt"), &cache);
        assert!(built.status.success(), "{bundle_name}: cache build: {}", text(&built.stderr));
        let cache_arg = cache.to_str().unwrap();

        // classify: one line per photo, the reference's labels.
        let photos = photos(&reference);
        let output = command()
            .args(["classify", "--device", "cpu", "--bundle", bundle_arg, "--cache", cache_arg])
            .args(&photos)
            .output()
            .unwrap();
        assert!(output.status.success(), "{bundle_name}: classify: {}", text(&output.stderr));
        let lines = json_lines(&output);
        assert_eq!(lines.len(), photos.len());
        let classes = names(&reference, "classes");
        let expected_ft = matrix(&reference, "logits_ft");
        for (image, line) in lines.iter().enumerate() {
            let best = (0..classes.len()).max_by(|&a, &b| expected_ft[[image, a]].total_cmp(&expected_ft[[image, b]])).unwrap();
            assert_eq!(line["label"], classes[best].as_str(), "{bundle_name} image {image}: {line}");
            assert_eq!(line["calibration"], "cac");
        }

        // eval: every calibrator on the same passes; accuracy is the reference argmax's.
        let out = dir.path().join("report");
        let labels = labelled_photos(dir.path());
        let output = cac_edge(&[
            "eval",
            "--device",
            "cpu",
            "--bins",
            "5",
            "--bundle",
            bundle_arg,
            "--cache",
            cache_arg,
            "--images",
            labels.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{bundle_name}: eval: {}", text(&output.stderr));
        let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        let calibrators = report["calibrators"].as_array().unwrap();
        let accuracy = |calibrator: &Value| calibrator["splits"][0]["accuracy_percent"].as_f64().unwrap();
        assert!(calibrators.iter().all(|calibrator| accuracy(calibrator) == accuracy(&calibrators[0])));
        let cac = calibrators.iter().find(|calibrator| calibrator["name"] == "cac-paper").expect("cac-paper evaluated");
        assert!(cac["splits"][0]["ece_percent"].as_f64().unwrap().is_finite());

        // bench: the fine-tuned encoder alone (a) and both encoders as CAC runs them (a').
        let output = command()
            .args(["bench", "--device", "cpu", "--bundle", bundle_arg, "--cache", cache_arg])
            .args(["--batch-sizes", "1", "--rounds", "1", "--warmup-rounds", "0", "--json"])
            .args(&photos[..2])
            .output()
            .unwrap();
        assert!(output.status.success(), "{bundle_name}: bench: {}", text(&output.stderr));
        let bench: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(bench["bundle"]["fine_tuned_image_encoder"], true);
        assert_eq!(bench["settings"]["encoder_schedule"], "concurrent");
        let result = &bench["results"][0];
        assert!(result["encoder_cac"]["median_s"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["ratios"]["cac_encoders_over_encoder"].as_f64().unwrap().is_finite());

        // doctor opens both image encoders.
        let output = cac_edge(&["doctor", "--device", "cpu", "--bundle", bundle_arg, "--cache", cache_arg, "--json"]);
        assert!(output.status.success(), "{bundle_name}: doctor: {}", text(&output.stdout));
        let checks: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
        let image_ft = checks.iter().find(|check| check["name"] == "image encoder (fine-tuned)");
        assert_eq!(image_ft.map(|check| &check["status"]), Some(&Value::from("ok")), "{checks:?}");
    }
}

#[test]
fn serve_classifies_frames_with_both_image_encoders_like_classify() {
    use common::served::{free_port, write_config_for, Served};
    let (bundle_name, _) = BUNDLES[0];
    let bundle = fixture(bundle_name);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.safetensors");
    let built = cache_build_cli(&bundle, &fixture("classes.txt"), &fixture("base.txt"), &cache);
    assert!(built.status.success(), "{}", text(&built.stderr));
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let port = free_port();
    let model = "threshold = 0.0\nencoder_schedule = \"concurrent\"";
    let camera = "[[camera]]\nname = \"drop\"\nsource = \"folder:in\"\nfps = 50\n";
    let config = write_config_for(&bundle, dir.path(), cache.to_str().unwrap(), port, model, "", camera);
    let served = Served::start(&config, port);
    for name in ["chelsea.png", "rocket.jpg"] {
        let photo = fixture("images/photos").join(name);
        std::fs::copy(&photo, dir.path().join("in").join(name)).unwrap();
        let line = served.next_line();
        let reference = classify_reference(&bundle, &cache, &photo, "0.0");
        assert_eq!(line["label"], reference["label"], "{name}");
        let (ours, theirs) = (line["confidence"].as_f64().unwrap(), reference["confidence"].as_f64().unwrap());
        assert!((ours - theirs).abs() < 1e-6, "{name}: {ours} vs {theirs}");
        // CAC compared the two image encoders' logits, as classify does.
        let (ours, theirs) = (line["contrast"].as_f64().unwrap(), reference["contrast"].as_f64().unwrap());
        assert!((ours - theirs).abs() < 1e-4 * (1.0 + theirs), "{name}: contrast {ours} vs {theirs}");
    }
}
