//! The frame path after the mailboxes, in two stages so that the encoder never waits for a
//! decoder:
//!
//! - the **collector** takes the frames that are due (fps cap; stale ones are dropped and
//!   counted), decodes them (in parallel when several cameras are due together) and preprocesses
//!   them into one batch tensor;
//! - the **encoder** classifies each batch, debounces each camera's state and hands every
//!   decision to the sinks.
//!
//! Between them is a rendezvous: while the encoder runs batch N, the collector prepares N+1 and
//! hands it over when the encoder is free, and takes no frame meanwhile. Frames that arrive
//! meanwhile replace each other in their mailboxes, and memory holds two batches.
//!
//! With live cameras the collector also paces itself ([`Pace`]): after a handover it waits
//! until the encoder is about to be free (the encoder's recent time for a batch of that size,
//! less the collector's recent time to prepare one, with margins) and only then takes frames.
//! Taken at once, a frame of a camera faster than the model would wait out most of an encoder
//! run already decoded, its age at decision close to 1/fps + 2 × the encoder time; paced, it is
//! about 1/fps + its decode + one encoder run. When the estimates are off (a slower batch, a
//! reload) the encoder waits a little or a frame ages a little, never more than without pacing.
//! A service with folders only does not pace: their files wait on disk whatever the collector
//! does, and an encoder kept busy is all that counts there.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use ndarray::Array4;

use super::camera::{Camera, HistoryPoint, Latest, Phase};
use super::frame::{lock, Frame, FramePayload};
use super::output::{rfc3339, DecisionEvent, DecisionSink, DriftStatus, FailedFrameRecord, FrameRecord};
use super::service::Shared;
use super::state::Debouncer;
use super::systemd::Notifier;
use crate::calibrate::Calibration;
use crate::drift::{Distribution, DriftBaseline, DriftMonitor, BASELINE_KEY};
use crate::preprocess::{decode_bytes_with, preprocess_scaled_into, DecodeMode, Geometry, PreprocessConfig};
use crate::{Classifier, Decision, DecodeLimits, Prediction};

/// The longest either stage sleeps without looking around (stop, reload, watchdog).
const IDLE_TICK: Duration = Duration::from_secs(1);
/// The weight of the newest measurement in [`Pace`]'s moving averages.
const PACE_SMOOTHING: f64 = 0.2;
/// The collector aims to hand a batch over early enough for an encoder run this many standard
/// deviations shorter than its mean, with a preparation [`PACE_LEAD`] times its mean, plus
/// [`PACE_MARGIN`]: a late batch leaves the encoder idle (lost throughput), an early one only
/// ages its frames by the same amount.
const PACE_SPREAD: f64 = 1.0;
const PACE_LEAD: f64 = 1.25;
const PACE_MARGIN: Duration = Duration::from_millis(2);
/// At most one log line per camera (or for the outputs) per this long about failures.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One frame taken from a mailbox.
struct Taken {
    camera: Arc<Camera>,
    name: String,
    frame: Frame,
}

/// A batch ready for the encoder: the frames whose pixels are rows of `pixels`, in order, and
/// those that could not be decoded.
struct PreparedBatch {
    /// Each frame with its pixels and the geometry they were decoded at (for a re-preprocess).
    frames: Vec<(Taken, Arc<RgbImage>, Geometry)>,
    pixels: Option<Array4<f32>>,
    /// The preprocessing the tensor was made with (a reload may change the bundle meanwhile).
    image_size: u32,
    failed: Vec<(Taken, String)>,
}

/// Starts both stages; returns the collector's and the encoder's threads.
pub(crate) fn start(
    shared: Arc<Shared>,
    classifier: Classifier,
    sinks: Vec<Box<dyn DecisionSink>>,
    notifier: Arc<Mutex<Notifier>>,
) -> std::io::Result<[std::thread::JoinHandle<()>; 2]> {
    // Capacity 0: `send` returns only when the encoder takes the batch.
    let (batches_tx, batches) = mpsc::sync_channel(0);
    let pace = Arc::new(Pace::default());
    let preprocess = classifier.preprocess_config().clone();
    let limits = *classifier.decode_limits();
    let decode = classifier.decode_mode();
    let batch_size = classifier.batch_size();
    let collector = {
        let shared = Arc::clone(&shared);
        let pace = Arc::clone(&pace);
        std::thread::Builder::new().name("collector".to_string()).spawn(move || {
            Collector { shared, pace, next_due: HashMap::new(), batch_size, limits, decode, preprocess }.run(&batches_tx)
        })?
    };
    let encoder = std::thread::Builder::new().name("encoder".to_string()).spawn(move || {
        Encoder {
            drift: DriftMonitors::new(&classifier, Arc::clone(&shared)),
            shared,
            pace,
            classifier,
            sinks,
            notifier,
            debouncers: HashMap::new(),
            failure_logs: HashMap::new(),
            last_output_error_log: None,
        }
        .run(&batches)
    })?;
    Ok([collector, encoder])
}

