//! `cac-edge eval`: a calibration report on a labeled image set — metrics per calibrator and
//! split, reliability diagrams, risk–coverage curves, thresholds — with optional fitting on base
//! validation images and writing of the fitted temperature and chosen threshold into the cache.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Axis};

use cac_edge::cache::{update_cache_metadata, CacheOpenOptions, TEMPERATURE_KEY, THRESHOLD_CALIBRATION_KEY, THRESHOLD_KEY};
use cac_edge::calibrate::{CacParams, Calibration, CalibrationSettings};
use cac_edge::dataset::LabeledSet;
use cac_edge::eval::{self, CacFit, Calibrator, EvalData, Split, TemperatureFit, ThresholdTarget};
use cac_edge::eval_report::{self, EvalReport, FailedImage, FitSummary, ImageSetSummary};
use cac_edge::features::{self, StoredFeatures};
use cac_edge::pipeline::{calibration_key, Classifier, ClassifierOptions};
use cac_edge::preprocess::DecodeLimits;

use crate::{CalibrationArgs, RuntimeArgs};

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    cache: PathBuf,
    /// Labeled images: a folder with one sub-folder per class (underscores stand for spaces),
    /// or a CSV of path,label (paths relative to the CSV; further columns are ignored).
    #[arg(long)]
    images: PathBuf,
    /// Validation images to fit on (same forms as --images). Only images of base classes are
    /// used: calibration is never fitted on new classes.
    #[arg(long)]
    fit_images: Option<PathBuf>,
    /// Also fit CAC's α and k on the base validation images (a grid minimising NLL).
    #[arg(long, requires = "fit_images")]
    fit_cac: bool,
    /// Equal-width (and equal-mass) bins of ECE, ACE, MCE and the reliability diagrams.
    #[arg(long, default_value_t = 15)]
    bins: usize,
    /// Choose thresholds reaching this precision (accuracy of accepted predictions) [default: 0.9].
    #[arg(long, conflicts_with = "target_coverage")]
    target_precision: Option<f64>,
    /// Choose thresholds keeping at least this fraction of predictions.
    #[arg(long)]
    target_coverage: Option<f64>,
    /// Store the threshold chosen for the calibration classify uses (split "all") in the cache,
    /// so classify uses it by default.
    #[arg(long)]
    write_threshold: bool,
    /// Do not store a fitted TS temperature in the cache.
    #[arg(long)]
    no_write_temperature: bool,
    /// Folder for report.json, REPORT.md and the plots.
    #[arg(long, default_value = "eval-report")]
    out: PathBuf,
    /// Images per encoder run.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Refuse images wider or taller than this before decoding them.
    #[arg(long, default_value_t = DecodeLimits::default().max_width)]
    max_image_side: u32,
    /// Skip hashing the cache data and the image encoders at start-up.
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    calibration: CalibrationArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl EvalArgs {
    fn target(&self) -> Result<ThresholdTarget> {
        let target = match (self.target_precision, self.target_coverage) {
            (_, Some(coverage)) => ThresholdTarget::Coverage(coverage),
            (precision, None) => ThresholdTarget::Precision(precision.unwrap_or(0.9)),
        };
        let (ThresholdTarget::Precision(value) | ThresholdTarget::Coverage(value)) = target;
        if !(value > 0.0 && value <= 1.0) {
            bail!("--target-precision and --target-coverage take a fraction in (0, 1], got {value}");
        }
        Ok(target)
    }

    fn limits(&self) -> DecodeLimits {
        DecodeLimits { max_width: self.max_image_side, max_height: self.max_image_side, ..DecodeLimits::default() }
    }
}

/// Logits and labels of the images of a set that could be encoded.
struct EncodedSet {
    set: LabeledSet,
    features: StoredFeatures,
    zero_shot: Array2<f32>,
    fine_tuned: Array2<f32>,
    labels: Vec<usize>,
}

impl EncodedSet {
    fn failures(&self) -> Vec<FailedImage> {
        self.features
            .failures
            .iter()
            .map(|(index, error)| FailedImage { path: self.set.images[*index].path.display().to_string(), error: error.clone() })
            .collect()
    }
}

