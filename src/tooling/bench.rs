//! The benchmark harness behind `cac-edge bench`: latency and throughput of the bare image
//! encoder and of the full pipeline under each calibration, on real image files.
//!
//! What is measured, at each batch size B (every number is per image: batch time ÷ B):
//!
//! * `encoder` (a): the image encoder run on a ready, preprocessed `[B, 3, S, S]` tensor, through
//!   the pipeline's own ONNX Runtime session ([`crate::encode::Encoder::encode_images`]: `session.run` plus the
//!   extraction and L2 normalisation of the `[B, D]` output; with a fine-tuned image encoder,
//!   both runs).
//!   With a fine-tuned image encoder (MaPLe, PromptSRC) the uncalibrated pipeline runs that
//!   encoder alone, so (a) is the fine-tuned encoder alone and `encoder_cac` (a′) the two
//!   encoders as CAC runs them (concurrently or in turn, `--encoder-schedule`); `(c)/(b)` is then
//!   the whole price of calibration, the zero-shot pass included.
//! * `pipeline.none` (b), `pipeline.cac` (c), `pipeline.dac`, `pipeline.ts` (d): one
//!   [`Classifier::classify_files`] call on B image paths (decode → preprocess → encode → logits →
//!   calibrate → decide), timed from call to return. One classifier per calibration, all opened
//!   with the same options. TS uses the temperature stored in the cache by `eval`, else the
//!   bundle's, else the fixed [`DEFAULT_TS_TEMPERATURE`] (it only matters for timing).
//! * `stream.none`, `stream.cac`: throughput as `cac-edge classify` gets it on a folder: ONE
//!   `classify_files` call over the whole image list, whose second thread decodes the next batch
//!   while the encoder runs (one sample per round: pass time ÷ images).
//! * `breakdown`: the non-encoder stages in isolation with the library functions the pipeline
//!   calls: `decode` ([`decode_file_with`], in the mode asked), `preprocess` (the pipeline's own batch preprocessing: a zeroed tensor filled by
//!   [`crate::preprocess::preprocess_into`]), `logits` ([`Classifier::logits_of_embeddings`] on the batch's
//!   embeddings) and `calibrate.<method>` (per image: [`Classifier::predict`], what the pipeline
//!   does to turn a logit row into a [`crate::Prediction`]: calibrate, top k, decide).
//!
//! Rounds: every round runs every variant once over the whole image list (cycled to a multiple of
//! B), the variants round-robin with the starting one rotated each round, so that drift on a
//! noisy machine hits all of them alike. Warm-up rounds are run first and discarded. Statistics
//! per variant: median, p90 (linear interpolation, numpy's default), mean and minimum of the
//! per-image latency, and images/s = 1 / median. Ratios compare medians of the same run.
//!
//! No global state: everything lives in the classifiers opened by [`run_bench`] (ONNX Runtime
//! itself is loaded once per process, see [`crate::runtime`]).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array4;
use serde::Serialize;

use crate::bundle::Precision;
use crate::calibrate::{Calibration, CalibrationMethod, CalibrationSettings};
use crate::logits::BatchLogits;
use crate::pipeline::{
    preprocess_frames, row_slice, Classifier, ClassifierOptions, EncoderSchedule, ImageEmbeddings, PipelineError,
};
use crate::preprocess::{decode_file_with, DecodeLimits, DecodeMode, Decoded, PreprocessConfig, PreprocessError};
use crate::runtime::Runtime;

/// TS temperature used when the cache holds none (timing only: the value changes no work).
pub const DEFAULT_TS_TEMPERATURE: f64 = 1.5;

/// The calibrations timed through the full pipeline, in report order.
pub const CALIBRATIONS: [&str; 4] = ["none", "cac", "dac", "ts"];

/// Index of CAC in [`CALIBRATIONS`].
const CAC: usize = 1;

/// The calibrations also timed streaming (indices into [`CALIBRATIONS`]): none and cac.
const STREAMED: [usize; 2] = [0, 1];

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Opening a classifier or running the pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The options or the images leave nothing to measure (no images, a batch size of 0, ...).
    #[error("{0}")]
    Setup(String),
}

