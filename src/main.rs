//! `cac-edge`: the command line over the `cac_edge` library.
//!
//! Exit codes: 0 every image classified; 1 some images failed (the others are reported);
//! 2 nothing could run (bad arguments, bundle, cache or ONNX Runtime library).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use cac_edge::bundle::Bundle;
use cac_edge::doctor::{self, DoctorRequest};
use cac_edge::cache::{build_cache, CacheOpenOptions, ClassList, TextFeatureCache};
use cac_edge::calibrate::CalibrationSettings;
use cac_edge::pipeline::{Classifier, ClassifierOptions, Prediction};
use cac_edge::inputs::{scan, ScanOptions};
use cac_edge::preprocess::DecodeLimits;
use cac_edge::report::{write_json_line, FailureRecord, PredictionRecord, Ranked, Summary};
use cac_edge::runtime::{Device, Runtime, SessionOptions};

mod cli_bench;
mod cli_eval;

#[derive(Parser)]
#[command(name = "cac-edge", version, about = "Calibrated open-vocabulary CLIP classification on edge devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build or inspect the text-feature cache of a bundle and a class list.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Classify images: one JSON line per image on stdout, a summary on stderr.
    Classify(ClassifyArgs),
    /// Check this box: ONNX Runtime, execution providers, CPU, bundle and cache.
    Doctor(DoctorArgs),
    /// Calibration report on a labeled image set: metrics, reliability diagrams, thresholds.
    Eval(cli_eval::EvalArgs),
    /// Measure latency and throughput of the encoder and the full pipeline.
    Bench(cli_bench::BenchArgs),
}

#[derive(Args)]
struct DoctorArgs {
    #[arg(long)]
    bundle: Option<PathBuf>,
    #[arg(long, requires = "bundle")]
    cache: Option<PathBuf>,
    /// The threshold classify will be run with (reported with the calibration).
    #[arg(long)]
    threshold: Option<f64>,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Encode every class name with both text encoders and write the cache.
    Build(CacheBuildArgs),
    /// Print what a cache holds.
    Info {
        #[arg(long)]
        cache: PathBuf,
    },
}

#[derive(Args)]
pub(crate) struct RuntimeArgs {
    /// ONNX Runtime shared library (default: ORT_DYLIB_PATH, then beside the executable, then
    /// ~/.local/share/cac-edge/onnxruntime/<arch>/, where scripts/setup-onnxruntime installs it).
    #[arg(long, global = true)]
    pub(crate) ort_lib: Option<PathBuf>,
    /// Execution provider: cpu, cuda, tensorrt, or auto (TensorRT, else CUDA, else CPU).
    #[arg(long, default_value = "auto", global = true)]
    pub(crate) device: Device,
    /// Intra-op threads (default: ONNX Runtime's choice, one per physical core).
    #[arg(long, global = true)]
    pub(crate) threads: Option<usize>,
    /// CUDA/TensorRT device id.
    #[arg(long, default_value_t = 0, global = true)]
    pub(crate) gpu: i32,
    /// TensorRT: build FP16 engines.
    #[arg(long, global = true)]
    pub(crate) tensorrt_fp16: bool,
    /// TensorRT: builder workspace in bytes (default: ONNX Runtime's).
    #[arg(long, global = true)]
    pub(crate) tensorrt_workspace: Option<usize>,
    /// TensorRT: directory for built engines, kept across runs and reboots (one subdirectory
    /// per model content hash and ONNX Runtime version).
    #[arg(long, global = true)]
    pub(crate) tensorrt_cache: Option<PathBuf>,
}

impl RuntimeArgs {
    pub(crate) fn session_options(&self) -> SessionOptions {
        SessionOptions {
            device: self.device,
            intra_threads: self.threads,
            cuda_device_id: self.gpu,
            tensorrt_fp16: self.tensorrt_fp16,
            tensorrt_workspace: self.tensorrt_workspace,
            tensorrt_engine_cache: self.tensorrt_cache.clone(),
        }
    }
}

