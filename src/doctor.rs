//! `cac-edge doctor`: what a field engineer checks before trusting a box — the ONNX Runtime
//! library and its providers, the machine, and whether the bundle and cache load and agree —
//! each problem with what to do about it.

use std::path::{Path, PathBuf};

use crate::bundle::Bundle;
use crate::cache::{CacheOpenOptions, TextFeatureCache};
use crate::encode::Encoder;
use crate::pipeline::{resolve_calibration, resolve_threshold};
use crate::runtime::{Runtime, SessionOptions};

/// The ONNX Runtime API level this build needs (ort's `api-17` feature).
pub const REQUIRED_ORT_API: u32 = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but worth knowing (e.g. `auto` fell back to CPU).
    Warn,
    /// Something required is missing or wrong.
    Fail,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do, for warnings and failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn problem(name: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, status, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// What to examine.
#[derive(Debug, Clone, Default)]
pub struct DoctorRequest {
    pub ort_library: Option<PathBuf>,
    pub session: SessionOptions,
    pub bundle: Option<PathBuf>,
    pub cache: Option<PathBuf>,
    /// The threshold `classify` would use, reported with the calibration.
    pub threshold: Option<f64>,
}

/// Runs every check that applies; never panics, never stops at the first problem.
pub fn examine(request: &DoctorRequest) -> Vec<Check> {
    let mut checks = vec![machine_check(), threads_check(request.session.intra_threads)];
    let runtime = match Runtime::load(request.ort_library.as_deref()) {
        Ok(runtime) => runtime,
        Err(error) => {
            checks.push(Check::problem("onnxruntime", Status::Fail, error.to_string(), "see the message above"));
            return checks;
        }
    };
    checks.push(library_check(&runtime));
    checks.push(provider_check(&runtime, &request.session));
    let Some(bundle_dir) = &request.bundle else {
        return checks;
    };
    match Bundle::open(bundle_dir) {
        Ok(bundle) => {
            checks.extend(bundle_checks(&runtime, &bundle, &request.session));
            if let Some(cache) = &request.cache {
                checks.extend(cache_checks(&bundle, cache, request.threshold));
            }
        }
        Err(error) => checks.push(Check::problem(
            "bundle",
            Status::Fail,
            error.to_string(),
            "point --bundle at a directory written by onnx/export.py",
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

/// "model name" on x86, the implementer/part codes on ARM (Jetson Orin: 0x41/0xd42, Cortex-A78AE).
fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |key: &str| {
        text.lines()
            .find(|line| line.split(':').next().is_some_and(|name| name.trim() == key))
            .and_then(|line| line.split_once(':').map(|(_, value)| value.trim().to_string()))
    };
    field("model name").or_else(|| {
        let part = field("CPU part")?;
        let implementer = field("CPU implementer").unwrap_or_default();
        let known = if implementer == "0x41" && part == "0xd42" { " (Cortex-A78AE, Jetson Orin)" } else { "" };
        Some(format!("implementer {implementer} part {part}{known}"))
    })
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
            format!("available: {available}; selected: {} ({})", chosen.name, chosen.fallback_reason.unwrap_or_default()),
            "for GPU inference on Jetson, install a JetPack build of ONNX Runtime with CUDA/TensorRT and set ORT_DYLIB_PATH (cross/README.md)",
        ),
        Ok(chosen) => Check::ok("execution provider", format!("available: {available}; selected: {}", chosen.name)),
        Err(error) => Check::problem("execution provider", Status::Fail, error.to_string(), "use --device auto or cpu"),
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
    let mut encoders = vec![("image encoder (zero-shot)", bundle.image_zs_path(), true)];
    encoders.extend(bundle.image_ft_path().map(|path| ("image encoder (fine-tuned)", path, true)));
    encoders.push(("text encoder (zero-shot)", bundle.text_zs_path(), false));
    encoders.push(("text encoder (fine-tuned)", bundle.text_ft_path(), false));
    for (name, path, is_image) in encoders {
        let opened = if is_image {
            Encoder::open_image(runtime, &path, session, size, dim)
        } else {
            Encoder::open_text(runtime, &path, session, bundle.context_length(), dim)
        };
        checks.push(match opened {
            Ok(encoder) => Check::ok(name, format!("{} loads on {}, embeds to {dim}", path.display(), encoder.device().name)),
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
    let base = (0..cache.num_classes()).filter(|&class| cache.is_base(class)).count();
    let mut checks = vec![match cache.check_matches(bundle, None) {
        Ok(()) => Check::ok(
            "cache",
            format!(
                "{}: {} classes ({base} base, {} new), dim {}, built from this bundle",
                path.display(),
                cache.num_classes(),
                cache.num_classes() - base,
                cache.embed_dim()
            ),
        ),
        Err(error) => Check::problem("cache", Status::Fail, error.to_string(), rebuild),
    }];
    checks.push(match resolve_calibration(&Default::default(), bundle, &cache) {
        Ok(calibration) => Check::ok(
            "calibration",
            format!(
                "{} {} with threshold {}",
                calibration.name(),
                serde_json::to_string(&calibration).unwrap_or_default(),
                {
                    let threshold = resolve_threshold(threshold, &cache, &calibration);
                    format!("{} ({})", threshold.value, threshold.source)
                }
            ),
        ),
        Err(error) => Check::problem("calibration", Status::Fail, error.to_string(), "pass --calibration explicitly"),
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
