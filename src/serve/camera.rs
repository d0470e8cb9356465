//! One camera in the service: its mailbox, its source under a supervisor that restarts it with
//! backoff when it fails or stalls, and the numbers the API and `/metrics` show.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::CameraConfig;
use super::frame::{join_by, lock, Mailbox, StopToken, Wake};
use super::metrics::{Histogram, CONTRAST};
use super::sources::{open_source, SourceEnd, SourceError};

/// The first wait before a failed source is restarted; doubled after each failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that lasted this long was healthy: the next failure starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// How long a stopped source may take to return before its thread is left to finish alone.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where a camera's source is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Started, no frame yet.
    Starting,
    /// Reading frames.
    Running,
    /// Failed or stalled; waiting to restart.
    Restarting(String),
    /// Its source has no more frames (standard input closed).
    Ended,
    /// Cannot run on this build or machine (restarting would not help).
    Failed(String),
    /// Configured with `enabled = false`.
    Disabled,
}

/// Counters of one camera (the mailbox keeps received/replaced/refused).
#[derive(Debug)]
pub struct CameraStats {
    /// Frames classified.
    pub processed: AtomicU64,
    /// Frames that could not be decoded or classified.
    pub failed: AtomicU64,
    /// Frames dropped because they waited longer than `max_frame_age`.
    pub stale: AtomicU64,
    /// Frames accepted.
    pub accepted: AtomicU64,
    /// Frames that abstained.
    pub abstained: AtomicU64,
    /// Source restarts (failures and stalls).
    pub restarts: AtomicU64,
    /// Contrast d(x) of the classified frames.
    pub contrast: Histogram,
    /// Shift alarms raised.
    pub drift_alarms: AtomicU64,
}

impl Default for CameraStats {
    fn default() -> Self {
        CameraStats {
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            abstained: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            contrast: Histogram::new(CONTRAST),
            drift_alarms: AtomicU64::new(0),
        }
    }
}

/// The newest decision of a camera, for `/api/cameras/<name>/latest[.jpg]`.
#[derive(Debug, Clone)]
pub struct Latest {
    /// The decision's JSON line.
    pub record: serde_json::Value,
    /// The frame.
    pub frame: super::frame::FramePayload,
}

/// How many recent decisions each camera keeps for the status page's chart: two minutes at
/// 1 fps, a few kilobytes per camera.
pub const HISTORY_LEN: usize = 120;

/// One decision in a camera's recent history.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HistoryPoint {
    /// When the decision was made, Unix milliseconds.
    pub t: u64,
    /// Its calibrated confidence.
    pub confidence: f64,
    /// CAC's contrast d(x) (`None` with another calibration method).
    pub contrast: Option<f64>,
}

/// The newest decisions of a camera, oldest first, at most `capacity` of them: kept on the
/// server so that a status page opened now shows the last minutes at once, and bounded so that
/// a service running for months holds no more than that.
#[derive(Debug)]
pub struct History {
    points: Mutex<VecDeque<HistoryPoint>>,
    capacity: usize,
}

impl History {
    /// An empty history of at most `capacity` points.
    pub fn new(capacity: usize) -> History {
        History { points: Mutex::new(VecDeque::with_capacity(capacity)), capacity }
    }

    /// Adds the newest point, forgetting the oldest beyond the capacity.
    pub fn push(&self, point: HistoryPoint) {
        if self.capacity == 0 {
            return;
        }
        let mut points = lock(&self.points);
        while points.len() >= self.capacity {
            points.pop_front();
        }
        points.push_back(point);
    }

    /// A copy of the points, oldest first.
    pub fn points(&self) -> Vec<HistoryPoint> {
        lock(&self.points).iter().copied().collect()
    }
}

