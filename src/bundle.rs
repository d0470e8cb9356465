//! The bundle: a directory of exported encoders tied together by `bundle.toml`.
//! The format is specified in `docs/FORMATS.md` §1.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::calibrate::CalibrationSettings;
use crate::preprocess::PreprocessConfig;
use crate::stamp::VerificationStamp;

/// File name of the manifest inside a bundle directory.
pub const MANIFEST_FILE: &str = "bundle.toml";
/// The manifest's required `format` value.
pub const BUNDLE_FORMAT: &str = "cac-edge-bundle";
/// The newest manifest `format_version` this build reads (and `onnx/export.py` writes).
pub const BUNDLE_FORMAT_VERSION: u32 = 2;
/// The oldest manifest `format_version` this build still reads: version 1 is version 2 without
/// image-encoder variants.
pub const OLDEST_BUNDLE_FORMAT_VERSION: u32 = 1;

/// The numeric precision of an image encoder: the exported fp32 graph, or its int8 variant
/// (`image_encoder_int8`, bundle format 2). Which one ran is named in every output line, and a
/// calibration fitted by `eval` belongs to the precision it was measured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The graph as exported: float32 weights and arithmetic.
    #[default]
    Fp32,
    /// The int8-quantised copy (`onnx/quantize.py`): weights in int8, activations quantised
    /// per run; several times faster on CPUs, embeddings within the parity the export printed.
    Int8,
}

impl Precision {
    /// "fp32" or "int8", as in output lines and options.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "int8" | "i8" => Ok(Precision::Int8),
            other => Err(format!("unknown precision '{other}': expected fp32 or int8")),
        }
    }
}

/// Why a bundle could not be opened or verified.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// `bundle.toml` is missing or unreadable.
    #[error("{path}: cannot read the bundle manifest: {source}; a bundle directory holds bundle.toml (see docs/FORMATS.md), written by onnx/export.py")]
    ManifestRead {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `bundle.toml` does not parse or breaks a rule of the format.
    #[error("{path}: invalid bundle manifest: {message}")]
    ManifestInvalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file the manifest lists is not in the bundle directory.
    #[error("{path}: file named in the bundle manifest is missing; re-export the bundle with onnx/export.py")]
    FileMissing {
        /// The missing file.
        path: PathBuf,
    },
    /// A bundle file could not be read while hashing it.
    #[error("{path}: cannot read: {source}")]
    FileRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bundle has no image encoder of the requested precision.
    #[error(
        "{path}: the bundle has no {precision} image encoder; run with --precision fp32, or add an int8 variant \
         with onnx/quantize.py (see onnx/README.md)"
    )]
    NoVariant {
        /// The manifest file.
        path: PathBuf,
        /// The precision asked for.
        precision: Precision,
    },
    /// A bundle file's sha256 differs from the one in `bundle.toml`.
    #[error(
        "{path}: content does not match the sha256 in bundle.toml (expected {expected}, found {actual}); \
         the file was changed after export: re-export the bundle, or restore the file"
    )]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The manifest's sha256, lower-case hex.
        expected: String,
        /// The file's sha256, lower-case hex.
        actual: String,
    },
}

/// `bundle.toml`, as written by `onnx/export.py`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// [`OLDEST_BUNDLE_FORMAT_VERSION`] to [`BUNDLE_FORMAT_VERSION`]; other versions are refused.
    pub format_version: u32,
    /// Free text, shown in reports.
    pub name: String,
    /// Informative (format 2): how the int8 variants were made and the parity measured at export.
    #[serde(default)]
    pub quantization: Option<toml::Table>,
    /// Optional free text.
    #[serde(default)]
    pub description: Option<String>,
    /// D: the width of every encoder's embeddings.
    pub embed_dim: usize,
    /// The image transform the encoders expect (`[preprocess]`).
    pub preprocess: PreprocessSection,
    /// Tokenizer settings (`[text]`).
    pub text: TextSection,
    /// The original CLIP (`[zero_shot]`).
    pub zero_shot: ModelSection,
    /// The prompt-learned model (`[fine_tuned]`).
    pub fine_tuned: ModelSection,
    /// Lower-case hex sha256 of every bundle file, by name relative to the bundle (`[files]`).
    pub files: BTreeMap<String, String>,
    /// Default calibration measured for this model (docs/CALIBRATION.md); the command line
    /// overrides it field by field.
    #[serde(default)]
    pub calibration: CalibrationSettings,
}

