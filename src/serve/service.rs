//! The running service: cameras, the two scheduler stages that classify their frames
//! (`scheduler`), the sinks, reloads and shutdown.
//!
//! Threads: one supervisor and one source thread per camera, the collector (takes, decodes and
//! preprocesses due frames), the encoder (owns the [`Classifier`] and the sinks), the HTTP API,
//! and the caller's (signals, reloads).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::camera::Camera;
use super::config::ServeConfig;
use super::frame::{join_by, lock, Wake};
use super::metrics::{Histogram, FRAME_AGE_SECONDS, INFERENCE_SECONDS};
use super::output::{DecisionSink, JsonLines};
use super::review::ReviewRing;
use super::systemd::Notifier;
use crate::preprocess::PreprocessConfig;
use crate::threshold::calibration_key;
use crate::{Classifier, DecodeLimits, Runtime};

/// Why the service cannot start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The bundle or cache could not be opened (the error names the file).
    #[error(transparent)]
    Model(#[from] crate::Error),
    /// An output could not be opened.
    #[error("{0}")]
    Output(std::io::Error),
    /// The HTTP API could not listen.
    #[error("cannot listen on {address} for the HTTP API: {reason}; pick another service.http address or stop what holds it")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// What the model is, for `/metrics` and the API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ModelInfo {
    /// The bundle's name.
    pub bundle: String,
    /// The cache file.
    pub cache: String,
    /// Digest of the cache's class list.
    pub classes_digest: String,
    /// How many classes.
    pub classes: usize,
    /// The calibration method in force (`cac`, `ts`, `dac`, `none`).
    pub calibration: String,
    /// Its parameters (JSON, as stored beside a threshold in the cache).
    pub calibration_params: String,
    /// The threshold in force.
    pub threshold: f64,
    /// The execution provider.
    pub device: String,
}

impl ModelInfo {
    fn of(classifier: &Classifier) -> ModelInfo {
        ModelInfo {
            bundle: classifier.bundle().name().to_string(),
            cache: classifier.cache().path().display().to_string(),
            classes_digest: classifier.cache().class_list().digest(),
            classes: classifier.cache().num_classes(),
            calibration: classifier.calibration().name().to_string(),
            calibration_params: calibration_key(classifier.calibration()),
            threshold: classifier.threshold().value,
            device: classifier.device().provider.name().to_string(),
        }
    }
}

/// What the scheduler, the API and the caller share.
pub struct Shared {
    cameras: RwLock<Vec<Arc<Camera>>>,
    /// Wakes the scheduler.
    pub wake: Arc<Wake>,
    /// Encoder time per batch.
    pub inference_seconds: Histogram,
    /// Frame age at decision.
    pub frame_age_seconds: Histogram,
    /// The model in force.
    pub model: RwLock<ModelInfo>,
    /// Reloads that took effect, and those refused.
    pub reloads: [AtomicU64; 2],
    /// Sink errors (a full disk under the JSON lines file, a review folder gone).
    pub sink_errors: AtomicU64,
    /// When the collector last went round its loop (a hung scheduler fails `/healthz`).
    heartbeat: Mutex<Instant>,
    stopping: AtomicBool,
    finished: AtomicBool,
    /// Batches taken by the collector and not yet published by the encoder.
    in_flight: AtomicUsize,
    pending_classifier: Mutex<Option<Classifier>>,
    pending_preprocess: Mutex<Option<(PreprocessConfig, DecodeLimits, usize)>>,
    pending_sinks: Mutex<Option<Vec<Box<dyn DecisionSink>>>>,
    reopen: AtomicBool,
    started: Instant,
    /// The shift alarm's settings in force (`[drift]`).
    pub drift_settings: RwLock<crate::drift::DriftSettings>,
    /// The MQTT output's counters, when it is on.
    #[cfg(feature = "mqtt")]
    pub mqtt: Option<Arc<super::mqtt::MqttStats>>,
}

