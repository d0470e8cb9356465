//! The classifier: a bundle and its text-feature cache opened once, then any number of files or
//! already-decoded frames classified through decode → preprocess → encode → logits → calibrate →
//! decide. This is the library entry point; the CLI and a camera mode are thin layers on it.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array2, Array4, ArrayView1, Axis};

use crate::bundle::{Bundle, BundleError};
use crate::cache::{CacheError, CacheOpenOptions, ClassList, TextFeatureCache};
use crate::calibrate::{calibrate, top_k, Calibration, CalibrationError, CalibrationSettings};
use crate::decide::{decide, validate_threshold, Decision};
use crate::encode::{EncodeError, Encoder};
use crate::logits::{batch_logits, BatchLogits, LogitScales};
use crate::preprocess::{decode_file, preprocess_into, DecodeLimits, PreprocessConfig, PreprocessError};
use crate::runtime::{ChosenDevice, Runtime, RuntimeError, SessionOptions};

/// Cache metadata key holding a fitted temperature (written by `eval`).
pub const TEMPERATURE_KEY: &str = "ts_temperature";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("{path}: {source}")]
    Image { path: PathBuf, source: PreprocessError },
    #[error("frame {index}: {source}")]
    Frame { index: usize, source: PreprocessError },
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error("invalid option: {0}")]
    Option(String),
    /// The encoder run of the batch an image was in failed.
    #[error("{0}")]
    Batch(String),
}

/// How a [`Classifier`] is opened and what it decides.
#[derive(Debug, Clone)]
pub struct ClassifierOptions {
    /// `--ort-lib`: the ONNX Runtime library; `None` searches the default locations.
    pub ort_library: Option<PathBuf>,
    pub session: SessionOptions,
    /// The caller's calibration settings; unset fields come from the bundle's `[calibration]`,
    /// then from the paper's CAC defaults (see `CalibrationSettings::resolve`).
    pub calibration: CalibrationSettings,
    pub threshold: f64,
    pub top_k: usize,
    pub decode_limits: DecodeLimits,
    /// Images per encoder run.
    pub batch_size: usize,
    pub cache: CacheOpenOptions,
    /// Hash the image encoders against the manifest before loading them.
    pub verify_bundle_files: bool,
    /// When given, the cache must have been built for exactly this class list.
    pub expected_classes: Option<ClassList>,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        ClassifierOptions {
            ort_library: None,
            session: SessionOptions::default(),
            calibration: CalibrationSettings::default(),
            threshold: 0.8,
            top_k: 3,
            decode_limits: DecodeLimits::default(),
            batch_size: 8,
            cache: CacheOpenOptions::default(),
            verify_bundle_files: true,
            expected_classes: None,
        }
    }
}

/// One classified image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class: usize,
    pub label: String,
    pub is_base: bool,
    /// Calibrated confidence of `label`.
    pub confidence: f64,
    pub uncalibrated_confidence: f64,
    pub decision: Decision,
    /// Multiplier applied to the fine-tuned logits by the calibration.
    pub weight: f64,
    pub contrast: Option<f64>,
    /// The best classes, best first.
    pub top_k: Vec<RankedClass>,
}

/// One entry of a prediction's top-k.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedClass {
    pub class: usize,
    pub label: String,
    /// Calibrated confidence.
    pub confidence: f64,
}

pub struct Classifier {
    bundle: Bundle,
    cache: TextFeatureCache,
    image_zs: Encoder,
    image_ft: Option<Encoder>,
    preprocess: PreprocessConfig,
    calibration: Calibration,
    options: ClassifierOptions,
    _runtime: Arc<Runtime>,
}

