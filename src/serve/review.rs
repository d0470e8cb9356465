//! The review ring: frames that abstained, saved with their decision for a person to label, in a
//! folder capped in size (the oldest are deleted first).
//!
//! Each frame is two files, `<unix-ms>-<camera>.<jpg|png>` and the same name with `.json` (the
//! JSON line of its decision), written atomically (a reader never sees half a file). The names
//! sort by time, so the ring is rebuilt from the folder at start and survives restarts.
//!
//! `labels.csv` beside them is the template for labelling them: one row per frame,
//! `path,label,predicted,confidence,camera`, the label left empty for a person to fill in. Once
//! filled (in a copy of the folder), it is the `--images`/`--fit-images` input of `eval`, which
//! skips rows still without a label (README § "The review loop"). It is rewritten atomically,
//! at most every [`LABELS_EVERY`] and when the service stops.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::config::ReviewConfig;
use super::frame::FramePayload;
use super::output::{DecisionEvent, DecisionSink};
use crate::fsio::write_atomic_bytes;
use crate::Decision;

/// The labelling template's name in the ring's folder.
pub const LABELS_FILE: &str = "labels.csv";
/// `labels.csv` is rewritten at most this often (and when the service stops).
pub const LABELS_EVERY: Duration = Duration::from_secs(10);

/// The review ring's sink.
pub struct ReviewRing {
    folder: PathBuf,
    max_bytes: u64,
    /// Saved frames, oldest first.
    entries: VecDeque<Entry>,
    total_bytes: u64,
    /// `labels.csv` no longer lists exactly the entries.
    labels_stale: bool,
    labels_written: Option<Instant>,
}

/// One saved frame.
struct Entry {
    stem: String,
    /// Bytes of its files.
    bytes: u64,
    /// `jpg` or `png`.
    extension: String,
    /// The label the model gave it, and its calibrated confidence.
    predicted: String,
    confidence: f64,
    camera: String,
}

impl ReviewRing {
    /// Opens (creating) the folder and counts what is already there.
    pub fn open(config: &ReviewConfig) -> io::Result<ReviewRing> {
        std::fs::create_dir_all(&config.folder).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: cannot create the review folder: {error}", config.folder.display()))
        })?;
        let mut entries: Vec<Entry> = Vec::new();
        for entry in std::fs::read_dir(&config.folder)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == LABELS_FILE {
                continue;
            }
            let Some((stem, extension)) = name.rsplit_once('.') else { continue };
            let size = entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            let index = match entries.iter().position(|known| known.stem == stem) {
                Some(index) => index,
                None => {
                    entries.push(Entry::unknown(stem));
                    entries.len() - 1
                }
            };
            let known = &mut entries[index];
            known.bytes += size;
            if extension == "json" {
                known.read_record(&entry.path());
            } else {
                known.extension = extension.to_string();
            }
        }
        entries.sort_by(|a, b| a.stem.cmp(&b.stem));
        let total_bytes = entries.iter().map(|entry| entry.bytes).sum();
        let mut ring = ReviewRing {
            folder: config.folder.clone(),
            max_bytes: config.max_bytes,
            entries: entries.into(),
            total_bytes,
            labels_stale: true,
            labels_written: None,
        };
        ring.trim();
        ring.write_labels()?;
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

    fn save(&mut self, frame: SavedFrame<'_>, image: &[u8], record: &[u8]) -> io::Result<()> {
        let (camera, millis) = (frame.camera, frame.millis);
        let mut stem = format!("{millis:014}-{camera}");
        // Two abstains of one camera in one millisecond: keep both.
        let mut suffix = 1;
        while self.entries.iter().any(|known| known.stem == stem) {
            stem = format!("{millis:014}-{camera}-{suffix}");
            suffix += 1;
        }
        write_atomic_bytes(&self.folder.join(format!("{stem}.{}", frame.extension)), image)?;
        write_atomic_bytes(&self.folder.join(format!("{stem}.json")), record)?;
        let bytes = (image.len() + record.len()) as u64;
        self.entries.push_back(Entry {
            stem,
            bytes,
            extension: frame.extension.to_string(),
            predicted: frame.predicted.to_string(),
            confidence: frame.confidence,
            camera: camera.to_string(),
        });
        self.total_bytes += bytes;
        self.labels_stale = true;
        self.trim();
        Ok(())
    }

    /// Deletes the oldest frames until the ring fits its cap.
    fn trim(&mut self) {
        while self.total_bytes > self.max_bytes {
            let Some(entry) = self.entries.pop_front() else { break };
            for extension in ["jpg", "png", "json"] {
                remove_if_there(&self.folder.join(format!("{}.{extension}", entry.stem)));
            }
            self.total_bytes = self.total_bytes.saturating_sub(entry.bytes);
            self.labels_stale = true;
        }
    }

    /// Rewrites `labels.csv` when it is stale.
    fn write_labels(&mut self) -> io::Result<()> {
        if !self.labels_stale {
            return Ok(());
        }
        let mut csv = String::from("path,label,predicted,confidence,camera\n");
        for entry in self.entries.iter().filter(|entry| !entry.extension.is_empty()) {
            csv.push_str(&format!(
                "{}.{},,{},{:.4},{}\n",
                entry.stem,
                entry.extension,
                csv_field(&entry.predicted),
                entry.confidence,
                csv_field(&entry.camera)
            ));
        }
        write_atomic_bytes(&self.folder.join(LABELS_FILE), csv.as_bytes())?;
        self.labels_stale = false;
        self.labels_written = Some(Instant::now());
        Ok(())
    }

    fn write_labels_now_and_then(&mut self) -> io::Result<()> {
        if self.labels_written.is_none_or(|written| written.elapsed() >= LABELS_EVERY) {
            self.write_labels()?;
        }
        Ok(())
    }
}

