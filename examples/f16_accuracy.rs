//! What f16 text features change at many classes: the largest change of any calibrated
//! probability (every class, every calibration `classify` offers) between an f32 and an f16 copy
//! of the same synthetic features.
//!
//! The class features are random and L2-normalised (as in `benches/logits_cac.rs`); the images
//! are "random-ish": each is a class's zero-shot feature plus noise of a varying strength, so
//! their top cosines range from near 1 (one confident class) to those of a random vector (a flat
//! distribution), with the fine-tuned features a noisy copy of the zero-shot ones so that CAC's
//! contrast is not trivially zero. DAC factors are drawn in [0.8, 1.2].
//!
//! Run: `cargo run --release --example f16_accuracy [-- --classes N --images N]` (defaults:
//! 100 000 classes, 64 images; about 1.2 GB of memory at the default size).

use cac_edge::calibrate::{calibrate, CacParams, Calibration, ContrastDistance};
use cac_edge::logits::{batch_logits, BatchLogits, LogitScales};
use half::f16;
use ndarray::{concatenate, Array2, Axis};

#[path = "../benches/common/mod.rs"]
mod common;

use common::{normalised_rows, XorShift, EMBED_DIM, IMAGE_SEED, LOGIT_SCALE, TEXT_SEED};

fn main() {
    let (classes, images) = match parse_args() {
        Ok(sizes) => sizes,
        Err(message) => {
            eprintln!("f16_accuracy: {message}");
            std::process::exit(2);
        }
    };
    let zero_shot = normalised_rows(classes, EMBED_DIM, TEXT_SEED);
    let fine_tuned = normalise(&zero_shot + &(normalised_rows(classes, EMBED_DIM, TEXT_SEED + 1) * 0.6));
    let stacked = concatenate(Axis(0), &[zero_shot.view(), fine_tuned.view()]).expect("same width");
    let stacked_f16 = stacked.mapv(f16::from_f32);
    let image_features = random_ish_images(&zero_shot, images);
    let mut random = XorShift::new(IMAGE_SEED + 7);
    let factors: Vec<f32> = (0..classes).map(|_| 1.0 + 0.2 * random.next_signed()).collect();

    let scales = LogitScales { zero_shot: LOGIT_SCALE, fine_tuned: LOGIT_SCALE };
    let single = batch_logits(image_features.view(), None, stacked.view(), scales);
    let half = batch_logits(image_features.view(), None, stacked_f16.view(), scales);
    let logit_change = max_abs(&single.fine_tuned, &half.fine_tuned).max(max_abs(&single.zero_shot, &half.zero_shot));
    println!("{classes} classes, {images} images, D = {EMBED_DIM}: max |Δ logit| {logit_change:.3e}");
    let top: Vec<f64> = (0..images).map(|image| top_probability(&single, image, &factors)).collect();
    println!(
        "uncalibrated top probability of the images: min {:.3}, median {:.3}, max {:.3}",
        top.iter().cloned().fold(f64::INFINITY, f64::min),
        median(&top),
        top.iter().cloned().fold(0.0, f64::max)
    );
    for calibration in calibrations() {
        let (change, labels) = probability_change(&calibration, &single, &half, &factors);
        println!("{:>10}: max |Δ calibrated probability| {change:.3e}, labels changed {labels}", label(&calibration));
    }
}

fn parse_args() -> Result<(usize, usize), String> {
    let (mut classes, mut images) = (100_000, 64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let number: usize = value.parse().map_err(|_| format!("{arg}: not a count: {value}"))?;
        match arg.as_str() {
            "--classes" if number >= 2 => classes = number,
            "--images" if number >= 1 => images = number,
            _ => return Err(format!("unknown option or too small a value: {arg} {value}")),
        }
    }
    Ok((classes, images))
}

fn normalise(mut rows: Array2<f32>) -> Array2<f32> {
    for mut row in rows.rows_mut() {
        let norm = row.dot(&row).sqrt().max(f32::MIN_POSITIVE);
        row.mapv_inplace(|value| value / norm);
    }
    rows
}

/// Image i: class (i · 7919 mod C)'s zero-shot feature plus noise of strength growing with i
/// (0.2 … 4), normalised.
fn random_ish_images(zero_shot: &Array2<f32>, images: usize) -> Array2<f32> {
    let noise = normalised_rows(images, EMBED_DIM, IMAGE_SEED);
    let mut rows = Array2::zeros((images, EMBED_DIM));
    for (image, mut row) in rows.rows_mut().into_iter().enumerate() {
        let class = image * 7919 % zero_shot.nrows();
        let strength = 0.2 + 3.8 * image as f32 / images.max(2) as f32;
        row.assign(&(&zero_shot.row(class) + &(&noise.row(image) * strength)));
    }
    normalise(rows)
}

fn calibrations() -> Vec<Calibration> {
    let mut probs = CacParams::paper_defaults();
    probs.distance = ContrastDistance::Probs;
    vec![
        Calibration::None,
        Calibration::Ts { temperature: 1.7 },
        Calibration::Dac,
        Calibration::Cac(CacParams::paper_defaults()),
        Calibration::Cac(probs),
    ]
}

fn label(calibration: &Calibration) -> String {
    match calibration {
        Calibration::Cac(params) if params.distance == ContrastDistance::Probs => "cac/probs".into(),
        other => other.name().into(),
    }
}

fn rows(logits: &BatchLogits, image: usize) -> (&[f32], &[f32]) {
    let ft = logits.fine_tuned.row(image).to_slice().expect("standard layout");
    let zs = logits.zero_shot.row(image).to_slice().expect("standard layout");
    (ft, zs)
}

fn top_probability(logits: &BatchLogits, image: usize, factors: &[f32]) -> f64 {
    let (ft, zs) = rows(logits, image);
    let calibrated = calibrate(&Calibration::None, ft, zs, factors).expect("finite logits");
    calibrated.probabilities[calibrated.predicted]
}

/// The largest |Δ| of any class's calibrated probability of any image, and the images whose
/// predicted class changed.
fn probability_change(calibration: &Calibration, a: &BatchLogits, b: &BatchLogits, factors: &[f32]) -> (f64, usize) {
    let (mut worst, mut labels) = (0f64, 0);
    for image in 0..a.fine_tuned.nrows() {
        let (ft, zs) = rows(a, image);
        let x = calibrate(calibration, ft, zs, factors).expect("finite logits");
        let (ft, zs) = rows(b, image);
        let y = calibrate(calibration, ft, zs, factors).expect("finite logits");
        labels += usize::from(x.predicted != y.predicted);
        worst = x.probabilities.iter().zip(&y.probabilities).fold(worst, |worst, (p, q)| worst.max((p - q).abs()));
    }
    (worst, labels)
}

fn max_abs(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    a.iter().zip(b).fold(0f64, |worst, (x, y)| worst.max(f64::from((x - y).abs())))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
