//! The classifier: a bundle and its text-feature cache opened once, then any number of files or
//! already-decoded frames classified through decode → preprocess → encode → logits → calibrate →
//! decide. This is the library entry point; the CLI and a camera mode are thin layers on it.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array2, Array4, ArrayView1, ArrayView4, Axis};

use crate::bundle::Precision;
use crate::bundle::{Bundle, BundleError};
use crate::cache::{CacheError, CacheOpenOptions, ClassList, TextFeatureCache};
use crate::calibrate::{calibrate, top_k, Calibration, CalibrationError, CalibrationMethod, CalibrationSettings};
use crate::calibration_path::{CalibrationPath, CALIBRATION_PATH_KEY};
use crate::decide::{decide, validate_threshold, Decision};
use crate::encode::{EncodeError, Encoder};
use crate::logits::{batch_logits, fine_tuned_logits, BatchLogits, LogitScales};
use crate::preprocess::{
    decode_file_with, preprocess_scaled_into, DecodeLimits, DecodeMode, Decoded, Geometry, PreprocessConfig, PreprocessError,
};
use crate::runtime::{ChosenDevice, Runtime, RuntimeError, SessionOptions};
use crate::stamp::VerificationStamp;
use crate::threshold::{self, Threshold};

/// Everything that can go wrong opening a [`Classifier`] or classifying with it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// ONNX Runtime could not be loaded or a session created.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The bundle is missing, invalid, or its files do not match their hashes.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The cache is missing, invalid, stale, or built for another bundle or class list.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// An encoder run failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// An image file could not be read or decoded.
    #[error("{path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: PreprocessError,
    },
    /// A decoded frame could not be preprocessed.
    #[error("frame {index}: {source}")]
    Frame {
        /// Its position among the frames given.
        index: usize,
        /// Why.
        #[source]
        source: PreprocessError,
    },
    /// The logits could not be calibrated (non-finite encoder output).
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    /// An option is out of range or contradicts another.
    #[error("invalid option: {0}")]
    Option(String),
    /// Under `strict`, the calibration stored in the cache was fitted on another inference path.
    #[error(
        "{cache}: its stored calibration ({stored}) was fitted by eval on another inference path: this run uses {differences}; \
         re-run eval on this path with --write-temperature/--write-threshold/--write-drift-baseline, or run the path it \
         was fitted on"
    )]
    CalibrationPathMismatch {
        /// The cache.
        cache: PathBuf,
        /// Which fitted values the cache holds.
        stored: String,
        /// What differs, in words.
        differences: String,
    },
    /// The encoder run of the batch an image was in failed.
    #[error("{0}")]
    Batch(String),
}

/// How a [`Classifier`] is opened and what it decides.
#[derive(Debug, Clone)]
pub struct ClassifierOptions {
    /// Execution provider, threads and GPU options of the encoder sessions.
    pub session: SessionOptions,
    /// The caller's calibration settings; unset fields come from the bundle's `[calibration]`,
    /// then from the paper's CAC defaults (see `CalibrationSettings::resolve`).
    pub calibration: CalibrationSettings,
    /// Accept a prediction at this calibrated confidence; `None`: the threshold `eval` stored in
    /// the cache for the calibration in force, else [`threshold::DEFAULT_THRESHOLD`].
    pub threshold: Option<f64>,
    /// How many classes each prediction ranks.
    pub top_k: usize,
    /// Limits on the files and frames decoded (size, pixels, memory).
    pub decode_limits: DecodeLimits,
    /// How JPEG files are decoded: `Exact` (default, open_clip parity) or `Scaled` (reduced DCT
    /// scale, faster on large frames; see [`DecodeMode`]).
    pub decode: DecodeMode,
    /// Images per encoder run.
    pub batch_size: usize,
    /// How the cache is opened (checksum verification).
    pub cache: CacheOpenOptions,
    /// Hash the image encoders against the manifest before loading them.
    pub verify_bundle_files: bool,
    /// Skip hashing the image encoders and the cache data when the verification stamp (in the
    /// user's or service's cache directory, [`crate::stamp`]) shows them unchanged since they
    /// were last verified; record what is hashed. Off: hash every start.
    pub use_verification_stamp: bool,
    /// Which image encoders run: the exported fp32 graphs or their int8 variants.
    pub precision: Precision,
    /// Refuse to open when the temperature, threshold or drift baseline stored in the cache
    /// were fitted on another inference path (precision, decoding, feature precision) than the
    /// one asked for; otherwise that is a warning ([`crate::calibration_path`]).
    pub strict: bool,
    /// When given, the cache must have been built for exactly this class list.
    pub expected_classes: Option<ClassList>,
    /// A bundle with its own fine-tuned image encoder: how its two image encoders share the
    /// CPU (concurrently by default).
    pub encoder_schedule: EncoderSchedule,
    /// A bundle with its own fine-tuned image encoder: run the zero-shot image encoder even
    /// under a calibration that does not read the zero-shot logits (none, TS, DAC skip it).
    /// `eval` sets it: it compares every calibration on the same passes.
    pub encode_both_images: bool,
}

