//! AFL++ target: image bytes → `decode_bytes` → `preprocess`, as `classify` reads a file.
//! Any panic or abort is a crash; the decode limits are those of a box with 64 MiB to spare.

use cac_edge::preprocess::{decode_bytes, preprocess, DecodeLimits, PreprocessConfig};

fn main() {
    let limits = DecodeLimits { max_alloc_bytes: 64 << 20, ..DecodeLimits::default() };
    let config = PreprocessConfig::openai_clip(224);
    afl::fuzz!(|data: &[u8]| {
        if let Ok(frame) = decode_bytes(data, &limits) {
            let _ = preprocess(&frame, &config);
        }
    });
}
