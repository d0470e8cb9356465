//! The running service: cameras, the scheduler that classifies their frames, the sinks, reloads
//! and shutdown.
//!
//! Threads: one supervisor and one source thread per camera, the scheduler (owns the
//! [`Classifier`] and the sinks), the HTTP API, and the caller's (signals, reloads).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;

use super::camera::{Camera, Latest, Phase};
use super::config::{ServeConfig, ServiceConfig};
use super::frame::{lock, Frame, FramePayload, Wake};
use super::metrics::{Histogram, FRAME_AGE_SECONDS, INFERENCE_SECONDS};
use super::output::{rfc3339, DecisionEvent, DecisionSink, FailedFrameRecord, FrameRecord, JsonLines};
use super::review::ReviewRing;
use super::state::Debouncer;
use super::systemd::Notifier;
use crate::preprocess::decode_bytes;
use crate::threshold::calibration_key;
use crate::{Classifier, DecodeLimits, Decision, Prediction, Runtime};

/// Why the service cannot start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The bundle or cache could not be opened.
    #[error("{path}: {source}")]
    Model {
        /// The bundle or cache path.
        path: String,
        /// Why.
        #[source]
        source: crate::Error,
    },
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
    /// When the scheduler last went round its loop (a hung scheduler fails `/healthz`).
    heartbeat: Mutex<Instant>,
    stopping: AtomicBool,
    finished: AtomicBool,
    pending_classifier: Mutex<Option<Classifier>>,
    pending_sinks: Mutex<Option<Vec<Box<dyn DecisionSink>>>>,
    reopen: AtomicBool,
    started: Instant,
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

    /// How long ago the scheduler went round its loop.
    pub fn scheduler_silence(&self) -> Duration {
        lock(&self.heartbeat).elapsed()
    }

    /// Whether every enabled camera has fresh frames (`/readyz`), with the names of those that
    /// have not.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let now = Instant::now();
        let stale: Vec<String> = self.cameras().iter().filter(|camera| !camera.is_fresh(now)).map(|camera| camera.config().name).collect();
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
    scheduler: Option<JoinHandle<()>>,
    api: Option<super::api::ApiServer>,
    notifier: Arc<Mutex<Notifier>>,
}

impl Service {
    /// Opens the model (verifying the cache), the outputs and the HTTP API, and starts the
    /// cameras. Nothing runs if any of it fails.
    pub fn start(config: ServeConfig, runtime: &Arc<Runtime>) -> Result<Service, ServeError> {
        let classifier = open_classifier(&config, runtime)?;
        let sinks = open_sinks(&config)?;
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
            pending_classifier: Mutex::new(None),
            pending_sinks: Mutex::new(None),
            reopen: AtomicBool::new(false),
            started: Instant::now(),
        });
        let api = match config.service.http {
            Some(address) => Some(super::api::ApiServer::start(address, Arc::clone(&shared))?),
            None => None,
        };
        let notifier = Arc::new(Mutex::new(Notifier::from_env()));
        let cameras = config.cameras.iter().map(|camera| Camera::start(camera.clone(), &wake, config.max_frame_bytes)).collect();
        *shared.cameras.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = cameras;
        let scheduler = {
            let shared = Arc::clone(&shared);
            let notifier = Arc::clone(&notifier);
            std::thread::Builder::new()
                .name("scheduler".to_string())
                .spawn(move || Scheduler::new(shared, classifier, sinks, notifier).run())
                .map_err(|error| ServeError::Output(std::io::Error::other(format!("cannot start the scheduler thread: {error}"))))?
        };
        let service = Service { shared, config, runtime: Arc::clone(runtime), scheduler: Some(scheduler), api, notifier };
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
        format!("{} camera(s), {} classes, {} on {}, {api}", self.config.cameras.len(), model.classes, model.calibration, model.device)
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
        // Everything that can fail is opened before anything changes.
        let classifier = open_classifier(&new_config, &self.runtime)?;
        let sinks = open_sinks(&new_config)?;
        *self.shared.model.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = ModelInfo::of(&classifier);
        *lock(&self.shared.pending_classifier) = Some(classifier);
        *lock(&self.shared.pending_sinks) = Some(sinks);
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
                Some(camera) if !camera.config().source_differs(camera_config) && self.config.max_frame_bytes == new_config.max_frame_bytes => {
                    camera.update_config(camera_config.clone());
                    kept.push(Arc::clone(camera));
                }
                _ => {
                    tracing::info!("camera {}: (re)starting its source {}", camera_config.name, camera_config.source);
                    kept.push(Camera::start(camera_config.clone(), &self.shared.wake, new_config.max_frame_bytes));
                }
            }
        }
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
        if let Some(scheduler) = self.scheduler.take() {
            while !scheduler.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if scheduler.is_finished() {
                let _ = scheduler.join();
            } else {
                tracing::warn!("the scheduler did not finish its batch within {} s", grace.as_secs_f64());
            }
        }
        for camera in &cameras {
            camera.shut_down(deadline);
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
        tracing::debug!("stopped in {} ms", (grace.as_secs_f64() - deadline.saturating_duration_since(Instant::now()).as_secs_f64()) * 1000.0);
    }

    /// The HTTP settings in force.
    pub fn service_config(&self) -> &ServiceConfig {
        &self.config.service
    }
}