/// A camera of the running service.
pub struct Camera {
    config: RwLock<CameraConfig>,
    /// The newest frame.
    pub mailbox: Arc<Mailbox>,
    /// Its counters.
    pub stats: CameraStats,
    /// Its newest decision.
    pub latest: Mutex<Option<Latest>>,
    /// Its recent decisions (the status page's chart).
    pub history: History,
    /// Its shift alarm, once a frame was classified with a drift baseline.
    pub drift: Mutex<Option<super::output::DriftStatus>>,
    phase: Arc<Mutex<Phase>>,
    stop: StopToken,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Camera {
    /// Creates the camera and, when enabled, starts its source under a supervisor.
    pub fn start(config: CameraConfig, wake: &Arc<Wake>, max_frame_bytes: usize) -> Arc<Camera> {
        let enabled = config.enabled;
        let camera = Arc::new(Camera {
            config: RwLock::new(config),
            mailbox: Arc::new(Mailbox::new(Arc::clone(wake))),
            stats: CameraStats::default(),
            latest: Mutex::new(None),
            history: History::new(HISTORY_LEN),
            drift: Mutex::new(None),
            phase: Arc::new(Mutex::new(if enabled { Phase::Starting } else { Phase::Disabled })),
            stop: StopToken::new(),
            supervisor: Mutex::new(None),
        });
        if enabled {
            let supervised = Arc::clone(&camera);
            let name = camera.config().name;
            let spawned =
                std::thread::Builder::new().name(format!("camera-{name}")).spawn(move || supervise(&supervised, max_frame_bytes));
            match spawned {
                Ok(handle) => *lock(&camera.supervisor) = Some(handle),
                Err(error) => camera.set_phase(Phase::Failed(format!("cannot start a thread: {error}"))),
            }
        }
        camera
    }

    /// Its configuration (a copy: reloads replace it).
    pub fn config(&self) -> CameraConfig {
        self.config.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Whether its source is a live feed ([`SourceSpec::is_live`](super::sources::SourceSpec::is_live)).
    pub fn is_live(&self) -> bool {
        self.config.read().unwrap_or_else(|poisoned| poisoned.into_inner()).source.is_live()
    }

    /// Applies settings that need no source restart (staleness, stall watchdog, debounce).
    pub fn update_config(&self, config: CameraConfig) {
        *self.config.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
    }

    /// Where its source is.
    pub fn phase(&self) -> Phase {
        let phase = lock(&self.phase).clone();
        // A watched folder runs from the moment it is watched (the supervisor notes it within
        // its next look; the API must not lag behind).
        if phase == Phase::Starting && self.mailbox.is_listening() {
            return Phase::Running;
        }
        phase
    }

    fn set_phase(&self, phase: Phase) {
        *lock(&self.phase) = phase;
    }

    /// How long ago its newest frame arrived (`None`: no frame yet).
    pub fn last_frame_age(&self, now: Instant) -> Option<Duration> {
        self.mailbox.last_received().map(|at| now.saturating_duration_since(at))
    }

    /// Whether it counts as live for `/readyz`: its source runs, and a frame came within its
    /// stall window (a camera without a stall watchdog only needs its source running).
    pub fn is_fresh(&self, now: Instant) -> bool {
        let config = self.config();
        if !config.enabled {
            return true;
        }
        match self.phase() {
            Phase::Running | Phase::Starting => {}
            _ => return false,
        }
        match config.stall_after {
            None => true,
            Some(window) => self.last_frame_age(now).is_some_and(|age| age <= window),
        }
    }

    /// Stops its source and waits (bounded) for the supervisor to end.
    pub fn shut_down(&self, deadline: Instant) {
        self.stop.stop();
        let handle = lock(&self.supervisor).take();
        if let Some(handle) = handle {
            if !join_by(handle, deadline) {
                tracing::warn!("camera {}: its source did not stop in time; left to finish", self.config().name);
            }
        }
    }

    /// Waits until a folder camera's folder is watched (other sources need no wait), its source
    /// failed, or `deadline`; returns whether it is listening.
    pub fn wait_listening(&self, deadline: Instant) -> bool {
        let config = self.config();
        // A folder's files wait on disk: only they are missed while the source is not up.
        if !config.enabled || config.source.is_live() {
            return true;
        }
        while !self.mailbox.is_listening() && Instant::now() < deadline {
            if matches!(self.phase(), Phase::Restarting(_) | Phase::Failed(_)) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.mailbox.is_listening()
    }

    /// Asks its source to stop, without waiting.
    pub fn request_stop(&self) {
        self.stop.stop();
    }
}

/// Runs the camera's source until the camera is stopped: restarts it with backoff after a
/// failure or a stall, and not after it ended (standard input closed).
fn supervise(camera: &Arc<Camera>, max_frame_bytes: usize) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if camera.stop.is_stopped() {
            return;
        }
        let config = camera.config();
        let run_started = Instant::now();
        let outcome = run_once(camera, &config, max_frame_bytes);
        let reason = match outcome {
            RunOutcome::Stopped => return,
            RunOutcome::Finished => {
                tracing::info!("camera {}: {} has no more frames", config.name, config.source);
                camera.set_phase(Phase::Ended);
                camera.mailbox.notify_waiters();
                return;
            }
            RunOutcome::Unsupported(reason) => {
                tracing::error!("camera {}: {reason}", config.name);
                camera.set_phase(Phase::Failed(reason));
                return;
            }
            RunOutcome::Failed(reason) => reason,
        };
        if run_started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        camera.stats.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("camera {}: {reason}; restarting its source in {} s", config.name, backoff.as_secs_f64());
        camera.set_phase(Phase::Restarting(reason));
        if !camera.stop.sleep(backoff) {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum RunOutcome {
    Stopped,
    Finished,
    Unsupported(String),
    Failed(String),
}

fn run_once(camera: &Arc<Camera>, config: &CameraConfig, max_frame_bytes: usize) -> RunOutcome {
    let mut source = match open_source(&config.source, &config.source_options(max_frame_bytes)) {
        Ok(source) => source,
        Err(SourceError::Unsupported(reason)) => return RunOutcome::Unsupported(reason),
        Err(error) => return RunOutcome::Failed(error.to_string()),
    };
    camera.mailbox.set_listening(false);
    let run_stop = StopToken::new();
    let (done_tx, done) = mpsc::channel();
    let mailbox = Arc::clone(&camera.mailbox);
    let source_stop = run_stop.clone();
    let spawned = std::thread::Builder::new().name(format!("source-{}", config.name)).spawn(move || {
        let result = source.run(&mailbox, &source_stop);
        let _ = done_tx.send(result);
    });
    if let Err(error) = spawned {
        return RunOutcome::Failed(format!("cannot start the source thread: {error}"));
    }
    let started = Instant::now();
    let frames_before = camera.mailbox.counters.received.load(Ordering::Relaxed);
    loop {
        match done.recv_timeout(StopToken::POLL) {
            Ok(result) => {
                return match result {
                    Ok(SourceEnd::Finished) => RunOutcome::Finished,
                    Ok(SourceEnd::Stopped) => RunOutcome::Stopped,
                    Err(SourceError::Unsupported(reason)) => RunOutcome::Unsupported(reason),
                    Err(error) => RunOutcome::Failed(error.to_string()),
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return RunOutcome::Failed("the source thread panicked".to_string()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if camera.stop.is_stopped() {
            run_stop.stop();
            return wait_for_stop(&done, RunOutcome::Stopped);
        }
        let delivered = camera.mailbox.counters.received.load(Ordering::Relaxed) > frames_before;
        // A watched folder runs before its first file; a stream once its first frame came.
        if (delivered || camera.mailbox.is_listening()) && camera.phase() != Phase::Running {
            camera.set_phase(Phase::Running);
        }
        // Frames of an earlier run do not count: a run that never delivers stalls from its start.
        let quiet_since = camera.mailbox.last_received().filter(|_| delivered).map_or(started, |at| at.max(started));
        if let Some(window) = camera.config().stall_after {
            if quiet_since.elapsed() > window {
                run_stop.stop();
                return wait_for_stop(&done, RunOutcome::Failed(format!("no frame for {:.0} s (stalled)", window.as_secs_f64())));
            }
        }
    }
}

/// Waits (bounded) for a stopped source to return; the outcome is `outcome` either way.
fn wait_for_stop(done: &mpsc::Receiver<Result<SourceEnd, SourceError>>, outcome: RunOutcome) -> RunOutcome {
    if done.recv_timeout(STOP_GRACE).is_err() {
        tracing::warn!("a source took over {} s to stop; its thread is left to finish alone", STOP_GRACE.as_secs());
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: u64) -> HistoryPoint {
        HistoryPoint { t, confidence: 0.5, contrast: Some(0.1) }
    }

    #[test]
    fn history_keeps_the_newest_points_and_never_grows_past_its_capacity() {
        let history = History::new(HISTORY_LEN);
        for t in 0..(HISTORY_LEN as u64 * 3 + 7) {
            history.push(point(t));
            assert!(history.points().len() <= HISTORY_LEN);
        }
        let points = history.points();
        assert_eq!(points.len(), HISTORY_LEN);
        assert_eq!(points.first().map(|p| p.t), Some(HISTORY_LEN as u64 * 2 + 7), "oldest first");
        assert_eq!(points.last().map(|p| p.t), Some(HISTORY_LEN as u64 * 3 + 6), "newest last");
        assert!(lock(&history.points).capacity() < HISTORY_LEN * 2, "the ring's allocation does not grow");
    }

    #[test]
    fn a_history_of_capacity_zero_stays_empty() {
        let history = History::new(0);
        history.push(point(1));
        assert!(history.points().is_empty());
    }
}
