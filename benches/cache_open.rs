//! Opening a 100 000-class text-feature cache (D = 512, about 410 MB) with
//! [`TextFeatureCache::open`].
//!
//! The cache is written once at start-up into a temporary directory with the crate's own
//! `write_cache` (random normalised features, class names "class 000001" …; see
//! `benches/common/mod.rs`), so it sits in the page cache while measured: the numbers are warm
//! opens.
//!
//! * `cache_open/C=100000/no_verify`: `verify_checksum: false` (`classify --no-verify`). The file
//!   is mapped, not read: the cost is the mmap, the safetensors header and splitting the class
//!   names (~1.3 MB) into strings; independent of D. Target from the issue: ≤ 5 ms.
//! * `cache_open/C=100000/verify_checksum`: the default, which hashes every tensor byte
//!   (sha256 over the whole file), so it is linear in the file size; 10 flat samples.
//!
//! * `cache_open/C=100000/f16/…`: the same for a cache with f16 text features (about 205 MB).
//!
//! Dropping the opened cache (munmap, freeing the names) is outside the measured time.
//! Peak memory while a cache this size is used: `cargo run --release --example cache_rss`.
//!
//! Run: `cargo bench --bench cache_open` (under a minute plus writing the cache). Quick look:
//! `cargo bench --bench cache_open -- --measurement-time 2 --warm-up-time 1`. Under `cargo test`
//! a 1 000-class cache is used and every benchmark runs once.

use std::hint::black_box;
use std::time::Instant;

use cac_edge::cache::{CacheOpenOptions, FeaturePrecision, TextFeatureCache};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};

mod common;

use common::EMBED_DIM;

fn bench_cache_open(c: &mut Criterion) {
    let classes = if common::full_run() { 100_000 } else { 1_000 };
    let dir = tempfile::tempdir().expect("temporary directory");
    // f32 keeps the benchmark ids it always had; f16 (`cache build --feature-precision f16`) is
    // the same file with half-size features.
    for (prefix, precision) in [("", FeaturePrecision::F32), ("f16/", FeaturePrecision::F16)] {
        let path = dir.path().join(format!("cache-{precision}.safetensors"));
        let started = Instant::now();
        common::write_synthetic_cache(&path, classes, EMBED_DIM, precision).expect("write the cache");
        let file_bytes = std::fs::metadata(&path).expect("cache written").len();
        eprintln!(
            "wrote a {classes}-class {precision} cache (D = {EMBED_DIM}): {:.1} MB in {:.1} s",
            file_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        let open = |verify_checksum: bool| {
            TextFeatureCache::open(black_box(&path), CacheOpenOptions { verify_checksum }).expect("open the cache")
        };

        let mut group = c.benchmark_group(format!("cache_open/C={classes}"));
        // One open per timed batch, so opened caches (each a mapping of the whole file) do not pile up
        // and their drop stays outside the measurement.
        group.bench_function(format!("{prefix}no_verify"), |b| b.iter_batched(|| (), |()| open(false), BatchSize::PerIteration));
        group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(file_bytes));
        group.bench_function(format!("{prefix}verify_checksum"), |b| {
            b.iter_batched(|| (), |()| open(true), BatchSize::PerIteration)
        });
        group.finish();
        std::fs::remove_file(&path).expect("remove the cache");
    }
}

criterion_group!(benches, bench_cache_open);
criterion_main!(benches);
