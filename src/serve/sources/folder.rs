//! A watched folder: camera software drops JPEG/PNG files into it; each is classified once it
//! is complete.
//!
//! inotify (through `notify`) reports close-after-write and moved-in files at once; a file that
//! was only created or modified (a writer that keeps it open, a network share) is looked at
//! again until it is complete. A file that is still being written is never classified half-way
//! and never lost: a JPEG must end with its EOI marker and a PNG with its IEND chunk, and until
//! then it is retried; other formats are taken once no write came for [`SETTLE`]. Files whose
//! names start with `.` (the temporary names of rsync and of atomic writers) are left alone.
//!
//! Files wait on disk, not in memory: the next one is delivered when the scheduler has taken the
//! previous one ([`Mailbox::put_when_free`]), so every file gets its turn and a burst costs no
//! memory; one that waited longer than the camera's staleness limit is dropped as stale there.
//! Only files that appear after the folder is watched are read; the service says it is ready
//! (`READY=1`, the API) only once its folders are watched. The service never deletes or moves
//! them: rotating the folder is the camera software's (or a tmpfiles.d rule's) job.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};

use super::{FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::preprocess::has_image_extension;
use crate::serve::frame::{Frame, FramePayload, Mailbox, StopToken};

/// How long a file must go without a write before a format whose end cannot be recognised is
/// taken, and how long an incomplete JPEG/PNG is retried before it is given up (and counted).
pub const SETTLE: Duration = Duration::from_secs(5);
/// Delay between looks at a file that is not yet complete.
const RETRY: Duration = Duration::from_millis(100);
/// How often the folder itself is checked to still exist.
const FOLDER_CHECK: Duration = Duration::from_secs(1);

/// The reader of one watched folder.
pub struct FolderSource {
    folder: PathBuf,
    max_frame_bytes: usize,
}

impl FolderSource {
    /// Watches `folder`.
    pub fn new(folder: PathBuf, options: &SourceOptions) -> FolderSource {
        FolderSource { folder, max_frame_bytes: options.max_frame_bytes }
    }
}

/// A file seen in the folder and not yet delivered.
struct Pending {
    path: PathBuf,
    /// When to look at it next.
    due: Instant,
    /// The last time an event said it was written to.
    last_write: Instant,
}

impl FrameSource for FolderSource {
    fn run(&mut self, mailbox: &Mailbox, stop: &StopToken) -> Result<SourceEnd, SourceError> {
        let folder = &self.folder;
        if !folder.is_dir() {
            return Err(SourceError::Protocol(format!(
                "{}: no such folder; create it or fix the camera's source",
                folder.display()
            )));
        }
        let (events_tx, events) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver is gone only when this run ended.
            let _ = events_tx.send(event);
        })
        .map_err(|error| watch_error(folder, error))?;
        watcher.watch(folder, RecursiveMode::NonRecursive).map_err(|error| watch_error(folder, error))?;
        mailbox.set_listening(true);
        let mut pending: Vec<Pending> = Vec::new();
        let mut folder_checked = Instant::now();
        loop {
            if stop.is_stopped() {
                return Ok(SourceEnd::Stopped);
            }
            let wait = pending
                .iter()
                .map(|file| file.due)
                .min()
                .map_or(StopToken::POLL, |due| due.saturating_duration_since(Instant::now()).min(StopToken::POLL));
            match events.recv_timeout(wait) {
                Ok(Ok(event)) => note_event(&mut pending, &event),
                Ok(Err(error)) => return Err(watch_error(folder, error)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(SourceError::Protocol(format!("{}: the folder watcher stopped", folder.display())))
                }
            }
            if folder_checked.elapsed() >= FOLDER_CHECK {
                folder_checked = Instant::now();
                if !folder.is_dir() {
                    return Err(SourceError::Protocol(format!("{}: the folder disappeared", folder.display())));
                }
            }
            if !self.deliver_due(&mut pending, mailbox, stop) {
                return Ok(SourceEnd::Stopped);
            }
        }
    }
}

impl FolderSource {
    /// Looks at each file that is due; delivers the complete ones in the order they were seen.
    /// Returns `false` when stopped while waiting for the mailbox.
    fn deliver_due(&self, pending: &mut Vec<Pending>, mailbox: &Mailbox, stop: &StopToken) -> bool {
        let mut index = 0;
        while index < pending.len() {
            let now = Instant::now();
            if pending[index].due > now {
                index += 1;
                continue;
            }
            match self.look_at(&pending[index], now) {
                Look::Complete(bytes) => {
                    let file = pending.remove(index);
                    tracing::debug!("{}: complete, {} bytes", file.path.display(), bytes.len());
                    let frame = Frame {
                        payload: FramePayload::Encoded(bytes.into()),
                        captured_at: SystemTime::now(),
                        received_at: Instant::now(),
                    };
                    if !mailbox.put_when_free(frame, stop) {
                        return false;
                    }
                }
                Look::NotYet => {
                    pending[index].due = now + RETRY;
                    index += 1;
                }
                Look::Gone => {
                    pending.remove(index);
                }
                Look::Refused(reason) => {
                    let file = pending.remove(index);
                    tracing::warn!("{}: {reason}; skipped", file.path.display());
                    mailbox.refuse();
                }
            }
        }
        true
    }

