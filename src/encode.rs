//! Encoders: ONNX Runtime sessions for the image and text towers, checked against the bundle's
//! ONNX contract (docs/FORMATS.md §1) when opened, and L2-normalising what they return.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2, ArrayView4, Axis};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::runtime::{ChosenDevice, Runtime, RuntimeError, SessionOptions};

/// The image encoders' input: f32 `[N, 3, S, S]`.
pub const IMAGE_INPUT: &str = "pixel_values";
/// The image encoders' output: f32 `[N, D]`.
pub const IMAGE_OUTPUT: &str = "image_embeds";
/// The text encoders' input: i64 `[N, L]`.
pub const TEXT_INPUT: &str = "input_ids";
/// The text encoders' output: f32 `[N, D]`.
pub const TEXT_OUTPUT: &str = "text_embeds";

/// Why an encoder could not be opened or run.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// ONNX Runtime could not create the session.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The graph's inputs or outputs do not match the ONNX contract.
    #[error(
        "{path}: the graph does not honour the cac-edge ONNX contract: {message}; \
         export it with onnx/export.py (see docs/FORMATS.md)"
    )]
    Contract {
        /// The model file.
        path: PathBuf,
        /// What does not match.
        message: String,
    },
    /// Running the graph failed or returned an output of the wrong shape.
    #[error("{path}: inference failed: {message}")]
    Inference {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message, or what is wrong with the output.
        message: String,
    },
}

/// What one encoder graph must look like.
struct Contract {
    input: &'static str,
    input_type: TensorElementType,
    /// Expected input dims; `None` = any (batch), `Some(n)` = must be n or dynamic.
    input_dims: Vec<Option<i64>>,
    output: &'static str,
    embed_dim: usize,
}

/// One encoder session with its validated contract.
pub struct Encoder {
    session: Session,
    path: PathBuf,
    input: &'static str,
    output: &'static str,
    embed_dim: usize,
    device: ChosenDevice,
    /// Run a batch one image at a time ([`Encoder::one_image_per_run`]).
    one_image_per_run: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("path", &self.path).field("device", &self.device).finish()
    }
}

impl Encoder {
    /// Opens an image encoder: `pixel_values` f32 `[N,3,S,S]` → `image_embeds` f32 `[N,D]`.
    pub fn open_image(
        runtime: &Runtime,
        path: &Path,
        options: &SessionOptions,
        image_size: u32,
        embed_dim: usize,
    ) -> Result<Encoder, EncodeError> {
        Self::open_image_of(runtime, path, None, options, image_size, embed_dim)
    }

    /// [`Encoder::open_image`] for a model whose sha256 is known (from the bundle's manifest),
    /// which keys the graph and TensorRT engine caches without reading the file.
    pub fn open_image_of(
        runtime: &Runtime,
        path: &Path,
        sha256: Option<&str>,
        options: &SessionOptions,
        image_size: u32,
        embed_dim: usize,
    ) -> Result<Encoder, EncodeError> {
        let size = i64::from(image_size);
        let contract = Contract {
            input: IMAGE_INPUT,
            input_type: TensorElementType::Float32,
            input_dims: vec![None, Some(3), Some(size), Some(size)],
            output: IMAGE_OUTPUT,
            embed_dim,
        };
        Self::open(runtime, path, sha256, options, contract)
    }

    /// Opens a text encoder: `input_ids` i64 `[N,L]` → `text_embeds` f32 `[N,D]`.
    pub fn open_text(
        runtime: &Runtime,
        path: &Path,
        options: &SessionOptions,
        context_length: usize,
        embed_dim: usize,
    ) -> Result<Encoder, EncodeError> {
        let contract = Contract {
            input: TEXT_INPUT,
            input_type: TensorElementType::Int64,
            input_dims: vec![None, Some(context_length as i64)],
            output: TEXT_OUTPUT,
            embed_dim,
        };
        Self::open(runtime, path, None, options, contract)
    }

    fn open(
        runtime: &Runtime,
        path: &Path,
        sha256: Option<&str>,
        options: &SessionOptions,
        contract: Contract,
    ) -> Result<Encoder, EncodeError> {
        let (session, device) = runtime.session_of(path, sha256, options)?;
        check_contract(&session, &contract).map_err(|message| EncodeError::Contract { path: path.to_path_buf(), message })?;
        Ok(Encoder {
            session,
            path: path.to_path_buf(),
            input: contract.input,
            output: contract.output,
            embed_dim: contract.embed_dim,
            device,
            one_image_per_run: false,
        })
    }

