//! The image-feature store of `eval`: image embeddings of a labeled set, computed once and kept
//! beside the cache, so a report can be redone with other calibrators or bins without the encoder.
//!
//! A store file is keyed by content: the bundle's fingerprint (encoder hashes), the preprocessing
//! and decode limits, and the sha256 of every image file in order. Any change to an image or a
//! model gives a new key, so a stale store is never read. The format is in docs/FORMATS.md §4.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::bundle::hex;
use crate::pipeline::{Classifier, ImageEmbeddings};

const STORE_FORMAT: &str = "cac-edge-image-features";
const STORE_FORMAT_VERSION: &str = "1";
const ZERO_SHOT: &str = "image_zs";
const FINE_TUNED: &str = "image_ft";
const ENCODED: &str = "encoded";

/// Why a feature store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FeatureStoreError {
    /// The store file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid store, or a damaged one; deleting it is the fix.
    #[error("{path}: not a valid image-feature store ({message}); delete it and run eval again")]
    Invalid {
        /// The store file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Embeddings of the images of a set that could be encoded, and why the others could not.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFeatures {
    /// Rows follow `encoded`.
    pub embeddings: ImageEmbeddings,
    /// Indices (into the image list) of the encoded images, ascending.
    pub encoded: Vec<usize>,
    /// (index, error) of every image that could not be decoded or encoded.
    pub failures: Vec<(usize, String)>,
}

/// The content key of a set of images for a classifier: see the module documentation.
pub fn content_key(classifier: &Classifier, paths: &[PathBuf]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("{STORE_FORMAT} {STORE_FORMAT_VERSION}\n"));
    hasher.update(format!("bundle {}\n", classifier.bundle().fingerprint()));
    hasher.update(format!("preprocess {:?}\nlimits {:?}\n", classifier.bundle().preprocess_config(), classifier.decode_limits()));
    // The encoders that run (fp32 or int8) and the decoding change the embeddings.
    if let Some(path) = classifier.calibration_path() {
        hasher.update(format!("path {}\n", path.to_json()));
    }
    for path in paths {
        // An unreadable file enters the key as such; the error is recorded as a failure.
        let content = file_sha256(path).unwrap_or_else(|error| format!("unreadable: {error}"));
        hasher.update(format!("image {content}\n"));
    }
    hex(&hasher.finalize())
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

/// Where the store of `key` lives: `<cache>.features/<first 32 hex digits of key>.safetensors`.
pub fn store_path(cache_path: &Path, key: &str) -> PathBuf {
    let mut folder = cache_path.as_os_str().to_owned();
    folder.push(".features");
    PathBuf::from(folder).join(format!("{}.safetensors", &key[..32.min(key.len())]))
}

/// Decodes and encodes `paths` in the classifier's batches, calling `progress` with the number
/// of images done. An image that cannot be decoded (or a batch the encoder fails on) is recorded
/// as a failure.
pub fn compute(classifier: &mut Classifier, paths: &[PathBuf], mut progress: impl FnMut(usize)) -> StoredFeatures {
    let dim = classifier.bundle().embed_dim();
    let shares_image_encoder = classifier.bundle().image_ft_path().is_none();
    let batch_size = classifier.batch_size();
    let mut zero_shot_rows = Vec::new();
    let mut fine_tuned_rows = Vec::new();
    let mut encoded = Vec::new();
    let mut failures = Vec::new();
    for (chunk_index, chunk) in paths.chunks(batch_size).enumerate() {
        let first = chunk_index * batch_size;
        let (decode_failures, embeddings) = classifier.embed_files(chunk, first);
        let mut decoded = Vec::new();
        for (index, failure) in (first..).zip(decode_failures) {
            match failure {
                Some(error) => failures.push((index, error.to_string())),
                None => decoded.push(index),
            }
        }
        match embeddings {
            Ok(batch) => {
                zero_shot_rows.extend(batch.zero_shot.iter().copied());
                if let Some(fine_tuned) = &batch.fine_tuned {
                    fine_tuned_rows.extend(fine_tuned.iter().copied());
                }
                encoded.extend(decoded);
            }
            Err(error) => {
                failures.extend(decoded.into_iter().map(|index| (index, format!("{}: {error}", paths[index].display()))))
            }
        }
        progress(first + chunk.len());
    }
    failures.sort();
    let rows = encoded.len();
    let matrix = |values: Vec<f32>| Array2::from_shape_vec((rows, dim), values).unwrap_or_else(|_| Array2::zeros((rows, dim)));
    let fine_tuned = (!shares_image_encoder).then(|| matrix(fine_tuned_rows));
    StoredFeatures { embeddings: ImageEmbeddings { zero_shot: matrix(zero_shot_rows), fine_tuned }, encoded, failures }
}

