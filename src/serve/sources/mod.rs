//! Camera sources: each reads one camera as fast as it sends and puts every frame into the
//! camera's [`Mailbox`].
//!
//! A source runs on its own thread under a supervisor (`serve::camera`) that restarts it with
//! backoff when it fails or stalls. A source never blocks longer than
//! [`StopToken::POLL`](super::frame::StopToken::POLL) without looking at its stop token, so a
//! stop, a stall restart or a reload takes effect within that time.
//!
//! The `source` of a camera in serve.toml is URL-like (docs/SERVE.md):
//!
//! | source | what |
//! |---|---|
//! | `folder:/var/spool/cam1` | JPEG/PNG files dropped into a folder (inotify), each once complete |
//! | `stdin:` | concatenated JPEGs or multipart MJPEG on standard input |
//! | `http://host/snapshot.jpg` | JPEG snapshots, polled at the camera's fps |
//! | `http://host/video.mjpg` | an MJPEG stream (`multipart/x-mixed-replace`) |
//! | `rtsp://host/stream` | H.264/H.265/MJPEG over RTSP, decoded by an ffmpeg or gst-launch child |
//! | `v4l2:/dev/video0` | a V4L2 capture device (YUYV or MJPEG), with the `v4l2` feature |

pub mod folder;
pub mod http;
pub mod rtsp;
pub mod stdin;
pub mod stream;
#[cfg(all(feature = "v4l2", target_os = "linux"))]
pub mod v4l2;
pub mod yuyv;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::frame::{Mailbox, StopToken};

/// How a source run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEnd {
    /// Its stop token was set.
    Stopped,
    /// It has no more frames, ever (end of standard input): the supervisor does not restart it.
    Finished,
}

/// Why a source run failed; the supervisor restarts it with backoff and counts the restart.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading or connecting failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The camera sent something that is not what its source type promises.
    #[error("{0}")]
    Protocol(String),
    /// The decoder child process exited or could not be started.
    #[error("{0}")]
    Child(String),
    /// The source cannot work on this build or machine; restarting will not help.
    #[error("{0}")]
    Unsupported(String),
}

impl SourceError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> SourceError {
        SourceError::Io { context: context.into(), source }
    }
}

/// Which program decodes an RTSP stream into JPEG frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspDecoder {
    /// `ffmpeg` (Debian package ffmpeg).
    #[default]
    Ffmpeg,
    /// `gst-launch-1.0` (Debian packages gstreamer1.0-tools and the plugins).
    Gstreamer,
}

/// A camera's source, parsed from its URL-like `source` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A watched folder.
    Folder(PathBuf),
    /// Standard input.
    Stdin,
    /// An HTTP camera: JPEG snapshots or an MJPEG stream, told apart by the Content-Type.
    Http(String),
    /// An RTSP stream, decoded by a child process.
    Rtsp(String),
    /// A V4L2 device.
    V4l2(PathBuf),
}

impl SourceSpec {
    /// Whether its frames replace each other in the mailbox (a live feed: a camera, a stream),
    /// as opposed to a folder, whose files wait on disk for their turn and are all classified.
    pub fn is_live(&self) -> bool {
        !matches!(self, SourceSpec::Folder(_))
    }

    /// Parses a `source` string; the error says what forms are accepted.
    pub fn parse(source: &str) -> Result<SourceSpec, String> {
        let source = source.trim();
        let lower = source.to_ascii_lowercase();
        let path_after = |prefix: &str| {
            let rest = &source[prefix.len()..];
            // folder:///var/x and folder:/var/x are the same folder.
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.is_empty() {
                Err(format!("`{source}` names no path; write e.g. `{prefix}/var/spool/cam1`"))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        if lower.starts_with("folder:") {
            return path_after("folder:").map(SourceSpec::Folder);
        }
        if lower == "stdin:" || lower == "stdin" || source == "-" {
            return Ok(SourceSpec::Stdin);
        }
        if lower.starts_with("http://") {
            return Ok(SourceSpec::Http(source.to_string()));
        }
        if lower.starts_with("https://") {
            return Err(format!("`{}`: HTTPS cameras are not supported (this build speaks plain HTTP); use the camera's http:// URL or an rtsp:// stream", redact(source)));
        }
        if lower.starts_with("rtsp://") || lower.starts_with("rtsps://") {
            return Ok(SourceSpec::Rtsp(source.to_string()));
        }
        if lower.starts_with("v4l2:") {
            return path_after("v4l2:").map(SourceSpec::V4l2);
        }
        if source.starts_with("/dev/video") {
            return Ok(SourceSpec::V4l2(PathBuf::from(source)));
        }
        Err(format!(
            "`{}` is not a source this service reads; use folder:/PATH, stdin:, http://…, rtsp://… or v4l2:/dev/videoN",
            redact(source)
        ))
    }

    /// Whether the source can end for good (standard input), rather than only fail.
    pub fn is_finite(&self) -> bool {
        matches!(self, SourceSpec::Stdin)
    }

    /// Whether frames wait on disk for their turn (each one is classified) rather than replace
    /// each other in the mailbox.
    pub fn keeps_backlog(&self) -> bool {
        matches!(self, SourceSpec::Folder(_))
    }
}

impl fmt::Display for SourceSpec {
    /// The source as logs and the API show it: passwords in URLs replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Folder(path) => write!(f, "folder:{}", path.display()),
            SourceSpec::Stdin => f.write_str("stdin:"),
            SourceSpec::Http(url) | SourceSpec::Rtsp(url) => f.write_str(&redact(url)),
            SourceSpec::V4l2(path) => write!(f, "v4l2:{}", path.display()),
        }
    }
}

