//! Logits and calibration per image, at D = 512 (ViT-B/32) for C = 10, 1 000 and 100 000 classes.
//!
//! What is measured (random L2-normalised class and image features, fixed seed; both models
//! share the image embedding, the common CoOp-style case, so logits are ONE fused product
//! `F · [T_zs; T_ft]ᵀ` as in `classify`):
//!
//! * `logits/batch=N`: [`batch_logits`] alone for a batch of N images (1 and 32);
//! * `logits+none/batch=N`, `logits+cac/batch=N`: the same plus [`calibrate`] of every image with
//!   no calibration and with CAC at the paper's defaults (α = 1.10, k = 15, logit contrast).
//!   `logits+cac` ÷ `logits+none` is CAC's run-time overhead;
//! * `none_only/batch=N`, `cac_only/batch=N`: [`calibrate`] alone on precomputed logits;
//! * `matvec_reference/batch=1`: not the crate's code, a plain `[2C, D] · x` matrix-vector product:
//!   the memory-bound floor for one image, to compare `logits/batch=1` with.
//! * `f16/logits/batch=N`, `f16/logits+cac/batch=N`: the same with the class features stored as
//!   f16 (`cache build --feature-precision f16`): half the bytes read, widened block by block
//!   and accumulated in f32. Compare with `logits`, `logits+cac` of the same run.
//! * `widen/hand_loop`, `widen/half_slice`: widening one block of f16 rows (64 × D) to f32, the
//!   crate's portable loop ([`widen_f16_scaled`], scaled by 2^-112) against the `half` crate's slice conversion (F16C on
//!   x86-64 when the CPU has it; FP16 on aarch64; a scalar fallback elsewhere).
//!
//! Throughput is reported in images (elements), so criterion's "thrpt" is images per second and
//! time ÷ N is the cost per image. The target: at C = 100 000, logits + CAC per image take
//! at most 1/4 of the ViT-B/32 image encoder's time on the same machine.
//!
//! The class features are an in-memory array here; `classify` reads them from the mapped cache,
//! which costs the same once the pages are resident (see `cache_open` and `examples/cache_rss.rs`
//! for the mapping itself).
//!
//! Run: `cargo bench --bench logits_cac` (about 5 minutes; the C = 100 000 group takes 10 flat
//! samples). Quick look: `cargo bench --bench logits_cac -- --measurement-time 2 --warm-up-time 1`;
//! one size: `cargo bench --bench logits_cac -- C=1000/`. Under `cargo test` every benchmark runs
//! once and C = 100 000 is skipped.

use std::hint::black_box;

use cac_edge::calibrate::{calibrate, CacParams, Calibration};
use cac_edge::logits::{batch_logits, widen_f16_scaled, BatchLogits, LogitScales};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use half::{f16, slice::HalfFloatSliceExt};

mod common;

use common::{normalised_rows, EMBED_DIM, IMAGE_SEED, LOGIT_SCALE, TEXT_SEED};

const SCALES: LogitScales = LogitScales { zero_shot: LOGIT_SCALE, fine_tuned: LOGIT_SCALE };
const BATCHES: [usize; 2] = [1, 32];

/// Calibrates every image of the batch; returns the sum of the top confidences (kept alive so
/// nothing is optimised away).
fn calibrate_batch(method: &Calibration, logits: &BatchLogits, factors: &[f32]) -> f64 {
    let rows = logits.fine_tuned.rows().into_iter().zip(logits.zero_shot.rows());
    rows.map(|(fine_tuned, zero_shot)| {
        let (fine_tuned, zero_shot) = (fine_tuned.as_slice().expect("rows"), zero_shot.as_slice().expect("rows"));
        let calibrated = calibrate(method, fine_tuned, zero_shot, factors).expect("finite logits");
        calibrated.probabilities[calibrated.predicted]
    })
    .sum()
}

fn bench_logits_cac(c: &mut Criterion) {
    let class_counts: &[usize] = if common::full_run() { &[10, 1_000, 100_000] } else { &[10, 1_000] };
    let methods = [("none", Calibration::None), ("cac", Calibration::Cac(CacParams::paper_defaults()))];
    for &classes in class_counts {
        let text = normalised_rows(2 * classes, EMBED_DIM, TEXT_SEED);
        let text_f16 = text.mapv(f16::from_f32);
        let factors = vec![1.0f32; classes];
        let mut group = c.benchmark_group(format!("logits_cac/C={classes}"));
        if classes >= 100_000 {
            // Tens to hundreds of ms per iteration: 10 samples of a fixed iteration count.
            group.sample_size(10).sampling_mode(SamplingMode::Flat);
        }
        for batch in BATCHES {
            let images = normalised_rows(batch, EMBED_DIM, IMAGE_SEED);
            let id = |name: &str| BenchmarkId::new(name, format!("batch={batch}"));
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(id("logits"), |b| {
                b.iter(|| batch_logits(black_box(images.view()), None, black_box(text.view()), SCALES))
            });
            for (name, method) in &methods {
                group.bench_function(id(&format!("logits+{name}")), |b| {
                    b.iter(|| {
                        let logits = batch_logits(black_box(images.view()), None, black_box(text.view()), SCALES);
                        calibrate_batch(method, &logits, &factors)
                    })
                });
            }
            group.bench_function(id("f16/logits"), |b| {
                b.iter(|| batch_logits(black_box(images.view()), None, black_box(text_f16.view()), SCALES))
            });
            let cac = &methods[1].1;
            group.bench_function(id("f16/logits+cac"), |b| {
                b.iter(|| {
                    let logits = batch_logits(black_box(images.view()), None, black_box(text_f16.view()), SCALES);
                    calibrate_batch(cac, &logits, &factors)
                })
            });
            if batch == 1 {
                // The floor for one image: a plain matrix-vector product over the same [2C, D] rows
                // (ndarray's row-wise dot products; no logit scaling, no copies).
                group.bench_function(id("matvec_reference"), |b| b.iter(|| black_box(text.view()).dot(&images.row(0))));
            }
            let logits = batch_logits(images.view(), None, text.view(), SCALES);
            for (name, method) in &methods {
                group.bench_function(id(&format!("{name}_only")), |b| {
                    b.iter(|| calibrate_batch(method, black_box(&logits), &factors))
                });
            }
        }
        group.finish();
    }
}

/// Widening one block of the f16 path: 64 rows of D = 512.
fn bench_widen(c: &mut Criterion) {
    let block = normalised_rows(64, EMBED_DIM, TEXT_SEED).mapv(f16::from_f32);
    let block = block.as_slice().expect("standard layout");
    let mut out = vec![0f32; block.len()];
    let mut group = c.benchmark_group("widen");
    group.throughput(Throughput::Elements(block.len() as u64));
    group.bench_function("hand_loop", |b| b.iter(|| widen_f16_scaled(black_box(block), &mut out)));
    group.bench_function("half_slice", |b| b.iter(|| black_box(block).convert_to_f32_slice(&mut out)));
    group.finish();
}

criterion_group!(benches, bench_logits_cac, bench_widen);
criterion_main!(benches);
