//! The files of an `eval` report: `report.json` (every number, per-bin tables), `REPORT.md` (one
//! page a person reads, embedding the plots), `reliability.{png,svg}` (rows = splits, columns =
//! calibrators) and `risk-coverage-<split>.{png,svg}`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::bundle::Precision;
use crate::tooling::eval::{CacFit, CalibratorReport, Split, TemperatureFit, ThresholdTarget};
use crate::tooling::plots::{self, ReliabilityPanel};

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The report folder or a file in it could not be created or written.
    #[error("{path}: {source}")]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A plot could not be drawn or written.
    #[error(transparent)]
    Plot(#[from] plots::PlotError),
    /// The report could not be serialised to JSON.
    #[error("serialising the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// An image left out of the evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct FailedImage {
    /// The file.
    pub path: String,
    /// Why it could not be classified.
    pub error: String,
}

/// The labeled images evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSetSummary {
    /// The folder or CSV they were read from.
    pub source: String,
    /// Images listed.
    pub total: usize,
    /// Images classified and counted.
    pub evaluated: usize,
    /// Evaluated images of base classes.
    pub base: usize,
    /// Evaluated images of new classes.
    pub new: usize,
    /// Images that could not be classified, with why.
    pub failures: Vec<FailedImage>,
}

/// What was fitted on the fitting set's base-class images.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary {
    /// The folder or CSV of the fitting set.
    pub source: String,
    /// Base-class images fitted on.
    pub base_images: usize,
    /// Images of new classes in the fitting set, left out (calibration is never fitted on them).
    pub skipped_new_images: usize,
    /// The fitted TS temperature.
    pub temperature: Option<TemperatureFit>,
    /// The fitted CAC parameters, when asked for.
    pub cac: Option<CacFit>,
}

/// Everything an `eval` run found: `report.json` as a value.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The cac-edge version that ran it.
    pub cac_edge_version: String,
    /// The bundle directory.
    pub bundle: String,
    /// The cache file.
    pub cache: String,
    /// The images evaluated.
    pub images: ImageSetSummary,
    /// Number of reliability bins.
    pub bins: usize,
    /// What the suggested thresholds must achieve.
    pub target: ThresholdTarget,
    /// What was fitted, when a fitting set was given.
    pub fit: Option<FitSummary>,
    /// The calibrator `classify` uses with these options (after writing a fitted temperature).
    pub default_calibrator: String,
    /// Remarks for the reader (a calibrator not evaluated, a threshold not reached).
    pub notes: Vec<String>,
    /// What was stored in the cache's metadata.
    pub written: Vec<String>,
    /// Every calibrator's numbers.
    pub calibrators: Vec<CalibratorReport>,
    /// The image encoders' precision the numbers are for.
    pub precision: Precision,
    /// For a precision other than fp32: the same calibrators on the fp32 encoders, side by side.
    pub precision_comparison: Option<PrecisionComparison>,
}

/// A quantised path against the fp32 one, on the same images and calibrators.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionComparison {
    /// The precision evaluated (int8).
    pub precision: Precision,
    /// Images both paths encoded.
    pub images: usize,
    /// Of those, the share whose predicted class is the same on both paths, in percent.
    pub label_agreement_percent: f64,
    /// Per calibrator and split: accuracy and ECE on both paths.
    pub rows: Vec<PrecisionRow>,
}

/// One calibrator on one split, on the fp32 path and the other.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionRow {
    /// The calibrator's name.
    pub calibrator: String,
    /// The split.
    pub split: Split,
    /// Accuracy on fp32, in percent.
    pub fp32_accuracy_percent: f64,
    /// Accuracy on the other precision, in percent.
    pub accuracy_percent: f64,
    /// ECE on fp32, in percent.
    pub fp32_ece_percent: f64,
    /// ECE on the other precision, in percent.
    pub ece_percent: f64,
}

impl PrecisionComparison {
    /// Pairs the rows of the two runs' reports by calibrator name and split.
    pub fn of(
        precision: Precision,
        images: usize,
        label_agreement_percent: f64,
        reports: &[CalibratorReport],
        fp32_reports: &[CalibratorReport],
    ) -> PrecisionComparison {
        let mut rows = Vec::new();
        for report in reports {
            let Some(reference) = fp32_reports.iter().find(|other| other.calibrator.name == report.calibrator.name) else {
                continue;
            };
            for split in &report.splits {
                if let Some(fp32) = reference.split(split.split) {
                    rows.push(PrecisionRow {
                        calibrator: report.calibrator.name.clone(),
                        split: split.split,
                        fp32_accuracy_percent: fp32.accuracy_percent,
                        accuracy_percent: split.accuracy_percent,
                        fp32_ece_percent: fp32.ece_percent,
                        ece_percent: split.ece_percent,
                    });
                }
            }
        }
        PrecisionComparison { precision, images, label_agreement_percent, rows }
    }
}

