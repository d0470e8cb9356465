//! The text-feature cache (`calibration-cache/*.safetensors`): class names, base/new flags, the
//! zero-shot and fine-tuned class text features, both logit scales and the DAC factors,
//! computed once per (bundle, class list) by `cac-edge cache build` and memory-mapped at run
//! time. The file layout is specified in `docs/FORMATS.md` §3.
//!
//! # Why the memory mapping is sound
//! [`TextFeatureCache`] maps the file read-only and hands out slices of the mapping. Rust's
//! aliasing rules only break if the bytes change while mapped. cac-edge never writes a cache in
//! place: [`write_cache`] writes a temporary file and renames it over the old one, which gives the
//! new cache a new inode and leaves every existing mapping of the old inode untouched. Another
//! program truncating or rewriting the file in place while cac-edge runs is outside that
//! guarantee (the OS would deliver SIGBUS on truncation); the cache directory should be writable
//! only by whoever runs `cache build`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{Array2, ArrayView2, Axis};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::bundle::{hex, Bundle, BundleError};
use crate::calibrate::{dac_factors, DAC_BASE_DISTANCE, DAC_NEIGHBOURS};
use crate::encode::{EncodeError, Encoder};
use crate::runtime::{Runtime, SessionOptions};
use crate::threshold::{THRESHOLD_CALIBRATION_KEY, THRESHOLD_KEY};
use crate::tokenize::{ClipTokenizer, TokenizeError};

pub const CACHE_FORMAT: &str = "cac-edge-text-cache";
pub const CACHE_FORMAT_VERSION: u32 = 1;
const TEXT_FEATURES: &str = "text_features";
const DAC_FACTORS: &str = "dac_factors";
const IS_BASE: &str = "is_base";
const CLASS_NAMES: &str = "class_names";
/// Texts per text-encoder run while building.
const TEXT_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// There is no cache file at the path.
    #[error("{path}: no cache here yet (a cache is built once per bundle and class list)")]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The cache could not be written.
    #[error("{path}: cannot write the cache: {source}")]
    Write {
        /// The cache file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a cac-edge cache, or a damaged one; rebuilding it is the fix.
    #[error("{path}: not a valid cac-edge cache ({message})")]
    Invalid {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Written by another version of cac-edge; rebuilding it is the fix.
    #[error("{path}: cache format version {found} is not supported by this cac-edge (expects {CACHE_FORMAT_VERSION})")]
    Version {
        /// The cache file.
        path: PathBuf,
        /// The version it declares.
        found: String,
    },
    /// The data does not match its checksum; rebuilding it is the fix.
    #[error("{path}: the cache data does not match its checksum (corrupt or modified)")]
    Corrupt {
        /// The cache file.
        path: PathBuf,
    },
    /// Built from another bundle or class list; rebuilding it is the fix.
    #[error("{path}: stale cache: {message}")]
    Stale {
        /// The cache file.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// A class list file is invalid.
    #[error("{path}:{line}: {message}")]
    ClassList {
        /// The class list file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The bundle could not be opened.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A text encoder run failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A class name could not be tokenized.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
}

impl CacheError {
    /// Whether rebuilding the cache (`cache build`) fixes this error.
    pub fn is_fixed_by_rebuilding(&self) -> bool {
        matches!(
            self,
            CacheError::Missing { .. }
                | CacheError::Invalid { .. }
                | CacheError::Version { .. }
                | CacheError::Corrupt { .. }
                | CacheError::Stale { .. }
        )
    }
}

/// The deployed classes, in order, and which of them the fine-tuned model was trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassList {
    pub names: Vec<String>,
    pub is_base: Vec<bool>,
}

impl ClassList {
    /// Reads `classes` (one class name per line) and `base` (the base-class subset, one per
    /// line). Blank lines and lines starting with `#` are ignored; names are trimmed.
    pub fn from_files(classes: &Path, base: &Path) -> Result<ClassList, CacheError> {
        let names = read_name_list(classes)?;
        let base_names = read_name_list(base)?;
        let known: HashSet<&str> = names.iter().map(|(_, name)| name.as_str()).collect();
        for (line, name) in &base_names {
            if !known.contains(name.as_str()) {
                return Err(CacheError::ClassList {
                    path: base.to_path_buf(),
                    line: *line,
                    message: format!("base class '{name}' is not in {}; every base class must be deployed", classes.display()),
                });
            }
        }
        let base_set: HashSet<&str> = base_names.iter().map(|(_, name)| name.as_str()).collect();
        if base_set.is_empty() {
            return Err(CacheError::ClassList {
                path: base.to_path_buf(),
                line: 1,
                message: "no base classes: list the classes the fine-tuned model was trained on (DAC needs them)".into(),
            });
        }
        let is_base = names.iter().map(|(_, name)| base_set.contains(name.as_str())).collect();
        Ok(ClassList { names: names.into_iter().map(|(_, name)| name).collect(), is_base })
    }
}

impl ClassList {
    /// A digest of the names, their order and base flags (what tells two class lists apart).
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, base) in self.names.iter().zip(&self.is_base) {
            hasher.update(name.as_bytes());
            hasher.update(if *base { b"\n1\n" } else { b"\n0\n" });
        }
        hex(&hasher.finalize())
    }
}

