//! `cac-edge doctor`: what a field engineer checks before trusting a box — the ONNX Runtime
//! library and its providers, the machine, and whether the bundle and cache load and agree —
//! each problem with what to do about it.

use std::path::{Path, PathBuf};

use crate::bundle::{Bundle, Precision};
use crate::cache::{CacheOpenOptions, TextFeatureCache};
use crate::encode::Encoder;
use crate::pipeline::resolve_calibration;
use crate::runtime::{Runtime, RuntimeError, SessionOptions};
use crate::threshold;

/// The ONNX Runtime API level this build needs (ort's `api-17` feature).
pub const REQUIRED_ORT_API: u32 = 17;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth knowing (e.g. `auto` fell back to CPU).
    Warn,
    /// Something required is missing or wrong.
    Fail,
}

/// One thing examined.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was examined ("onnxruntime", "cache", …).
    pub name: &'static str,
    /// How it went.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, for warnings and failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// A check that passed.
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, detail: detail.into(), fix: None }
    }

    /// A warning or a failure, with what to do about it.
    pub fn problem(name: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, status, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// What to examine.
#[derive(Debug, Clone, Default)]
pub struct DoctorRequest {
    /// The session options the encoders would be opened with.
    pub session: SessionOptions,
    /// A bundle directory to check.
    pub bundle: Option<PathBuf>,
    /// A cache to check against the bundle.
    pub cache: Option<PathBuf>,
    /// The threshold `classify` would use, reported with the calibration.
    pub threshold: Option<f64>,
}

/// What to do when the ONNX Runtime library is missing or does not load, for someone who
/// installed cac-edge (no source checkout needed).
pub const LIBRARY_FIX: &str = "a packaged install keeps the library beside the binary (reinstall the package); \
     otherwise take libonnxruntime.so.* from the onnxruntime wheel on PyPI (onnxruntime/capi/ inside the zip) \
     or from a JetPack ONNX Runtime build, and name it with ORT_DYLIB_PATH or --ort-lib \
     (from a source checkout, scripts/setup-onnxruntime does this)";

/// Runs every check that applies; never panics, never stops at the first problem. `runtime` is
/// the outcome of loading ONNX Runtime ([`Runtime::load`]): a failure is the first problem shown.
pub fn examine(request: &DoctorRequest, runtime: Result<&Runtime, &RuntimeError>) -> Vec<Check> {
    let mut checks = vec![machine_check(), threads_check(request.session.intra_threads)];
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            checks.push(Check::problem("onnxruntime", Status::Fail, error.to_string(), LIBRARY_FIX));
            return checks;
        }
    };
    checks.push(library_check(runtime));
    checks.push(provider_check(runtime, &request.session));
    let Some(bundle_dir) = &request.bundle else {
        return checks;
    };
    match Bundle::open(bundle_dir) {
        Ok(bundle) => {
            checks.extend(bundle_checks(runtime, &bundle, &request.session));
            if let Some(cache) = &request.cache {
                checks.extend(cache_checks(&bundle, cache, request.threshold));
            }
        }
        Err(error) => checks.push(Check::problem(
            "bundle",
            Status::Fail,
            error.to_string(),
            "give the directory of a bundle written by onnx/export.py (it holds bundle.toml)",
        )),
    }
    checks
}

fn machine_check() -> Check {
    let arch = std::env::consts::ARCH;
    Check::ok("machine", format!("{arch}, CPU {}", cpu_model().unwrap_or_else(|| "unknown".into())))
}

fn threads_check(intra_threads: Option<usize>) -> Check {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = intra_threads.map_or_else(|| "ONNX Runtime default (one per physical core)".into(), |n| n.to_string());
    Check::ok("threads", format!("{cores} logical cores available; intra-op threads: {threads}"))
}

/// The CPU's name: /proc/cpuinfo's "model name" (x86), else "Hardware" or "Model" (Arm boards),
/// else the implementer/part codes (Jetson Orin: 0x41/0xd42, Cortex-A78AE), else the device
/// tree's model.
pub fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key && !value.trim().is_empty()).then(|| value.trim().to_string())
        })
    };
    let arm_part = || {
        let part = field("CPU part")?;
        let implementer = field("CPU implementer").unwrap_or_default();
        let known = if implementer == "0x41" && part == "0xd42" { " (Cortex-A78AE, Jetson Orin)" } else { "" };
        Some(format!("implementer {implementer} part {part}{known}"))
    };
    let device_tree = || {
        std::fs::read_to_string("/proc/device-tree/model")
            .ok()
            .map(|model| model.trim_end_matches('\0').trim().to_string())
            .filter(|model| !model.is_empty())
    };
    field("model name").or_else(|| field("Hardware")).or_else(|| field("Model")).or_else(arm_part).or_else(device_tree)
}

fn library_check(runtime: &Runtime) -> Check {
    let version = runtime
        .version()
        .or_else(|| ort_version(runtime.build_info()))
        .map_or_else(|| "unknown version".to_string(), |version| format!("version {version}"));
    Check::ok(
        "onnxruntime",
        format!(
            "{} ({version}; this build needs API level {REQUIRED_ORT_API}+, i.e. ONNX Runtime 1.{REQUIRED_ORT_API} or newer)",
            runtime.library_path().display()
        ),
    )
}

