//! f16 text features (`cache build --feature-precision f16`): the cache round-trips through
//! open, old format versions are refused, and the logits and every calibrated probability stay
//! within a fixed bound of the f32 cache's — on the committed test bundle with the PyTorch
//! reference image embeddings, and on the demo bundle's evaluation images.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{
    build_cache, CacheError, CacheOpenOptions, ClassList, FeaturePrecision, TextFeatureCache, FEATURE_PRECISION_KEY,
};
use cac_edge::calibrate::{calibrate, CacParams, Calibration, ContrastDistance};
use cac_edge::logits::{batch_logits, BatchLogits, LogitScales};
use cac_edge::{Classifier, ClassifierOptions};
use common::{bundle_dir, class_list, cpu, runtime, Reference};
use half::f16;
use ndarray::{Array2, ArrayView2, Ix2};
use safetensors::SafeTensors;

/// What f16 features may move a calibrated probability by (the bound, met at ViT-B/32's
/// D = 512: `examples/f16_accuracy.rs`).
const PROBABILITY_BOUND: f64 = 1e-3;
/// The demo bundle's bound. Its D = 64 puts each cosine on 8× fewer, larger products, so the
/// f16 rounding moves it about √8 times more than at D = 512: measured 2.37e-3 (CAC with the
/// probability distance). This is why `auto` keeps f32 below 10 000 classes, where f16 gains
/// little speed.
const DEMO_PROBABILITY_BOUND: f64 = 3e-3;

fn build(bundle: &Path, classes: &ClassList, dir: &Path, precision: FeaturePrecision) -> TextFeatureCache {
    let path = dir.join(format!("{precision}.safetensors"));
    let opened = Bundle::open(bundle).expect("open the bundle");
    build_cache(&runtime(), &opened, classes, &cpu(), &path, precision).expect("build the cache");
    TextFeatureCache::open(&path, CacheOpenOptions::default()).expect("open the cache")
}

fn scales(cache: &TextFeatureCache) -> LogitScales {
    LogitScales { zero_shot: cache.logit_scale_zs(), fine_tuned: cache.logit_scale_ft() }
}

/// Every calibration `classify` offers, at settings that exercise each (a TS temperature, CAC
/// with both contrast distances).
fn calibrations() -> Vec<Calibration> {
    let mut cac_probs = CacParams::paper_defaults();
    cac_probs.distance = ContrastDistance::Probs;
    vec![
        Calibration::None,
        Calibration::Ts { temperature: 1.7 },
        Calibration::Dac,
        Calibration::Cac(CacParams::paper_defaults()),
        Calibration::Cac(cac_probs),
    ]
}

/// The largest change of any calibrated (and uncalibrated) probability of any image between
/// two sets of logits, over every calibration (each one's printed).
fn max_probability_change(a: &BatchLogits, b: &BatchLogits, factors: &[f32]) -> f64 {
    let mut overall = 0f64;
    for calibration in calibrations() {
        let mut worst = 0f64;
        for image in 0..a.fine_tuned.nrows() {
            let run = |logits: &BatchLogits| {
                let (ft, zs) = (logits.fine_tuned.row(image), logits.zero_shot.row(image));
                calibrate(&calibration, ft.as_slice().unwrap(), zs.as_slice().unwrap(), factors).unwrap()
            };
            let (x, y) = (run(a), run(b));
            let pairs = x.probabilities.iter().zip(&y.probabilities).chain(x.uncalibrated.iter().zip(&y.uncalibrated));
            worst = pairs.fold(worst, |worst, (p, q)| worst.max((p - q).abs()));
        }
        println!("  {calibration:?}: max |Δ probability| {worst:.2e}");
        overall = overall.max(worst);
    }
    overall
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    a.iter().zip(b).fold(0f64, |worst, (x, y)| worst.max(f64::from((x - y).abs())))
}

/// The independent reference of the f16 logits: plain f64 loops over the f32 features rounded
/// to f16 by the `half` crate, times the logit scale.
fn reference_logits(
    images: ArrayView2<'_, f32>,
    f32_features: ArrayView2<'_, f32>,
    rows: std::ops::Range<usize>,
    scale: f32,
) -> Array2<f32> {
    let dim = images.ncols();
    Array2::from_shape_fn((images.nrows(), rows.len()), |(image, row)| {
        let text = f32_features.row(rows.start + row);
        let dot: f64 = (0..dim).map(|k| f64::from(images[[image, k]]) * f64::from(f16::from_f32(text[k]).to_f32())).sum();
        (dot * f64::from(scale)) as f32
    })
}

