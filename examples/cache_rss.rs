//! Measures what a large text-feature cache costs in memory: "peak RSS does not grow by the
//! cache size".
//!
//! Writes a synthetic cache (default 100 000 classes at D = 512, about 410 MB; in a child process,
//! so the writer's buffers do not count here) or takes the path of an existing one, then reads
//! `/proc/self/status` at each step: before opening, after opening (no checksum), after logits +
//! CAC for one image (which reads every class row, so every page of the feature tensor), after a
//! batch of N images (default 32), after dropping the cache, and after opening it again with
//! checksum verification (which also reads the whole file).
//!
//! Two kinds of resident memory are reported separately:
//! * `RssAnon`, anonymous memory (heap, stacks): this is what must NOT grow by the cache size. It
//!   grows by the logit buffers (N × 2C floats, a few copies) and the class-name strings only.
//! * `RssFile`, file-backed pages of the mapping that were read: they are the kernel's page
//!   cache, shared with every process mapping the file and clean, so the kernel evicts them under
//!   memory pressure and reads them again on demand. Touching the whole feature tensor makes them
//!   reach the file size; that is the cache being *used*, not copied.
//!   `VmRSS` and its peak `VmHWM` count both, so they do grow by the file size.
//!
//! Run: `cargo run --release --example cache_rss [-- [--classes N] [--images N] [CACHE]]`.
//! Only Linux has `/proc/self/status`; elsewhere the steps run and memory is "not measured".

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cac_edge::cache::{CacheOpenOptions, FeaturePrecision, TextFeatureCache};
use cac_edge::calibrate::{calibrate, CacParams, Calibrated, Calibration};
use cac_edge::logits::{batch_logits, BatchLogits, LogitScales};

#[path = "../benches/common/mod.rs"]
mod common;

const MB: f64 = 1e6;

/// Fields of /proc/self/status, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    shmem: u64,
}

#[cfg(target_os = "linux")]
fn memory() -> Option<Memory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name) && line[name.len()..].starts_with(':'))?;
        let kib: u64 = line[name.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    };
    Some(Memory {
        rss: field("VmRSS")?,
        hwm: field("VmHWM")?,
        anon: field("RssAnon")?,
        file: field("RssFile")?,
        shmem: field("RssShmem")?,
    })
}

#[cfg(not(target_os = "linux"))]
fn memory() -> Option<Memory> {
    None
}

/// Resets VmHWM to the current VmRSS (Linux ≥ 4.0), so the next reading is the peak of one step.
fn reset_peak() -> bool {
    cfg!(target_os = "linux") && std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

struct Report {
    rows: Vec<(String, Option<Memory>)>,
}

impl Report {
    fn record(&mut self, step: &str) -> Option<Memory> {
        let memory = memory();
        self.rows.push((step.to_string(), memory));
        memory
    }

    fn print(&self) {
        println!("\n{:<52} {:>9} {:>9} {:>9} {:>9}   (MB)", "step", "VmRSS", "VmHWM", "RssAnon", "RssFile");
        for (step, memory) in &self.rows {
            match memory {
                Some(m) => println!(
                    "{step:<52} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                    m.rss as f64 / MB,
                    m.hwm as f64 / MB,
                    m.anon as f64 / MB,
                    m.file as f64 / MB
                ),
                None => println!("{step:<52} not measured"),
            }
        }
    }
}

struct Args {
    classes: usize,
    images: usize,
    cache: Option<PathBuf>,
    /// Internal: the child process that only writes the cache.
    write_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { classes: 100_000, images: 32, cache: None, write_only: false };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            let value = iter.next().ok_or(format!("{name} needs a value"))?;
            value.parse().ok().filter(|&n| n > 0).ok_or(format!("{name}: expected a positive integer, got '{value}'"))
        };
        match arg.as_str() {
            "--classes" => args.classes = number("--classes")?,
            "--images" => args.images = number("--images")?,
            "--write-only" => args.write_only = true,
            "-h" | "--help" => {
                return Err("usage: cache_rss [--classes N] [--images N] [CACHE.safetensors]".into());
            }
            other if other.starts_with('-') => return Err(format!("unknown option '{other}'")),
            path => args.cache = Some(PathBuf::from(path)),
        }
    }
    Ok(args)
}

fn write_in_child(path: &Path, classes: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let status = Command::new(exe)
        .args(["--write-only", "--classes", &classes.to_string()])
        .arg(path)
        .status()
        .map_err(|error| format!("cannot start the writer: {error}"))?;
    status.success().then_some(()).ok_or(format!("the writer failed: {status}"))
}

