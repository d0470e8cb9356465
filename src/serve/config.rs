//! serve.toml: the service's configuration (format in docs/FORMATS.md §7).
//!
//! Every error names the file, the line and the key, so that a box's installer can fix it from
//! the journal alone. Relative paths are relative to the config file's folder. `${NAME}` in a
//! camera's `source` is replaced by the environment variable NAME, so that passwords live in the
//! unit's `Environment=`/`EnvironmentFile=` rather than in a world-readable file.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::sources::{RtspDecoder, SourceOptions, SourceSpec};
use crate::calibrate::{CalibrationMethod, CalibrationSettings, ContrastDistance};
use crate::drift::DriftSettings;
use crate::preprocess::DecodeMode;
use crate::runtime::{Device, SessionOptions, MAX_INTRA_THREADS};
use crate::{ClassifierOptions, DecodeLimits};

/// Where the service looks for its configuration when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cac-edge/serve.toml";

/// A configuration that cannot be used: where, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    /// The key (`camera[2].fps`), when known.
    pub key: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The bundle, the cache and how they classify.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Text-feature cache.
    pub cache: PathBuf,
    /// Everything the classifier is opened with.
    pub options: ClassifierOptions,
}

/// Where decisions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonLinesTarget {
    /// Standard output.
    Stdout,
    /// A file, appended to, reopened on SIGHUP (for logrotate).
    File(PathBuf),
    /// Nowhere (the HTTP API and other sinks only).
    Off,
}

/// The `[service]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Address of the HTTP API; `None`: no HTTP API.
    pub http: Option<SocketAddr>,
    /// Where the JSON lines go.
    pub json_lines: JsonLinesTarget,
    /// The ONNX Runtime library, when not found by default (read at start only).
    pub onnxruntime: Option<PathBuf>,
}

/// The `[review]` table: frames that abstain, kept for a person to label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewConfig {
    /// The folder of the ring.
    pub folder: PathBuf,
    /// The ring's size cap; the oldest frames are deleted beyond it.
    pub max_bytes: u64,
}

/// The `[mqtt]` table (docs/FORMATS.md §7).
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// The broker's host name or address.
    pub host: String,
    /// Its port (1883 for `mqtt://`, 8883 for `mqtts://` unless given).
    pub port: u16,
    /// TLS (`mqtts://`).
    pub tls: bool,
    /// A PEM file of the certificate authorities to trust; `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// The client id the broker knows the box by.
    pub client_id: String,
    /// The topic prefix.
    pub prefix: String,
    /// The on-disk queue's folder.
    pub queue_dir: PathBuf,
    /// Its size bound.
    pub queue_max_bytes: u64,
    /// MQTT keep-alive: a silent broker is noticed within about 1.5 × this.
    pub keep_alive: Duration,
    /// Home Assistant MQTT discovery: its topic prefix (usually `homeassistant`), when on.
    pub home_assistant: Option<String>,
}

impl MqttConfig {
    /// The broker as `mqtt[s]://host:port` (no credentials), for logs.
    pub fn broker(&self) -> String {
        format!("{}://{}:{}", if self.tls { "mqtts" } else { "mqtt" }, self.host, self.port)
    }

    /// The topic of `<prefix>/available`.
    pub fn availability_topic(&self) -> String {
        format!("{}/available", self.prefix)
    }
}

/// One camera, with the defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// Its unique name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Where its frames come from.
    pub source: SourceSpec,
    /// Off: configured but not read.
    pub enabled: bool,
    /// Frames classified per second at most.
    pub fps: f64,
    /// A frame that waited longer than this is dropped as stale.
    pub max_frame_age: Duration,
    /// No frame for this long: the source is restarted; `None`: never.
    pub stall_after: Option<Duration>,
    /// Identical accepted labels in a row before the published state changes.
    pub debounce: u32,
    /// The RTSP decoder program.
    pub rtsp_decoder: RtspDecoder,
}

impl CameraConfig {
    /// What the camera's source is started with.
    pub fn source_options(&self, max_frame_bytes: usize) -> SourceOptions {
        SourceOptions {
            max_frame_bytes,
            fps: self.fps,
            io_timeout: self.stall_after.unwrap_or(Duration::from_secs(10)).min(Duration::from_secs(10)),
            rtsp_decoder: self.rtsp_decoder,
        }
    }

    /// Whether a change from `self` to `other` needs the source restarted.
    pub fn source_differs(&self, other: &CameraConfig) -> bool {
        self.source != other.source
            || self.rtsp_decoder != other.rtsp_decoder
            || self.fps != other.fps
            || self.enabled != other.enabled
    }
}

/// A whole, valid configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[service]`.
    pub service: ServiceConfig,
    /// `[review]`, when a folder is set.
    pub review: Option<ReviewConfig>,
    /// `[mqtt]`, when a broker is set.
    pub mqtt: Option<MqttConfig>,
    /// `[drift]`: the shift alarm's window and thresholds.
    pub drift: DriftSettings,
    /// Frames larger than this are refused by every source.
    pub max_frame_bytes: usize,
    /// `[[camera]]`, in file order.
    pub cameras: Vec<CameraConfig>,
}

