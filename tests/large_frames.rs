//! The reduced-scale JPEG decode (`DecodeMode::Scaled`) against the exact path, on real photos:
//! PSNR of the 224 px input, embedding cosine and label agreement through the committed test
//! bundle (S = 224) and the demo bundle (S = 32, a trained model).
//!
//! The photos are `tests/fixtures/images/photos`: its JPEGs as they are (at S = 224 the
//! 640 × 427 ones are too small to scale and must come out identical; hubble's 1000 × 872 is
//! decoded at 1/2) plus every photo made into a camera-sized JPEG here: resized to 4032 px wide (Catmull-Rom), a mild grain of
//! ±4 levels (a sensor's noise; a bare upscale is unnaturally smooth and would flatter the
//! scaled path), quality 90. Run with `--nocapture` for the per-image numbers
//! (BENCHMARKS.md, "Large frames", has them).

mod common;

use std::path::{Path, PathBuf};

use cac_edge::cache::{build_cache, ClassList, FeaturePrecision};
use std::sync::OnceLock;

use cac_edge::preprocess::{
    decode_file_with, jpeg_scale_denominator, preprocess, preprocess_scaled_into, DecodeLimits, DecodeMode, PreprocessConfig,
};
use cac_edge::{Classifier, ClassifierOptions};
use common::{bundle_dir, cosine, cpu, runtime};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::{self, FilterType};

/// Bounds, from the lowest values measured on x86_64 (BENCHMARKS.md, "Large frames") with a
/// margin for other SIMD paths (aarch64): PSNR 42.2 dB measured (china at 4032 px; an RMS
/// error of 2 grey levels), bound 38 dB (3.2 levels); resizing the reduced pixels as an
/// image of their own instead of along the full image's geometry gives 30.2 dB there, so the
/// bound catches that mistake. Cosine: 0.99991 (test bundle, S = 224) and 0.99659 (demo,
/// S = 32, where a 640 px photo is already decoded at 1/8).
const MIN_PSNR_DB: f64 = 38.0;
const MIN_COSINE_TEST_BUNDLE: f64 = 0.999;
const MIN_COSINE_DEMO: f64 = 0.99;
/// Labels may flip only where the model is undecided between two classes: none of 12 flipped
/// with the test bundle, 1 of 12 with the demo (rocket.jpg, pink ring / orange ring: a photo
/// far outside its drawn-shapes world).
const MAX_FLIPS_TEST_BUNDLE: usize = 0;
const MAX_FLIPS_DEMO: usize = 2;

const CAMERA_WIDTH: u32 = 4032;
const GRAIN_LEVELS: i32 = 4;

fn photos_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/photos")
}

/// The photo set, made once for all the tests of this binary.
fn photo_set() -> &'static [PathBuf] {
    static SET: OnceLock<(tempfile::TempDir, Vec<PathBuf>)> = OnceLock::new();
    let (_, paths) = SET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let paths = make_photo_set(dir.path());
        (dir, paths)
    });
    paths
}

/// The fixture JPEGs, and a camera-sized JPEG of every fixture photo in `dir`.
fn make_photo_set(dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(photos_dir()).unwrap().map(|entry| entry.unwrap().path()).collect();
    sources.sort();
    let mut set: Vec<PathBuf> = sources.iter().filter(|path| path.extension().is_some_and(|e| e == "jpg")).cloned().collect();
    for (index, source) in sources.iter().enumerate() {
        let path = dir.join(format!("{}-{CAMERA_WIDTH}.jpg", source.file_stem().unwrap().to_string_lossy()));
        write_camera_jpeg(source, index as u64, &path);
        set.push(path);
    }
    set
}

fn write_camera_jpeg(source: &Path, seed: u64, path: &Path) {
    let image = image::open(source).unwrap().to_rgb8();
    let height = (u64::from(image.height()) * u64::from(CAMERA_WIDTH) / u64::from(image.width())) as u32;
    let mut large = imageops::resize(&image, CAMERA_WIDTH, height, FilterType::CatmullRom);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for values in large.chunks_mut(8) {
        // xorshift64, one step per 8 values (a byte each): deterministic grain, independent of
        // any crate's RNG, and cheap in a debug build.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for (value, byte) in values.iter_mut().zip(state.to_le_bytes()) {
            let noise = i32::from(byte % (2 * GRAIN_LEVELS as u8 + 1)) - GRAIN_LEVELS;
            *value = (i32::from(*value) + noise).clamp(0, 255) as u8;
        }
    }
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&large).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// PSNR, in dB, of two normalised CHW tensors, compared in 8-bit grey levels.
fn psnr(a: &[f32], b: &[f32], cfg: &PreprocessConfig) -> f64 {
    let plane = a.len() / 3;
    let squared: f64 =
        a.iter().zip(b).enumerate().map(|(i, (&x, &y))| (f64::from(x - y) * f64::from(cfg.std[i / plane]) * 255.0).powi(2)).sum();
    let mse = squared / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
}