/// The manifest's `[preprocess]` table: the open_clip eval transform.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSection {
    /// S, in pixels: the shorter side is resized to S, then centre-cropped to S × S.
    pub image_size: u32,
    /// Resampling filter; only `"bicubic"` is supported.
    pub interpolation: String,
    /// Per-channel (RGB) mean subtracted after scaling to 0..1.
    pub mean: [f32; 3],
    /// Per-channel (RGB) standard deviation divided by; positive.
    pub std: [f32; 3],
}

/// The manifest's `[text]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSection {
    /// The tokenizer file, relative to the bundle.
    pub tokenizer: String,
    /// L, in tokens: the text encoders' `input_ids` are `[N, L]`; at least 2.
    pub context_length: usize,
}

/// The manifest's `[zero_shot]` or `[fine_tuned]` table: one CLIP model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Free text naming the fine-tuning method (coop, kgcoop, maple, ...).
    #[serde(default)]
    pub method: Option<String>,
    /// Required for the zero-shot model; absent for a fine-tuned model that shares it.
    #[serde(default)]
    pub image_encoder: Option<String>,
    /// Format 2: the int8-quantised copy of `image_encoder`, same ONNX contract.
    #[serde(default)]
    pub image_encoder_int8: Option<String>,
    /// The text encoder file, relative to the bundle.
    pub text_encoder: String,
    /// Prompt template with exactly one `{}`, replaced by the class name.
    pub template: String,
    /// The factor cosine similarities are multiplied by (CLIP's exp(logit_scale)); positive.
    pub logit_scale: f32,
}