    fn look_at(&self, file: &Pending, now: Instant) -> Look {
        let metadata = match std::fs::metadata(&file.path) {
            Ok(metadata) => metadata,
            // Deleted or renamed away before it was read: nothing to classify.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Look::Gone,
            Err(error) => return Look::Refused(format!("cannot read it: {error}")),
        };
        if !metadata.is_file() {
            return Look::Gone;
        }
        if metadata.len() > self.max_frame_bytes as u64 {
            return Look::Refused(format!("{} bytes, over the {}-byte frame limit", metadata.len(), self.max_frame_bytes));
        }
        let settled = now.saturating_duration_since(file.last_write) >= SETTLE;
        let bytes = match std::fs::read(&file.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Look::Gone,
            Err(error) => return Look::Refused(format!("cannot read it: {error}")),
        };
        match completeness(&bytes) {
            Completeness::Complete => Look::Complete(bytes),
            Completeness::Unknown if settled => Look::Complete(bytes),
            Completeness::Incomplete if settled => {
                Look::Refused(format!("still incomplete {} s after its last write (a truncated image?)", SETTLE.as_secs()))
            }
            Completeness::Incomplete | Completeness::Unknown => Look::NotYet,
        }
    }
}

enum Look {
    Complete(Vec<u8>),
    NotYet,
    Gone,
    Refused(String),
}

/// Records what an event says about the folder's files.
fn note_event(pending: &mut Vec<Pending>, event: &notify::Event) {
    // Closed after writing, or moved in whole: look now. Created or written to: look soon, and
    // again until complete (a close-write may follow, or never come on a network share).
    let finished = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Modify(ModifyKind::Name(RenameMode::To))
    );
    let written = matches!(
        event.kind,
        EventKind::Create(CreateKind::File | CreateKind::Any) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any)
    );
    if !finished && !written {
        return;
    }
    let now = Instant::now();
    for path in &event.paths {
        if !is_candidate(path) {
            continue;
        }
        let due = if finished { now } else { now + RETRY };
        match pending.iter_mut().find(|file| &file.path == path) {
            Some(file) => {
                file.due = due;
                file.last_write = now;
            }
            None => pending.push(Pending { path: path.clone(), due, last_write: now }),
        }
    }
}

/// An image file by its extension, not hidden (a temporary name).
fn is_candidate(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|name| name.to_str()).is_none_or(|name| name.starts_with('.'));
    !hidden && has_image_extension(path)
}

/// Whether an image file's bytes are all there, as far as its format tells.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completeness {
    Complete,
    Incomplete,
    /// A format whose end this check does not recognise (BMP, WebP, …).
    Unknown,
}

/// JPEG: starts with SOI and ends with EOI (trailing zero padding, which some cameras add, is
/// allowed). PNG: ends with the IEND chunk.
pub(crate) fn completeness(bytes: &[u8]) -> Completeness {
    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    const PNG_END: &[u8] = b"\0\0\0\0IEND\xaeB`\x82";
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let end = bytes.iter().rposition(|&byte| byte != 0).map_or(0, |last| last + 1);
        return if end >= 4 && bytes[..end].ends_with(&[0xFF, 0xD9]) { Completeness::Complete } else { Completeness::Incomplete };
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return if bytes.ends_with(PNG_END) { Completeness::Complete } else { Completeness::Incomplete };
    }
    if bytes.len() < 8 || PNG_SIGNATURE.starts_with(bytes) {
        // Too short to tell yet (a writer that has written nothing or a few bytes).
        return Completeness::Incomplete;
    }
    Completeness::Unknown
}

fn watch_error(folder: &Path, error: notify::Error) -> SourceError {
    let hint = match &error.kind {
        notify::ErrorKind::MaxFilesWatch => "; raise fs.inotify.max_user_watches",
        notify::ErrorKind::PathNotFound => "; create the folder",
        _ => "",
    };
    SourceError::Protocol(format!("{}: cannot watch the folder: {error}{hint}", folder.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_follows_each_format_s_end_marker() {
        assert_eq!(completeness(&[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 0xFF, 0xD9]), Completeness::Complete);
        assert_eq!(completeness(&[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 0xFF, 0xD9, 0, 0]), Completeness::Complete);
        assert_eq!(completeness(&[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4]), Completeness::Incomplete);
        assert_eq!(completeness(&[0xFF, 0xD8]), Completeness::Incomplete);
        assert_eq!(completeness(b""), Completeness::Incomplete);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        assert_eq!(completeness(&png), Completeness::Incomplete);
        png.extend_from_slice(b"\0\0\0\0IEND\xaeB`\x82");
        assert_eq!(completeness(&png), Completeness::Complete);
        assert_eq!(completeness(b"BM\x36\0\0\0\0\0\0\0"), Completeness::Unknown);
    }

    #[test]
    fn hidden_and_non_image_files_are_not_candidates() {
        assert!(is_candidate(Path::new("/spool/cam/frame-001.jpg")));
        assert!(!is_candidate(Path::new("/spool/cam/.frame-001.jpg")));
        assert!(!is_candidate(Path::new("/spool/cam/frame-001.jpg.part")));
        assert!(!is_candidate(Path::new("/spool/cam/notes.txt")));
    }
}
