//! Decoding never allocates beyond the budget `DecodeLimits` documents (src/preprocess.rs):
//! `max_alloc_bytes` bounds the decoder's own buffers (the decoded image in its native pixel
//! type plus its working memory) and converting a non-RGB8 image afterwards needs another
//! width × height × 3 bytes. A counting global allocator records the peak of live heap bytes
//! while `decode_bytes` runs, for crafted headers that claim huge images, for legitimately
//! large images, and for mutated files.
//!
//! Its own binary: the allocator counts every thread, so the tests here take a lock and run
//! one at a time.

mod fuzzing;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;
use std::sync::{Mutex, MutexGuard};

use cac_edge::preprocess::{decode_bytes, preprocess, DecodeLimits, PreprocessConfig, PreprocessError};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use proptest::prelude::*;

/// Slack over the documented budget: the harness's and the decoder's small bookkeeping
/// (headers, Huffman and quantisation tables, row buffers), far below any pixel buffer here.
const MARGIN: usize = 512 << 10;

struct Counting;

// Per thread: the test harness and other tests' threads allocate at the same time (output
// capture, proptest set-up), which a process-wide count would add to the peak of the decode
// under test. Const-initialised Cells allocate nothing, so the allocator may use them.
thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn grew(size: usize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + size as i64);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

fn shrank(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - size as i64));
}