pub(crate) fn run(args: &EvalArgs) -> Result<ExitCode> {
    if args.bins == 0 {
        bail!("--bins must be at least 1");
    }
    let target = args.target()?;
    let options = ClassifierOptions {
        ort_library: args.runtime.ort_lib.clone(),
        session: args.runtime.session_options(),
        // The calibrators are resolved here, after fitting; the classifier only encodes.
        calibration: CalibrationSettings { method: Some("none".into()), ..CalibrationSettings::default() },
        batch_size: args.batch_size,
        decode_limits: args.limits(),
        cache: CacheOpenOptions { verify_checksum: !args.no_verify },
        verify_bundle_files: !args.no_verify,
        ..ClassifierOptions::default()
    };
    let mut classifier = Classifier::open(&args.bundle, &args.cache, options)?;
    let evaluated = encode_set(&mut classifier, args, &args.images)?;
    let fitting = args.fit_images.as_ref().map(|path| encode_set(&mut classifier, args, path)).transpose()?;
    let mut notes = Vec::new();
    let fit = fitting.as_ref().map(|fitting| fit_calibrations(&classifier, fitting, args)).transpose()?;
    let stored_temperature = classifier.cache().stored_temperature();
    let temperature = fit.as_ref().and_then(|fit| fit.temperature.map(|fit| fit.temperature)).or(stored_temperature);
    let default = args
        .calibration
        .settings()
        .resolve(&classifier.bundle().manifest().calibration, temperature)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("resolving the calibration classify would use (bundle {})", args.bundle.display()))?;
    let calibrators = calibrators(&classifier, args, fit.as_ref(), stored_temperature, default, &mut notes);
    let data = EvalData {
        zero_shot: evaluated.zero_shot.view(),
        fine_tuned: evaluated.fine_tuned.view(),
        labels: &evaluated.labels,
        class_is_base: &(0..classifier.cache().num_classes()).map(|class| classifier.cache().is_base(class)).collect::<Vec<_>>(),
        dac_factors: classifier.cache().dac_factors(),
    };
    let reports = eval::evaluate(&data, &calibrators, args.bins, target)?;
    let default_name = calibrators.iter().find(|c| c.calibration == default).map(|c| c.name.clone()).unwrap_or_default();
    let mut written = Vec::new();
    let mut cache_updates: Vec<(&str, Option<String>)> = Vec::new();
    if let Some(TemperatureFit { temperature, .. }) = fit.as_ref().and_then(|fit| fit.temperature) {
        if !args.no_write_temperature {
            cache_updates.push((TEMPERATURE_KEY, Some(temperature.to_string())));
            written.push(format!("{TEMPERATURE_KEY} = {temperature}"));
        }
    }
    let mut unreachable = None;
    if args.write_threshold {
        let chosen = reports
            .iter()
            .find(|report| report.calibrator.name == default_name)
            .and_then(|report| report.split(Split::All))
            .and_then(|split| split.threshold);
        match chosen {
            Some(chosen) => {
                cache_updates.push((THRESHOLD_KEY, Some(chosen.threshold.to_string())));
                cache_updates.push((THRESHOLD_CALIBRATION_KEY, Some(calibration_key(&default))));
                written.push(format!("{THRESHOLD_KEY} = {} for {}", chosen.threshold, calibration_key(&default)));
            }
            None => {
                let message = format!(
                    "--write-threshold: no threshold reaches the target for the calibration classify uses ({}); \
                     lower the target or fit the calibration; no threshold was written",
                    default.name()
                );
                notes.push(message.clone());
                unreachable = Some(message);
            }
        }
    }
    let report = EvalReport {
        cac_edge_version: env!("CARGO_PKG_VERSION").to_string(),
        bundle: args.bundle.display().to_string(),
        cache: args.cache.display().to_string(),
        images: image_summary(&evaluated, &data),
        bins: args.bins,
        target,
        fit,
        default_calibrator: default_name,
        notes,
        written: written.clone(),
        calibrators: reports,
    };
    let files = eval_report::write(&args.out, &report).with_context(|| format!("writing the report to {}", args.out.display()))?;
    // The cache is rewritten last, and atomically, so a failed report changes nothing.
    if !cache_updates.is_empty() {
        update_cache_metadata(&args.cache, &cache_updates)?;
        for line in &written {
            eprintln!("wrote to {}: {line}", args.cache.display());
        }
    }
    print_summary(&report, &files);
    if let Some(message) = unreachable {
        bail!(message);
    }
    let failed = report.images.failures.len() + fitting.map_or(0, |fitting| fitting.features.failures.len());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Loads a labeled set and its image features: from the store beside the cache when its content
/// key matches, else by encoding (with a progress bar) and then storing them.
fn encode_set(classifier: &mut Classifier, args: &EvalArgs, source: &Path) -> Result<EncodedSet> {
    let set = LabeledSet::load(source, classifier.class_names())?;
    let paths = set.paths();
    let key = features::content_key(classifier, &paths);
    let store = features::store_path(&args.cache, &key);
    let features = match features::load(&store) {
        Ok(Some(features)) => {
            eprintln!("{}: {} images, features read from {}", source.display(), paths.len(), store.display());
            features
        }
        other => {
            if let Err(error) = other {
                eprintln!("warning: {error}; encoding again");
            }
            let bar = ProgressBar::new(paths.len() as u64).with_message(format!("encoding {}", source.display()));
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let features = features::compute(classifier, &paths, |done| bar.set_position(done as u64));
            bar.finish_and_clear();
            eprintln!("{}: {} images encoded, {} failed", source.display(), features.encoded.len(), features.failures.len());
            // A store that cannot be written costs only speed next time.
            if let Err(error) = features::save(&store, &features) {
                eprintln!("warning: image features not stored: {error}");
            }
            features
        }
    };
    for (index, error) in &features.failures {
        eprintln!("{}: {error}", set.images[*index].path.display());
    }
    let logits = classifier.logits_of_embeddings(&features.embeddings);
    let labels = features.encoded.iter().map(|&index| set.images[index].class).collect();
    Ok(EncodedSet { set, features, zero_shot: logits.zero_shot, fine_tuned: logits.fine_tuned, labels })
}