fn open_classifier(config: &ServeConfig, runtime: &Arc<Runtime>) -> Result<Classifier, ServeError> {
    let model = &config.model;
    let classifier = Classifier::open(runtime, &model.bundle, &model.cache, model.options.clone())
        .map_err(|source| ServeError::Model { path: model.cache.display().to_string(), source })?;
    if let Some(reason) = &classifier.device().fallback_reason {
        tracing::info!("note: {reason}");
    }
    Ok(classifier)
}

fn open_sinks(config: &ServeConfig) -> Result<Vec<Box<dyn DecisionSink>>, ServeError> {
    let mut sinks: Vec<Box<dyn DecisionSink>> = vec![Box::new(JsonLines::open(&config.service.json_lines).map_err(ServeError::Output)?)];
    if let Some(review) = &config.review {
        sinks.push(Box::new(ReviewRing::open(review).map_err(ServeError::Output)?));
    }
    Ok(sinks)
}

/// What the scheduler keeps per camera.
struct CameraSchedule {
    camera: Arc<Camera>,
    next_due: Instant,
    debouncer: Debouncer,
    last_failure_log: Option<Instant>,
}

/// One frame taken for the next batch.
struct Taken {
    schedule: String,
    camera: Arc<Camera>,
    frame: Frame,
}

struct Scheduler {
    shared: Arc<Shared>,
    classifier: Classifier,
    sinks: Vec<Box<dyn DecisionSink>>,
    notifier: Arc<Mutex<Notifier>>,
    schedules: HashMap<String, CameraSchedule>,
    last_output_error_log: Option<Instant>,
}

