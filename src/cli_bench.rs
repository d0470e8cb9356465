//! `cac-edge bench`: latency and throughput of the encoder and the full pipeline.
//!
//! A thin layer over [`cac_edge::tooling::bench`]: a human table on stdout, or the whole report as JSON
//! (`--json`); progress on stderr. Exit 2 when nothing could run (like every command).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;

use cac_edge::preprocess::DecodeMode;
use cac_edge::tooling::bench::{run_bench, BatchResult, BenchOptions, BenchReport, Timing};
use cac_edge::{ClassifierOptions, DecodeLimits, Runtime};

use crate::cli_args::{parse_decode_mode, InputArgs, ModelArgs, RuntimeArgs, OUTPUT};
use crate::cli_output::print_stdout;

const MEASURE: &str = "Measurement";

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    inputs: InputArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32], help_heading = MEASURE)]
    batch_sizes: Vec<usize>,
    /// Measured rounds; each runs every variant once over the whole image list.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..), help_heading = MEASURE)]
    rounds: u32,
    /// Rounds run first and discarded.
    #[arg(long, default_value_t = 1, help_heading = MEASURE)]
    warmup_rounds: u32,
    /// JPEG decoding: exact (open_clip's pixels) or scaled (reduced DCT scale, faster on large
    /// photos).
    #[arg(long = "decode", value_name = "MODE", default_value = "exact", value_parser = parse_decode_mode, help_heading = MEASURE)]
    decode_mode: DecodeMode,
    /// Print the whole report as JSON instead of the table.
    #[arg(long, help_heading = OUTPUT)]
    json: bool,
    /// With --json: also every per-image latency, by variant (to merge several runs).
    #[arg(long, requires = "json", help_heading = OUTPUT)]
    samples: bool,
    #[command(flatten)]
    pub(crate) runtime: RuntimeArgs,
}

