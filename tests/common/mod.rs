//! Shared helpers for the integration tests: fixture paths, the PyTorch reference tensors, and
//! a text-feature cache built from the committed test bundle.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{build_cache, ClassList};
use cac_edge::runtime::{Device, Runtime, SessionOptions};
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors};

pub fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(relative)
}

pub fn bundle_dir() -> PathBuf {
    fixture("bundle-tiny")
}

pub fn class_list() -> ClassList {
    ClassList::from_files(&fixture("classes.txt"), &fixture("base.txt")).expect("fixture class list")
}

pub fn cpu() -> SessionOptions {
    SessionOptions { device: Device::Cpu, intra_threads: Some(1), ..SessionOptions::default() }
}

/// The ONNX Runtime library, as `scripts/test` installs it. A missing library fails the test.
pub fn runtime() -> std::sync::Arc<Runtime> {
    Runtime::load(None).unwrap_or_else(|error| panic!("{error}"))
}

/// Builds the cache for `bundle` and the fixture class list in `dir`.
pub fn build_test_cache(bundle: &Path, dir: &Path) -> PathBuf {
    let output = dir.join("cache.safetensors");
    let bundle = Bundle::open(bundle).expect("open bundle");
    build_cache(&runtime(), &bundle, &class_list(), &cpu(), &output).expect("build cache");
    output
}

/// The PyTorch reference tensors written by onnx/fixtures/make_test_bundle.py.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load() -> Reference {
        let path = fixture("reference/tiny_embeddings.safetensors");
        Reference { bytes: std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display())) }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("reference safetensors")
    }

    pub fn f32(&self, name: &str) -> ArrayD<f32> {
        let tensors = self.tensors();
        let view = tensors.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        ArrayD::from_shape_vec(IxDyn(view.shape()), values).expect("shape")
    }

    pub fn i64(&self, name: &str) -> ArrayD<i64> {
        let tensors = self.tensors();
        let view = tensors.tensor(name).unwrap_or_else(|_| panic!("reference tensor {name}"));
        assert_eq!(view.dtype(), Dtype::I64, "{name}");
        let values = view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
        ArrayD::from_shape_vec(IxDyn(view.shape()), values).expect("shape")
    }

    pub fn metadata(&self, key: &str) -> String {
        let (_, metadata) = SafeTensors::read_metadata(&self.bytes).expect("reference metadata");
        metadata.metadata().as_ref().and_then(|m| m.get(key).cloned()).unwrap_or_else(|| panic!("metadata {key}"))
    }
}

/// Cosine similarity accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Copies the test bundle to `dir`, letting `edit` change the manifest text.
pub fn edited_bundle(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let copy = dir.join("bundle");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(bundle_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let manifest = copy.join("bundle.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = edit(text.clone());
    assert_ne!(text, edited, "the edit must change the manifest");
    std::fs::write(&manifest, edited).unwrap();
    copy
}

/// The binary under test; under emulation (cross/test) through the runner it names, since the
/// aarch64 binary cannot be executed directly on the x86_64 host.
pub fn command() -> Command {
    match std::env::var_os("CAC_EDGE_TEST_RUNNER") {
        Some(runner) => {
            let mut command = Command::new(runner);
            command.arg(env!("CARGO_BIN_EXE_cac-edge"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_cac-edge")),
    }
}

pub fn cac_edge(args: &[&str]) -> Output {
    command().args(args).output().expect("run cac-edge")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
