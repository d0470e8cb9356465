//! Logits: cosine similarities of image embeddings with the cached class text features, times
//! each model's logit scale.
//!
//! The cache stores the zero-shot and fine-tuned text features stacked as one [2C, D] matrix, so
//! when both models share the image encoder (CoOp-style, the common case) both logit vectors come
//! from ONE matrix product `F · [T_zs; T_ft]ᵀ`; that is what makes CAC free at run time. A
//! fine-tuned model with its own image encoder (MaPLe-style) needs two products.
//!
//! The text features are f32 or f16 ([`TextFeatures`]). f16 halves the bytes read per image,
//! which is what bounds the time at many classes; its rows are widened to f32 a block at a time
//! and every sum is accumulated in f32, so only the stored features are rounded.

use half::f16;
use ndarray::{s, Array2, ArrayView1, ArrayView2, ArrayViewMut2, CowArray, Ix2};

use crate::cache::FeaturePrecision;

/// Batches up to this size take the row-dot path ([`similarities`]); larger ones a packed GEMM.
pub const SMALL_BATCH: usize = 4;
/// Text matrices with at least this many elements are split across threads on the row-dot path.
const PARALLEL_ELEMENTS: usize = 1 << 20;
/// Text rows per block of the row-dot path: 64 rows of D = 512 are 128 KiB, cache-resident while
/// every image of the batch is dotted with them.
const ROWS_PER_BLOCK: usize = 64;
/// f16 rows widened at once for a batch above [`SMALL_BATCH`]: each block is one small GEMM, which
/// packs the batch's images anew, so blocks are larger there (256 rows of D = 512: 512 KiB).
const GEMM_ROWS_PER_BLOCK: usize = 256;

/// The stacked [2C, D] class text features, in the precision the cache stores them in: a view,
/// nothing copied. Both kinds give the same logits up to the f16 rounding of the features.
#[derive(Debug, Clone, Copy)]
pub enum TextFeatures<'a> {
    /// Single precision, used as they are.
    F32(ArrayView2<'a, f32>),
    /// Half precision, widened to f32 block by block while the logits are computed.
    F16(ArrayView2<'a, f16>),
}

impl<'a> From<ArrayView2<'a, f32>> for TextFeatures<'a> {
    fn from(view: ArrayView2<'a, f32>) -> Self {
        TextFeatures::F32(view)
    }
}

impl<'a> From<ArrayView2<'a, f16>> for TextFeatures<'a> {
    fn from(view: ArrayView2<'a, f16>) -> Self {
        TextFeatures::F16(view)
    }
}

impl<'a> TextFeatures<'a> {
    /// Which precision the features are stored in.
    pub fn precision(&self) -> FeaturePrecision {
        match self {
            TextFeatures::F32(_) => FeaturePrecision::F32,
            TextFeatures::F16(_) => FeaturePrecision::F16,
        }
    }

    /// (rows, width): (2C, D) for a cache's stacked features.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            TextFeatures::F32(view) => view.dim(),
            TextFeatures::F16(view) => view.dim(),
        }
    }

    /// The rows in `range`, still a view.
    pub fn rows(self, range: std::ops::Range<usize>) -> TextFeatures<'a> {
        match self {
            TextFeatures::F32(view) => TextFeatures::F32(view.slice_move(s![range, ..])),
            TextFeatures::F16(view) => TextFeatures::F16(view.slice_move(s![range, ..])),
        }
    }

    /// The features as f32: borrowed when they are f32, widened into a new array when f16 (a
    /// copy of twice the stored size: for tools and checks, not for the per-image path).
    pub fn to_f32(&self) -> CowArray<'a, f32, Ix2> {
        match self {
            TextFeatures::F32(view) => CowArray::from(*view),
            TextFeatures::F16(view) => CowArray::from(view.mapv(f16::to_f32)),
        }
    }
}

/// Logits of a batch: rows are images, columns classes.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLogits {
    /// The original CLIP's logits, `[N, C]`; `[0, C]` when the zero-shot image pass was skipped
    /// ([`fine_tuned_logits`]: a bundle with its own fine-tuned image encoder under a
    /// calibration that never reads them).
    pub zero_shot: Array2<f32>,
    /// The fine-tuned model's logits, `[N, C]`.
    pub fine_tuned: Array2<f32>,
}

