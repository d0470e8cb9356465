//! Logits: cosine similarities of image embeddings with the cached class text features, times
//! each model's logit scale.
//!
//! The cache stores the zero-shot and fine-tuned text features stacked as one [2C, D] matrix, so
//! when both models share the image encoder (CoOp-style, the common case) both logit vectors come
//! from ONE matrix product `F · [T_zs; T_ft]ᵀ`; that is what makes CAC free at run time. A
//! fine-tuned model with its own image encoder (MaPLe-style) needs two products.

use ndarray::{s, Array2, ArrayView2};

/// Logits of a batch: rows are images, columns classes.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLogits {
    pub zero_shot: Array2<f32>,
    pub fine_tuned: Array2<f32>,
}

/// Logit scales of the two models (CLIP's exp(logit_scale), usually 100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitScales {
    pub zero_shot: f32,
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
            let fused = image_zs.dot(&stacked_text.t());
            (fused.slice(s![.., ..classes]).to_owned(), fused.slice(s![.., classes..]).to_owned())
        }
        Some(image_ft) => (image_zs.dot(&text_zs.t()), image_ft.dot(&text_ft.t())),
    };
    zero_shot.mapv_inplace(|cosine| cosine * scales.zero_shot);
    fine_tuned.mapv_inplace(|cosine| cosine * scales.fine_tuned);
    BatchLogits { zero_shot, fine_tuned }
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
}
