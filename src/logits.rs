//! Logits: cosine similarities of image embeddings with the cached class text features, times
//! each model's logit scale.
//!
//! The cache stores the zero-shot and fine-tuned text features stacked as one [2C, D] matrix, so
//! when both models share the image encoder (CoOp-style, the common case) both logit vectors come
//! from ONE matrix product `F · [T_zs; T_ft]ᵀ`; that is what makes CAC free at run time. A
//! fine-tuned model with its own image encoder (MaPLe-style) needs two products.

use ndarray::{s, Array2, ArrayView2};

/// Batches up to this size take the row-dot path ([`similarities`]); larger ones a packed GEMM.
pub const SMALL_BATCH: usize = 4;
/// Text matrices with at least this many elements are split across threads on the row-dot path.
const PARALLEL_ELEMENTS: usize = 1 << 20;
/// Text rows per block of the row-dot path: 64 rows of D = 512 are 128 KiB, cache-resident while
/// every image of the batch is dotted with them.
const ROWS_PER_BLOCK: usize = 64;

/// Logits of a batch: rows are images, columns classes.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLogits {
    /// The original CLIP's logits, `[N, C]`.
    pub zero_shot: Array2<f32>,
    /// The fine-tuned model's logits, `[N, C]`.
    pub fine_tuned: Array2<f32>,
}

/// Logit scales of the two models (CLIP's exp(logit_scale), usually 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitScales {
    /// The original CLIP's scale.
    pub zero_shot: f32,
    /// The fine-tuned model's scale.
    pub fine_tuned: f32,
}

/// `stacked_text` is [2C, D]: rows 0..C zero-shot, C..2C fine-tuned class features, normalised.
/// `image_ft` is `None` when the fine-tuned model shares the zero-shot image embeddings.
pub fn batch_logits(
    image_zs: ArrayView2<'_, f32>,
    image_ft: Option<ArrayView2<'_, f32>>,
    stacked_text: ArrayView2<'_, f32>,
    scales: LogitScales,
) -> BatchLogits {
    let classes = stacked_text.nrows() / 2;
    let text_zs = stacked_text.slice(s![..classes, ..]);
    let text_ft = stacked_text.slice(s![classes.., ..]);
    let (mut zero_shot, mut fine_tuned) = match image_ft {
        None => {
            let fused = similarities(image_zs, stacked_text);
            (fused.slice(s![.., ..classes]).to_owned(), fused.slice(s![.., classes..]).to_owned())
        }
        Some(image_ft) => (similarities(image_zs, text_zs), similarities(image_ft, text_ft)),
    };
    zero_shot.mapv_inplace(|cosine| cosine * scales.zero_shot);
    fine_tuned.mapv_inplace(|cosine| cosine * scales.fine_tuned);
    BatchLogits { zero_shot, fine_tuned }
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
    let mut by_row = vec![0f32; rows * batch];
    let threads =
        if rows * dim >= PARALLEL_ELEMENTS { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) } else { 1 };
    let rows_per_thread = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let mut chunks = by_row.chunks_mut(rows_per_thread * batch).zip(text_rows.chunks(rows_per_thread * dim));
        // The calling thread takes the first chunk itself.
        let first = chunks.next();
        for (out, text) in chunks {
            scope.spawn(move || row_dots(image_rows, dim, text, out));
        }
        if let Some((out, text)) = first {
            row_dots(image_rows, dim, text, out);
        }
    });
    let transposed = Array2::from_shape_vec((rows, batch), by_row).unwrap_or_else(|_| Array2::zeros((rows, batch)));
    transposed.reversed_axes().as_standard_layout().into_owned()
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

    /// The row-dot path (small batches, threads for large matrices) against the GEMM, on sizes
    /// that leave remainders everywhere (D not a multiple of 8, rows not a multiple of a block).
    #[test]
    fn row_dot_path_equals_the_matrix_product() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = |rows: usize, cols: usize| {
            Array2::from_shape_fn((rows, cols), |_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
        };
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
}