/// Writes the store atomically (a temporary file renamed into place).
pub fn save(path: &Path, features: &StoredFeatures) -> Result<(), FeatureStoreError> {
    let io_error = |source| FeatureStoreError::Io { path: path.to_path_buf(), source };
    let invalid = |message: String| FeatureStoreError::Invalid { path: path.to_path_buf(), message };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error)?;
    }
    let embeddings = &features.embeddings;
    let bytes = |matrix: &Array2<f32>| -> Vec<u8> { matrix.iter().flat_map(|value| value.to_le_bytes()).collect() };
    let zero_shot = bytes(&embeddings.zero_shot);
    let fine_tuned = embeddings.fine_tuned.as_ref().map(bytes);
    let encoded: Vec<u8> = features.encoded.iter().flat_map(|&index| (index as u64).to_le_bytes()).collect();
    let shape = [embeddings.zero_shot.nrows(), embeddings.zero_shot.ncols()];
    let tensor = |dtype, shape: Vec<usize>, data| TensorView::new(dtype, shape, data).map_err(|error| invalid(error.to_string()));
    let mut tensors = vec![
        (ZERO_SHOT, tensor(Dtype::F32, shape.to_vec(), &zero_shot)?),
        (ENCODED, tensor(Dtype::U64, vec![features.encoded.len()], &encoded)?),
    ];
    if let Some(fine_tuned) = &fine_tuned {
        tensors.push((FINE_TUNED, tensor(Dtype::F32, shape.to_vec(), fine_tuned)?));
    }
    let failures = serde_json::to_string(&features.failures).map_err(|error| invalid(error.to_string()))?;
    let metadata = HashMap::from([
        ("format".to_string(), STORE_FORMAT.to_string()),
        ("format_version".to_string(), STORE_FORMAT_VERSION.to_string()),
        ("failures".to_string(), failures),
    ]);
    crate::fsio::write_safetensors(path, tensors, metadata).map_err(io_error)
}

/// Reads a store written by [`save`]; `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<StoredFeatures>, FeatureStoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FeatureStoreError::Io { path: path.to_path_buf(), source }),
    };
    let invalid = |message: String| FeatureStoreError::Invalid { path: path.to_path_buf(), message };
    let tensors = SafeTensors::deserialize(&bytes).map_err(|error| invalid(error.to_string()))?;
    let (_, parsed) = SafeTensors::read_metadata(&bytes).map_err(|error| invalid(error.to_string()))?;
    let metadata = parsed.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(STORE_FORMAT)
        || metadata.get("format_version").map(String::as_str) != Some(STORE_FORMAT_VERSION)
    {
        return Err(invalid("unknown format or version".into()));
    }
    let failures: Vec<(usize, String)> = serde_json::from_str(metadata.get("failures").map(String::as_str).unwrap_or("[]"))
        .map_err(|error| invalid(error.to_string()))?;
    let encoded_view = tensors.tensor(ENCODED).map_err(|error| invalid(error.to_string()))?;
    let encoded: Vec<usize> = encoded_view
        .data()
        .chunks_exact(8)
        .map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap_or_default()) as usize)
        .collect();
    let matrix = |name: &str| -> Result<Option<Array2<f32>>, FeatureStoreError> {
        let Ok(view) = tensors.tensor(name) else { return Ok(None) };
        let [rows, dim] = view.shape()[..] else { return Err(invalid(format!("{name} is not a matrix"))) };
        if view.dtype() != Dtype::F32 || rows != encoded.len() {
            return Err(invalid(format!("{name} disagrees with the image list")));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap_or_default())).collect();
        Array2::from_shape_vec((rows, dim), values).map(Some).map_err(|error| invalid(error.to_string()))
    };
    let zero_shot = matrix(ZERO_SHOT)?.ok_or_else(|| invalid(format!("tensor '{ZERO_SHOT}' is missing")))?;
    let fine_tuned = matrix(FINE_TUNED)?;
    Ok(Some(StoredFeatures { embeddings: ImageEmbeddings { zero_shot, fine_tuned }, encoded, failures }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn store_round_trips_and_a_missing_store_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = store_path(&dir.path().join("demo.safetensors"), &"ab".repeat(32));
        assert!(path.ends_with("demo.safetensors.features/abababababababababababababababab.safetensors"));
        assert_eq!(load(&path).unwrap(), None);
        let features = StoredFeatures {
            embeddings: ImageEmbeddings {
                zero_shot: array![[1.0f32, 0.0], [0.6, 0.8]],
                fine_tuned: Some(array![[0.0f32, 1.0], [0.8, 0.6]]),
            },
            encoded: vec![0, 2],
            failures: vec![(1, "b.jpg: truncated".into())],
        };
        save(&path, &features).unwrap();
        assert_eq!(load(&path).unwrap(), Some(features));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(load(&path), Err(FeatureStoreError::Invalid { .. })));
    }
}
