//! `cac-edge eval` end to end: the report's completeness and internal consistency on the test
//! bundle, fitting on base validation images of the demo, the image-feature store, and the
//! threshold that `--write-threshold` hands to `classify`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/demo")
}

fn build_cache(bundle: &Path, classes: &Path, base: &Path, output: &Path) {
    let result = cache_build_cli(bundle, classes, base, output);
    assert!(result.status.success(), "cache build: {}", text(&result.stderr));
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

/// Photos of the test bundle's classes, plus a truncated file that must be reported, not fatal.
fn photo_set(dir: &Path) -> PathBuf {
    let photos = fixture("images/photos");
    let rows = [
        ("astronaut.png", "astronaut"),
        ("camera.png", "camera"),
        ("chelsea.png", "cat"),
        ("coffee.png", "coffee mug"),
        ("flower.jpg", "flower"),
        ("hubble_deep_field.jpg", "galaxy"),
        ("rocket.jpg", "rocket"),
        ("china.jpg", "building"),
    ];
    let mut csv = String::from("path,label\n");
    for (file, label) in rows {
        csv.push_str(&format!("{},{label}\n", photos.join(file).display()));
    }
    csv.push_str(&format!("{},cat\n", fixture("images/bad/truncated.jpg").display()));
    let path = dir.join("photos.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

/// Checks what must hold in any report: every calibrator has the same accuracy and image count
/// per split (calibration never changes a prediction), each ECE equals the one recomputed from
/// its per-bin table, bins are the requested number and hold every image.
fn check_consistency(report: &Value, bins: usize) {
    assert_eq!(report["bins"], bins);
    let calibrators = report["calibrators"].as_array().unwrap();
    assert!(calibrators.len() >= 3, "at least none, dac and cac-paper");
    let first = &calibrators[0]["splits"];
    for calibrator in calibrators {
        let splits = calibrator["splits"].as_array().unwrap();
        assert_eq!(splits.len(), first.as_array().unwrap().len());
        for (split, reference) in splits.iter().zip(first.as_array().unwrap()) {
            let name = format!("{} {}", calibrator["name"], split["split"]);
            assert_eq!(split["split"], reference["split"]);
            assert_eq!(split["images"], reference["images"], "{name}");
            assert_eq!(split["accuracy_percent"], reference["accuracy_percent"], "{name}");
            let table = split["reliability"].as_array().unwrap();
            assert_eq!(table.len(), bins, "{name}");
            let images = split["images"].as_u64().unwrap() as f64;
            let counted: f64 = table.iter().map(|bin| number(&bin["count"])).sum();
            assert_eq!(counted, images, "{name}: every image in one bin");
            let ece: f64 = table
                .iter()
                .map(|bin| number(&bin["count"]) / images * (number(&bin["accuracy"]) - number(&bin["mean_confidence"])).abs())
                .sum();
            assert!((100.0 * ece - number(&split["ece_percent"])).abs() < 1e-9, "{name}: ECE from the bins");
            let correct: f64 = table.iter().map(|bin| number(&bin["count"]) * number(&bin["accuracy"])).sum();
            assert!(
                (100.0 * correct / images - number(&split["accuracy_percent"])).abs() < 1e-9,
                "{name}: accuracy from the bins"
            );
            for key in ["ace_percent", "mce_percent", "nll", "brier", "aurc_percent"] {
                assert!(number(&split[key]).is_finite() && number(&split[key]) >= 0.0, "{name}: {key}");
            }
            assert!(number(&split["mce_percent"]) >= number(&split["ece_percent"]) - 1e-9, "{name}: MCE ≥ ECE");
            assert!(!split["risk_coverage"].as_array().unwrap().is_empty(), "{name}");
        }
    }
}

fn check_picture(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if path.extension().unwrap() == "png" {
        let image = image::load_from_memory(&bytes).unwrap().to_rgb8();
        let colours: std::collections::HashSet<[u8; 3]> = image.pixels().map(|pixel| pixel.0).collect();
        assert!(image.width() >= 400 && image.height() >= 300, "{}", path.display());
        assert!(colours.len() > 16, "{}: {} colours, nothing drawn?", path.display(), colours.len());
    } else {
        let svg = String::from_utf8(bytes).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text") && svg.len() > 5_000, "{}", path.display());
    }
}

#[test]
fn eval_report_on_the_test_bundle_is_complete_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.safetensors");
    build_cache(&bundle_dir(), &fixture("classes.txt"), &fixture("base.txt"), &cache);
    let out = dir.path().join("report");
    let output = cac_edge(&[
        "eval",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--bins",
        "10",
        "--bundle",
        bundle_dir().to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--images",
        photo_set(dir.path()).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "a bad image makes the exit code 1: {stderr}");
    assert!(stderr.contains("truncated.jpg"), "{stderr}");

    let report = read_json(&out.join("report.json"));
    check_consistency(&report, 10);
    let images = &report["images"];
    assert_eq!((images["total"].as_u64(), images["evaluated"].as_u64()), (Some(9), Some(8)));
    // Base classes among the photos' labels: cat, rocket, coffee mug, building (tests/fixtures/base.txt).
    assert_eq!((images["base"].as_u64(), images["new"].as_u64()), (Some(4), Some(4)));
    assert!(images["failures"][0]["path"].as_str().unwrap().ends_with("truncated.jpg"));
    let names: Vec<&str> = report["calibrators"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["none", "dac", "cac-paper"],
        "no temperature to evaluate ts with, and the test bundle has no [calibration]"
    );
    assert!(report["notes"][0].as_str().unwrap().contains("ts not evaluated"));
    assert_eq!(report["default_calibrator"], "cac-paper");

    let markdown = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    for needle in ["## base classes", "## new classes", "## all classes", "reliability.png", "risk-coverage-new.png", "cac-paper"]
    {
        assert!(markdown.contains(needle), "REPORT.md lacks {needle}");
    }
    for file in ["reliability", "risk-coverage-base", "risk-coverage-new", "risk-coverage-all"] {
        check_picture(&out.join(format!("{file}.png")));
        check_picture(&out.join(format!("{file}.svg")));
    }
}

#[test]
fn eval_fits_on_base_validation_stores_features_and_hands_its_threshold_to_classify() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("demo.safetensors");
    build_cache(&demo(), &demo().join("classes.txt"), &demo().join("base.txt"), &cache);
    let out = dir.path().join("report");
    let args = |out: &Path| {
        vec![
            "eval".to_string(),
            "--device".into(),
            "cpu".into(),
            "--bundle".into(),
            demo().display().to_string(),
            "--cache".into(),
            cache.display().to_string(),
            "--images".into(),
            demo().join("images/labels.csv").display().to_string(),
            // The sample images' CSV as the fitting set: only its base-class rows may be used.
            "--fit-images".into(),
            demo().join("images/validation.csv").display().to_string(),
            "--fit-cac".into(),
            "--write-threshold".into(),
            "--write-temperature".into(),
            "--target-precision".into(),
            "0.9".into(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let run = |out: &Path| {
        let args = args(out);
        command().args(&args).output().unwrap()
    };
    // Fitting alone stores nothing in the cache: the temperature only with --write-temperature.
    let plain = dir.path().join("plain.safetensors");
    std::fs::copy(&cache, &plain).unwrap();
    let fit_only: Vec<String> = args(&dir.path().join("plain-report"))
        .into_iter()
        .filter(|arg| !arg.starts_with("--write-"))
        .map(|arg| if arg == cache.display().to_string() { plain.display().to_string() } else { arg })
        .collect();
    let output = command().args(&fit_only).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let plain_report = read_json(&dir.path().join("plain-report/report.json"));
    assert!(plain_report["fit"]["temperature"]["temperature"].as_f64().is_some(), "a temperature was fitted");
    assert_eq!(plain_report["written"], serde_json::json!([]));
    let info = text(&cac_edge(&["cache", "info", "--cache", plain.to_str().unwrap()]).stdout);
    assert!(!info.contains("ts_temperature") && !info.contains("threshold"), "{info}");
    assert_eq!(std::fs::read(&plain).unwrap(), std::fs::read(&cache).unwrap(), "the cache file is untouched");
    // A threshold for TS with a temperature fitted now but not stored would mean nothing to
    // classify: refused, nothing written.
    let mut ts_threshold = fit_only.clone();
    ts_threshold.extend(["--calibration".to_string(), "ts".into(), "--write-threshold".into()]);
    let output = command().args(&ts_threshold).output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not stored") && stderr.contains("--write-temperature"), "{stderr}");
    assert_eq!(std::fs::read(&plain).unwrap(), std::fs::read(&cache).unwrap(), "still untouched");

    let first = run(&out);
    let stderr = text(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let report = read_json(&out.join("report.json"));
    check_consistency(&report, 15);
    let fit = &report["fit"];
    assert_eq!((fit["base_images"].as_u64(), fit["skipped_new_images"].as_u64()), (Some(180), Some(0)));
    let temperature = number(&fit["temperature"]["temperature"]);
    assert!(number(&fit["temperature"]["nll_after"]) <= number(&fit["temperature"]["nll_before"]));
    assert!(number(&fit["cac"]["nll"]) <= number(&fit["cac"]["nll_start"]));
    let names: Vec<&str> = report["calibrators"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "ts", "dac", "cac-paper", "cac-bundle", "cac-fit"]);
    assert_eq!(report["default_calibrator"], "cac-bundle", "the demo bundle's measured CAC");
    // The demo's model is trained: far above chance (1/60, all 60 classes compete) on every split.
    for split in report["calibrators"][0]["splits"].as_array().unwrap() {
        assert!(number(&split["accuracy_percent"]) > 40.0, "{}: {}", split["split"], split["accuracy_percent"]);
    }

    // The cache now holds the temperature and the threshold chosen for the default calibration.
    let info = cac_edge(&["cache", "info", "--cache", cache.to_str().unwrap()]);
    let info = text(&info.stdout);
    assert!(info.contains(&format!("ts_temperature: {temperature}")), "{info}");
    let default = report["calibrators"].as_array().unwrap().iter().find(|c| c["name"] == "cac-bundle").unwrap();
    let all = default["splits"].as_array().unwrap().iter().find(|s| s["split"] == "all").unwrap();
    let chosen = number(&all["threshold"]["threshold"]);
    assert!(number(&all["threshold"]["precision_percent"]) >= 90.0);
    assert!(info.contains(&format!("threshold: {chosen}")), "{info}");

    // A second run reads the stored image features and reproduces every number.
    let again = dir.path().join("again");
    let second = run(&again);
    assert!(second.status.success());
    assert!(text(&second.stderr).contains("features read from"), "{}", text(&second.stderr));
    let mut report_again = read_json(&again.join("report.json"));
    // Only what was written differs: the second run wrote the same values again.
    report_again["written"] = report["written"].clone();
    assert_eq!(report_again["calibrators"], report["calibrators"]);

    // classify uses the stored threshold for the calibration it was chosen for, and only that.
    let image = demo().join("images/base/red_heart/00.jpg").display().to_string();
    let demo_dir = demo().display().to_string();
    let classify = |extra: &[&str]| {
        let mut args = vec!["classify", "--device", "cpu", "--bundle", &demo_dir, "--cache", cache.to_str().unwrap(), &image];
        args.extend(extra);
        let output = cac_edge(&args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let line: Value = serde_json::from_str(text(&output.stdout).lines().next().unwrap()).unwrap();
        number(&line["threshold"])
    };
    assert_eq!(classify(&[]), chosen);
    assert_eq!(classify(&["--calibration", "none"]), 0.8);
    assert_eq!(classify(&["--threshold", "0.5"]), 0.5);
}

#[test]
fn eval_refuses_fitting_without_base_images_and_unknown_labels() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.safetensors");
    build_cache(&bundle_dir(), &fixture("classes.txt"), &fixture("base.txt"), &cache);
    let new_only = dir.path().join("new.csv");
    std::fs::write(&new_only, format!("path,label\n{},astronaut\n", fixture("images/photos/astronaut.png").display())).unwrap();
    let unknown = dir.path().join("unknown.csv");
    std::fs::write(&unknown, format!("{},zebra\n", fixture("images/photos/astronaut.png").display())).unwrap();
    let eval = |images: &Path, fit: &Path| {
        cac_edge(&[
            "eval",
            "--device",
            "cpu",
            "--bundle",
            bundle_dir().to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--fit-images",
            fit.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ])
    };
    let output = eval(&new_only, &new_only);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("base-class validation images only"), "{}", text(&output.stderr));
    let output = eval(&unknown, &new_only);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("unknown.csv") && stderr.contains("'zebra'") && stderr.contains("line 1"), "{stderr}");
}