#[test]
fn an_f16_cache_round_trips_and_its_logits_match_the_rounded_features() {
    let dir = tempfile::tempdir().unwrap();
    let single = build(&bundle_dir(), &class_list(), dir.path(), FeaturePrecision::F32);
    let half = build(&bundle_dir(), &class_list(), dir.path(), FeaturePrecision::F16);

    // Round trip: the stored values are the f32 features rounded to nearest, everything else equal.
    assert_eq!((single.feature_precision(), half.feature_precision()), (FeaturePrecision::F32, FeaturePrecision::F16));
    assert_eq!(half.metadata()["format_version"], "2");
    assert_eq!(single.metadata()["format_version"], "1");
    assert_eq!(half.metadata()[FEATURE_PRECISION_KEY], "f16");
    assert_eq!(single.metadata()[FEATURE_PRECISION_KEY], "f32");
    let f32_features = single.stacked_text_features().to_f32();
    let f16_features = half.stacked_text_features();
    assert_eq!(f16_features.precision(), FeaturePrecision::F16);
    assert_eq!(f16_features.to_f32(), f32_features.mapv(|x| f16::from_f32(x).to_f32()));
    assert_eq!((half.class_list(), half.dac_factors()), (single.class_list(), single.dac_factors()));
    assert_eq!(
        (half.logit_scale_zs(), half.logit_scale_ft(), half.source_hash()),
        (single.logit_scale_zs(), single.logit_scale_ft(), single.source_hash())
    );
    half.check_matches(&Bundle::open(&bundle_dir()).unwrap(), Some(&class_list())).expect("an f16 cache matches its bundle");

    // Logits against the plain-loop reference over the rounded features, fused and separate.
    let images = Reference::load().f32("image_embeds_zs").into_dimensionality::<Ix2>().unwrap();
    let classes = half.num_classes();
    let expected_zs = reference_logits(images.view(), f32_features.view(), 0..classes, half.logit_scale_zs());
    let expected_ft = reference_logits(images.view(), f32_features.view(), classes..2 * classes, half.logit_scale_ft());
    for image_ft in [None, Some(images.view())] {
        let ours = batch_logits(images.view(), image_ft, half.stacked_text_features(), scales(&half));
        let worst = max_abs_diff(&ours.zero_shot, &expected_zs).max(max_abs_diff(&ours.fine_tuned, &expected_ft));
        assert!(worst < 1e-4, "f16 logits vs the plain loop: {worst:e}");
    }

    // Against the f32 cache: the logits move by the rounding only, the probabilities within the bound.
    let f32_logits = batch_logits(images.view(), None, single.stacked_text_features(), scales(&single));
    let f16_logits = batch_logits(images.view(), None, half.stacked_text_features(), scales(&half));
    let logit_change = max_abs_diff(&f32_logits.fine_tuned, &f16_logits.fine_tuned)
        .max(max_abs_diff(&f32_logits.zero_shot, &f16_logits.zero_shot));
    let probability_change = max_probability_change(&f32_logits, &f16_logits, single.dac_factors());
    println!(
        "test bundle, 8 images × 12 classes: max |Δ logit| {logit_change:.2e}, max |Δ probability| {probability_change:.2e}"
    );
    assert!(logit_change < 0.05, "{logit_change}");
    assert!(probability_change <= PROBABILITY_BOUND, "{probability_change}");
}