// The file as written. Values that are checked keep their spans, so that errors name the line.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: Option<Spanned<RawModel>>,
    #[serde(default)]
    service: RawService,
    #[serde(default)]
    review: RawReview,
    mqtt: Option<Spanned<RawMqtt>>,
    drift: Option<Spanned<RawDrift>>,
    #[serde(default)]
    defaults: RawCamera,
    #[serde(default)]
    camera: Vec<Spanned<RawCamera>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    bundle: Option<Spanned<String>>,
    cache: Option<Spanned<String>>,
    verify: Option<bool>,
    device: Option<Spanned<String>>,
    threads: Option<Spanned<i64>>,
    gpu: Option<Spanned<i64>>,
    tensorrt_fp16: Option<bool>,
    tensorrt_cache: Option<Spanned<String>>,
    graph_cache: Option<Spanned<String>>,
    precision: Option<Spanned<String>>,
    encoder_schedule: Option<Spanned<String>>,
    strict: Option<bool>,
    threshold: Option<Spanned<f64>>,
    calibration: Option<Spanned<String>>,
    cac_alpha: Option<Spanned<f64>>,
    cac_k: Option<Spanned<f64>>,
    cac_distance: Option<Spanned<String>>,
    cac_lambda1: Option<Spanned<f64>>,
    cac_lambda2: Option<Spanned<f64>>,
    temperature: Option<Spanned<f64>>,
    top_k: Option<Spanned<i64>>,
    batch_size: Option<Spanned<i64>>,
    max_image_side: Option<Spanned<i64>>,
    decode: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    http: Option<Spanned<String>>,
    json_lines: Option<Spanned<String>>,
    onnxruntime: Option<Spanned<String>>,
    max_frame_megabytes: Option<Spanned<f64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReview {
    folder: Option<Spanned<String>>,
    max_megabytes: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrift {
    window: Option<i64>,
    raise: Option<f64>,
    clear: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    queue: Option<Spanned<String>>,
    queue_max_megabytes: Option<Spanned<f64>>,
    keep_alive: Option<Spanned<f64>>,
    home_assistant: Option<bool>,
    discovery_prefix: Option<Spanned<String>>,
}

/// A `[[camera]]` table, and `[defaults]` (the same settings, without name and source).
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawCamera {
    name: Option<Spanned<String>>,
    source: Option<Spanned<String>>,
    enabled: Option<bool>,
    fps: Option<Spanned<f64>>,
    max_frame_age: Option<Spanned<f64>>,
    stall_after: Option<Spanned<f64>>,
    debounce: Option<Spanned<i64>>,
    rtsp_decoder: Option<Spanned<String>>,
}

/// Reads and checks the config at `path`.
pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: match error.kind() {
            std::io::ErrorKind::NotFound => {
                "no such file; write one (see docs/FORMATS.md §7, or the example the .deb installs) or pass --config".to_string()
            }
            _ => format!("cannot read it: {error}"),
        },
    })?;
    parse(&text, path, &|name| std::env::var(name).ok())
}

