//! The shift alarm: is a camera's world still the one the model was evaluated on?
//!
//! CAC computes, for every image, the contrast d(x) between the fine-tuned and the zero-shot
//! logits. `eval --write-drift-baseline` stores the distribution of d(x) on its evaluation images
//! in the cache (as percentiles: [`DriftBaseline`]). A running camera keeps a window of its last
//! frames' d(x) ([`DriftMonitor`]) and compares it with that baseline.
//!
//! **Statistic: the population stability index (PSI) over ten equal-mass bins of the baseline.**
//! The baseline's deciles cut the value axis into ten bins that each held 10 % of the evaluation
//! images; for the window's shares `pᵢ` of those bins,
//! `PSI = Σᵢ (pᵢ − 0.1) · ln(pᵢ / 0.1)`, with each count smoothed by ½ so that an empty bin stays
//! finite. The alarm is raised when the PSI reaches `raise` and cleared when it falls to `clear`
//! (hysteresis, so a score near the line does not flap); it is evaluated once the window is full.
//! Why PSI: with a full window of W frames from the baseline's own distribution, W·PSI is about
//! χ² with 9 degrees of freedom, so the false-alarm rate of a threshold follows from W alone; it
//! sees a change of the distribution's shape as well as of its location; and on the mini-world
//! it fired on more kinds of shift than a Kolmogorov–Smirnov distance of the same window at no
//! more false alarms (scripts/drift-alarm, BENCHMARKS.md § shift alarm), which also compares it
//! with the same PSI on the uncalibrated max-probability.
//!
//! The same code serves any per-frame score: the monitor is told values, the baseline says which
//! ones (`signal`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Cache metadata key of the baseline (JSON, docs/FORMATS.md §3).
pub const BASELINE_KEY: &str = "drift_baseline";
/// Bins of the PSI.
pub const PSI_BINS: usize = 10;

/// A per-frame score's distribution on the evaluation images: its 1st to 99th percentiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// The 99 percentiles, ascending.
    pub percentiles: Vec<f64>,
}

impl Distribution {
    /// The percentiles of `values` (linear interpolation between order statistics); `None`
    /// without at least [`MIN_BASELINE_IMAGES`] finite values.
    pub fn of(values: &[f64]) -> Option<Distribution> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|value| value.is_finite()).collect();
        if sorted.len() < MIN_BASELINE_IMAGES {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let percentiles = (1..100).map(|percent| quantile(&sorted, f64::from(percent) / 100.0)).collect();
        Some(Distribution { percentiles })
    }

    /// The bin of `value` among the [`PSI_BINS`] equal-mass bins cut by the deciles.
    fn bin(&self, value: f64) -> usize {
        let deciles = (1..PSI_BINS).map(|decile| self.percentiles[decile * 100 / PSI_BINS - 1]);
        deciles.take_while(|&edge| value > edge).count()
    }

    /// The baseline's cumulative distribution at `value` (piecewise linear through the
    /// percentiles; 0 below the 1st, 1 above the 99th).
    pub fn cdf(&self, value: f64) -> f64 {
        let p = &self.percentiles;
        if value < p[0] {
            return 0.0;
        }
        if value >= p[p.len() - 1] {
            return 1.0;
        }
        let above = p.partition_point(|&edge| edge <= value);
        let (low, high) = (p[above - 1], p[above]);
        let within = if high > low { (value - low) / (high - low) } else { 0.0 };
        (above as f64 + within) / 100.0
    }

    fn is_valid(&self) -> bool {
        self.percentiles.len() == 99
            && self.percentiles.iter().all(|value| value.is_finite())
            && self.percentiles.windows(2).all(|pair| pair[0] <= pair[1])
    }
}

/// At least this many evaluation images make a baseline (fewer give deciles too rough to test
/// a window against).
pub const MIN_BASELINE_IMAGES: usize = 50;

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

/// What `eval` stores: the distributions the service's monitors compare with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftBaseline {
    /// Format version (1).
    pub version: u32,
    /// How d(x) was measured (`logits` or `probs`): a service with another distance has no
    /// baseline to compare with.
    pub distance: String,
    /// Evaluation images it was made from.
    pub images: usize,
    /// CAC's contrast d(x).
    pub contrast: Distribution,
    /// The uncalibrated max-probability (the obvious alternative signal, for comparison).
    pub max_probability: Distribution,
}

