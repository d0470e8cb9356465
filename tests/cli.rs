//! The `cac-edge` binary end to end: cache build, classify on real photos, odd image modes and
//! bad inputs, exit codes, and the errors a field engineer meets first (no ONNX Runtime library,
//! a GPU provider that is not there, a bundle file missing).

mod common;

use common::*;
use serde_json::Value;

#[test]
fn classify_reports_every_image_and_keeps_going_past_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let output = classify_command(&cache)
        .args(["--device", "cpu", "--threshold", "0.5", "--top-k", "2"])
        .args([fixture("images/photos"), fixture("images/modes"), fixture("images/bad")])
        .arg("/nonexistent/frame.jpg")
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "some inputs are bad: exit 1\n{stderr}");
    let lines = json_lines(&output);
    let (failed, classified): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|line| line.get("error").is_some());

    // Every photo and every odd-mode image (RGBA, LA, grayscale, 16-bit, palette…) classifies.
    let good_inputs = ["images/photos", "images/modes"].iter().flat_map(|dir| std::fs::read_dir(fixture(dir)).unwrap()).count();
    assert_eq!(classified.len(), good_inputs, "{stderr}");
    for line in &classified {
        let confidence = line["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&confidence));
        assert_eq!(line["calibration"], "cac");
        assert_eq!(line["device"], "cpu");
        assert_eq!(line["decision"], if confidence >= 0.5 { "accept" } else { "abstain" });
        assert_eq!(line["top_k"].as_array().unwrap().len(), 2);
        assert_eq!(line["top_k"][0]["label"], line["label"]);
        assert!(line["uncalibrated_confidence"].as_f64().is_some() && line["contrast"].as_f64().is_some());
    }

    // Every bad file is reported by name, with a reason, and the missing path too.
    let bad_files = std::fs::read_dir(fixture("images/bad")).unwrap().count();
    assert_eq!(failed.len(), bad_files + 1);
    for line in &failed {
        let path = line["path"].as_str().unwrap();
        assert!(stderr.contains(path) || path.starts_with("/nonexistent"), "stderr names {path}");
        assert!(!line["error"].as_str().unwrap().is_empty());
    }
    assert!(stderr.contains(&format!("{} failed", bad_files + 1)), "{stderr}");
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photo = fixture("images/photos/chelsea.png");
    for args in [vec!["--ort-lib", "/nonexistent/libonnxruntime.so"], vec![]] {
        let mut command = command();
        command.args(["classify", "--bundle", bundle_dir().to_str().unwrap(), "--cache", &cache, photo.to_str().unwrap()]);
        command.args(&args).env("ORT_DYLIB_PATH", "/also/nonexistent/libonnxruntime.so");
        let output = command.output().unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("nonexistent/libonnxruntime.so") && stderr.contains("scripts/setup-onnxruntime"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn gpu_providers_fail_clearly_when_asked_for_and_auto_falls_back_to_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photo = fixture("images/photos/chelsea.png");
    let run = |device: &str| classify_command(&cache).args(["--device", device]).arg(&photo).output().unwrap();
    for (device, provider) in [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")] {
        let output = run(device);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(provider) && stderr.contains("--device cpu"), "{stderr}");
    }
    let output = run("auto");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("running on CPU"));
    assert_eq!(json_lines(&output)[0]["device"], "cpu");
}

#[test]
fn image_size_limit_is_configurable_and_refuses_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photo = fixture("images/photos/astronaut.png"); // 512 x 512
    let output = classify_command(&cache).args(["--device", "cpu", "--max-image-side", "256"]).arg(&photo).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let line = &json_lines(&output)[0];
    assert!(line["error"].as_str().unwrap().contains("512"), "{line}");
}

#[test]
fn a_bundle_with_a_missing_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = edited_bundle(dir.path(), |text| text + "\n");
    std::fs::remove_file(bundle.join("text_ft.onnx")).unwrap();
    let output = cac_edge(&[
        "cache",
        "build",
        "--bundle",
        bundle.to_str().unwrap(),
        "--classes",
        fixture("classes.txt").to_str().unwrap(),
        "--base",
        fixture("base.txt").to_str().unwrap(),
        "--output",
        dir.path().join("c.safetensors").to_str().unwrap(),
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("text_ft.onnx") && stderr.contains("missing"), "{stderr}");
    assert!(!dir.path().join("c.safetensors").exists());
}

