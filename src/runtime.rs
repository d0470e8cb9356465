//! ONNX Runtime: finding and loading the shared library, and creating sessions on the
//! requested execution provider.
//!
//! ONNX Runtime allows one library and one environment per process (ort enforces it), so the
//! loaded [`Runtime`] is the one piece of process-wide state in cac-edge: [`Runtime::load`]
//! returns the same `Arc` to every caller, and refuses a second, different library path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::ep::{self, ExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

/// Environment variable naming the ONNX Runtime shared library (ort's own convention).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// File name of the library on this platform.
#[cfg(target_os = "macos")]
pub const LIBRARY_FILE: &str = "libonnxruntime.dylib";
/// File name of the library on this platform.
#[cfg(target_os = "windows")]
pub const LIBRARY_FILE: &str = "onnxruntime.dll";
/// File name of the library on this platform.
#[cfg(not(any(target_os = "macos", target_os = "windows")))]
pub const LIBRARY_FILE: &str = "libonnxruntime.so";

/// Why ONNX Runtime could not be loaded or a session created.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No library at the given path or in any default location.
    #[error("ONNX Runtime library not found (looked in: {searched}); it needs ONNX Runtime 1.17 or newer")]
    LibraryNotFound {
        /// The paths looked at, comma-separated.
        searched: String,
    },
    /// The library exists but could not be loaded.
    #[error("could not load the ONNX Runtime library {path}: {message}")]
    LibraryLoad {
        /// The library file.
        path: PathBuf,
        /// ONNX Runtime's or the loader's message.
        message: String,
    },
    /// Another library is already loaded in this process.
    #[error(
        "ONNX Runtime is already loaded from {loaded} in this process; cannot also load {requested} \
         (ONNX Runtime allows one library per process)"
    )]
    AlreadyLoaded {
        /// The library in use.
        loaded: PathBuf,
        /// The library asked for.
        requested: PathBuf,
    },
    /// The requested execution provider is not in the loaded library.
    #[error(
        "execution provider {provider} was requested but the ONNX Runtime library at {library} does not provide it \
         (available: {available}); run on the CPU, or use an ONNX Runtime build with {provider}"
    )]
    ProviderUnavailable {
        /// ONNX Runtime's name of the provider.
        provider: &'static str,
        /// The loaded library.
        library: PathBuf,
        /// The providers it has, comma-separated.
        available: String,
    },
    /// Session options that contradict each other.
    #[error("invalid session options: {0}")]
    Options(String),
    /// ONNX Runtime refused the model or the provider options.
    #[error("could not create an ONNX Runtime session for {path}: {message}")]
    Session {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
}

/// Which execution provider sessions should run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// CUDA; an error if the library has no CUDA provider.
    Cuda,
    /// TensorRT (with CUDA for the operators TensorRT cannot take); an error if unavailable.
    TensorRt,
    /// TensorRT, else CUDA, else CPU; the choice is reported.
    #[default]
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "tensorrt" | "trt" => Ok(Device::TensorRt),
            "auto" => Ok(Device::Auto),
            other => Err(format!("unknown device '{other}': expected cpu, cuda, tensorrt or auto")),
        }
    }
}

/// An execution provider a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// CUDA.
    Cuda,
    /// TensorRT, with CUDA behind it.
    #[serde(rename = "tensorrt")]
    TensorRt,
}