impl DriftBaseline {
    /// Reads the cache's metadata value; an error says what is wrong with it.
    pub fn from_json(text: &str) -> Result<DriftBaseline, String> {
        let baseline: DriftBaseline = serde_json::from_str(text).map_err(|error| format!("{BASELINE_KEY}: {error}"))?;
        if baseline.version != 1 {
            return Err(format!("{BASELINE_KEY}: version {} is not known to this cac-edge", baseline.version));
        }
        if !baseline.contrast.is_valid() || !baseline.max_probability.is_valid() {
            return Err(format!("{BASELINE_KEY}: percentiles must be 99 finite ascending numbers"));
        }
        Ok(baseline)
    }
}

/// The monitor's settings (serve.toml `[drift]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftSettings {
    /// Frames in the window.
    pub window: usize,
    /// PSI at which the alarm is raised.
    pub raise: f64,
    /// PSI at or below which it is cleared.
    pub clear: f64,
}

impl Default for DriftSettings {
    /// The defaults BENCHMARKS.md § shift alarm chose by measurement: a 200-frame window (100 s
    /// at 2 fps), raised at 0.2 and cleared at 0.08. In distribution the PSI of 200 frames is
    /// about χ²₉/200, mean 0.045; 0.2 is χ² = 40, p ≈ 1e-5 per look.
    fn default() -> DriftSettings {
        DriftSettings { window: 200, raise: 0.2, clear: 0.08 }
    }
}

impl DriftSettings {
    /// Checks the settings; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(50..=100_000).contains(&self.window) {
            return Err(format!("window {}: use 50 to 100000 frames", self.window));
        }
        if !(self.clear >= 0.0 && self.clear < self.raise && self.raise.is_finite()) {
            return Err(format!("clear {} and raise {}: need 0 ≤ clear < raise", self.clear, self.raise));
        }
        Ok(())
    }
}

/// What one observation did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftUpdate {
    /// The PSI of the window, once it is full.
    pub score: Option<f64>,
    /// Whether the alarm is raised now.
    pub alarm: bool,
    /// Whether this observation raised or cleared it.
    pub changed: bool,
}

/// One camera's window and alarm.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    baseline: Distribution,
    settings: DriftSettings,
    window: VecDeque<usize>,
    counts: [u32; PSI_BINS],
    alarm: bool,
    score: Option<f64>,
}

impl DriftMonitor {
    /// A monitor of values distributed as `baseline` when nothing shifted.
    pub fn new(baseline: Distribution, settings: DriftSettings) -> DriftMonitor {
        DriftMonitor { baseline, settings, window: VecDeque::new(), counts: [0; PSI_BINS], alarm: false, score: None }
    }

    /// Adds one frame's value (a non-finite one is ignored).
    pub fn observe(&mut self, value: f64) -> DriftUpdate {
        if value.is_finite() {
            let bin = self.baseline.bin(value);
            self.window.push_back(bin);
            self.counts[bin] += 1;
            if self.window.len() > self.settings.window {
                if let Some(old) = self.window.pop_front() {
                    self.counts[old] -= 1;
                }
            }
        }
        let was = self.alarm;
        if self.window.len() >= self.settings.window {
            let score = psi(&self.counts);
            self.score = Some(score);
            if score >= self.settings.raise {
                self.alarm = true;
            } else if score <= self.settings.clear {
                self.alarm = false;
            }
        }
        DriftUpdate { score: self.score, alarm: self.alarm, changed: self.alarm != was }
    }

    /// The last score, once the window was full.
    pub fn score(&self) -> Option<f64> {
        self.score
    }

    /// Whether the alarm is raised.
    pub fn alarm(&self) -> bool {
        self.alarm
    }

    /// Frames in the window.
    pub fn filled(&self) -> usize {
        self.window.len()
    }

    /// Replaces the settings (a reload); the window is kept.
    pub fn set_settings(&mut self, settings: DriftSettings) {
        self.settings = settings;
        while self.window.len() > settings.window {
            if let Some(old) = self.window.pop_front() {
                self.counts[old] -= 1;
            }
        }
    }
}

/// PSI of bin counts against equal shares, each count smoothed by ½.
pub fn psi(counts: &[u32]) -> f64 {
    let bins = counts.len() as f64;
    let total: f64 = counts.iter().map(|&count| f64::from(count) + 0.5).sum();
    let expected = 1.0 / bins;
    counts
        .iter()
        .map(|&count| {
            let share = (f64::from(count) + 0.5) / total;
            (share - expected) * (share / expected).ln()
        })
        .sum()
}

