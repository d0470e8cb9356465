//! The review ring: frames that abstained, saved with their decision for a person to label, in a
//! folder capped in size (the oldest are deleted first).
//!
//! Each frame is two files, `<unix-ms>-<camera>.<jpg|png>` and the same name with `.json` (the
//! JSON line of its decision), written atomically (a reader never sees half a file). The names
//! sort by time, so the ring is rebuilt from the folder at start and survives restarts.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use super::config::ReviewConfig;
use super::frame::FramePayload;
use super::output::{DecisionEvent, DecisionSink};
use crate::fsio::write_atomic_bytes;
use crate::Decision;

/// The review ring's sink.
pub struct ReviewRing {
    folder: PathBuf,
    max_bytes: u64,
    /// Saved frames, oldest first: (stem, bytes of both files).
    entries: VecDeque<(String, u64)>,
    total_bytes: u64,
}

impl ReviewRing {
    /// Opens (creating) the folder and counts what is already there.
    pub fn open(config: &ReviewConfig) -> io::Result<ReviewRing> {
        std::fs::create_dir_all(&config.folder).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: cannot create the review folder: {error}", config.folder.display()))
        })?;
        let mut stems: Vec<(String, u64)> = Vec::new();
        for entry in std::fs::read_dir(&config.folder)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let Some((stem, _)) = name.rsplit_once('.') else { continue };
            let size = entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            match stems.iter_mut().find(|(known, _)| known == stem) {
                Some((_, bytes)) => *bytes += size,
                None => stems.push((stem.to_string(), size)),
            }
        }
        stems.sort();
        let total_bytes = stems.iter().map(|(_, bytes)| bytes).sum();
        let mut ring =
            ReviewRing { folder: config.folder.clone(), max_bytes: config.max_bytes, entries: stems.into(), total_bytes };
        ring.trim();
        Ok(ring)
    }

    /// Bytes held.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn save(&mut self, camera: &str, millis: u128, image: &[u8], extension: &str, record: &[u8]) -> io::Result<()> {
        let mut stem = format!("{millis:014}-{camera}");
        // Two abstains of one camera in one millisecond: keep both.
        let mut suffix = 1;
        while self.entries.iter().any(|(known, _)| *known == stem) {
            stem = format!("{millis:014}-{camera}-{suffix}");
            suffix += 1;
        }
        write_atomic_bytes(&self.folder.join(format!("{stem}.{extension}")), image)?;
        write_atomic_bytes(&self.folder.join(format!("{stem}.json")), record)?;
        let bytes = (image.len() + record.len()) as u64;
        self.entries.push_back((stem, bytes));
        self.total_bytes += bytes;
        self.trim();
        Ok(())
    }

    /// Deletes the oldest frames until the ring fits its cap.
    fn trim(&mut self) {
        while self.total_bytes > self.max_bytes {
            let Some((stem, bytes)) = self.entries.pop_front() else { break };
            for extension in ["jpg", "png", "json"] {
                remove_if_there(&self.folder.join(format!("{stem}.{extension}")));
            }
            self.total_bytes = self.total_bytes.saturating_sub(bytes);
        }
    }
}

fn remove_if_there(path: &Path) {
    if let Err(error) = std::fs::remove_file(path) {
        if error.kind() != io::ErrorKind::NotFound {
            tracing::warn!("{}: cannot delete from the review ring: {error}", path.display());
        }
    }
}

/// The frame as a file: the camera's own bytes, or pixels encoded as PNG.
pub(crate) fn frame_file(payload: &FramePayload) -> Option<(Arc<[u8]>, &'static str)> {
    match payload {
        FramePayload::Encoded(bytes) => {
            let kind = if bytes.starts_with(b"\x89PNG") { "png" } else { "jpg" };
            Some((Arc::clone(bytes), kind))
        }
        FramePayload::Rgb(image) => {
            let mut png = Vec::new();
            image.write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png).ok()?;
            Some((png.into(), "png"))
        }
    }
}

impl DecisionSink for ReviewRing {
    fn decision(&mut self, event: &DecisionEvent<'_>) -> io::Result<()> {
        if event.record.prediction.decision != Decision::Abstain {
            return Ok(());
        }
        let Some((image, extension)) = frame_file(&event.frame.payload) else {
            return Err(io::Error::other("the frame could not be encoded for the review ring"));
        };
        let millis = event.frame.captured_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let mut record = serde_json::to_vec_pretty(event.record).map_err(io::Error::other)?;
        record.push(b'\n');
        self.save(event.camera, millis, &image, extension, &record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_frames_within_its_cap_across_restarts() {
        let folder = tempfile::tempdir().expect("tempdir");
        let config = ReviewConfig { folder: folder.path().to_path_buf(), max_bytes: 3 * 110 };
        let mut ring = ReviewRing::open(&config).expect("opens");
        for millis in 0..10u128 {
            ring.save("door", 1_000 + millis, &[0u8; 100], "jpg", &[b'x'; 10]).expect("saved");
            assert!(ring.total_bytes() <= config.max_bytes);
        }
        assert_eq!(ring.len(), 3);
        let mut names: Vec<String> = std::fs::read_dir(folder.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "00000000001007-door.jpg", "00000000001007-door.json", "00000000001008-door.jpg", "00000000001008-door.json",
                "00000000001009-door.jpg", "00000000001009-door.json"
            ]
        );
        let reopened = ReviewRing::open(&ReviewConfig { max_bytes: 110, ..config }).expect("reopens");
        assert_eq!((reopened.len(), reopened.total_bytes()), (1, 110));
    }
}
