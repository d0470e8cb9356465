//! Image decoding and preprocessing identical to open_clip's eval transform.
//!
//! open_clip (`image_transform(S, is_train=False)`) computes, on a Pillow image:
//! `Resize(S)` (shorter side → S, bicubic, antialiased) → `CenterCrop(S)` → `convert("RGB")` →
//! `ToTensor` (÷255) → `Normalize(mean, std)`. This module reproduces it:
//!
//! * [`decode_file`] / [`decode_bytes`] decode with the `image` crate (format guessed from the
//!   content, never the extension; dimensions and memory checked before the pixel buffer is
//!   allocated; EXIF orientation NOT applied, as Pillow does not) and convert to RGB like
//!   Pillow's `convert("RGB")` ([`to_rgb8`]).
//! * [`preprocess_into`] resizes with `fast_image_resize` (Catmull-Rom = Pillow's bicubic,
//!   a = −0.5, kernel widened by the downscale factor = Pillow's antialiasing), crops the centre
//!   with torchvision's rounding and normalises into a CHW `f32` slice.
//!
//! * [`DecodeMode::Scaled`] ([`decode_file_with`], [`preprocess_scaled_into`]) trades exact
//!   parity for speed on large JPEGs: decoded at a reduced DCT scale, resized along the full
//!   image's geometry.
//!
//! Conversion happens before the resize, as in the CoOp/Dassl loaders
//! (`Image.open(p).convert("RGB")`). open_clip applied to a raw palette or alpha image resizes in
//! the file's mode instead (nearest neighbour for palette images, alpha-premultiplied for
//! RGBA/LA); `onnx/fixtures/make_preprocess_reference.py` records how far that lands.
//!
//! Against open_clip 3.3.0 / Pillow 13 on the 24 fixtures in `tests/fixtures/images`: decoded
//! pixels identical except JPEG (zune-jpeg vs libjpeg-turbo: ≤ 3 levels on ~1–3 % of pixels);
//! tensors within mean 0.023 and max 2 grey levels (`tests/preprocess.rs`).

use std::cell::RefCell;
use std::io::{Cursor, Read};
use std::path::Path;

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::error::ImageError;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

/// OpenAI CLIP's normalisation constants (`open_clip.constants.OPENAI_DATASET_MEAN/STD`),
/// written with open_clip's digits; they round to the f32 values torch's Normalize uses.
#[allow(clippy::excessive_precision, reason = "open_clip's own digits, so the constants can be compared with its source")]
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel (RGB) standard deviations; see [`OPENAI_CLIP_MEAN`].
#[allow(clippy::excessive_precision, reason = "open_clip's own digits, so the constants can be compared with its source")]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Extensions of the image files that folders are searched for (a named file is decoded
/// whatever its extension: the content decides).
pub const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif", "jfif"];

/// Whether the file name ends in one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| IMAGE_EXTENSIONS.contains(&extension.to_ascii_lowercase().as_str()))
}

/// Parameters of the eval transform: square side S and per-channel normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// S, in pixels: the side of the square the encoder takes; positive.
    pub image_size: u32,
    /// Per-channel (RGB) mean subtracted after scaling to 0..1.
    pub mean: [f32; 3],
    /// Per-channel (RGB) standard deviation divided by; finite and non-zero.
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// The transform of every OpenAI-trained CLIP, at side `image_size`.
    pub fn openai_clip(image_size: u32) -> Self {
        Self { image_size, mean: OPENAI_CLIP_MEAN, std: OPENAI_CLIP_STD }
    }

    /// Floats per image = 3·S·S (saturating, so an absurd S cannot overflow).
    pub fn tensor_len(&self) -> usize {
        let side = self.image_size as usize;
        side.saturating_mul(side).saturating_mul(3)
    }

    fn validate(&self) -> Result<(), PreprocessError> {
        if self.image_size == 0 {
            return Err(PreprocessError::InvalidConfig("image_size is 0; use the model's input side, e.g. 224".into()));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(PreprocessError::InvalidConfig(format!(
                "mean {:?} / std {:?} must be finite and std non-zero; check [preprocess] in bundle.toml",
                self.mean, self.std
            )));
        }
        Ok(())
    }
}

/// Refusal thresholds applied before any pixel buffer is allocated.
///
/// The default, 16384 × 16384 pixels and 1 GiB, accepts every camera and scanner image in
/// common use (a 200 MP sensor is ~16384 × 12288) while a forged header declaring billions of
/// pixels is refused from its first bytes. The byte budget bounds the decoder's own buffers
/// (the decoded image in its native pixel type plus the decoder's working memory); converting a
/// non-RGB8 image afterwards needs another width × height × 3 bytes.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// The widest image accepted, in pixels; default 16384.
    pub max_width: u32,
    /// The tallest image accepted, in pixels; default 16384.
    pub max_height: u32,
    /// The decoder's memory budget, and the largest file read, in bytes; default 1 GiB.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_width: 16384, max_height: 16384, max_alloc_bytes: 1 << 30 }
    }
}

impl DecodeLimits {
    fn to_image_limits(self) -> image::Limits {
        // `image::Limits` is non-exhaustive: start from a value and set the fields.
        let mut limits = image::Limits::no_limits();
        limits.max_image_width = Some(self.max_width);
        limits.max_image_height = Some(self.max_height);
        limits.max_alloc = Some(self.max_alloc_bytes);
        limits
    }

    /// Memory limit only: the dimension check is done by [`check_size`] so that the error can
    /// name the declared size (the PNG decoder would otherwise refuse before reporting it).
    fn memory_only(self) -> image::Limits {
        let mut limits = image::Limits::no_limits();
        limits.max_alloc = Some(self.max_alloc_bytes);
        limits
    }
}