/// How [`run_bench`] runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// What every classifier is opened with (ONNX Runtime library, session, decode limits,
    /// verification…); `calibration` and `batch_size` are set by the harness.
    pub classifier: ClassifierOptions,
    /// Images per encoder run, e.g. `[1, 32]`.
    pub batch_sizes: Vec<usize>,
    /// Measured rounds (each runs every variant over the whole image list).
    pub rounds: usize,
    /// Rounds run first and discarded.
    pub warmup_rounds: usize,
    /// Keep every per-image latency in the report ([`BatchResult::samples`]), e.g. to merge runs.
    pub keep_samples: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            classifier: ClassifierOptions::default(),
            batch_sizes: vec![1, 32],
            rounds: 5,
            warmup_rounds: 1,
            keep_samples: false,
        }
    }
}

/// Everything one benchmark run measured, with what it ran on.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Always "cac-edge".
    pub tool: &'static str,
    /// The cac-edge version that ran it.
    pub tool_version: &'static str,
    /// The machine and ONNX Runtime it ran on.
    pub machine: MachineInfo,
    /// The bundle benchmarked.
    pub bundle: BundleInfo,
    /// The text-feature cache used.
    pub cache: CacheInfo,
    /// The images given, used and skipped.
    pub images: ImageSetInfo,
    /// The batch sizes, rounds and threads it ran with.
    pub settings: BenchSettings,
    /// The calibrations timed, as resolved (method and parameters).
    pub calibrations: Vec<Calibration>,
    /// Where TS's temperature came from: "cache" (fitted by `eval`), "bundle" or "fixed"
    /// ([`DEFAULT_TS_TEMPERATURE`]).
    pub ts_temperature_source: &'static str,
    /// One result per batch size, in the order given.
    pub results: Vec<BatchResult>,
}

/// The machine a benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// From /proc/cpuinfo ("model name", else "Hardware"/"Model"), else the device tree.
    pub cpu_model: Option<String>,
    /// Logical CPUs available to this process.
    pub logical_cores: usize,
    /// CPU architecture, as Rust names it (`x86_64`, `aarch64`, ...).
    pub arch: &'static str,
    /// Operating system, as Rust names it (`linux`, `macos`, ...).
    pub os: &'static str,
    /// The ONNX Runtime library's version, when it reports one.
    pub onnxruntime_version: Option<String>,
    /// The ONNX Runtime library loaded.
    pub onnxruntime_library: String,
    /// Execution provider of the image encoder: cpu, cuda or tensorrt.
    pub device: &'static str,
    /// Why `auto` fell back from a GPU provider, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_note: Option<String>,
}

/// The bundle a benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct BundleInfo {
    /// The bundle directory.
    pub dir: String,
    /// The manifest's `name`.
    pub name: String,
    /// S: the encoder's input side, in pixels.
    pub image_size: u32,
    /// D: the embedding width.
    pub embed_dim: usize,
    /// The bundle has its own fine-tuned image encoder (two encoder runs per batch).
    pub fine_tuned_image_encoder: bool,
    /// The precision of the image encoders every pipeline variant ran.
    pub precision: Precision,
    /// The bundle's other precisions, whose encoders were timed beside (a) in the same rounds.
    pub other_precisions: Vec<Precision>,
}

/// The text-feature cache a benchmark used.
#[derive(Debug, Clone, Serialize)]
pub struct CacheInfo {
    /// The cache file.
    pub path: String,
    /// Number of classes (C).
    pub classes: usize,
    /// How many of them are base classes.
    pub base_classes: usize,
}

/// The images a benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSetInfo {
    /// Image files given (after expanding folders).
    pub given: usize,
    /// Decoded and used.
    pub used: usize,
    /// Files that could not be decoded, with why (left out of every measurement).
    pub skipped: Vec<SkippedImage>,
    /// Mean width × height of the used images, in pixels.
    pub mean_pixels: f64,
}

/// An image left out of the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedImage {
    /// The file.
    pub path: String,
    /// Why it could not be decoded.
    pub error: String,
}