// SAFETY: every method forwards its arguments unchanged to the system allocator, which upholds
// GlobalAlloc's contract; the counters are thread-local Cells and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in alloc.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }
    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: pointer came from System (every allocation goes through it) with layout.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            // Counted as the old and new blocks both live: realloc may copy.
            grew(new_size);
            shrank(layout.size());
        }
        moved
    }
    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: as in realloc.
        unsafe { System.dealloc(pointer, layout) };
        shrank(layout.size());
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` and returns its result with the peak of live bytes above the level at the start.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    (result, usize::try_from(PEAK.with(Cell::get) - start).unwrap_or(0))
}

/// The documented budget for one decode: `max_alloc_bytes`, plus the RGB copy when the
/// decoded image was not already 8-bit RGB (`rgb_conversion`), plus [`MARGIN`].
fn budget(limits: &DecodeLimits, rgb_conversion: usize) -> usize {
    limits.max_alloc_bytes as usize + rgb_conversion + MARGIN
}

fn assert_within_budget(what: &str, bytes: &[u8], limits: &DecodeLimits, converts: bool) -> Result<RgbImage, PreprocessError> {
    let (result, peak) = peak_during(|| decode_bytes(bytes, limits));
    let conversion = match (&result, converts) {
        (Ok(rgb), true) => rgb.as_raw().len(),
        _ => 0,
    };
    let allowed = budget(limits, conversion);
    assert!(
        peak <= allowed,
        "{what}: peak {peak} bytes > budget {allowed} ({limits:?}), result {:?}",
        result.as_ref().map(RgbImage::dimensions)
    );
    result
}

// ------------------------------------------------------------------------------- crafting

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    chunk.extend_from_slice(&body);
    chunk.extend_from_slice(&crc32(&body).to_be_bytes());
    chunk
}

/// A PNG whose IHDR (valid CRC) declares `width` × `height`, followed by a tiny IDAT.
fn png_claiming(width: u32, height: u32, bit_depth: u8, colour_type: u8) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, colour_type, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    // zlib stream of a few zero bytes: far fewer rows than declared.
    png.extend(png_chunk(b"IDAT", &[0x78, 0x9C, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01]));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

/// A GIF with a `width` × `height` logical screen and one 1 × 1 frame.
fn gif_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&width.to_le_bytes());
    gif.extend_from_slice(&height.to_le_bytes());
    gif.extend_from_slice(&[0x80, 0, 0]); // global colour table of 2 entries
    gif.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    gif.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // 1 × 1 frame at (0, 0)
    gif.extend_from_slice(&[2, 2, 0x44, 0x01, 0]); // LZW: clear, index 0, end
    gif.push(0x3B);
    gif
}

fn test_pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| Rgb([(x * 7) as u8, (y * 3) as u8, ((x ^ y) * 5) as u8]))
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap_or_else(|error| panic!("encode {format:?}: {error}"));
    bytes.into_inner()
}

/// A real JPEG with its SOF0 dimensions rewritten.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = encode(&DynamicImage::ImageRgb8(test_pattern(64, 48)), ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|marker| marker == [0xFF, 0xC0]).expect("baseline JPEG has SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

// ---------------------------------------------------------------------------------- tests

#[test]
fn counting_allocator_sees_a_pixel_buffer() {
    // Guards every assertion below: a 10 MB buffer must show up in the peak.
    let _serial = serial();
    let (buffer, peak) = peak_during(|| vec![1u8; 10_000_000]);
    assert_eq!(buffer.len(), 10_000_000);
    assert!((10_000_000..10_000_000 + MARGIN).contains(&peak), "peak {peak}");
}

#[test]
fn headers_claiming_huge_images_are_refused_within_a_small_peak() {
    let _serial = serial();
    let limits = DecodeLimits::default();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PNG 60000 x 60000 RGB8", png_claiming(60_000, 60_000, 8, 2)),
        ("PNG u32::MAX x 1", png_claiming(u32::MAX >> 1, 1, 8, 2)),
        ("PNG 16000 x 16000 RGBA16 (4 GB, sides allowed)", png_claiming(16_000, 16_000, 16, 6)),
        ("JPEG 60000 x 60000", jpeg_claiming(60_000, 60_000)),
        ("GIF screen 60000 x 60000", gif_claiming(60_000, 60_000)),
    ];
    for (what, bytes) in &cases {
        let (result, peak) = peak_during(|| decode_bytes(bytes, &limits));
        assert!(
            matches!(
                result,
                Err(PreprocessError::TooLarge { .. } | PreprocessError::TooMuchMemory { .. } | PreprocessError::LimitExceeded(_))
            ),
            "{what}: {:?}",
            result.map(|rgb| rgb.dimensions())
        );
        // Refused from the header: nothing near a pixel buffer was allocated.
        assert!(peak < MARGIN, "{what}: peak {peak} bytes");
    }
    // Exactly the 1 GiB budget in RGBA: allowed by the header check, so the decoder may
    // allocate the canvas, but no more than the budget.
    let result = assert_within_budget("GIF screen 16384 x 16384 (RGBA 1 GiB)", &gif_claiming(16_384, 16_384), &limits, true);
    assert!(result.is_err(), "a 1 GiB canvas plus the frame cannot fit 1 GiB");
}

#[test]
fn images_claiming_more_than_the_memory_budget_are_refused_before_allocation() {
    let _serial = serial();
    // Sides allowed, memory not: 32 MiB budget.
    let limits = DecodeLimits { max_alloc_bytes: 32 << 20, ..DecodeLimits::default() };
    for (what, bytes) in [
        ("PNG 8000 x 8000", png_claiming(8_000, 8_000, 8, 2)),
        ("JPEG 8000 x 8000", jpeg_claiming(8_000, 8_000)),
        ("GIF 8000 x 8000", gif_claiming(8_000, 8_000)),
    ] {
        let (result, peak) = peak_during(|| decode_bytes(&bytes, &limits));
        assert!(matches!(result, Err(PreprocessError::TooMuchMemory { .. })), "{what}: {:?}", result.map(|rgb| rgb.dimensions()));
        assert!(peak < MARGIN, "{what}: peak {peak} bytes");
    }
}

#[test]
fn allowed_headers_with_missing_data_stay_within_the_budget() {
    let _serial = serial();
    // 3000 x 2000 fits a 32 MiB budget (18 MB RGB, 24 MB RGBA); the data behind it is missing
    // or garbage. Whatever the decoder does, it must stay within the budget.
    let limits = DecodeLimits { max_alloc_bytes: 32 << 20, ..DecodeLimits::default() };
    let png = png_claiming(3_000, 2_000, 8, 2);
    let error =
        assert_within_budget("PNG 3000 x 2000, one row of data", &png, &limits, false).expect_err("truncated PNG decoded");
    assert!(matches!(error, PreprocessError::Decode(_)), "{error:?}");
    let _ = assert_within_budget("JPEG 3000 x 2000 from a 64 x 48 scan", &jpeg_claiming(3_000, 2_000), &limits, false);
    // A GIF decodes to RGBA: the RGB conversion is allowed on top.
    let rgb = assert_within_budget("GIF screen 3000 x 2000, 1 x 1 frame", &gif_claiming(3_000, 2_000), &limits, true)
        .expect("GIF decodes");
    assert_eq!(rgb.dimensions(), (3_000, 2_000));
}

#[test]
fn large_real_image_decodes_within_a_budget_sized_to_it() {
    let _serial = serial();
    let (width, height) = (4_000u32, 3_000u32);
    let pixels = (width * height * 3) as u64;
    let jpeg = encode(&DynamicImage::ImageRgb8(test_pattern(width, height)), ImageFormat::Jpeg);
    let png = encode(&DynamicImage::ImageRgb8(test_pattern(width, height)), ImageFormat::Png);
    for (what, bytes) in [("JPEG 4000 x 3000", &jpeg), ("PNG 4000 x 3000", &png)] {
        // Default limits: the whole decode is bounded by 1 GiB + margin.
        let rgb = assert_within_budget(what, bytes, &DecodeLimits::default(), false).expect("decodes");
        assert_eq!(rgb.dimensions(), (width, height));
        // A budget of the pixel buffer, the decoder's copy of the file (JPEG) and 1 MiB is
        // enough and is kept.
        let file_copy = if what.starts_with("JPEG") { bytes.len() as u64 } else { 0 };
        let tight = DecodeLimits { max_alloc_bytes: pixels + file_copy + (1 << 20), ..DecodeLimits::default() };
        let again = assert_within_budget(what, bytes, &tight, false).expect("decodes within a budget sized to it");
        assert!(again == rgb, "{what}: the tight budget changed the pixels");
        // Half of it is refused, not exceeded.
        let half = DecodeLimits { max_alloc_bytes: pixels / 2, ..DecodeLimits::default() };
        let refused = assert_within_budget(what, bytes, &half, false);
        assert!(
            matches!(refused, Err(PreprocessError::TooMuchMemory { .. })),
            "{what}: {:?}",
            refused.map(|rgb| rgb.dimensions())
        );
        // Preprocessing resamples only the centre band: far less than another full image.
        let (tensor, peak) = peak_during(|| preprocess(&rgb, &PreprocessConfig::openai_clip(224)));
        assert_eq!(tensor.expect("preprocess").len(), 3 * 224 * 224);
        assert!(peak < pixels as usize / 2, "{what}: preprocess peak {peak} bytes");
    }
}

#[test]
fn mutated_files_never_exceed_the_budget() {
    let _serial = serial();
    let rgb = DynamicImage::ImageRgb8(test_pattern(40, 28));
    let rgba = DynamicImage::ImageRgba8(rgb.to_rgba8());
    let seeds = [
        encode(&rgba, ImageFormat::WebP),
        encode(&rgb, ImageFormat::Jpeg),
        encode(&rgb, ImageFormat::Png),
        encode(&rgba, ImageFormat::Gif),
        gif_claiming(300, 200),
        png_claiming(300, 200, 8, 6),
    ];
    // A 1 MiB budget: mutated dimensions up to ~600 x 600 are allowed and decoded.
    let limits = DecodeLimits { max_alloc_bytes: 1 << 20, ..DecodeLimits::default() };
    fuzzing::check(
        "alloc_budget_mutations",
        "alloc_budget",
        4.0,
        (0..seeds.len(), fuzzing::mutations(64, 6)),
        |(seed, edits)| {
            let bytes = fuzzing::apply(&seeds[seed], &edits);
            let (result, peak) = peak_during(|| decode_bytes(&bytes, &limits));
            // Every format but JPEG may decode to something other than RGB8 and be converted.
            let conversion = result.as_ref().map_or(0, |rgb| rgb.as_raw().len());
            let allowed = budget(&limits, conversion);
            prop_assert!(peak <= allowed, "peak {} > budget {}, result {:?}", peak, allowed, result.map(|rgb| rgb.dimensions()));
            Ok(())
        },
    );
}

#[test]
fn webp_lossless_decoder_memory_is_counted() {
    // Found by alloc_budget_mutations (scripts/fuzz): a 40 x 28 lossless WebP whose VP8L size
    // field is overwritten declares a larger image that still fits a 1 MiB budget; the decode
    // then failed ("Corrupt bitstream") after a peak of ~1.58 MB, above 1 MiB + the conversion
    // (none: it failed) + the 512 KiB margin: image's Limits count the output buffer, not the
    // decoder's own ARGB buffer. decode_bytes now reserves 4 bytes per pixel for WebP.
    let _serial = serial();
    let rgba = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(test_pattern(40, 28)).to_rgba8());
    let seed = encode(&rgba, ImageFormat::WebP);
    let mutation =
        fuzzing::Mutation::SetWord { at: fuzzing::At::Hot(23), value: 6195799667699287419, width: 2, big_endian: false };
    let bytes = fuzzing::apply(&seed, &[mutation]);
    let limits = DecodeLimits { max_alloc_bytes: 1 << 20, ..DecodeLimits::default() };
    let _ = assert_within_budget("mutated lossless WebP", &bytes, &limits, true);
}