impl BatchLogits {
    /// Per image, its fine-tuned and zero-shot logit rows. Where the zero-shot pass was skipped,
    /// the fine-tuned row stands in for the zero-shot one: only a calibration that does not read
    /// it ([`crate::Calibration::reads_zero_shot_logits`]) is ever given such logits.
    pub fn rows(&self) -> impl Iterator<Item = (ArrayView1<'_, f32>, ArrayView1<'_, f32>)> {
        let skipped = self.zero_shot.nrows() == 0;
        self.fine_tuned.outer_iter().enumerate().map(move |(row, fine_tuned)| {
            let zero_shot = if skipped { fine_tuned } else { self.zero_shot.row(row) };
            (fine_tuned, zero_shot)
        })
    }
}

/// Logit scales of the two models (CLIP's exp(logit_scale), usually 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitScales {
    /// The original CLIP's scale.
    pub zero_shot: f32,
    /// The fine-tuned model's scale.
    pub fine_tuned: f32,
}

/// The fine-tuned logits alone, for a bundle with its own fine-tuned image encoder when the
/// calibration does not read the zero-shot logits: the zero-shot image pass is skipped and
/// `zero_shot` has no rows (see [`BatchLogits::rows`]).
pub fn fine_tuned_logits<'t>(
    image_ft: ArrayView2<'_, f32>,
    stacked_text: impl Into<TextFeatures<'t>>,
    scale: f32,
) -> BatchLogits {
    let stacked_text = stacked_text.into();
    let rows = stacked_text.dim().0;
    let mut fine_tuned = text_similarities(image_ft, stacked_text.rows(rows / 2..rows));
    fine_tuned.mapv_inplace(|cosine| cosine * scale);
    BatchLogits { zero_shot: Array2::zeros((0, fine_tuned.ncols())), fine_tuned }
}

/// `stacked_text` is [2C, D]: rows 0..C zero-shot, C..2C fine-tuned class features, normalised,
/// f32 (an `ArrayView2<f32>`) or either precision of a cache ([`TextFeatures`]).
/// `image_ft` is `None` when the fine-tuned model shares the zero-shot image embeddings.
pub fn batch_logits<'t>(
    image_zs: ArrayView2<'_, f32>,
    image_ft: Option<ArrayView2<'_, f32>>,
    stacked_text: impl Into<TextFeatures<'t>>,
    scales: LogitScales,
) -> BatchLogits {
    let stacked_text = stacked_text.into();
    let rows = stacked_text.dim().0;
    let classes = rows / 2;
    let (mut zero_shot, mut fine_tuned) = match image_ft {
        None => {
            let fused = text_similarities(image_zs, stacked_text);
            (fused.slice(s![.., ..classes]).to_owned(), fused.slice(s![.., classes..]).to_owned())
        }
        Some(image_ft) => (
            text_similarities(image_zs, stacked_text.rows(0..classes)),
            text_similarities(image_ft, stacked_text.rows(classes..rows)),
        ),
    };
    zero_shot.mapv_inplace(|cosine| cosine * scales.zero_shot);
    fine_tuned.mapv_inplace(|cosine| cosine * scales.fine_tuned);
    BatchLogits { zero_shot, fine_tuned }
}

/// `images · textᵀ` for text features of either precision: [`similarities`] or [`similarities_f16`].
pub fn text_similarities(images: ArrayView2<'_, f32>, text: TextFeatures<'_>) -> Array2<f32> {
    match text {
        TextFeatures::F32(text) => similarities(images, text),
        TextFeatures::F16(text) => similarities_f16(images, text),
    }
}

/// `images · textᵀ`: [N, D] × [R, D] → [N, R].
///
/// A general matrix product packs (copies) the whole text matrix on every call, which at 100 000
/// classes (400 MB) costs several times the product itself when only one image or a few are
/// multiplied. Small batches therefore stream the text rows once, in cache-sized blocks, dotting
/// each with every image — memory-bound, at the speed of reading the mapping — split across the
/// cores for large class lists. Larger batches amortise the packing and use the GEMM.
pub fn similarities(images: ArrayView2<'_, f32>, text: ArrayView2<'_, f32>) -> Array2<f32> {
    let (Some(image_rows), Some(text_rows)) = (images.as_slice(), text.as_slice()) else {
        return images.dot(&text.t());
    };
    if images.nrows() > SMALL_BATCH || images.ncols() == 0 {
        return images.dot(&text.t());
    }
    let (batch, dim, rows) = (images.nrows(), images.ncols(), text.nrows());
    // Computed as [R, N] so that each thread owns a contiguous range of the output.
    let by_row = split_rows(text_rows, dim, batch, |text, out| row_dots(image_rows, dim, text, out));
    let transposed = Array2::from_shape_vec((rows, batch), by_row).unwrap_or_else(|_| Array2::zeros((rows, batch)));
    transposed.reversed_axes().as_standard_layout().into_owned()
}

