//! The service's counters and histograms, written in Prometheus' text format for `/metrics`.

use std::fmt::Write as _;
use std::sync::Mutex;

use super::frame::lock;

/// A histogram with fixed bucket bounds (Prometheus' cumulative `le` buckets).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    data: Mutex<HistogramData>,
}

#[derive(Debug, Clone, Default)]
struct HistogramData {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Inference time per batch, seconds.
pub const INFERENCE_SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Frame age at decision, seconds.
pub const FRAME_AGE_SECONDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];
/// CAC's contrast d(x) (mean absolute logit difference, or L1 of probabilities).
pub const CONTRAST: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0];

impl Histogram {
    /// An empty histogram with these upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, data: Mutex::new(HistogramData { counts: vec![0; bounds.len()], ..HistogramData::default() }) }
    }

    /// Records one observation; a non-finite one is not recorded.
    pub fn observe(&self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let mut data = lock(&self.data);
        if let Some(bucket) = self.bounds.iter().position(|&bound| value <= bound) {
            data.counts[bucket] += 1;
        }
        data.sum += value;
        data.count += 1;
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        lock(&self.data).count
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`key="value",…`
    /// or empty).
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let data = lock(&self.data).clone();
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&data.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {}", data.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", data.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", data.count);
    }
}

/// Writes a `# HELP` and `# TYPE` header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value escaped as Prometheus requires (backslash, quote, newline).
pub fn label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_sum_and_count_add_up() {
        let histogram = Histogram::new(&[1.0, 2.0]);
        for value in [0.5, 1.0, 1.5, 3.0, f64::NAN] {
            histogram.observe(value);
        }
        let mut out = String::new();
        histogram.write(&mut out, "x", "camera=\"a\"");
        assert_eq!(
            out,
            "x_bucket{camera=\"a\",le=\"1\"} 2\nx_bucket{camera=\"a\",le=\"2\"} 3\nx_bucket{camera=\"a\",le=\"+Inf\"} 4\nx_sum{camera=\"a\"} 6\nx_count{camera=\"a\"} 4\n"
        );
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