/// Why an image could not be decoded or preprocessed. Messages say what is wrong and what to
/// do; the caller adds the file path (or frame index).
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The file could not be opened or read.
    #[error("cannot read the file: {0}; check that it exists and is readable")]
    Io(#[from] std::io::Error),
    /// The file or buffer has 0 bytes.
    #[error("the file is empty (0 bytes); it was probably cut off while being written or copied: copy it again")]
    EmptyFile,
    /// The content is not in an image format the decoders know.
    #[error("not an image: the content is none of JPEG, PNG, BMP, WebP, TIFF or GIF (the file name extension is ignored); convert it to JPEG or PNG")]
    UnknownFormat,
    /// The format is known but this variant of it (pixel type, compression) is not supported.
    #[error("{0}; convert the image to 8-bit JPEG or PNG")]
    Unsupported(String),
    /// The file is larger than the decode memory budget; refused before reading.
    #[error("the file is {bytes} bytes, more than the decode memory limit of {max_bytes}; downscale or recompress it, or raise the limit")]
    FileTooLarge {
        /// The file's size, in bytes.
        bytes: u64,
        /// The budget, in bytes.
        max_bytes: u64,
    },
    /// The path is a directory, FIFO, socket or device, not a regular file.
    #[error("not a regular file but a {kind}; only image files are read (a pipe or device could block or never end)")]
    NotRegularFile {
        /// What it is, in words ("directory", "FIFO (named pipe)", ...).
        kind: &'static str,
    },
    /// Reading gave more bytes than the budget, though the reported size was within it.
    #[error("reading the file gave more than the decode memory limit of {max_bytes} bytes (it grew while being read, or its reported size is wrong); stopped there")]
    ReadTooLarge {
        /// The budget, in bytes.
        max_bytes: u64,
    },
    /// The data is corrupt or truncated.
    #[error("corrupt or truncated image: {0}; re-export or copy the file again")]
    Decode(String),
    /// The header declares more pixels than [`DecodeLimits`] allows.
    #[error("the image declares {width} x {height} pixels, more than the allowed {max_width} x {max_height}; downscale it or raise the image size limit")]
    TooLarge {
        /// The declared width, in pixels.
        width: u32,
        /// The declared height, in pixels.
        height: u32,
        /// The allowed width, in pixels.
        max_width: u32,
        /// The allowed height, in pixels.
        max_height: u32,
    },
    /// Decoding the declared size would need more memory than the budget.
    #[error("decoding this {width} x {height} image needs {needed_bytes} bytes, more than the allowed {max_bytes}; downscale it or raise the decode memory limit")]
    TooMuchMemory {
        /// The declared width, in pixels.
        width: u32,
        /// The declared height, in pixels.
        height: u32,
        /// The memory decoding needs, in bytes.
        needed_bytes: u64,
        /// The budget, in bytes.
        max_bytes: u64,
    },
    /// The decoder itself stopped at the memory budget.
    #[error("the decoder ran past its memory limit ({0}); downscale the image or raise the decode memory limit")]
    LimitExceeded(String),
    /// The image has a width or height of 0.
    #[error("the image is {width} x {height} pixels: it has no pixels to classify")]
    EmptyImage {
        /// Its width, in pixels.
        width: u32,
        /// Its height, in pixels.
        height: u32,
    },
    /// The output slice given to [`preprocess_into`] is not [`PreprocessConfig::tensor_len`] long.
    #[error("output slice holds {actual} floats but one image needs {expected} (3 x S x S); pass a slice of PreprocessConfig::tensor_len()")]
    OutputLength {
        /// The floats one image needs (3 × S × S).
        expected: usize,
        /// The slice's length.
        actual: usize,
    },
    /// The [`PreprocessConfig`] has a zero side, a non-finite mean or std, or a zero std.
    #[error("invalid preprocessing configuration: {0}")]
    InvalidConfig(String),
    /// The resampler failed; a bug.
    #[error("resizing failed: {0}; this is a bug, please report it with the image size")]
    Resize(String),
}

// ------------------------------------------------------------------------------------ decoding

/// Decodes an image file to 8-bit RGB. The format is taken from the content.
///
/// The file is read whole (the JPEG decoder would buffer it anyway, and the truncation check
/// below needs it); a file larger than the memory budget is refused before reading, and the
/// bytes actually read are capped at the budget too (a file may grow, or report a size of 0).
/// Only regular files are read: a FIFO, socket or device is refused (it could block forever or
/// never end, like `/dev/zero`), and on Unix the file is opened non-blocking, so even a path
/// swapped for a FIFO after the check cannot block the open.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    let bytes = read_image_file(path, limits)?;
    decode_bytes(&bytes, limits)
}