pub(crate) fn run(args: &BenchArgs, runtime: &Arc<Runtime>) -> Result<ExitCode> {
    let inputs = args.inputs.scan();
    if !inputs.missing.is_empty() {
        let names: Vec<String> = inputs.missing.iter().map(|path| path.display().to_string()).collect();
        bail!("no such file or directory: {}; check the paths", names.join(", "));
    }
    if let Some((path, reason)) = inputs.refused.first() {
        bail!("{}: {reason}", path.display());
    }
    let images = inputs.files;
    if images.is_empty() {
        let given: Vec<String> = args.inputs.inputs.iter().map(|path| path.display().to_string()).collect();
        bail!("no image files found in {}", given.join(", "));
    }
    let options = BenchOptions {
        classifier: args.model.apply(ClassifierOptions {
            session: args.runtime.session_options(),
            decode_limits: DecodeLimits::default(),
            decode: args.decode_mode,
            ..ClassifierOptions::default()
        }),
        batch_sizes: args.batch_sizes.clone(),
        rounds: args.rounds as usize,
        warmup_rounds: args.warmup_rounds as usize,
        keep_samples: args.samples,
    };
    let report =
        run_bench(runtime, &args.model.bundle, &args.model.cache, &images, &options, |line| tracing::info!("bench: {line}"))?;
    if let Some(note) = &report.machine.device_note {
        tracing::info!("note: {note}");
    }
    for skipped in &report.images.skipped {
        tracing::warn!("left out {}: {}", skipped.path, skipped.error);
    }
    let text = if args.json { serde_json::to_string_pretty(&report)? + "\n" } else { table(&report) };
    print_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The human-readable report.
fn table(report: &BenchReport) -> String {
    let machine = &report.machine;
    let mut out = String::new();
    let threads = report.settings.threads.map_or("ONNX Runtime default".to_string(), |threads| threads.to_string());
    out += &format!(
        "machine: {} ({} logical cores, {}), ONNX Runtime {}, device {}, intra-op threads: {threads}, decode: {}\n",
        machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        machine.logical_cores,
        machine.arch,
        machine.onnxruntime_version.as_deref().unwrap_or("unknown"),
        machine.device,
        report.settings.decode.name(),
    );
    out += &format!(
        "bundle: {} (S = {}, D = {}{}, image encoders {}), cache: {} classes ({} base), images: {} ({} skipped, mean {:.0} px)\n",
        report.bundle.name,
        report.bundle.image_size,
        report.bundle.embed_dim,
        if report.bundle.fine_tuned_image_encoder { ", own fine-tuned image encoder" } else { "" },
        report.bundle.precision,
        report.cache.classes,
        report.cache.base_classes,
        report.images.used,
        report.images.skipped.len(),
        report.images.mean_pixels,
    );
    let calibrations: Vec<String> =
        report.calibrations.iter().map(|calibration| serde_json::to_string(calibration).unwrap_or_default()).collect();
    out += &format!("calibrations: {} (TS temperature: {})\n", calibrations.join(" "), report.ts_temperature_source);
    out += &format!(
        "rounds: {} measured after {} warm-up; per-image latency = batch time / batch size (one classify_files \
         call per batch); images/s = 1 / median; streaming = one call over all images (one sample per round)\n",
        report.settings.rounds, report.settings.warmup_rounds
    );
    for result in &report.results {
        out += &batch_table(result);
    }
    out
}

fn batch_table(result: &BatchResult) -> String {
    let mut out = format!(
        "\nbatch {} ({} batches per round)\n{:<44} {:>12} {:>12} {:>12} {:>8}\n",
        result.batch_size, result.batches_per_round, "per image", "median", "p90", "images/s", "samples"
    );
    let line = |name: &str, timing: &Timing| {
        format!(
            "{name:<44} {:>12} {:>12} {:>12.1} {:>8}\n",
            duration(timing.median_s),
            duration(timing.p90_s),
            timing.images_per_s,
            timing.samples
        )
    };
    match &result.encoder_cac {
        None => out += &line("(a) encoder session.run, ready tensor", &result.encoder),
        Some(both) => {
            out += &line("(a) fine-tuned image encoder alone (none)", &result.encoder);
            let ratio = result.ratios.cac_encoders_over_encoder.unwrap_or(f64::NAN);
            out += &line(&format!("(a') both image encoders, as cac runs them ({ratio:.2}x)"), both);
        }
    }
    for (precision, timing) in &result.encoder_by_precision {
        let speedup = result.ratios.encoder_speedup.get(precision).copied().unwrap_or(f64::NAN);
        out += &line(&format!("    the {precision} encoder, same tensors ({speedup:.2}x)"), timing);
    }
    out += &line("(b) pipeline, calibration none", &result.pipeline.none);
    out += &line("(c) pipeline, cac", &result.pipeline.cac);
    out += &line("(d) pipeline, dac", &result.pipeline.dac);
    out += &line("(d) pipeline, ts", &result.pipeline.ts);
    out += &line("    streaming (one call, all images), none", &result.stream.none);
    out += &line("    streaming (one call, all images), cac", &result.stream.cac);
    let breakdown = &result.breakdown;
    out += "non-encoder stages, each alone:\n";
    out += &line("  decode", &breakdown.decode);
    out += &line("  preprocess", &breakdown.preprocess);
    out += &line("  logits", &breakdown.logits);
    out += &line("  calibrate + decide, none", &breakdown.calibrate.none);
    out += &line("  calibrate + decide, cac", &breakdown.calibrate.cac);
    out += &line("  calibrate + decide, dac", &breakdown.calibrate.dac);
    out += &line("  calibrate + decide, ts", &breakdown.calibrate.ts);
    out += &format!(
        "{:<44} {:>12}\n{:<44} {:>12}\n",
        "  sum (decode+preprocess+logits+cac)",
        duration(result.non_encoder_per_image_s),
        if result.encoder_cac.is_some() { "  (c) - (a')" } else { "  (c) - (a)" },
        duration(result.pipeline_minus_encoder_s)
    );
    let ratios = &result.ratios;
    out += &format!(
        "ratios of medians: b/a {:.3}   c/b {:.4} (from the calibrate stages: {:.4})   dac/b {:.4}   ts/b {:.4}\n",
        ratios.pipeline_over_encoder,
        ratios.cac_over_none,
        ratios.cac_over_none_from_stages,
        ratios.dac_over_none,
        ratios.ts_over_none
    );
    out
}

/// Seconds in the most readable unit.
fn duration(seconds: f64) -> String {
    let magnitude = seconds.abs();
    if !seconds.is_finite() {
        "-".into()
    } else if magnitude < 1e-3 {
        format!("{:.2} µs", seconds * 1e6)
    } else if magnitude < 1.0 {
        format!("{:.3} ms", seconds * 1e3)
    } else {
        format!("{seconds:.3} s")
    }
}
