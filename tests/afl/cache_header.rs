//! AFL++ target: bytes → a cache file → `TextFeatureCache::open` with checksum verification and
//! every accessor, as `classify` opens a cache. Any panic or abort is a crash.

use std::path::PathBuf;

use cac_edge::cache::{CacheOpenOptions, TextFeatureCache};

fn main() {
    // The cache is memory-mapped from a file: one per process, in memory-backed /dev/shm when
    // there is one.
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let path = dir.join(format!("cac-edge-afl-{}.safetensors", std::process::id()));
    afl::fuzz!(|data: &[u8]| {
        if std::fs::write(&path, data).is_err() {
            return;
        }
        if let Ok(cache) = TextFeatureCache::open(&path, CacheOpenOptions { verify_checksum: true }) {
            let features = cache.stacked_text_features();
            let _ = (features.to_f32().sum(), cache.dac_factors().len(), cache.class_list_summary(), cache.metadata().len());
            for class in 0..cache.num_classes() {
                let _ = cache.is_base(class);
            }
        }
    });
    let _ = std::fs::remove_file(&path);
}