/// How a bundle with its own fine-tuned image encoder (MaPLe, PromptSRC) runs its two image
/// encoders on a batch, when both run (CAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderSchedule {
    /// Both at once on two threads. Unless the intra-op threads are set, each session gets half
    /// the cores. Measured the fastest form on a 2-core CPU (BENCHMARKS.md), and more so where
    /// one image's run does not scale to every core.
    #[default]
    Concurrent,
    /// One after the other, each session with every core.
    Sequential,
}

impl std::str::FromStr for EncoderSchedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "concurrent" => Ok(EncoderSchedule::Concurrent),
            "sequential" => Ok(EncoderSchedule::Sequential),
            other => Err(format!("unknown encoder schedule '{other}' (expected concurrent or sequential)")),
        }
    }
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        ClassifierOptions {
            session: SessionOptions::default(),
            calibration: CalibrationSettings::default(),
            threshold: None,
            top_k: 3,
            decode_limits: DecodeLimits::default(),
            decode: DecodeMode::Exact,
            batch_size: 8,
            cache: CacheOpenOptions::default(),
            verify_bundle_files: true,
            use_verification_stamp: true,
            precision: Precision::Fp32,
            strict: false,
            expected_classes: None,
            encoder_schedule: EncoderSchedule::Concurrent,
            encode_both_images: false,
        }
    }
}

/// One classified image. Serialised as the fields of a JSON output line (see docs/FORMATS.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Index of the predicted class in the cache's class list.
    #[serde(skip)]
    pub class: usize,
    /// The predicted class name.
    pub label: String,
    /// Whether the predicted class is a base (trained) class or a new one added by name.
    #[serde(rename = "base")]
    pub is_base: bool,
    /// Calibrated confidence of `label`.
    pub confidence: f64,
    /// The fine-tuned model's own softmax confidence of `label`.
    pub uncalibrated_confidence: f64,
    /// Accept or abstain, against the threshold in force.
    pub decision: Decision,
    /// Multiplier applied to the fine-tuned logits by the calibration.
    pub weight: f64,
    /// CAC's contrast d(x), when CAC is the method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast: Option<f64>,
    /// The best classes, best first.
    pub top_k: Vec<RankedClass>,
}

/// One entry of a prediction's top-k.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RankedClass {
    /// Index in the cache's class list.
    #[serde(skip)]
    pub class: usize,
    /// The class name.
    pub label: String,
    /// Calibrated confidence.
    pub confidence: f64,
}

/// L2-normalised image embeddings of a batch, rows = images.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEmbeddings {
    /// The original CLIP image encoder's embeddings; no rows when the zero-shot image pass was
    /// skipped (a fine-tuned image encoder under a calibration that does not read them).
    pub zero_shot: Array2<f32>,
    /// The fine-tuned image encoder's embeddings; `None` when the bundle shares the zero-shot
    /// image encoder (CoOp-style prompt learning).
    pub fine_tuned: Option<Array2<f32>>,
}