/// An opened, validated bundle. Opening reads only the manifest; the encoders are opened by
/// [`crate::encode`] and file contents are hashed by [`Bundle::verify_files`].
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Reads and validates `dir/bundle.toml` and checks that every file it lists exists.
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|source| BundleError::ManifestRead { path: manifest_path.clone(), source })?;
        let invalid = |message: String| BundleError::ManifestInvalid { path: manifest_path.clone(), message };
        let manifest: Manifest = toml::from_str(&text).map_err(|error| invalid(error.to_string()))?;
        validate_manifest(&manifest).map_err(invalid)?;
        let bundle = Bundle { dir: dir.to_path_buf(), manifest };
        for name in bundle.manifest.files.keys() {
            let path = bundle.dir.join(name);
            if !path.is_file() {
                return Err(BundleError::FileMissing { path });
            }
        }
        Ok(bundle)
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `bundle.toml`.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's `name`.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// D: the width of every encoder's embeddings.
    pub fn embed_dim(&self) -> usize {
        self.manifest.embed_dim
    }

    /// The eval transform the image encoders expect.
    pub fn preprocess_config(&self) -> PreprocessConfig {
        let section = &self.manifest.preprocess;
        PreprocessConfig { image_size: section.image_size, mean: section.mean, std: section.std }
    }

    /// The tokenizer file.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.text.tokenizer)
    }

    /// L: the token sequence length of the text encoders.
    pub fn context_length(&self) -> usize {
        self.manifest.text.context_length
    }

    /// The zero-shot (original CLIP) image encoder.
    pub fn image_zs_path(&self) -> PathBuf {
        // validate_manifest guarantees the zero-shot image encoder is named.
        self.dir.join(self.manifest.zero_shot.image_encoder.as_deref().unwrap_or_default())
    }

    /// The fine-tuned image encoder, when the fine-tuned model has its own (MaPLe-style).
    pub fn image_ft_path(&self) -> Option<PathBuf> {
        self.manifest.fine_tuned.image_encoder.as_ref().map(|name| self.dir.join(name))
    }

    /// The image encoders of `precision`, by manifest-relative name: the zero-shot one, and the
    /// fine-tuned one when the fine-tuned model has its own. An error when the bundle has no
    /// variant of that precision (for either of them).
    pub fn image_encoder_names(&self, precision: Precision) -> Result<(&str, Option<&str>), BundleError> {
        let missing = || BundleError::NoVariant { path: self.dir.join(MANIFEST_FILE), precision };
        let zero_shot = image_encoder_of(&self.manifest.zero_shot, precision).flatten().ok_or_else(missing)?;
        let fine_tuned = image_encoder_of(&self.manifest.fine_tuned, precision).ok_or_else(missing)?;
        Ok((zero_shot, fine_tuned))
    }

    /// Whether the image encoders of `precision` quantise activations per run (int8-dynamic):
    /// their output for an image then depends on the other images of its batch. True for int8
    /// unless `[quantization] method` says the scales are static.
    pub fn is_batch_dependent(&self, precision: Precision) -> bool {
        let method = self.manifest.quantization.as_ref().and_then(|table| table.get("method")).and_then(|value| value.as_str());
        precision == Precision::Int8 && method != Some("int8-static")
    }

    /// The precisions this bundle has image encoders for (fp32 always).
    pub fn precisions(&self) -> Vec<Precision> {
        [Precision::Fp32, Precision::Int8].into_iter().filter(|precision| self.image_encoder_names(*precision).is_ok()).collect()
    }

    /// The manifest's sha256 of a bundle file (lower-case hex), by manifest-relative name.
    pub fn declared_sha256(&self, name: &str) -> Option<&str> {
        self.manifest.files.get(name).map(String::as_str)
    }

    /// The zero-shot (original CLIP) text encoder.
    pub fn text_zs_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.zero_shot.text_encoder)
    }

    /// The fine-tuned text encoder.
    pub fn text_ft_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.fine_tuned.text_encoder)
    }

    /// The names (relative to the bundle) of every file the manifest lists.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.files.keys().map(String::as_str)
    }

    /// Hashes the named files and compares them with the manifest's sha256.
    pub fn verify_files<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<(), BundleError> {
        names.into_iter().try_for_each(|name| self.verify_file(name))
    }

    /// [`Bundle::verify_files`], skipping the files `stamp` shows unchanged since they were
    /// last verified, and recording the ones hashed now.
    pub fn verify_files_stamped<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        stamp: &std::sync::Mutex<VerificationStamp>,
    ) -> Result<(), BundleError> {
        let lock = || stamp.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for name in names {
            let path = self.dir.join(name);
            let expected = self.declared_sha256(name).unwrap_or_default();
            if lock().is_verified(&path, expected) {
                tracing::debug!("{}: unchanged since it was verified (stamp), not hashed", path.display());
                continue;
            }
            self.verify_file(name)?;
            lock().record(&path, expected);
        }
        Ok(())
    }

    fn verify_file(&self, name: &str) -> Result<(), BundleError> {
        let path = self.dir.join(name);
        let expected = self.manifest.files.get(name).cloned().unwrap_or_default();
        let actual = sha256_file(&path)?;
        if actual != expected {
            return Err(BundleError::HashMismatch { path, expected, actual });
        }
        Ok(())
    }

    /// The manifest-relative names of the files that inference (not cache building) reads at
    /// `precision`.
    pub fn runtime_file_names(&self, precision: Precision) -> Result<Vec<&str>, BundleError> {
        let (zero_shot, fine_tuned) = self.image_encoder_names(precision)?;
        Ok(std::iter::once(zero_shot).chain(fine_tuned).collect())
    }

    /// A digest of everything the text features depend on, as declared by the manifest (file
    /// hashes, templates, scales, tokenizer settings). Cheap: nothing is read but the manifest.
    pub fn fingerprint(&self) -> String {
        let manifest = &self.manifest;
        let mut text = String::new();
        let _ = writeln!(text, "bundle-format {}", manifest.format_version);
        let _ = writeln!(text, "embed_dim {}", manifest.embed_dim);
        let _ = writeln!(text, "context_length {}", manifest.text.context_length);
        for (role, model) in [("zero_shot", &manifest.zero_shot), ("fine_tuned", &manifest.fine_tuned)] {
            let _ = writeln!(text, "{role} template {:?} logit_scale {:?}", model.template, model.logit_scale);
            let _ = writeln!(text, "{role} image {:?} text {:?}", model.image_encoder, model.text_encoder);
            if let Some(int8) = &model.image_encoder_int8 {
                // Only written when present, so that a format-1 bundle keeps its fingerprint.
                let _ = writeln!(text, "{role} image int8 {int8:?}");
            }
        }
        for (name, hash) in &manifest.files {
            let _ = writeln!(text, "file {name:?} {hash}");
        }
        hex(&Sha256::digest(text.as_bytes()))
    }
}