/// The file's bytes, read under [`decode_file`]'s checks (regular file, size budget).
fn read_image_file(path: &Path, limits: &DecodeLimits) -> Result<Vec<u8>, PreprocessError> {
    let kind = std::fs::metadata(path)?.file_type();
    if !kind.is_file() {
        return Err(PreprocessError::NotRegularFile { kind: file_kind(kind) });
    }
    let file = open_nonblocking(path)?;
    // The handle's own metadata: the file that was actually opened.
    let metadata = file.metadata()?;
    if !metadata.file_type().is_file() {
        return Err(PreprocessError::NotRegularFile { kind: file_kind(metadata.file_type()) });
    }
    let max_bytes = limits.max_alloc_bytes;
    if metadata.len() > max_bytes {
        return Err(PreprocessError::FileTooLarge { bytes: metadata.len(), max_bytes });
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(PreprocessError::ReadTooLarge { max_bytes });
    }
    Ok(bytes)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK does not change reads of a regular file.
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// What a path that is not a regular file is, in words ("FIFO (named pipe)", "character
/// device", …), for messages; shared with the input scan.
#[cfg(unix)]
pub(crate) fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "FIFO (named pipe)"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
pub(crate) fn file_kind(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// Decodes an in-memory encoded image (JPEG, PNG, …) to 8-bit RGB.
pub fn decode_bytes(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    // An empty file is common (interrupted copy) and deserves its own message, not "unknown".
    if bytes.is_empty() {
        return Err(PreprocessError::EmptyFile);
    }
    let mut image_reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let format = image_reader.format().ok_or(PreprocessError::UnknownFormat)?;
    image_reader.limits(limits.memory_only());
    // Constructing the decoder reads only the header.
    let mut decoder = image_reader.into_decoder().map_err(from_image_error)?;
    let (width, height) = decoder.dimensions();
    check_size(width, height, decoder.total_bytes(), limits)?;
    // The image crate's JPEG decoder (zune-jpeg, lenient mode) fills missing data with grey;
    // Pillow refuses such files ("image file is truncated"), and so do we.
    if format == ImageFormat::Jpeg && !jpeg_reaches_end_marker(bytes) {
        return Err(PreprocessError::Decode("the JPEG data stops before its end-of-image marker: the file is truncated".into()));
    }
    // Same bookkeeping as `ImageReader::decode`: the output buffer counts against the budget
    // left to the decoder's internal allocations.
    let mut image_limits = limits.to_image_limits();
    image_limits.reserve(decoder.total_bytes()).map_err(from_image_error)?;
    // The JPEG decoder holds its own copy of the whole file: count it, or the budget is
    // exceeded by the file size (found by tests/alloc_budget.rs).
    if format == ImageFormat::Jpeg {
        image_limits.reserve(bytes.len() as u64).map_err(from_image_error)?;
    }
    // The WebP decoder works on its own 4-bytes-per-pixel ARGB (lossless) or YUV (lossy) buffer
    // before the output is written, outside image's accounting: count 4 bytes per pixel (found
    // by scripts/fuzz: a mutated 40 x 28 lossless file peaked 1.58 MB under a 1 MiB budget).
    if format == ImageFormat::WebP {
        image_limits.reserve(u64::from(width) * u64::from(height) * 4).map_err(from_image_error)?;
    }
    decoder.set_limits(image_limits).map_err(from_image_error)?;
    let image = DynamicImage::from_decoder(decoder).map_err(from_image_error)?;
    Ok(to_rgb8(image))
}

// ------------------------------------------------------------------------- scaled decoding

/// How JPEG files are decoded: at full size (open_clip's pixels), or at a reduced DCT scale.
///
/// `Scaled` decodes a JPEG at the smallest of the DCT scales 1/8, 1/4, 1/2 whose result is still
/// at least S on the short side ([`jpeg_scale_denominator`]), then runs the same resize and crop.
/// Skipping most of the inverse DCT, the upsampling and the colour conversion brings decode +
/// preprocess of a 12 MP frame to about 0.6× the exact path's time (the Huffman decoding that
/// remains is the floor); the 224 px input then differs slightly from open_clip's (≥ 42 dB
/// PSNR on the test photos; BENCHMARKS.md, "Large frames", has the cosine and labels too).
/// Other formats, and JPEGs too small to scale, always take the exact path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// Full-size decode: open_clip parity. The default of `classify`.
    #[default]
    Exact,
    /// Reduced-scale JPEG decode: faster on large frames. The default of `serve`.
    Scaled,
}

impl DecodeMode {
    /// The mode's name, as the CLI and the serve config spell it.
    pub fn name(self) -> &'static str {
        match self {
            DecodeMode::Exact => "exact",
            DecodeMode::Scaled => "scaled",
        }
    }
}

impl std::str::FromStr for DecodeMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "exact" => Ok(DecodeMode::Exact),
            "scaled" => Ok(DecodeMode::Scaled),
            other => Err(format!("unknown decode mode '{other}': expected exact or scaled")),
        }
    }
}

/// The full size of a decoded image and the scale 1/k its pixels were decoded at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The encoded image's width and height.
    pub full_size: (u32, u32),
    /// k: the pixels are the image at scale 1/k, ⌈W/k⌉ × ⌈H/k⌉ (1: full size).
    pub denominator: u32,
}

impl Geometry {
    /// An image at full size.
    pub fn full(rgb: &RgbImage) -> Self {
        Geometry { full_size: rgb.dimensions(), denominator: 1 }
    }

    /// The full image's extent in the reduced image's pixels: W/k × H/k (fractional).
    fn extent(self) -> (f64, f64) {
        let k = f64::from(self.denominator.max(1));
        (f64::from(self.full_size.0) / k, f64::from(self.full_size.1) / k)
    }
}

/// An image from [`decode_file_with`] / [`decode_bytes_with`]: its pixels, and the geometry
/// [`preprocess_scaled_into`] needs to resize them as the full image.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The pixels, at full size or reduced.
    pub rgb: RgbImage,
    /// The full size and the scale of `rgb`.
    pub geometry: Geometry,
}

impl Decoded {
    fn full(rgb: RgbImage) -> Self {
        Decoded { geometry: Geometry::full(&rgb), rgb }
    }
}

/// The DCT scale 1/k (k = 8, 4, 2, or 1 for none) at which a `width` × `height` JPEG is
/// decoded so that its short side is still at least `side`: the largest k with
/// ⌈short / k⌉ ≥ `side` (libjpeg and jpeg-decoder round scaled sizes up).
pub fn jpeg_scale_denominator(width: u32, height: u32, side: u32) -> u32 {
    let short = width.min(height);
    [8, 4, 2].into_iter().find(|&k| short.div_ceil(k) >= side).unwrap_or(1)
}

/// [`decode_file`], with JPEGs decoded at a reduced scale under [`DecodeMode::Scaled`] (for an
/// encoder of side `side`). The file checks and limits are those of [`decode_file`].
pub fn decode_file_with(path: &Path, limits: &DecodeLimits, mode: DecodeMode, side: u32) -> Result<Decoded, PreprocessError> {
    match mode {
        DecodeMode::Exact => decode_file(path, limits).map(Decoded::full),
        DecodeMode::Scaled => {
            let bytes = read_image_file(path, limits)?;
            decode_bytes_with(&bytes, limits, mode, side)
        }
    }
}