/// A bundle and its cache, opened once; classifies frames and files.
pub struct Classifier {
    bundle: Bundle,
    cache: TextFeatureCache,
    encoders: ImageEncoders,
    preprocess: PreprocessConfig,
    calibration: Calibration,
    threshold: Threshold,
    options: ClassifierOptions,
    _runtime: Arc<Runtime>,
}

impl Classifier {
    /// Opens the bundle in `bundle_dir` and the text-feature cache at `cache_path` (checked
    /// against the bundle, and against `options.expected_classes` when given), and creates the
    /// image encoder sessions in `runtime`.
    pub fn open(
        runtime: &Arc<Runtime>,
        bundle_dir: &Path,
        cache_path: &Path,
        options: ClassifierOptions,
    ) -> Result<Classifier, PipelineError> {
        if let Some(threshold) = options.threshold {
            validate_threshold(threshold).map_err(PipelineError::Option)?;
        }
        options.session.validate()?;
        if options.batch_size == 0 {
            return Err(PipelineError::Option("batch size must be at least 1".into()));
        }
        let bundle = Bundle::open(bundle_dir)?;
        let preprocess = bundle.preprocess_config();
        let image_files = bundle.runtime_file_names(options.precision)?;
        let stamp = std::sync::Mutex::new(VerificationStamp::of_cache(cache_path));
        // Whether a batch runs both image encoders is known before the cache is read: only CAC
        // reads the zero-shot logits, and the method comes from the caller, else the bundle,
        // else the CAC default (the cache adds a temperature, never a method).
        let method = options.calibration.method.or(bundle.manifest().calibration.method).unwrap_or(CalibrationMethod::Cac);
        let runs_both = bundle.image_ft_path().is_some() && (options.encode_both_images || method == CalibrationMethod::Cac);
        // Checking the cache and hashing the encoder files read them whole; creating the
        // sessions reads and optimises the same encoders. Run side by side, start-up costs the
        // longer of the two instead of their sum. Errors are reported in the order of the
        // sequential checks (cache, bundle files, sessions), so the message names the real cause.
        let (checked, verified, opened) = std::thread::scope(|scope| {
            let checked = scope.spawn(|| open_checked_cache(cache_path, &bundle, &options, &stamp));
            let verified = scope.spawn(|| match (options.verify_bundle_files, options.use_verification_stamp) {
                (false, _) => Ok(()),
                (true, false) => bundle.verify_files(image_files.iter().copied()).map_err(PipelineError::from),
                (true, true) => bundle.verify_files_stamped(image_files.iter().copied(), &stamp).map_err(PipelineError::from),
            });
            let opened = open_image_encoders(runtime, &bundle, &options, preprocess.image_size, runs_both);
            let panicked = || PipelineError::Batch("a start-up check stopped unexpectedly".into());
            (checked.join().unwrap_or_else(|_| Err(panicked())), verified.join().unwrap_or_else(|_| Err(panicked())), opened)
        });
        let (cache, calibration, threshold) = checked?;
        verified?;
        let encoders = opened?;
        check_calibration_path(&bundle, &cache, &options)?;
        if options.use_verification_stamp {
            let mut stamp = stamp.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(error) = stamp.save() {
                let path = stamp.path().map_or_else(|| "(no cache directory)".into(), |path| path.display().to_string());
                tracing::debug!("cannot write the verification stamp {path} ({error}); the next start hashes again");
            }
        }
        let runtime = Arc::clone(runtime);
        if matches!(encoders, ImageEncoders::FineTunedOnly(_)) && calibration.reads_zero_shot_logits() {
            return Err(PipelineError::Option("internal: CAC without the zero-shot image encoder".into()));
        }
        Ok(Classifier { bundle, cache, encoders, preprocess, calibration, threshold, options, _runtime: runtime })
    }

    /// The bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The text-feature cache.
    pub fn cache(&self) -> &TextFeatureCache {
        &self.cache
    }

    /// The calibration in force.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// The decision threshold in force, and where it came from.
    pub fn threshold(&self) -> Threshold {
        self.threshold
    }

