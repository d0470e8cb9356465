//! The shape of a camera service, on the library alone: open a bundle and its cache once, then
//! classify frames in a loop and act only on accepted predictions.
//!
//! Frames here come from image files (decoded the way a camera's JPEG snapshots would be); a real
//! service gets them from its camera and calls the same `classify_frame`.
//!
//! ```sh
//! scripts/setup-onnxruntime
//! cargo run --release -- cache build --bundle onnx/demo --classes onnx/demo/classes.txt --base onnx/demo/base.txt
//! cargo run --release --example classify_frames -- onnx/demo \
//!     calibration-cache/miniworld-demo.safetensors onnx/demo/images/base/red_heart/*.jpg
//! ```
//!
//! It builds without the `cli` and `tooling` features: `cargo run --release
//! --no-default-features --example classify_frames -- …`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use cac_edge::preprocess::decode_file;
use cac_edge::{Classifier, ClassifierOptions, Decision, Device, Runtime, SessionOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "error: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(bundle), Some(cache)) = (args.next(), args.next()) else {
        return Err("usage: classify_frames BUNDLE_DIR CACHE FRAME.jpg…".into());
    };
    let frames: Vec<PathBuf> = args.collect();

    // Once, at start-up: the ONNX Runtime library, the bundle, the cache, the encoder sessions.
    let runtime = Runtime::load(None).map_err(|error| error.to_string())?;
    let options = ClassifierOptions {
        session: SessionOptions { device: Device::Auto, ..SessionOptions::default() },
        ..ClassifierOptions::default()
    };
    let mut classifier = Classifier::open(&runtime, &bundle, &cache, options).map_err(|error| error.to_string())?;
    let threshold = classifier.threshold();
    let mut out = std::io::stdout().lock();
    let closed = |error: std::io::Error| error.to_string();
    writeln!(
        out,
        "{} classes, calibration {}, threshold {} ({}), device {}",
        classifier.class_names().len(),
        classifier.calibration().name(),
        threshold.value,
        threshold.source,
        classifier.device().provider
    )
    .map_err(closed)?;

    // Per frame: one encoder pass, the logits, the calibration, the decision.
    for path in &frames {
        let frame = match decode_file(path, classifier.decode_limits()) {
            Ok(frame) => frame,
            Err(error) => {
                writeln!(out, "{}: skipped: {error}", path.display()).map_err(closed)?;
                continue;
            }
        };
        let start = Instant::now();
        let prediction = classifier.classify_frame(&frame).map_err(|error| error.to_string())?;
        let elapsed = start.elapsed();
        let action = match prediction.decision {
            Decision::Accept => "act",
            Decision::Abstain => "wait",
        };
        writeln!(
            out,
            "{}: {} {:.3} (uncalibrated {:.3}, contrast {}) → {action}, {:.1} ms",
            path.display(),
            prediction.label,
            prediction.confidence,
            prediction.uncalibrated_confidence,
            prediction.contrast.map_or("-".to_string(), |contrast| format!("{contrast:.2}")),
            elapsed.as_secs_f64() * 1e3
        )
        .map_err(closed)?;
    }
    Ok(())
}
