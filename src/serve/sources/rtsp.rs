//! RTSP cameras, decoded by a supervised child process — `ffmpeg` (default) or
//! `gst-launch-1.0` from the distribution, the model Frigate and Edge Impulse use — that writes
//! JPEG frames at the camera's fps to its stdout, which is read like any JPEG stream.
//!
//! Why a child and not a Rust RTSP client: H.264/H.265 need a decoder anyway (the box's
//! ffmpeg/GStreamer has the hardware ones), and a crashing decoder takes down only itself.
//! MJPEG over RTSP goes through the same child; the async `retina` crate would add an async
//! runtime for that one case.
//!
//! The child: stdin closed, stderr kept (its last lines explain an exit), killed with SIGKILL
//! if the service dies (`PR_SET_PDEATHSIG`), and killed and reaped whenever the source stops,
//! fails or is dropped, so no decoder outlives its camera and no zombie stays behind.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::stream::{pump, FrameSplitter, PolledFd};
use super::{redact, FrameSource, RtspDecoder, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{lock, Mailbox, StopToken};

/// Lines of the child's stderr kept for the error message.
const STDERR_LINES: usize = 8;

/// The reader of one RTSP camera.
pub struct RtspSource {
    url: String,
    options: SourceOptions,
}

impl RtspSource {
    /// Reads the camera at `url` through `options.rtsp_decoder`.
    pub fn new(url: &str, options: &SourceOptions) -> RtspSource {
        RtspSource { url: url.to_string(), options: options.clone() }
    }
}

/// The decoder command line for `url` at `fps` frames per second.
pub fn decoder_command(decoder: RtspDecoder, url: &str, fps: f64) -> Command {
    match decoder {
        RtspDecoder::Ffmpeg => {
            let mut command = Command::new("ffmpeg");
            command.args([
                "-nostdin", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp", "-fflags", "nobuffer", "-flags",
                "low_delay",
            ]);
            command.args(["-i", url, "-an", "-vf", &format!("fps={fps}"), "-f", "image2pipe", "-c:v", "mjpeg", "-q:v", "3", "-"]);
            command
        }
        RtspDecoder::Gstreamer => {
            // The frame rate as a fraction with a denominator of 1000 (0.5 fps → 500/1000).
            let numerator = (fps * 1000.0).round().max(1.0) as u64;
            let mut command = Command::new("gst-launch-1.0");
            command.args([
                "-q",
                "rtspsrc",
                &format!("location={url}"),
                "latency=0",
                "protocols=tcp",
                "!",
                "decodebin",
                "!",
                "videoconvert",
                "!",
            ]);
            command.args([
                "videorate",
                "drop-only=true",
                "!",
                &format!("video/x-raw,framerate={numerator}/1000"),
                "!",
                "jpegenc",
                "!",
                "fdsink",
                "fd=1",
            ]);
            command
        }
    }
}

fn package_of(decoder: RtspDecoder) -> &'static str {
    match decoder {
        RtspDecoder::Ffmpeg => "ffmpeg",
        RtspDecoder::Gstreamer => {
            "gstreamer1.0-tools, gstreamer1.0-plugins-good, gstreamer1.0-plugins-bad and gstreamer1.0-libav"
        }
    }
}

/// A child that is killed and reaped when dropped.
struct Supervised(Child);

impl Drop for Supervised {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl FrameSource for RtspSource {
    fn run(&mut self, mailbox: &Mailbox, stop: &StopToken) -> Result<SourceEnd, SourceError> {
        let decoder = self.options.rtsp_decoder;
        let shown = redact(&self.url);
        let mut command = decoder_command(decoder, &self.url, self.options.fps);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        die_with_parent(&mut command);
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                SourceError::Child(format!("{shown}: {program} is not installed; install {}", package_of(decoder)))
            } else {
                SourceError::Child(format!("{shown}: cannot start {program}: {error}"))
            }
        })?;
        let mut child = Supervised(child);
        let last_lines = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_LINES)));
        if let Some(stderr) = child.0.stderr.take() {
            let last_lines = Arc::clone(&last_lines);
            // Ends when the child's stderr closes (it exits or is killed).
            let _ = std::thread::Builder::new().name("decoder-stderr".to_string()).spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut lines = lock(&last_lines);
                    if lines.len() == STDERR_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            });
        }
        let stdout = child.0.stdout.take().ok_or_else(|| SourceError::Child(format!("{shown}: {program} has no stdout")))?;
        let mut splitter = FrameSplitter::jpeg(self.options.max_frame_bytes);
        let outcome = pump(&mut PolledFd::new(stdout.as_fd()), &mut splitter, mailbox, stop, self.options.io_timeout, &shown);
        drop(stdout);
        match outcome {
            Ok(SourceEnd::Stopped) => Ok(SourceEnd::Stopped),
            // The decoder closed its stdout: it exited (the camera went away, or it crashed).
            Ok(SourceEnd::Finished) => {
                let status = child.0.wait().map_or_else(|error| error.to_string(), |status| status.to_string());
                // The stderr reader gets the last lines once the child is gone.
                std::thread::sleep(std::time::Duration::from_millis(50));
                let last = lock(&last_lines).iter().last().cloned().unwrap_or_default();
                let last = redact_in(&last, &self.url);
                Err(SourceError::Child(format!(
                    "{shown}: {program} exited ({status}){}",
                    if last.is_empty() { String::new() } else { format!(": {last}") }
                )))
            }
            Err(error) => Err(error),
        }
    }
}

/// `text` with the URL (which may hold a password) replaced by its redacted form.
fn redact_in(text: &str, url: &str) -> String {
    text.replace(url, &redact(url))
}

/// Makes the kernel kill the child when the service's thread that started it dies, so a killed
/// service leaves no decoder running.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_command_lines_ask_for_jpegs_at_the_camera_s_fps() {
        let ffmpeg = decoder_command(RtspDecoder::Ffmpeg, "rtsp://cam/1", 2.0);
        let args: Vec<String> = ffmpeg.get_args().map(|arg| arg.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|pair| pair == ["-vf", "fps=2"]), "{args:?}");
        assert!(args.windows(2).any(|pair| pair == ["-i", "rtsp://cam/1"]));
        assert_eq!(args.last().map(String::as_str), Some("-"));
        let gst = decoder_command(RtspDecoder::Gstreamer, "rtsp://cam/1", 0.5);
        let args: Vec<String> = gst.get_args().map(|arg| arg.to_string_lossy().into_owned()).collect();
        assert!(args.contains(&"video/x-raw,framerate=500/1000".to_string()), "{args:?}");
        assert!(args.contains(&"location=rtsp://cam/1".to_string()));
        assert_eq!(redact_in("error opening rtsp://u:pw@cam/1", "rtsp://u:pw@cam/1"), "error opening rtsp://u:***@cam/1");
    }
}