/// The settings a benchmark ran with.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSettings {
    /// Images per encoder run, one result each.
    pub batch_sizes: Vec<usize>,
    /// Measured rounds.
    pub rounds: usize,
    /// Rounds run first and discarded.
    pub warmup_rounds: usize,
    /// Intra-op threads; `None`: ONNX Runtime's default.
    pub threads: Option<usize>,
    /// How JPEGs were decoded (`exact` or `scaled`), in every variant that decodes.
    pub decode: DecodeMode,
    /// How two image encoders share the CPU under CAC (bundles with a fine-tuned image encoder).
    pub encoder_schedule: EncoderSchedule,
}

/// How the benchmark decodes files: as the classifiers do.
struct ImageDecoding {
    limits: DecodeLimits,
    mode: DecodeMode,
    side: u32,
}

impl ImageDecoding {
    fn decode(&self, path: &Path) -> Result<Decoded, PreprocessError> {
        decode_file_with(path, &self.limits, self.mode, self.side)
    }
}

/// Statistics of one variant's per-image latencies, in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    /// Number of batches timed (each gives one per-image latency: batch time ÷ B).
    pub samples: usize,
    /// Median, in seconds.
    pub median_s: f64,
    /// 90th percentile, in seconds.
    pub p90_s: f64,
    /// Mean, in seconds.
    pub mean_s: f64,
    /// Minimum, in seconds.
    pub min_s: f64,
    /// 1 / median_s.
    pub images_per_s: f64,
}

/// The full pipeline under each calibration.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineTimings {
    /// Uncalibrated: (b).
    pub none: Timing,
    /// CAC: (c).
    pub cac: Timing,
    /// DAC: (d).
    pub dac: Timing,
    /// Temperature scaling: (d).
    pub ts: Timing,
}

/// The full pipeline streaming: ONE `classify_files` call over the whole pass (many batches), as
/// `cac-edge classify` runs on a folder, so decoding the next batch overlaps encoding this one.
/// One sample per round (pass time ÷ images); its `images_per_s` is the throughput.
#[derive(Debug, Clone, Serialize)]
pub struct StreamTimings {
    /// Uncalibrated.
    pub none: Timing,
    /// CAC.
    pub cac: Timing,
}

/// Calibration (with top-k and the decision) per image, per method.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrateTimings {
    /// Uncalibrated.
    pub none: Timing,
    /// CAC.
    pub cac: Timing,
    /// DAC.
    pub dac: Timing,
    /// Temperature scaling.
    pub ts: Timing,
}

/// The non-encoder stages, each timed in isolation, per image.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    /// Decoding an image file to RGB.
    pub decode: Timing,
    /// Resizing, cropping and normalising into the batch tensor.
    pub preprocess: Timing,
    /// Logits from the batch's embeddings.
    pub logits: Timing,
    /// Calibration, top k and the decision, per method.
    pub calibrate: CalibrateTimings,
}

/// Ratios of medians from the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// (b) / (a): full pipeline without calibration over the bare encoder.
    pub pipeline_over_encoder: f64,
    /// Per other precision: (a) / its encoder time, the speed-up over the precision that ran.
    pub encoder_speedup: BTreeMap<String, f64>,
    /// (c) / (b): CAC's overhead on the full pipeline.
    pub cac_over_none: f64,
    /// (a′) / (a), only for a bundle with a fine-tuned image encoder: the zero-shot pass's price
    /// on the bare encoders.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cac_encoders_over_encoder: Option<f64>,
    /// 1 + (calibrate.cac − calibrate.none) / (b): the same overhead from the isolated
    /// calibration stage, far less exposed to machine noise than two end-to-end medians.
    pub cac_over_none_from_stages: f64,
    /// pipeline.dac / (b): DAC's overhead on the full pipeline.
    pub dac_over_none: f64,
    /// pipeline.ts / (b): temperature scaling's overhead on the full pipeline.
    pub ts_over_none: f64,
}