    /// The execution provider the image encoder runs on.
    pub fn device(&self) -> &ChosenDevice {
        match &self.encoders {
            ImageEncoders::Shared(encoder) | ImageEncoders::FineTunedOnly(encoder) => encoder.device(),
            ImageEncoders::Both { zero_shot, .. } => zero_shot.device(),
        }
    }

    /// The inference path this classifier runs, as `eval` records it beside what it fits.
    pub fn calibration_path(&self) -> Option<CalibrationPath> {
        calibration_path_of(&self.bundle, &self.cache, &self.options)
    }

    /// The image encoders' precision.
    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// The deployed class names, in cache order.
    pub fn class_names(&self) -> &[String] {
        self.cache.class_names()
    }

    /// Classifies one decoded RGB frame (a camera's entry point).
    pub fn classify_frame(&mut self, frame: &RgbImage) -> Result<Prediction, PipelineError> {
        let mut predictions = self.classify_frames(std::slice::from_ref(frame))?;
        predictions.pop().ok_or_else(|| PipelineError::Batch("the encoder returned no row".into()))
    }

    /// Classifies decoded RGB frames, in batches of the configured size (several cameras' frames
    /// share one encoder run).
    pub fn classify_frames(&mut self, frames: &[RgbImage]) -> Result<Vec<Prediction>, PipelineError> {
        let logits = self.logits(frames)?;
        self.predictions(&logits)
    }

    /// A prediction per row of a batch's logits.
    fn predictions(&self, logits: &BatchLogits) -> Result<Vec<Prediction>, PipelineError> {
        logits.rows().map(|(ft, zs)| self.predict(&row_slice(ft), &row_slice(zs))).collect()
    }

