//! `eval`'s run sequence, as a library call: load the labeled sets and their image features
//! (stored beside the cache, or encoded and stored), fit on base validation images, compare the
//! calibrators, choose thresholds, write the report, and — last, atomically, and only when asked —
//! store the fitted temperature and the chosen threshold in the cache.
//!
//! The command line only translates its flags into an [`EvalRequest`], draws the progress bar
//! and prints the summary table.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, Axis};

use crate::bundle::Precision;
use crate::cache::{update_cache_metadata, CacheError, EVAL_METADATA_KEYS, TEMPERATURE_KEY};
use crate::calibrate::{
    argmax, logit_contrast, probability_contrast, softmax, CacParams, Calibration, CalibrationMethod, CalibrationSettings,
    ContrastDistance,
};
use crate::calibration_path::{CalibrationPath, CALIBRATION_PATH_KEY};
use crate::drift::{Distribution, DriftBaseline, BASELINE_KEY, MIN_BASELINE_IMAGES};
use crate::pipeline::{row_slice, Classifier, ClassifierOptions, PipelineError};
use crate::runtime::Runtime;
use crate::threshold::{calibration_key, stored_threshold_entries};
use crate::tooling::dataset::{DatasetError, LabeledSet};
use crate::tooling::eval::{self, CacFit, Calibrator, EvalData, EvalError, Split, TemperatureFit, ThresholdTarget};
use crate::tooling::eval_report::{self, EvalReport, FailedImage, FitSummary, ImageSetSummary, PrecisionComparison, ReportError};
use crate::tooling::features::{self, StoredFeatures};

/// What to evaluate, and what to write.
#[derive(Debug, Clone)]
pub struct EvalRequest<'a> {
    /// The bundle directory.
    pub bundle: &'a Path,
    /// The cache (also where fitted values are stored, and beside which image features are kept).
    pub cache: &'a Path,
    /// The labeled images to evaluate on (see [`LabeledSet::load`]).
    pub images: &'a Path,
    /// Labeled validation images to fit on; only their base-class images are used.
    pub fit_images: Option<&'a Path>,
    /// Also fit CAC's α and k (needs `fit_images`).
    pub fit_cac: bool,
    /// Bins of ECE, ACE, MCE and the reliability diagrams.
    pub bins: usize,
    /// What the chosen thresholds must reach.
    pub target: ThresholdTarget,
    /// Store the threshold chosen for the calibration `classify` uses in the cache.
    pub write_threshold: bool,
    /// Store a fitted TS temperature in the cache.
    pub write_temperature: bool,
    /// Store the distributions of d(x) and of the max-probability on `images` in the cache (the
    /// shift alarm's baseline, [`crate::drift`]).
    pub write_drift_baseline: bool,
    /// The report's folder.
    pub out: &'a Path,
    /// The calibration options given (what `classify` would be run with).
    pub calibration: CalibrationSettings,
    /// How the images are decoded and encoded (the calibration in it is ignored).
    pub classifier: ClassifierOptions,
}