/// [`decode_bytes`], with JPEGs decoded at a reduced scale under [`DecodeMode::Scaled`].
///
/// The scaled path refuses nothing the exact path accepts: a JPEG it cannot handle (lossless,
/// CMYK, 16-bit, a variant its decoder rejects) or that is too small to scale goes to the exact
/// path, which decodes it or reports its own error. Truncation and the size limits are checked
/// as in the exact path, against the full declared size, so both modes refuse the same files.
pub fn decode_bytes_with(bytes: &[u8], limits: &DecodeLimits, mode: DecodeMode, side: u32) -> Result<Decoded, PreprocessError> {
    if mode == DecodeMode::Scaled && image::guess_format(bytes).ok() == Some(ImageFormat::Jpeg) {
        if !jpeg_reaches_end_marker(bytes) {
            return Err(PreprocessError::Decode(
                "the JPEG data stops before its end-of-image marker: the file is truncated".into(),
            ));
        }
        if let Some(image) = decode_jpeg_scaled(bytes, limits, side)? {
            return Ok(image);
        }
    }
    decode_bytes(bytes, limits).map(Decoded::full)
}

/// The scaled decode with jpeg-decoder (pure Rust, image-rs; its `scale` skips the IDCT work
/// the reduced size does not need). `Ok(None)`: not scalable here, use the exact path.
fn decode_jpeg_scaled(bytes: &[u8], limits: &DecodeLimits, side: u32) -> Result<Option<Decoded>, PreprocessError> {
    // jpeg-decoder panics on a few malformed inputs (`info()` of a 2-component frame, a worker
    // thread's failure); a panic here must not take the camera service down: the exact path
    // then decides about the file.
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scaled_decode_steps(bytes, limits, side)));
    attempt.unwrap_or(Ok(None))
}

fn scaled_decode_steps(bytes: &[u8], limits: &DecodeLimits, side: u32) -> Result<Option<Decoded>, PreprocessError> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    if decoder.read_info().is_err() {
        return Ok(None);
    }
    let Some(info) = decoder.info() else { return Ok(None) };
    let channels = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        _ => return Ok(None), // CMYK and 16-bit grey: the exact path's conversions
    };
    if info.coding_process == jpeg_decoder::CodingProcess::Lossless {
        return Ok(None);
    }
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    check_size(width, height, u64::from(width) * u64::from(height) * channels, limits)?;
    let k = jpeg_scale_denominator(width, height, side);
    if k == 1 {
        return Ok(None);
    }
    // Asking for exactly the 1/k size makes jpeg-decoder pick 1/k (it takes the smallest scale
    // whose size reaches the request on either axis).
    let request = |length: u32| u16::try_from(length.div_ceil(k)).unwrap_or(u16::MAX);
    let Ok((out_width, out_height)) = decoder.scale(request(width), request(height)) else { return Ok(None) };
    let (out_width, out_height) = (u32::from(out_width), u32::from(out_height));
    // The geometry below assumes exactly 1/k; anything else (never seen) takes the exact path.
    if (out_width, out_height) != (width.div_ceil(k), height.div_ceil(k)) {
        return Ok(None);
    }
    decoder.set_max_decoding_buffer_size(usize::try_from(limits.max_alloc_bytes).unwrap_or(usize::MAX));
    let Ok(pixels) = decoder.decode() else { return Ok(None) };
    let rgb = if channels == 1 { expand(&pixels, 1, |p| [p[0]; 3]) } else { pixels };
    let geometry = Geometry { full_size: (width, height), denominator: k };
    Ok(RgbImage::from_raw(out_width, out_height, rgb).map(|rgb| Decoded { rgb, geometry }))
}

/// Walks the JPEG marker segments and entropy-coded scans after SOI; true when an EOI marker
/// is reached, false when the data runs out first (what libjpeg reports as a premature end).
/// Anything after EOI (camera trailers, appended motion-photo videos) is ignored, and an
/// embedded EXIF thumbnail's EOI is skipped with its APP1 segment.
fn jpeg_reaches_end_marker(data: &[u8]) -> bool {
    let mut i = 2; // after SOI, which the format guess has matched
    while let Some(next) = data.get(i..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) {
        // Fill bytes (0xFF runs) may precede a marker; libjpeg also skips junk before one.
        i += next;
        while data.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&marker) = data.get(i) else { return false };
        i += 1;
        match marker {
            0xD9 => return true,
            0x00 | 0x01 | 0xD0..=0xD7 => continue, // no length field
            _ => {}
        }
        let Some(length) = data.get(i..i + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
            return false;
        };
        i += length;
        if marker == 0xDA {
            i = skip_entropy_coded(data, i);
        }
    }
    false
}

/// Index of the first marker after scan data starting at `i` (stuffed 0xFF00 and restart
/// markers belong to the scan), or `data.len()` if the data ends inside the scan.
fn skip_entropy_coded(data: &[u8], mut i: usize) -> usize {
    while let Some(next) = data.get(i..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) {
        i += next;
        match data.get(i + 1) {
            Some(0x00 | 0xD0..=0xD7) => i += 2,
            Some(0xFF) => i += 1,
            Some(_) => return i,
            None => return data.len(),
        }
    }
    data.len()
}

/// Refuses declared sizes before the pixel buffer exists.
fn check_size(width: u32, height: u32, needed_bytes: u64, limits: &DecodeLimits) -> Result<(), PreprocessError> {
    if width > limits.max_width || height > limits.max_height {
        let (max_width, max_height) = (limits.max_width, limits.max_height);
        return Err(PreprocessError::TooLarge { width, height, max_width, max_height });
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::EmptyImage { width, height });
    }
    if needed_bytes > limits.max_alloc_bytes {
        let max_bytes = limits.max_alloc_bytes;
        return Err(PreprocessError::TooMuchMemory { width, height, needed_bytes, max_bytes });
    }
    Ok(())
}