impl Classifier {
    pub fn open(bundle_dir: &Path, cache_path: &Path, options: ClassifierOptions) -> Result<Classifier, PipelineError> {
        validate_threshold(options.threshold).map_err(PipelineError::Option)?;
        options.session.validate().map_err(PipelineError::Option)?;
        if options.batch_size == 0 {
            return Err(PipelineError::Option("batch size must be at least 1".into()));
        }
        let bundle = Bundle::open(bundle_dir)?;
        let cache = TextFeatureCache::open(cache_path, options.cache)?;
        cache.check_matches(&bundle, options.expected_classes.as_ref())?;
        let calibration = resolve_calibration(&options.calibration, &bundle, &cache)?;
        if options.verify_bundle_files {
            bundle.verify_files(bundle.runtime_file_names())?;
        }
        let runtime = Runtime::load(options.ort_library.as_deref())?;
        let preprocess = bundle.preprocess_config();
        let open_image = |path: &Path| {
            Encoder::open_image(&runtime, path, &options.session, preprocess.image_size, bundle.embed_dim())
        };
        let image_zs = open_image(&bundle.image_zs_path())?;
        let image_ft = bundle.image_ft_path().map(|path| open_image(&path)).transpose()?;
        Ok(Classifier { bundle, cache, image_zs, image_ft, preprocess, calibration, options, _runtime: runtime })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    pub fn cache(&self) -> &TextFeatureCache {
        &self.cache
    }

    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    pub fn threshold(&self) -> f64 {
        self.options.threshold
    }

    /// The execution provider the image encoder runs on.
    pub fn device(&self) -> &ChosenDevice {
        self.image_zs.device()
    }

    pub fn class_names(&self) -> &[String] {
        self.cache.class_names()
    }

    /// Classifies decoded RGB frames (a camera mode's entry point).
    pub fn classify_frames(&mut self, frames: &[RgbImage]) -> Result<Vec<Prediction>, PipelineError> {
        let logits = self.logits(frames)?;
        logits
            .fine_tuned
            .outer_iter()
            .zip(logits.zero_shot.outer_iter())
            .map(|(ft, zs)| self.predict(&row_slice(ft), &row_slice(zs)))
            .collect()
    }

    /// Zero-shot and fine-tuned logits of decoded RGB frames, before calibration (what `eval`
    /// needs to compare calibrators on the same forward passes).
    pub fn logits(&mut self, frames: &[RgbImage]) -> Result<BatchLogits, PipelineError> {
        let mut batches = Vec::new();
        for (chunk_index, chunk) in frames.chunks(self.options.batch_size).enumerate() {
            let pixels = self.preprocess_batch(chunk, chunk_index * self.options.batch_size)?;
            batches.push(self.logits_of_pixels(pixels)?);
        }
        match batches.len() {
            0 => {
                let classes = self.cache.num_classes();
                return Ok(BatchLogits { zero_shot: Array2::zeros((0, classes)), fine_tuned: Array2::zeros((0, classes)) });
            }
            // The common case (one batch, e.g. a camera frame) is returned without a copy.
            1 => return Ok(batches.remove(0)),
            _ => {}
        }
        let join = |pick: fn(&BatchLogits) -> &Array2<f32>| {
            let views: Vec<_> = batches.iter().map(|batch| pick(batch).view()).collect();
            ndarray::concatenate(Axis(0), &views)
                .map_err(|error| PipelineError::Batch(format!("logit rows disagree in length: {error}")))
        };
        Ok(BatchLogits { zero_shot: join(|batch| &batch.zero_shot)?, fine_tuned: join(|batch| &batch.fine_tuned)? })
    }

    /// Classifies image files, calling `report` once per path, in input order, as soon as each
    /// batch is done. A file that cannot be decoded is reported as an error and the rest go on.
    pub fn classify_files(&mut self, paths: &[PathBuf], mut report: impl FnMut(&Path, Result<Prediction, PipelineError>)) {
        for chunk in paths.chunks(self.options.batch_size) {
            let mut decoded: Vec<Result<RgbImage, PipelineError>> = chunk
                .iter()
                .map(|path| {
                    decode_file(path, &self.options.decode_limits)
                        .map_err(|source| PipelineError::Image { path: path.clone(), source })
                })
                .collect();
            let frames: Vec<RgbImage> = decoded.iter_mut().filter_map(|slot| take_ok(slot)).collect();
            let mut predictions = match self.classify_frames(&frames) {
                Ok(predictions) => predictions.into_iter().map(Ok).collect::<Vec<_>>(),
                // An encoder failure hits the whole batch: report it for each image in it.
                Err(error) => {
                    let message = error.to_string();
                    frames.iter().map(|_| Err(PipelineError::Batch(message.clone()))).collect()
                }
            }
            .into_iter();
            for (path, slot) in chunk.iter().zip(decoded) {
                match slot {
                    Err(error) => report(path, Err(error)),
                    Ok(_) => {
                        let missing = || Err(PipelineError::Batch("the encoder returned fewer rows than images".into()));
                        report(path, predictions.next().unwrap_or_else(missing))
                    }
                }
            }
        }
    }

    fn preprocess_batch(&self, frames: &[RgbImage], first_index: usize) -> Result<Array4<f32>, PipelineError> {
        let side = self.preprocess.image_size as usize;
        let mut pixels = Array4::<f32>::zeros((frames.len(), 3, side, side));
        for (slot, (frame, mut target)) in frames.iter().zip(pixels.outer_iter_mut()).enumerate() {
            // outer_iter_mut of a standard-layout array yields contiguous slices; an empty
            // fallback makes preprocess_into report a size error rather than panic.
            let out = target.as_slice_mut().unwrap_or_default();
            preprocess_into(frame, &self.preprocess, out)
                .map_err(|source| PipelineError::Frame { index: first_index + slot, source })?;
        }
        Ok(pixels)
    }

    fn logits_of_pixels(&mut self, pixels: Array4<f32>) -> Result<BatchLogits, PipelineError> {
        let image_zs = self.image_zs.encode_images(pixels.view())?;
        let image_ft: Option<Array2<f32>> = match self.image_ft.as_mut() {
            Some(encoder) => Some(encoder.encode_images(pixels.view())?),
            None => None,
        };
        let scales = LogitScales { zero_shot: self.cache.logit_scale_zs(), fine_tuned: self.cache.logit_scale_ft() };
        Ok(batch_logits(
            image_zs.view(),
            image_ft.as_ref().map(|embeds| embeds.view()),
            self.cache.stacked_text_features(),
            scales,
        ))
    }

    fn predict(&self, fine_tuned: &[f32], zero_shot: &[f32]) -> Result<Prediction, PipelineError> {
        let calibrated = calibrate(&self.calibration, fine_tuned, zero_shot, self.cache.dac_factors())?;
        let class = calibrated.predicted;
        let confidence = calibrated.probabilities[class];
        Ok(Prediction {
            class,
            label: self.cache.class_names()[class].clone(),
            is_base: self.cache.is_base(class),
            confidence,
            uncalibrated_confidence: calibrated.uncalibrated[class],
            decision: decide(confidence, self.options.threshold),
            weight: calibrated.weight,
            contrast: calibrated.contrast,
            top_k: top_k(fine_tuned, self.options.top_k)
                .into_iter()
                .map(|index| RankedClass {
                    class: index,
                    label: self.cache.class_names()[index].clone(),
                    confidence: calibrated.probabilities[index],
                })
                .collect(),
        })
    }
}

/// A logit row as a slice: rows of the owned, standard-layout logit matrices are contiguous,
/// so this borrows; the copy is only a fallback.
fn row_slice<'a>(row: ArrayView1<'a, f32>) -> Cow<'a, [f32]> {
    match row.to_slice() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(row.to_vec()),
    }
}

fn take_ok(slot: &mut Result<RgbImage, PipelineError>) -> Option<RgbImage> {
    match slot {
        Ok(image) => Some(std::mem::take(image)),
        Err(_) => None,
    }
}

/// The calibration in force: the caller's settings, else the bundle's, else the paper's CAC; a
/// TS temperature may also come from the cache (fitted by `eval`).
pub fn resolve_calibration(
    requested: &CalibrationSettings,
    bundle: &Bundle,
    cache: &TextFeatureCache,
) -> Result<Calibration, PipelineError> {
    let stored_temperature = cache.metadata().get(TEMPERATURE_KEY).and_then(|value| value.parse::<f64>().ok());
    requested
        .resolve(&bundle.manifest().calibration, stored_temperature)
        .map_err(|message| PipelineError::Option(format!("{message} (bundle {})", bundle.dir().display())))
}