fn read_name_list(path: &Path) -> Result<Vec<(usize, String)>, CacheError> {
    let text = std::fs::read_to_string(path).map_err(|source| CacheError::Read { path: path.to_path_buf(), source })?;
    let mut seen = HashMap::new();
    let mut names = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let (line, name) = (index + 1, raw.trim());
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if let Some(first) = seen.insert(name.to_string(), line) {
            return Err(CacheError::ClassList {
                path: path.to_path_buf(),
                line,
                message: format!("class '{name}' is listed twice (first on line {first})"),
            });
        }
        names.push((line, name.to_string()));
    }
    if names.is_empty() {
        return Err(CacheError::ClassList { path: path.to_path_buf(), line: 1, message: "no class names in the file".into() });
    }
    Ok(names)
}

/// Digest of everything the cache is computed from: the cache format version, the bundle's
/// fingerprint (file hashes, templates, scales, tokenizer settings) and the class list.
pub fn source_hash(bundle: &Bundle, classes: &ClassList) -> String {
    let mut text = format!("{CACHE_FORMAT} {CACHE_FORMAT_VERSION}\nbundle {}\n", bundle.fingerprint());
    let _ = writeln!(text, "dac neighbours {DAC_NEIGHBOURS} base_distance {DAC_BASE_DISTANCE}");
    for (name, base) in classes.names.iter().zip(&classes.is_base) {
        let _ = writeln!(text, "class {name:?} base {base}");
    }
    hex(&Sha256::digest(text.as_bytes()))
}

/// Where `cache build` writes a bundle's cache when not told: `calibration-cache/<bundle name>.safetensors`.
pub fn default_cache_path(bundle: &Bundle) -> PathBuf {
    Path::new("calibration-cache").join(format!("{}.safetensors", bundle.name()))
}

/// Computes the cache for `classes` with the bundle's text encoders and writes it to `output`.
pub fn build_cache(
    runtime: &Runtime,
    bundle: &Bundle,
    classes: &ClassList,
    session_options: &SessionOptions,
    output: &Path,
) -> Result<(), CacheError> {
    // The cache is trusted for as long as the manifest is, so the files it is computed from are
    // checked against the manifest's hashes now.
    let manifest = bundle.manifest();
    bundle.verify_files([
        manifest.text.tokenizer.as_str(),
        manifest.zero_shot.text_encoder.as_str(),
        manifest.fine_tuned.text_encoder.as_str(),
    ])?;
    let tokenizer = ClipTokenizer::from_file(&bundle.tokenizer_path(), bundle.context_length())?;
    let encode = |path: &Path, template: &str| -> Result<Array2<f32>, CacheError> {
        let mut encoder =
            Encoder::open_text(runtime, path, session_options, bundle.context_length(), bundle.embed_dim())?;
        encode_class_prompts(&mut encoder, &tokenizer, template, &classes.names)
    };
    let zero_shot = encode(&bundle.text_zs_path(), &manifest.zero_shot.template)?;
    let fine_tuned = encode(&bundle.text_ft_path(), &manifest.fine_tuned.template)?;
    let factors = dac_factors(zero_shot.view(), fine_tuned.view(), &classes.is_base);
    let stacked = ndarray::concatenate(Axis(0), &[zero_shot.view(), fine_tuned.view()])
        .map_err(|error| CacheError::Invalid { path: output.to_path_buf(), message: error.to_string() })?;
    let contents = CacheContents {
        classes,
        stacked_text: stacked.view(),
        dac_factors: &factors,
        logit_scale_zs: manifest.zero_shot.logit_scale,
        logit_scale_ft: manifest.fine_tuned.logit_scale,
        source_hash: source_hash(bundle, classes),
        bundle_name: bundle.name(),
    };
    write_cache(output, &contents)
}

