//! Measures the shift alarm (src/drift.rs) on mini-world frames the service never saw: false
//! alarms per 10 000 in-distribution frames, and frames until the alarm for each kind of shift,
//! for three monitors with the same window and hysteresis rule:
//! - `psi d(x)`: the service's, PSI of CAC's contrast against the cache's baseline;
//! - `ks d(x)`: a Kolmogorov–Smirnov distance of the same window (the alternative statistic);
//! - `psi max-p`: the same PSI on the uncalibrated max-probability (the obvious baseline signal).
//!
//! scripts/drift-alarm makes the frames (onnx/miniworld/shift_frames.py) and the baseline
//! (`eval --write-drift-baseline`) and runs this:
//!
//! ```sh
//! cargo run --release --example drift_alarm -- BUNDLE CACHE FRAMES_DIR [RUNS]
//! ```
//!
//! FRAMES_DIR holds `indist/` and one folder per shift. A shift run starts from a window full of
//! in-distribution frames (a random stretch of `indist/`, drawn by a fixed-seed generator), then
//! feeds the shifted frames, in a random rotation, until the alarm or 600 frames (5 minutes at 2 fps).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cac_edge::drift::{ks_distance, Distribution, DriftBaseline, DriftMonitor, DriftSettings, BASELINE_KEY};
use cac_edge::{Classifier, ClassifierOptions, Runtime};

/// Shifted frames fed per run at most.
const MAX_SHIFTED: usize = 600;
/// The `ks d(x)` monitor raises at the one-sample KS critical value for α ≈ 1e-4 of its window,
/// c(α)/√W with c(α) = √(−ln(α/2)/2) ≈ 2.2, and clears at half of it.
const KS_C_ALPHA: f64 = 2.2;

fn ks_raise(window: usize) -> f64 {
    KS_C_ALPHA / (window as f64).sqrt()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Per frame: CAC's d(x) and the uncalibrated max-probability.
#[derive(Clone, Copy)]
struct Signals {
    contrast: f64,
    max_probability: f64,
}

fn run() -> Result<(), String> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(bundle), Some(cache), Some(frames)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: drift_alarm BUNDLE CACHE FRAMES_DIR [RUNS]".into());
    };
    let runs: usize = args.next().and_then(|runs| runs.to_str()?.parse().ok()).unwrap_or(20);
    let runtime = Runtime::load(None).map_err(|error| error.to_string())?;
    let mut classifier =
        Classifier::open(&runtime, &bundle, &cache, ClassifierOptions::default()).map_err(|error| error.to_string())?;
    let text =
        classifier.cache().metadata().get(BASELINE_KEY).ok_or("the cache has no drift baseline (eval --write-drift-baseline)")?;
    let baseline = DriftBaseline::from_json(text)?;
    // DRIFT_WINDOW, DRIFT_RAISE, DRIFT_CLEAR: other settings to compare (scripts/drift-alarm --sweep).
    let defaults = DriftSettings::default();
    let env = |name: &str| std::env::var(name).ok().and_then(|value| value.parse::<f64>().ok());
    let settings = DriftSettings {
        window: env("DRIFT_WINDOW").map_or(defaults.window, |window| window as usize),
        raise: env("DRIFT_RAISE").unwrap_or(defaults.raise),
        clear: env("DRIFT_CLEAR").unwrap_or(defaults.clear),
    };
    settings.validate()?;
    let indist = signals(&mut classifier, &frames.join("indist"))?;
    let mut out = std::io::stdout().lock();
    let io = |error: std::io::Error| error.to_string();
    writeln!(
        out,
        "baseline: {} evaluation images; window {} frames, PSI raised at {} and cleared at {}; KS raised at {:.3}, cleared at {:.3}; {runs} runs per shift\n",
        baseline.images,
        settings.window,
        settings.raise,
        settings.clear,
        ks_raise(settings.window),
        ks_raise(settings.window) / 2.0
    )
    .map_err(io)?;
    let monitors = Monitors { baseline: &baseline, settings };
    writeln!(out, "| frames | monitor | alarms raised | per 10 000 frames |\n|---|---|---|---|").map_err(io)?;
    for kind in MonitorKind::ALL {
        let raised = monitors.false_alarms(kind, &indist);
        let rate = raised as f64 * 10_000.0 / indist.len() as f64;
        writeln!(out, "| {} in-distribution | {} | {raised} | {rate:.2} |", indist.len(), kind.name()).map_err(io)?;
    }
    writeln!(
        out,
        "\n| shift | monitor | fired | frames to alarm: median (min–max) | minutes at 2 fps (median) |\n|---|---|---|---|---|"
    )
    .map_err(io)?;
    for shift in ["background", "blur", "colour_cast", "new_class", "covered"] {
        let shifted = signals(&mut classifier, &frames.join(shift))?;
        let median_d = median(shifted.iter().map(|signal| signal.contrast).collect());
        let median_p = median(shifted.iter().map(|signal| signal.max_probability).collect());
        for kind in MonitorKind::ALL {
            let delays: Vec<Option<usize>> = (0..runs).map(|run| monitors.delay(kind, &indist, &shifted, run)).collect();
            let fired: Vec<usize> = delays.iter().flatten().copied().collect();
            let summary = if fired.is_empty() {
                format!("— (not within {MAX_SHIFTED})")
            } else {
                let median = median(fired.iter().map(|&delay| delay as f64).collect());
                format!("{median:.0} ({}–{})", fired.iter().min().unwrap_or(&0), fired.iter().max().unwrap_or(&0))
            };
            let minutes = if fired.is_empty() {
                "—".to_string()
            } else {
                format!("{:.1}", median(fired.iter().map(|&delay| delay as f64).collect()) / 2.0 / 60.0)
            };
            writeln!(
                out,
                "| {shift} (median d(x) {median_d:.3}, max-p {median_p:.3}) | {} | {}/{runs} | {summary} | {minutes} |",
                kind.name(),
                fired.len()
            )
            .map_err(io)?;
        }
    }
    let indist_d = median(indist.iter().map(|signal| signal.contrast).collect());
    let indist_p = median(indist.iter().map(|signal| signal.max_probability).collect());
    writeln!(
        out,
        "\nin-distribution medians: d(x) {indist_d:.3}, max-p {indist_p:.3}; baseline medians: d(x) {:.3}, max-p {:.3}",
        baseline.contrast.percentiles[49], baseline.max_probability.percentiles[49]
    )
    .map_err(io)?;
    Ok(())
}