/// A model's image encoder of `precision`: `Some(None)` when the model has no image encoder of
/// its own, `None` when it has one but not of that precision.
fn image_encoder_of(model: &ModelSection, precision: Precision) -> Option<Option<&str>> {
    match precision {
        Precision::Fp32 => Some(model.image_encoder.as_deref()),
        Precision::Int8 if model.image_encoder.is_none() => Some(None),
        Precision::Int8 => model.image_encoder_int8.as_deref().map(Some),
    }
}

fn validate_manifest(manifest: &Manifest) -> Result<(), String> {
    if manifest.format != BUNDLE_FORMAT {
        return Err(format!("format is '{}', expected '{BUNDLE_FORMAT}'", manifest.format));
    }
    if !(OLDEST_BUNDLE_FORMAT_VERSION..=BUNDLE_FORMAT_VERSION).contains(&manifest.format_version) {
        return Err(format!(
            "format_version {} is not supported by this cac-edge (supports {OLDEST_BUNDLE_FORMAT_VERSION} to \
             {BUNDLE_FORMAT_VERSION}); re-export the bundle with the matching onnx/export.py, or update cac-edge",
            manifest.format_version
        ));
    }
    let has_variants = [&manifest.zero_shot, &manifest.fine_tuned].iter().any(|model| model.image_encoder_int8.is_some());
    if manifest.format_version < 2 && (has_variants || manifest.quantization.is_some()) {
        return Err("image_encoder_int8 and [quantization] need format_version = 2".into());
    }
    for (role, model) in [("zero_shot", &manifest.zero_shot), ("fine_tuned", &manifest.fine_tuned)] {
        if model.image_encoder_int8.is_some() && model.image_encoder.is_none() {
            return Err(format!("[{role}] names image_encoder_int8 without image_encoder (the fp32 graph it was made from)"));
        }
    }
    if manifest.embed_dim == 0 || manifest.text.context_length < 2 || manifest.preprocess.image_size == 0 {
        return Err("embed_dim, image_size must be positive and context_length at least 2".into());
    }
    if manifest.preprocess.interpolation != "bicubic" {
        return Err(format!("interpolation '{}' is not supported (only bicubic)", manifest.preprocess.interpolation));
    }
    if manifest.preprocess.std.iter().any(|value| !value.is_finite() || *value <= 0.0) {
        return Err("preprocess.std values must be positive".into());
    }
    if manifest.preprocess.mean.iter().any(|value| !value.is_finite()) {
        return Err("preprocess.mean values must be finite numbers".into());
    }
    if manifest.zero_shot.image_encoder.is_none() {
        return Err("[zero_shot] must name image_encoder".into());
    }
    for (role, model) in [("zero_shot", &manifest.zero_shot), ("fine_tuned", &manifest.fine_tuned)] {
        if model.template.matches("{}").count() != 1 {
            return Err(format!("[{role}] template '{}' must contain exactly one {{}}", model.template));
        }
        if !model.logit_scale.is_finite() || model.logit_scale <= 0.0 {
            return Err(format!("[{role}] logit_scale must be a positive number"));
        }
    }
    for name in referenced_files(manifest) {
        if !is_plain_relative(name) {
            return Err(format!("file name '{name}' must be relative and stay inside the bundle directory"));
        }
        if !manifest.files.contains_key(name) {
            return Err(format!("'{name}' has no sha256 entry in [files]"));
        }
    }
    Ok(())
}

fn referenced_files(manifest: &Manifest) -> Vec<&str> {
    let mut names = vec![manifest.text.tokenizer.as_str(), &manifest.zero_shot.text_encoder, &manifest.fine_tuned.text_encoder];
    for model in [&manifest.zero_shot, &manifest.fine_tuned] {
        names.extend(model.image_encoder.as_deref());
        names.extend(model.image_encoder_int8.as_deref());
    }
    names
}

fn is_plain_relative(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty() && path.components().all(|component| matches!(component, Component::Normal(_)))
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let read_error = |source| BundleError::FileRead { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let count = file.read(&mut buffer).map_err(read_error)?;
        if count == 0 {
            break;
        }
        hasher.update(&buffer[..count]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_must_stay_inside_the_bundle() {
        assert!(is_plain_relative("image_zs.onnx"));
        assert!(is_plain_relative("models/image_zs.onnx"));
        assert!(!is_plain_relative("../image_zs.onnx"));
        assert!(!is_plain_relative("/etc/passwd"));
        assert!(!is_plain_relative(""));
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab]), "000fab");
        // sha256("") from any reference implementation.
        assert_eq!(hex(&Sha256::digest(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