/// Parses `text` as if read from `path`; `env` looks up `${NAME}` in sources.
pub fn parse(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<ServeConfig, ConfigError> {
    let checker = Checker { text, file: path };
    let raw: RawConfig = toml::from_str(text).map_err(|error| {
        let line = error.span().map(|span| checker.line_of(span.start));
        ConfigError { file: path.to_path_buf(), line, key: None, message: error.message().trim().to_string() }
    })?;
    let base = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let model = checker.model(raw.model, base)?;
    let service = checker.service(&raw.service, base)?;
    let review = checker.review(&raw.review, base)?;
    let mqtt = match &raw.mqtt {
        Some(mqtt) => Some(checker.mqtt(mqtt, base, env)?),
        None => None,
    };
    let drift = match &raw.drift {
        Some(drift) => checker.drift(drift)?,
        None => DriftSettings::default(),
    };
    let max_frame_bytes = match &raw.service.max_frame_megabytes {
        Some(megabytes) => checker.megabytes(megabytes, "service.max_frame_megabytes")? as usize,
        None => SourceOptions::default().max_frame_bytes,
    };
    let cameras = checker.cameras(&raw.camera, &raw.defaults, base, env)?;
    Ok(ServeConfig { path: path.to_path_buf(), model, service, review, mqtt, drift, max_frame_bytes, cameras })
}

struct Checker<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Checker<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset].iter().filter(|&&byte| byte == b'\n').count() + 1
    }

    fn error(&self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: span.map(|span| self.line_of(span.start)),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }

    fn model(&self, raw: Option<Spanned<RawModel>>, base: &Path) -> Result<ModelConfig, ConfigError> {
        let Some(raw) = raw else {
            return Err(self.error(None, "model", "missing: the [model] table names the bundle and its cache"));
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let bundle =
            raw.bundle.as_ref().ok_or_else(|| self.error(Some(span.clone()), "model.bundle", "missing: the bundle directory"))?;
        let cache = raw.cache.as_ref().ok_or_else(|| {
            self.error(Some(span), "model.cache", "missing: the text-feature cache (`cac-edge cache build` writes it)")
        })?;
        let verify = raw.verify.unwrap_or(true);
        let mut options = ClassifierOptions {
            verify_bundle_files: verify,
            cache: crate::cache::CacheOpenOptions { verify_checksum: verify },
            session: self.session(&raw)?,
            calibration: self.calibration(&raw)?,
            ..ClassifierOptions::default()
        };
        if let Some(threshold) = &raw.threshold {
            crate::decide::validate_threshold(*threshold.get_ref())
                .map_err(|why| self.error(Some(threshold.span()), "model.threshold", why))?;
            options.threshold = Some(*threshold.get_ref());
        }
        options.strict = raw.strict.unwrap_or(false);
        if let Some(precision) = &raw.precision {
            options.precision =
                precision.get_ref().parse().map_err(|why: String| self.error(Some(precision.span()), "model.precision", why))?;
        }
        if let Some(schedule) = &raw.encoder_schedule {
            options.encoder_schedule = schedule
                .get_ref()
                .parse()
                .map_err(|why: String| self.error(Some(schedule.span()), "model.encoder_schedule", why))?;
        }
        if let Some(top_k) = &raw.top_k {
            options.top_k = self.integer(top_k, "model.top_k", 1, 1000)? as usize;
        }
        options.batch_size = match &raw.batch_size {
            Some(batch) => self.integer(batch, "model.batch_size", 1, 256)? as usize,
            // Enough for a handful of cameras due at once; larger batches only add latency.
            None => 4,
        };
        if let Some(side) = &raw.max_image_side {
            let side = self.integer(side, "model.max_image_side", 1, i64::from(u32::MAX))? as u32;
            options.decode_limits = DecodeLimits { max_width: side, max_height: side, ..DecodeLimits::default() };
        }
        // Frames are large and arrive continuously here: the reduced-scale JPEG decode unless
        // the file asks for open_clip's exact pixels.
        options.decode = match &raw.decode {
            Some(mode) => {
                mode.get_ref().parse::<DecodeMode>().map_err(|why| self.error(Some(mode.span()), "model.decode", why))?
            }
            None => DecodeMode::Scaled,
        };
        Ok(ModelConfig { bundle: resolve(base, bundle.get_ref()), cache: resolve(base, cache.get_ref()), options })
    }

    fn session(&self, raw: &RawModel) -> Result<SessionOptions, ConfigError> {
        let mut session = SessionOptions::default();
        if let Some(device) = &raw.device {
            session.device = device
                .get_ref()
                .parse::<Device>()
                .map_err(|why| self.error(Some(device.span()), "model.device", why.to_string()))?;
        }
        if let Some(threads) = &raw.threads {
            session.intra_threads = Some(self.integer(threads, "model.threads", 1, MAX_INTRA_THREADS as i64)? as usize);
        }
        if let Some(gpu) = &raw.gpu {
            session.cuda_device_id = self.integer(gpu, "model.gpu", 0, i64::from(i32::MAX))? as i32;
        }
        session.tensorrt_fp16 = raw.tensorrt_fp16.unwrap_or(false);
        session.tensorrt_engine_cache = raw.tensorrt_cache.as_ref().map(|dir| PathBuf::from(dir.get_ref()));
        session.graph_cache = raw.graph_cache.as_ref().map(|dir| PathBuf::from(dir.get_ref()));
        Ok(session)
    }

    fn calibration(&self, raw: &RawModel) -> Result<CalibrationSettings, ConfigError> {
        let method = match &raw.calibration {
            Some(method) => Some(
                method
                    .get_ref()
                    .parse::<CalibrationMethod>()
                    .map_err(|why| self.error(Some(method.span()), "model.calibration", why.to_string()))?,
            ),
            None => None,
        };
        let distance = match &raw.cac_distance {
            Some(distance) => Some(
                distance
                    .get_ref()
                    .parse::<ContrastDistance>()
                    .map_err(|why| self.error(Some(distance.span()), "model.cac_distance", why.to_string()))?,
            ),
            None => None,
        };
        let finite = |value: &Option<Spanned<f64>>, key: &str| -> Result<Option<f64>, ConfigError> {
            match value {
                Some(value) if !value.get_ref().is_finite() => {
                    Err(self.error(Some(value.span()), key, "must be a finite number"))
                }
                Some(value) => Ok(Some(*value.get_ref())),
                None => Ok(None),
            }
        };
        if raw.cac_lambda1.is_some() != raw.cac_lambda2.is_some() {
            let span = raw.cac_lambda1.as_ref().or(raw.cac_lambda2.as_ref()).map(Spanned::span);
            return Err(self.error(span, "model.cac_lambda1", "cac_lambda1 and cac_lambda2 go together: set both or neither"));
        }
        Ok(CalibrationSettings {
            method,
            alpha: finite(&raw.cac_alpha, "model.cac_alpha")?,
            k: finite(&raw.cac_k, "model.cac_k")?,
            distance,
            lambda1: finite(&raw.cac_lambda1, "model.cac_lambda1")?,
            lambda2: finite(&raw.cac_lambda2, "model.cac_lambda2")?,
            temperature: finite(&raw.temperature, "model.temperature")?,
        })
    }

    fn service(&self, raw: &RawService, base: &Path) -> Result<ServiceConfig, ConfigError> {
        let http = match &raw.http {
            None => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT))),
            Some(address) if address.get_ref().trim().is_empty() => None,
            Some(address) => Some(address.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
                self.error(
                    Some(address.span()),
                    "service.http",
                    format!("`{}` is not an address:port (e.g. 127.0.0.1:8089, or \"\" for no HTTP API)", address.get_ref()),
                )
            })?),
        };
        let json_lines = match raw.json_lines.as_ref().map(|target| target.get_ref().trim()) {
            None | Some("-") => JsonLinesTarget::Stdout,
            Some("") => JsonLinesTarget::Off,
            Some(file) => JsonLinesTarget::File(resolve(base, file)),
        };
        let onnxruntime = raw.onnxruntime.as_ref().map(|path| resolve(base, path.get_ref()));
        Ok(ServiceConfig { http, json_lines, onnxruntime })
    }

    fn review(&self, raw: &RawReview, base: &Path) -> Result<Option<ReviewConfig>, ConfigError> {
        let Some(folder) = &raw.folder else {
            if let Some(size) = &raw.max_megabytes {
                return Err(self.error(Some(size.span()), "review.max_megabytes", "set review.folder too, or remove this"));
            }
            return Ok(None);
        };
        let max_bytes = match &raw.max_megabytes {
            Some(size) => self.megabytes(size, "review.max_megabytes")?,
            None => 256 << 20,
        };
        Ok(Some(ReviewConfig { folder: resolve(base, folder.get_ref()), max_bytes }))
    }

    fn drift(&self, raw: &Spanned<RawDrift>) -> Result<DriftSettings, ConfigError> {
        let table = raw.get_ref();
        let defaults = DriftSettings::default();
        let window = match table.window {
            Some(window) => usize::try_from(window).unwrap_or(0),
            None => defaults.window,
        };
        let settings =
            DriftSettings { window, raise: table.raise.unwrap_or(defaults.raise), clear: table.clear.unwrap_or(defaults.clear) };
        settings.validate().map_err(|message| self.error(Some(raw.span()), "drift", message))?;
        Ok(settings)
    }

    fn mqtt(&self, raw: &Spanned<RawMqtt>, base: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<MqttConfig, ConfigError> {
        if !cfg!(feature = "mqtt") {
            return Err(self.error(
                Some(raw.span()),
                "mqtt",
                "this build of cac-edge has no MQTT (cargo feature `mqtt`); remove [mqtt] or install a build with it",
            ));
        }
        let table = raw.get_ref();
        let expanded = |value: &Spanned<String>, key: &str| {
            expand_env(value.get_ref(), env).map_err(|message| self.error(Some(value.span()), key, message))
        };
        let Some(url) = &table.url else {
            return Err(self.error(
                Some(raw.span()),
                "mqtt.url",
                "missing: the broker, e.g. mqtt://127.0.0.1:1883 or mqtts://broker.example:8883",
            ));
        };
        let (tls, host, port) =
            parse_broker_url(&expanded(url, "mqtt.url")?).map_err(|message| self.error(Some(url.span()), "mqtt.url", message))?;
        let credentials = match (&table.username, &table.password) {
            (Some(user), Some(password)) => Some((expanded(user, "mqtt.username")?, expanded(password, "mqtt.password")?)),
            (None, None) => None,
            (Some(user), None) => {
                return Err(self.error(
                    Some(user.span()),
                    "mqtt.username",
                    "set mqtt.password too (e.g. password = \"${MQTT_PASSWORD}\")",
                ))
            }
            (None, Some(password)) => return Err(self.error(Some(password.span()), "mqtt.password", "set mqtt.username too")),
        };
        let host_name = host_name();
        let client_id = match &table.client_id {
            Some(id) if id.get_ref().trim().is_empty() || id.get_ref().len() > 128 => {
                return Err(self.error(Some(id.span()), "mqtt.client_id", "use 1 to 128 characters"))
            }
            Some(id) => id.get_ref().trim().to_string(),
            None => format!("cac-edge-{host_name}"),
        };
        let prefix = match &table.prefix {
            Some(prefix) => {
                let text = prefix.get_ref().trim().trim_end_matches('/');
                if text.is_empty() || text.contains(['+', '#', '\0']) || text.starts_with('$') {
                    return Err(self.error(
                        Some(prefix.span()),
                        "mqtt.prefix",
                        "a topic prefix without +, # or a leading $, e.g. \"site/box1\"",
                    ));
                }
                text.to_string()
            }
            None => format!("cac-edge/{host_name}"),
        };
        let queue_dir = match &table.queue {
            Some(folder) => resolve(base, folder.get_ref()),
            // systemd's StateDirectory= (the unit sets /var/lib/cac-edge).
            None => env("STATE_DIRECTORY")
                .and_then(|dirs| dirs.split(':').next().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/var/lib/cac-edge"))
                .join("mqtt-queue"),
        };
        let queue_max_bytes = match &table.queue_max_megabytes {
            Some(size) => self.megabytes(size, "mqtt.queue_max_megabytes")?,
            None => 64 << 20,
        };
        let keep_alive = match &table.keep_alive {
            Some(seconds) if !(5.0..=3600.0).contains(seconds.get_ref()) => {
                return Err(self.error(
                    Some(seconds.span()),
                    "mqtt.keep_alive",
                    format!("{}: use 5 to 3600 seconds", seconds.get_ref()),
                ))
            }
            Some(seconds) => Duration::from_secs_f64(*seconds.get_ref()),
            None => Duration::from_secs(15),
        };
        let home_assistant = match (table.home_assistant.unwrap_or(false), &table.discovery_prefix) {
            (true, Some(prefix)) => Some(prefix.get_ref().trim().trim_end_matches('/').to_string()),
            (true, None) => Some("homeassistant".to_string()),
            (false, _) => None,
        };
        let ca_file = table.ca_file.as_ref().map(|path| resolve(base, path.get_ref()));
        Ok(MqttConfig {
            host,
            port,
            tls,
            ca_file,
            credentials,
            client_id,
            prefix,
            queue_dir,
            queue_max_bytes,
            keep_alive,
            home_assistant,
        })
    }

    fn cameras(
        &self,
        raw: &[Spanned<RawCamera>],
        defaults: &RawCamera,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<CameraConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.error(None, "camera", "no [[camera]] configured; add one with a name and a source"));
        }
        for (key, value) in [("defaults.name", &defaults.name), ("defaults.source", &defaults.source)] {
            if let Some(value) = value {
                return Err(self.error(Some(value.span()), key, "belongs in a [[camera]] table, not in [defaults]"));
            }
        }
        let mut cameras: Vec<CameraConfig> = Vec::with_capacity(raw.len());
        for (index, camera) in raw.iter().enumerate() {
            let key = |field: &str| format!("camera[{index}].{field}");
            let span = camera.span();
            let camera = camera.get_ref();
            let name = camera
                .name
                .as_ref()
                .ok_or_else(|| self.error(Some(span.clone()), &key("name"), "missing: each camera needs a name"))?;
            if !valid_camera_name(name.get_ref()) {
                return Err(self.error(
                    Some(name.span()),
                    &key("name"),
                    format!("`{}`: use 1 to 64 letters, digits, `-`, `_` or `.`", name.get_ref()),
                ));
            }
            if cameras.iter().any(|other| other.name == *name.get_ref()) {
                return Err(self.error(
                    Some(name.span()),
                    &key("name"),
                    format!("`{}` is used by an earlier camera; names must be unique", name.get_ref()),
                ));
            }
            let source = camera.source.as_ref().ok_or_else(|| {
                self.error(Some(span.clone()), &key("source"), "missing: e.g. folder:/var/spool/cam1 or rtsp://host/stream")
            })?;
            let expanded =
                expand_env(source.get_ref(), env).map_err(|why| self.error(Some(source.span()), &key("source"), why))?;
            let mut spec = SourceSpec::parse(&expanded).map_err(|why| self.error(Some(source.span()), &key("source"), why))?;
            if let SourceSpec::Folder(folder) = &spec {
                spec = SourceSpec::Folder(resolve(base, &folder.to_string_lossy()));
            }
            let settings = merged(camera, defaults);
            cameras.push(self.camera_settings(name.get_ref().clone(), spec, &settings, &key)?);
        }
        let stdin_cameras = cameras.iter().filter(|camera| camera.source == SourceSpec::Stdin).count();
        if stdin_cameras > 1 {
            return Err(self.error(None, "camera", "more than one camera reads stdin:; only one can"));
        }
        Ok(cameras)
    }

    fn camera_settings(
        &self,
        name: String,
        source: SourceSpec,
        raw: &RawCamera,
        key: &dyn Fn(&str) -> String,
    ) -> Result<CameraConfig, ConfigError> {
        let seconds = |value: &Option<Spanned<f64>>, field: &str, default: f64, zero_allowed: bool| -> Result<f64, ConfigError> {
            let Some(value) = value else { return Ok(default) };
            let seconds = *value.get_ref();
            let lowest_ok = if zero_allowed { seconds >= 0.0 } else { seconds > 0.0 };
            if !seconds.is_finite() || !lowest_ok || seconds > 86_400.0 {
                let what = if zero_allowed { "0 (off) or more" } else { "more than 0" };
                return Err(self.error(Some(value.span()), &key(field), format!("{seconds} s: use {what}, at most 86400")));
            }
            Ok(seconds)
        };
        let fps = seconds(&raw.fps, "fps", DEFAULT_FPS, false)?;
        if fps > 1000.0 {
            return Err(self.error(raw.fps.as_ref().map(Spanned::span), &key("fps"), "at most 1000"));
        }
        let max_frame_age = seconds(&raw.max_frame_age, "max_frame_age", DEFAULT_MAX_FRAME_AGE, false)?;
        let stall_default = if source.keeps_backlog() { 0.0 } else { DEFAULT_STALL_AFTER };
        let stall_after = seconds(&raw.stall_after, "stall_after", stall_default, true)?;
        let debounce = match &raw.debounce {
            Some(debounce) => self.integer(debounce, &key("debounce"), 1, 1000)? as u32,
            None => DEFAULT_DEBOUNCE,
        };
        let rtsp_decoder = match &raw.rtsp_decoder {
            Some(decoder) => match decoder.get_ref().as_str() {
                "ffmpeg" => RtspDecoder::Ffmpeg,
                "gstreamer" => RtspDecoder::Gstreamer,
                other => {
                    return Err(self.error(
                        Some(decoder.span()),
                        &key("rtsp_decoder"),
                        format!("`{other}`: use ffmpeg or gstreamer"),
                    ))
                }
            },
            None => RtspDecoder::default(),
        };
        Ok(CameraConfig {
            name,
            source,
            enabled: raw.enabled.unwrap_or(true),
            fps,
            max_frame_age: Duration::from_secs_f64(max_frame_age),
            stall_after: (stall_after > 0.0).then(|| Duration::from_secs_f64(stall_after)),
            debounce,
            rtsp_decoder,
        })
    }

    fn integer(&self, value: &Spanned<i64>, key: &str, low: i64, high: i64) -> Result<i64, ConfigError> {
        let number = *value.get_ref();
        if (low..=high).contains(&number) {
            Ok(number)
        } else {
            Err(self.error(Some(value.span()), key, format!("{number}: use {low} to {high}")))
        }
    }

    fn megabytes(&self, value: &Spanned<f64>, key: &str) -> Result<u64, ConfigError> {
        let megabytes = *value.get_ref();
        if !megabytes.is_finite() || megabytes <= 0.0 || megabytes > 1_048_576.0 {
            return Err(self.error(Some(value.span()), key, format!("{megabytes}: use a size in megabytes above 0")));
        }
        Ok((megabytes * 1_048_576.0) as u64)
    }
}

