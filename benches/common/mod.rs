//! Shared by the benches and `examples/cache_rss.rs` (which includes this file by path):
//! deterministic random features (a tiny xorshift, no `rand` dependency) and a synthetic
//! text-feature cache written with the crate's own [`write_cache`].
#![allow(dead_code, reason = "each bench uses its own subset of these helpers")]

use std::path::Path;

use cac_edge::cache::{write_cache, CacheContents, CacheError, ClassList, FeaturePrecision};
use ndarray::Array2;

/// ViT-B/32's embedding width.
pub const EMBED_DIM: usize = 512;
/// CLIP's exp(logit_scale), the same for both models here.
pub const LOGIT_SCALE: f32 = 100.0;
/// Seeds: class text features, image features.
pub const TEXT_SEED: u64 = 0x5EED_0001;
pub const IMAGE_SEED: u64 = 0x5EED_0002;

/// `cargo bench` passes `--bench`; without it (`cargo test --all-targets`, `cargo test --benches`)
/// criterion runs every benchmark once as a smoke test, and the benches skip their largest
/// sizes so the test suite stays quick.
pub fn full_run() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// xorshift64 (Marsaglia): deterministic and good enough for benchmark inputs.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [-1, 1), 24 random bits.
    pub fn next_signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `rows` × `dim` random rows, each L2-normalised (like CLIP embeddings).
pub fn normalised_rows(rows: usize, dim: usize, seed: u64) -> Array2<f32> {
    let mut random = XorShift::new(seed);
    let mut matrix = Array2::from_shape_simple_fn((rows, dim), || random.next_signed());
    for mut row in matrix.rows_mut() {
        let norm = row.dot(&row).sqrt().max(f32::MIN_POSITIVE);
        row.mapv_inplace(|value| value / norm);
    }
    matrix
}

/// "class 000001", "class 000002", …; every other class is a base class.
pub fn synthetic_class_list(classes: usize) -> ClassList {
    ClassList {
        names: (1..=classes).map(|class| format!("class {class:06}")).collect(),
        is_base: (0..classes).map(|class| class % 2 == 0).collect(),
    }
}

/// Writes a cache of `classes` classes at width `dim`: random normalised zero-shot and fine-tuned
/// rows, DAC factors 1 (computing real ones is O(C²)), logit scales 100. Size ≈ 8·C·D bytes
/// with f32 features, 4·C·D with f16.
pub fn write_synthetic_cache(
    path: &Path,
    classes: usize,
    dim: usize,
    feature_precision: FeaturePrecision,
) -> Result<(), CacheError> {
    let class_list = synthetic_class_list(classes);
    let stacked = normalised_rows(2 * classes, dim, TEXT_SEED);
    let factors = vec![1.0f32; classes];
    let contents = CacheContents {
        classes: &class_list,
        stacked_text: stacked.view(),
        feature_precision,
        dac_factors: &factors,
        logit_scale_zs: LOGIT_SCALE,
        logit_scale_ft: LOGIT_SCALE,
        source_hash: "synthetic benchmark cache".into(),
        bundle_name: "synthetic",
    };
    write_cache(path, &contents)
}
