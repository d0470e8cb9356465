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
use std::str::FromStr;

use half::{f16, slice::HalfBitsSliceExt};
use memmap2::Mmap;
use ndarray::{Array2, ArrayView2, Axis};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::bundle::{hex, Bundle, BundleError};
use crate::calibrate::{dac_factors, DAC_BASE_DISTANCE, DAC_NEIGHBOURS};
use crate::encode::{EncodeError, Encoder};
use crate::logits::TextFeatures;
use crate::runtime::{Runtime, SessionOptions};
use crate::threshold::{THRESHOLD_CALIBRATION_KEY, THRESHOLD_KEY};
use crate::tokenize::{ClipTokenizer, TokenizeError};

/// The cache's `format` metadata value.
pub const CACHE_FORMAT: &str = "cac-edge-text-cache";
/// The `format_version` of caches with f32 text features: what every cac-edge build reads.
pub const CACHE_FORMAT_VERSION: u32 = 1;
/// The `format_version` of caches with f16 text features. Builds before f16 read only version 1,
/// so they refuse such a cache with [`CacheError::Version`] instead of misreading it.
pub const CACHE_FORMAT_VERSION_F16: u32 = 2;
/// The metadata key naming the text features' precision (`f32` or `f16`).
pub const FEATURE_PRECISION_KEY: &str = "feature_precision";
/// From this many classes on, `cache build --feature-precision auto` stores f16 features: they
/// halve the file, its page cache and the bytes each image's logits read, while the calibrated
/// probabilities move by at most 3e-4 at D = 512 (docs/FORMATS.md §3). Below it the features are
/// at most 41 MB at D = 512, and at small D f16 moves probabilities by more (2.4e-3 at D = 64):
/// f32 keeps the exact features there.
pub const AUTO_F16_CLASSES: usize = 10_000;
const TEXT_FEATURES: &str = "text_features";
const DAC_FACTORS: &str = "dac_factors";
const IS_BASE: &str = "is_base";
const CLASS_NAMES: &str = "class_names";
/// Texts per text-encoder run while building.
const TEXT_BATCH: usize = 64;

/// Why a cache or class list could not be read, built, written or used.
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
    #[error(
        "{path}: cache format version {found} is not supported by this cac-edge (it reads versions \
         {CACHE_FORMAT_VERSION} and {CACHE_FORMAT_VERSION_F16})"
    )]
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
    /// Two names in one list that are the same class to the model: equal once case, spacing
    /// and Unicode form are ignored.
    #[error(
        "{path}:{line}: class '{name}' differs from '{first}' (line {first_line}) only in case, spacing or Unicode form: \
         the model would see one class twice and split its confidence between the two; rename or remove one"
    )]
    NearDuplicate {
        /// The class list file.
        path: PathBuf,
        /// The line of the second name.
        line: usize,
        /// The second name.
        name: String,
        /// The line of the first name.
        first_line: usize,
        /// The first name.
        first: String,
    },
    /// A class list of fewer than two classes.
    #[error(
        "{path}: only {count} class: a classifier needs at least two deployed classes (with one, every image is that \
         class at confidence 1.0); list every class the camera may see"
    )]
    TooFewClasses {
        /// The class list file.
        path: PathBuf,
        /// The classes it lists.
        count: usize,
    },
    /// Two classes whose prompts give the same token ids once cut to the context length.
    /// Classes are numbered from 1 in list order (names only, not counting comments or blanks).
    #[error(
        "class {first} '{first_name}' and class {second} '{second_name}' give identical token ids in the prompt \
         template '{template}' once cut to the context length of {context_length} tokens: the model cannot tell \
         them apart; rename or remove one (make them differ near the start)"
    )]
    SameTokens {
        /// The first class's number.
        first: usize,
        /// The first class's name.
        first_name: String,
        /// The second class's number.
        second: usize,
        /// The second class's name.
        second_name: String,
        /// The prompt template.
        template: String,
        /// The text encoder's context length.
        context_length: usize,
    },
    /// Two classes whose text features are (nearly) identical. Classes are numbered from 1 in
    /// list order (names only).
    #[error(
        "class {first} '{first_name}' and class {second} '{second_name}' have the same {encoder} text features \
         (cosine {cosine:.6}): the model cannot tell them apart and would split its confidence between them; \
         rename or remove one"
    )]
    SameFeatures {
        /// The first class's number.
        first: usize,
        /// The first class's name.
        first_name: String,
        /// The second class's number.
        second: usize,
        /// The second class's name.
        second_name: String,
        /// "zero-shot" or "fine-tuned".
        encoder: &'static str,
        /// The cosine of their features.
        cosine: f64,
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
    /// The class names, in list order.
    pub names: Vec<String>,
    /// Per class: whether the fine-tuned model was trained on it.
    pub is_base: Vec<bool>,
}