/// CAC for image `image` of a batch of logits.
fn calibrate_image(cac: &Calibration, logits: &BatchLogits, image: usize, factors: &[f32]) -> Result<Calibrated, String> {
    let (fine_tuned, zero_shot) = (logits.fine_tuned.row(image), logits.zero_shot.row(image));
    let (fine_tuned, zero_shot) = (fine_tuned.as_slice().expect("rows"), zero_shot.as_slice().expect("rows"));
    calibrate(cac, fine_tuned, zero_shot, factors).map_err(|error| error.to_string())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if args.write_only {
        let path = args.cache.expect("--write-only needs a path");
        common::write_synthetic_cache(&path, args.classes, common::EMBED_DIM, FeaturePrecision::F32).expect("write the cache");
        return;
    }
    if let Err(message) = run(args) {
        eprintln!("cache_rss: {message}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let _dir; // keeps the temporary directory until the end
    let path = match &args.cache {
        Some(path) => path.clone(),
        None => {
            let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
            let path = dir.path().join("cache.safetensors");
            let started = Instant::now();
            write_in_child(&path, args.classes)?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!("wrote {} classes x D = {} in {seconds:.1} s", args.classes, common::EMBED_DIM);
            _dir = dir;
            path
        }
    };
    let file_bytes = std::fs::metadata(&path).map_err(|error| format!("{}: {error}", path.display()))?.len();
    let mut report = Report { rows: Vec::new() };
    let before = report.record("before open");

    let started = Instant::now();
    let cache = TextFeatureCache::open(&path, CacheOpenOptions { verify_checksum: false }).map_err(|e| e.to_string())?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    report.record("after open (no checksum)");
    let (classes, dim) = (cache.num_classes(), cache.embed_dim());
    let scales = LogitScales { zero_shot: cache.logit_scale_zs(), fine_tuned: cache.logit_scale_ft() };
    let cac = Calibration::Cac(CacParams::paper_defaults());
    let images = common::normalised_rows(args.images, dim, common::IMAGE_SEED);

    let started = Instant::now();
    let single = batch_logits(images.slice(ndarray::s![..1, ..]), None, cache.stacked_text_features(), scales);
    let first = calibrate_image(&cac, &single, 0, cache.dac_factors())?;
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(single);
    let touched = report.record("after logits + CAC, 1 image (all pages read)");

    let peak_reset = reset_peak();
    let started = Instant::now();
    let logits = batch_logits(images.view(), None, cache.stacked_text_features(), scales);
    let mut confidence = 0.0;
    for image in 0..args.images {
        let calibrated = calibrate_image(&cac, &logits, image, cache.dac_factors())?;
        confidence += calibrated.probabilities[calibrated.predicted];
    }
    let batch_ms = started.elapsed().as_secs_f64() * 1e3;
    let batch = report.record(&format!("after logits + CAC, {} images (logits held)", args.images));
    drop(logits);
    drop(cache);
    report.record("after dropping logits and cache (unmapped)");

    let started = Instant::now();
    let verified = TextFeatureCache::open(&path, CacheOpenOptions { verify_checksum: true }).map_err(|e| e.to_string());
    let verified = verified?;
    let verify_ms = started.elapsed().as_secs_f64() * 1e3;
    let after_verify = report.record("after open with checksum verification");
    drop(verified);

    println!("cache: {} ({classes} classes x D = {dim}), {:.1} MB on disk", path.display(), file_bytes as f64 / MB);
    println!(
        "times (warm page cache): open {open_ms:.2} ms; first image logits + CAC {first_ms:.1} ms \
         (predicted {}, weight {:.3}); {} images {batch_ms:.1} ms ({:.2} ms/image, mean top confidence {:.4}); \
         open with checksum {verify_ms:.0} ms",
        first.predicted,
        first.weight,
        args.images,
        batch_ms / args.images as f64,
        confidence / args.images as f64
    );
    report.print();
    let (Some(before), Some(touched), Some(batch), Some(after_verify)) = (before, touched, batch, after_verify) else {
        println!("\nmemory not measured (needs Linux /proc/self/status)");
        return Ok(());
    };
    let delta = |after: u64, before: u64| (after as f64 - before as f64) / MB;
    let logit_buffers = 2.0 * (args.images * classes * 4) as f64 / MB;
    println!("\ngrowth from \"before open\" (cache file {:.1} MB):", file_bytes as f64 / MB);
    println!(
        "  RssAnon  {:+8.1} MB after the batch  <- must stay far below the cache size: logit buffers \
         ({} x 2C f32 = {logit_buffers:.1} MB while held) and class names, not the features",
        delta(batch.anon, before.anon),
        args.images
    );
    println!(
        "  RssFile  {:+8.1} MB after the batch  <- mapped cache pages that were read: page cache \
         (shared, clean, evictable), at most the file size",
        delta(batch.file, before.file)
    );
    let hwm = delta(batch.hwm, before.hwm);
    println!("  VmHWM    {hwm:+8.1} MB after the batch  <- peak of anon + file + shmem: includes the file pages");
    if peak_reset {
        // During the batch every page was already resident (the single image read them all), so
        // RssFile and RssShmem stayed put and the step's peak above them is anonymous memory.
        let peak_anon = batch.hwm as f64 - batch.file as f64 - batch.shmem as f64;
        println!(
            "  peak RssAnon during the {}-image batch ≈ VmHWM − RssFile − RssShmem = {:.1} MB \
             ({:+.1} MB over before open)",
            args.images,
            peak_anon / MB,
            (peak_anon - before.anon as f64) / MB
        );
    }
    println!(
        "  with checksum verification: RssAnon {:+.1} MB, RssFile {:+.1} MB (hashing reads every page of the mapping)",
        delta(after_verify.anon, before.anon),
        delta(after_verify.file, before.file)
    );
    let anon_growth = (batch.anon.max(touched.anon) as f64 - before.anon as f64).max(0.0);
    let share = anon_growth / file_bytes as f64;
    println!(
        "verdict: anonymous memory grew by {:.1} MB = {:.1} % of the cache size: {}",
        anon_growth / MB,
        100.0 * share,
        if share < 0.5 { "the cache is mapped, not copied" } else { "TOO MUCH: the cache looks copied into the heap" }
    );
    Ok(())
}