/// Where the encoding of a labeled set stands (for a progress bar).
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// Encoding `total` images of `source` begins.
    Start {
        /// The labeled set.
        source: &'a Path,
        /// Its image count.
        total: usize,
    },
    /// This many images are done.
    Done(usize),
    /// The set is encoded.
    Finish,
}

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalRunError {
    /// The classifier could not be opened or run.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A labeled set is invalid.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Metrics or fitting failed.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// The report could not be written.
    #[error("writing the report: {0}")]
    Report(#[from] ReportError),
    /// The cache could not be updated.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The calibration options do not resolve.
    #[error("calibration options (bundle {bundle}): {message}")]
    Calibration {
        /// The bundle whose `[calibration]` was merged.
        bundle: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Fitting was asked for, but the fitting set holds no base-class image.
    #[error("{set}: none of its images is of a base class; fitting uses base-class validation images only")]
    NoBaseImages {
        /// The fitting set.
        set: PathBuf,
    },
}

/// What an evaluation produced.
#[derive(Debug)]
pub struct EvalOutcome {
    /// Every number of the report.
    pub report: EvalReport,
    /// The files written into the report folder.
    pub files: Vec<PathBuf>,
    /// Set when a threshold was to be written but none could be (nothing was written): none
    /// reaches the target, or it would be for a TS temperature that is not stored.
    pub unreachable_threshold: Option<String>,
    /// Images of both sets that could not be encoded (listed in the report).
    pub failed_images: usize,
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

/// Runs an evaluation (see the module docs). `progress` follows the encoding of each set.
pub fn run_eval(
    runtime: &Arc<Runtime>,
    request: &EvalRequest<'_>,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<EvalOutcome, EvalRunError> {
    if request.bins == 0 {
        return Err(EvalError::Input("at least one bin is needed".into()).into());
    }
    let (ThresholdTarget::Precision(target) | ThresholdTarget::Coverage(target)) = request.target;
    if !(target > 0.0 && target <= 1.0) {
        return Err(EvalError::Input(format!("a threshold target is a fraction in (0, 1], got {target}")).into());
    }
    // The calibrators are resolved here, after fitting; the classifier only encodes.
    // Every calibrator is compared on the same passes, so both image encoders run.
    let options = ClassifierOptions {
        calibration: CalibrationSettings::method(CalibrationMethod::None),
        encode_both_images: true,
        ..request.classifier.clone()
    };
    let mut classifier = Classifier::open(runtime, request.bundle, request.cache, options)?;
    let evaluated = encode_set(&mut classifier, request.cache, request.images, &mut progress)?;
    let fitting = request.fit_images.map(|path| encode_set(&mut classifier, request.cache, path, &mut progress)).transpose()?;
    let mut notes = Vec::new();
    let fit = fitting.as_ref().map(|fitting| fit_calibrations(&classifier, fitting, request.fit_cac)).transpose()?;
    let stored_temperature = classifier.cache().stored_temperature();
    let fitted_temperature = fit.as_ref().and_then(|fit| fit.temperature.map(|fit| fit.temperature));
    let temperature = fitted_temperature.or(stored_temperature);
    let default = request
        .calibration
        .resolve(&classifier.bundle().manifest().calibration, temperature)
        .map_err(|message| EvalRunError::Calibration { bundle: request.bundle.to_path_buf(), message })?;
    let calibrators = calibrators(&classifier, request, fit.as_ref(), stored_temperature, default, &mut notes);
    let class_is_base: Vec<bool> = (0..classifier.cache().num_classes()).map(|class| classifier.cache().is_base(class)).collect();
    let data = EvalData {
        zero_shot: evaluated.zero_shot.view(),
        fine_tuned: evaluated.fine_tuned.view(),
        labels: &evaluated.labels,
        class_is_base: &class_is_base,
        dac_factors: classifier.cache().dac_factors(),
    };
    let reports = eval::evaluate(&data, &calibrators, request.bins, request.target)?;
    let precision = classifier.precision();
    let precision_comparison = match precision {
        Precision::Fp32 => None,
        _ => Some(compare_with_fp32(runtime, request, &evaluated, &calibrators, &class_is_base, &reports, &mut progress)?),
    };
    let default_name = calibrators.iter().find(|c| c.calibration == default).map(|c| c.name.clone()).unwrap_or_default();
    let mut written = Vec::new();
    let mut cache_updates: Vec<(&str, Option<String>)> = Vec::new();
    if let Some(TemperatureFit { temperature, .. }) = fit.as_ref().and_then(|fit| fit.temperature) {
        if request.write_temperature {
            cache_updates.push((TEMPERATURE_KEY, Some(temperature.to_string())));
            written.push(format!("{TEMPERATURE_KEY} = {temperature}"));
        }
    }
    let mut unreachable_threshold = None;
    // A threshold chosen for TS with a temperature fitted now means nothing to classify unless
    // that temperature is stored too (or given again on its command line).
    let unstored_temperature = match default {
        Calibration::Ts { temperature } => {
            Some(temperature) == fitted_temperature && fitted_temperature != stored_temperature && !request.write_temperature
        }
        _ => false,
    };
    if request.write_threshold && unstored_temperature {
        let message = "the threshold would be for TS with the temperature fitted now, which is not stored; \
                       store it too (write the temperature) or give the temperature; no threshold was written"
            .to_string();
        notes.push(message.clone());
        unreachable_threshold = Some(message);
    } else if request.write_threshold {
        let chosen = reports
            .iter()
            .find(|report| report.calibrator.name == default_name)
            .and_then(|report| report.split(Split::All))
            .and_then(|split| split.threshold);
        match chosen {
            Some(chosen) => {
                cache_updates.extend(stored_threshold_entries(chosen.threshold, &default));
                written.push(format!("threshold = {} for {}", chosen.threshold, calibration_key(&default)));
            }
            None => {
                let message = format!(
                    "no threshold reaches the target for the calibration classify uses ({}); \
                     lower the target or fit the calibration; no threshold was written",
                    default.name()
                );
                notes.push(message.clone());
                unreachable_threshold = Some(message);
            }
        }
    }
    if request.write_drift_baseline {
        match drift_baseline(&data, &default) {
            Some(baseline) => {
                let json = serde_json::to_string(&baseline).map_err(|error| EvalError::Input(error.to_string()))?;
                cache_updates.push((BASELINE_KEY, Some(json)));
                written.push(format!(
                    "{BASELINE_KEY} from {} images (d(x) median {:.4})",
                    baseline.images, baseline.contrast.percentiles[49]
                ));
            }
            None => notes.push(format!("no drift baseline written: it needs at least {MIN_BASELINE_IMAGES} evaluated images")),
        }
    }
    let report = EvalReport {
        cac_edge_version: env!("CARGO_PKG_VERSION").to_string(),
        bundle: request.bundle.display().to_string(),
        cache: request.cache.display().to_string(),
        images: image_summary(&evaluated, &data),
        bins: request.bins,
        target: request.target,
        fit,
        default_calibrator: default_name,
        notes,
        written: written.clone(),
        calibrators: reports,
        precision,
        precision_comparison,
    };
    let files = eval_report::write(request.out, &report)?;
    // What was fitted belongs to the path it was measured on; classify and serve compare it with
    // theirs (crate::calibration_path).
    if !cache_updates.is_empty() {
        let path = classifier.calibration_path();
        let metadata = classifier.cache().metadata();
        let stored_path = CalibrationPath::stored(metadata.get(CALIBRATION_PATH_KEY), classifier.bundle());
        if stored_path != path {
            // Values fitted earlier on another path and not refitted now would be recorded as
            // fitted on this one: they are removed instead, and said so.
            let refitted: Vec<&str> = cache_updates.iter().map(|(key, _)| *key).collect();
            for key in EVAL_METADATA_KEYS.into_iter().filter(|key| *key != CALIBRATION_PATH_KEY) {
                if metadata.contains_key(key) && !refitted.contains(&key) {
                    cache_updates.push((key, None));
                    written.push(format!("removed {key}: it was fitted on another inference path"));
                }
            }
        }
        cache_updates.push((CALIBRATION_PATH_KEY, path.map(|path| path.to_json())));
    }
    // The cache is rewritten last, and atomically, so a failed report changes nothing.
    if !cache_updates.is_empty() {
        update_cache_metadata(request.cache, &cache_updates)?;
        for line in &written {
            tracing::info!("wrote to {}: {line}", request.cache.display());
        }
    }
    let failed_images = report.images.failures.len() + fitting.map_or(0, |fitting| fitting.features.failures.len());
    Ok(EvalOutcome { report, files, unreachable_threshold, failed_images })
}

/// The same images and calibrators through the fp32 image encoders, beside a quantised run.
fn compare_with_fp32(
    runtime: &Arc<Runtime>,
    request: &EvalRequest<'_>,
    evaluated: &EncodedSet,
    calibrators: &[Calibrator],
    class_is_base: &[bool],
    reports: &[eval::CalibratorReport],
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<PrecisionComparison, EvalRunError> {
    let options = ClassifierOptions {
        calibration: CalibrationSettings::method(CalibrationMethod::None),
        precision: Precision::Fp32,
        strict: false,
        encode_both_images: true,
        ..request.classifier.clone()
    };
    let mut reference = Classifier::open(runtime, request.bundle, request.cache, options)?;
    let fp32 = encode_set(&mut reference, request.cache, request.images, progress)?;
    let data = EvalData {
        zero_shot: fp32.zero_shot.view(),
        fine_tuned: fp32.fine_tuned.view(),
        labels: &fp32.labels,
        class_is_base,
        dac_factors: reference.cache().dac_factors(),
    };
    let fp32_reports = eval::evaluate(&data, calibrators, request.bins, request.target)?;
    // Label agreement on the images both paths encoded (a failure is the same file either way,
    // but the rows are matched by image index to be sure).
    let fp32_rows: std::collections::HashMap<usize, usize> =
        fp32.features.encoded.iter().enumerate().map(|(row, &image)| (image, row)).collect();
    let mut both = 0;
    let mut agree = 0;
    for (row, image) in evaluated.features.encoded.iter().enumerate() {
        if let Some(&fp32_row) = fp32_rows.get(image) {
            both += 1;
            let predicted = |logits: &Array2<f32>, row: usize| argmax(&row_slice(logits.row(row)));
            agree += usize::from(predicted(&evaluated.fine_tuned, row) == predicted(&fp32.fine_tuned, fp32_row));
        }
    }
    let agreement = if both == 0 { 0.0 } else { 100.0 * agree as f64 / both as f64 };
    Ok(PrecisionComparison::of(request.classifier.precision, both, agreement, reports, &fp32_reports))
}

/// The shift alarm's baseline: d(x) as `calibration` measures it (CAC's distance; the logit
/// distance for other calibrations) and the uncalibrated max-probability, on every image.
fn drift_baseline(data: &EvalData<'_>, calibration: &Calibration) -> Option<DriftBaseline> {
    let distance = match calibration {
        Calibration::Cac(params) => params.distance,
        _ => ContrastDistance::Logits,
    };
    let mut contrasts = Vec::with_capacity(data.labels.len());
    let mut max_probabilities = Vec::with_capacity(data.labels.len());
    for (fine_tuned, zero_shot) in data.fine_tuned.rows().into_iter().zip(data.zero_shot.rows()) {
        let (fine_tuned, zero_shot) = (fine_tuned.to_vec(), zero_shot.to_vec());
        contrasts.push(match distance {
            ContrastDistance::Logits => logit_contrast(&fine_tuned, &zero_shot),
            ContrastDistance::Probs => probability_contrast(&fine_tuned, &zero_shot),
        });
        max_probabilities.push(softmax(&fine_tuned, 1.0).into_iter().fold(0.0, f64::max));
    }
    Some(DriftBaseline {
        version: 1,
        distance: distance.name().to_string(),
        images: contrasts.len(),
        contrast: Distribution::of(&contrasts)?,
        max_probability: Distribution::of(&max_probabilities)?,
    })
}

/// Loads a labeled set and its image features: from the store beside the cache when its content
/// key matches, else by encoding and then storing them.
fn encode_set(
    classifier: &mut Classifier,
    cache: &Path,
    source: &Path,
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<EncodedSet, EvalRunError> {
    let set = LabeledSet::load(source, classifier.class_names())?;
    let paths = set.paths();
    let key = features::content_key(classifier, &paths);
    let store = features::store_path(cache, &key);
    let features = match features::load(&store) {
        Ok(Some(features)) => {
            tracing::info!("{}: {} images, features read from {}", source.display(), paths.len(), store.display());
            features
        }
        other => {
            if let Err(error) = other {
                tracing::warn!("{error}; encoding again");
            }
            progress(Progress::Start { source, total: paths.len() });
            let features = features::compute(classifier, &paths, |done| progress(Progress::Done(done)));
            progress(Progress::Finish);
            tracing::info!("{}: {} images encoded, {} failed", source.display(), features.encoded.len(), features.failures.len());
            // A store that cannot be written costs only speed next time.
            if let Err(error) = features::save(&store, &features) {
                tracing::warn!("image features not stored: {error}");
            }
            features
        }
    };
    for (index, error) in &features.failures {
        tracing::warn!("{}: {error}", set.images[*index].path.display());
    }
    let logits = classifier.logits_of_embeddings(&features.embeddings);
    let labels = features.encoded.iter().map(|&index| set.images[index].class).collect();
    Ok(EncodedSet { set, features, zero_shot: logits.zero_shot, fine_tuned: logits.fine_tuned, labels })
}

/// Fits TS (and CAC when asked) on the base-class images of the fitting set.
fn fit_calibrations(classifier: &Classifier, fitting: &EncodedSet, fit_cac: bool) -> Result<FitSummary, EvalRunError> {
    let base_rows: Vec<usize> =
        (0..fitting.labels.len()).filter(|&row| classifier.cache().is_base(fitting.labels[row])).collect();
    let skipped_new_images = fitting.labels.len() - base_rows.len();
    if base_rows.is_empty() {
        return Err(EvalRunError::NoBaseImages { set: fitting.set.source.clone() });
    }
    let fine_tuned = fitting.fine_tuned.select(Axis(0), &base_rows);
    let zero_shot = fitting.zero_shot.select(Axis(0), &base_rows);
    let labels: Vec<usize> = base_rows.iter().map(|&row| fitting.labels[row]).collect();
    let temperature = eval::fit_temperature(fine_tuned.view(), &labels)?;
    let cac = if fit_cac {
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
    request: &EvalRequest<'_>,
    fit: Option<&FitSummary>,
    stored_temperature: Option<f64>,
    default: Calibration,
    notes: &mut Vec<String>,
) -> Vec<Calibrator> {
    let named = |name: &str, calibration, origin: String| Calibrator { name: name.into(), calibration, origin };
    let mut list = vec![named("none", Calibration::None, "uncalibrated softmax of the fine-tuned logits".into())];
    let fitted = fit.and_then(|fit| {
        fit.temperature.map(|t| (t.temperature, format!("fitted on {} base validation images", fit.base_images)))
    });
    let given = request.calibration.temperature.map(|t| (t, "given".to_string()));
    let stored = stored_temperature.map(|t| (t, format!("stored in {}", request.cache.display())));
    match given.or(fitted).or(stored) {
        Some((temperature, origin)) => {
            list.push(named("ts", Calibration::Ts { temperature }, format!("T = {temperature:.4}, {origin}")))
        }
        None => notes.push("ts not evaluated: no temperature (fit one on base validation images)".into()),
    }
    list.push(named("dac", Calibration::Dac, "per-class factors from the cache (Wang et al., 2024)".into()));
    list.push(named(
        "cac-paper",
        Calibration::Cac(CacParams::paper_defaults()),
        "paper defaults: α 1.10, k 15, logit contrast".into(),
    ));
    if let Some(params) = bundle_cac(classifier) {
        list.push(named("cac-bundle", Calibration::Cac(params), "the bundle's [calibration]".into()));
    }
    if let Some(CacFit { params, .. }) = fit.and_then(|fit| fit.cac) {
        list.push(named("cac-fit", Calibration::Cac(params), "fitted on base validation images (NLL grid)".into()));
    }
    if !list.iter().any(|calibrator| calibrator.calibration == default) {
        list.push(named("requested", default, "the calibration options given".into()));
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