impl Provider {
    /// "cpu", "cuda" or "tensorrt", as in every output line.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The provider a session actually runs on, and why (for every output and log line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChosenDevice {
    /// The provider.
    #[serde(rename = "name")]
    pub provider: Provider,
    /// Set when `auto` fell back from a GPU provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

/// The most intra-op threads a session may have: far above any edge CPU's core count, far below
/// a count that makes ONNX Runtime spawn threads until the box stalls (100 000 made no progress
/// in 60 s).
pub const MAX_INTRA_THREADS: usize = 1024;

/// How sessions are created: device, threads and GPU provider options.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The execution provider asked for.
    pub device: Device,
    /// Intra-op threads; `None` lets ONNX Runtime decide (all physical cores).
    pub intra_threads: Option<usize>,
    /// Let the intra-op threads spin for a while after a run, waiting for the next (ONNX
    /// Runtime's default). Off where two sessions take turns on the same cores: the first
    /// session's spinning threads would take the cores the second one needs.
    pub intra_op_spinning: bool,
    /// The GPU for CUDA and TensorRT.
    pub cuda_device_id: i32,
    /// TensorRT: build FP16 engines.
    pub tensorrt_fp16: bool,
    /// TensorRT builder workspace in bytes; `None` keeps ONNX Runtime's default.
    pub tensorrt_workspace: Option<usize>,
    /// Root of the TensorRT engine cache (one subdirectory per model, see
    /// [`Runtime::tensorrt_engine_dir`]); `None` disables it.
    pub tensorrt_engine_cache: Option<PathBuf>,
    /// CPU provider: root of the graph cache, where each model's optimised graph is saved with
    /// its weights already packed for this CPU at the first start and loaded from at later
    /// ones (see [`Runtime::graph_cache_dir`]); `None` disables it.
    pub graph_cache: Option<PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            device: Device::Auto,
            intra_threads: None,
            intra_op_spinning: true,
            cuda_device_id: 0,
            tensorrt_fp16: false,
            tensorrt_workspace: None,
            tensorrt_engine_cache: None,
            graph_cache: None,
        }
    }
}

/// The loaded ONNX Runtime library and its environment.
pub struct Runtime {
    environment: ort::environment::Environment,
    library_path: PathBuf,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("library_path", &self.library_path).finish()
    }
}

static LOADED: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

impl Runtime {
    /// Loads ONNX Runtime from `explicit` (a `--ort-lib` flag) or the default search path (see
    /// [`library_candidates`]), once per process.
    pub fn load(explicit: Option<&Path>) -> Result<Arc<Runtime>, RuntimeError> {
        let library_path = find_library(explicit)?;
        let mut loaded = LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(runtime) = loaded.as_ref() {
            if same_file(&runtime.library_path, &library_path) {
                return Ok(Arc::clone(runtime));
            }
            return Err(RuntimeError::AlreadyLoaded { loaded: runtime.library_path.clone(), requested: library_path });
        }
        let environment = ort::init_from(&library_path)
            .map_err(|error| RuntimeError::LibraryLoad { path: library_path.clone(), message: error.to_string() })?
            .with_name("cac-edge")
            .with_telemetry(false)
            .build()
            .map_err(|error| RuntimeError::LibraryLoad { path: library_path.clone(), message: error.to_string() })?;
        let runtime = Arc::new(Runtime { environment, library_path });
        *loaded = Some(Arc::clone(&runtime));
        Ok(runtime)
    }

    /// The shared library this process loaded.
    pub fn library_path(&self) -> &Path {
        &self.library_path
    }