impl ClassList {
    /// Reads `classes` (one class name per line) and `base` (the base-class subset, one per
    /// line). Blank lines and lines starting with `#` are ignored; names are trimmed; a UTF-8
    /// byte-order mark at the start of a file is ignored. Refused: fewer than two classes, a
    /// name listed twice, and names that differ only in case, spacing or Unicode normal form.
    pub fn from_files(classes: &Path, base: &Path) -> Result<ClassList, CacheError> {
        let names = read_name_list(classes)?;
        if names.len() < 2 {
            return Err(CacheError::TooFewClasses { path: classes.to_path_buf(), count: names.len() });
        }
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

/// How a cache stores its class text features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeaturePrecision {
    /// 4 bytes per value, the text encoders' output as it is.
    F32,
    /// 2 bytes per value (IEEE half, rounded to nearest): half the memory read per image; the
    /// logits are still accumulated in f32.
    F16,
}

impl FeaturePrecision {
    /// `"f32"` or `"f16"`: the `feature_precision` metadata value and the command-line spelling.
    pub fn name(&self) -> &'static str {
        match self {
            FeaturePrecision::F32 => "f32",
            FeaturePrecision::F16 => "f16",
        }
    }

    /// What `--feature-precision auto` picks for `classes` classes: f16 from [`AUTO_F16_CLASSES`] on.
    pub fn auto(classes: usize) -> FeaturePrecision {
        if classes >= AUTO_F16_CLASSES {
            FeaturePrecision::F16
        } else {
            FeaturePrecision::F32
        }
    }

    /// The safetensors dtype of `text_features`.
    fn dtype(self) -> Dtype {
        match self {
            FeaturePrecision::F32 => Dtype::F32,
            FeaturePrecision::F16 => Dtype::F16,
        }
    }

    /// The `format_version` a cache of this precision is written with.
    pub fn format_version(self) -> u32 {
        match self {
            FeaturePrecision::F32 => CACHE_FORMAT_VERSION,
            FeaturePrecision::F16 => CACHE_FORMAT_VERSION_F16,
        }
    }
}

impl std::fmt::Display for FeaturePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name other than `f32` or `f16`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown feature precision '{0}' (expected f32 or f16)")]
pub struct UnknownPrecision(pub String);

impl FromStr for FeaturePrecision {
    type Err = UnknownPrecision;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "f32" => Ok(FeaturePrecision::F32),
            "f16" => Ok(FeaturePrecision::F16),
            other => Err(UnknownPrecision(other.to_string())),
        }
    }
}