struct Collector {
    shared: Arc<Shared>,
    pace: Arc<Pace>,
    /// When each camera (by identity) may next give a frame: the fps cap.
    next_due: HashMap<usize, Instant>,
    batch_size: usize,
    limits: DecodeLimits,
    /// Exact or reduced-scale JPEG decoding (the serve config's `model.decode`).
    decode: DecodeMode,
    preprocess: PreprocessConfig,
}

impl Collector {
    fn run(mut self, batches: &SyncSender<PreparedBatch>) {
        loop {
            self.shared.collector_beat();
            if let Some((preprocess, limits, batch_size)) = self.shared.take_collector_reload() {
                (self.preprocess, self.limits, self.batch_size) = (preprocess, limits, batch_size);
            }
            let generation = self.shared.wake.generation();
            if self.shared.is_stopping() {
                // Dropping the sender lets the encoder finish what it has and stop.
                return;
            }
            let (taken, next_due) = self.collect();
            if taken.is_empty() {
                if self.shared.in_flight() == 0 && all_sources_ended(&self.shared.cameras()) {
                    self.shared.set_finished();
                }
                let wait = next_due.map_or(IDLE_TICK, |due| due.saturating_duration_since(Instant::now())).min(IDLE_TICK);
                self.shared.wake.wait_past(generation, wait);
                continue;
            }
            self.shared.batch_started();
            let started = Instant::now();
            let batch = self.prepare(taken);
            self.pace.prepared(started.elapsed());
            let size = batch.frames.len();
            // Blocks until the encoder is free: the frames of the batch after are still in their
            // mailboxes, being replaced by newer ones, as they should be.
            if batches.send(batch).is_err() {
                return;
            }
            if self.shared.cameras().iter().any(|camera| camera.is_live()) {
                if let Some(wait) = self.pace.wait_before_next(size) {
                    std::thread::sleep(wait.min(IDLE_TICK));
                }
            }
        }
    }