fn from_image_error(error: ImageError) -> PreprocessError {
    match error {
        ImageError::Limits(limit) => PreprocessError::LimitExceeded(limit.to_string()),
        ImageError::Unsupported(unsupported) => PreprocessError::Unsupported(unsupported.to_string()),
        // The bytes were read; an end-of-file inside the decoder means the data stops early.
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Decode(format!("the data ends early ({io})"))
        }
        ImageError::IoError(io) => PreprocessError::Io(io),
        other => PreprocessError::Decode(other.to_string()),
    }
}

// ---------------------------------------------------------------------------- RGB conversion

/// Pillow `Image.convert("RGB")` semantics, per decoded pixel type:
///
/// * 8-bit RGB is returned as is (no copy); grey is replicated; alpha is dropped, NOT
///   composited (a transparent pixel keeps its stored colour). Palette images arrive expanded
///   by the decoders (PNG/GIF), which is Pillow's palette lookup.
/// * 16-bit RGB, RGBA and grey+alpha keep the high byte (`v >> 8`): Pillow opens those PNGs as
///   8-bit RGB(A) that way.
/// * 16-bit grey alone CLIPS to 255 (`min(v, 255)`), it does not scale: Pillow opens it as
///   mode "I;16" and its `convert("RGB")` clips. Full-range 16-bit grey therefore turns almost
///   white, exactly as in open_clip (checked by `onnx/fixtures/make_preprocess_reference.py`).
/// * Float images (TIFF) have no Pillow equivalent: `image`'s conversion (clamp to [0, 1], ×255).
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    let rgb = match image {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageLuma8(grey) => expand(grey.as_raw(), 1, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(grey) => expand(grey.as_raw(), 2, |p| [p[0]; 3]),
        DynamicImage::ImageRgba8(rgba) => expand(rgba.as_raw(), 4, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma16(grey) => expand(grey.as_raw(), 1, |p| [clip_u16(p[0]); 3]),
        DynamicImage::ImageLumaA16(grey) => expand(grey.as_raw(), 2, |p| [high_byte(p[0]); 3]),
        DynamicImage::ImageRgb16(rgb) => expand(rgb.as_raw(), 3, |p| [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]),
        DynamicImage::ImageRgba16(rgba) => expand(rgba.as_raw(), 4, |p| [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]),
        other => return other.into_rgb8(),
    };
    // `expand` yields exactly width*height pixels, so this cannot fail; were it to, an empty
    // image (refused later by `preprocess_into` as EmptyImage) beats a panic.
    RgbImage::from_raw(width, height, rgb).unwrap_or_else(|| RgbImage::new(0, 0))
}

/// Maps each `channels`-wide source pixel to one RGB triple.
fn expand<T: Copy>(src: &[T], channels: usize, pixel: impl Fn(&[T]) -> [u8; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / channels * 3);
    for p in src.chunks_exact(channels) {
        out.extend_from_slice(&pixel(p));
    }
    out
}

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

fn clip_u16(v: u16) -> u8 {
    v.min(255) as u8
}

// ------------------------------------------------------------------------------ geometry

/// Size after torchvision `Resize(S)` on a `width` × `height` image: the short side becomes S,
/// the long side `int(S * long / short)`. The product is exact in integers and the quotient one
/// correctly rounded division, as in Python, then truncated. `short` must be non-zero.
pub fn resized_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (u64::from(size) * u64::from(long)) as f64 / f64::from(short);
    let new_long = new_long as u32; // truncation toward zero (saturating), Python's int()
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision `CenterCrop` offset along one axis: `int(round((len - crop) / 2))` with Python's
/// round-half-to-even (floor would shift odd remainders such as 3 or 7 by one pixel).
pub fn center_crop_offset(len: u32, crop: u32) -> u32 {
    let excess = len.saturating_sub(crop);
    let half = excess / 2;
    // .5 cases (odd excess) round to the even neighbour.
    if excess % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

// ---------------------------------------------------------------------------- preprocessing

/// Resize (shorter side → S, bicubic, antialiased), integer centre crop, ÷255, normalise;
/// writes CHW `f32` into `out` (`out.len() == cfg.tensor_len()`), so a batch tensor can be
/// filled in place.
pub fn preprocess_into(rgb: &RgbImage, cfg: &PreprocessConfig, out: &mut [f32]) -> Result<(), PreprocessError> {
    preprocess_scaled_into(rgb, Geometry::full(rgb), cfg, out)
}

/// [`preprocess_into`] of an image decoded at scale 1/k ([`Decoded`]): the resize and crop
/// follow the full image's `geometry` (the output size and crop offsets open_clip computes on
/// it), sampled from the reduced pixels. Resizing the reduced image as an image of its own
/// would stretch it slightly — its last row and column stand for a partial block (⌈W/k⌉ pixels
/// for W/k) — and shift the crop by up to half an output pixel, which costs about 10 dB of
/// PSNR on detailed photos.
pub fn preprocess_scaled_into(
    rgb: &RgbImage,
    geometry: Geometry,
    cfg: &PreprocessConfig,
    out: &mut [f32],
) -> Result<(), PreprocessError> {
    cfg.validate()?;
    if out.len() != cfg.tensor_len() {
        return Err(PreprocessError::OutputLength { expected: cfg.tensor_len(), actual: out.len() });
    }
    let (width, height) = rgb.dimensions();
    let (full_width, full_height) = geometry.full_size;
    if width == 0 || height == 0 || full_width == 0 || full_height == 0 {
        return Err(PreprocessError::EmptyImage { width, height });
    }
    let side = cfg.image_size;
    let (new_width, new_height) = resized_size(full_width, full_height, side);
    let left = center_crop_offset(new_width, side);
    let top = center_crop_offset(new_height, side);
    let luts = normalisation_luts(cfg);
    if (new_width, new_height) == (width, height) && geometry.denominator == 1 {
        // torchvision returns the image untouched when it already has the target size.
        return write_chw(rgb.as_raw(), width, (left, top), side, &luts, out);
    }
    let crop = resize_crop(rgb, geometry.extent(), (new_width, new_height), (left, top), side)?;
    write_chw(&crop, side, (0, 0), side, &luts, out)
}

/// Allocating convenience wrapper around [`preprocess_into`].
pub fn preprocess(rgb: &RgbImage, cfg: &PreprocessConfig) -> Result<Vec<f32>, PreprocessError> {
    let mut out = vec![0.0; cfg.tensor_len()];
    preprocess_into(rgb, cfg, &mut out)?;
    Ok(out)
}

thread_local! {
    // The resizer keeps its scratch buffers between calls: no per-frame reallocation.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// The S × S window at `offset` of the image resized to `resized`, computed directly.
///
/// Pillow resamples horizontally first, rounds to 8 bits, then vertically; the clipping of the
/// bicubic overshoot in between makes the order visible at hard edges (up to 14 grey levels).
/// fast_image_resize runs 8-bit images vertical-first, so the two passes are separate calls
/// here, each with a source crop box that is the window mapped back through the resize scale:
/// every output pixel keeps the kernel centre and support it has in the full resize
/// (fast_image_resize clips kernels at the image border, not at the box, as Pillow does) while
/// only the kept pixels are computed. Besides the time saved, a 1 × 16384 strip no longer
/// needs a 224 × 3.7 M buffer.
fn resize_crop(
    rgb: &RgbImage,
    extent: (f64, f64),
    resized: (u32, u32),
    offset: (u32, u32),
    side: u32,
) -> Result<Vec<u8>, PreprocessError> {
    let (width, height) = rgb.dimensions();
    let columns = Window::new(extent.0, resized.0, offset.0, side);
    let rows = Window::new(extent.1, resized.1, offset.1, side);
    // Pass 1, horizontal: only the source rows the vertical kernels will read.
    let (first_row, last_row) = rows.source_span(height);
    let band_height = last_row - first_row;
    let band_box = [columns.start, f64::from(first_row), columns.len, f64::from(band_height)];
    let band = resample(rgb.as_raw(), (width, height), band_box, (side, band_height))?;
    // Pass 2, vertical, in band coordinates.
    let crop_box = [0.0, rows.start - f64::from(first_row), f64::from(side), rows.len];
    resample(&band, (side, band_height), crop_box, (side, side))
}

/// One axis of the crop window, in source coordinates: `start` and `len` (fractional). The
/// source spans `extent` pixels: its pixel count, or W/k for an image decoded at 1/k.
struct Window {
    start: f64,
    len: f64,
    scale: f64,
}

impl Window {
    fn new(extent: f64, resized: u32, offset: u32, side: u32) -> Self {
        let scale = extent / f64::from(resized);
        let start = f64::from(offset) * scale;
        // min(): the last window ends exactly at the border; rounding must not push it past.
        let len = (f64::from(side) * scale).min(extent - start);
        Self { start, len, scale }
    }

    /// Source lines [first, last) that the kernels of this window touch, with one line of
    /// margin: a band border inside the image must lie beyond every kernel, or clipping the
    /// kernel there would differ from Pillow, which clips only at the image border.
    fn source_span(&self, source: u32) -> (u32, u32) {
        let support = 2.0 * self.scale.max(1.0); // Catmull-Rom support 2, widened when reducing
        let first = (self.start - support).floor() - 1.0;
        let last = (self.start + self.len + support).ceil() + 1.0;
        let first = first.max(0.0) as u32; // saturating casts: the values are in range anyway
        let last = (last.min(f64::from(source)) as u32).max(first + 1).min(source);
        (first, last)
    }
}

/// Bicubic resample of the packed RGB `src` (size `src_size`) box `[left, top, width, height]`
/// to `dst_size`. An axis whose box is integer-aligned and already the target length is copied,
/// not resampled (fast_image_resize skips that pass).
fn resample(src: &[u8], src_size: (u32, u32), crop_box: [f64; 4], dst_size: (u32, u32)) -> Result<Vec<u8>, PreprocessError> {
    let [left, top, box_width, box_height] = crop_box;
    let options =
        ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom)).crop(left, top, box_width, box_height);
    let src = ImageRef::new(src_size.0, src_size.1, src, PixelType::U8x3).map_err(|e| PreprocessError::Resize(e.to_string()))?;
    let mut dst = FirImage::new(dst_size.0, dst_size.1, PixelType::U8x3);
    RESIZER
        .with(|cell| match cell.try_borrow_mut() {
            Ok(mut resizer) => resizer.resize(&src, &mut dst, &options),
            Err(_) => Resizer::new().resize(&src, &mut dst, &options),
        })
        .map_err(|e| PreprocessError::Resize(e.to_string()))?;
    Ok(dst.into_vec())
}

/// Per channel, the normalised value of each 8-bit level, computed with torchvision's f32
/// operations (`x / 255`, then `(x - mean) / std`) so results are bit-identical to it.
fn normalisation_luts(cfg: &PreprocessConfig) -> [[f32; 256]; 3] {
    let mut luts = [[0.0f32; 256]; 3];
    for (channel, lut) in luts.iter_mut().enumerate() {
        for (level, value) in lut.iter_mut().enumerate() {
            *value = (level as f32 / 255.0 - cfg.mean[channel]) / cfg.std[channel];
        }
    }
    luts
}

/// Writes the S × S window at `offset` of packed RGB `src` (`src_width` wide) as three planes.
fn write_chw(
    src: &[u8],
    src_width: u32,
    offset: (u32, u32),
    side: u32,
    luts: &[[f32; 256]; 3],
    out: &mut [f32],
) -> Result<(), PreprocessError> {
    let (side, src_width) = (side as usize, src_width as usize);
    let (left, top) = (offset.0 as usize, offset.1 as usize);
    let plane = side.checked_mul(side).filter(|&p| p > 0 && src_width > 0).ok_or_else(window_error)?;
    let (red, rest) = out.split_at_mut_checked(plane).ok_or_else(window_error)?;
    let (green, blue) = rest.split_at_mut_checked(plane).ok_or_else(window_error)?;
    let rows = src.chunks_exact(src_width * 3).skip(top);
    let planes = red.chunks_exact_mut(side).zip(green.chunks_exact_mut(side)).zip(blue.chunks_exact_mut(side));
    let mut written = 0;
    for (row, ((r, g), b)) in rows.zip(planes) {
        let window = row.get(left * 3..(left + side) * 3).ok_or_else(window_error)?;
        let targets = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
        for (pixel, ((r, g), b)) in window.chunks_exact(3).zip(targets) {
            *r = luts[0][usize::from(pixel[0])];
            *g = luts[1][usize::from(pixel[1])];
            *b = luts[2][usize::from(pixel[2])];
        }
        written += 1;
    }
    if written != side {
        return Err(window_error());
    }
    Ok(())
}

fn window_error() -> PreprocessError {
    PreprocessError::Resize("the crop window falls outside the resized image".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_short_side_becomes_s_long_side_truncates() {
        // Landscape 640x427: 224*640/427 = 335.737... -> 335.
        assert_eq!(resized_size(640, 427, 224), (335, 224));
        // Portrait 427x640 mirrors it.
        assert_eq!(resized_size(427, 640, 224), (224, 335));
        // 451x300: 224*451/300 = 336.7466... -> 336.
        assert_eq!(resized_size(451, 300, 224), (336, 224));
        // 1000x872: 224000/872 = 256.88... -> 256.
        assert_eq!(resized_size(1000, 872, 224), (256, 224));
        // Square and exact multiples.
        assert_eq!(resized_size(512, 512, 224), (224, 224));
        assert_eq!(resized_size(600, 400, 224), (336, 224));
        // Upscale: 40x27 -> 224*40/27 = 331.85... -> 331.
        assert_eq!(resized_size(40, 27, 224), (331, 224));
        // Already S on the short side: unchanged.
        assert_eq!(resized_size(224, 229, 224), (224, 229));
        assert_eq!(resized_size(227, 224, 224), (227, 224));
        // Extreme strip: 1 x 16384 -> 224 x 3 670 016.
        assert_eq!(resized_size(1, 16384, 224), (224, 3_670_016));
        // A quotient just below an integer must truncate, not round: 224*7/3 = 522.666...
        assert_eq!(resized_size(7, 3, 224), (522, 224));
        // Exactly representable: 336*224/224 = 336.
        assert_eq!(resized_size(336, 224, 224), (336, 224));
    }

    #[test]
    fn scale_is_the_smallest_keeping_the_short_side_at_least_s() {
        // 12 MP phone frame: 1/8 gives 504 x 378, short side 378 >= 224.
        assert_eq!(jpeg_scale_denominator(4032, 3024, 224), 8);
        assert_eq!(jpeg_scale_denominator(3024, 4032, 224), 8);
        // 1080p: 1/8 would give 135 rows, 1/4 gives 270 >= 224.
        assert_eq!(jpeg_scale_denominator(1920, 1080, 224), 4);
        // 720p: 1/4 gives 180, 1/2 gives 360.
        assert_eq!(jpeg_scale_denominator(1280, 720, 224), 2);
        // Too small to scale: the exact path.
        assert_eq!(jpeg_scale_denominator(300, 200, 224), 1);
        // At the boundary: ceil(447 / 2) = 224 is enough, ceil(446 / 2) = 223 is not.
        assert_eq!(jpeg_scale_denominator(640, 447, 224), 2);
        assert_eq!(jpeg_scale_denominator(640, 446, 224), 1);
        // Scaled sizes round up: ceil(1785 / 8) = 224 is enough, ceil(1784 / 8) = 223 is not.
        assert_eq!(jpeg_scale_denominator(4000, 1785, 224), 8);
        assert_eq!(jpeg_scale_denominator(4000, 1784, 224), 4);
        // A long strip is judged by its short side.
        assert_eq!(jpeg_scale_denominator(16000, 100, 224), 1);
        assert_eq!(jpeg_scale_denominator(0, 0, 224), 1);
    }

    #[test]
    fn decode_mode_names_round_trip() {
        for mode in [DecodeMode::Exact, DecodeMode::Scaled] {
            assert_eq!(mode.name().parse::<DecodeMode>(), Ok(mode));
            assert_eq!(serde_json::to_string(&mode).expect("json"), format!("\"{}\"", mode.name()));
        }
        assert_eq!(DecodeMode::default(), DecodeMode::Exact);
        assert!("fast".parse::<DecodeMode>().is_err());
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        let s = 224;
        assert_eq!(center_crop_offset(s, s), 0);
        assert_eq!(center_crop_offset(s + 1, s), 0); // round(0.5) = 0
        assert_eq!(center_crop_offset(s + 2, s), 1);
        assert_eq!(center_crop_offset(s + 3, s), 2); // round(1.5) = 2
        assert_eq!(center_crop_offset(s + 5, s), 2); // round(2.5) = 2
        assert_eq!(center_crop_offset(s + 7, s), 4); // round(3.5) = 4
        assert_eq!(center_crop_offset(s + 9, s), 4); // round(4.5) = 4
        assert_eq!(center_crop_offset(335, s), 56); // round(55.5) = 56 (640x427 landscape)
        assert_eq!(center_crop_offset(336, s), 56);
        assert_eq!(center_crop_offset(256, s), 16);
        assert_eq!(center_crop_offset(331, s), 54); // round(53.5) = 54
        assert_eq!(center_crop_offset(200, s), 0); // never negative
    }

    #[test]
    fn crop_offsets_for_portrait_and_landscape() {
        let s = 224;
        // Landscape 640x427 -> 335x224: crop starts at x = 56, y = 0.
        let (w, h) = resized_size(640, 427, s);
        assert_eq!((center_crop_offset(w, s), center_crop_offset(h, s)), (56, 0));
        // Portrait 150x400 -> 224x597: round(186.5) = 186 (even), x = 0.
        let (w, h) = resized_size(150, 400, s);
        assert_eq!((w, h), (224, 597));
        assert_eq!((center_crop_offset(w, s), center_crop_offset(h, s)), (0, 186));
        // Portrait 300x451 -> 224x336: y = 56.
        let (w, h) = resized_size(300, 451, s);
        assert_eq!((center_crop_offset(w, s), center_crop_offset(h, s)), (0, 56));
    }

    #[test]
    fn tensor_len_is_three_planes() {
        assert_eq!(PreprocessConfig::openai_clip(224).tensor_len(), 3 * 224 * 224);
        assert_eq!(PreprocessConfig::openai_clip(u32::MAX).tensor_len(), usize::MAX);
    }

    #[test]
    #[allow(clippy::excessive_precision, reason = "torchvision's f32 values, digit for digit")]
    fn normalisation_matches_torchvision_f32_order() {
        let cfg = PreprocessConfig::openai_clip(2);
        let luts = normalisation_luts(&cfg);
        assert_eq!(luts[0][0], (0.0f32 - 0.48145466) / 0.26862954);
        assert_eq!(luts[2][255], (1.0f32 - 0.40821073) / 0.27577711);
        assert_eq!(luts[1][128], (128.0f32 / 255.0 - 0.4578275) / 0.26130258);
    }

    #[test]
    fn identity_size_crops_without_resampling() {
        // 3x4 image, S = 3: no resize, vertical excess 1 -> offset round(0.5) = 0.
        let pixels: Vec<u8> = (0..36).collect();
        let rgb = RgbImage::from_raw(3, 4, pixels).expect("3x4 buffer");
        let cfg = PreprocessConfig { image_size: 3, mean: [0.0; 3], std: [1.0 / 255.0; 3] };
        let out = preprocess(&rgb, &cfg).expect("preprocess");
        // Red plane = every third byte of the first three rows.
        let red: Vec<f32> = (0..9).map(|i| (i * 3) as f32).collect();
        for (got, want) in out[..9].iter().zip(&red) {
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let cfg = PreprocessConfig::openai_clip(4);
        let rgb = RgbImage::new(8, 8);
        let mut short = vec![0.0; 5];
        assert!(matches!(
            preprocess_into(&rgb, &cfg, &mut short),
            Err(PreprocessError::OutputLength { expected: 48, actual: 5 })
        ));
        assert!(matches!(preprocess(&RgbImage::new(0, 5), &cfg), Err(PreprocessError::EmptyImage { .. })));
        assert!(matches!(preprocess(&rgb, &PreprocessConfig::openai_clip(0)), Err(PreprocessError::InvalidConfig(_))));
        let zero_std = PreprocessConfig { std: [0.0; 3], ..cfg.clone() };
        assert!(matches!(preprocess(&rgb, &zero_std), Err(PreprocessError::InvalidConfig(_))));
        // Extreme aspect ratios and 1-pixel images go through the crop-box resize.
        assert!(preprocess(&RgbImage::new(1, 5000), &cfg).is_ok());
        assert!(preprocess(&RgbImage::new(5000, 1), &cfg).is_ok());
        assert!(preprocess(&RgbImage::new(1, 1), &cfg).is_ok());
    }

    #[test]
    fn jpeg_end_marker_walk() {
        // SOI, APP1 holding a complete thumbnail (with its own SOS/EOI), SOS, scan data with a
        // stuffed 0xFF00 and a restart marker, EOI.
        let thumbnail = [0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x11, 0xFF, 0xD9];
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 2 + thumbnail.len() as u8];
        jpeg.extend_from_slice(&thumbnail);
        jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x03, 0x01, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56]);
        let scan_end = jpeg.len();
        jpeg.extend_from_slice(&[0xFF, 0xD9]);
        assert!(jpeg_reaches_end_marker(&jpeg));
        // Trailing data after EOI (camera trailers, motion-photo video) is fine.
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"ftypmp42 and more");
        assert!(jpeg_reaches_end_marker(&trailing));
        // Cut anywhere before EOI, including inside the scan: truncated, even though the
        // thumbnail's EOI is still present.
        for cut in [3, 5, 10, 20, scan_end - 3, scan_end, scan_end + 1] {
            assert!(!jpeg_reaches_end_marker(&jpeg[..cut]), "cut at {cut}");
        }
        // A segment length pointing past the end.
        assert!(!jpeg_reaches_end_marker(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF, 0x00]));
    }

    #[test]
    fn to_rgb8_follows_pillow() {
        use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
        let grey16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_raw(3, 1, vec![7, 255, 1000]).expect("buffer");
        assert_eq!(to_rgb8(DynamicImage::ImageLuma16(grey16)).as_raw(), &[7, 7, 7, 255, 255, 255, 255, 255, 255]);
        let la16: ImageBuffer<LumaA<u16>, Vec<u16>> = ImageBuffer::from_raw(1, 1, vec![0x80ff, 0]).expect("buffer");
        assert_eq!(to_rgb8(DynamicImage::ImageLumaA16(la16)).as_raw(), &[0x80, 0x80, 0x80]);
        let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_raw(1, 1, vec![0x00ff, 0x0180, 0xffff]).expect("buffer");
        assert_eq!(to_rgb8(DynamicImage::ImageRgb16(rgb16)).as_raw(), &[0, 1, 255]);
        // Alpha 0 keeps the stored colour (dropped, not composited).
        let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> = ImageBuffer::from_raw(1, 1, vec![10, 20, 30, 0]).expect("buffer");
        assert_eq!(to_rgb8(DynamicImage::ImageRgba8(rgba)).as_raw(), &[10, 20, 30]);
        let la: ImageBuffer<LumaA<u8>, Vec<u8>> = ImageBuffer::from_raw(1, 1, vec![42, 0]).expect("buffer");
        assert_eq!(to_rgb8(DynamicImage::ImageLumaA8(la)).as_raw(), &[42, 42, 42]);
    }
}
