//! Decoding and preprocessing of camera-sized JPEGs: 640×480 and 4032×3024 (12 MP, a phone
//! camera) to the CLIP input (S = 224, OpenAI mean/std), as `classify` does per image.
//!
//! The JPEGs are made at start-up, not committed: `tests/fixtures/images/photos/china.jpg`
//! (a real photo) cropped to 4:3, resized up (Catmull-Rom), given a mild deterministic grain
//! (±4 levels, so the upscale is not unnaturally smooth and the entropy-coded data is closer to a
//! camera file's size) and encoded at quality 90 into a temporary directory. Their sizes are
//! printed at start-up.
//!
//! * `decode/WxH`: [`decode_file`] (reads the file, from the page cache here, and decodes to RGB8);
//! * `preprocess/WxH`: [`preprocess_into`] on the decoded image (resize shorter side → 224
//!   bicubic antialiased, centre crop, normalise into a reused CHW buffer);
//! * `decode+preprocess/WxH`: both, the per-image cost before the encoder.
//! * `scaled-decode/WxH`, `scaled-decode+preprocess/WxH`: the same with
//!   [`DecodeMode::Scaled`] ([`decode_file_with`]: the JPEG decoded at the smallest DCT scale
//!   still ≥ 224 on the short side, 1/8 for 12 MP; 640 × 480 is too small to scale and takes
//!   the exact path), then [`preprocess_scaled_into`]. Compare with the exact rows of the same
//!   run: the ratio is the result.
//! * `batch-decode/4x12MP/threads=N`: four 12 MP files decoded (scaled) on 1 and on 2 threads,
//!   as `classify_files` splits a batch over its decoding threads (the gain needs free cores).
//!
//! Run: `cargo bench --bench preprocess` (about a minute). Quick look:
//! `cargo bench --bench preprocess -- --measurement-time 2 --warm-up-time 1`. Under `cargo test`
//! every benchmark runs once and the 12 MP image is skipped.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use cac_edge::preprocess::{
    decode_file, decode_file_with, preprocess_into, preprocess_scaled_into, DecodeLimits, DecodeMode, PreprocessConfig,
};
use criterion::{criterion_group, criterion_main, Criterion};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::{self, FilterType};
use image::RgbImage;

mod common;

const SOURCE_PHOTO: &str = "tests/fixtures/images/photos/china.jpg";
const SIZES: [(u32, u32); 2] = [(640, 480), (4032, 3024)];
const CLIP_SIZE: u32 = 224;
const JPEG_QUALITY: u8 = 90;
const GRAIN_LEVELS: u32 = 4;

/// The source photo, centre-cropped to 4:3, resized to `width` × `height` with grain, as JPEG.
fn write_test_jpeg(source: &RgbImage, (width, height): (u32, u32), path: &Path) {
    let (source_width, source_height) = source.dimensions();
    let crop_width = source_width.min(source_height * 4 / 3);
    let crop_height = source_height.min(source_width * 3 / 4);
    let (left, top) = ((source_width - crop_width) / 2, (source_height - crop_height) / 2);
    let cropped = imageops::crop_imm(source, left, top, crop_width, crop_height).to_image();
    let mut resized = imageops::resize(&cropped, width, height, FilterType::CatmullRom);
    let mut random = common::XorShift::new(u64::from(width) * u64::from(height));
    for value in resized.iter_mut() {
        let noise = (random.next_u64() % u64::from(2 * GRAIN_LEVELS + 1)) as i32 - GRAIN_LEVELS as i32;
        *value = (i32::from(*value) + noise).clamp(0, 255) as u8;
    }
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY).encode_image(&resized).expect("encode JPEG");
    std::fs::write(path, bytes).expect("write JPEG");
}

fn bench_preprocess(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let limits = DecodeLimits::default();
    let source = decode_file(&root.join(SOURCE_PHOTO), &limits).expect("decode the source photo");
    let dir = tempfile::tempdir().expect("temporary directory");
    let sizes: &[(u32, u32)] = if common::full_run() { &SIZES } else { &SIZES[..1] };
    let files: Vec<((u32, u32), PathBuf)> = sizes
        .iter()
        .map(|&size| {
            let path = dir.path().join(format!("{}x{}.jpg", size.0, size.1));
            write_test_jpeg(&source, size, &path);
            let bytes = std::fs::metadata(&path).expect("JPEG written").len();
            eprintln!("test JPEG {}x{} q{JPEG_QUALITY}: {:.2} MB", size.0, size.1, bytes as f64 / 1e6);
            (size, path)
        })
        .collect();
    let config = PreprocessConfig::openai_clip(CLIP_SIZE);
    let mut out = vec![0.0f32; config.tensor_len()];
    let mut group = c.benchmark_group("preprocess");
    for ((width, height), path) in &files {
        let label = format!("{width}x{height}");
        if *width > 1000 {
            group.sample_size(20);
        }
        let decoded = decode_file(path, &limits).expect("decode test JPEG");
        group.bench_function(format!("decode/{label}"), |b| b.iter(|| decode_file(black_box(path), &limits).expect("decode")));
        group.bench_function(format!("preprocess/{label}"), |b| {
            b.iter(|| preprocess_into(black_box(&decoded), &config, &mut out).expect("preprocess"))
        });
        group.bench_function(format!("decode+preprocess/{label}"), |b| {
            b.iter(|| {
                let rgb = decode_file(black_box(path), &limits).expect("decode");
                preprocess_into(&rgb, &config, &mut out).expect("preprocess")
            })
        });
        let scaled = |path: &Path| decode_file_with(path, &limits, DecodeMode::Scaled, CLIP_SIZE).expect("scaled decode");
        group.bench_function(format!("scaled-decode/{label}"), |b| b.iter(|| scaled(black_box(path))));
        group.bench_function(format!("scaled-decode+preprocess/{label}"), |b| {
            b.iter(|| {
                let decoded = scaled(black_box(path));
                preprocess_scaled_into(&decoded.rgb, decoded.geometry, &config, &mut out).expect("preprocess")
            })
        });
        if *width > 1000 {
            for threads in [1, 2] {
                group.bench_function(format!("batch-decode/4x{label}/threads={threads}"), |b| {
                    b.iter(|| decode_batch(&[path.as_path(); 4], threads, &scaled))
                });
            }
        }
    }
    group.finish();
}

/// Decodes `paths` split into `threads` contiguous runs, one scoped thread each (the split
/// `classify_files` makes of a batch).
fn decode_batch<T: Send>(paths: &[&Path], threads: usize, decode: &(impl Fn(&Path) -> T + Sync)) -> Vec<T> {
    let run = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            paths.chunks(run).map(|part| scope.spawn(move || part.iter().map(|p| decode(p)).collect::<Vec<T>>())).collect();
        handles.into_iter().flat_map(|handle| handle.join().expect("decoder thread")).collect()
    })
}

criterion_group!(benches, bench_preprocess);
criterion_main!(benches);