    /// Zero-shot and fine-tuned logits of decoded RGB frames, before calibration (what `eval`
    /// needs to compare calibrators on the same forward passes). With a fine-tuned image encoder
    /// the zero-shot logits have no rows unless the calibration reads them or
    /// [`ClassifierOptions::encode_both_images`] is set.
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
    ///
    /// Decoding and preprocessing of the next batch run on a second thread while the encoder
    /// works on the current one (at most one batch ahead, so memory stays bounded).
    /// `report` returns [`ControlFlow::Break`] to stop early (a closed output): the batch being
    /// reported is the last one encoded.
    pub fn classify_files(
        &mut self,
        paths: &[PathBuf],
        mut report: impl FnMut(&Path, Result<Prediction, PipelineError>) -> ControlFlow<()>,
    ) {
        let batch_size = self.options.batch_size;
        let decoding = self.file_decoding();
        let config = self.preprocess.clone();
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel::<PreparedBatch>(1);
            scope.spawn(move || {
                for (chunk_index, chunk) in paths.chunks(batch_size).enumerate() {
                    if sender.send(prepare_batch(chunk, chunk_index * batch_size, &decoding, &config)).is_err() {
                        break;
                    }
                }
            });
            // Leaving this loop drops the receiver, which ends the decoding thread at its next send.
            for (chunk, prepared) in paths.chunks(batch_size).zip(receiver) {
                let decoded = prepared.failures.iter().filter(|failure| failure.is_none()).count();
                let mut predictions = self.classify_prepared(prepared.pixels, decoded).into_iter();
                for (path, failure) in chunk.iter().zip(prepared.failures) {
                    let outcome = match failure {
                        Some(error) => Err(error),
                        None => predictions.next().unwrap_or_else(|| Err(PipelineError::Batch("missing row".into()))),
                    };
                    if report(path, outcome).is_break() {
                        return;
                    }
                }
            }
        });
    }

    /// Predictions for the `decoded` images of a batch, in order.
    fn classify_prepared(
        &mut self,
        pixels: Result<Array4<f32>, PipelineError>,
        decoded: usize,
    ) -> Vec<Result<Prediction, PipelineError>> {
        // A batch in which every image failed to decode has nothing to encode: running the
        // encoder on zero rows only makes ONNX Runtime log a shape error.
        if decoded == 0 {
            return Vec::new();
        }
        let outcome = pixels.and_then(|pixels| {
            let logits = self.logits_of_pixels(pixels)?;
            self.predictions(&logits)
        });
        let mut predictions: Vec<Result<Prediction, PipelineError>> = match outcome {
            Ok(predictions) => predictions.into_iter().map(Ok).collect(),
            // An encoder failure hits the whole batch: report it for each image in it.
            Err(error) => {
                let message = error.to_string();
                (0..decoded).map(|_| Err(PipelineError::Batch(message.clone()))).collect()
            }
        };
        predictions.resize_with(decoded, || Err(PipelineError::Batch("the encoder returned fewer rows than images".into())));
        predictions
    }

    fn preprocess_batch(&self, frames: &[RgbImage], first_index: usize) -> Result<Array4<f32>, PipelineError> {
        preprocess_frames(frames.iter().map(|frame| (frame, Geometry::full(frame))), &self.preprocess, first_index)
    }

    /// How this bundle's frames are preprocessed (a pipelined caller preprocesses the next batch
    /// on another thread while the encoder runs).
    #[cfg(feature = "serve")]
    pub(crate) fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// Classifies a ready `[N, 3, S, S]` tensor, preprocessed elsewhere.
    #[cfg(feature = "serve")]
    pub(crate) fn classify_pixels(&mut self, pixels: Array4<f32>) -> Result<Vec<Prediction>, PipelineError> {
        let logits = self.logits_of_pixels(pixels)?;
        self.predictions(&logits)
    }

    fn logits_of_pixels(&mut self, pixels: Array4<f32>) -> Result<BatchLogits, PipelineError> {
        let embeddings = self.encode_pixels(pixels.view())?;
        Ok(self.logits_of_embeddings(&embeddings))
    }

    /// Decodes and encodes one batch of files, before any class is involved (what `eval` stores
    /// so a report can be recomputed without the encoder). Per path: `None` if it was decoded —
    /// the embedding rows follow those paths in order — else why not.
    pub fn embed_files(
        &mut self,
        paths: &[PathBuf],
        first_index: usize,
    ) -> (Vec<Option<PipelineError>>, Result<ImageEmbeddings, PipelineError>) {
        let prepared = prepare_batch(paths, first_index, &self.file_decoding(), &self.preprocess);
        let embeddings = prepared.pixels.and_then(|pixels| self.encode_pixels(pixels.view()));
        (prepared.failures, embeddings)
    }

    /// The decode limits images are read with.
    pub fn decode_limits(&self) -> &DecodeLimits {
        &self.options.decode_limits
    }

    /// How JPEG files and frames are decoded.
    pub fn decode_mode(&self) -> DecodeMode {
        self.options.decode
    }

    fn file_decoding(&self) -> FileDecoding {
        FileDecoding {
            limits: self.options.decode_limits,
            mode: self.options.decode,
            side: self.preprocess.image_size,
            threads: decode_threads(),
        }
    }

    /// Images per encoder run.
    pub fn batch_size(&self) -> usize {
        self.options.batch_size
    }

    /// The image encoders' runs on a ready `[N, 3, S, S]` tensor (both encoders when the bundle
    /// has two and the calibration reads the zero-shot logits, as the schedule says; else the
    /// one the calibration needs): what `bench` times as the bare encoder.
    pub(crate) fn encode_pixels(&mut self, pixels: ArrayView4<'_, f32>) -> Result<ImageEmbeddings, PipelineError> {
        let (image_zs, image_ft) = match &mut self.encoders {
            ImageEncoders::Shared(encoder) => {
                return Ok(ImageEmbeddings { zero_shot: encoder.encode_images(pixels)?, fine_tuned: None });
            }
            ImageEncoders::FineTunedOnly(encoder) => {
                let fine_tuned = encoder.encode_images(pixels)?;
                let skipped = Array2::zeros((0, fine_tuned.ncols()));
                return Ok(ImageEmbeddings { zero_shot: skipped, fine_tuned: Some(fine_tuned) });
            }
            ImageEncoders::Both { zero_shot, fine_tuned } => (zero_shot, fine_tuned),
        };
        let (zero_shot, fine_tuned) = match self.options.encoder_schedule {
            EncoderSchedule::Sequential => (image_zs.encode_images(pixels), image_ft.encode_images(pixels)),
            EncoderSchedule::Concurrent => std::thread::scope(|scope| {
                let fine_tuned = scope.spawn(|| image_ft.encode_images(pixels));
                let zero_shot = image_zs.encode_images(pixels);
                let fine_tuned = fine_tuned.join().unwrap_or_else(|_| {
                    Err(crate::encode::EncodeError::Inference {
                        path: PathBuf::from("image_ft"),
                        message: "the fine-tuned image encoder's thread stopped unexpectedly".into(),
                    })
                });
                (zero_shot, fine_tuned)
            }),
        };
        Ok(ImageEmbeddings { zero_shot: zero_shot?, fine_tuned: Some(fine_tuned?) })
    }

    /// Logits of stored image embeddings against this classifier's cache.
    pub fn logits_of_embeddings(&self, embeddings: &ImageEmbeddings) -> BatchLogits {
        let scales = LogitScales { zero_shot: self.cache.logit_scale_zs(), fine_tuned: self.cache.logit_scale_ft() };
        if let (0, Some(fine_tuned)) = (embeddings.zero_shot.nrows(), embeddings.fine_tuned.as_ref()) {
            return fine_tuned_logits(fine_tuned.view(), self.cache.stacked_text_features(), scales.fine_tuned);
        }
        batch_logits(
            embeddings.zero_shot.view(),
            embeddings.fine_tuned.as_ref().map(|embeds| embeds.view()),
            self.cache.stacked_text_features(),
            scales,
        )
    }

    /// The step after the logits, for one image: calibrate, rank the top k, decide.
    pub fn predict(&self, fine_tuned: &[f32], zero_shot: &[f32]) -> Result<Prediction, PipelineError> {
        let calibrated = calibrate(&self.calibration, fine_tuned, zero_shot, self.cache.dac_factors())?;
        let class = calibrated.predicted;
        let confidence = calibrated.probabilities[class];
        Ok(Prediction {
            class,
            label: self.cache.class_names()[class].clone(),
            is_base: self.cache.is_base(class),
            confidence,
            uncalibrated_confidence: calibrated.uncalibrated[class],
            decision: decide(confidence, self.threshold.value),
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

/// The cache, checked against the bundle, with the calibration and threshold it implies.
fn open_checked_cache(
    cache_path: &Path,
    bundle: &Bundle,
    options: &ClassifierOptions,
    stamp: &std::sync::Mutex<VerificationStamp>,
) -> Result<(TextFeatureCache, Calibration, Threshold), PipelineError> {
    let cache = if options.cache.verify_checksum && options.use_verification_stamp {
        let cache = TextFeatureCache::open(cache_path, CacheOpenOptions { verify_checksum: false })?;
        let declared = cache.metadata().get("data_sha256").cloned().unwrap_or_default();
        let lock = || stamp.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if lock().is_verified(cache_path, &declared) {
            tracing::debug!("{}: unchanged since it was verified (stamp), not hashed", cache_path.display());
        } else {
            cache.verify_data()?;
            lock().record(cache_path, &declared);
        }
        cache
    } else {
        TextFeatureCache::open(cache_path, options.cache)?
    };
    cache.check_matches(bundle, options.expected_classes.as_ref())?;
    let calibration = resolve_calibration(&options.calibration, bundle, &cache)?;
    let threshold = threshold::resolve(options.threshold, &cache, &calibration);
    Ok((cache, calibration, threshold))
}

/// The inference path `options` asks for (precision, decoding, text-feature precision).
fn calibration_path_of(bundle: &Bundle, cache: &TextFeatureCache, options: &ClassifierOptions) -> Option<CalibrationPath> {
    CalibrationPath::of(bundle, options.precision, options.decode.name(), cache.feature_precision().name())
}

/// Warns (or, under `strict`, refuses) when the cache holds values `eval` fitted on another
/// inference path than the one about to run.
fn check_calibration_path(bundle: &Bundle, cache: &TextFeatureCache, options: &ClassifierOptions) -> Result<(), PipelineError> {
    let metadata = cache.metadata();
    let stored: Vec<&str> = crate::cache::EVAL_METADATA_KEYS
        .into_iter()
        .filter(|key| *key != CALIBRATION_PATH_KEY && metadata.contains_key(*key))
        .collect();
    if stored.is_empty() {
        return Ok(());
    }
    let fitted = CalibrationPath::stored(metadata.get(CALIBRATION_PATH_KEY), bundle);
    let running = calibration_path_of(bundle, cache, options);
    let differences = match (running, fitted) {
        (Some(running), Some(fitted)) => running.differences(&fitted),
        _ => vec!["a path the cache's record does not describe".to_string()],
    };
    if differences.is_empty() {
        return Ok(());
    }
    let error = PipelineError::CalibrationPathMismatch {
        cache: cache.path().to_path_buf(),
        stored: stored.join(", "),
        differences: differences.join(", "),
    };
    if options.strict {
        return Err(error);
    }
    tracing::warn!("{error} (--strict refuses this)");
    Ok(())
}

/// The image encoder sessions a classifier runs.
enum ImageEncoders {
    /// One image encoder shared by both models (CoOp, KgCoOp, ProGrad).
    Shared(Encoder),
    /// The bundle's own fine-tuned image encoder and the zero-shot one, for CAC (or `eval`).
    Both { zero_shot: Encoder, fine_tuned: Encoder },
    /// The fine-tuned image encoder alone: the calibration never reads the zero-shot logits,
    /// so the zero-shot session is not even created.
    FineTunedOnly(Encoder),
}

/// The image encoder sessions `runs_both` asks for (see [`ImageEncoders`]).
fn open_image_encoders(
    runtime: &Runtime,
    bundle: &Bundle,
    options: &ClassifierOptions,
    image_size: u32,
    runs_both: bool,
) -> Result<ImageEncoders, PipelineError> {
    let (zero_shot, fine_tuned) = bundle.image_encoder_names(options.precision)?;
    let per_image = bundle.is_batch_dependent(options.precision);
    let mut session = options.session.clone();
    if runs_both {
        if options.encoder_schedule == EncoderSchedule::Concurrent && session.intra_threads.is_none() {
            let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
            session.intra_threads = Some((cores / 2).max(1));
        }
        // Spinning threads of the session that just ran would hold the cores the other needs:
        // in turn, the two took 3.0x one encoder's time at batch 1 on a 2-core machine, 2.0x
        // without spinning (BENCHMARKS.md).
        session.intra_op_spinning = false;
    }
    let open = |name: &str| {
        let path = bundle.dir().join(name);
        let sha256 = bundle.declared_sha256(name);
        let encoder = Encoder::open_image_of(runtime, &path, sha256, &session, image_size, bundle.embed_dim())?;
        Ok::<_, PipelineError>(if per_image { encoder.one_image_per_run() } else { encoder })
    };
    Ok(match fine_tuned {
        None => ImageEncoders::Shared(open(zero_shot)?),
        Some(fine_tuned) if runs_both => ImageEncoders::Both { zero_shot: open(zero_shot)?, fine_tuned: open(fine_tuned)? },
        Some(fine_tuned) => ImageEncoders::FineTunedOnly(open(fine_tuned)?),
    })
}

/// A logit row as a slice: rows of the owned, standard-layout logit matrices are contiguous,
/// so this borrows; the copy is only a fallback.
pub fn row_slice<'a>(row: ArrayView1<'a, f32>) -> Cow<'a, [f32]> {
    match row.to_slice() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(row.to_vec()),
    }
}