impl Shared {
    /// The cameras, in config order.
    pub fn cameras(&self) -> Vec<Arc<Camera>> {
        self.cameras.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The camera called `name`.
    pub fn camera(&self, name: &str) -> Option<Arc<Camera>> {
        self.cameras().into_iter().find(|camera| camera.config().name == name)
    }

    pub(crate) fn collector_beat(&self) {
        *lock(&self.heartbeat) = Instant::now();
    }

    /// How long ago the scheduler's collector went round its loop.
    pub fn collector_silence(&self) -> Duration {
        lock(&self.heartbeat).elapsed()
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(crate) fn set_finished(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn batch_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn batch_done(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // The collector may be waiting to see the service finished.
        self.wake.notify();
    }

    pub(crate) fn take_pending_classifier(&self) -> Option<Classifier> {
        lock(&self.pending_classifier).take()
    }

    pub(crate) fn take_collector_reload(&self) -> Option<(PreprocessConfig, DecodeLimits, usize)> {
        lock(&self.pending_preprocess).take()
    }

    pub(crate) fn take_pending_sinks(&self) -> Option<Vec<Box<dyn DecisionSink>>> {
        lock(&self.pending_sinks).take()
    }

    pub(crate) fn take_reopen_request(&self) -> bool {
        self.reopen.swap(false, Ordering::SeqCst)
    }

    /// Whether every enabled camera has fresh frames (`/readyz`), with the names of those that
    /// have not.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let now = Instant::now();
        let stale: Vec<String> =
            self.cameras().iter().filter(|camera| !camera.is_fresh(now)).map(|camera| camera.config().name).collect();
        (stale.is_empty() && !self.stopping.load(Ordering::SeqCst), stale)
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A running service.
pub struct Service {
    shared: Arc<Shared>,
    config: ServeConfig,
    runtime: Arc<Runtime>,
    scheduler: Vec<JoinHandle<()>>,
    api: Option<super::api::ApiServer>,
    notifier: Arc<Mutex<Notifier>>,
    #[cfg(feature = "mqtt")]
    mqtt: Option<super::mqtt::MqttPublisher>,
}

impl Service {
    /// Opens the model (verifying the cache), the outputs and the HTTP API, and starts the
    /// cameras. Nothing runs if any of it fails.
    pub fn start(config: ServeConfig, runtime: &Arc<Runtime>) -> Result<Service, ServeError> {
        let classifier = open_classifier(&config, runtime)?;
        #[cfg(feature = "mqtt")]
        let mqtt = start_mqtt(&config)?;
        let sinks = open_sinks(
            &config,
            &Outputs::of(
                #[cfg(feature = "mqtt")]
                mqtt.as_ref(),
            ),
        )?;
        let wake = Arc::new(Wake::default());
        let shared = Arc::new(Shared {
            cameras: RwLock::new(Vec::new()),
            wake: Arc::clone(&wake),
            inference_seconds: Histogram::new(INFERENCE_SECONDS),
            frame_age_seconds: Histogram::new(FRAME_AGE_SECONDS),
            model: RwLock::new(ModelInfo::of(&classifier)),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            sink_errors: AtomicU64::new(0),
            heartbeat: Mutex::new(Instant::now()),
            stopping: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            pending_classifier: Mutex::new(None),
            pending_preprocess: Mutex::new(None),
            pending_sinks: Mutex::new(None),
            reopen: AtomicBool::new(false),
            started: Instant::now(),
            drift_settings: RwLock::new(config.drift),
            #[cfg(feature = "mqtt")]
            mqtt: mqtt.as_ref().map(super::mqtt::MqttPublisher::stats),
        });
        let bound_api = config.service.http.map(super::api::BoundApi::bind).transpose()?;
        let notifier = Arc::new(Mutex::new(Notifier::from_env()));
        let cameras: Vec<Arc<Camera>> =
            config.cameras.iter().map(|camera| Camera::start(camera.clone(), &wake, config.max_frame_bytes)).collect();
        *shared.cameras.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = cameras.clone();
        wait_for_folders(&cameras);
        let scheduler = super::scheduler::start(Arc::clone(&shared), classifier, sinks, Arc::clone(&notifier))
            .map_err(|error| ServeError::Output(std::io::Error::other(format!("cannot start the scheduler threads: {error}"))))?;
        let api = bound_api.map(|api| api.serve(Arc::clone(&shared))).transpose()?;
        let service = Service {
            shared,
            config,
            runtime: Arc::clone(runtime),
            scheduler: scheduler.into(),
            api,
            notifier,
            #[cfg(feature = "mqtt")]
            mqtt,
        };
        let status = service.status_line();
        tracing::info!("serving: {status}");
        lock(&service.notifier).ready(&status);
        Ok(service)
    }

    /// What the service shares with its API.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address the HTTP API listens on (its port when 0 was asked for).
    pub fn api_address(&self) -> Option<std::net::SocketAddr> {
        self.api.as_ref().map(super::api::ApiServer::address)
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    fn status_line(&self) -> String {
        let model = self.shared.model.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let api = self.api_address().map_or_else(|| "no HTTP API".to_string(), |address| format!("API on http://{address}"));
        format!(
            "{} camera(s), {} classes, {} on {}, {api}",
            self.config.cameras.len(),
            model.classes,
            model.calibration,
            model.device
        )
    }

    /// Whether every camera's source has ended for good (standard input closed) and its last
    /// frame was handled: nothing more will happen.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// SIGHUP: reads `new_config`, reopens the model and the outputs, and restarts only the
    /// cameras whose source changed. When anything in it is invalid the running state is kept
    /// and the error says why.
    pub fn reload(&mut self, new_config: Result<ServeConfig, super::config::ConfigError>) -> Result<(), ServeError> {
        lock(&self.notifier).reloading();
        let result = self.try_reload(new_config);
        let index = usize::from(result.is_err());
        self.shared.reloads[index].fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(()) => tracing::info!("reloaded: {}", self.status_line()),
            Err(error) => tracing::error!("reload refused, the running configuration stays: {error}"),
        }
        lock(&self.notifier).ready(&self.status_line());
        result
    }

    fn try_reload(&mut self, new_config: Result<ServeConfig, super::config::ConfigError>) -> Result<(), ServeError> {
        let new_config = new_config?;
        if new_config.service.http != self.config.service.http {
            tracing::warn!("service.http changed; the HTTP API keeps its address until the service restarts");
        }
        if new_config.mqtt != self.config.mqtt {
            tracing::warn!("[mqtt] changed; the MQTT output keeps its settings until the service restarts");
        }
        // Everything that can fail is opened before anything changes.
        let classifier = open_classifier(&new_config, &self.runtime)?;
        let sinks = open_sinks(
            &new_config,
            &Outputs::of(
                #[cfg(feature = "mqtt")]
                self.mqtt.as_ref(),
            ),
        )?;
        *self.shared.model.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = ModelInfo::of(&classifier);
        *lock(&self.shared.pending_preprocess) =
            Some((classifier.preprocess_config().clone(), *classifier.decode_limits(), classifier.batch_size()));
        *lock(&self.shared.pending_classifier) = Some(classifier);
        *lock(&self.shared.pending_sinks) = Some(sinks);
        *self.shared.drift_settings.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = new_config.drift;
        self.apply_cameras(&new_config);
        self.config = new_config;
        self.shared.wake.notify();
        Ok(())
    }

    fn apply_cameras(&self, new_config: &ServeConfig) {
        let old = self.shared.cameras();
        let mut kept = Vec::with_capacity(new_config.cameras.len());
        for camera_config in &new_config.cameras {
            let running = old.iter().find(|camera| camera.config().name == camera_config.name);
            match running {
                Some(camera)
                    if !camera.config().source_differs(camera_config)
                        && self.config.max_frame_bytes == new_config.max_frame_bytes =>
                {
                    camera.update_config(camera_config.clone());
                    kept.push(Arc::clone(camera));
                }
                _ => {
                    tracing::info!("camera {}: (re)starting its source {}", camera_config.name, camera_config.source);
                    kept.push(Camera::start(camera_config.clone(), &self.shared.wake, new_config.max_frame_bytes));
                }
            }
        }
        let started: Vec<Arc<Camera>> =
            kept.iter().filter(|camera| !old.iter().any(|old| Arc::ptr_eq(old, camera))).cloned().collect();
        wait_for_folders(&started);
        let deadline = Instant::now() + Duration::from_secs(3);
        for camera in &old {
            if !kept.iter().any(|kept| Arc::ptr_eq(kept, camera)) {
                camera.shut_down(deadline);
            }
        }
        *self.shared.cameras.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = kept;
    }

    /// SIGTERM: stops intake, lets the scheduler finish the batch in flight and flush the
    /// outputs, and stops the API; bounded by `grace`.
    pub fn shut_down(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        lock(&self.notifier).stopping();
        let cameras = self.shared.cameras();
        for camera in &cameras {
            camera.request_stop();
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify();
        for stage in std::mem::take(&mut self.scheduler) {
            if !join_by(stage, deadline) {
                tracing::warn!("the scheduler did not finish its batch within {} s", grace.as_secs_f64());
            }
        }
        for camera in &cameras {
            camera.shut_down(deadline);
        }
        // After the encoder flushed: what it published is in the queue, delivered until the deadline.
        #[cfg(feature = "mqtt")]
        if let Some(mqtt) = self.mqtt.take() {
            mqtt.stop(deadline);
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
        tracing::debug!(
            "stopped in {} ms",
            (grace.as_secs_f64() - deadline.saturating_duration_since(Instant::now()).as_secs_f64()) * 1000.0
        );
    }
}

/// Waits (bounded by [`FOLDER_WATCH_WAIT`]) until the folder cameras among `cameras` watch
/// their folders, so that a file dropped once the service says it is ready is never missed.
fn wait_for_folders(cameras: &[Arc<Camera>]) {
    let deadline = Instant::now() + FOLDER_WATCH_WAIT;
    for camera in cameras {
        if !camera.wait_listening(deadline) {
            tracing::warn!("camera {}: its folder is not watched yet; files dropped now may be missed", camera.config().name);
        }
    }
}

/// The longest start or a reload waits for folders to be watched.
const FOLDER_WATCH_WAIT: Duration = Duration::from_secs(5);

/// Opens the bundle and cache `config` names (the cache verified unless `verify = false`): what
/// start, reload and `--check-config` do.
pub fn open_classifier(config: &ServeConfig, runtime: &Arc<Runtime>) -> Result<Classifier, ServeError> {
    let model = &config.model;
    let classifier = Classifier::open(runtime, &model.bundle, &model.cache, model.options.clone())?;
    if let Some(reason) = &classifier.device().fallback_reason {
        tracing::info!("note: {reason}");
    }
    Ok(classifier)
}

/// Outputs that live as long as the service (not reopened at a reload).
struct Outputs<'a> {
    #[cfg(feature = "mqtt")]
    mqtt: Option<&'a super::mqtt::MqttPublisher>,
    #[cfg(not(feature = "mqtt"))]
    _none: std::marker::PhantomData<&'a ()>,
}

impl<'a> Outputs<'a> {
    #[cfg(feature = "mqtt")]
    fn of(mqtt: Option<&'a super::mqtt::MqttPublisher>) -> Outputs<'a> {
        Outputs { mqtt }
    }

    #[cfg(not(feature = "mqtt"))]
    fn of() -> Outputs<'a> {
        Outputs { _none: std::marker::PhantomData }
    }
}

fn open_sinks(config: &ServeConfig, outputs: &Outputs<'_>) -> Result<Vec<Box<dyn DecisionSink>>, ServeError> {
    let mut sinks: Vec<Box<dyn DecisionSink>> =
        vec![Box::new(JsonLines::open(&config.service.json_lines).map_err(ServeError::Output)?)];
    if let Some(review) = &config.review {
        sinks.push(Box::new(ReviewRing::open(review).map_err(ServeError::Output)?));
    }
    #[cfg(feature = "mqtt")]
    if let Some(mqtt) = outputs.mqtt {
        sinks.push(Box::new(mqtt.sink()));
    }
    let _ = outputs;
    Ok(sinks)
}

#[cfg(feature = "mqtt")]
fn start_mqtt(config: &ServeConfig) -> Result<Option<super::mqtt::MqttPublisher>, ServeError> {
    let Some(mqtt) = &config.mqtt else { return Ok(None) };
    let cameras: Vec<String> = config.cameras.iter().map(|camera| camera.name.clone()).collect();
    super::mqtt::MqttPublisher::start(mqtt, &cameras).map(Some).map_err(ServeError::Output)
}

impl Service {
    /// Asks the sinks to reopen their files (SIGHUP without a config change is also a reload;
    /// this is the part logrotate needs).
    pub fn reopen_outputs(&self) {
        self.shared.reopen.store(true, Ordering::SeqCst);
        self.shared.wake.notify();
    }
}