    /// The execution provider the session runs on.
    pub fn device(&self) -> &ChosenDevice {
        &self.device
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// D: the width of the embeddings it returns.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Encodes a batch of preprocessed images; rows are L2-normalised.
    pub fn encode_images(&mut self, pixels: ArrayView4<'_, f32>) -> Result<Array2<f32>, EncodeError> {
        let images = pixels.shape()[0];
        if self.one_image_per_run && images > 1 {
            let mut rows = Array2::zeros((images, self.embed_dim));
            for (index, image) in pixels.axis_chunks_iter(Axis(0), 1).enumerate() {
                let tensor = TensorRef::from_array_view(image).map_err(|error| self.inference_error(error))?;
                rows.row_mut(index).assign(&self.run(tensor, 1)?.row(0));
            }
            return Ok(rows);
        }
        let tensor = TensorRef::from_array_view(pixels).map_err(|error| self.inference_error(error))?;
        self.run(tensor, images)
    }

    /// Runs every batch one image at a time. A dynamically quantised graph chooses its activation
    /// scale per run, from every image in it, so an image's embedding (and a near-tie label)
    /// would otherwise depend on which frames shared its batch; one image per run makes each
    /// result a function of its image alone, at a small cost in throughput.
    pub fn one_image_per_run(mut self) -> Encoder {
        self.one_image_per_run = true;
        self
    }

    /// Encodes a batch of token id rows; rows are L2-normalised.
    pub fn encode_texts(&mut self, ids: ArrayView2<'_, i64>) -> Result<Array2<f32>, EncodeError> {
        let tensor = TensorRef::from_array_view(ids).map_err(|error| self.inference_error(error))?;
        self.run(tensor, ids.shape()[0])
    }

    fn run<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug>(
        &mut self,
        tensor: TensorRef<'_, T>,
        rows: usize,
    ) -> Result<Array2<f32>, EncodeError> {
        let inputs = ort::inputs![self.input => tensor];
        let outputs = self
            .session
            .run(inputs)
            .map_err(|error| EncodeError::Inference { path: self.path.clone(), message: error.to_string() })?;
        let value = outputs.get(self.output).ok_or_else(|| EncodeError::Inference {
            path: self.path.clone(),
            message: format!("no output named {}", self.output),
        })?;
        let embeds = value
            .try_extract_array::<f32>()
            .map_err(|error| EncodeError::Inference { path: self.path.clone(), message: error.to_string() })?;
        if embeds.shape() != [rows, self.embed_dim] {
            return Err(EncodeError::Contract {
                path: self.path.clone(),
                message: format!("{} has shape {:?}, expected [{rows}, {}]", self.output, embeds.shape(), self.embed_dim),
            });
        }
        let mut embeds: Array2<f32> = embeds
            .into_dimensionality()
            .map_err(|error| EncodeError::Inference { path: self.path.clone(), message: error.to_string() })?
            .to_owned();
        l2_normalize_rows(&mut embeds);
        Ok(embeds)
    }

    fn inference_error(&self, error: ort::Error) -> EncodeError {
        EncodeError::Inference { path: self.path.clone(), message: error.to_string() }
    }
}

fn check_contract(session: &Session, contract: &Contract) -> Result<(), String> {
    let inputs = session.inputs();
    let input = match inputs {
        [only] if only.name() == contract.input => only,
        _ => {
            let names: Vec<&str> = inputs.iter().map(|outlet| outlet.name()).collect();
            return Err(format!("expected exactly one input named '{}', found {names:?}", contract.input));
        }
    };
    check_tensor(input.dtype(), contract.input, contract.input_type, &contract.input_dims)?;
    let output = session.outputs().iter().find(|outlet| outlet.name() == contract.output).ok_or_else(|| {
        let names: Vec<&str> = session.outputs().iter().map(|outlet| outlet.name()).collect();
        format!("expected an output named '{}', found {names:?}", contract.output)
    })?;
    check_tensor(output.dtype(), contract.output, TensorElementType::Float32, &[None, Some(contract.embed_dim as i64)])
}

fn check_tensor(value: &ValueType, name: &str, element: TensorElementType, dims: &[Option<i64>]) -> Result<(), String> {
    let ValueType::Tensor { ty, shape, .. } = value else {
        return Err(format!("'{name}' is not a tensor"));
    };
    if *ty != element {
        return Err(format!("'{name}' has element type {ty:?}, expected {element:?}"));
    }
    if shape.len() != dims.len() {
        return Err(format!("'{name}' has rank {} ({:?}), expected rank {}", shape.len(), &shape[..], dims.len()));
    }
    for (axis, (actual, expected)) in shape.iter().zip(dims).enumerate() {
        // A dynamic dimension (-1) is checked when the graph runs.
        if let Some(expected) = expected {
            if *actual >= 0 && actual != expected {
                return Err(format!("'{name}' dimension {axis} is {actual}, expected {expected}"));
            }
        }
    }
    Ok(())
}

/// Divides every row by its Euclidean norm (accumulated in f64); an all-zero row stays zero.
pub fn l2_normalize_rows(rows: &mut Array2<f32>) {
    for mut row in rows.axis_iter_mut(Axis(0)) {
        let norm = row.iter().map(|&value| f64::from(value) * f64::from(value)).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.mapv_inplace(|value| (f64::from(value) / norm) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn rows_are_normalised_and_zero_rows_kept() {
        let mut rows = array![[3.0f32, 4.0], [0.0, 0.0]];
        l2_normalize_rows(&mut rows);
        assert_eq!(rows, array![[0.6f32, 0.8], [0.0, 0.0]]);
    }
}
