//! `cac-edge eval`: a calibration report on a labeled image set — metrics per calibrator and
//! split, reliability diagrams, risk–coverage curves, thresholds — with optional fitting on base
//! validation images. The run sequence is the library's ([`cac_edge::tooling::eval_run`]); this
//! file translates the flags, draws the progress bar and prints the summary table.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use cac_edge::tooling::eval::ThresholdTarget;
use cac_edge::tooling::eval_report::EvalReport;
use cac_edge::tooling::eval_run::{run_eval, EvalRequest, Progress};
use cac_edge::Runtime;

use crate::cli_args::{probability, CalibrationArgs, DecodeArgs, ModelArgs, RuntimeArgs, INPUT, OUTPUT};
use crate::cli_output::print_stdout;

const FITTING: &str = "Fitting and thresholds";

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Labeled images: a folder with one sub-folder per class (underscores stand for spaces),
    /// or a CSV of path,label (paths relative to the CSV; further columns are ignored).
    #[arg(long, value_name = "PATH", help_heading = INPUT)]
    images: PathBuf,
    #[command(flatten)]
    decode: DecodeArgs,
    /// Validation images to fit on (same forms as --images). Only images of base classes are
    /// used: calibration is never fitted on new classes.
    #[arg(long, value_name = "PATH", help_heading = FITTING)]
    fit_images: Option<PathBuf>,
    /// Also fit CAC's α and k on the base validation images (a grid minimising NLL).
    #[arg(long, requires = "fit_images", help_heading = FITTING)]
    fit_cac: bool,
    /// Choose thresholds reaching this precision (accuracy of accepted predictions) [default: 0.9].
    #[arg(long, conflicts_with = "target_coverage", value_parser = probability, help_heading = FITTING)]
    target_precision: Option<f64>,
    /// Choose thresholds keeping at least this fraction of predictions.
    #[arg(long, value_parser = probability, help_heading = FITTING)]
    target_coverage: Option<f64>,
    /// Store the threshold chosen for the calibration classify uses (split "all") in the cache,
    /// so classify uses it by default.
    #[arg(long, help_heading = FITTING)]
    write_threshold: bool,
    /// Store the TS temperature fitted on --fit-images in the cache, so `--calibration ts` uses it.
    #[arg(long, requires = "fit_images", help_heading = FITTING)]
    write_temperature: bool,
    /// Store the distribution of CAC's contrast d(x) (and of the uncalibrated max-probability) on
    /// --images in the cache: the baseline of `serve`'s shift alarm. Needs at least 50 images.
    #[arg(long, help_heading = FITTING)]
    write_drift_baseline: bool,
    /// Equal-width (and equal-mass) bins of ECE, ACE, MCE and the reliability diagrams.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u16).range(1..), help_heading = OUTPUT)]
    bins: u16,
    /// Folder for report.json, REPORT.md and the plots.
    #[arg(long, default_value = "eval-report", value_name = "DIR", help_heading = OUTPUT)]
    out: PathBuf,
    #[command(flatten)]
    calibration: CalibrationArgs,
    #[command(flatten)]
    pub(crate) runtime: RuntimeArgs,
}

impl EvalArgs {
    fn target(&self) -> ThresholdTarget {
        match (self.target_precision, self.target_coverage) {
            (_, Some(coverage)) => ThresholdTarget::Coverage(coverage),
            (precision, None) => ThresholdTarget::Precision(precision.unwrap_or(0.9)),
        }
    }
}

pub(crate) fn run(args: &EvalArgs, runtime: &Arc<Runtime>) -> Result<ExitCode> {
    let request = EvalRequest {
        bundle: &args.model.bundle,
        cache: &args.model.cache,
        images: &args.images,
        fit_images: args.fit_images.as_deref(),
        fit_cac: args.fit_cac,
        bins: usize::from(args.bins),
        target: args.target(),
        write_threshold: args.write_threshold,
        write_temperature: args.write_temperature,
        write_drift_baseline: args.write_drift_baseline,
        out: &args.out,
        calibration: args.calibration.settings(),
        classifier: args.decode.classifier_options(&args.model, &args.runtime, 16),
    };
    let mut bar = None;
    let outcome = run_eval(runtime, &request, |progress| match progress {
        Progress::Start { source, total } => {
            let new_bar = ProgressBar::new(total as u64).with_message(format!("encoding {}", source.display()));
            new_bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar = Some(new_bar);
        }
        Progress::Done(done) => bar.iter().for_each(|bar| bar.set_position(done as u64)),
        Progress::Finish => bar.take().iter().for_each(ProgressBar::finish_and_clear),
    })?;
    print_stdout(&summary_table(&outcome.report))?;
    for file in &outcome.files {
        tracing::info!("wrote {}", file.display());
    }
    if let Some(message) = outcome.unreachable_threshold {
        bail!("--write-threshold: {message} (--write-temperature, --temperature)");
    }
    Ok(if outcome.failed_images == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn summary_table(report: &EvalReport) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<12} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "calibrator", "split", "images", "acc %", "ECE %", "NLL", "thresh"
    );
    for calibrator in &report.calibrators {
        for split in &calibrator.splits {
            let threshold = split.threshold.map_or_else(|| "-".to_string(), |choice| format!("{:.3}", choice.threshold));
            let _ = writeln!(
                table,
                "{:<12} {:>6} {:>8} {:>8.2} {:>8.2} {:>8.4} {:>8}",
                calibrator.calibrator.name,
                split.split.name(),
                split.images,
                split.accuracy_percent,
                split.ece_percent,
                split.nll,
                threshold
            );
        }
    }
    table
}