/// Writes every file of the report into `dir` (created if needed); returns their paths.
pub fn write(dir: &Path, report: &EvalReport) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io { path: dir.to_path_buf(), source })?;
    let mut files = Vec::new();
    files.extend(write_reliability(dir, report)?);
    for split in Split::ALL {
        files.extend(write_risk_coverage(dir, report, split)?);
    }
    let json = dir.join("report.json");
    write_file(&json, &serde_json::to_string_pretty(report)?)?;
    files.push(json);
    let markdown = dir.join("REPORT.md");
    write_file(&markdown, &markdown_page(report))?;
    files.push(markdown);
    Ok(files)
}

/// Written atomically and durably ([`crate::fsio`]), so a reader never sees half a report.
fn write_file(path: &Path, text: &str) -> Result<(), ReportError> {
    crate::fsio::write_atomic_bytes(path, text.as_bytes()).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })
}

fn write_reliability(dir: &Path, report: &EvalReport) -> Result<Vec<PathBuf>, ReportError> {
    let mut titles = Vec::new();
    let mut rows = 0;
    let mut bins_of = Vec::new();
    for split in Split::ALL {
        let splits: Vec<_> =
            report.calibrators.iter().filter_map(|calibrator| calibrator.split(split).map(|s| (calibrator, s))).collect();
        if splits.is_empty() {
            continue;
        }
        rows += 1;
        for (calibrator, split_report) in splits {
            titles.push(format!("{} · {}", split.name(), calibrator.calibrator.name));
            bins_of.push(split_report);
        }
    }
    let panels: Vec<ReliabilityPanel<'_>> = titles
        .iter()
        .zip(&bins_of)
        .map(|(title, split)| ReliabilityPanel {
            title,
            bins: &split.reliability,
            ece_percent: split.ece_percent,
            samples: split.images,
        })
        .collect();
    let cols = report.calibrators.len();
    let heading = format!("Reliability ({} bins): {}", report.bins, report.bundle);
    Ok(plots::reliability_grid(&dir.join("reliability"), &heading, rows, cols, &panels)?)
}

fn write_risk_coverage(dir: &Path, report: &EvalReport, split: Split) -> Result<Vec<PathBuf>, ReportError> {
    let curves: Vec<(&str, &[crate::tooling::metrics::RiskCoveragePoint])> = report
        .calibrators
        .iter()
        .filter_map(|calibrator| {
            calibrator.split(split).map(|s| (calibrator.calibrator.name.as_str(), s.risk_coverage.as_slice()))
        })
        .collect();
    if curves.is_empty() {
        return Ok(Vec::new());
    }
    let title = format!("Risk–coverage, {} classes", split.name());
    Ok(plots::risk_coverage(&dir.join(format!("risk-coverage-{}", split.name())), &title, &curves)?)
}

fn target_text(target: ThresholdTarget) -> String {
    match target {
        ThresholdTarget::Precision(value) => format!("precision ≥ {:.1} %", 100.0 * value),
        ThresholdTarget::Coverage(value) => format!("coverage ≥ {:.1} %", 100.0 * value),
    }
}