/// What two names that are the same class to the model share: NFKC form, lower case, runs of
/// (Unicode) white space as one space.
fn name_key(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded = name.nfkc().collect::<String>().to_lowercase();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn read_name_list(path: &Path) -> Result<Vec<(usize, String)>, CacheError> {
    let text = std::fs::read_to_string(path).map_err(|source| CacheError::Read { path: path.to_path_buf(), source })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    // By what makes two names one class to the model: the index of its first name in `names`.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut names: Vec<(usize, String)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let (line, name) = (index + 1, raw.trim());
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        let key = name_key(name);
        if let Some(&earlier) = seen.get(&key) {
            let (first_line, first) = &names[earlier];
            if first == name {
                return Err(CacheError::ClassList {
                    path: path.to_path_buf(),
                    line,
                    message: format!("class '{name}' is listed twice (first on line {first_line})"),
                });
            }
            return Err(CacheError::NearDuplicate {
                path: path.to_path_buf(),
                line,
                name: name.to_string(),
                first_line: *first_line,
                first: first.clone(),
            });
        }
        seen.insert(key, names.len());
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
    feature_precision: FeaturePrecision,
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
    // Two classes the model cannot tell apart would split their confidence: refused, first by
    // their token ids (before any encoder runs), then by their features.
    let zero_shot_ids = prompt_ids(&tokenizer, &manifest.zero_shot.template, &classes.names)?;
    let fine_tuned_ids = prompt_ids(&tokenizer, &manifest.fine_tuned.template, &classes.names)?;
    check_distinct_tokens(&classes.names, zero_shot_ids.view(), &manifest.zero_shot.template)?;
    check_distinct_tokens(&classes.names, fine_tuned_ids.view(), &manifest.fine_tuned.template)?;
    let encode = |path: &Path, ids: ArrayView2<'_, i64>| -> Result<Array2<f32>, CacheError> {
        let mut encoder = Encoder::open_text(runtime, path, session_options, bundle.context_length(), bundle.embed_dim())?;
        encode_class_prompts(&mut encoder, ids)
    };
    let zero_shot = encode(&bundle.text_zs_path(), zero_shot_ids.view())?;
    check_distinct_features(&classes.names, zero_shot.view(), "zero-shot")?;
    let fine_tuned = encode(&bundle.text_ft_path(), fine_tuned_ids.view())?;
    check_distinct_features(&classes.names, fine_tuned.view(), "fine-tuned")?;
    let factors = dac_factors(zero_shot.view(), fine_tuned.view(), &classes.is_base);
    let stacked = ndarray::concatenate(Axis(0), &[zero_shot.view(), fine_tuned.view()])
        .map_err(|error| CacheError::Invalid { path: output.to_path_buf(), message: error.to_string() })?;
    // DAC's factors come from the f32 features, whatever precision is stored.
    let contents = CacheContents {
        classes,
        stacked_text: stacked.view(),
        feature_precision,
        dac_factors: &factors,
        logit_scale_zs: manifest.zero_shot.logit_scale,
        logit_scale_ft: manifest.fine_tuned.logit_scale,
        source_hash: source_hash(bundle, classes),
        bundle_name: bundle.name(),
    };
    write_cache(output, &contents)
}

/// [C, context_length] token ids of `template` filled with each name.
fn prompt_ids(tokenizer: &ClipTokenizer, template: &str, names: &[String]) -> Result<Array2<i64>, CacheError> {
    let prompts: Vec<String> = names.iter().map(|name| template.replacen("{}", name, 1)).collect();
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    Ok(tokenizer.encode_batch(&texts)?)
}

/// Refuses two classes whose prompts have the same ids (the tokenizer folds case and spacing,
/// and cuts long prompts to the context length).
fn check_distinct_tokens(names: &[String], ids: ArrayView2<'_, i64>, template: &str) -> Result<(), CacheError> {
    let mut seen: HashMap<Vec<i64>, usize> = HashMap::new();
    for (class, row) in ids.rows().into_iter().enumerate() {
        let row = row.to_vec();
        if let Some(&first) = seen.get(&row) {
            return Err(CacheError::SameTokens {
                first: first + 1,
                first_name: names[first].clone(),
                second: class + 1,
                second_name: names[class].clone(),
                template: template.to_string(),
                context_length: ids.ncols(),
            });
        }
        seen.insert(row, class);
    }
    Ok(())
}

/// Cosine similarity at or above which two classes' text features count as the same.
pub const SAME_FEATURES_COSINE: f64 = 0.9999;