/// Everything measured at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BatchResult {
    /// B: images per encoder run.
    pub batch_size: usize,
    /// Batches per round (the image list cycled to a multiple of the batch size).
    pub batches_per_round: usize,
    /// (a): the encoder(s) the uncalibrated pipeline runs.
    pub encoder: Timing,
    /// (a′), only for a bundle with a fine-tuned image encoder: both image encoders, as the CAC
    /// pipeline runs them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_cac: Option<Timing>,
    /// (a) with the bundle's other image-encoder precisions, same tensors, same rounds.
    pub encoder_by_precision: BTreeMap<String, Timing>,
    /// (b) none, (c) cac, (d) dac and ts.
    pub pipeline: PipelineTimings,
    /// Throughput of `classify` over many files: none and cac.
    pub stream: StreamTimings,
    /// The non-encoder stages in isolation.
    pub breakdown: Breakdown,
    /// decode + preprocess + logits + calibrate.cac medians: the non-encoder time of a CAC image.
    pub non_encoder_per_image_s: f64,
    /// median pipeline.cac − median encoder: the same, seen from the end-to-end numbers.
    pub pipeline_minus_encoder_s: f64,
    /// Ratios of this batch size's medians.
    pub ratios: Ratios,
    /// With [`BenchOptions::keep_samples`]: every per-image latency (seconds) of the measured
    /// rounds by variant name ("encoder", "pipeline.none", "stream.cac", "decode", "calibrate.ts"…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<BTreeMap<String, Vec<f64>>>,
}

/// The variants of one round, in their base order (rotated by one every round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Encoder,
    /// The image encoders as the CAC classifier runs them (a bundle with a fine-tuned image
    /// encoder only): (a′).
    CacEncoders,
    /// The encoder of another precision (index into the extra classifiers).
    OtherEncoder(usize),
    Pipeline(usize),
    /// One `classify_files` call over the whole pass (index into [`STREAMED`]).
    Stream(usize),
    Decode,
    Preprocess,
    Logits,
    Calibrate(usize),
}

impl Variant {
    /// The variant's name in [`BatchResult::samples`] (the report's field path).
    fn name(self) -> String {
        match self {
            Variant::Encoder => "encoder".into(),
            Variant::CacEncoders => "encoder_cac".into(),
            Variant::OtherEncoder(other) => format!("encoder.{other}"),
            Variant::Pipeline(method) => format!("pipeline.{}", CALIBRATIONS[method]),
            Variant::Stream(streamed) => format!("stream.{}", CALIBRATIONS[STREAMED[streamed]]),
            Variant::Decode => "decode".into(),
            Variant::Preprocess => "preprocess".into(),
            Variant::Logits => "logits".into(),
            Variant::Calibrate(method) => format!("calibrate.{}", CALIBRATIONS[method]),
        }
    }
}

fn variants(other_precisions: usize, fine_tuned_image_encoder: bool) -> Vec<Variant> {
    let mut all = vec![Variant::Encoder];
    if fine_tuned_image_encoder {
        all.push(Variant::CacEncoders);
    }
    all.extend((0..other_precisions).map(Variant::OtherEncoder));
    all.extend((0..CALIBRATIONS.len()).map(Variant::Pipeline));
    all.extend((0..STREAMED.len()).map(Variant::Stream));
    all.extend([Variant::Decode, Variant::Preprocess, Variant::Logits]);
    all.extend((0..CALIBRATIONS.len()).map(Variant::Calibrate));
    all
}

/// One batch size's inputs, prepared once.
struct Prepared {
    batch_size: usize,
    /// Per batch: indices into the used images.
    batches: Vec<Vec<usize>>,
    /// Per batch: the image paths.
    paths: Vec<Vec<PathBuf>>,
    /// Per batch: the ready encoder input.
    pixels: Vec<Array4<f32>>,
    /// Per batch: the image embeddings (for the logits stage).
    embeddings: Vec<ImageEmbeddings>,
    /// Per batch: the logits (for the calibration stage).
    logits: Vec<BatchLogits>,
    /// Per variant (index in `variants()`): per-image latencies of the measured rounds.
    samples: Vec<Vec<f64>>,
}