/// The HTTP API's port when `service.http` is not set.
pub const DEFAULT_HTTP_PORT: u16 = 8089;
/// Frames classified per second per camera, by default.
pub const DEFAULT_FPS: f64 = 2.0;
/// Seconds a frame may wait before it is dropped as stale, by default.
pub const DEFAULT_MAX_FRAME_AGE: f64 = 5.0;
/// Seconds without a frame before a stream's source is restarted, by default (folders: never).
pub const DEFAULT_STALL_AFTER: f64 = 30.0;
/// Identical accepted labels in a row before a camera's published state changes, by default.
pub const DEFAULT_DEBOUNCE: u32 = 3;

/// A camera's settings, each from the camera, else from `[defaults]`.
fn merged(camera: &RawCamera, defaults: &RawCamera) -> RawCamera {
    RawCamera {
        name: camera.name.clone(),
        source: camera.source.clone(),
        enabled: camera.enabled.or(defaults.enabled),
        fps: camera.fps.clone().or_else(|| defaults.fps.clone()),
        max_frame_age: camera.max_frame_age.clone().or_else(|| defaults.max_frame_age.clone()),
        stall_after: camera.stall_after.clone().or_else(|| defaults.stall_after.clone()),
        debounce: camera.debounce.clone().or_else(|| defaults.debounce.clone()),
        rtsp_decoder: camera.rtsp_decoder.clone().or_else(|| defaults.rtsp_decoder.clone()),
    }
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` → (TLS, host, port).
fn parse_broker_url(url: &str) -> Result<(bool, String, u16), String> {
    let url = url.trim();
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!("`{url}`: use mqtt://host[:port] or mqtts://host[:port] (TLS)"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains(['@', '/', '?']) {
        return Err("only host[:port] after the scheme; user and password go in mqtt.username and mqtt.password".to_string());
    }
    let default_port = if tls { 8883 } else { 1883 };
    // [v6]:port, host:port, or a host alone.
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') && (!host.contains(':') || host.ends_with(']')) => {
            (host, port.parse::<u16>().ok().filter(|&port| port > 0).ok_or(format!("`{port}` is not a port"))?)
        }
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{url}`: no host"));
    }
    Ok((tls, host.to_string(), port))
}