fn encode_class_prompts(
    encoder: &mut Encoder,
    tokenizer: &ClipTokenizer,
    template: &str,
    names: &[String],
) -> Result<Array2<f32>, CacheError> {
    let prompts: Vec<String> = names.iter().map(|name| template.replacen("{}", name, 1)).collect();
    let mut rows = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(TEXT_BATCH) {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let ids = tokenizer.encode_batch(&texts)?;
        rows.push(encoder.encode_texts(ids.view())?);
    }
    let views: Vec<ArrayView2<'_, f32>> = rows.iter().map(|rows| rows.view()).collect();
    // Every batch has the encoder's checked width, so this only fails for an empty class list,
    // which ClassList refuses.
    ndarray::concatenate(Axis(0), &views).map_err(|error| {
        EncodeError::Inference { path: encoder.path().to_path_buf(), message: format!("joining text batches: {error}") }.into()
    })
}

/// What a cache file holds.
pub struct CacheContents<'a> {
    pub classes: &'a ClassList,
    /// [2C, D]: zero-shot rows then fine-tuned rows, L2-normalised.
    pub stacked_text: ArrayView2<'a, f32>,
    pub dac_factors: &'a [f32],
    pub logit_scale_zs: f32,
    pub logit_scale_ft: f32,
    pub source_hash: String,
    pub bundle_name: &'a str,
}

/// Writes a cache atomically and durably: a temporary file in the same directory, fsynced and
/// renamed over `path` (see [`crate::fsio`]).
pub fn write_cache(path: &Path, contents: &CacheContents<'_>) -> Result<(), CacheError> {
    let classes = contents.classes.names.len();
    let dim = contents.stacked_text.ncols();
    let invalid = |message: String| CacheError::Invalid { path: path.to_path_buf(), message };
    if contents.stacked_text.nrows() != 2 * classes || contents.dac_factors.len() != classes {
        return Err(invalid("feature matrix and class list disagree".into()));
    }
    if contents.classes.names.iter().any(|name| name.is_empty() || name.contains('\n')) {
        return Err(invalid("class names must be non-empty single lines".into()));
    }
    let text_bytes: Vec<u8> = contents.stacked_text.iter().flat_map(|value| value.to_le_bytes()).collect();
    let factor_bytes: Vec<u8> = contents.dac_factors.iter().flat_map(|value| value.to_le_bytes()).collect();
    let base_bytes: Vec<u8> = contents.classes.is_base.iter().map(|&base| u8::from(base)).collect();
    let name_bytes = contents.classes.names.join("\n").into_bytes();
    let tensor = |dtype, shape: Vec<usize>, bytes| TensorView::new(dtype, shape, bytes).map_err(|error| invalid(error.to_string()));
    let tensors = BTreeMap::from([
        (TEXT_FEATURES, tensor(Dtype::F32, vec![2, classes, dim], &text_bytes)?),
        (DAC_FACTORS, tensor(Dtype::F32, vec![classes], &factor_bytes)?),
        (IS_BASE, tensor(Dtype::U8, vec![classes], &base_bytes)?),
        (CLASS_NAMES, tensor(Dtype::U8, vec![name_bytes.len()], &name_bytes)?),
    ]);
    let checksum = data_checksum(tensors.iter().map(|(name, view)| (*name, view.data())));
    let metadata = HashMap::from([
        ("format".to_string(), CACHE_FORMAT.to_string()),
        ("format_version".to_string(), CACHE_FORMAT_VERSION.to_string()),
        ("source_hash".to_string(), contents.source_hash.clone()),
        ("data_sha256".to_string(), checksum),
        ("bundle_name".to_string(), contents.bundle_name.to_string()),
        ("num_classes".to_string(), classes.to_string()),
        ("embed_dim".to_string(), dim.to_string()),
        ("logit_scale_zs".to_string(), contents.logit_scale_zs.to_string()),
        ("logit_scale_ft".to_string(), contents.logit_scale_ft.to_string()),
        ("dac_neighbours".to_string(), DAC_NEIGHBOURS.to_string()),
        ("dac_base_distance".to_string(), DAC_BASE_DISTANCE.to_string()),
        ("created_by".to_string(), format!("cac-edge {}", env!("CARGO_PKG_VERSION"))),
    ]);
    write_safetensors(path, tensors, metadata)
}