/// ONNX Runtime's build string carries the release branch, e.g. `git-branch=rel-1.32.0`.
pub fn ort_version(build_info: &str) -> Option<String> {
    let branch = build_info.split(',').find_map(|part| part.trim().split_once("git-branch=").map(|(_, b)| b.to_string()))?;
    Some(branch.strip_prefix("rel-").map_or(branch.clone(), str::to_string))
}

fn provider_check(runtime: &Runtime, session: &SessionOptions) -> Check {
    let available = runtime.available_providers().join(", ");
    match runtime.choose_device(session.device) {
        Ok(chosen) if chosen.fallback_reason.is_some() => Check::problem(
            "execution provider",
            Status::Warn,
            format!("available: {available}; selected: {} ({})", chosen.provider, chosen.fallback_reason.unwrap_or_default()),
            "for GPU inference on Jetson, install a JetPack build of ONNX Runtime with CUDA/TensorRT and set ORT_DYLIB_PATH (cross/README.md)",
        ),
        Ok(chosen) => Check::ok("execution provider", format!("available: {available}; selected: {}", chosen.provider)),
        Err(error) => Check::problem("execution provider", Status::Fail, error.to_string(), "choose the auto or cpu device"),
    }
}

fn bundle_checks(runtime: &Runtime, bundle: &Bundle, session: &SessionOptions) -> Vec<Check> {
    let mut checks = Vec::new();
    let names: Vec<&str> = bundle.file_names().collect();
    checks.push(match bundle.verify_files(names.iter().copied()) {
        Ok(()) => Check::ok("bundle files", format!("{}: {} files match bundle.toml", bundle.dir().display(), names.len())),
        Err(error) => Check::problem("bundle files", Status::Fail, error.to_string(), "re-export the bundle with onnx/export.py"),
    });
    let size = bundle.preprocess_config().image_size;
    let dim = bundle.embed_dim();
    let mut encoders = Vec::new();
    for precision in bundle.precisions() {
        let Ok((zero_shot, fine_tuned)) = bundle.image_encoder_names(precision) else { continue };
        let (zero_shot_label, fine_tuned_label) = match precision {
            Precision::Fp32 => ("image encoder (zero-shot)", "image encoder (fine-tuned)"),
            Precision::Int8 => ("image encoder (zero-shot, int8)", "image encoder (fine-tuned, int8)"),
        };
        encoders.push((zero_shot_label, bundle.dir().join(zero_shot), true));
        encoders.extend(fine_tuned.map(|name| (fine_tuned_label, bundle.dir().join(name), true)));
    }
    encoders.push(("text encoder (zero-shot)", bundle.text_zs_path(), false));
    encoders.push(("text encoder (fine-tuned)", bundle.text_ft_path(), false));
    for (name, path, is_image) in encoders {
        let opened = if is_image {
            Encoder::open_image(runtime, &path, session, size, dim)
        } else {
            Encoder::open_text(runtime, &path, session, bundle.context_length(), dim)
        };
        checks.push(match opened {
            Ok(encoder) => Check::ok(name, format!("{} loads on {}, embeds to {dim}", path.display(), encoder.device().provider)),
            Err(error) => Check::problem(name, Status::Fail, error.to_string(), "re-export the bundle with onnx/export.py"),
        });
    }
    checks
}

fn cache_checks(bundle: &Bundle, path: &Path, threshold: Option<f64>) -> Vec<Check> {
    let rebuild = format!(
        "rebuild it: cac-edge cache build --bundle {} --classes CLASSES --base BASE --output {}",
        bundle.dir().display(),
        path.display()
    );
    let cache = match TextFeatureCache::open(path, CacheOpenOptions { verify_checksum: true }) {
        Ok(cache) => cache,
        Err(error) => return vec![Check::problem("cache", Status::Fail, error.to_string(), rebuild)],
    };
    let mut checks = vec![match cache.check_matches(bundle, None) {
        Ok(()) => Check::ok(
            "cache",
            format!(
                "{}: {}, dim {}, built from this bundle, data checksum verified",
                path.display(),
                cache.class_list_summary(),
                cache.embed_dim()
            ),
        ),
        Err(error) => Check::problem("cache", Status::Fail, error.to_string(), rebuild),
    }];
    checks.push(match resolve_calibration(&Default::default(), bundle, &cache) {
        Ok(calibration) => Check::ok(
            "calibration",
            format!("{} {} with threshold {}", calibration.name(), serde_json::to_string(&calibration).unwrap_or_default(), {
                let threshold = threshold::resolve(threshold, &cache, &calibration);
                format!("{} ({})", threshold.value, threshold.source)
            }),
        ),
        Err(error) => Check::problem("calibration", Status::Fail, error.to_string(), "choose a calibration explicitly"),
    });
    checks
}

/// Whether the checks allow running: no failure.
pub fn healthy(checks: &[Check]) -> bool {
    checks.iter().all(|check| check.status != Status::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_the_build_string() {
        let info = "ORT Build Info: git-branch=rel-1.32.0, git-commit-id=abc, build type=Release";
        assert_eq!(ort_version(info).as_deref(), Some("1.32.0"));
        assert_eq!(ort_version("no branch here"), None);
    }
}