/// Refuses two rows of `features` ([C, D]) whose cosine similarity is at least
/// [`SAME_FEATURES_COSINE`]; `encoder` names the text encoder in the error.
fn check_distinct_features(names: &[String], features: ArrayView2<'_, f32>, encoder: &'static str) -> Result<(), CacheError> {
    let norms: Vec<f64> =
        features.rows().into_iter().map(|row| row.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()).collect();
    let mut unit = features.to_owned();
    for (mut row, &norm) in unit.rows_mut().into_iter().zip(&norms) {
        if norm > 0.0 {
            row.mapv_inplace(|x| (f64::from(x) / norm) as f32);
        }
    }
    // Blocks of rows against the rows from the block on (each pair once, the upper triangle of
    // the C x C similarities), without holding them all at once.
    const BLOCK: usize = 256;
    for (block_index, block) in unit.axis_chunks_iter(Axis(0), BLOCK).enumerate() {
        let start = block_index * BLOCK;
        let similarities = block.dot(&unit.slice(ndarray::s![start.., ..]).t());
        for (offset, row) in similarities.rows().into_iter().enumerate() {
            let first = start + offset;
            for (column, &cosine) in row.iter().enumerate().skip(offset + 1) {
                let second = start + column;
                if f64::from(cosine) >= SAME_FEATURES_COSINE {
                    return Err(CacheError::SameFeatures {
                        first: first + 1,
                        first_name: names[first].clone(),
                        second: second + 1,
                        second_name: names[second].clone(),
                        encoder,
                        cosine: f64::from(cosine),
                    });
                }
            }
        }
    }
    Ok(())
}

fn encode_class_prompts(encoder: &mut Encoder, ids: ArrayView2<'_, i64>) -> Result<Array2<f32>, CacheError> {
    let mut rows = Vec::with_capacity(ids.nrows().div_ceil(TEXT_BATCH));
    for chunk in ids.axis_chunks_iter(Axis(0), TEXT_BATCH) {
        rows.push(encoder.encode_texts(chunk)?);
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
    /// The classes, in row order.
    pub classes: &'a ClassList,
    /// [2C, D]: zero-shot rows then fine-tuned rows, L2-normalised.
    pub stacked_text: ArrayView2<'a, f32>,
    /// How `stacked_text` is stored (f16: rounded to nearest when written).
    pub feature_precision: FeaturePrecision,
    /// DAC's factor r(c) per class.
    pub dac_factors: &'a [f32],
    /// The zero-shot model's logit scale.
    pub logit_scale_zs: f32,
    /// The fine-tuned model's logit scale.
    pub logit_scale_ft: f32,
    /// [`source_hash`] of the bundle and class list.
    pub source_hash: String,
    /// The bundle's name, for reports.
    pub bundle_name: &'a str,
}

/// Writes a cache atomically and durably: a temporary file in the same directory, fsynced and
/// renamed over `path`.
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
    let precision = contents.feature_precision;
    let text_bytes: Vec<u8> = match precision {
        FeaturePrecision::F32 => contents.stacked_text.iter().flat_map(|value| value.to_le_bytes()).collect(),
        FeaturePrecision::F16 => contents.stacked_text.iter().flat_map(|value| f16::from_f32(*value).to_le_bytes()).collect(),
    };
    let factor_bytes: Vec<u8> = contents.dac_factors.iter().flat_map(|value| value.to_le_bytes()).collect();
    let base_bytes: Vec<u8> = contents.classes.is_base.iter().map(|&base| u8::from(base)).collect();
    let name_bytes = contents.classes.names.join("\n").into_bytes();
    let tensor =
        |dtype, shape: Vec<usize>, bytes| TensorView::new(dtype, shape, bytes).map_err(|error| invalid(error.to_string()));
    let tensors = BTreeMap::from([
        (TEXT_FEATURES, tensor(precision.dtype(), vec![2, classes, dim], &text_bytes)?),
        (DAC_FACTORS, tensor(Dtype::F32, vec![classes], &factor_bytes)?),
        (IS_BASE, tensor(Dtype::U8, vec![classes], &base_bytes)?),
        (CLASS_NAMES, tensor(Dtype::U8, vec![name_bytes.len()], &name_bytes)?),
    ]);
    let checksum = data_checksum(tensors.iter().map(|(name, view)| (*name, view.data())));
    let metadata = HashMap::from([
        ("format".to_string(), CACHE_FORMAT.to_string()),
        ("format_version".to_string(), precision.format_version().to_string()),
        (FEATURE_PRECISION_KEY.to_string(), precision.name().to_string()),
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

/// Writes a safetensors file atomically and durably (see `fsio`).
fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (impl AsRef<str> + Ord, TensorView<'a>)>,
    metadata: HashMap<String, String>,
) -> Result<(), CacheError> {
    crate::fsio::write_safetensors(path, tensors, metadata)
        .map_err(|source| CacheError::Write { path: path.to_path_buf(), source })
}

/// Metadata keys `eval` may set on an existing cache (a fitted temperature, a chosen threshold,
/// the shift alarm's baseline); everything else is fixed when the cache is built.
pub const EVAL_METADATA_KEYS: [&str; 5] = [
    TEMPERATURE_KEY,
    THRESHOLD_KEY,
    THRESHOLD_CALIBRATION_KEY,
    crate::drift::BASELINE_KEY,
    crate::calibration_path::CALIBRATION_PATH_KEY,
];

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
    feature_precision: FeaturePrecision,
    logit_scale_zs: f32,
    logit_scale_ft: f32,
}

impl std::fmt::Debug for TextFeatureCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextFeatureCache").field("path", &self.path).field("classes", &self.names.len()).finish()
    }
}