/// Opens one classifier per calibration on `bundle_dir` and `cache_path`, decodes `images`, runs
/// the rounds and returns every number. `progress` receives one line per round (for stderr).
pub fn run_bench(
    runtime: &Arc<Runtime>,
    bundle_dir: &Path,
    cache_path: &Path,
    images: &[PathBuf],
    options: &BenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport, BenchError> {
    if images.is_empty() {
        return Err(BenchError::Setup("no images to benchmark".into()));
    }
    if options.batch_sizes.is_empty() || options.batch_sizes.contains(&0) {
        return Err(BenchError::Setup("batch sizes must be at least 1".into()));
    }
    if options.rounds == 0 {
        return Err(BenchError::Setup("at least one measured round is needed".into()));
    }
    let max_batch = options.batch_sizes.iter().copied().max().unwrap_or(1);

    // One classifier per calibration. The first one verifies the bundle and the cache (if asked);
    // the others reuse what it checked.
    let open = |method: &str, temperature: Option<f64>, first: bool| -> Result<Classifier, PipelineError> {
        let mut classifier_options = options.classifier.clone();
        classifier_options.batch_size = max_batch;
        let method = method.parse().map_err(PipelineError::Option)?;
        classifier_options.calibration = CalibrationSettings { temperature, ..CalibrationSettings::method(method) };
        if !first {
            classifier_options.verify_bundle_files = false;
            classifier_options.cache.verify_checksum = false;
        }
        Classifier::open(runtime, bundle_dir, cache_path, classifier_options)
    };
    progress("opening the bundle, the cache and one classifier per calibration");
    let first = open(CALIBRATIONS[0], None, true)?;
    let stored_temperature = first.cache().stored_temperature();
    let mut classifiers = vec![first];
    let mut ts_temperature_source = "cache";
    for method in &CALIBRATIONS[1..] {
        let classifier = match open(method, None, false) {
            // TS without a temperature in the cache or the bundle: a fixed one (refused before
            // any session is created, so trying costs nothing).
            Err(PipelineError::Option(_)) if *method == "ts" => {
                ts_temperature_source = "fixed";
                open(method, Some(DEFAULT_TS_TEMPERATURE), false)?
            }
            other => other?,
        };
        if let Calibration::Ts { temperature } = classifier.calibration() {
            if ts_temperature_source != "fixed" && Some(*temperature) != stored_temperature {
                ts_temperature_source = "bundle";
            }
        }
        classifiers.push(classifier);
    }

    // The bundle's other precisions: their encoders are timed on the same tensors in the same
    // rounds, so the speed-up is a ratio from one run.
    let mut others = Vec::new();
    for precision in classifiers[0].bundle().precisions() {
        if precision != options.classifier.precision {
            let mut other_options = options.classifier.clone();
            other_options.precision = precision;
            other_options.verify_bundle_files = false;
            other_options.cache.verify_checksum = false;
            other_options.calibration = CalibrationSettings::method(CalibrationMethod::None);
            others.push(Classifier::open(runtime, bundle_dir, cache_path, other_options)?);
        }
    }
    let config = classifiers[0].bundle().preprocess_config();
    let decoding =
        ImageDecoding { limits: options.classifier.decode_limits, mode: options.classifier.decode, side: config.image_size };

    // Decode every image once (failures are left out and listed).
    let mut used_paths = Vec::new();
    let mut frames = Vec::new();
    let mut skipped = Vec::new();
    for path in images {
        match decoding.decode(path) {
            Ok(frame) => {
                used_paths.push(path.clone());
                frames.push(frame);
            }
            Err(error) => skipped.push(SkippedImage { path: path.display().to_string(), error: error.to_string() }),
        }
    }
    if frames.is_empty() {
        return Err(BenchError::Setup(format!("none of the {} images could be decoded", images.len())));
    }
    let mean_pixels = frames
        .iter()
        .map(|frame| {
            let (width, height) = frame.geometry.full_size;
            f64::from(width) * f64::from(height)
        })
        .sum::<f64>()
        / frames.len() as f64;

    let all_variants = variants(others.len(), classifiers[0].bundle().image_ft_path().is_some());
    let mut prepared = Vec::new();
    for &batch_size in &options.batch_sizes {
        // The CAC classifier computes every embedding the stages need: with a fine-tuned image
        // encoder the uncalibrated one skips the zero-shot pass, and the logits and CAC stages
        // would then time half the products and a contrast of zero.
        prepared.push(prepare(&mut classifiers[CAC], &frames, &used_paths, &config, batch_size, all_variants.len())?);
    }

    // The rounds: variants round-robin, the starting one rotated every round.
    let total_rounds = options.warmup_rounds + options.rounds;
    for round in 0..total_rounds {
        let measured = round >= options.warmup_rounds;
        let label = if measured {
            format!("round {}/{}", round - options.warmup_rounds + 1, options.rounds)
        } else {
            format!("warm-up round {}/{}", round + 1, options.warmup_rounds)
        };
        progress(&label);
        for set in prepared.iter_mut() {
            for offset in 0..all_variants.len() {
                let index = (round + offset) % all_variants.len();
                let latencies =
                    run_variant(all_variants[index], set, &mut classifiers, &mut others, &frames, &config, &decoding)?;
                if measured {
                    set.samples[index].extend(latencies);
                }
            }
        }
    }

    let other_precisions: Vec<Precision> = others.iter().map(Classifier::precision).collect();
    let results =
        prepared.iter().map(|set| summarize_batch(set, &all_variants, &other_precisions, options.keep_samples)).collect();
    let cache = classifiers[0].cache();
    let bundle = classifiers[0].bundle();
    let device = classifiers[0].device().clone();
    Ok(BenchReport {
        tool: "cac-edge",
        tool_version: env!("CARGO_PKG_VERSION"),
        machine: MachineInfo {
            cpu_model: crate::doctor::cpu_model(),
            logical_cores: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            arch: std::env::consts::ARCH,
            os: std::env::consts::OS,
            onnxruntime_version: runtime.version(),
            onnxruntime_library: runtime.library_path().display().to_string(),
            device: device.provider.name(),
            device_note: device.fallback_reason,
        },
        bundle: BundleInfo {
            dir: bundle.dir().display().to_string(),
            name: bundle.name().to_string(),
            image_size: config.image_size,
            embed_dim: bundle.embed_dim(),
            fine_tuned_image_encoder: bundle.image_ft_path().is_some(),
            precision: options.classifier.precision,
            other_precisions,
        },
        cache: CacheInfo {
            path: cache.path().display().to_string(),
            classes: cache.num_classes(),
            base_classes: (0..cache.num_classes()).filter(|&class| cache.is_base(class)).count(),
        },
        images: ImageSetInfo { given: images.len(), used: frames.len(), skipped, mean_pixels },
        settings: BenchSettings {
            batch_sizes: options.batch_sizes.clone(),
            rounds: options.rounds,
            warmup_rounds: options.warmup_rounds,
            threads: options.classifier.session.intra_threads,
            decode: options.classifier.decode,
            encoder_schedule: options.classifier.encoder_schedule,
        },
        calibrations: classifiers.iter().map(|classifier| *classifier.calibration()).collect(),
        ts_temperature_source,
        results,
    })
}

/// Splits the (cycled) image list into batches and computes each batch's encoder input,
/// embeddings and logits once.
fn prepare(
    classifier: &mut Classifier,
    frames: &[Decoded],
    paths: &[PathBuf],
    config: &PreprocessConfig,
    batch_size: usize,
    variant_count: usize,
) -> Result<Prepared, BenchError> {
    let count = frames.len().div_ceil(batch_size) * batch_size;
    let batches: Vec<Vec<usize>> =
        (0..count).map(|index| index % frames.len()).collect::<Vec<_>>().chunks(batch_size).map(<[usize]>::to_vec).collect();
    let mut set = Prepared {
        batch_size,
        paths: batches.iter().map(|batch| batch.iter().map(|&index| paths[index].clone()).collect()).collect(),
        batches,
        pixels: Vec::new(),
        embeddings: Vec::new(),
        logits: Vec::new(),
        samples: vec![Vec::new(); variant_count],
    };
    for batch in &set.batches {
        let pixels = preprocess_batch(frames, batch, config)?;
        let embeddings = classifier.encode_pixels(pixels.view())?;
        set.logits.push(classifier.logits_of_embeddings(&embeddings));
        set.embeddings.push(embeddings);
        set.pixels.push(pixels);
    }
    Ok(set)
}

/// What `classify_files` does to a batch of decoded frames (the pipeline's own function).
fn preprocess_batch(frames: &[Decoded], batch: &[usize], config: &PreprocessConfig) -> Result<Array4<f32>, BenchError> {
    Ok(preprocess_frames(batch.iter().map(|&index| (&frames[index].rgb, frames[index].geometry)), config, 0)?)
}

/// Runs one variant over every batch of `set`; returns per-image latencies in seconds (batch time ÷
/// batch size; for a streamed pass, one value: its time ÷ its images).
fn run_variant(
    variant: Variant,
    set: &Prepared,
    classifiers: &mut [Classifier],
    others: &mut [Classifier],
    frames: &[Decoded],
    config: &PreprocessConfig,
    decoding: &ImageDecoding,
) -> Result<Vec<f64>, BenchError> {
    if let Variant::Stream(streamed) = variant {
        let method = STREAMED[streamed];
        let paths: Vec<PathBuf> = set.paths.concat();
        let start = Instant::now();
        classify(&mut classifiers[method], &paths)?;
        return Ok(vec![start.elapsed().as_secs_f64() / paths.len() as f64]);
    }
    let mut times = Vec::with_capacity(set.batches.len());
    for batch in 0..set.batches.len() {
        let start = Instant::now();
        match variant {
            Variant::Encoder => {
                black_box(classifiers[0].encode_pixels(set.pixels[batch].view())?);
            }
            Variant::CacEncoders => {
                black_box(classifiers[CAC].encode_pixels(set.pixels[batch].view())?);
            }
            Variant::OtherEncoder(other) => {
                black_box(others[other].encode_pixels(set.pixels[batch].view())?);
            }
            Variant::Pipeline(method) => classify(&mut classifiers[method], &set.paths[batch])?,
            Variant::Stream(_) => {}
            Variant::Decode => {
                for path in &set.paths[batch] {
                    let frame =
                        decoding.decode(path).map_err(|error| BenchError::Setup(format!("{}: {error}", path.display())))?;
                    black_box(frame);
                }
            }
            Variant::Preprocess => {
                black_box(preprocess_batch(frames, &set.batches[batch], config)?);
            }
            Variant::Logits => {
                black_box(classifiers[0].logits_of_embeddings(&set.embeddings[batch]));
            }
            Variant::Calibrate(method) => {
                let logits = &set.logits[batch];
                for (fine_tuned, zero_shot) in logits.rows() {
                    black_box(
                        classifiers[method]
                            .predict(&row_slice(fine_tuned), &row_slice(zero_shot))
                            .map_err(BenchError::Pipeline)?,
                    );
                }
            }
        }
        times.push(start.elapsed().as_secs_f64() / set.batch_size as f64);
    }
    Ok(times)
}

/// The full pipeline on `paths` (one `classify_files` call); any failure is an error.
fn classify(classifier: &mut Classifier, paths: &[PathBuf]) -> Result<(), BenchError> {
    let mut failure = None;
    classifier.classify_files(paths, |path, outcome| {
        match outcome {
            Ok(prediction) => {
                black_box(prediction);
            }
            Err(error) => {
                failure.get_or_insert_with(|| format!("{}: {error}", path.display()));
            }
        }
        ControlFlow::Continue(())
    });
    match failure {
        Some(message) => Err(BenchError::Setup(format!("pipeline ({}) failed: {message}", classifier.calibration().name()))),
        None => Ok(()),
    }
}

fn summarize_batch(set: &Prepared, all_variants: &[Variant], other_precisions: &[Precision], keep_samples: bool) -> BatchResult {
    let timing = |variant: Variant| {
        let index = all_variants.iter().position(|candidate| *candidate == variant).unwrap_or(0);
        summarize(&set.samples[index])
    };
    let per_method = |make: fn(usize) -> Variant| -> [Timing; 4] { std::array::from_fn(|method| timing(make(method))) };
    let [none, cac, dac, ts] = per_method(Variant::Pipeline);
    let stream = StreamTimings { none: timing(Variant::Stream(0)), cac: timing(Variant::Stream(1)) };
    let [cal_none, cal_cac, cal_dac, cal_ts] = per_method(Variant::Calibrate);
    let encoder = timing(Variant::Encoder);
    let encoder_cac = all_variants.contains(&Variant::CacEncoders).then(|| timing(Variant::CacEncoders));
    let encoder_by_precision: BTreeMap<String, Timing> = other_precisions
        .iter()
        .enumerate()
        .map(|(other, precision)| (precision.name().to_string(), timing(Variant::OtherEncoder(other))))
        .collect();
    let encoder_speedup =
        encoder_by_precision.iter().map(|(name, timing)| (name.clone(), encoder.median_s / timing.median_s)).collect();
    let breakdown = Breakdown {
        decode: timing(Variant::Decode),
        preprocess: timing(Variant::Preprocess),
        logits: timing(Variant::Logits),
        calibrate: CalibrateTimings { none: cal_none, cac: cal_cac, dac: cal_dac, ts: cal_ts },
    };
    BatchResult {
        batch_size: set.batch_size,
        batches_per_round: set.batches.len(),
        encoder_by_precision,
        non_encoder_per_image_s: breakdown.decode.median_s
            + breakdown.preprocess.median_s
            + breakdown.logits.median_s
            + breakdown.calibrate.cac.median_s,
        pipeline_minus_encoder_s: cac.median_s - encoder_cac.as_ref().map_or(encoder.median_s, |both| both.median_s),
        ratios: Ratios {
            pipeline_over_encoder: none.median_s / encoder.median_s,
            encoder_speedup,
            cac_over_none: cac.median_s / none.median_s,
            cac_encoders_over_encoder: encoder_cac.as_ref().map(|both| both.median_s / encoder.median_s),
            cac_over_none_from_stages: 1.0
                + (breakdown.calibrate.cac.median_s - breakdown.calibrate.none.median_s) / none.median_s,
            dac_over_none: dac.median_s / none.median_s,
            ts_over_none: ts.median_s / none.median_s,
        },
        pipeline: PipelineTimings { none, cac, dac, ts },
        encoder,
        encoder_cac,
        stream,
        breakdown,
        samples: keep_samples
            .then(|| all_variants.iter().zip(&set.samples).map(|(variant, samples)| (variant.name(), samples.clone())).collect()),
    }
}

/// Median, p90 (linear interpolation between order statistics, numpy's default), mean, minimum.
pub fn summarize(samples: &[f64]) -> Timing {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = percentile(&sorted, 50.0);
    Timing {
        samples: sorted.len(),
        median_s: median,
        p90_s: percentile(&sorted, 90.0),
        mean_s: if sorted.is_empty() { f64::NAN } else { sorted.iter().sum::<f64>() / sorted.len() as f64 },
        min_s: sorted.first().copied().unwrap_or(f64::NAN),
        images_per_s: 1.0 / median,
    }
}

/// The `q`-th percentile of sorted values, linearly interpolated (numpy's default method).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        len => {
            let position = q / 100.0 * (len - 1) as f64;
            let low = position.floor() as usize;
            let high = (low + 1).min(len - 1);
            sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile([1, 2, 3, 4], [50, 90]) = [2.5, 3.7]
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&sorted, 50.0), 2.5);
        assert!((percentile(&sorted, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[5.0], 90.0), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn every_variant_appears_once() {
        let all = variants(1, true);
        // encoder, encoder_cac, one other precision, decode, preprocess, logits.
        assert_eq!(all.len(), 6 + 2 * CALIBRATIONS.len() + STREAMED.len());
        assert_eq!(variants(0, false).len(), all.len() - 2);
        assert_eq!(CALIBRATIONS[CAC], "cac");
        for (index, variant) in all.iter().enumerate() {
            assert!(!all[index + 1..].contains(variant));
            assert!(all[index + 1..].iter().all(|other| other.name() != variant.name()));
        }
    }
}
