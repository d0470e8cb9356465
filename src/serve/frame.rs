//! Frames, the one-slot mailbox each camera has, and the stop token its source obeys.
//!
//! A source thread reads its camera as fast as the camera sends (so no buffer anywhere builds up
//! latency) and puts each frame into its camera's [`Mailbox`], replacing the one there. The
//! scheduler takes from the mailboxes when it is ready for the next batch: whatever was
//! replaced in between is counted as dropped, never queued.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;

/// What a source delivers: the camera's own encoded bytes (decoded only if the scheduler takes
/// the frame), or pixels a source had to convert itself (V4L2 YUYV).
#[derive(Debug, Clone)]
pub enum FramePayload {
    /// A complete JPEG or PNG file's bytes.
    Encoded(Arc<[u8]>),
    /// Decoded RGB pixels.
    Rgb(Arc<RgbImage>),
}

/// One frame of one camera.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The pixels, encoded or not.
    pub payload: FramePayload,
    /// When the frame was captured, as far as the source knows (else when it arrived): the frame
    /// age at decision is measured from here.
    pub captured_at: SystemTime,
    /// When the frame arrived (monotonic): staleness is measured from here.
    pub received_at: Instant,
}

impl Frame {
    /// A frame of encoded bytes that arrived now.
    pub fn encoded(bytes: impl Into<Arc<[u8]>>) -> Frame {
        Frame { payload: FramePayload::Encoded(bytes.into()), captured_at: SystemTime::now(), received_at: Instant::now() }
    }

    /// A frame of pixels that arrived now.
    pub fn rgb(image: RgbImage) -> Frame {
        Frame { payload: FramePayload::Rgb(Arc::new(image)), captured_at: SystemTime::now(), received_at: Instant::now() }
    }

    /// How long ago the frame arrived.
    pub fn waited(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.received_at)
    }
}

/// Wakes the scheduler when any camera's mailbox receives a frame (or something else changes:
/// a stop, a reload). One per service, shared by every mailbox, so the scheduler waits on one
/// condition variable instead of polling N cameras.
#[derive(Debug, Default)]
pub struct Wake {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Wake {
    /// Tells the waiting scheduler to look again.
    pub fn notify(&self) {
        let mut generation = lock(&self.generation);
        *generation = generation.wrapping_add(1);
        self.changed.notify_all();
    }

    /// The current generation, to pass to [`Wake::wait_past`].
    pub fn generation(&self) -> u64 {
        *lock(&self.generation)
    }

    /// Waits until a notify after `seen` was sent, or `timeout` passed.
    pub fn wait_past(&self, seen: u64, timeout: Duration) {
        let generation = lock(&self.generation);
        // A poisoned lock only means another thread panicked while holding it; the counter is
        // still a counter.
        let _ = self.changed.wait_timeout_while(generation, timeout, |generation| *generation == seen);
    }
}

/// Counters a mailbox keeps; read by `/metrics`.
#[derive(Debug, Default)]
pub struct MailboxCounters {
    /// Frames the source delivered.
    pub received: AtomicU64,
    /// Frames replaced in the mailbox by a newer one before the scheduler took them.
    pub replaced: AtomicU64,
    /// Frames the source refused before delivery: larger than the limit, incomplete, or not
    /// an image.
    pub refused: AtomicU64,
}

/// A camera's one-slot mailbox: the newest frame, never a queue.
#[derive(Debug)]
pub struct Mailbox {
    slot: Mutex<Option<Frame>>,
    taken: Condvar,
    wake: Arc<Wake>,
    /// How many frames came and went.
    pub counters: MailboxCounters,
    last_received: Mutex<Option<Instant>>,
    /// Set by a source once whatever comes from then on reaches the mailbox (a folder: once it
    /// is watched); the service says it is ready only after its folders are.
    listening: AtomicBool,
}

impl Mailbox {
    /// An empty mailbox that notifies `wake` on every delivery.
    pub fn new(wake: Arc<Wake>) -> Mailbox {
        Mailbox {
            slot: Mutex::new(None),
            taken: Condvar::new(),
            wake,
            counters: MailboxCounters::default(),
            last_received: Mutex::new(None),
            listening: AtomicBool::new(false),
        }
    }

    /// The source says whether it is listening (see [`Mailbox::is_listening`]).
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
    }

