//! Shared helpers for the integration tests: fixture paths, the PyTorch reference tensors, and
//! a text-feature cache built from the committed test bundle.
#![allow(dead_code, reason = "each test binary uses its own subset of these helpers")]

pub mod served;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cac_edge::bundle::Bundle;
use cac_edge::cache::{build_cache, ClassList, FeaturePrecision};
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
    build_cache(&runtime(), &bundle, &class_list(), &cpu(), &output, FeaturePrecision::F32).expect("build cache");
    output
}

/// The PyTorch reference tensors written by onnx/fixtures/make_test_bundle.py.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load() -> Reference {
        Reference::load_file("tiny_embeddings.safetensors")
    }

    /// Another reference file in tests/fixtures/reference/ (e.g. a deep-prompt bundle's).
    pub fn load_file(name: &str) -> Reference {
        let path = fixture("reference").join(name);
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

/// `cac-edge classify` of the test bundle with `cache`, not yet run: add options and inputs.
pub fn classify_command(cache: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = command();
    command.arg("classify").arg("--bundle").arg(bundle_dir()).arg("--cache").arg(cache);
    command
}

/// What `cac-edge classify` says of `image` with `bundle`, `cache` and `threshold`, on the CPU,
/// decoding as `serve` does by default (DCT-scaled): the reference for the service's decisions.
pub fn classify_reference(bundle: &Path, cache: impl AsRef<std::ffi::OsStr>, image: &Path, threshold: &str) -> serde_json::Value {
    let output = command()
        .arg("classify")
        .arg("--bundle")
        .arg(bundle)
        .arg("--cache")
        .arg(cache)
        .args(["--device", "cpu", "--decode", "scaled", "--threshold", threshold])
        .arg(image)
        .output()
        .expect("run classify");
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("one JSON line")
}

/// `cac-edge cache build` of `bundle` and a class list into `output`, on the CPU, not yet run.
pub fn cache_build_command(bundle: &Path, classes: &Path, base: &Path, output: &Path) -> Command {
    let mut command = command();
    command.args(["cache", "build", "--device", "cpu", "--threads", "1", "--bundle"]).arg(bundle);
    command.arg("--classes").arg(classes).arg("--base").arg(base).arg("--output").arg(output);
    command
}

/// [`cache_build_command`], run.
pub fn cache_build_cli(bundle: &Path, classes: &Path, base: &Path, output: &Path) -> Output {
    cache_build_command(bundle, classes, base, output).output().expect("run cac-edge")
}

/// The test bundle's cache for the fixture class list, built by the binary in `dir`.
pub fn build_cache_cli(dir: &Path) -> String {
    let cache = dir.join("cache.safetensors");
    let output = cache_build_cli(&bundle_dir(), &fixture("classes.txt"), &fixture("base.txt"), &cache);
    assert!(output.status.success(), "cache build failed: {}", text(&output.stderr));
    cache.to_str().unwrap().to_string()
}

/// Each stdout line of a run as JSON.
pub fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    text(&output.stdout).lines().map(|line| serde_json::from_str(line).expect("one JSON object per line")).collect()
}

/// Generous for a debug build on a slow box; the runs it guards take a few seconds.
pub const TIME_LIMIT: Duration = Duration::from_secs(90);

/// Runs `command` with stdin closed, killing it (and failing the test) past [`TIME_LIMIT`].
pub fn run_bounded(command: &mut Command) -> Output {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run cac-edge");
    let pipe = |mut reader: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = reader.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().unwrap()));
    let stderr = pipe(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {TIME_LIMIT:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}
