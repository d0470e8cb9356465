//! `cac-edge classify`: one JSON line per image on stdout, a summary on stderr.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;

use cac_edge::cache::ClassList;
use cac_edge::preprocess::IMAGE_EXTENSIONS;
use cac_edge::report::{FailureRecord, PredictionRecord, RecordPath, Summary};
use cac_edge::{Classifier, Runtime};

use crate::cli_args::{probability, CalibrationArgs, DecodeArgs, InputArgs, ModelArgs, RuntimeArgs, CALIBRATION, MODEL, OUTPUT};
use crate::cli_output::{OutputError, ResultLines};

#[derive(Args)]
pub(crate) struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    /// Accept a prediction when its calibrated confidence is at least this, in [0, 1] (default:
    /// the one `eval --write-threshold` stored in the cache for this calibration, else 0.8).
    #[arg(long, value_parser = probability, help_heading = OUTPUT)]
    threshold: Option<f64>,
    /// Classes ranked in each line's top_k.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..), help_heading = OUTPUT)]
    top_k: u16,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Check that the cache was built for this class list (with --base).
    #[arg(long, requires = "base", value_name = "FILE", help_heading = MODEL)]
    classes: Option<PathBuf>,
    /// The base classes of the list given with --classes.
    #[arg(long, requires = "classes", value_name = "FILE", help_heading = MODEL)]
    base: Option<PathBuf>,
    /// Refuse to run when the temperature, threshold or drift baseline stored in the cache were
    /// fitted by eval on another path (--precision, --decode, the cache's feature precision)
    /// than this run's; without it that is a warning.
    #[arg(long, help_heading = CALIBRATION)]
    strict: bool,
    #[command(flatten)]
    pub(crate) runtime: RuntimeArgs,
}

pub(crate) fn run(args: &ClassifyArgs, runtime: &Arc<Runtime>) -> Result<ExitCode> {
    // Scanned before the model loads: a typo in a path costs no start-up time.
    let inputs = args.inputs.scan();
    if inputs.files.is_empty() && inputs.missing.is_empty() && inputs.refused.is_empty() {
        let given: Vec<String> = args.inputs.inputs.iter().map(|path| path.display().to_string()).collect();
        tracing::error!("no image files found in {} (looked for {})", given.join(", "), IMAGE_EXTENSIONS.join(", "));
        return Ok(ExitCode::from(1));
    }
    let mut options = args.decode.classifier_options(&args.model, &args.runtime, 8);
    options.calibration = args.calibration.settings();
    options.threshold = args.threshold;
    options.top_k = usize::from(args.top_k);
    options.strict = args.strict;
    options.expected_classes = match (&args.classes, &args.base) {
        (Some(classes), Some(base)) => Some(ClassList::from_files(classes, base)?),
        _ => None,
    };
    let mut classifier = Classifier::open(runtime, &args.model.bundle, &args.model.cache, options)?;
    if args.model.no_verify {
        tracing::warn!("--no-verify: the cache data and the image encoders were not checked against their hashes; a damaged file goes unnoticed");
    }
    if let Some(reason) = &classifier.device().fallback_reason {
        tracing::info!("note: {reason}");
    }
    let mut summary = Summary::default();
    let mut out = ResultLines::new();
    let unusable = inputs.missing.iter().map(|path| (path, "no such file or directory; check the path".to_string()));
    let unusable = unusable.chain(inputs.refused.iter().map(|(path, reason)| (path, reason.to_string())));
    let mut stopped = None;
    for (path, error) in unusable {
        summary.record(None);
        tracing::warn!("{}: {error}", path.display());
        if let Err(error) = out.write(&FailureRecord { path: RecordPath::new(path), error }) {
            stopped = Some(error);
            break;
        }
    }
    if stopped.is_none() {
        stopped = classify_files(&mut classifier, &inputs.files, &mut out, &mut summary);
    }
    match stopped {
        Some(OutputError::Closed) => return Ok(ExitCode::SUCCESS),
        Some(OutputError::Failed(error)) => bail!("writing results to stdout: {error}"),
        None => {}
    }
    let threshold = classifier.threshold();
    tracing::info!(
        "{summary} (calibration {}, threshold {} from {}, device {}, precision {}; cache {})",
        classifier.calibration().name(),
        threshold.value,
        threshold.source,
        classifier.device().provider,
        classifier.precision(),
        classifier.cache().class_list_summary()
    );
    Ok(if summary.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Classifies `paths`, writing a line per image; stops at the first output error.
fn classify_files(
    classifier: &mut Classifier,
    paths: &[PathBuf],
    out: &mut ResultLines,
    summary: &mut Summary,
) -> Option<OutputError> {
    let calibration = classifier.calibration().name();
    let device = classifier.device().provider;
    let precision = classifier.precision();
    let threshold = classifier.threshold().value;
    let mut stopped = None;
    classifier.classify_files(paths, |path, outcome| {
        let written = match outcome {
            Ok(prediction) => {
                summary.record(Some(prediction.decision));
                out.write(&PredictionRecord {
                    path: RecordPath::new(path),
                    prediction: &prediction,
                    threshold,
                    calibration,
                    device,
                    precision,
                })
            }
            Err(error) => {
                summary.record(None);
                tracing::warn!("{error}");
                out.write(&FailureRecord { path: RecordPath::new(path), error: error.to_string() })
            }
        };
        match written {
            Ok(()) => ControlFlow::Continue(()),
            Err(error) => {
                stopped = Some(error);
                ControlFlow::Break(())
            }
        }
    });
    stopped
}