/// The demo bundle (60 classes) on its 420 images (`onnx/demo/images`, every split): the
/// f16 cache changes no calibrated probability by more than the demo's bound, and no label.
#[test]
fn on_the_demo_evaluation_f16_moves_every_calibrated_probability_by_less_than_the_bound() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/demo");
    let classes = ClassList::from_files(&demo.join("classes.txt"), &demo.join("base.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let single = build(&demo, &classes, dir.path(), FeaturePrecision::F32);
    let half = build(&demo, &classes, dir.path(), FeaturePrecision::F16);
    let options = ClassifierOptions { session: cpu(), ..ClassifierOptions::default() };
    let mut classifier = Classifier::open(&runtime(), &demo, single.path(), options).unwrap();
    let images = image_files(&demo.join("images"));
    assert_eq!(images.len(), 420);
    let (failures, embeddings) = classifier.embed_files(&images, 0);
    assert!(failures.iter().all(Option::is_none));
    let embeddings = embeddings.unwrap();
    let logits = |cache: &TextFeatureCache| {
        batch_logits(
            embeddings.zero_shot.view(),
            embeddings.fine_tuned.as_ref().map(|e| e.view()),
            cache.stacked_text_features(),
            scales(cache),
        )
    };
    let (f32_logits, f16_logits) = (logits(&single), logits(&half));
    // The classifier's own logits are the f32 cache's.
    assert_eq!(classifier.logits_of_embeddings(&embeddings), f32_logits);
    let probability_change = max_probability_change(&f32_logits, &f16_logits, single.dac_factors());
    let labels_changed = (0..images.len())
        .filter(|&i| {
            let argmax = |l: &BatchLogits| cac_edge::calibrate::argmax(l.fine_tuned.row(i).as_slice().unwrap());
            argmax(&f32_logits) != argmax(&f16_logits)
        })
        .count();
    println!("demo eval, 420 images × 60 classes: max |Δ probability| {probability_change:.2e}, labels changed {labels_changed}");
    assert!(probability_change <= DEMO_PROBABILITY_BOUND, "{probability_change}");
    assert_eq!(labels_changed, 0);
}

fn image_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|ext| ext == "jpg") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Rewrites the cache at `path` with `edit` applied to its metadata (tensors unchanged, so the
/// data checksum still holds).
fn rewrite_metadata(path: &Path, edit: impl Fn(&mut HashMap<String, String>)) {
    let bytes = std::fs::read(path).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let (_, parsed) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = parsed.metadata().clone().unwrap();
    edit(&mut metadata);
    let out = path.with_extension("edited");
    safetensors::serialize_to_file(tensors.tensors(), Some(metadata), &out).unwrap();
    std::fs::rename(&out, path).unwrap();
}

#[test]
fn unknown_versions_and_inconsistent_precisions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let half = build(&bundle_dir(), &class_list(), dir.path(), FeaturePrecision::F16);
    let path = half.path().to_path_buf();
    drop(half);
    let open = || TextFeatureCache::open(&path, CacheOpenOptions::default());

    // A later version: the version error, which names the versions this build reads.
    rewrite_metadata(&path, |m| {
        m.insert("format_version".into(), "3".into());
    });
    let error = open().unwrap_err();
    assert!(matches!(&error, CacheError::Version { found, .. } if found == "3"), "{error:?}");
    assert!(
        error.to_string().ends_with("cache format version 3 is not supported by this cac-edge (it reads versions 1 and 2)"),
        "{error}"
    );
    assert!(error.is_fixed_by_rebuilding());

    // f16 features declared as version 1 (what a build without f16 support would accept by
    // version): refused by dtype, as such a build refuses them too.
    rewrite_metadata(&path, |m| {
        m.insert("format_version".into(), "1".into());
    });
    let error = open().unwrap_err().to_string();
    assert!(error.contains("f16 text features in a format version 1 cache"), "{error}");

    // The metadata key contradicting the tensor.
    rewrite_metadata(&path, |m| {
        m.insert("format_version".into(), "2".into());
        m.insert(FEATURE_PRECISION_KEY.into(), "f32".into());
    });
    let error = open().unwrap_err().to_string();
    assert!(error.contains("metadata 'feature_precision' is 'f32' but the text features are f16"), "{error}");

    // Restored, it opens again; an f32 cache without the key (written before it existed) opens too.
    rewrite_metadata(&path, |m| {
        m.insert(FEATURE_PRECISION_KEY.into(), "f16".into());
    });
    assert_eq!(open().unwrap().feature_precision(), FeaturePrecision::F16);
    let single = build(&bundle_dir(), &class_list(), dir.path(), FeaturePrecision::F32);
    let single_path = single.path().to_path_buf();
    drop(single);
    rewrite_metadata(&single_path, |m| {
        m.remove(FEATURE_PRECISION_KEY);
    });
    let reopened = TextFeatureCache::open(&single_path, CacheOpenOptions::default()).unwrap();
    assert_eq!(reopened.feature_precision(), FeaturePrecision::F32);
}

#[test]
fn precision_names_parse_and_auto_switches_at_ten_thousand_classes() {
    for precision in [FeaturePrecision::F32, FeaturePrecision::F16] {
        assert_eq!(precision.name().parse::<FeaturePrecision>().unwrap(), precision);
        assert_eq!(serde_json::to_string(&precision).unwrap(), format!("\"{}\"", precision.name()));
    }
    assert!("F16".parse::<FeaturePrecision>().is_err());
    assert_eq!(FeaturePrecision::auto(9_999), FeaturePrecision::F32);
    assert_eq!(FeaturePrecision::auto(10_000), FeaturePrecision::F16);
}

/// The command line: `--feature-precision f16` writes an f16 cache that `cache info` describes
/// and `classify` uses, with confidences within the bound of the f32 cache's.
#[test]
fn cache_build_writes_the_precision_asked_for_and_classify_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut confidences = Vec::new();
    for precision in ["f32", "f16"] {
        let cache = dir.path().join(format!("{precision}.safetensors"));
        let mut build =
            common::cache_build_command(&bundle_dir(), &common::fixture("classes.txt"), &common::fixture("base.txt"), &cache);
        let output = common::run_bounded(build.args(["--feature-precision", precision]));
        assert!(output.status.success(), "{}", common::text(&output.stderr));
        let info = common::cac_edge(&["cache", "info", "--cache", cache.to_str().unwrap()]);
        assert!(
            common::text(&info.stdout).contains(&format!("feature_precision: {precision}\n")),
            "{}",
            common::text(&info.stdout)
        );
        let image = common::fixture("images/photos/rocket.jpg");
        let record = common::classify_reference(&bundle_dir(), &cache, &image, "0.5");
        confidences.push(record["confidence"].as_f64().unwrap());
    }
    assert!((confidences[0] - confidences[1]).abs() <= PROBABILITY_BOUND, "{confidences:?}");
    let refused =
        common::cac_edge(&["cache", "build", "--feature-precision", "f8", "--bundle", "x", "--classes", "x", "--base", "x"]);
    assert!(!refused.status.success());
    assert!(common::text(&refused.stderr).contains("f8"), "{}", common::text(&refused.stderr));
}