/// The `[R, N]` product of `text_rows` (R rows, `dim` wide) with N images, computed by `work`
/// on contiguous ranges of rows, across threads when the product is large enough to pay for
/// them (each thread owns a contiguous range of the output).
fn split_rows<T: Sync>(text_rows: &[T], dim: usize, batch: usize, work: impl Fn(&[T], &mut [f32]) + Sync) -> Vec<f32> {
    let rows = text_rows.len() / dim.max(1);
    let mut by_row = vec![0f32; rows * batch];
    let threads =
        if rows * dim >= PARALLEL_ELEMENTS { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) } else { 1 };
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let work = &work;
    std::thread::scope(|scope| {
        let mut chunks = by_row.chunks_mut(rows_per_thread * batch).zip(text_rows.chunks(rows_per_thread * dim));
        // The calling thread takes the first chunk itself.
        let first = chunks.next();
        for (out, text) in chunks {
            scope.spawn(move || work(text, out));
        }
        if let Some((out, text)) = first {
            work(text, out);
        }
    });
    by_row
}

/// out[r · N + i] = text_r · image_i, for the rows of `text` (row-major, `dim` wide).
fn row_dots(images: &[f32], dim: usize, text: &[f32], out: &mut [f32]) {
    let batch = images.len() / dim;
    for (block_text, block_out) in text.chunks(ROWS_PER_BLOCK * dim).zip(out.chunks_mut(ROWS_PER_BLOCK * batch)) {
        for (row, row_out) in block_text.chunks_exact(dim).zip(block_out.chunks_exact_mut(batch)) {
            for (image, slot) in images.chunks_exact(dim).zip(row_out) {
                *slot = dot(row, image);
            }
        }
    }
}

/// Dot product with eight independent accumulators, so the compiler vectorises it on any target.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The f16 path multiplies images pre-scaled by 2^56 with rows widened to 2^-112 times their
/// value ([`widen_f16_scaled`]), then scales the sums by 2^56: powers of two, so exact for any
/// finite features and images below 2^70, and every intermediate stays a normal f32.
const IMAGE_SCALE: f32 = (1u64 << 56) as f32;

/// `images · textᵀ` with f16 text rows: [N, D] × [R, D] → [N, R], accumulated in f32.
///
/// The rows are split across threads as in [`similarities`] (every batch size: each thread
/// widens its own rows); each thread widens a block of rows into a small f32 buffer that stays in
/// cache and multiplies it there, with the row dots for small batches and a GEMM per block for
/// larger ones. No f32 copy of the whole matrix is ever made.
pub fn similarities_f16(images: ArrayView2<'_, f32>, text: ArrayView2<'_, f16>) -> Array2<f32> {
    let (batch, dim, rows) = (images.nrows(), images.ncols(), text.nrows());
    if batch == 0 || rows == 0 || dim == 0 {
        return Array2::zeros((batch, rows));
    }
    let scaled = images.mapv(|value| value * IMAGE_SCALE);
    let text = text.as_standard_layout();
    let (Some(image_rows), Some(text_rows)) = (scaled.as_slice(), text.as_slice()) else {
        // Both are in standard layout, so this is never taken; the plain product is the answer anyway.
        return images.dot(&text.mapv(f16::to_f32).t());
    };
    let mut by_row = split_rows(text_rows, dim, batch, |text, out| widened_row_dots(image_rows, dim, text, out));
    by_row.iter_mut().for_each(|sum| *sum *= IMAGE_SCALE);
    let transposed = Array2::from_shape_vec((rows, batch), by_row).unwrap_or_else(|_| Array2::zeros((rows, batch)));
    transposed.reversed_axes().as_standard_layout().into_owned()
}

/// out[r · N + i] = text_r · image_i · 2^-112 for f16 rows: a block of rows widened, then multiplied.
fn widened_row_dots(images: &[f32], dim: usize, text: &[f16], out: &mut [f32]) {
    let batch = images.len() / dim;
    if batch == 1 {
        // One image (the camera's case): each row is used once, so it is widened inside the dot
        // product instead of through the buffer. The f16 loads come out scalar there, but the
        // store and reload of the buffer measured slower still (BENCHMARKS.md § f16 text features).
        for (row, slot) in text.chunks_exact(dim).zip(out.iter_mut()) {
            *slot = dot_f16(row, images);
        }
        return;
    }
    let block_rows = if batch > SMALL_BATCH { GEMM_ROWS_PER_BLOCK } else { ROWS_PER_BLOCK };
    let mut buffer = vec![0f32; block_rows * dim];
    for (block_text, block_out) in text.chunks(block_rows * dim).zip(out.chunks_mut(block_rows * batch)) {
        let widened = &mut buffer[..block_text.len()];
        widen_f16_scaled(block_text, widened);
        if batch > SMALL_BATCH {
            block_product(images, dim, widened, block_out);
        } else {
            row_dots(images, dim, widened, block_out);
        }
    }
}