/// A batch of files decoded and preprocessed off the encoder's thread.
struct PreparedBatch {
    /// Per path: `None` if decoded, else why not.
    failures: Vec<Option<PipelineError>>,
    /// The decoded images, preprocessed.
    pixels: Result<Array4<f32>, PipelineError>,
}

/// How the files of a batch are decoded.
struct FileDecoding {
    limits: DecodeLimits,
    mode: DecodeMode,
    /// The encoder's input side, which the scaled decode must not go below.
    side: u32,
    /// Threads decoding the files of one batch.
    threads: usize,
}

/// Threads that decode the files of a batch: half the cores, at least one. The batch is
/// decoded while the encoder runs the previous one on its own intra-op threads (by default as
/// many as there are cores), so taking every core would only make the two stages contend;
/// half keeps decoding ahead of the encoder when frames are large (a 12 MP JPEG takes about as
/// long as a ViT-B-32 run) and leaves a 2-core box with the one decoding thread it had.
fn decode_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}

fn prepare_batch(paths: &[PathBuf], first_index: usize, decoding: &FileDecoding, config: &PreprocessConfig) -> PreparedBatch {
    let decoded = decode_files(paths, decoding);
    let mut frames = Vec::with_capacity(paths.len());
    let failures = paths
        .iter()
        .zip(decoded)
        .map(|(path, result)| match result {
            Ok(frame) => {
                frames.push(frame);
                None
            }
            Err(source) => Some(PipelineError::Image { path: path.clone(), source }),
        })
        .collect();
    let pixels = preprocess_frames(frames.iter().map(|frame: &Decoded| (&frame.rgb, frame.geometry)), config, first_index);
    PreparedBatch { failures, pixels }
}

