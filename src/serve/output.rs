//! Where each decision goes: JSON lines on stdout or in a file (reopened on SIGHUP, for
//! logrotate), and the review ring of frames that abstained (`review`). Further sinks (MQTT)
//! implement [`DecisionSink`].

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::config::JsonLinesTarget;
use super::frame::Frame;
use crate::Prediction;

/// One classified frame: a JSON line (docs/FORMATS.md §8).
#[derive(Debug, Clone, Serialize)]
pub struct FrameRecord<'a> {
    /// The camera's name.
    pub camera: &'a str,
    /// When the frame was captured (RFC 3339, UTC, milliseconds).
    pub captured_at: String,
    /// How old the frame was when its decision was made, in milliseconds.
    pub frame_age_ms: f64,
    /// The prediction: label, base, confidence, uncalibrated_confidence, decision, weight,
    /// contrast and top_k.
    #[serde(flatten)]
    pub prediction: &'a Prediction,
    /// The threshold the decision was made against.
    pub threshold: f64,
    /// The execution provider that ran the encoders.
    pub device: &'a str,
    /// The image encoders' precision: "fp32" or "int8".
    pub precision: &'a str,
    /// The camera's published (debounced) state after this frame.
    pub state: Option<&'a str>,
    /// Whether this frame changed it.
    pub state_changed: bool,
    /// The camera's shift alarm after this frame, when the cache has a drift baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftStatus>,
}

/// A camera's shift alarm (docs/SERVE.md § Shift alarm).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DriftStatus {
    /// The PSI of the window of recent d(x) against the baseline; `None` until the window is full.
    pub score: Option<f64>,
    /// Whether the alarm is raised.
    pub alarm: bool,
    /// Whether this frame raised or cleared it.
    pub alarm_changed: bool,
    /// Frames in the window, and its size.
    pub frames: usize,
    /// The window's size.
    pub window: usize,
}

/// A frame that could not be classified: a JSON line too, so that consumers see the gap.
#[derive(Debug, Clone, Serialize)]
pub struct FailedFrameRecord<'a> {
    /// The camera's name.
    pub camera: &'a str,
    /// When the frame was captured.
    pub captured_at: String,
    /// What went wrong.
    pub error: String,
}

/// A decision, as every sink receives it.
pub struct DecisionEvent<'a> {
    /// The camera's name.
    pub camera: &'a str,
    /// The frame.
    pub frame: &'a Frame,
    /// The record (also the JSON line).
    pub record: &'a FrameRecord<'a>,
}

/// Something that receives every decision (the JSON lines, the review ring, an MQTT client).
pub trait DecisionSink: Send {
    /// Receives one decision. An error is logged and counted; the service goes on.
    fn decision(&mut self, event: &DecisionEvent<'_>) -> io::Result<()>;
    /// Receives one frame that failed.
    fn failure(&mut self, _record: &FailedFrameRecord<'_>) -> io::Result<()> {
        Ok(())
    }
    /// Reopens files (SIGHUP), flushes buffers.
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Flushes what is buffered (shutdown).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// JSON lines on stdout or in a file.
pub struct JsonLines {
    target: JsonLinesTarget,
    out: Option<Box<dyn Write + Send>>,
}

impl JsonLines {
    /// Opens `target` (a file is created, or appended to).
    pub fn open(target: &JsonLinesTarget) -> io::Result<JsonLines> {
        let out = open_target(target)?;
        Ok(JsonLines { target: target.clone(), out })
    }

    /// The target.
    pub fn target(&self) -> &JsonLinesTarget {
        &self.target
    }

    fn write_line(&mut self, record: &impl Serialize) -> io::Result<()> {
        let Some(out) = self.out.as_mut() else { return Ok(()) };
        crate::report::write_json_line(out, record)?;
        // One line per frame at a few frames per second: flushing each keeps `tail -f` and
        // the journal current, and a crash loses nothing written.
        out.flush()
    }
}

fn open_target(target: &JsonLinesTarget) -> io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match target {
        JsonLinesTarget::Stdout => Some(Box::new(io::stdout())),
        JsonLinesTarget::Off => None,
        JsonLinesTarget::File(path) => Some(Box::new(BufWriter::new(open_append(path)?))),
    })
}

fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: cannot open for appending: {error}", path.display())))
}

impl DecisionSink for JsonLines {
    fn decision(&mut self, event: &DecisionEvent<'_>) -> io::Result<()> {
        self.write_line(event.record)
    }

    fn failure(&mut self, record: &FailedFrameRecord<'_>) -> io::Result<()> {
        self.write_line(record)
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            out.flush()?;
        }
        if matches!(self.target, JsonLinesTarget::File(_)) {
            // The old file was renamed by logrotate; new lines go to a new file at the path.
            self.out = open_target(&self.target)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

/// `time` as RFC 3339 in UTC with milliseconds (`2026-12-04T12:00:00.123Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        // Checked against `date -u -d @… +%FT%T`.
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_250, "2000-02-29T00:00:00.250Z"),
            (1_796_385_600_123, "2026-12-04T12:00:00.123Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        ];
        for (millis, expected) in cases {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(millis)), expected);
        }
    }
}