/// out ([B, N]) = block ([B, D]) · imagesᵀ ([D, N]) by the GEMM.
fn block_product(images: &[f32], dim: usize, block: &[f32], out: &mut [f32]) {
    let (batch, rows) = (images.len() / dim, block.len() / dim);
    let shapes = (
        ArrayView2::from_shape((rows, dim), block),
        ArrayView2::from_shape((batch, dim), images),
        ArrayViewMut2::from_shape((rows, batch), out),
    );
    // The slices are cut to these shapes by the caller, so the views always exist.
    if let (Ok(block), Ok(images), Ok(mut out)) = shapes {
        ndarray::linalg::general_mat_mul(1.0, &block, &images.t(), 0.0, &mut out);
    }
}

/// [`dot`] of a widened f16 row with an image: the same lanes and order, so the same sum as
/// widening the row first.
fn dot_f16(row: &[f16], image: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (row_chunks, image_chunks) = (row.chunks_exact(8), image.chunks_exact(8));
    let tail: f32 = row_chunks.remainder().iter().zip(image_chunks.remainder()).map(|(t, x)| widen_one(*t) * x).sum();
    for (t, x) in row_chunks.zip(image_chunks) {
        for lane in 0..8 {
            lanes[lane] += widen_one(t[lane]) * x[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Widens f16 values to 2^-112 times their value as f32: `dst[i] = src[i] · 2^-112`, exactly
/// for every finite f16 (±inf and NaN come out as finite values of magnitude 2^-96 .. 2^-95;
/// the encoders never write them). `src` and `dst` have the same length; a longer one is cut
/// to the shorter.
///
/// Why scaled: an f16's sign, exponent and mantissa, moved into an f32's bit positions
/// unchanged, are that f16 times 2^-112 — the exponent biases differ by 112 — subnormals
/// included. So widening is three integer operations per value (sign-extend, shift, mask), which
/// the compiler vectorises with the base SIMD of any target (SSE2, NEON): no F16C or FP16
/// extension, no run-time feature detection, no branches. The 2^112 is put back by scaling the
/// images and the sums (see `IMAGE_SCALE`).
pub fn widen_f16_scaled(src: &[f16], dst: &mut [f32]) {
    for (out, value) in dst.iter_mut().zip(src) {
        *out = widen_one(*value);
    }
}

/// One f16 to 2^-112 times its value (see [`widen_f16_scaled`]).
#[inline(always)]
fn widen_one(value: f16) -> f32 {
    // Sign-extended, the sign lands in bit 31 after the shift; the mask clears the copies of it
    // that the extension left in bits 28..30.
    f32::from_bits((i32::from(value.to_bits() as i16) << 13) as u32 & 0x8fff_e000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn fused_product_equals_separate_products() {
        let image = array![[0.5f32, 0.75], [1.0, 0.0]];
        let text = array![[1.0f32, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]];
        let scales = LogitScales { zero_shot: 100.0, fine_tuned: 50.0 };
        let fused = batch_logits(image.view(), None, text.view(), scales);
        let separate = batch_logits(image.view(), Some(image.view()), text.view(), scales);
        assert_eq!(fused, separate);
        // Hand-checked (exact in binary): image 0 · zs rows = [0.5, 0.75] × 100;
        // · ft rows = [0.75, 0.625] × 50.
        assert_eq!(fused.zero_shot.row(0).to_vec(), vec![50.0, 75.0]);
        assert_eq!(fused.fine_tuned.row(0).to_vec(), vec![37.5, 31.25]);
    }

    /// A [rows, cols] matrix of values in [-0.5, 0.5) from a xorshift64 stream.
    fn xorshift_matrix(state: &mut u64, rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
    }

    /// The row-dot path (small batches, threads for large matrices) against the GEMM, on sizes
    /// that leave remainders everywhere (D not a multiple of 8, rows not a multiple of a block).
    #[test]
    fn row_dot_path_equals_the_matrix_product() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = |rows: usize, cols: usize| xorshift_matrix(&mut state, rows, cols);
        for (batch, rows, dim) in [(1, 5, 3), (3, 130, 37), (4, 2100, 515), (2, 1, 8)] {
            let images = random(batch, dim);
            let text = random(rows, dim);
            let fast = similarities(images.view(), text.view());
            let reference = images.dot(&text.t());
            assert_eq!(fast.dim(), (batch, rows));
            let worst = (&fast - &reference).iter().fold(0f32, |worst, d| worst.max(d.abs()));
            assert!(worst < 1e-4, "batch {batch}, rows {rows}, dim {dim}: {worst}");
        }
    }

    /// Every finite f16 (63 488 of the 65 536 bit patterns) widens to exactly 2^-112 times what
    /// the `half` crate's scalar conversion gives; the others to finite values.
    #[test]
    fn scaled_widening_is_exact_for_every_finite_f16() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut widened = vec![0f32; all.len()];
        widen_f16_scaled(&all, &mut widened);
        let scale = f64::from(2f32.powi(112));
        let mut finite = 0;
        for (value, ours) in all.iter().zip(&widened) {
            assert!(ours.is_finite(), "{:#06x}", value.to_bits());
            if value.is_finite() {
                finite += 1;
                let expected = f64::from(value.to_f32());
                assert_eq!(f64::from(*ours) * scale, expected, "{:#06x}", value.to_bits());
                assert_eq!(ours.is_sign_negative(), value.is_sign_negative(), "{:#06x}", value.to_bits());
            }
        }
        assert_eq!(finite, 63_488);
    }

    /// The f16 path against an independent reference: the f16-rounded features widened by the
    /// `half` crate, and plain f64 loops over them. Batches on both sides of SMALL_BATCH, sizes
    /// with remainders, and one matrix large enough to be split across threads.
    #[test]
    fn f16_path_equals_plain_loops_over_the_rounded_features() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |rows: usize, cols: usize| xorshift_matrix(&mut state, rows, cols);
        for (batch, rows, dim) in
            [(1, 5, 3), (3, 130, 37), (4, 2100, 515), (5, 300, 64), (32, 517, 40), (1, 1, 8), (1, 2100, 515)]
        {
            let images = random(batch, dim);
            let text = random(rows, dim).mapv(f16::from_f32);
            let ours = similarities_f16(images.view(), text.view());
            assert_eq!(ours.dim(), (batch, rows));
            assert!(ours.is_standard_layout(), "callers take rows as slices");
            let mut worst = 0f64;
            for i in 0..batch {
                for r in 0..rows {
                    let exact: f64 = (0..dim).map(|k| f64::from(images[[i, k]]) * f64::from(text[[r, k]].to_f32())).sum();
                    worst = worst.max((f64::from(ours[[i, r]]) - exact).abs());
                }
            }
            assert!(worst < 1e-4, "batch {batch}, rows {rows}, dim {dim}: {worst}");
        }
    }

    /// One image takes the fused widen-and-dot; two the buffer: the same sums, bit for bit.
    #[test]
    fn the_single_image_path_equals_the_buffered_one() {
        let text = Array2::from_shape_fn((70, 37), |(r, k)| f16::from_f32(((r * 37 + k) % 11) as f32 / 11.0 - 0.45));
        let image = Array2::from_shape_fn((1, 37), |(_, k)| (k as f32 * 0.37).sin());
        let pair = ndarray::concatenate(ndarray::Axis(0), &[image.view(), image.view()]).unwrap();
        let single = similarities_f16(image.view(), text.view());
        let buffered = similarities_f16(pair.view(), text.view());
        assert_eq!(single.row(0), buffered.row(1));
    }

    #[test]
    fn both_precisions_give_the_same_logits_up_to_the_rounding() {
        let image = array![[0.5f32, 0.75], [1.0, 0.0]];
        let text = array![[1.0f32, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]];
        let scales = LogitScales { zero_shot: 100.0, fine_tuned: 50.0 };
        // These features are exact in f16, so the logits are equal, fused or separate.
        let half_text = text.mapv(f16::from_f32);
        let f32_logits = batch_logits(image.view(), None, text.view(), scales);
        for image_ft in [None, Some(image.view())] {
            assert_eq!(batch_logits(image.view(), image_ft, half_text.view(), scales), f32_logits);
        }
        let features = TextFeatures::from(half_text.view());
        assert_eq!((features.precision(), features.dim()), (FeaturePrecision::F16, (4, 2)));
        assert_eq!(features.to_f32(), text);
    }
}