#[test]
fn class_list_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let classes = dir.path().join("classes.txt");
    std::fs::write(&classes, "cat\ndog\ncat\n").unwrap();
    let output = cac_edge(&[
        "cache",
        "build",
        "--bundle",
        bundle_dir().to_str().unwrap(),
        "--classes",
        classes.to_str().unwrap(),
        "--base",
        fixture("base.txt").to_str().unwrap(),
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("classes.txt:3") && stderr.contains("listed twice"), "{stderr}");
}

#[test]
fn doctor_reports_library_providers_bundle_cache_and_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let bundle = bundle_dir();
    let output = cac_edge(&["doctor", "--bundle", bundle.to_str().unwrap(), "--cache", &cache, "--threshold", "0.7", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let checks: Vec<Value> = serde_json::from_slice(&output.stdout).expect("doctor --json");
    let check = |name: &str| checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name} check"));
    assert!(check("onnxruntime")["detail"].as_str().unwrap().contains("version 1."), "{checks:?}");
    assert!(check("execution provider")["detail"].as_str().unwrap().contains("CPUExecutionProvider"));
    assert_eq!(check("execution provider")["status"], "warn", "auto fell back to CPU here");
    assert!(check("machine")["detail"].as_str().unwrap().contains(std::env::consts::ARCH));
    assert_eq!(check("bundle files")["status"], "ok");
    assert_eq!(check("image encoder (zero-shot)")["status"], "ok");
    assert!(check("cache")["detail"].as_str().unwrap().contains("12 classes (6 base, 6 new)"), "{checks:?}");
    let calibration = check("calibration")["detail"].as_str().unwrap();
    assert!(calibration.starts_with("cac") && calibration.contains("0.7"), "{calibration}");

    // Something required missing: non-zero exit, and the fix is named.
    let stale = dir.path().join("stale.safetensors");
    std::fs::write(&stale, b"not a cache").unwrap();
    let output =
        cac_edge(&["doctor", "--bundle", bundle.to_str().unwrap(), "--cache", stale.to_str().unwrap(), "--device", "cuda"]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("[FAIL] execution provider") && stdout.contains("[FAIL] cache"), "{stdout}");
    assert!(stdout.contains("fix: rebuild it: cac-edge cache build"), "{stdout}");
}

#[test]
fn gpu_options_that_the_device_would_ignore_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photo = fixture("images/photos/chelsea.png");
    for extra in [["--tensorrt-fp16", ""], ["--tensorrt-workspace", "1073741824"], ["--gpu", "1"]] {
        let mut command = classify_command(&cache);
        command.args(["--device", "cpu"]).args(extra.iter().filter(|arg| !arg.is_empty())).arg(&photo);
        let output = command.output().unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains("--device"), "{stderr}");
        assert!(output.stdout.is_empty());
    }
}

/// `bench` end to end on the test bundle: one measured round at batch 2 over three photos; every
/// variant is timed (encoder, each calibration, the streaming pass, each stage) and the ratios are
/// numbers. Speeds themselves are not asserted (noisy machines): BENCHMARKS.md has the measurements.
#[test]
fn bench_times_every_variant_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let photos = ["chelsea.png", "rocket.jpg", "coffee.png"].map(|name| fixture("images/photos").join(name));
    let output = command()
        .args(["bench", "--device", "cpu", "--bundle", bundle_dir().to_str().unwrap(), "--cache", &cache])
        .args(["--batch-sizes", "2", "--rounds", "1", "--warmup-rounds", "0", "--json"])
        .args(&photos)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("bench --json");
    assert_eq!(report["images"]["used"], 3);
    let result = &report["results"][0];
    assert_eq!(result["batch_size"], 2);
    assert_eq!(result["batches_per_round"], 2, "3 images cycled to 4: two batches of 2");
    let timings = [
        &result["encoder"], &result["pipeline"]["none"], &result["pipeline"]["cac"], &result["stream"]["cac"],
        &result["breakdown"]["preprocess"], &result["breakdown"]["calibrate"]["cac"],
    ];
    for timing in timings {
        assert!(timing["samples"].as_u64().unwrap() >= 1, "{timing}");
        assert!(timing["median_s"].as_f64().unwrap() > 0.0, "{timing}");
    }
    assert!(result["ratios"]["pipeline_over_encoder"].as_f64().unwrap().is_finite());
}