/// The longest the scheduler sleeps without looking around (stop, reload, watchdog).
const IDLE_TICK: Duration = Duration::from_secs(1);
/// At most one log line per camera per this long about failing frames.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Scheduler {
    fn new(shared: Arc<Shared>, classifier: Classifier, sinks: Vec<Box<dyn DecisionSink>>, notifier: Arc<Mutex<Notifier>>) -> Scheduler {
        Scheduler { shared, classifier, sinks, notifier, schedules: HashMap::new(), last_output_error_log: None }
    }

    fn run(mut self) {
        loop {
            *lock(&self.shared.heartbeat) = Instant::now();
            lock(&self.notifier).ping_watchdog();
            self.take_reload();
            let generation = self.shared.wake.generation();
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let (batch, next_due) = self.collect_batch();
            if batch.is_empty() {
                if self.all_sources_ended() {
                    self.shared.finished.store(true, Ordering::SeqCst);
                }
                let ping = lock(&self.notifier).ping_interval().unwrap_or(IDLE_TICK);
                let wait = next_due.map_or(IDLE_TICK, |due| due.saturating_duration_since(Instant::now())).min(IDLE_TICK).min(ping);
                self.shared.wake.wait_past(generation, wait);
                continue;
            }
            self.process(batch);
        }
        for sink in &mut self.sinks {
            if let Err(error) = sink.flush() {
                tracing::warn!("flushing an output at shutdown: {error}");
            }
        }
    }

    fn take_reload(&mut self) {
        if let Some(classifier) = lock(&self.shared.pending_classifier).take() {
            self.classifier = classifier;
        }
        if let Some(sinks) = lock(&self.shared.pending_sinks).take() {
            for sink in &mut self.sinks {
                let _ = sink.flush();
            }
            self.sinks = sinks;
        }
        if self.shared.reopen.swap(false, Ordering::SeqCst) {
            for sink in &mut self.sinks {
                if let Err(error) = sink.reopen() {
                    tracing::error!("reopening an output: {error}");
                }
            }
        }
    }

    fn all_sources_ended(&self) -> bool {
        let cameras = self.shared.cameras();
        !cameras.is_empty()
            && cameras.iter().all(|camera| matches!(camera.phase(), Phase::Ended | Phase::Failed(_) | Phase::Disabled) && !camera.mailbox.is_full())
            && cameras.iter().any(|camera| camera.phase() == Phase::Ended)
    }

    /// Takes the frames that are due, up to one batch; returns them and when the next waiting
    /// frame falls due.
    fn collect_batch(&mut self) -> (Vec<Taken>, Option<Instant>) {
        let now = Instant::now();
        let cameras = self.shared.cameras();
        self.schedules.retain(|_, schedule| cameras.iter().any(|camera| Arc::ptr_eq(camera, &schedule.camera)));
        let mut batch = Vec::new();
        let mut next_due: Option<Instant> = None;
        for camera in cameras {
            if batch.len() >= self.classifier.batch_size() {
                break;
            }
            let config = camera.config();
            let schedule = self.schedules.entry(config.name.clone()).or_insert_with(|| CameraSchedule {
                camera: Arc::clone(&camera),
                next_due: now,
                debouncer: Debouncer::new(config.debounce),
                last_failure_log: None,
            });
            schedule.debouncer.set_required(config.debounce);
            if !camera.mailbox.is_full() {
                continue;
            }
            if schedule.next_due > now {
                next_due = Some(next_due.map_or(schedule.next_due, |due: Instant| due.min(schedule.next_due)));
                continue;
            }
            let Some(frame) = camera.mailbox.take() else { continue };
            if frame.waited(now) > config.max_frame_age {
                camera.stats.stale.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The fps cap: the next frame of this camera is taken one period later. Frames that
            // arrive meanwhile replace each other in the mailbox (counted as dropped, busy).
            schedule.next_due = now + Duration::from_secs_f64(1.0 / config.fps);
            batch.push(Taken { schedule: config.name, camera, frame });
        }
        (batch, next_due)
    }

    fn process(&mut self, batch: Vec<Taken>) {
        let limits = *self.classifier.decode_limits();
        let decoded = decode_all(&batch, &limits);
        let mut images: Vec<RgbImage> = Vec::with_capacity(batch.len());
        let mut classified: Vec<&Taken> = Vec::with_capacity(batch.len());
        for (taken, image) in batch.iter().zip(decoded) {
            match image {
                Ok(image) => {
                    images.push(image);
                    classified.push(taken);
                }
                Err(error) => self.fail(taken, &error),
            }
        }
        if images.is_empty() {
            return;
        }
        let started = Instant::now();
        let predictions = self.classifier.classify_frames(&images);
        self.shared.inference_seconds.observe(started.elapsed().as_secs_f64());
        drop(images);
        match predictions {
            Ok(predictions) => {
                for (taken, prediction) in classified.into_iter().zip(&predictions) {
                    self.publish(taken, prediction);
                }
            }
            Err(error) => {
                let error = error.to_string();
                for taken in classified {
                    self.fail(taken, &error);
                }
            }
        }
    }

    fn publish(&mut self, taken: &Taken, prediction: &Prediction) {
        let camera = &taken.camera;
        let age = SystemTime::now().duration_since(taken.frame.captured_at).unwrap_or_default();
        self.shared.frame_age_seconds.observe(age.as_secs_f64());
        camera.stats.processed.fetch_add(1, Ordering::Relaxed);
        let counter = if prediction.decision == Decision::Accept { &camera.stats.accepted } else { &camera.stats.abstained };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(contrast) = prediction.contrast {
            camera.stats.contrast.observe(contrast);
        }
        let Some(schedule) = self.schedules.get_mut(&taken.schedule) else { return };
        let update = schedule.debouncer.update(&prediction.label, prediction.decision);
        let device = self.classifier.device().provider.name();
        let record = FrameRecord {
            camera: &taken.schedule,
            captured_at: rfc3339(taken.frame.captured_at),
            frame_age_ms: age.as_secs_f64() * 1000.0,
            prediction,
            threshold: self.classifier.threshold().value,
            device,
            state: update.state.as_deref(),
            state_changed: update.changed,
        };
        if update.changed {
            tracing::info!("camera {}: state is now {}", taken.schedule, prediction.label);
        }
        let event = DecisionEvent { camera: &taken.schedule, frame: &taken.frame, record: &record };
        let failures: Vec<std::io::Error> = self.sinks.iter_mut().filter_map(|sink| sink.decision(&event).err()).collect();
        self.output_failed(failures);
        let record = serde_json::to_value(&record).unwrap_or_default();
        // The payload is shared (an Arc), not copied; pixels are encoded only when the API asks.
        *lock(&camera.latest) = Some(Latest { record, frame: taken.frame.payload.clone() });
    }

    fn fail(&mut self, taken: &Taken, error: &str) {
        taken.camera.stats.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(schedule) = self.schedules.get_mut(&taken.schedule) {
            let now = Instant::now();
            if schedule.last_failure_log.is_none_or(|last| now.duration_since(last) >= FAILURE_LOG_INTERVAL) {
                schedule.last_failure_log = Some(now);
                tracing::warn!("camera {}: a frame failed: {error} (further failures within {} s are counted, not logged)", taken.schedule, FAILURE_LOG_INTERVAL.as_secs());
            }
        }
        let record = FailedFrameRecord { camera: &taken.schedule, captured_at: rfc3339(taken.frame.captured_at), error: error.to_string() };
        let failures: Vec<std::io::Error> = self.sinks.iter_mut().filter_map(|sink| sink.failure(&record).err()).collect();
        self.output_failed(failures);
    }

    /// Counts output errors and logs them, at most one line per [`FAILURE_LOG_INTERVAL`] (a
    /// full disk must not also flood the journal).
    fn output_failed(&mut self, failures: Vec<std::io::Error>) {
        for error in failures {
            self.shared.sink_errors.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if self.last_output_error_log.is_none_or(|last| now.duration_since(last) >= FAILURE_LOG_INTERVAL) {
                self.last_output_error_log = Some(now);
                tracing::warn!("an output failed: {error} (further output errors within {} s are counted, not logged)", FAILURE_LOG_INTERVAL.as_secs());
            }
        }
    }
}

/// Decodes the batch's frames, in parallel when there are several (decoding a 1080p JPEG costs
/// about as much as a small encoder run).
fn decode_all(batch: &[Taken], limits: &DecodeLimits) -> Vec<Result<RgbImage, String>> {
    let decode = |taken: &Taken| -> Result<RgbImage, String> {
        match &taken.frame.payload {
            FramePayload::Encoded(bytes) => decode_bytes(bytes, limits).map_err(|error| error.to_string()),
            FramePayload::Rgb(image) => Ok(RgbImage::clone(image)),
        }
    };
    if batch.len() == 1 {
        return batch.iter().map(decode).collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch.iter().map(|taken| scope.spawn(move || decode(taken))).collect();
        handles.into_iter().map(|handle| handle.join().unwrap_or_else(|_| Err("the decoder panicked".to_string()))).collect()
    })
}

impl Service {
    /// Asks the sinks to reopen their files (SIGHUP without a config change is also a reload;
    /// this is the part logrotate needs).
    pub fn reopen_outputs(&self) {
        self.shared.reopen.store(true, Ordering::SeqCst);
        self.shared.wake.notify();
    }
}
