//! `cac-edge cache build` and `cac-edge cache info`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{
    build_cache, default_cache_path, CacheOpenOptions, ClassList, FeaturePrecision, TextFeatureCache, AUTO_F16_CLASSES,
};
use cac_edge::Runtime;

use crate::cli_args::{RuntimeArgs, MODEL, OUTPUT};
use crate::cli_output::print_stdout;

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Encode every class name with both text encoders and write the cache.
    Build(CacheBuildArgs),
    /// Print what a cache holds: its metadata and class list.
    Info {
        /// The cache file to describe.
        #[arg(long, value_name = "FILE", help_heading = MODEL)]
        cache: PathBuf,
    },
}

#[derive(Args)]
pub(crate) struct CacheBuildArgs {
    /// Bundle directory, as written by onnx/export.py.
    #[arg(long, value_name = "DIR", help_heading = MODEL)]
    bundle: PathBuf,
    /// Deployed class names, one per line (blank lines and #-comments ignored).
    #[arg(long, value_name = "FILE", help_heading = MODEL)]
    classes: PathBuf,
    /// Base classes (those the fine-tuned model was trained on), one per line.
    #[arg(long, value_name = "FILE", help_heading = MODEL)]
    base: PathBuf,
    /// Where to write the cache (default: calibration-cache/<bundle name>.safetensors).
    #[arg(long, value_name = "FILE", help_heading = OUTPUT)]
    output: Option<PathBuf>,
    /// How the text features are stored: f16 halves the memory read per image (the logits are
    /// still summed in f32; probabilities move by ≤ 3e-4 at D = 512); auto: f16 from 10 000 classes,
    /// f32 below.
    /// A cache with f16 features is format version 2, which cac-edge builds without f16 refuse.
    #[arg(long, value_name = "PRECISION", default_value = "auto", help_heading = OUTPUT)]
    feature_precision: PrecisionArg,
    #[command(flatten)]
    pub(crate) runtime: RuntimeArgs,
}

/// `--feature-precision`: a [`FeaturePrecision`], or the choice by class count.
#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    /// f16 from 10 000 classes on, f32 below.
    Auto,
    /// Single precision.
    F32,
    /// Half precision.
    F16,
}

impl PrecisionArg {
    fn resolve(self, classes: usize) -> FeaturePrecision {
        match self {
            PrecisionArg::Auto => FeaturePrecision::auto(classes),
            PrecisionArg::F32 => FeaturePrecision::F32,
            PrecisionArg::F16 => FeaturePrecision::F16,
        }
    }
}

pub(crate) fn build(args: &CacheBuildArgs, runtime: &Arc<Runtime>) -> Result<()> {
    // Checked before the bundle and class list are read, so a bad option costs nothing.
    let session = args.runtime.session_options();
    session.validate()?;
    let bundle = Bundle::open(&args.bundle)?;
    let classes = ClassList::from_files(&args.classes, &args.base)?;
    let output = args.output.clone().unwrap_or_else(|| default_cache_path(&bundle));
    let precision = args.feature_precision.resolve(classes.names.len());
    build_cache(runtime, &bundle, &classes, &session, &output, precision)
        .with_context(|| format!("building the cache {} for the classes in {}", output.display(), args.classes.display()))?;
    let base = classes.is_base.iter().filter(|&&base| base).count();
    tracing::info!(
        "wrote {} ({} classes: {} base, {} new; {precision} text features{})",
        output.display(),
        classes.names.len(),
        base,
        classes.names.len() - base,
        if matches!(args.feature_precision, PrecisionArg::Auto) {
            format!(", auto at {AUTO_F16_CLASSES} classes")
        } else {
            String::new()
        }
    );
    print_stdout(&format!("{}\n", output.display()))
}

pub(crate) fn info(path: &Path) -> Result<()> {
    let cache = TextFeatureCache::open(path, CacheOpenOptions::default())?;
    let mut metadata: Vec<_> = cache.metadata().iter().collect();
    metadata.sort();
    let mut text = String::new();
    for (key, value) in metadata {
        let _ = writeln!(text, "{key}: {value}");
    }
    for (class, name) in cache.class_names().iter().enumerate() {
        let kind = if cache.is_base(class) { "base" } else { "new" };
        let _ = writeln!(text, "class {class}: {name} ({kind}, dac factor {:.4})", cache.dac_factors()[class]);
    }
    print_stdout(&text)
}