fn signals(classifier: &mut Classifier, folder: &Path) -> Result<Vec<Signals>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|error| format!("{}: {error}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    paths.sort();
    let mut signals = Vec::with_capacity(paths.len());
    let mut failure = None;
    classifier.classify_files(&paths, |path, outcome| match outcome {
        Ok(prediction) => {
            signals.push(Signals {
                contrast: prediction.contrast.unwrap_or(f64::NAN),
                max_probability: prediction.uncalibrated_confidence,
            });
            std::ops::ControlFlow::Continue(())
        }
        Err(error) => {
            failure = Some(format!("{}: {error}", path.display()));
            std::ops::ControlFlow::Break(())
        }
    });
    match failure {
        Some(error) => Err(error),
        None if signals.iter().any(|signal| !signal.contrast.is_finite()) => {
            Err("no contrast: the calibration must be CAC".into())
        }
        None => Ok(signals),
    }
}

#[derive(Clone, Copy)]
enum MonitorKind {
    PsiContrast,
    KsContrast,
    PsiMaxProbability,
}

impl MonitorKind {
    const ALL: [MonitorKind; 3] = [MonitorKind::PsiContrast, MonitorKind::KsContrast, MonitorKind::PsiMaxProbability];

    fn name(self) -> &'static str {
        match self {
            MonitorKind::PsiContrast => "psi d(x) (the service's)",
            MonitorKind::KsContrast => "ks d(x)",
            MonitorKind::PsiMaxProbability => "psi max-p (baseline)",
        }
    }
}

struct Monitors<'a> {
    baseline: &'a DriftBaseline,
    settings: DriftSettings,
}

/// One monitor of either statistic: its window and alarm.
enum Running {
    Psi(DriftMonitor, fn(&Signals) -> f64),
    Ks { window: Vec<f64>, distribution: Distribution, alarm: bool, size: usize },
}

impl Running {
    /// Adds a frame; true when this frame raised the alarm.
    fn observe(&mut self, signals: &Signals) -> bool {
        match self {
            Running::Psi(monitor, value) => {
                let update = monitor.observe(value(signals));
                update.changed && update.alarm
            }
            Running::Ks { window, distribution, alarm, size } => {
                window.push(signals.contrast);
                if window.len() > *size {
                    window.remove(0);
                }
                if window.len() < *size {
                    return false;
                }
                let distance = ks_distance(window, distribution);
                let was = *alarm;
                if distance >= ks_raise(*size) {
                    *alarm = true;
                } else if distance <= ks_raise(*size) / 2.0 {
                    *alarm = false;
                }
                *alarm && !was
            }
        }
    }
}

impl Monitors<'_> {
    fn start(&self, kind: MonitorKind) -> Running {
        match kind {
            MonitorKind::PsiContrast => {
                Running::Psi(DriftMonitor::new(self.baseline.contrast.clone(), self.settings), |s| s.contrast)
            }
            MonitorKind::PsiMaxProbability => {
                Running::Psi(DriftMonitor::new(self.baseline.max_probability.clone(), self.settings), |s| s.max_probability)
            }
            MonitorKind::KsContrast => Running::Ks {
                window: Vec::new(),
                distribution: self.baseline.contrast.clone(),
                alarm: false,
                size: self.settings.window,
            },
        }
    }

    /// Alarms raised over the in-distribution frames, in order.
    fn false_alarms(&self, kind: MonitorKind, frames: &[Signals]) -> usize {
        let mut monitor = self.start(kind);
        frames.iter().filter(|signals| monitor.observe(signals)).count()
    }

    /// Shifted frames until the alarm, after a window of in-distribution frames.
    fn delay(&self, kind: MonitorKind, indist: &[Signals], shifted: &[Signals], run: usize) -> Option<usize> {
        let mut random = Lcg(0x9E37_79B9_7F4A_7C15 ^ run as u64);
        let mut monitor = self.start(kind);
        let warm = self.settings.window;
        let start = random.below(indist.len() - warm);
        for signals in &indist[start..start + warm] {
            // A false alarm during warm-up is counted in the false-alarm table, not here.
            monitor.observe(signals);
        }
        let offset = random.below(shifted.len());
        (0..MAX_SHIFTED).find(|&step| monitor.observe(&shifted[(offset + step) % shifted.len()])).map(|step| step + 1)
    }
}

/// A small deterministic generator (the runs must be repeatable).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: usize) -> usize {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % bound.max(1) as u64) as usize
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