fn markdown_page(report: &EvalReport) -> String {
    let mut page = String::new();
    let images = &report.images;
    let _ = writeln!(page, "# Calibration report\n");
    let _ = writeln!(page, "- bundle: `{}`; cache: `{}`", report.bundle, report.cache);
    let _ = writeln!(
        page,
        "- images: `{}`: {} evaluated ({} of base classes, {} of new classes), {} failed",
        images.source,
        images.evaluated,
        images.base,
        images.new,
        images.failures.len()
    );
    let _ = writeln!(page, "- {} equal-width bins, right-closed (lo, hi]; ACE uses {} equal-mass bins", report.bins, report.bins);
    let _ =
        writeln!(page, "- thresholds: the smallest reaching {} (accept when confidence ≥ threshold)", target_text(report.target));
    let _ = writeln!(page, "- the calibration `classify` uses with these options: **{}**", report.default_calibrator);
    let _ = writeln!(page, "- image encoders: {}", report.precision);
    if let Some(fit) = &report.fit {
        let _ = writeln!(
            page,
            "- fitted on `{}`: {} base-class images ({} new-class images left out)",
            fit.source, fit.base_images, fit.skipped_new_images
        );
        if let Some(temperature) = fit.temperature {
            let _ = writeln!(
                page,
                "  - TS: T = {:.4} (NLL {:.4} → {:.4})",
                temperature.temperature, temperature.nll_before, temperature.nll_after
            );
        }
        if let Some(cac) = fit.cac {
            let _ = writeln!(
                page,
                "  - CAC: α = {:.2}, k = {:.3} (NLL {:.4} → {:.4}){}",
                cac.params.alpha,
                cac.params.k,
                cac.nll_start,
                cac.nll,
                if cac.at_grid_edge {
                    "; on the edge of the search grid — at the largest k the contrast term is off and a constant weight fits best"
                } else {
                    ""
                }
            );
        }
    }
    for line in report.notes.iter().chain(&report.written) {
        let _ = writeln!(page, "- {line}");
    }
    page.push('\n');
    let _ = writeln!(page, "Accuracy is the same for every calibrator: calibration rescales the logits of each image and never changes its prediction.\n");
    for split in Split::ALL {
        split_table(&mut page, report, split);
    }
    harmonic_means(&mut page, report);
    precision_table(&mut page, report);
    let _ = writeln!(page, "## Reliability diagrams\n");
    let _ = writeln!(page, "Bars: accuracy per confidence bin (bin counts above them); shaded: the gap to the bin's mean confidence; a calibrated model sits on the diagonal.\n");
    let _ = writeln!(page, "![reliability diagrams](reliability.png)\n");
    let _ = writeln!(page, "## Risk–coverage\n");
    for split in Split::ALL {
        if report.calibrators.iter().any(|calibrator| calibrator.split(split).is_some()) {
            let _ = writeln!(page, "![risk–coverage, {0}](risk-coverage-{0}.png)\n", split.name());
        }
    }
    let _ = writeln!(page, "## Calibrators\n");
    for calibrator in &report.calibrators {
        let parameters = serde_json::to_string(&calibrator.calibrator.calibration).unwrap_or_default();
        let _ = writeln!(page, "- **{}**: {} — `{}`", calibrator.calibrator.name, calibrator.calibrator.origin, parameters);
    }
    if !images.failures.is_empty() {
        let _ = writeln!(page, "\n## Images that failed\n");
        for failure in &images.failures {
            let _ = writeln!(page, "- `{}`: {}", failure.path, failure.error);
        }
    }
    let _ = writeln!(page, "\nEvery number, with per-bin tables, is in report.json.");
    page
}

fn split_table(page: &mut String, report: &EvalReport, split: Split) {
    let rows: Vec<_> =
        report.calibrators.iter().filter_map(|calibrator| calibrator.split(split).map(|s| (calibrator, s))).collect();
    let Some((_, first)) = rows.first() else { return };
    let _ = writeln!(page, "## {} classes ({} images, accuracy {:.2} %)\n", split.name(), first.images, first.accuracy_percent);
    let _ =
        writeln!(page, "| calibrator | ECE % | ACE % | MCE % | NLL | Brier | AURC % | threshold | coverage % | precision % |");
    let _ = writeln!(page, "|---|---|---|---|---|---|---|---|---|---|");
    for (calibrator, numbers) in rows {
        let threshold = numbers.threshold.map_or_else(
            || "unreachable | – | –".to_string(),
            |choice| format!("{:.4} | {:.1} | {:.1}", choice.threshold, choice.coverage_percent, choice.precision_percent),
        );
        let _ = writeln!(
            page,
            "| {} | {:.2} | {:.2} | {:.2} | {:.4} | {:.4} | {:.2} | {} |",
            calibrator.calibrator.name,
            numbers.ece_percent,
            numbers.ace_percent,
            numbers.mce_percent,
            numbers.nll,
            numbers.brier,
            numbers.aurc_percent,
            threshold
        );
    }
    page.push('\n');
}

fn precision_table(page: &mut String, report: &EvalReport) {
    let Some(comparison) = &report.precision_comparison else { return };
    let name = comparison.precision;
    let _ = writeln!(page, "## {name} against fp32 image encoders\n");
    let _ = writeln!(
        page,
        "Same images, same calibrators, the encoders' precision the only change. {} images encoded by both; \
         predicted class the same on {:.2} %.\n",
        comparison.images, comparison.label_agreement_percent
    );
    let _ = writeln!(
        page,
        "| calibrator | split | accuracy % fp32 | accuracy % {name} | ECE % fp32 | ECE % {name} | ΔECE (points) |"
    );
    let _ = writeln!(page, "|---|---|---|---|---|---|---|");
    for row in &comparison.rows {
        let _ = writeln!(
            page,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:+.2} |",
            row.calibrator,
            row.split.name(),
            row.fp32_accuracy_percent,
            row.accuracy_percent,
            row.fp32_ece_percent,
            row.ece_percent,
            row.ece_percent - row.fp32_ece_percent
        );
    }
    page.push('\n');
}

fn harmonic_means(page: &mut String, report: &EvalReport) {
    let Some(first) = report.calibrators.first() else { return };
    if first.split(Split::Base).is_some() && first.split(Split::New).is_some() {
        let _ = writeln!(page, "Harmonic mean of base and new accuracy: {:.2} %\n", first.harmonic_mean_accuracy_percent);
    }
}