/// Decodes `paths` in order, split into contiguous runs over up to `decoding.threads` threads.
fn decode_files(paths: &[PathBuf], decoding: &FileDecoding) -> Vec<Result<Decoded, PreprocessError>> {
    let decode = |path: &PathBuf| decode_file_with(path, &decoding.limits, decoding.mode, decoding.side);
    let threads = decoding.threads.min(paths.len());
    if threads <= 1 {
        return paths.iter().map(decode).collect();
    }
    let run = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(run)
            .map(|part| (part.len(), scope.spawn(move || part.iter().map(decode).collect::<Vec<_>>())))
            .collect();
        handles
            .into_iter()
            .flat_map(|(len, handle)| {
                // A decoder panic loses that run's images, reported as errors, not the batch.
                handle.join().unwrap_or_else(|_| (0..len).map(|_| Err(decoder_panicked())).collect())
            })
            .collect()
    })
}

fn decoder_panicked() -> PreprocessError {
    PreprocessError::Decode("the decoder stopped unexpectedly (a bug: please report the file)".into())
}

/// Preprocesses frames (pixels, and the geometry of the image they were decoded from) into one
/// zeroed `[N, 3, S, S]` tensor, filled frame by frame; an error names the frame by
/// `first_index` + its position.
pub(crate) fn preprocess_frames<'a>(
    frames: impl ExactSizeIterator<Item = (&'a RgbImage, Geometry)>,
    config: &PreprocessConfig,
    first_index: usize,
) -> Result<Array4<f32>, PipelineError> {
    let side = config.image_size as usize;
    let mut pixels = Array4::<f32>::zeros((frames.len(), 3, side, side));
    for (slot, ((frame, geometry), mut target)) in frames.zip(pixels.outer_iter_mut()).enumerate() {
        // outer_iter_mut of a standard-layout array yields contiguous slices; an empty
        // fallback makes preprocess_into report a size error rather than panic.
        let out = target.as_slice_mut().unwrap_or_default();
        preprocess_scaled_into(frame, geometry, config, out)
            .map_err(|source| PipelineError::Frame { index: first_index + slot, source })?;
    }
    Ok(pixels)
}

/// The calibration in force: the caller's settings, else the bundle's, else the paper's CAC; a
/// TS temperature may also come from the cache (fitted by `eval`).
pub fn resolve_calibration(
    requested: &CalibrationSettings,
    bundle: &Bundle,
    cache: &TextFeatureCache,
) -> Result<Calibration, PipelineError> {
    requested
        .resolve(&bundle.manifest().calibration, cache.stored_temperature())
        .map_err(|message| PipelineError::Option(format!("{message} (bundle {})", bundle.dir().display())))
}