#[derive(Args)]
struct CacheBuildArgs {
    #[arg(long)]
    bundle: PathBuf,
    /// Deployed class names, one per line.
    #[arg(long)]
    classes: PathBuf,
    /// Base classes (those the fine-tuned model was trained on), one per line.
    #[arg(long)]
    base: PathBuf,
    /// Where to write the cache (default: calibration-cache/<bundle name>.safetensors).
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// How confidences are calibrated (shared by classify and eval).
#[derive(Args)]
pub(crate) struct CalibrationArgs {
    /// Calibration method (default: the bundle's, else cac).
    #[arg(long, value_parser = ["none", "cac", "ts", "dac"])]
    pub(crate) calibration: Option<String>,
    /// CAC: α, the weight at zero contrast (default: the bundle's, else 1.10).
    #[arg(long)]
    pub(crate) cac_alpha: Option<f64>,
    /// CAC: k of the exponential map (default: the bundle's, else 15 for logits, 2 for probs).
    #[arg(long)]
    pub(crate) cac_k: Option<f64>,
    /// CAC: contrast measured on logits (mean |Δ|) or probabilities (L1) (default: the
    /// bundle's, else logits).
    #[arg(long, value_parser = ["logits", "probs"])]
    pub(crate) cac_distance: Option<String>,
    /// Advanced CAC: below λ1 the weight is α.
    #[arg(long, requires = "cac_lambda2")]
    pub(crate) cac_lambda1: Option<f64>,
    /// Advanced CAC: above λ2 the weight is held at α·exp(−λ2/k).
    #[arg(long, requires = "cac_lambda1")]
    pub(crate) cac_lambda2: Option<f64>,
    /// TS temperature (default: the one `eval` stored in the cache).
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
}

impl CalibrationArgs {
    pub(crate) fn settings(&self) -> CalibrationSettings {
        CalibrationSettings {
            method: self.calibration.clone(),
            alpha: self.cac_alpha,
            k: self.cac_k,
            distance: self.cac_distance.clone(),
            lambda1: self.cac_lambda1,
            lambda2: self.cac_lambda2,
            temperature: self.temperature,
        }
    }
}

#[derive(Args)]
struct ClassifyArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    cache: PathBuf,
    /// Images or directories (searched recursively for image files).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Follow symbolic links to directories found inside the directories searched (each
    /// directory is still searched once).
    #[arg(long)]
    follow: bool,
    /// Accept a prediction when its calibrated confidence is at least this (default: the one
    /// `eval --write-threshold` stored in the cache for this calibration, else 0.8).
    #[arg(long)]
    threshold: Option<f64>,
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Images per encoder run.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Refuse images wider or taller than this before decoding them.
    #[arg(long, default_value_t = DecodeLimits::default().max_width)]
    max_image_side: u32,
    /// Check that the cache was built for this class list (with --base).
    #[arg(long, requires = "base")]
    classes: Option<PathBuf>,
    #[arg(long, requires = "classes")]
    base: Option<PathBuf>,
    /// Skip hashing the cache data and the image encoders at start-up.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl ClassifyArgs {
    fn options(&self) -> Result<ClassifierOptions> {
        let expected_classes = match (&self.classes, &self.base) {
            (Some(classes), Some(base)) => Some(ClassList::from_files(classes, base)?),
            _ => None,
        };
        let limits = DecodeLimits { max_width: self.max_image_side, max_height: self.max_image_side, ..DecodeLimits::default() };
        Ok(ClassifierOptions {
            ort_library: self.runtime.ort_lib.clone(),
            session: self.runtime.session_options(),
            calibration: self.calibration.settings(),
            threshold: self.threshold,
            top_k: self.top_k,
            decode_limits: limits,
            batch_size: self.batch_size,
            cache: CacheOpenOptions { verify_checksum: !self.no_verify },
            verify_bundle_files: !self.no_verify,
            expected_classes,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Cache(CacheCommand::Build(args)) => cache_build(&args).map(|()| ExitCode::SUCCESS),
        Command::Cache(CacheCommand::Info { cache }) => cache_info(&cache).map(|()| ExitCode::SUCCESS),
        Command::Classify(args) => classify(&args),
        Command::Doctor(args) => doctor(&args),
        Command::Eval(args) => cli_eval::run(&args),
        Command::Bench(args) => cli_bench::run(&args),
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::from(2)
    })
}

fn cache_build(args: &CacheBuildArgs) -> Result<()> {
    args.runtime.session_options().validate().map_err(anyhow::Error::msg)?;
    let bundle = Bundle::open(&args.bundle)?;
    let classes = ClassList::from_files(&args.classes, &args.base)?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| Path::new("calibration-cache").join(format!("{}.safetensors", bundle.name())));
    let runtime = Runtime::load(args.runtime.ort_lib.as_deref())?;
    build_cache(&runtime, &bundle, &classes, &args.runtime.session_options(), &output)
        .with_context(|| format!("building the cache {} for the classes in {}", output.display(), args.classes.display()))?;
    let base = classes.is_base.iter().filter(|&&base| base).count();
    eprintln!(
        "wrote {} ({} classes: {} base, {} new)",
        output.display(),
        classes.names.len(),
        base,
        classes.names.len() - base
    );
    println!("{}", output.display());
    Ok(())
}