    /// ONNX Runtime's build string (commit, flags).
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }

    /// The library's own version string (e.g. "1.32.0"), which ort does not expose.
    pub fn version(&self) -> Option<String> {
        // SAFETY: the library is already loaded and initialised by ort (so opening it again only
        // bumps its reference count); OrtGetApiBase and GetVersionString are the C API's stable
        // entry points, take no arguments and return a static NUL-terminated string.
        unsafe {
            let library = libloading::Library::new(&self.library_path).ok()?;
            let get_api_base: libloading::Symbol<'_, unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
                library.get(b"OrtGetApiBase").ok()?;
            let base = get_api_base();
            if base.is_null() {
                return None;
            }
            let version = ((*base).GetVersionString)();
            if version.is_null() {
                return None;
            }
            Some(std::ffi::CStr::from_ptr(version).to_string_lossy().into_owned())
        }
    }

    /// Execution providers compiled into the loaded library, by ONNX Runtime name.
    pub fn available_providers(&self) -> Vec<&'static str> {
        let mut names = vec!["CPUExecutionProvider"];
        if ep::CUDA::is_available().unwrap_or(false) {
            names.push(ep::CUDA::NAME);
        }
        if ep::TensorRT::is_available().unwrap_or(false) {
            names.push(ep::TensorRT::NAME);
        }
        names
    }

    /// Creates a session for `model` on the provider `options` asks for.
    pub fn session(&self, model: &Path, options: &SessionOptions) -> Result<(Session, ChosenDevice), RuntimeError> {
        self.session_of(model, None, options)
    }

    /// [`Runtime::session`] for a model whose sha256 is already known (a bundle's manifest
    /// declares it), so that the TensorRT engine and graph caches can be keyed without reading
    /// the whole file again.
    pub fn session_of(
        &self,
        model: &Path,
        sha256: Option<&str>,
        options: &SessionOptions,
    ) -> Result<(Session, ChosenDevice), RuntimeError> {
        options.validate()?;
        let chosen = self.choose_device(options.device)?;
        let content_hash = || match sha256 {
            Some(hash) => Ok(hash.to_string()),
            None => crate::bundle::sha256_file(model)
                .map_err(|error| RuntimeError::Session { path: model.to_path_buf(), message: error.to_string() }),
        };
        let session = match (&options.graph_cache, chosen.provider) {
            (Some(root), Provider::Cpu) => {
                self.cached_graph_session(model, &self.graph_cache_dir(root, &content_hash()?), options)?
            }
            _ => {
                let engine_cache = match (&options.tensorrt_engine_cache, chosen.provider) {
                    (Some(root), Provider::TensorRt) => Some(self.tensorrt_engine_dir_of(root, &content_hash()?, model)?),
                    _ => None,
                };
                let builder = self.builder(model, options, chosen.provider, engine_cache.as_deref())?;
                commit(builder, model)?
            }
        };
        Ok((session, chosen))
    }

    /// A session builder with the optimisation level, threads and providers of `options`.
    fn builder(
        &self,
        model: &Path,
        options: &SessionOptions,
        provider: Provider,
        engine_cache: Option<&Path>,
    ) -> Result<SessionBuilder, RuntimeError> {
        let session_error = |error: ort::Error| RuntimeError::Session { path: model.to_path_buf(), message: error.to_string() };
        let mut builder = Session::builder(&self.environment)
            .map_err(session_error)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|error| session_error(error.into()))?;
        if let Some(threads) = options.intra_threads {
            builder = builder.with_intra_threads(threads).map_err(|error| session_error(error.into()))?;
        }
        if !options.intra_op_spinning {
            builder = builder.with_intra_op_spinning(false).map_err(|error| session_error(error.into()))?;
        }
        let providers = provider_list(provider, options, engine_cache);
        if !providers.is_empty() {
            builder = builder.with_execution_providers(providers).map_err(|error| session_error(error.into()))?;
        }
        Ok(builder)
    }

    /// The CPU session of `model` through the graph cache `dir`: loaded from the saved graph when
    /// there is one, else created from `model` while ONNX Runtime saves the optimised graph and
    /// its packed weights into a fresh directory that is then renamed into place (so a reader
    /// sees a whole entry or none). A saved graph that no longer loads is replaced; a graph that
    /// cannot be saved (a full or read-only disk) costs a warning, never the session.
    fn cached_graph_session(&self, model: &Path, dir: &Path, options: &SessionOptions) -> Result<Session, RuntimeError> {
        let saved = dir.join(GRAPH_CACHE_MODEL);
        if saved.is_file() {
            match self.builder(&saved, options, Provider::Cpu, None).and_then(|builder| commit(builder, &saved)) {
                Ok(session) => return Ok(session),
                Err(error) => {
                    tracing::warn!("the saved graph {} does not load ({error}); saving it again", saved.display());
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        match self.save_graph(model, dir, options) {
            Ok(session) => Ok(session),
            Err(GraphSaveError::Session(error)) => Err(error),
            Err(GraphSaveError::Save(message)) => {
                tracing::warn!("cannot save the optimised graph of {} into {}: {message}", model.display(), dir.display());
                commit(self.builder(model, options, Provider::Cpu, None)?, model)
            }
        }
    }

    fn save_graph(&self, model: &Path, dir: &Path, options: &SessionOptions) -> Result<Session, GraphSaveError> {
        let parent = dir.parent().unwrap_or(dir);
        let save = |message: String| GraphSaveError::Save(message);
        std::fs::create_dir_all(parent).map_err(|error| save(format!("cannot create {}: {error}", parent.display())))?;
        let staging = parent.join(format!(
            ".{}.tmp-{}",
            dir.file_name().and_then(|name| name.to_str()).unwrap_or("graph"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(|error| save(format!("cannot create {}: {error}", staging.display())))?;
        let config = |builder: SessionBuilder, key: &str, value: &str| {
            builder.with_config_entry(key, value).map_err(|error| save(error.to_string()))
        };
        let mut builder = self.builder(model, options, Provider::Cpu, None).map_err(GraphSaveError::Session)?;
        builder = builder.with_optimized_model_path(staging.join(GRAPH_CACHE_MODEL)).map_err(|error| save(error.to_string()))?;
        builder = config(builder, "session.optimized_model_external_initializers_file_name", GRAPH_CACHE_WEIGHTS)?;
        builder = config(builder, "session.optimized_model_external_initializers_min_size_in_bytes", "1024")?;
        // The weights as the CPU kernels use them (packed for this CPU's GEMM): packing them is
        // most of a large model's session creation, and the saved graph skips it.
        builder = config(builder, "session.save_external_prepacked_constant_initializers", "1")?;
        let session = commit(builder, model).map_err(GraphSaveError::Session)?;
        let finish = || -> std::io::Result<()> {
            for name in [GRAPH_CACHE_MODEL, GRAPH_CACHE_WEIGHTS] {
                let path = staging.join(name);
                if path.exists() {
                    std::fs::File::open(&path)?.sync_all()?;
                }
            }
            std::fs::rename(&staging, dir)
        };
        if let Err(error) = finish() {
            let _ = std::fs::remove_dir_all(&staging);
            // Another process may have saved the same graph first: that one is as good.
            if !dir.join(GRAPH_CACHE_MODEL).is_file() {
                tracing::warn!("cannot save the optimised graph into {}: {error}", dir.display());
            }
        }
        Ok(session)
    }

    /// The graph cache entry of a model: optimised graphs with packed weights are specific to
    /// the model, the ONNX Runtime version and the CPU (its packing depends on the instruction
    /// set), so the directory name carries all three and a changed one is simply a new entry.
    pub fn graph_cache_dir(&self, root: &Path, model_sha256: &str) -> PathBuf {
        let version = self.version().unwrap_or_else(|| "unknown".into());
        let hash = model_sha256.get(..16).unwrap_or(model_sha256);
        root.join(format!("{hash}-ort{version}-{}-{}", std::env::consts::ARCH, cpu_identity()))
    }

    /// TensorRT engines are specific to the model, the GPU, TensorRT and ONNX Runtime: each model
    /// gets its own directory under `root`, named by the model file's content hash and the ONNX
    /// Runtime version, so a reboot (or another bundle) never picks up a wrong engine and an
    /// unchanged model never rebuilds one. TensorRT itself keys engines on the GPU inside it.
    pub fn tensorrt_engine_dir(&self, root: &Path, model: &Path) -> Result<PathBuf, RuntimeError> {
        let hash = crate::bundle::sha256_file(model)
            .map_err(|error| RuntimeError::Session { path: model.to_path_buf(), message: error.to_string() })?;
        self.tensorrt_engine_dir_of(root, &hash, model)
    }

    fn tensorrt_engine_dir_of(&self, root: &Path, hash: &str, model: &Path) -> Result<PathBuf, RuntimeError> {
        let session_error = |message: String| RuntimeError::Session { path: model.to_path_buf(), message };
        let hash = hash.get(..16).unwrap_or(hash);
        let version = self.version().unwrap_or_else(|| "unknown".into());
        let dir = root.join(format!("{hash}-ort{version}"));
        std::fs::create_dir_all(&dir)
            .map_err(|error| session_error(format!("cannot create the TensorRT engine cache {}: {error}", dir.display())))?;
        Ok(dir)
    }

    /// Which provider a session would run on for `device`, or why it cannot.
    pub fn choose_device(&self, device: Device) -> Result<ChosenDevice, RuntimeError> {
        let cuda = ep::CUDA::is_available().unwrap_or(false);
        let tensorrt = ep::TensorRT::is_available().unwrap_or(false);
        let unavailable = |provider| RuntimeError::ProviderUnavailable {
            provider,
            library: self.library_path.clone(),
            available: self.available_providers().join(", "),
        };
        let chosen = |provider| Ok(ChosenDevice { provider, fallback_reason: None });
        match device {
            Device::Cpu => chosen(Provider::Cpu),
            Device::Cuda if cuda => chosen(Provider::Cuda),
            Device::Cuda => Err(unavailable(ep::CUDA::NAME)),
            Device::TensorRt if tensorrt => chosen(Provider::TensorRt),
            Device::TensorRt => Err(unavailable(ep::TensorRT::NAME)),
            Device::Auto if tensorrt => chosen(Provider::TensorRt),
            Device::Auto if cuda => chosen(Provider::Cuda),
            Device::Auto => Ok(ChosenDevice {
                provider: Provider::Cpu,
                fallback_reason: Some(format!(
                    "auto: no TensorRT or CUDA execution provider in {}; running on CPU",
                    self.library_path.display()
                )),
            }),
        }
    }
}

impl SessionOptions {
    /// Refuses GPU options that the chosen device would silently ignore, and thread counts that
    /// would stall the box (more intra-op threads than [`MAX_INTRA_THREADS`]).
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let refuse = |message: &str| Err(RuntimeError::Options(message.to_string()));
        let tensorrt_options = self.tensorrt_fp16 || self.tensorrt_workspace.is_some() || self.tensorrt_engine_cache.is_some();
        if tensorrt_options && matches!(self.device, Device::Cpu | Device::Cuda) {
            return refuse("TensorRT options (FP16, workspace, engine cache) need the tensorrt or auto device");
        }
        if self.cuda_device_id != 0 && self.device == Device::Cpu {
            return refuse("a GPU id needs the cuda, tensorrt or auto device");
        }
        if self.cuda_device_id < 0 || self.tensorrt_workspace == Some(0) {
            return refuse("the GPU id must be >= 0 and the TensorRT workspace at least 1 byte");
        }
        match self.intra_threads {
            Some(threads) if threads == 0 || threads > MAX_INTRA_THREADS => {
                Err(RuntimeError::Options(format!("intra-op threads must be between 1 and {MAX_INTRA_THREADS}, got {threads}")))
            }
            _ => Ok(()),
        }
    }
}

/// The saved graph's file name inside a graph cache entry.
pub const GRAPH_CACHE_MODEL: &str = "model.onnx";
/// The saved graph's weights (original and packed) beside it.
pub const GRAPH_CACHE_WEIGHTS: &str = "model.onnx.data";

enum GraphSaveError {
    /// The session itself could not be created: the same error as without the cache.
    Session(RuntimeError),
    /// Only saving failed.
    Save(String),
}

fn commit(mut builder: SessionBuilder, model: &Path) -> Result<Session, RuntimeError> {
    builder
        .commit_from_file(model)
        .map_err(|error| RuntimeError::Session { path: model.to_path_buf(), message: error.to_string() })
}

/// A short digest of what the CPU can do (model name and feature flags), which decides how
/// ONNX Runtime packs weights; "unknown" where /proc/cpuinfo cannot be read.
fn cpu_identity() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return "unknown".into() };
    let mut identity = String::new();
    for line in info.lines() {
        let key = line.split(':').next().unwrap_or_default().trim();
        if matches!(key, "model name" | "flags" | "Features" | "CPU implementer" | "CPU part" | "vendor_id") {
            identity.push_str(line.trim());
            identity.push('\n');
        }
        if line.trim().is_empty() && !identity.is_empty() {
            break; // the first processor's block is enough
        }
    }
    use sha2::Digest;
    crate::bundle::hex(&sha2::Sha256::digest(identity.as_bytes())[..4])
}

/// GPU providers are registered with `error_on_failure`, because ONNX Runtime otherwise falls
/// back to CPU silently and the reported device would be a lie. TensorRT is followed by CUDA so
/// that operators TensorRT cannot take still run on the GPU.
fn provider_list(
    provider: Provider,
    options: &SessionOptions,
    engine_cache: Option<&Path>,
) -> Vec<ep::ExecutionProviderDispatch> {
    let cuda = || ep::CUDA::default().with_device_id(options.cuda_device_id).build().error_on_failure();
    match provider {
        Provider::Cuda => vec![cuda()],
        Provider::TensorRt => {
            let mut tensorrt = ep::TensorRT::default().with_device_id(options.cuda_device_id).with_fp16(options.tensorrt_fp16);
            if let Some(bytes) = options.tensorrt_workspace {
                tensorrt = tensorrt.with_max_workspace_size(bytes);
            }
            if let Some(dir) = engine_cache {
                let dir = dir.display().to_string();
                tensorrt = tensorrt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            }
            vec![tensorrt.build().error_on_failure(), cuda()]
        }
        Provider::Cpu => Vec::new(),
    }
}

/// Where cac-edge looks for the library when neither `--ort-lib` nor `ORT_DYLIB_PATH` names it
/// (either of those is used exclusively), in order:
/// 1. `libonnxruntime.so` beside the executable (a copied-together binary and library);
/// 2. `../lib/cac-edge/` from the executable's directory: the private copy the Debian package
///    installs (/usr/bin/cac-edge finds /usr/lib/cac-edge/libonnxruntime.so). It comes before
///    `../lib` so that the library the package was built and tested with wins over an unrelated
///    (possibly older than 1.17) one in /usr/lib; a GPU build is chosen with `ORT_DYLIB_PATH`;
/// 3. `../lib/` from the executable's directory (a prefix install: /opt/cac-edge/{bin,lib});
/// 4. the per-user default where `scripts/setup-onnxruntime` installs it:
///    `$XDG_DATA_HOME/cac-edge/onnxruntime/<arch>/` (`~/.local/share/...` when unset).
pub fn library_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        candidates.push(exe_dir.join(LIBRARY_FILE));
        // The parent taken lexically, so that doctor and errors show /usr/lib/cac-edge/…, not
        // /usr/bin/../lib/…; on Linux current_exe is already free of symlinks (/proc/self/exe).
        let prefix = exe_dir.parent().map_or_else(|| exe_dir.join(".."), Path::to_path_buf);
        candidates.push(prefix.join("lib/cac-edge").join(LIBRARY_FILE));
        candidates.push(prefix.join("lib").join(LIBRARY_FILE));
    }
    if let Some(data_dir) = user_data_dir() {
        candidates.push(data_dir.join("cac-edge/onnxruntime").join(std::env::consts::ARCH).join(LIBRARY_FILE));
    }
    candidates
}