/// Writes a safetensors file atomically and durably (see [`crate::fsio`]).
fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (impl AsRef<str> + Ord + std::fmt::Display, TensorView<'a>)>,
    metadata: HashMap<String, String>,
) -> Result<(), CacheError> {
    crate::fsio::write_atomic(path, |temporary| {
        safetensors::serialize_to_file(tensors, Some(metadata), temporary).map_err(|error| std::io::Error::other(error.to_string()))
    })
    .map_err(|source| CacheError::Write { path: path.to_path_buf(), source })
}

/// Metadata keys `eval` may set on an existing cache (a fitted temperature, a chosen threshold);
/// everything else is fixed when the cache is built.
pub const EVAL_METADATA_KEYS: [&str; 3] = [TEMPERATURE_KEY, THRESHOLD_KEY, THRESHOLD_CALIBRATION_KEY];

/// A TS temperature fitted on base validation images.
pub const TEMPERATURE_KEY: &str = "ts_temperature";

/// Sets (`Some`) or removes (`None`) `eval`'s metadata keys of the cache at `path`, rewriting it
/// atomically (a sibling temporary file renamed over it): readers that already mapped the old
/// file keep a consistent view, and a crash leaves the old file whole. The tensors and their
/// checksum are unchanged; the cache is verified before it is rewritten.
pub fn update_cache_metadata(path: &Path, updates: &[(&str, Option<String>)]) -> Result<(), CacheError> {
    let invalid = |message: String| CacheError::Invalid { path: path.to_path_buf(), message };
    if let Some((key, _)) = updates.iter().find(|(key, _)| !EVAL_METADATA_KEYS.contains(key)) {
        return Err(invalid(format!("metadata '{key}' is fixed when the cache is built")));
    }
    let cache = TextFeatureCache::open(path, CacheOpenOptions { verify_checksum: true })?;
    let tensors = SafeTensors::deserialize(&cache.mmap).map_err(|error| invalid(format!("safetensors: {error}")))?;
    let mut metadata = cache.metadata.clone();
    for (key, value) in updates {
        match value {
            Some(value) => metadata.insert(key.to_string(), value.clone()),
            None => metadata.remove(*key),
        };
    }
    write_safetensors(path, tensors.tensors(), metadata)
}

/// sha256 over the tensors' bytes in name order: independent of where the writer placed them.
fn data_checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut sorted: Vec<(&str, &[u8])> = tensors.collect();
    sorted.sort_by_key(|(name, _)| *name);
    let mut hasher = Sha256::new();
    for (_, bytes) in sorted {
        hasher.update(bytes);
    }
    hex(&hasher.finalize())
}

/// Options for opening a cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheOpenOptions {
    /// Hash the tensor data and compare with the stored checksum (reads the whole file once).
    pub verify_checksum: bool,
}

impl Default for CacheOpenOptions {
    fn default() -> Self {
        CacheOpenOptions { verify_checksum: true }
    }
}

/// An opened, memory-mapped cache. Accessors borrow from the mapping: nothing is copied.
pub struct TextFeatureCache {
    path: PathBuf,
    mmap: Mmap,
    metadata: HashMap<String, String>,
    /// Byte ranges of each tensor within the mapping.
    text_range: std::ops::Range<usize>,
    factors_range: std::ops::Range<usize>,
    base_range: std::ops::Range<usize>,
    names: Vec<String>,
    embed_dim: usize,
    logit_scale_zs: f32,
    logit_scale_ft: f32,
}