/// The Kolmogorov–Smirnov distance between `values` and the baseline: the largest gap between
/// their empirical CDF and the baseline's (the alternative scripts/drift-alarm measures).
pub fn ks_distance(values: &[f64], baseline: &Distribution) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|value| value.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            let cdf = baseline.cdf(value);
            (cdf - index as f64 / n).abs().max((((index + 1) as f64) / n - cdf).abs())
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic uniform sequence on [0, 1) (a Weyl sequence: equidistributed).
    fn uniform(count: usize, offset: f64) -> Vec<f64> {
        (0..count).map(|index| (offset + index as f64 * 0.618_033_988_749_895).fract()).collect()
    }

    fn baseline() -> Distribution {
        Distribution::of(&uniform(10_000, 0.1)).expect("enough values")
    }

    #[test]
    fn percentiles_and_bins_of_a_uniform_sample() {
        let distribution = baseline();
        assert!((distribution.percentiles[49] - 0.5).abs() < 0.01, "{}", distribution.percentiles[49]);
        assert_eq!(distribution.bin(0.05), 0);
        assert_eq!(distribution.bin(0.55), 5);
        assert_eq!(distribution.bin(0.97), 9);
        assert!((distribution.cdf(0.25) - 0.25).abs() < 0.01);
        assert_eq!((distribution.cdf(-1.0), distribution.cdf(2.0)), (0.0, 1.0));
        assert!(Distribution::of(&uniform(MIN_BASELINE_IMAGES - 1, 0.0)).is_none());
    }

    #[test]
    fn psi_is_zero_for_equal_shares_and_grows_with_the_shift() {
        assert!(psi(&[10; PSI_BINS]).abs() < 1e-12);
        // Hand-checked: all 100 in one bin. Shares (100.5/105) and 0.5/105 (×9).
        let mut counts = [0u32; PSI_BINS];
        counts[0] = 100;
        let (big, small): (f64, f64) = (100.5 / 105.0, 0.5 / 105.0);
        let expected = (big - 0.1) * (big / 0.1).ln() + 9.0 * (small - 0.1) * (small / 0.1).ln();
        assert!((psi(&counts) - expected).abs() < 1e-12);
        let mut half = [10u32; PSI_BINS];
        half[0] = 20;
        half[9] = 0;
        assert!(psi(&half) > 0.0 && psi(&half) < psi(&counts));
    }

    #[test]
    fn the_monitor_stays_quiet_in_distribution_and_alarms_with_hysteresis_on_a_shift() {
        let mut monitor = DriftMonitor::new(baseline(), DriftSettings { window: 100, raise: 0.35, clear: 0.15 });
        for value in uniform(99, 0.3) {
            assert_eq!(monitor.observe(value).score, None, "no score before the window is full");
        }
        for value in uniform(2_000, 0.7) {
            let update = monitor.observe(value);
            assert!(!update.alarm, "in distribution: score {:?}", update.score);
        }
        // Shifted to the top decile: raised within a window.
        let shifted_at = (1..=100).find(|_| monitor.observe(0.95).changed).expect("the alarm is raised");
        assert!(shifted_at <= 60, "raised after {shifted_at} shifted frames");
        assert!(monitor.alarm());
        // Back in distribution: cleared once the window holds mostly normal frames again.
        let cleared_at = uniform(200, 0.2).into_iter().position(|value| monitor.observe(value).changed).expect("cleared");
        assert!(cleared_at > 20, "hysteresis: not cleared at once ({cleared_at})");
        assert!(!monitor.alarm());
    }

    #[test]
    fn ks_distance_is_small_in_distribution_and_large_when_shifted() {
        let distribution = baseline();
        assert!(ks_distance(&uniform(200, 0.5), &distribution) < 0.05);
        let shifted: Vec<f64> = uniform(200, 0.5).iter().map(|value| value * 0.5).collect();
        assert!((ks_distance(&shifted, &distribution) - 0.5).abs() < 0.05);
    }

    #[test]
    fn baselines_round_trip_and_bad_ones_are_refused() {
        let baseline = DriftBaseline {
            version: 1,
            distance: "logits".into(),
            images: 10_000,
            contrast: baseline(),
            max_probability: baseline(),
        };
        let text = serde_json::to_string(&baseline).expect("serialises");
        assert_eq!(DriftBaseline::from_json(&text), Ok(baseline.clone()));
        let mut broken = baseline;
        broken.contrast.percentiles.reverse();
        assert!(DriftBaseline::from_json(&serde_json::to_string(&broken).expect("serialises")).is_err());
        assert!(DriftBaseline::from_json("{").is_err());
        assert!(DriftSettings { window: 10, ..DriftSettings::default() }.validate().is_err());
        assert!(DriftSettings { clear: 0.5, raise: 0.4, ..DriftSettings::default() }.validate().is_err());
    }
}
