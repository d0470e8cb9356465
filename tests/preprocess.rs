//! Decoding + preprocessing against open_clip's own eval transform, and refusal of bad inputs.
//!
//! References: `onnx/fixtures/make_preprocess_reference.py` (open_clip 3.3.0, Pillow 13) wrote
//! `tests/fixtures/reference/preprocess_224.safetensors`, one [3, 224, 224] 8-bit crop per image
//! under `tests/fixtures/images`. Run with `--nocapture` to see the per-image differences.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use cac_edge::preprocess::{decode_bytes, decode_file, preprocess, DecodeLimits, PreprocessConfig, PreprocessError};
use safetensors::{Dtype, SafeTensors};

/// Tolerances in 8-bit grey levels (|Δ| × std × 255). Measured on x86_64: mean ≤ 0.023, max 2
/// (the brief allowed 0.5 / 10). What remains is fixed-point rounding (fast_image_resize vs
/// Pillow's 22-bit coefficients) and rare ±1 IDCT differences between zune-jpeg and
/// libjpeg-turbo; the margin covers other SIMD paths (aarch64 NEON).
const MAX_MEAN_GREY: f64 = 0.1;
const MAX_ABS_GREY: f64 = 3.0;

const SIDE: usize = 224;

fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn bad(name: &str) -> PathBuf {
    images_dir().join("bad").join(name)
}

/// The reference stores open_clip's 8-bit crop (CHW); ToTensor and Normalize are applied here
/// as torchvision does, in f32: (k / 255 - mean) / std.
fn normalised_reference(levels: &[u8], cfg: &PreprocessConfig) -> Vec<f32> {
    let plane = SIDE * SIDE;
    levels.iter().enumerate().map(|(i, &k)| (f32::from(k) / 255.0 - cfg.mean[i / plane]) / cfg.std[i / plane]).collect()
}

/// (max, mean) |Δ| in grey levels over the three planes.
fn grey_level_diff(ours: &[f32], reference: &[f32], std: [f32; 3]) -> (f64, f64) {
    let plane = SIDE * SIDE;
    let (mut max, mut sum) = (0.0f64, 0.0f64);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let grey = f64::from((a - b).abs()) * f64::from(std[i / plane]) * 255.0;
        max = max.max(grey);
        sum += grey;
    }
    (max, sum / ours.len() as f64)
}