fn user_data_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|value| !value.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share"))
}

fn find_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let from_env = std::env::var_os(ORT_DYLIB_ENV).filter(|value| !value.is_empty()).map(PathBuf::from);
    if let Some(path) = explicit.map(Path::to_path_buf).or(from_env) {
        // A flag or ORT_DYLIB_PATH is used as given, so a wrong one is reported, not silently
        // replaced by another library found elsewhere.
        // A relative path is tried beside the executable first, as ort itself does.
        let beside_exe = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join(&path)));
        if let Some(found) = beside_exe.filter(|candidate| path.is_relative() && candidate.is_file()) {
            return Ok(found);
        }
        if path.is_file() {
            return Ok(path);
        }
        return Err(RuntimeError::LibraryNotFound { searched: path.display().to_string() });
    }
    let candidates = library_candidates();
    if let Some(found) = candidates.iter().find(|candidate| candidate.is_file()) {
        return Ok(found.clone());
    }
    let searched = candidates.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(RuntimeError::LibraryNotFound { searched })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("CPU".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("trt".parse::<Device>(), Ok(Device::TensorRt));
        assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
        assert!("gpu".parse::<Device>().unwrap_err().contains("expected cpu, cuda, tensorrt or auto"));
    }

    #[test]
    fn gpu_options_that_would_be_ignored_are_refused() {
        let cpu = SessionOptions { device: Device::Cpu, ..SessionOptions::default() };
        assert!(cpu.validate().is_ok());
        assert!(SessionOptions { tensorrt_fp16: true, ..cpu.clone() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tensorrt or auto device"));
        assert!(SessionOptions { intra_threads: Some(100_000), ..cpu.clone() }.validate().is_err());
        assert!(SessionOptions { intra_threads: Some(0), ..cpu.clone() }.validate().is_err());
        assert!(SessionOptions { intra_threads: Some(4), ..cpu.clone() }.validate().is_ok());
        assert!(SessionOptions { cuda_device_id: 1, ..cpu.clone() }.validate().is_err());
        let cuda = SessionOptions { device: Device::Cuda, cuda_device_id: 1, ..SessionOptions::default() };
        assert!(cuda.validate().is_ok());
        assert!(SessionOptions { tensorrt_workspace: Some(1 << 30), ..cuda }.validate().is_err());
        assert!(SessionOptions { tensorrt_fp16: true, tensorrt_workspace: Some(1 << 30), ..SessionOptions::default() }
            .validate()
            .is_ok());
    }

    #[test]
    fn the_packaged_private_library_is_searched_after_the_executable_directory_and_before_lib() {
        let exe_dir = std::env::current_exe().expect("the test binary").parent().expect("a directory").to_path_buf();
        let prefix = exe_dir.parent().expect("the test binary is not in /");
        let candidates = library_candidates();
        let position = |path: PathBuf| candidates.iter().position(|candidate| *candidate == path);
        let beside = position(exe_dir.join(LIBRARY_FILE)).expect("beside the executable");
        // /usr/bin/cac-edge → /usr/lib/cac-edge/libonnxruntime.so (written without `..`).
        let private = position(prefix.join("lib/cac-edge").join(LIBRARY_FILE)).expect("the package's private directory");
        let lib = position(prefix.join("lib").join(LIBRARY_FILE)).expect("../lib");
        assert!(beside < private && private < lib, "{candidates:?}");
        // The per-user default (when HOME or XDG_DATA_HOME is set) comes last.
        if let Some(user) = user_data_dir() {
            assert_eq!(
                candidates.last(),
                Some(&user.join("cac-edge/onnxruntime").join(std::env::consts::ARCH).join(LIBRARY_FILE))
            );
        }
    }

    #[test]
    fn explicit_missing_library_is_an_error_not_a_panic() {
        let error = find_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/nonexistent/libonnxruntime.so"), "{message}");
        assert!(message.contains("1.17 or newer"), "{message}");
    }
}