impl std::fmt::Debug for TextFeatureCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextFeatureCache").field("path", &self.path).field("classes", &self.names.len()).finish()
    }
}

impl TextFeatureCache {
    pub fn open(path: &Path, options: CacheOpenOptions) -> Result<TextFeatureCache, CacheError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CacheError::Missing { path: path.to_path_buf() },
            _ => CacheError::Read { path: path.to_path_buf(), source },
        })?;
        // SAFETY: read-only mapping of a file cac-edge only ever replaces by rename; see the
        // module documentation for why the bytes cannot change under us.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| CacheError::Read { path: path.to_path_buf(), source })?;
        Self::from_mmap(path, mmap, options)
    }

    fn from_mmap(path: &Path, mmap: Mmap, options: CacheOpenOptions) -> Result<TextFeatureCache, CacheError> {
        let invalid = |message: String| CacheError::Invalid { path: path.to_path_buf(), message };
        let tensors = SafeTensors::deserialize(&mmap).map_err(|error| invalid(format!("safetensors: {error}")))?;
        let (header_len, parsed) = SafeTensors::read_metadata(&mmap).map_err(|error| invalid(error.to_string()))?;
        let metadata = parsed.metadata().clone().unwrap_or_default();
        check_format(path, &metadata)?;
        if options.verify_checksum {
            let checksum = data_checksum(tensors.iter().map(|(name, view)| (name, view.data())));
            if metadata.get("data_sha256") != Some(&checksum) {
                return Err(CacheError::Corrupt { path: path.to_path_buf() });
            }
        }
        let data_start = 8 + header_len;
        let range_of = |name: &str, dtype: Dtype| -> Result<(Vec<usize>, std::ops::Range<usize>), CacheError> {
            let info = parsed.info(name).ok_or_else(|| invalid(format!("tensor '{name}' is missing")))?;
            if info.dtype != dtype {
                return Err(invalid(format!("tensor '{name}' is {:?}, expected {dtype:?}", info.dtype)));
            }
            Ok((info.shape.clone(), data_start + info.data_offsets.0..data_start + info.data_offsets.1))
        };
        let (text_shape, text_range) = range_of(TEXT_FEATURES, Dtype::F32)?;
        let (_, factors_range) = range_of(DAC_FACTORS, Dtype::F32)?;
        let (_, base_range) = range_of(IS_BASE, Dtype::U8)?;
        let (_, names_range) = range_of(CLASS_NAMES, Dtype::U8)?;
        let names: Vec<String> = std::str::from_utf8(&mmap[names_range])
            .map_err(|_| invalid("class names are not UTF-8".into()))?
            .split('\n')
            .map(str::to_string)
            .collect();
        let [2, classes, embed_dim] = text_shape[..] else {
            return Err(invalid(format!("text_features has shape {text_shape:?}, expected [2, C, D]")));
        };
        if classes != names.len() || factors_range.len() != 4 * classes || base_range.len() != classes {
            return Err(invalid("tensor shapes disagree with the class count".into()));
        }
        let scale = |key: &str| -> Result<f32, CacheError> {
            metadata
                .get(key)
                .and_then(|value| value.parse::<f32>().ok())
                .filter(|value| value.is_finite() && *value > 0.0)
                .ok_or_else(|| invalid(format!("metadata '{key}' is missing or not a positive number")))
        };
        let cache = TextFeatureCache {
            path: path.to_path_buf(),
            logit_scale_zs: scale("logit_scale_zs")?,
            logit_scale_ft: scale("logit_scale_ft")?,
            mmap,
            metadata,
            text_range,
            factors_range,
            base_range,
            names,
            embed_dim,
        };
        // Alignment of the f32 tensors within the page-aligned mapping is checked once here, so
        // the accessors below cannot fail.
        bytemuck::try_cast_slice::<u8, f32>(&cache.mmap[cache.text_range.clone()])
            .and(bytemuck::try_cast_slice::<u8, f32>(&cache.mmap[cache.factors_range.clone()]))
            .map_err(|error| invalid(format!("misaligned f32 tensor: {error:?}")))?;
        Ok(cache)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn class_names(&self) -> &[String] {
        &self.names
    }

    pub fn num_classes(&self) -> usize {
        self.names.len()
    }

    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    pub fn is_base(&self, class: usize) -> bool {
        self.mmap[self.base_range.clone()].get(class).is_some_and(|&flag| flag != 0)
    }

    /// [2C, D]: zero-shot rows, then fine-tuned rows; a view into the mapping.
    pub fn stacked_text_features(&self) -> ArrayView2<'_, f32> {
        let values: &[f32] = bytemuck::cast_slice(&self.mmap[self.text_range.clone()]);
        ArrayView2::from_shape((2 * self.names.len(), self.embed_dim), values).expect("shape checked at open")
    }

    pub fn dac_factors(&self) -> &[f32] {
        bytemuck::cast_slice(&self.mmap[self.factors_range.clone()])
    }

    pub fn logit_scale_zs(&self) -> f32 {
        self.logit_scale_zs
    }

    pub fn logit_scale_ft(&self) -> f32 {
        self.logit_scale_ft
    }

    pub fn source_hash(&self) -> &str {
        self.metadata.get("source_hash").map(String::as_str).unwrap_or_default()
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The TS temperature `eval` fitted and stored, if any.
    pub fn stored_temperature(&self) -> Option<f64> {
        self.metadata.get(TEMPERATURE_KEY).and_then(|value| value.parse::<f64>().ok())
    }

    /// The class list the cache was built for.
    pub fn class_list(&self) -> ClassList {
        ClassList { names: self.names.clone(), is_base: (0..self.names.len()).map(|class| self.is_base(class)).collect() }
    }

    /// Refuses a cache that was not built from this bundle (and, when given, this class list).
    /// Which class list the cache holds, in one line for every run's summary and `doctor`: a
    /// cache built for another list is otherwise used without a word when no list is given.
    /// "60 classes (30 base, 30 new), list 1a2b3c4d: red heart, green triangle, …".
    pub fn class_list_summary(&self) -> String {
        let classes = self.num_classes();
        let base = (0..classes).filter(|&class| self.is_base(class)).count();
        let digest = self.class_list().digest();
        let shown: Vec<&str> = self.class_names().iter().take(3).map(String::as_str).collect();
        let more = if classes > shown.len() { ", …" } else { "" };
        format!("{classes} classes ({base} base, {} new), list {}: {}{more}", classes - base, &digest[..8], shown.join(", "))
    }

    /// Checks that the cache was built from `bundle` (and for `classes`, when given).
    pub fn check_matches(&self, bundle: &Bundle, classes: Option<&ClassList>) -> Result<(), CacheError> {
        let stale = |message: String| CacheError::Stale { path: self.path.clone(), message };
        if self.embed_dim != bundle.embed_dim() {
            return Err(stale(format!(
                "its text features have dimension {}, the bundle's encoders {}",
                self.embed_dim,
                bundle.embed_dim()
            )));
        }
        let own_classes = self.class_list();
        if classes.is_some_and(|classes| *classes != own_classes) {
            return Err(stale("it was built for a different class list (names, order or base flags)".into()));
        }
        if self.source_hash() != source_hash(bundle, &own_classes) {
            return Err(stale(format!(
                "it was built from other inputs than the bundle {} (encoders, tokenizer, templates or format version changed)",
                bundle.dir().display()
            )));
        }
        Ok(())
    }
}

fn check_format(path: &Path, metadata: &HashMap<String, String>) -> Result<(), CacheError> {
    if metadata.get("format").map(String::as_str) != Some(CACHE_FORMAT) {
        return Err(CacheError::Invalid { path: path.to_path_buf(), message: format!("metadata 'format' is not '{CACHE_FORMAT}'") });
    }
    let version = metadata.get("format_version").cloned().unwrap_or_default();
    if version != CACHE_FORMAT_VERSION.to_string() {
        return Err(CacheError::Version { path: path.to_path_buf(), found: version });
    }
    Ok(())
}