#[test]
fn matches_open_clip_eval_transform() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/preprocess_224.safetensors");
    let bytes = std::fs::read(&path).expect("reference file (run onnx/fixtures/make_preprocess_reference.py)");
    let (_, header) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let metadata = header.metadata().clone().unwrap_or_default();
    assert_eq!(metadata.get("format").map(String::as_str), Some("cac-edge-preprocess-reference"));
    let tensors = SafeTensors::deserialize(&bytes).expect("safetensors");
    let cfg = PreprocessConfig::openai_clip(SIDE as u32);
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_owned).collect();
    names.sort();
    assert_no_unreferenced_fixture(&names);

    println!("reference: open_clip {:?}, Pillow {:?}", metadata.get("open_clip_version"), metadata.get("pillow_version"));
    println!("{:32} {:>10} {:>10}", "image", "max grey", "mean grey");
    let mut failures = Vec::new();
    let (mut worst_max, mut worst_mean) = (0.0f64, 0.0f64);
    for name in &names {
        let view = tensors.tensor(name).expect("tensor");
        assert_eq!(view.dtype(), Dtype::U8, "{name}");
        assert_eq!(view.shape(), &[3, SIDE, SIDE], "{name}");
        let reference = normalised_reference(view.data(), &cfg);
        let rgb = decode_file(&images_dir().join(name), &DecodeLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = preprocess(&rgb, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (max, mean) = grey_level_diff(&ours, &reference, cfg.std);
        println!("{name:32} {max:10.3} {mean:10.4}");
        worst_max = worst_max.max(max);
        worst_mean = worst_mean.max(mean);
        if max > MAX_ABS_GREY || mean > MAX_MEAN_GREY {
            failures.push(format!("{name}: max {max:.3}, mean {mean:.4} grey levels"));
        }
    }
    println!("worst: max {worst_max:.3}, mean {worst_mean:.4} grey levels over {} images", names.len());
    assert!(failures.is_empty(), "beyond max {MAX_ABS_GREY} / mean {MAX_MEAN_GREY} grey levels:\n{}", failures.join("\n"));
}

/// Every photo and mode fixture must have a reference, so none is silently skipped.
fn assert_no_unreferenced_fixture(names: &[String]) {
    for dir in ["photos", "modes"] {
        for entry in std::fs::read_dir(images_dir().join(dir)).expect("fixture dir") {
            let file = entry.expect("entry").file_name().to_string_lossy().into_owned();
            let key = format!("{dir}/{file}");
            assert!(names.contains(&key), "{key} has no reference tensor: rerun make_preprocess_reference.py");
        }
    }
}

#[test]
fn decode_bytes_equals_decode_file() {
    let path = images_dir().join("photos/china.jpg");
    let bytes = std::fs::read(&path).expect("photo");
    let limits = DecodeLimits::default();
    let from_file = decode_file(&path, &limits).expect("decode_file");
    let from_bytes = decode_bytes(&bytes, &limits).expect("decode_bytes");
    assert_eq!(from_file.dimensions(), (640, 427));
    assert!(from_file == from_bytes);
}

#[test]
fn exif_orientation_is_not_applied() {
    // Pillow (and therefore open_clip) ignores EXIF orientation; so must we. The fixture has an
    // orientation tag of 1, so this pins the stored pixel layout: 1000 wide, 872 high.
    let rgb = decode_file(&images_dir().join("photos/hubble_deep_field.jpg"), &DecodeLimits::default()).expect("decode");
    assert_eq!(rgb.dimensions(), (1000, 872));
}

fn decode_error(name: &str) -> PreprocessError {
    match decode_file(&bad(name), &DecodeLimits::default()) {
        Ok(rgb) => panic!("{name} decoded to {:?} instead of failing", rgb.dimensions()),
        Err(error) => {
            println!("{name}: {error}");
            error
        }
    }
}

#[test]
fn empty_file_has_its_own_error() {
    assert!(matches!(decode_error("empty.jpg"), PreprocessError::EmptyFile));
    assert!(matches!(decode_bytes(&[], &DecodeLimits::default()), Err(PreprocessError::EmptyFile)));
}

#[test]
fn text_named_jpg_is_not_an_image() {
    let error = decode_error("not-an-image.jpg");
    assert!(matches!(error, PreprocessError::UnknownFormat), "{error:?}");
    assert!(error.to_string().contains("not an image"));
}

#[test]
fn truncated_files_are_decode_errors() {
    for name in ["truncated.jpg", "truncated.png"] {
        let error = decode_error(name);
        assert!(matches!(error, PreprocessError::Decode(_)), "{name}: {error:?}");
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let error = decode_file(&bad("does-not-exist.png"), &DecodeLimits::default());
    assert!(matches!(error, Err(PreprocessError::Io(_))), "{error:?}");
}

#[test]
fn huge_dimensions_are_refused() {
    match decode_error("huge-dimensions.png") {
        PreprocessError::TooLarge { width: 100_000, height: 100_000, max_width: 16384, max_height: 16384 } => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

// Largest single allocation requested by the current thread, to show that refusals happen
// before the pixel buffer is allocated (with overcommit a 30 GB allocation could "succeed").
struct TrackLargest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every method forwards its arguments unchanged to the system allocator, which upholds
// GlobalAlloc's contract; noting a size allocates nothing (a thread-local Cell).
unsafe impl GlobalAlloc for TrackLargest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as in alloc.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: ptr was allocated by System (every allocation goes through it) with layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in realloc.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackLargest = TrackLargest;

fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let result = f();
    (result, LARGEST.with(Cell::get))
}

#[test]
fn huge_dimensions_are_refused_before_allocation() {
    const SMALL: usize = 8 << 20; // the header-reading decoder needs far less than 8 MiB
    let path = bad("huge-dimensions.png");

    let (result, largest) = largest_allocation_during(|| decode_file(&path, &DecodeLimits::default()));
    assert!(matches!(result, Err(PreprocessError::TooLarge { .. })), "{result:?}");
    assert!(largest < SMALL, "largest allocation {largest} bytes");

    // Dimensions allowed, memory not: 100000 x 100000 x 3 = 30 GB > 1 GiB.
    let limits = DecodeLimits { max_width: 200_000, max_height: 200_000, ..DecodeLimits::default() };
    let (result, largest) = largest_allocation_during(|| decode_file(&path, &limits));
    match result {
        Err(PreprocessError::TooMuchMemory { needed_bytes: 30_000_000_000, max_bytes, .. }) => assert_eq!(max_bytes, 1 << 30),
        other => panic!("expected TooMuchMemory, got {other:?}"),
    }
    assert!(largest < SMALL, "largest allocation {largest} bytes");

    // A real photo just over a small side limit is refused from its header too.
    let small = DecodeLimits { max_width: 500, max_height: 500, ..DecodeLimits::default() };
    let (result, largest) = largest_allocation_during(|| decode_file(&images_dir().join("photos/hubble_deep_field.jpg"), &small));
    assert!(matches!(result, Err(PreprocessError::TooLarge { width: 1000, height: 872, .. })), "{result:?}");
    // zune-jpeg holds the whole (0.5 MB) file; no 1000 x 872 x 3 pixel buffer may follow.
    assert!(largest < 1000 * 872 * 3, "largest allocation {largest} bytes");
}

#[test]
fn error_messages_say_what_to_do() {
    for name in ["empty.jpg", "not-an-image.jpg", "truncated.jpg", "huge-dimensions.png"] {
        let message = decode_error(name).to_string();
        let advice = ["copy", "convert", "re-export", "downscale"];
        assert!(advice.iter().any(|word| message.contains(word)), "{name}: no advice in {message:?}");
    }
}