/// Fits TS (and CAC with --fit-cac) on the base-class images of the fitting set.
fn fit_calibrations(classifier: &Classifier, fitting: &EncodedSet, args: &EvalArgs) -> Result<FitSummary> {
    let base_rows: Vec<usize> =
        (0..fitting.labels.len()).filter(|&row| classifier.cache().is_base(fitting.labels[row])).collect();
    let skipped_new_images = fitting.labels.len() - base_rows.len();
    if base_rows.is_empty() {
        bail!(
            "{}: none of its images is of a base class; fitting uses base-class validation images only",
            fitting.set.source.display()
        );
    }
    let fine_tuned = fitting.fine_tuned.select(Axis(0), &base_rows);
    let zero_shot = fitting.zero_shot.select(Axis(0), &base_rows);
    let labels: Vec<usize> = base_rows.iter().map(|&row| fitting.labels[row]).collect();
    let temperature = eval::fit_temperature(fine_tuned.view(), &labels)?;
    let cac = if args.fit_cac {
        let start = bundle_cac(classifier).unwrap_or_else(CacParams::paper_defaults);
        Some(eval::fit_cac(fine_tuned.view(), zero_shot.view(), &labels, start)?)
    } else {
        None
    };
    Ok(FitSummary {
        source: fitting.set.source.display().to_string(),
        base_images: base_rows.len(),
        skipped_new_images,
        temperature: Some(temperature),
        cac,
    })
}

/// The calibrators compared: none, ts (fitted, given or stored), dac, CAC with the paper's
/// defaults, the bundle's CAC, fitted CAC, and whatever the command line asks for.
fn calibrators(
    classifier: &Classifier,
    args: &EvalArgs,
    fit: Option<&FitSummary>,
    stored_temperature: Option<f64>,
    default: Calibration,
    notes: &mut Vec<String>,
) -> Vec<Calibrator> {
    let named = |name: &str, calibration, origin: String| Calibrator { name: name.into(), calibration, origin };
    let mut list = vec![named("none", Calibration::None, "uncalibrated softmax of the fine-tuned logits".into())];
    let fitted = fit.and_then(|fit| fit.temperature.map(|t| (t.temperature, format!("fitted on {} base validation images", fit.base_images))));
    let given = args.calibration.temperature.map(|t| (t, "--temperature".to_string()));
    let stored = stored_temperature.map(|t| (t, format!("stored in {}", args.cache.display())));
    match given.or(fitted).or(stored) {
        Some((temperature, origin)) => list.push(named("ts", Calibration::Ts { temperature }, format!("T = {temperature:.4}, {origin}"))),
        None => notes.push("ts not evaluated: no temperature (give --fit-images with base validation images)".into()),
    }
    list.push(named("dac", Calibration::Dac, "per-class factors from the cache (Wang et al., 2024)".into()));
    list.push(named("cac-paper", Calibration::Cac(CacParams::paper_defaults()), "paper defaults: α 1.10, k 15, logit contrast".into()));
    if let Some(params) = bundle_cac(classifier) {
        list.push(named("cac-bundle", Calibration::Cac(params), "the bundle's [calibration]".into()));
    }
    if let Some(CacFit { params, .. }) = fit.and_then(|fit| fit.cac) {
        list.push(named("cac-fit", Calibration::Cac(params), "fitted on base validation images (NLL grid)".into()));
    }
    if !list.iter().any(|calibrator| calibrator.calibration == default) {
        list.push(named("requested", default, "the command line's calibration options".into()));
    }
    // The same calibration under two names is evaluated once, under its first name.
    let mut unique: Vec<Calibrator> = Vec::new();
    for calibrator in list {
        if !unique.iter().any(|kept| kept.calibration == calibrator.calibration) {
            unique.push(calibrator);
        }
    }
    unique
}

/// The bundle's own CAC setting (its `[calibration]` table), if it names CAC.
fn bundle_cac(classifier: &Classifier) -> Option<CacParams> {
    match classifier.bundle().manifest().calibration.resolve(&CalibrationSettings::default(), None) {
        Ok(Calibration::Cac(params)) => Some(params),
        _ => None,
    }
}

fn image_summary(evaluated: &EncodedSet, data: &EvalData<'_>) -> ImageSetSummary {
    let base = evaluated.labels.iter().filter(|&&label| data.class_is_base[label]).count();
    ImageSetSummary {
        source: evaluated.set.source.display().to_string(),
        total: evaluated.set.images.len(),
        evaluated: evaluated.labels.len(),
        base,
        new: evaluated.labels.len() - base,
        failures: evaluated.failures(),
    }
}

fn print_summary(report: &EvalReport, files: &[PathBuf]) {
    println!("{:<12} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}", "calibrator", "split", "images", "acc %", "ECE %", "NLL", "thresh");
    for calibrator in &report.calibrators {
        for split in &calibrator.splits {
            let threshold = split.threshold.map_or_else(|| "-".to_string(), |choice| format!("{:.3}", choice.threshold));
            println!(
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
    for file in files {
        eprintln!("wrote {}", file.display());
    }
}