/// `scheme://user:password@host/…` with the password replaced by `***`, for logs and the API.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |end| authority_start + end);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else { return url.to_string() };
    let user_info = &authority[..at];
    let user = user_info.split(':').next().unwrap_or("");
    if user_info.contains(':') {
        format!("{}{user}:***@{}", &url[..authority_start], &url[authority_start + at + 1..])
    } else {
        url.to_string()
    }
}

/// What every source is told when it starts.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// A frame larger than this is refused (the stream is resynchronised at the next frame).
    pub max_frame_bytes: usize,
    /// The camera's fps cap: a snapshot camera is polled at this rate, a decoder child asked
    /// for this many frames per second.
    pub fps: f64,
    /// How long a connect or a read may take before the source counts as failed.
    pub io_timeout: Duration,
    /// The RTSP decoder program.
    pub rtsp_decoder: RtspDecoder,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            max_frame_bytes: 32 << 20,
            fps: 2.0,
            io_timeout: Duration::from_secs(10),
            rtsp_decoder: RtspDecoder::Ffmpeg,
        }
    }
}

/// A camera's frame reader; see the module documentation for the rules every source keeps.
pub trait FrameSource: Send {
    /// Reads frames into `mailbox` until `stop` is set (`Ok(Stopped)`), the source has no more
    /// frames (`Ok(Finished)`), or it fails.
    fn run(&mut self, mailbox: &Mailbox, stop: &StopToken) -> Result<SourceEnd, SourceError>;
}

/// Creates the reader of `spec`.
pub fn open_source(spec: &SourceSpec, options: &SourceOptions) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(match spec {
        SourceSpec::Folder(path) => Box::new(folder::FolderSource::new(path.clone(), options)),
        SourceSpec::Stdin => Box::new(stdin::StdinSource::new(options)),
        SourceSpec::Http(url) => Box::new(http::HttpSource::new(url, options)),
        SourceSpec::Rtsp(url) => Box::new(rtsp::RtspSource::new(url, options)),
        #[cfg(all(feature = "v4l2", target_os = "linux"))]
        SourceSpec::V4l2(path) => Box::new(v4l2::V4l2Source::new(path.clone(), options)),
        #[cfg(not(all(feature = "v4l2", target_os = "linux")))]
        SourceSpec::V4l2(path) => {
            return Err(SourceError::Unsupported(format!(
                "{}: this build has no V4L2 support; build with `--features v4l2` (Linux)",
                path.display()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_from_their_urls() {
        assert_eq!(SourceSpec::parse("folder:/var/spool/cam"), Ok(SourceSpec::Folder("/var/spool/cam".into())));
        assert_eq!(SourceSpec::parse("folder:///var/spool/cam"), Ok(SourceSpec::Folder("/var/spool/cam".into())));
        assert_eq!(SourceSpec::parse("folder:relative/dir"), Ok(SourceSpec::Folder("relative/dir".into())));
        assert_eq!(SourceSpec::parse("stdin:"), Ok(SourceSpec::Stdin));
        assert_eq!(SourceSpec::parse("-"), Ok(SourceSpec::Stdin));
        assert_eq!(SourceSpec::parse("http://10.0.0.2/snap.jpg"), Ok(SourceSpec::Http("http://10.0.0.2/snap.jpg".into())));
        assert_eq!(SourceSpec::parse("RTSP://cam/live"), Ok(SourceSpec::Rtsp("RTSP://cam/live".into())));
        assert_eq!(SourceSpec::parse("/dev/video0"), Ok(SourceSpec::V4l2("/dev/video0".into())));
        assert_eq!(SourceSpec::parse("v4l2:/dev/video2"), Ok(SourceSpec::V4l2("/dev/video2".into())));
        for bad in ["folder:", "ftp://x/y", "https://u:secret@cam/x", "cam1"] {
            let error = SourceSpec::parse(bad).expect_err(bad);
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact("rtsp://admin:hunter2@10.0.0.5:554/stream?a=b"), "rtsp://admin:***@10.0.0.5:554/stream?a=b");
        assert_eq!(redact("http://cam/x@y"), "http://cam/x@y");
        assert_eq!(redact("http://user@cam/x"), "http://user@cam/x");
        assert_eq!(redact("http://a:b:c@cam"), "http://a:***@cam");
        let spec = SourceSpec::parse("http://u:p%40ss@cam/snap.jpg").expect("parses");
        assert_eq!(spec.to_string(), "http://u:***@cam/snap.jpg");
    }
}