impl TextFeatureCache {
    /// Maps the cache at `path` and checks its format (and checksum, if asked).
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
        let version = check_format(path, &metadata)?;
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
        let feature_precision = feature_precision(path, &parsed, &metadata, version)?;
        let (text_shape, text_range) = range_of(TEXT_FEATURES, feature_precision.dtype())?;
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
            feature_precision,
        };
        // Alignment of the tensors within the page-aligned mapping is checked once here, so
        // the accessors below cannot fail.
        let text = &cache.mmap[cache.text_range.clone()];
        let text_aligned = match feature_precision {
            FeaturePrecision::F32 => bytemuck::try_cast_slice::<u8, f32>(text).map(|_| ()),
            FeaturePrecision::F16 => bytemuck::try_cast_slice::<u8, u16>(text).map(|_| ()),
        };
        text_aligned
            .and(bytemuck::try_cast_slice::<u8, f32>(&cache.mmap[cache.factors_range.clone()]).map(|_| ()))
            .map_err(|error| invalid(format!("misaligned tensor: {error:?}")))?;
        // A zero, negative or non-finite factor would silently invert or flatten DAC's
        // probabilities; the checksum does not catch a crafted cache whose checksum was redone.
        if let Some(class) = cache.dac_factors().iter().position(|factor| !(factor.is_finite() && *factor > 0.0)) {
            return Err(invalid(format!(
                "the DAC factor of class {class} is {}, not a positive number",
                cache.dac_factors()[class]
            )));
        }
        Ok(cache)
    }

    /// Hashes the tensor data and compares it with the stored `data_sha256` (what opening with
    /// `verify_checksum` does), for a cache opened without it.
    pub fn verify_data(&self) -> Result<(), CacheError> {
        let invalid = |message: String| CacheError::Invalid { path: self.path.clone(), message };
        let tensors = SafeTensors::deserialize(&self.mmap).map_err(|error| invalid(format!("safetensors: {error}")))?;
        let checksum = data_checksum(tensors.iter().map(|(name, view)| (name, view.data())));
        if self.metadata.get("data_sha256") != Some(&checksum) {
            return Err(CacheError::Corrupt { path: self.path.clone() });
        }
        Ok(())
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The class names, in row order.
    pub fn class_names(&self) -> &[String] {
        &self.names
    }

    /// C: the number of classes.
    pub fn num_classes(&self) -> usize {
        self.names.len()
    }

    /// D: the width of the text features.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Whether class `class` (0-based) is a base class; false out of range.
    pub fn is_base(&self, class: usize) -> bool {
        self.mmap[self.base_range.clone()].get(class).is_some_and(|&flag| flag != 0)
    }

    /// [2C, D]: zero-shot rows, then fine-tuned rows, in the stored precision; a view into the
    /// mapping. [`crate::logits::batch_logits`] takes it as it is; `.to_f32()` gives f32 values.
    pub fn stacked_text_features(&self) -> TextFeatures<'_> {
        let bytes = &self.mmap[self.text_range.clone()];
        let shape = (2 * self.names.len(), self.embed_dim);
        match self.feature_precision {
            FeaturePrecision::F32 => {
                let values: &[f32] = bytemuck::cast_slice(bytes);
                TextFeatures::F32(ArrayView2::from_shape(shape, values).expect("shape checked at open"))
            }
            FeaturePrecision::F16 => {
                let bits: &[u16] = bytemuck::cast_slice(bytes);
                TextFeatures::F16(ArrayView2::from_shape(shape, bits.reinterpret_cast::<f16>()).expect("shape checked at open"))
            }
        }
    }

    /// How the text features are stored.
    pub fn feature_precision(&self) -> FeaturePrecision {
        self.feature_precision
    }

    /// DAC's factor r(c) per class.
    pub fn dac_factors(&self) -> &[f32] {
        bytemuck::cast_slice(&self.mmap[self.factors_range.clone()])
    }

    /// The zero-shot model's logit scale.
    pub fn logit_scale_zs(&self) -> f32 {
        self.logit_scale_zs
    }

    /// The fine-tuned model's logit scale.
    pub fn logit_scale_ft(&self) -> f32 {
        self.logit_scale_ft
    }

    /// The stored [`source_hash`] of the inputs it was built from; empty if absent.
    pub fn source_hash(&self) -> &str {
        self.metadata.get("source_hash").map(String::as_str).unwrap_or_default()
    }

    /// The safetensors header's metadata, key by key.
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

