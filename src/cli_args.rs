//! Option groups shared by several commands, with their help headings, and their translation
//! into the library's option types. Values are checked here, at parse time: an absurd value is a
//! usage error before anything is loaded.

use std::path::PathBuf;

use clap::Args;

use cac_edge::cache::CacheOpenOptions;
use cac_edge::inputs::{scan, Scan, ScanOptions, SkipReason};
use cac_edge::preprocess::DecodeMode;
use cac_edge::runtime::MAX_INTRA_THREADS;
use cac_edge::{
    CalibrationMethod, CalibrationSettings, ClassifierOptions, ContrastDistance, DecodeLimits, Device, EncoderSchedule,
    Precision, SessionOptions,
};

pub(crate) const MODEL: &str = "Model";
pub(crate) const RUNTIME: &str = "ONNX Runtime";
pub(crate) const CALIBRATION: &str = "Calibration";
pub(crate) const INPUT: &str = "Input";
pub(crate) const OUTPUT: &str = "Output";

/// The bundle and its cache.
#[derive(Args)]
#[command(next_help_heading = MODEL)]
pub(crate) struct ModelArgs {
    /// Bundle directory (bundle.toml, the ONNX encoders, tokenizer.json), as written by onnx/export.py.
    #[arg(long, value_name = "DIR")]
    pub(crate) bundle: PathBuf,
    /// Text-feature cache of the bundle and a class list, as written by `cac-edge cache build`.
    #[arg(long, value_name = "FILE")]
    pub(crate) cache: PathBuf,
    /// Skip hashing the cache data and the image encoders at start-up (faster start; a damaged
    /// file then goes unnoticed).
    #[arg(long)]
    pub(crate) no_verify: bool,
    /// Hash the image encoders and the cache data at every start, even when the verification
    /// stamp (~/.cache/cac-edge/verified/) shows them unchanged since they were verified.
    #[arg(long, conflicts_with = "no_verify")]
    pub(crate) verify_always: bool,
    /// Image encoder precision: fp32 (the exported graphs) or int8 (the bundle's quantised
    /// variants, several times faster on CPUs).
    #[arg(long, default_value = "fp32", value_name = "PRECISION")]
    pub(crate) precision: Precision,
    /// Bundles with their own fine-tuned image encoder (MaPLe, PromptSRC), under CAC: run the
    /// two image encoders concurrently (each with half the cores) or one after the other.
    #[arg(long, default_value = "concurrent", value_name = "SCHEDULE")]
    pub(crate) encoder_schedule: EncoderSchedule,
}

impl ModelArgs {
    pub(crate) fn cache_options(&self) -> CacheOpenOptions {
        CacheOpenOptions { verify_checksum: !self.no_verify }
    }

    /// The verification and precision fields of a classifier's options.
    pub(crate) fn apply(&self, options: ClassifierOptions) -> ClassifierOptions {
        ClassifierOptions {
            cache: self.cache_options(),
            verify_bundle_files: !self.no_verify,
            use_verification_stamp: !self.verify_always,
            precision: self.precision,
            encoder_schedule: self.encoder_schedule,
            ..options
        }
    }
}

/// Where ONNX Runtime comes from and how sessions run.
#[derive(Args)]
#[command(next_help_heading = RUNTIME)]
pub(crate) struct RuntimeArgs {
    /// ONNX Runtime shared library (default: ORT_DYLIB_PATH, then beside the executable, then
    /// ../lib/cac-edge/ and ../lib/ from the executable's directory (the Debian package's
    /// /usr/lib/cac-edge/), then ~/.local/share/cac-edge/onnxruntime/<arch>/).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) ort_lib: Option<PathBuf>,
    /// Execution provider: cpu, cuda, tensorrt, or auto (TensorRT, else CUDA, else CPU).
    #[arg(long, default_value = "auto", global = true)]
    pub(crate) device: Device,
    /// Intra-op threads (default: ONNX Runtime's choice, one per physical core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=MAX_INTRA_THREADS as i64))]
    pub(crate) threads: Option<u16>,
    /// CUDA/TensorRT device id.
    #[arg(long, default_value_t = 0, global = true, value_parser = clap::value_parser!(i32).range(0..))]
    pub(crate) gpu: i32,
    /// TensorRT: build FP16 engines.
    #[arg(long, global = true)]
    pub(crate) tensorrt_fp16: bool,
    /// TensorRT: builder workspace in bytes (default: ONNX Runtime's).
    #[arg(long, global = true, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) tensorrt_workspace: Option<u64>,
    /// TensorRT: directory for built engines, kept across runs and reboots (one subdirectory
    /// per model content hash and ONNX Runtime version).
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) tensorrt_cache: Option<PathBuf>,
    /// CPU: directory where each image encoder's optimised graph is saved, with its weights
    /// packed for this CPU, at the first start, and loaded from at later ones (a several times
    /// faster start for large models; one subdirectory per model, ONNX Runtime version and CPU,
    /// about twice the model's size).
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) graph_cache: Option<PathBuf>,
}