    /// Whether the source is listening: a folder is watched, so a file dropped from now on is
    /// classified.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Puts `frame` in the slot, replacing (and counting) any frame still there.
    pub fn put(&self, frame: Frame) {
        let received_at = frame.received_at;
        if lock(&self.slot).replace(frame).is_some() {
            self.counters.replaced.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_received) = Some(received_at);
        self.wake.notify();
    }

    /// Puts `frame` in the slot once the scheduler has taken the previous one, or `stop` is set
    /// (then the frame is not delivered and `false` returned). For sources whose backlog lives
    /// on disk (a watched folder): every file gets its turn, and memory holds one frame.
    pub fn put_when_free(&self, frame: Frame, stop: &StopToken) -> bool {
        let mut slot = lock(&self.slot);
        while slot.is_some() {
            if stop.is_stopped() {
                return false;
            }
            slot = match self.taken.wait_timeout(slot, StopToken::POLL) {
                Ok((slot, _)) => slot,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        if stop.is_stopped() {
            return false;
        }
        *lock(&self.last_received) = Some(frame.received_at);
        *slot = Some(frame);
        drop(slot);
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.wake.notify();
        true
    }

    /// Takes the frame in the slot, if any.
    pub fn take(&self) -> Option<Frame> {
        let frame = lock(&self.slot).take();
        if frame.is_some() {
            self.taken.notify_all();
        }
        frame
    }

    /// Whether a frame is waiting.
    pub fn is_full(&self) -> bool {
        lock(&self.slot).is_some()
    }

    /// Wakes the scheduler without a frame (the camera's source ended, so the service may be
    /// done).
    pub fn notify_waiters(&self) {
        self.wake.notify();
    }

    /// Counts a frame the source refused (see [`MailboxCounters::refused`]).
    pub fn refuse(&self) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// When the newest frame arrived (monotonic), if one ever did.
    pub fn last_received(&self) -> Option<Instant> {
        *lock(&self.last_received)
    }
}

/// Cooperative cancellation of one source run: set by the supervisor on shutdown, on a stall or
/// when the camera is removed. Every blocking read of a source waits at most [`StopToken::POLL`]
/// before it looks at the token again.
#[derive(Debug, Clone, Default)]
pub struct StopToken(Arc<AtomicBool>);

impl StopToken {
    /// How long a source may block before it checks the token.
    pub const POLL: Duration = Duration::from_millis(200);

    /// A token not yet stopped.
    pub fn new() -> StopToken {
        StopToken::default()
    }

    /// Asks the source to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the source should stop.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration`, waking early (returning `false`) once the token is stopped.
    pub fn sleep(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        loop {
            if self.is_stopped() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Self::POLL));
        }
    }
}

/// Locks a mutex whether or not another thread panicked while holding it: every value guarded
/// here stays consistent at each statement, so the data is still good.
/// Joins `handle` when its thread ends by `deadline`; false when it is still running then (it is
/// left to finish: a stop must never hang on one thread).
pub(crate) fn join_by(handle: std::thread::JoinHandle<()>, deadline: Instant) -> bool {
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !handle.is_finished() {
        return false;
    }
    let _ = handle.join();
    true
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_frame_wins_and_replacements_are_counted() {
        let mailbox = Mailbox::new(Arc::new(Wake::default()));
        for byte in 0..5u8 {
            mailbox.put(Frame::encoded(vec![byte]));
        }
        let frame = mailbox.take().expect("a frame");
        assert!(matches!(frame.payload, FramePayload::Encoded(ref bytes) if bytes[..] == [4]));
        assert_eq!(mailbox.counters.received.load(Ordering::Relaxed), 5);
        assert_eq!(mailbox.counters.replaced.load(Ordering::Relaxed), 4);
        assert!(mailbox.take().is_none());
    }

    #[test]
    fn put_when_free_waits_for_the_scheduler_and_gives_up_on_stop() {
        let mailbox = Arc::new(Mailbox::new(Arc::new(Wake::default())));
        let stop = StopToken::new();
        assert!(mailbox.put_when_free(Frame::encoded(vec![1]), &stop));
        let taker = {
            let mailbox = Arc::clone(&mailbox);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                mailbox.take()
            })
        };
        assert!(mailbox.put_when_free(Frame::encoded(vec![2]), &stop));
        assert!(taker.join().expect("taker").is_some());
        assert_eq!(mailbox.counters.replaced.load(Ordering::Relaxed), 0);
        stop.stop();
        assert!(!mailbox.put_when_free(Frame::encoded(vec![3]), &stop));
    }
}