/// Checks the format name and version; returns the version (one this build reads).
fn check_format(path: &Path, metadata: &HashMap<String, String>) -> Result<u32, CacheError> {
    if metadata.get("format").map(String::as_str) != Some(CACHE_FORMAT) {
        return Err(CacheError::Invalid {
            path: path.to_path_buf(),
            message: format!("metadata 'format' is not '{CACHE_FORMAT}'"),
        });
    }
    let version = metadata.get("format_version").cloned().unwrap_or_default();
    match version.parse::<u32>() {
        Ok(known @ (CACHE_FORMAT_VERSION | CACHE_FORMAT_VERSION_F16)) if known.to_string() == version => Ok(known),
        _ => Err(CacheError::Version { path: path.to_path_buf(), found: version }),
    }
}

/// The text features' precision: the `text_features` dtype, which must agree with the format
/// version (f16 only in version 2, f32 only in version 1) and with the `feature_precision`
/// metadata key when present (version-1 caches written before f16 have no key).
fn feature_precision(
    path: &Path,
    parsed: &safetensors::tensor::Metadata,
    metadata: &HashMap<String, String>,
    version: u32,
) -> Result<FeaturePrecision, CacheError> {
    let invalid = |message: String| CacheError::Invalid { path: path.to_path_buf(), message };
    let info = parsed.info(TEXT_FEATURES).ok_or_else(|| invalid(format!("tensor '{TEXT_FEATURES}' is missing")))?;
    let precision = match info.dtype {
        Dtype::F32 => FeaturePrecision::F32,
        Dtype::F16 => FeaturePrecision::F16,
        other => return Err(invalid(format!("tensor '{TEXT_FEATURES}' is {other:?}, expected F32 or F16"))),
    };
    if precision.format_version() != version {
        return Err(invalid(format!("{} text features in a format version {version} cache", precision.name())));
    }
    match metadata.get(FEATURE_PRECISION_KEY) {
        Some(named) if named != precision.name() => Err(invalid(format!(
            "metadata '{FEATURE_PRECISION_KEY}' is '{named}' but the text features are {}",
            precision.name()
        ))),
        _ => Ok(precision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `classes` and `base` to a temporary folder and loads them.
    fn load(classes: &str, base: &str) -> Result<ClassList, CacheError> {
        let dir = tempfile::tempdir().unwrap();
        let (classes_path, base_path) = (dir.path().join("classes.txt"), dir.path().join("base.txt"));
        std::fs::write(&classes_path, classes).unwrap();
        std::fs::write(&base_path, base).unwrap();
        ClassList::from_files(&classes_path, &base_path)
    }

    #[test]
    fn a_cache_with_a_non_positive_dac_factor_is_refused() {
        let classes = ClassList { names: vec!["cat".into(), "dog".into()], is_base: vec![true, false] };
        let features = ndarray::Array2::<f32>::eye(4);
        let dir = tempfile::tempdir().unwrap();
        for (factors, refused) in [([1.0f32, 0.8], false), ([1.0, -0.5], true), ([f32::NAN, 1.0], true), ([1.0, 0.0], true)] {
            let path = dir.path().join("c.safetensors");
            let contents = CacheContents {
                classes: &classes,
                stacked_text: features.view(),
                feature_precision: FeaturePrecision::F32,
                dac_factors: &factors,
                logit_scale_zs: 100.0,
                logit_scale_ft: 100.0,
                source_hash: "test".into(),
                bundle_name: "test",
            };
            write_cache(&path, &contents).unwrap();
            match TextFeatureCache::open(&path, CacheOpenOptions::default()) {
                Err(CacheError::Invalid { message, .. }) if refused => assert!(message.contains("DAC factor"), "{message}"),
                Ok(_) if !refused => {}
                other => panic!("{factors:?}: {:?}", other.map(|_| "opened")),
            }
        }
    }

    #[test]
    fn a_byte_order_mark_is_ignored_in_both_files() {
        let list = load("\u{feff}red heart\ngreen triangle\n", "\u{feff}red heart\n").unwrap();
        assert_eq!(list, ClassList { names: vec!["red heart".into(), "green triangle".into()], is_base: vec![true, false] });
        // Only at the start of the file; elsewhere it is part of the text.
        let list = load("red heart\n\u{feff}green triangle\n", "red heart\n").unwrap();
        assert_eq!(list.names[1], "\u{feff}green triangle");
    }

    #[test]
    fn fewer_than_two_classes_are_refused() {
        let error = load("# one\nred heart\n\n", "red heart\n").unwrap_err();
        assert!(matches!(error, CacheError::TooFewClasses { count: 1, .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("classes.txt: only 1 class: a classifier needs at least two"), "{message}");
        assert!(message.contains("confidence 1.0"), "{message}");
        assert!(load("red heart\nblue square\n", "red heart\n").is_ok());
    }

    #[test]
    fn names_that_differ_only_in_case_spacing_or_unicode_form_are_refused() {
        for (near, first_line) in [
            ("Green Triangle", 3),
            ("green  triangle", 3),
            ("green\ttriangle", 3),
            ("green\u{a0}triangle", 3),
            ("green\u{3000}TRIANGLE", 3),
            ("ｇｒｅｅｎ triangle", 3), // fullwidth: NFKC
            ("cafe\u{301}", 2),         // decomposed é: NFC
            ("CAFÉ", 2),
        ] {
            let classes = format!("red heart\ncaf\u{e9}\ngreen triangle\n# comment\n{near}\n");
            let error = load(&classes, "red heart\n").unwrap_err();
            match &error {
                CacheError::NearDuplicate { line, first_line: first, name, .. } => {
                    assert_eq!((*line, *first, name.as_str()), (5, first_line, near), "{error}");
                }
                other => panic!("{near:?}: {other:?}"),
            }
            let message = error.to_string();
            assert!(message.contains(&format!("classes.txt:5: class '{near}' differs from")), "{message}");
            assert!(message.contains(&format!("(line {first_line}) only in case, spacing or Unicode form")), "{message}");
            assert!(message.contains("rename or remove one"), "{message}");
        }
        // The same name twice keeps its own message; different words are fine.
        let error = load("red heart\ngreen triangle\nred heart\n", "red heart\n").unwrap_err().to_string();
        assert!(error.ends_with("classes.txt:3: class 'red heart' is listed twice (first on line 1)"), "{error}");
        assert!(load("red heart\nred hearts\nredheart\n", "red heart\n").is_ok());
        // The base list too.
        let error = load("red heart\ngreen triangle\n", "red heart\nRed Heart\n").unwrap_err();
        assert!(matches!(error, CacheError::NearDuplicate { line: 2, first_line: 1, .. }), "{error:?}");
    }

    fn names(count: usize) -> Vec<String> {
        (1..=count).map(|class| format!("class{class}")).collect()
    }

    #[test]
    fn identical_token_rows_are_refused_naming_both_classes() {
        let ids = ndarray::array![[49406, 320, 1929, 49407], [49406, 320, 1930, 49407], [49406, 320, 1929, 49407]];
        let error = check_distinct_tokens(&names(3), ids.view(), "a photo of a {}.").unwrap_err();
        assert!(matches!(&error, CacheError::SameTokens { first: 1, second: 3, context_length: 4, .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.starts_with("class 1 'class1' and class 3 'class3' give identical token ids"), "{message}");
        assert!(message.contains("context length of 4 tokens") && message.contains("rename or remove one"), "{message}");
        assert!(check_distinct_tokens(&names(2), ids.slice(ndarray::s![..2, ..]), "{}").is_ok());
    }

    /// Deterministic pseudo-random features in [-1, 1).
    fn features(rows: usize, dim: usize) -> Array2<f32> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        Array2::from_shape_simple_fn((rows, dim), || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
    }

    #[test]
    fn identical_or_nearly_identical_features_are_refused_naming_both_classes() {
        let dim = 64;
        let mut rows = features(300, dim);
        assert!(check_distinct_features(&names(300), rows.view(), "zero-shot").is_ok());

        // Row 291 (class 292) in the second block: row 6 scaled, i.e. the same direction.
        let copy = rows.row(6).mapv(|x| 3.0 * x);
        rows.row_mut(291).assign(&copy);
        let error = check_distinct_features(&names(300), rows.view(), "fine-tuned").unwrap_err();
        match &error {
            CacheError::SameFeatures { first, second, encoder, cosine, .. } => {
                assert_eq!((*first, *second, *encoder), (7, 292, "fine-tuned"));
                assert!((cosine - 1.0).abs() < 1e-6, "{cosine}");
            }
            other => panic!("{other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.starts_with(
                "class 7 'class7' and class 292 'class292' have the same fine-tuned text features (cosine 1.000000)"
            ),
            "{message}"
        );
        assert!(message.contains("rename or remove one"), "{message}");

        // Just above and just below the threshold: a small change along an orthogonal direction.
        let base = ndarray::Array1::from_shape_fn(dim, |i| if i == 0 { 1.0f32 } else { 0.0 });
        for (angle_cosine, refused) in [(0.99995f64, true), (0.9998, false)] {
            let sine = (1.0 - angle_cosine * angle_cosine).sqrt();
            let mut pair = Array2::<f32>::zeros((2, dim));
            pair.row_mut(0).assign(&base);
            pair[[1, 0]] = angle_cosine as f32;
            pair[[1, 1]] = sine as f32;
            let outcome = check_distinct_features(&names(2), pair.view(), "zero-shot");
            assert_eq!(outcome.is_err(), refused, "cosine {angle_cosine}: {outcome:?}");
        }
    }
}