#[test]
fn scaled_decode_stays_close_to_the_exact_input() {
    let limits = DecodeLimits::default();
    let cfg = PreprocessConfig::openai_clip(224);
    let mut scaled_count = 0;
    for path in photo_set() {
        let exact = decode_file_with(path, &limits, DecodeMode::Exact, 224).unwrap().rgb;
        let scaled = decode_file_with(path, &limits, DecodeMode::Scaled, 224).unwrap();
        let k = jpeg_scale_denominator(exact.width(), exact.height(), 224);
        // The scaled image is the 1/k size, rounded up, as chosen, and knows the full size.
        assert_eq!(scaled.geometry.full_size, exact.dimensions());
        assert_eq!(scaled.geometry.denominator, k);
        let reduced = (exact.width().div_ceil(k), exact.height().div_ceil(k));
        assert_eq!(scaled.rgb.dimensions(), reduced, "{}", path.display());
        let mut input = vec![0.0; cfg.tensor_len()];
        preprocess_scaled_into(&scaled.rgb, scaled.geometry, &cfg, &mut input).unwrap();
        let db = psnr(&preprocess(&exact, &cfg).unwrap(), &input, &cfg);
        // Resizing the reduced pixels as an image of their own, for comparison (not asserted).
        let naive = psnr(&preprocess(&exact, &cfg).unwrap(), &preprocess(&scaled.rgb, &cfg).unwrap(), &cfg);
        let name = path.file_name().unwrap().to_string_lossy();
        println!(
            "{name}: {}x{} at 1/{k}: PSNR {db:.2} dB (resized as its own image: {naive:.2} dB)",
            exact.width(),
            exact.height()
        );
        if k == 1 {
            assert_eq!(exact, scaled.rgb, "unscaled JPEGs take the exact path");
        } else {
            scaled_count += 1;
            assert!(db >= MIN_PSNR_DB, "{}: PSNR {db:.2} dB < {MIN_PSNR_DB}", path.display());
        }
    }
    assert!(scaled_count >= 8, "every camera-sized photo is decoded at a reduced scale");
}

#[test]
fn non_jpeg_files_take_the_exact_path() {
    let limits = DecodeLimits::default();
    let png = photos_dir().join("astronaut.png");
    let exact = decode_file_with(&png, &limits, DecodeMode::Exact, 32).unwrap();
    assert_eq!(exact.geometry.denominator, 1);
    assert_eq!(decode_file_with(&png, &limits, DecodeMode::Scaled, 32).unwrap(), exact);
}

/// Embeddings and labels of `paths` by a classifier of `bundle` / `cache` decoding in `mode`.
fn embed_and_label(bundle: &Path, cache: &Path, paths: &[PathBuf], mode: DecodeMode) -> (Vec<Vec<f32>>, Vec<String>) {
    let options = ClassifierOptions { session: cpu(), decode: mode, batch_size: 4, ..ClassifierOptions::default() };
    let mut classifier = Classifier::open(&runtime(), bundle, cache, options).unwrap();
    let (failures, embeddings) = classifier.embed_files(paths, 0);
    assert!(failures.iter().all(Option::is_none), "{failures:?}");
    let rows = embeddings.unwrap().zero_shot.outer_iter().map(|row| row.to_vec()).collect();
    let mut labels = Vec::new();
    classifier.classify_files(paths, |_, outcome| {
        labels.push(outcome.unwrap().label);
        std::ops::ControlFlow::Continue(())
    });
    (rows, labels)
}

fn compare_models(name: &str, bundle: &Path, cache: &Path, paths: &[PathBuf], min_cosine: f64, max_flips: usize) {
    let (exact_rows, exact_labels) = embed_and_label(bundle, cache, paths, DecodeMode::Exact);
    let (scaled_rows, scaled_labels) = embed_and_label(bundle, cache, paths, DecodeMode::Scaled);
    let cosines: Vec<f64> = exact_rows.iter().zip(&scaled_rows).map(|(a, b)| cosine(a, b)).collect();
    let same = exact_labels.iter().zip(&scaled_labels).filter(|(a, b)| a == b).count();
    let lowest = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    println!("{name}: cosine mean {mean:.5}, min {lowest:.5}; labels {same}/{} agree", paths.len());
    for ((path, cosine), (a, b)) in paths.iter().zip(&cosines).zip(exact_labels.iter().zip(&scaled_labels)) {
        println!("  {}: cosine {cosine:.5}, {a} / {b}", path.file_name().unwrap().to_string_lossy());
    }
    assert!(lowest >= min_cosine, "{name}: lowest cosine {lowest:.5} < {min_cosine}");
    assert!(paths.len() - same <= max_flips, "{name}: {} of {} labels differ", paths.len() - same, paths.len());
}

#[test]
fn scaled_decode_keeps_embeddings_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let paths = photo_set();
    // The committed test bundle: S = 224, random weights, the fixture classes.
    let cache = common::build_test_cache(&bundle_dir(), dir.path());
    compare_models("test bundle (S = 224)", &bundle_dir(), &cache, paths, MIN_COSINE_TEST_BUNDLE, MAX_FLIPS_TEST_BUNDLE);
    // The demo bundle: S = 32, trained on the mini-world; at S = 32 even the fixture JPEGs scale.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/demo");
    let classes = ClassList::from_files(&demo.join("classes.txt"), &demo.join("base.txt")).unwrap();
    let demo_cache = dir.path().join("demo.safetensors");
    let bundle = cac_edge::bundle::Bundle::open(&demo).unwrap();
    build_cache(&runtime(), &bundle, &classes, &cpu(), &demo_cache, FeaturePrecision::F32).unwrap();
    compare_models("demo bundle (S = 32)", &demo, &demo_cache, paths, MIN_COSINE_DEMO, MAX_FLIPS_DEMO);
}