fn doctor(args: &DoctorArgs) -> Result<ExitCode> {
    let request = DoctorRequest {
        ort_library: args.runtime.ort_lib.clone(),
        session: args.runtime.session_options(),
        bundle: args.bundle.clone(),
        cache: args.cache.clone(),
        threshold: args.threshold,
    };
    let checks = doctor::examine(&request);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for check in &checks {
            let status = match check.status {
                doctor::Status::Ok => "ok  ",
                doctor::Status::Warn => "WARN",
                doctor::Status::Fail => "FAIL",
            };
            println!("[{status}] {}: {}", check.name, check.detail);
            if let Some(fix) = &check.fix {
                println!("       fix: {fix}");
            }
        }
    }
    Ok(if doctor::healthy(&checks) { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn cache_info(path: &Path) -> Result<()> {
    let cache = TextFeatureCache::open(path, CacheOpenOptions::default())?;
    let mut metadata: Vec<_> = cache.metadata().iter().collect();
    metadata.sort();
    for (key, value) in metadata {
        println!("{key}: {value}");
    }
    for (class, name) in cache.class_names().iter().enumerate() {
        let kind = if cache.is_base(class) { "base" } else { "new" };
        println!("class {class}: {name} ({kind}, dac factor {:.4})", cache.dac_factors()[class]);
    }
    Ok(())
}

fn classify(args: &ClassifyArgs) -> Result<ExitCode> {
    let mut classifier = Classifier::open(&args.bundle, &args.cache, args.options()?)?;
    if let Some(reason) = &classifier.device().fallback_reason {
        eprintln!("note: {reason}");
    }
    let context = RecordContext {
        calibration: classifier.calibration().name(),
        device: classifier.device().name,
        threshold: classifier.threshold(),
    };
    let inputs = scan(&args.inputs, &ScanOptions { follow_symlinks: args.follow });
    let paths = inputs.files;
    let mut summary = Summary::default();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    for (path, reason) in &inputs.skipped {
        eprintln!("note: {}: {reason}", path.display());
    }
    for path in &inputs.missing {
        summary.record(None);
        let failure = FailureRecord { path: path.display().to_string(), error: "no such file or directory".into() };
        eprintln!("{}: no such file or directory; check the path", path.display());
        write_json_line(&mut out, &failure).context("writing results to stdout")?;
    }
    for (path, reason) in &inputs.refused {
        summary.record(None);
        eprintln!("{}: {reason}", path.display());
        write_json_line(&mut out, &FailureRecord { path: path.display().to_string(), error: reason.to_string() })
            .context("writing results to stdout")?;
    }
    classifier.classify_files(&paths, |path, outcome| {
        let written = match outcome {
            Ok(prediction) => {
                summary.record(Some(prediction.decision));
                write_json_line(&mut out, &context.record(path, prediction))
            }
            Err(error) => {
                summary.record(None);
                eprintln!("{error}");
                write_json_line(&mut out, &FailureRecord { path: path.display().to_string(), error: error.to_string() })
            }
        };
        if let Err(error) = written {
            write_error.get_or_insert(error);
        }
    });
    if let Some(error) = write_error {
        return Err(error).context("writing results to stdout");
    }
    let threshold = classifier.threshold_source();
    eprintln!(
        "{summary} (calibration {}, threshold {} from {}, device {})",
        context.calibration, threshold.value, threshold.source, context.device
    );
    Ok(if summary.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// What every JSON line repeats about the run.
struct RecordContext {
    calibration: &'static str,
    device: &'static str,
    threshold: f64,
}

impl RecordContext {
    fn record(&self, path: &Path, prediction: Prediction) -> PredictionRecord {
        PredictionRecord {
            path: path.display().to_string(),
            label: prediction.label,
            base: prediction.is_base,
            confidence: prediction.confidence,
            uncalibrated_confidence: prediction.uncalibrated_confidence,
            decision: prediction.decision,
            threshold: self.threshold,
            calibration: self.calibration,
            weight: prediction.weight,
            contrast: prediction.contrast,
            top_k: prediction
                .top_k
                .into_iter()
                .map(|ranked| Ranked { label: ranked.label, confidence: ranked.confidence })
                .collect(),
            device: self.device,
        }
    }
}