    /// Takes the frames that are due, up to one batch; returns them and when the next waiting
    /// frame falls due.
    fn collect(&mut self) -> (Vec<Taken>, Option<Instant>) {
        let now = Instant::now();
        let cameras = self.shared.cameras();
        self.next_due.retain(|key, _| cameras.iter().any(|camera| camera_key(camera) == *key));
        let mut taken = Vec::new();
        let mut next_due: Option<Instant> = None;
        for camera in cameras {
            if taken.len() >= self.batch_size {
                break;
            }
            if !camera.mailbox.is_full() {
                continue;
            }
            let due = *self.next_due.entry(camera_key(&camera)).or_insert(now);
            if due > now {
                next_due = Some(next_due.map_or(due, |earliest: Instant| earliest.min(due)));
                continue;
            }
            let Some(frame) = camera.mailbox.take() else { continue };
            let config = camera.config();
            if frame.waited(now) > config.max_frame_age {
                camera.stats.stale.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The fps cap: this camera's next frame is taken one period later. Frames arriving
            // meanwhile replace each other in the mailbox (counted as dropped, busy).
            self.next_due.insert(camera_key(&camera), now + Duration::from_secs_f64(1.0 / config.fps));
            taken.push(Taken { name: config.name, camera, frame });
        }
        (taken, next_due)
    }

    /// Decodes (in parallel when several) and preprocesses the frames into one tensor.
    fn prepare(&self, taken: Vec<Taken>) -> PreparedBatch {
        let decoded = decode_all(&taken, &self.limits, self.decode, self.preprocess.image_size);
        let mut frames = Vec::with_capacity(taken.len());
        let mut failed = Vec::new();
        for (item, image) in taken.into_iter().zip(decoded) {
            match image {
                Ok((image, geometry)) => frames.push((item, image, geometry)),
                Err(error) => failed.push((item, error)),
            }
        }
        let side = self.preprocess.image_size as usize;
        let mut pixels = Array4::<f32>::zeros((frames.len(), 3, side, side));
        let mut kept = Vec::with_capacity(frames.len());
        let mut rows = 0;
        for (item, image, geometry) in frames {
            let mut row = pixels.index_axis_mut(ndarray::Axis(0), rows);
            match preprocess_scaled_into(&image, geometry, &self.preprocess, row.as_slice_mut().unwrap_or_default()) {
                Ok(()) => {
                    kept.push((item, image, geometry));
                    rows += 1;
                }
                Err(error) => failed.push((item, error.to_string())),
            }
        }
        let pixels = (rows > 0).then(|| pixels.slice_move(ndarray::s![..rows, .., .., ..]));
        PreparedBatch { frames: kept, pixels, image_size: self.preprocess.image_size, failed }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// A camera's identity in the collector's map: a restarted camera (a reload) starts afresh.
fn camera_key(camera: &Arc<Camera>) -> usize {
    Arc::as_ptr(camera) as usize
}

/// Whether every camera's source has ended for good (and at least one ended rather than failed)
/// and no frame is left: nothing more will come.
fn all_sources_ended(cameras: &[Arc<Camera>]) -> bool {
    let done = |camera: &Arc<Camera>| {
        matches!(camera.phase(), Phase::Ended | Phase::Failed(_) | Phase::Disabled) && !camera.mailbox.is_full()
    };
    !cameras.is_empty() && cameras.iter().all(done) && cameras.iter().any(|camera| camera.phase() == Phase::Ended)
}

type DecodedFrame = Result<(Arc<RgbImage>, Geometry), String>;

/// Decodes the frames (JPEGs at a reduced scale in `DecodeMode::Scaled`, for an encoder of side
/// `side`), in parallel when there are several (a 1080p JPEG costs about as much as a small
/// encoder run).
fn decode_all(taken: &[Taken], limits: &DecodeLimits, mode: DecodeMode, side: u32) -> Vec<DecodedFrame> {
    let decode = |item: &Taken| -> DecodedFrame {
        match &item.frame.payload {
            FramePayload::Encoded(bytes) => decode_bytes_with(bytes, limits, mode, side)
                .map(|decoded| (Arc::new(decoded.rgb), decoded.geometry))
                .map_err(|error| error.to_string()),
            FramePayload::Rgb(image) => Ok((Arc::clone(image), Geometry::full(image))),
        }
    };
    if taken.len() == 1 {
        return taken.iter().map(decode).collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = taken.iter().map(|item| scope.spawn(move || decode(item))).collect();
        handles.into_iter().map(|handle| handle.join().unwrap_or_else(|_| Err("the decoder panicked".to_string()))).collect()
    })
}

/// Moving averages of how long each stage takes, shared by both: the encoder's time by batch
/// size (sinks included: it takes the next batch only after them) and the collector's time to
/// prepare a batch.
#[derive(Default)]
struct Pace {
    /// Indexed by batch size.
    encoder: Mutex<Vec<Option<Average>>>,
    prepare: Mutex<Option<Average>>,
}

/// An exponentially weighted mean and variance, in seconds.
#[derive(Clone, Copy, Debug)]
struct Average {
    mean: f64,
    variance: f64,
}

impl Average {
    fn add(average: &mut Option<Average>, sample: Duration) {
        let sample = sample.as_secs_f64();
        *average = Some(match *average {
            None => Average { mean: sample, variance: 0.0 },
            Some(Average { mean, variance }) => {
                let delta = sample - mean;
                // West's incremental form of the exponentially weighted variance.
                Average {
                    mean: mean + PACE_SMOOTHING * delta,
                    variance: (1.0 - PACE_SMOOTHING) * (variance + PACE_SMOOTHING * delta * delta),
                }
            }
        });
    }
}

impl Pace {
    fn encoded(&self, size: usize, elapsed: Duration) {
        if size == 0 {
            return; // a batch whose every frame failed to decode says nothing of the encoder
        }
        let mut encoder = lock(&self.encoder);
        if encoder.len() <= size {
            encoder.resize(size + 1, None);
        }
        Average::add(&mut encoder[size], elapsed);
    }

    fn prepared(&self, elapsed: Duration) {
        Average::add(&mut lock(&self.prepare), elapsed);
    }

    /// How long the collector should wait, after handing over a batch of `size` frames, before
    /// taking the next frames; `None` until both stages have been measured.
    fn wait_before_next(&self, size: usize) -> Option<Duration> {
        let encoder = lock(&self.encoder).get(size).copied().flatten()?;
        let prepare = (*lock(&self.prepare))?;
        let shortest_likely_run = encoder.mean - PACE_SPREAD * encoder.variance.sqrt();
        let wait = shortest_likely_run - prepare.mean * PACE_LEAD - PACE_MARGIN.as_secs_f64();
        (wait > 0.0).then(|| Duration::from_secs_f64(wait))
    }
}

struct Encoder {
    shared: Arc<Shared>,
    pace: Arc<Pace>,
    classifier: Classifier,
    sinks: Vec<Box<dyn DecisionSink>>,
    notifier: Arc<Mutex<Notifier>>,
    /// Each camera's debounced state, by identity (a restarted camera starts afresh).
    debouncers: HashMap<usize, Debouncer>,
    /// The shift alarms.
    drift: DriftMonitors,
    failure_logs: HashMap<usize, Instant>,
    last_output_error_log: Option<Instant>,
}

impl Encoder {
    fn run(mut self, batches: &Receiver<PreparedBatch>) {
        loop {
            self.ping_watchdog();
            self.take_reload();
            let tick = lock(&self.notifier).ping_interval().unwrap_or(IDLE_TICK).min(IDLE_TICK);
            match batches.recv_timeout(tick) {
                Ok(batch) => {
                    let started = Instant::now();
                    let size = batch.frames.len();
                    // A reload that came while waiting applies to this batch already.
                    self.take_reload();
                    self.process(batch);
                    self.pace.encoded(size, started.elapsed());
                    self.shared.batch_done();
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The collector stopped (shutdown) and everything it sent is done.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for sink in &mut self.sinks {
            if let Err(error) = sink.flush() {
                tracing::warn!("flushing an output at shutdown: {error}");
            }
        }
    }

    /// `WATCHDOG=1` only while both stages go round: a hung encoder or collector stops the pings
    /// and systemd restarts the service.
    fn ping_watchdog(&self) {
        if self.shared.collector_silence() < IDLE_TICK * 5 {
            lock(&self.notifier).ping_watchdog();
        }
    }

    fn take_reload(&mut self) {
        if let Some(classifier) = self.shared.take_pending_classifier() {
            self.drift.set_baseline(&classifier);
            self.classifier = classifier;
        }
        if let Some(sinks) = self.shared.take_pending_sinks() {
            for sink in &mut self.sinks {
                let _ = sink.flush();
            }
            self.sinks = sinks;
        }
        if self.shared.take_reopen_request() {
            for sink in &mut self.sinks {
                if let Err(error) = sink.reopen() {
                    tracing::error!("reopening an output: {error}");
                }
            }
        }
    }

    fn process(&mut self, batch: PreparedBatch) {
        for (item, error) in &batch.failed {
            self.fail(item, error);
        }
        let Some(pixels) = batch.pixels else { return };
        let pixels = if batch.image_size == self.classifier.preprocess_config().image_size {
            pixels
        } else {
            // A reload changed the bundle while this batch was being prepared.
            match self.repreprocess(&batch.frames) {
                Ok(pixels) => pixels,
                Err(error) => {
                    for (item, _, _) in &batch.frames {
                        self.fail(item, &error);
                    }
                    return;
                }
            }
        };
        let started = Instant::now();
        let predictions = self.classifier.classify_pixels(pixels);
        self.shared.inference_seconds.observe(started.elapsed().as_secs_f64());
        match predictions {
            Ok(predictions) => {
                for ((item, _, _), prediction) in batch.frames.iter().zip(&predictions) {
                    self.publish(item, prediction);
                }
            }
            Err(error) => {
                let error = error.to_string();
                for (item, _, _) in &batch.frames {
                    self.fail(item, &error);
                }
            }
        }
    }

    fn repreprocess(&self, frames: &[(Taken, Arc<RgbImage>, Geometry)]) -> Result<Array4<f32>, String> {
        let images = frames.iter().map(|(_, image, geometry)| (image.as_ref(), *geometry));
        crate::pipeline::preprocess_frames(images, self.classifier.preprocess_config(), 0).map_err(|error| error.to_string())
    }

    fn publish(&mut self, item: &Taken, prediction: &Prediction) {
        let camera = &item.camera;
        let age = SystemTime::now().duration_since(item.frame.captured_at).unwrap_or_default();
        self.shared.frame_age_seconds.observe(age.as_secs_f64());
        camera.stats.processed.fetch_add(1, Ordering::Relaxed);
        let counter = if prediction.decision == Decision::Accept { &camera.stats.accepted } else { &camera.stats.abstained };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(contrast) = prediction.contrast {
            camera.stats.contrast.observe(contrast);
        }
        let debounce = camera.config().debounce;
        let cameras = self.shared.cameras();
        self.debouncers.retain(|key, _| cameras.iter().any(|camera| camera_key(camera) == *key));
        let debouncer = self.debouncers.entry(camera_key(camera)).or_insert_with(|| Debouncer::new(debounce));
        debouncer.set_required(debounce);
        let update = debouncer.update(&prediction.label, prediction.decision);
        if update.changed {
            tracing::info!("camera {}: state is now {}", item.name, prediction.label);
        }
        let record = FrameRecord {
            camera: &item.name,
            captured_at: rfc3339(item.frame.captured_at),
            frame_age_ms: age.as_secs_f64() * 1000.0,
            prediction,
            threshold: self.classifier.threshold().value,
            device: self.classifier.device().provider.name(),
            precision: self.classifier.precision().name(),
            state: update.state.as_deref(),
            state_changed: update.changed,
            drift: self.drift.observe(item, prediction, &cameras),
        };
        let event = DecisionEvent { camera: &item.name, frame: &item.frame, record: &record };
        let failures: Vec<std::io::Error> = self.sinks.iter_mut().filter_map(|sink| sink.decision(&event).err()).collect();
        let record = serde_json::to_value(&record).unwrap_or_default();
        // The payload is shared (an Arc), not copied; pixels are encoded only when the API asks.
        *lock(&camera.latest) = Some(Latest { record, frame: item.frame.payload.clone() });
        camera.history.push(HistoryPoint {
            t: unix_ms(SystemTime::now()),
            confidence: prediction.confidence,
            contrast: prediction.contrast,
        });
        self.output_failed(failures);
    }

    fn fail(&mut self, item: &Taken, error: &str) {
        item.camera.stats.failed.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let last = self.failure_logs.get(&camera_key(&item.camera));
        if last.is_none_or(|last| now.duration_since(*last) >= FAILURE_LOG_INTERVAL) {
            self.failure_logs.insert(camera_key(&item.camera), now);
            let quiet = FAILURE_LOG_INTERVAL.as_secs();
            tracing::warn!(
                "camera {}: a frame failed: {error} (further failures within {quiet} s are counted, not logged)",
                item.name
            );
        }
        let record =
            FailedFrameRecord { camera: &item.name, captured_at: rfc3339(item.frame.captured_at), error: error.to_string() };
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
                let quiet = FAILURE_LOG_INTERVAL.as_secs();
                tracing::warn!("an output failed: {error} (further output errors within {quiet} s are counted, not logged)");
            }
        }
    }
}

/// Each camera's shift alarm ([`crate::drift`]): d(x) of its frames against the cache's
/// baseline. Off (no `drift` in the JSON lines) when the cache has no baseline, or one measured
/// with another contrast distance than the calibration in force.
struct DriftMonitors {
    shared: Arc<Shared>,
    baseline: Option<Distribution>,
    monitors: HashMap<usize, DriftMonitor>,
}

impl DriftMonitors {
    fn new(classifier: &Classifier, shared: Arc<Shared>) -> DriftMonitors {
        let mut monitors = DriftMonitors { shared, baseline: None, monitors: HashMap::new() };
        monitors.set_baseline(classifier);
        monitors
    }

    /// Takes the baseline of `classifier`'s cache (at start and at each reload; the windows
    /// start afresh when it changed).
    fn set_baseline(&mut self, classifier: &Classifier) {
        let baseline = drift_baseline(classifier);
        if baseline != self.baseline {
            self.monitors.clear();
        }
        self.baseline = baseline;
    }

    fn observe(&mut self, item: &Taken, prediction: &Prediction, cameras: &[Arc<Camera>]) -> Option<DriftStatus> {
        let baseline = self.baseline.as_ref()?;
        let contrast = prediction.contrast?;
        let settings = *self.shared.drift_settings.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.monitors.retain(|key, _| cameras.iter().any(|camera| camera_key(camera) == *key));
        let monitor =
            self.monitors.entry(camera_key(&item.camera)).or_insert_with(|| DriftMonitor::new(baseline.clone(), settings));
        monitor.set_settings(settings);
        let update = monitor.observe(contrast);
        let status = DriftStatus {
            score: update.score,
            alarm: update.alarm,
            alarm_changed: update.changed,
            frames: monitor.filled(),
            window: settings.window,
        };
        if update.changed && update.alarm {
            item.camera.stats.drift_alarms.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "camera {}: shift alarm: the contrast d(x) of its last {} frames no longer looks like the evaluation images \
                 (PSI {:.3} ≥ {}); the camera may have moved, fogged or be seeing new things",
                item.name,
                settings.window,
                update.score.unwrap_or_default(),
                settings.raise
            );
        } else if update.changed {
            tracing::info!(
                "camera {}: shift alarm cleared (PSI {:.3} ≤ {})",
                item.name,
                update.score.unwrap_or_default(),
                settings.clear
            );
        }
        *lock(&item.camera.drift) = Some(status);
        Some(status)
    }
}

/// The contrast distribution the cache stores for the calibration in force, if any.
fn drift_baseline(classifier: &Classifier) -> Option<Distribution> {
    let Calibration::Cac(params) = classifier.calibration() else {
        tracing::info!(
            "shift alarm off: it watches CAC's contrast d(x), and the calibration is {}",
            classifier.calibration().name()
        );
        return None;
    };
    let Some(text) = classifier.cache().metadata().get(BASELINE_KEY) else {
        tracing::info!(
            "shift alarm off: {} has no drift baseline (cac-edge eval --write-drift-baseline stores one)",
            classifier.cache().path().display()
        );
        return None;
    };
    match DriftBaseline::from_json(text) {
        Ok(baseline) if baseline.distance == params.distance.name() => Some(baseline.contrast),
        Ok(baseline) => {
            tracing::warn!(
                "shift alarm off: the drift baseline measured d(x) with the {} distance, the calibration uses {}; run eval --write-drift-baseline again",
                baseline.distance,
                params.distance.name()
            );
            None
        }
        Err(error) => {
            tracing::warn!("shift alarm off: {}: {error}", classifier.cache().path().display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pace_waits_for_the_encoder_less_the_preparation() {
        let pace = Pace::default();
        assert_eq!(pace.wait_before_next(1), None, "nothing measured yet");
        pace.encoded(1, 50 * MS);
        assert_eq!(pace.wait_before_next(1), None, "the preparation not measured yet");
        pace.prepared(8 * MS);
        // Steady runs: 50 − 1.25 × 8 − 2 = 38 ms.
        let wait = pace.wait_before_next(1).expect("both measured");
        assert!((wait.as_secs_f64() - 0.038).abs() < 1e-9, "{wait:?}");
        assert_eq!(pace.wait_before_next(4), None, "no batch of 4 measured");
        // A batch whose frames all failed says nothing of the encoder.
        pace.encoded(0, Duration::from_secs(5));
        assert_eq!(pace.wait_before_next(0), None);
    }

    #[test]
    fn pace_waits_less_when_the_encoder_varies_and_never_when_preparing_takes_longer() {
        let steady = Pace::default();
        let varying = Pace::default();
        for run in 0..50 {
            steady.encoded(1, 50 * MS);
            varying.encoded(1, if run % 2 == 0 { 40 * MS } else { 60 * MS });
            steady.prepared(8 * MS);
            varying.prepared(8 * MS);
        }
        let steady = steady.wait_before_next(1).expect("measured");
        let varying = varying.wait_before_next(1).expect("measured");
        // Alternating 40/60 ms: mean ≈ 50 ms, standard deviation ≈ 10 ms.
        assert!(varying + 8 * MS < steady && varying > 20 * MS, "steady {steady:?}, varying {varying:?}");

        let slow_decode = Pace::default();
        slow_decode.encoded(1, 30 * MS);
        slow_decode.prepared(40 * MS);
        assert_eq!(slow_decode.wait_before_next(1), None);
    }

    #[test]
    fn moving_average_forgets_an_old_value_within_tens_of_samples() {
        let mut average = None;
        Average::add(&mut average, 100 * MS);
        // Each sample keeps 0.8 of the old deviation: 0.8^40 ≈ 1e-4.
        for _ in 0..40 {
            Average::add(&mut average, 50 * MS);
        }
        let average = average.expect("samples added");
        assert!((average.mean - 0.050).abs() < 0.001, "{average:?}");
        assert!(average.variance.sqrt() < 0.001, "{average:?}");
    }
}