/// What is kept of a frame that abstained.
struct SavedFrame<'a> {
    camera: &'a str,
    millis: u128,
    extension: &'static str,
    predicted: &'a str,
    confidence: f64,
}

impl Entry {
    fn unknown(stem: &str) -> Entry {
        Entry {
            stem: stem.to_string(),
            bytes: 0,
            extension: String::new(),
            predicted: String::new(),
            confidence: 0.0,
            camera: String::new(),
        }
    }

    /// Takes the prediction from a saved JSON line (a damaged one leaves the fields empty).
    fn read_record(&mut self, path: &Path) {
        let record: Option<serde_json::Value> = std::fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if let Some(record) = record {
            self.predicted = record["label"].as_str().unwrap_or_default().to_string();
            self.confidence = record["confidence"].as_f64().unwrap_or_default();
            self.camera = record["camera"].as_str().unwrap_or_default().to_string();
        }
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (class names may).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
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
            return self.write_labels_now_and_then();
        }
        let Some((image, extension)) = frame_file(&event.frame.payload) else {
            return Err(io::Error::other("the frame could not be encoded for the review ring"));
        };
        let millis = event.frame.captured_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let mut record = serde_json::to_vec_pretty(event.record).map_err(io::Error::other)?;
        record.push(b'\n');
        let prediction = event.record.prediction;
        let frame = SavedFrame {
            camera: event.camera,
            millis,
            extension,
            predicted: &prediction.label,
            confidence: prediction.confidence,
        };
        self.save(frame, &image, &record)?;
        self.write_labels_now_and_then()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_labels()
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
            ring.save(frame("door", 1_000 + millis, "cat"), &[0u8; 100], &[b'x'; 10]).expect("saved");
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
                "00000000001009-door.jpg", "00000000001009-door.json", "labels.csv"
            ]
        );
        let reopened = ReviewRing::open(&ReviewConfig { max_bytes: 110, ..config }).expect("reopens");
        assert_eq!((reopened.len(), reopened.total_bytes()), (1, 110));
    }

    fn frame<'a>(camera: &'a str, millis: u128, predicted: &'a str) -> SavedFrame<'a> {
        SavedFrame { camera, millis, extension: "jpg", predicted, confidence: 0.4321 }
    }

    #[test]
    fn labels_csv_lists_the_frames_in_the_ring_with_an_empty_label_to_fill_in() {
        let folder = tempfile::tempdir().expect("tempdir");
        let config = ReviewConfig { folder: folder.path().to_path_buf(), max_bytes: 2 * 170 };
        let mut ring = ReviewRing::open(&config).expect("opens");
        let record = |label: &str| format!("{{\"camera\":\"door\",\"label\":\"{label}\",\"confidence\":0.4321}}").into_bytes();
        for (millis, label) in [(1u128, "cat"), (2, "red, round"), (3, "dog")] {
            ring.save(frame("door", millis, label), &[0u8; 100], &record(label)).expect("saved");
        }
        ring.flush().expect("flush writes labels.csv");
        let expected = "path,label,predicted,confidence,camera\n\
                        00000000000002-door.jpg,,\"red, round\",0.4321,door\n\
                        00000000000003-door.jpg,,dog,0.4321,door\n";
        assert_eq!(std::fs::read_to_string(folder.path().join(LABELS_FILE)).expect("labels.csv"), expected);
        // Reopened (a restart), the template is rebuilt from the saved JSON lines.
        std::fs::remove_file(folder.path().join(LABELS_FILE)).expect("remove");
        let _reopened = ReviewRing::open(&config).expect("reopens");
        assert_eq!(std::fs::read_to_string(folder.path().join(LABELS_FILE)).expect("labels.csv"), expected);
    }
}