/// The box's host name, for the default client id and topic prefix.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if name.is_empty() {
        "box".to_string()
    } else {
        name
    }
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn valid_camera_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Replaces each `${NAME}` by the variable's value; a missing variable is an error naming it.
fn expand_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or("`${` without a closing `}`")?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_') {
            return Err(format!("`${{{name}}}` is not an environment variable name"));
        }
        let value = env(name).ok_or_else(|| {
            format!(
                "the environment variable {name} is not set (set it in the unit: systemctl edit cac-edge → Environment={name}=…)"
            )
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[model]\nbundle = \"b\"\ncache = \"c.safetensors\"\n\n[[camera]]\nname = \"door\"\nsource = \"folder:in\"\n";

    fn parse_text(text: &str) -> Result<ServeConfig, ConfigError> {
        parse(text, Path::new("/etc/cac-edge/serve.toml"), &|name| (name == "CAM_PASSWORD").then(|| "s3cret".to_string()))
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = parse_text(MINIMAL).expect("valid");
        assert_eq!(config.model.bundle, Path::new("/etc/cac-edge/b"));
        assert_eq!(config.model.cache, Path::new("/etc/cac-edge/c.safetensors"));
        assert_eq!(config.service.http, Some("127.0.0.1:8089".parse().expect("address")));
        assert_eq!(config.service.json_lines, JsonLinesTarget::Stdout);
        assert_eq!(config.model.options.decode, DecodeMode::Scaled, "serve decodes large frames at a reduced scale");
        let exact = parse_text(&MINIMAL.replace("[model]", "[model]\ndecode = \"exact\"")).expect("valid");
        assert_eq!(exact.model.options.decode, DecodeMode::Exact);
        assert_eq!(config.model.options.encoder_schedule, crate::EncoderSchedule::Concurrent);
        let sequential = parse_text(&MINIMAL.replace("[model]", "[model]\nencoder_schedule = \"sequential\"")).expect("valid");
        assert_eq!(sequential.model.options.encoder_schedule, crate::EncoderSchedule::Sequential);
        let wrong = parse_text(&MINIMAL.replace("[model]", "[model]\nencoder_schedule = \"both\"")).map(|_| ()).unwrap_err();
        assert!(wrong.to_string().contains("model.encoder_schedule"), "{wrong}");
        let camera = &config.cameras[0];
        assert_eq!(camera.source, SourceSpec::Folder("/etc/cac-edge/in".into()));
        assert_eq!((camera.fps, camera.debounce, camera.enabled), (2.0, 3, true));
        assert_eq!(camera.max_frame_age, Duration::from_secs(5));
        assert_eq!(camera.stall_after, None, "folders have no stall watchdog by default");
    }

    #[test]
    fn defaults_apply_unless_a_camera_sets_its_own() {
        let text = format!("{MINIMAL}\n[defaults]\nfps = 5\nstall_after = 12\n\n[[camera]]\nname = \"yard\"\nsource = \"rtsp://u:${{CAM_PASSWORD}}@cam/1\"\nfps = 1\n");
        let config = parse_text(&text).expect("valid");
        assert_eq!(config.cameras[0].fps, 5.0);
        assert_eq!(config.cameras[1].fps, 1.0);
        assert_eq!(config.cameras[1].stall_after, Some(Duration::from_secs(12)));
        assert_eq!(config.cameras[1].source, SourceSpec::Rtsp("rtsp://u:s3cret@cam/1".into()));
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let cases = [
            (MINIMAL.replace("name = \"door\"", "name = \"door\"\nfps = -1"), 7, Some("camera[0].fps")),
            (MINIMAL.replace("folder:in", "ftp://x"), 7, Some("camera[0].source")),
            (MINIMAL.replace("folder:in", "rtsp://u:${NOPE}@x"), 7, Some("camera[0].source")),
            (MINIMAL.replace("[[camera]]", "[[camera]]\nfsp = 2"), 6, None),
            (format!("{MINIMAL}[[camera]]\nname = \"door\"\nsource = \"stdin:\"\n"), 9, Some("camera[1].name")),
            (MINIMAL.replace("[model]", "[model]\nthreshold = 1.5"), 2, Some("model.threshold")),
            (MINIMAL.replace("[model]", "[model]\ndevice = \"tpu\""), 2, Some("model.device")),
            (MINIMAL.replace("[model]", "[model]\ndecode = \"fast\""), 2, Some("model.decode")),
            (format!("{MINIMAL}[service]\nhttp = \"localhost\"\n"), 9, Some("service.http")),
            (MINIMAL.replace("cache = ", "# cache = "), 1, Some("model.cache")),
            (MINIMAL.replace("bundle = \"b\"", "bundle = b"), 2, None),
            (format!("{MINIMAL}[defaults]\nname = \"x\"\n"), 9, Some("defaults.name")),
        ];
        for (text, line, key) in cases {
            let error = parse_text(&text).expect_err(&text);
            assert_eq!(error.line, Some(line), "{error}\n{text}");
            assert_eq!(error.key.as_deref(), key, "{error}");
            assert!(error.to_string().starts_with(&format!("/etc/cac-edge/serve.toml:{line}")), "{error}");
        }
        let unknown = parse_text(&MINIMAL.replace("[[camera]]", "[[camera]]\nfsp = 2")).expect_err("unknown key");
        assert!(unknown.message.contains("fsp"), "{unknown}");
    }

    #[test]
    fn secrets_come_from_the_environment_and_errors_do_not_show_them() {
        let text = MINIMAL.replace("folder:in", "https://u:${CAM_PASSWORD}@cam/x");
        let error = parse_text(&text).expect_err("https is refused");
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert_eq!(expand_env("a${X}b${X}", &|_| Some("1".into())), Ok("a1b1".into()));
        assert!(expand_env("a${X", &|_| None).is_err());
        assert!(expand_env("a${X-Y}", &|_| None).is_err());
    }

    #[test]
    fn camera_names_are_checked() {
        assert!(valid_camera_name("door-1.cam_a"));
        for bad in ["", "a b", "door/1", "käse", &"x".repeat(65)] {
            assert!(!valid_camera_name(bad), "{bad}");
        }
    }

    #[test]
    fn broker_urls_give_tls_host_and_port() {
        assert_eq!(parse_broker_url("mqtt://broker"), Ok((false, "broker".into(), 1883)));
        assert_eq!(parse_broker_url("mqtts://broker.example:9883/"), Ok((true, "broker.example".into(), 9883)));
        assert_eq!(parse_broker_url("mqtts://10.0.0.2"), Ok((true, "10.0.0.2".into(), 8883)));
        assert_eq!(parse_broker_url("mqtt://[::1]:1884"), Ok((false, "::1".into(), 1884)));
        assert_eq!(parse_broker_url("mqtt://[fe80::1]"), Ok((false, "fe80::1".into(), 1883)));
        for bad in ["tcp://broker", "broker:1883", "mqtt://", "mqtt://u:p@broker", "mqtt://broker:0", "mqtt://broker:x"] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(feature = "mqtt")]
    fn the_mqtt_table_gets_defaults_and_secrets_from_the_environment() {
        let text =
            format!("{MINIMAL}\n[mqtt]\nurl = \"mqtt://127.0.0.1\"\nusername = \"box\"\npassword = \"${{MQTT_PASSWORD}}\"\n");
        let env = |name: &str| match name {
            "MQTT_PASSWORD" => Some("s3cret".to_string()),
            "STATE_DIRECTORY" => Some("/var/lib/cac-edge:/var/lib/other".to_string()),
            _ => None,
        };
        let config = parse(&text, Path::new("/etc/cac-edge/serve.toml"), &env).expect("valid").mqtt.expect("[mqtt]");
        assert_eq!((config.host.as_str(), config.port, config.tls), ("127.0.0.1", 1883, false));
        assert_eq!(config.credentials, Some(("box".to_string(), "s3cret".to_string())));
        assert_eq!(config.queue_dir, PathBuf::from("/var/lib/cac-edge/mqtt-queue"));
        assert_eq!(config.queue_max_bytes, 64 << 20);
        assert!(config.client_id.starts_with("cac-edge-") && config.prefix.starts_with("cac-edge/"));
        assert_eq!(config.keep_alive, Duration::from_secs(15));
        assert_eq!(config.home_assistant, None);
    }

    #[test]
    #[cfg(feature = "mqtt")]
    fn mqtt_errors_name_the_line_and_key() {
        let cases = [
            ("[mqtt]\nprefix = \"a\"\n", "mqtt.url"),
            ("[mqtt]\nurl = \"http://broker\"\n", "mqtt.url"),
            ("[mqtt]\nurl = \"mqtt://b\"\nusername = \"u\"\n", "mqtt.username"),
            ("[mqtt]\nurl = \"mqtt://b\"\nprefix = \"site/#\"\n", "mqtt.prefix"),
            ("[mqtt]\nurl = \"mqtt://b\"\nkeep_alive = 1\n", "mqtt.keep_alive"),
            ("[mqtt]\nurl = \"mqtt://b\"\npassword = \"${NOPE}\"\nusername = \"u\"\n", "mqtt.password"),
        ];
        for (table, key) in cases {
            let error = parse_text(&format!("{MINIMAL}\n{table}")).expect_err(table);
            assert_eq!(error.key.as_deref(), Some(key), "{error}");
            assert!(error.line.is_some(), "{error}");
        }
    }

    #[test]
    fn the_drift_table_is_checked() {
        let config = parse_text(&format!("{MINIMAL}\n[drift]\nwindow = 300\nraise = 0.15\n")).expect("valid");
        assert_eq!((config.drift.window, config.drift.raise, config.drift.clear), (300, 0.15, DriftSettings::default().clear));
        assert_eq!(parse_text(MINIMAL).expect("valid").drift, DriftSettings::default());
        for table in ["[drift]\nwindow = 10\n", "[drift]\nraise = 0.05\n", "[drift]\nclear = -1\n", "[drift]\nwindow = -5\n"] {
            let error = parse_text(&format!("{MINIMAL}\n{table}")).expect_err(table);
            assert_eq!(error.key.as_deref(), Some("drift"), "{error}");
        }
    }
}