impl RuntimeArgs {
    pub(crate) fn session_options(&self) -> SessionOptions {
        SessionOptions {
            device: self.device,
            intra_threads: self.threads.map(usize::from),
            intra_op_spinning: true,
            cuda_device_id: self.gpu,
            tensorrt_fp16: self.tensorrt_fp16,
            tensorrt_workspace: self.tensorrt_workspace.map(|bytes| usize::try_from(bytes).unwrap_or(usize::MAX)),
            tensorrt_engine_cache: self.tensorrt_cache.clone(),
            graph_cache: self.graph_cache.clone(),
        }
    }
}

/// How confidences are calibrated (shared by classify and eval).
#[derive(Args)]
#[command(next_help_heading = CALIBRATION)]
pub(crate) struct CalibrationArgs {
    /// Calibration method: none, cac, ts or dac (default: the bundle's, else cac).
    #[arg(long, value_name = "METHOD")]
    pub(crate) calibration: Option<CalibrationMethod>,
    /// CAC: α, the weight at zero contrast (default: the bundle's, else 1.10).
    #[arg(long, value_name = "ALPHA")]
    pub(crate) cac_alpha: Option<f64>,
    /// CAC: k of the exponential map (default: the bundle's, else 15 for logits, 2 for probs).
    #[arg(long, value_name = "K")]
    pub(crate) cac_k: Option<f64>,
    /// CAC: contrast measured on logits (mean |Δ|) or probs (L1 of the softmax outputs)
    /// (default: the bundle's, else logits).
    #[arg(long, value_name = "DISTANCE")]
    pub(crate) cac_distance: Option<ContrastDistance>,
    /// Advanced CAC: below λ1 the weight is α.
    #[arg(long, requires = "cac_lambda2", value_name = "LAMBDA1")]
    pub(crate) cac_lambda1: Option<f64>,
    /// Advanced CAC: above λ2 the weight is held at α·exp(−λ2/k).
    #[arg(long, requires = "cac_lambda1", value_name = "LAMBDA2")]
    pub(crate) cac_lambda2: Option<f64>,
    /// TS temperature (default: the one `eval` stored in the cache).
    #[arg(long, value_name = "T")]
    pub(crate) temperature: Option<f64>,
}

impl CalibrationArgs {
    pub(crate) fn settings(&self) -> CalibrationSettings {
        CalibrationSettings {
            method: self.calibration,
            alpha: self.cac_alpha,
            k: self.cac_k,
            distance: self.cac_distance,
            lambda1: self.cac_lambda1,
            lambda2: self.cac_lambda2,
            temperature: self.temperature,
        }
    }
}

/// The images to read.
#[derive(Args)]
#[command(next_help_heading = INPUT)]
pub(crate) struct InputArgs {
    /// Images or directories (directories are searched recursively for image files; anything
    /// that is not a regular file is passed over, and each file is read once).
    #[arg(required = true, value_name = "PATH")]
    pub(crate) inputs: Vec<PathBuf>,
    /// Follow symbolic links to directories found inside the directories searched (each
    /// directory is still searched once, so a link loop cannot repeat images).
    #[arg(long)]
    pub(crate) follow: bool,
}

impl InputArgs {
    /// The image files the inputs name; what was passed over is noted on stderr.
    pub(crate) fn scan(&self) -> Scan {
        let scanned = scan(&self.inputs, &ScanOptions { follow_symlinks: self.follow });
        for (path, reason) in &scanned.skipped {
            let how = if *reason == SkipReason::SymlinkedDirectory { " (--follow searches it)" } else { "" };
            tracing::info!("note: {}: {reason}{how}", path.display());
        }
        scanned
    }
}

/// How images are read and batched.
#[derive(Args)]
#[command(next_help_heading = INPUT)]
pub(crate) struct DecodeArgs {
    /// Refuse images wider or taller than this before decoding them.
    #[arg(long, value_name = "PIXELS", default_value_t = DecodeLimits::default().max_width,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_image_side: u32,
    /// Images per encoder run (default: 8 for classify, 16 for eval).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub(crate) batch_size: Option<u16>,
    /// JPEG decoding: exact (open_clip's pixels) or scaled (decode at the smallest DCT scale
    /// still at least the model's side, then the same resize: faster on large photos, slightly
    /// different input; BENCHMARKS.md "Large frames").
    #[arg(long = "decode", value_name = "MODE", default_value = "exact", value_parser = parse_decode_mode)]
    pub(crate) decode_mode: DecodeMode,
}

/// `--decode exact|scaled`.
pub(crate) fn parse_decode_mode(text: &str) -> Result<DecodeMode, String> {
    text.parse()
}

impl DecodeArgs {
    pub(crate) fn limits(&self) -> DecodeLimits {
        DecodeLimits { max_width: self.max_image_side, max_height: self.max_image_side, ..DecodeLimits::default() }
    }

    /// The options of a classifier that decodes as asked, on the runtime as asked.
    pub(crate) fn classifier_options(&self, model: &ModelArgs, runtime: &RuntimeArgs, default_batch: usize) -> ClassifierOptions {
        model.apply(ClassifierOptions {
            session: runtime.session_options(),
            decode_limits: self.limits(),
            decode: self.decode_mode,
            batch_size: self.batch_size.map_or(default_batch, usize::from),
            ..ClassifierOptions::default()
        })
    }
}

/// A probability in [0, 1] (thresholds, targets).
pub(crate) fn probability(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("'{text}' is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0 and 1"))
    }
}
