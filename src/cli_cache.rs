//! `cac-edge cache build` and `cac-edge cache info`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{build_cache, default_cache_path, CacheOpenOptions, ClassList, TextFeatureCache};
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
    #[command(flatten)]
    pub(crate) runtime: RuntimeArgs,
}

pub(crate) fn build(args: &CacheBuildArgs, runtime: &Arc<Runtime>) -> Result<()> {
    // Checked before the bundle and class list are read, so a bad option costs nothing.
    let session = args.runtime.session_options();
    session.validate()?;
    let bundle = Bundle::open(&args.bundle)?;
    let classes = ClassList::from_files(&args.classes, &args.base)?;
    let output = args.output.clone().unwrap_or_else(|| default_cache_path(&bundle));
    build_cache(runtime, &bundle, &classes, &session, &output)
        .with_context(|| format!("building the cache {} for the classes in {}", output.display(), args.classes.display()))?;
    let base = classes.is_base.iter().filter(|&&base| base).count();
    tracing::info!(
        "wrote {} ({} classes: {} base, {} new)",
        output.display(),
        classes.names.len(),
        base,
        classes.names.len() - base
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
