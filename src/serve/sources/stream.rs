//! Byte streams cut into whole JPEG frames: concatenated JPEGs (`ffmpeg … -f image2pipe -c:v
//! mjpeg -`, a decoder child's stdout) and multipart MJPEG (`multipart/x-mixed-replace`, what
//! IP cameras, go2rtc and Frigate serve), and the read loop that feeds a mailbox from them.
//!
//! JPEGs are parsed, not searched: marker segments are skipped by their lengths (an EXIF
//! thumbnail inside APP1 carries its own SOI/EOI and must not cut the frame), and after each
//! SOS the entropy-coded data is scanned to the next real marker (FF00 stuffing, RST0-7 and FF
//! fill bytes are data), so progressive JPEGs with many scans come through whole. Garbage
//! between frames, a frame cut short by a new SOI, and a frame over the size limit are dropped
//! and reported, and the stream resynchronises at the next SOI.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::{SourceEnd, SourceError};
use crate::serve::frame::{Frame, Mailbox, StopToken};

/// What the splitter found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A whole JPEG file.
    Frame(Vec<u8>),
    /// Bytes dropped, and why (garbage, a cut or oversize frame, a part that is not a JPEG).
    Refused(String),
}

#[derive(Debug, Clone)]
enum Mode {
    /// Not yet known (standard input): the first bytes tell.
    Detect,
    Jpeg(JpegScan),
    Multipart(Multipart),
}

/// Where the JPEG parser is inside the frame at the start of the buffer.
#[derive(Debug, Clone, Default)]
struct JpegScan {
    /// Bytes of the buffer already parsed (the frame so far).
    parsed: usize,
    /// Inside entropy-coded data (after an SOS header).
    entropy: bool,
    /// Discarding until the next SOI (after a refused frame).
    resync: bool,
}

#[derive(Debug, Clone)]
struct Multipart {
    /// `--boundary`; learnt from the first line when not given.
    delimiter: Option<Vec<u8>>,
    state: PartState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartState {
    /// Looking for the next delimiter line.
    Delimiter,
    /// Reading a part's headers.
    Headers,
    /// Reading a body of known length.
    Body(usize),
    /// Reading a body up to the next delimiter.
    BodyUntilDelimiter,
    /// Skipping an oversize body up to the next delimiter.
    SkipUntilDelimiter,
}

/// A push parser: bytes in, whole JPEG frames out.
#[derive(Debug, Clone)]
pub struct FrameSplitter {
    mode: Mode,
    buffer: Vec<u8>,
    max_frame_bytes: usize,
}

impl FrameSplitter {
    /// A splitter that tells concatenated JPEGs from multipart MJPEG by the first bytes.
    pub fn detect(max_frame_bytes: usize) -> FrameSplitter {
        FrameSplitter { mode: Mode::Detect, buffer: Vec::new(), max_frame_bytes }
    }

    /// A splitter of concatenated JPEGs.
    pub fn jpeg(max_frame_bytes: usize) -> FrameSplitter {
        FrameSplitter { mode: Mode::Jpeg(JpegScan::default()), buffer: Vec::new(), max_frame_bytes }
    }

    /// A splitter of multipart MJPEG with `boundary` (from the Content-Type; with or without
    /// its leading `--`), or learnt from the first delimiter line when `None`.
    pub fn multipart(boundary: Option<&str>, max_frame_bytes: usize) -> FrameSplitter {
        let delimiter = boundary.map(|boundary| {
            let boundary = boundary.trim().trim_matches('"');
            let boundary = boundary.strip_prefix("--").unwrap_or(boundary);
            format!("--{boundary}").into_bytes()
        });
        FrameSplitter {
            mode: Mode::Multipart(Multipart { delimiter, state: PartState::Delimiter }),
            buffer: Vec::new(),
            max_frame_bytes,
        }
    }

    /// Feeds `data`; each whole frame (or refusal) found is passed to `out`, in stream order.
    pub fn push(&mut self, data: &[u8], out: &mut dyn FnMut(Piece)) {
        self.buffer.extend_from_slice(data);
        loop {
            let progressed = match &mut self.mode {
                Mode::Detect => self.detect_mode(),
                Mode::Jpeg(_) => self.step_jpeg(out),
                Mode::Multipart(_) => self.step_multipart(out),
            };
            if !progressed {
                break;
            }
        }
    }

    fn detect_mode(&mut self) -> bool {
        let start = self.buffer.iter().position(|byte| !byte.is_ascii_whitespace());
        let Some(start) = start else {
            self.buffer.clear();
            return false;
        };
        let rest = &self.buffer[start..];
        if rest.len() < 2 {
            return false;
        }
        self.mode = if rest.starts_with(b"--") {
            Mode::Multipart(Multipart { delimiter: None, state: PartState::Delimiter })
        } else {
            Mode::Jpeg(JpegScan::default())
        };
        true
    }

    /// One step of the JPEG parser; `false` when it needs more bytes.
    fn step_jpeg(&mut self, out: &mut dyn FnMut(Piece)) -> bool {
        let Mode::Jpeg(scan) = &mut self.mode else { return false };
        if scan.parsed == 0 || scan.resync {
            // Find the next SOI followed by a marker.
            match find(&self.buffer, &[0xFF, 0xD8, 0xFF]) {
                Some(start) => {
                    if start > 0 && !scan.resync && self.buffer[..start].iter().any(|byte| !byte.is_ascii_whitespace()) {
                        out(Piece::Refused(format!("{start} bytes that are not a JPEG, skipped")));
                    }
                    self.buffer.drain(..start);
                    *scan = JpegScan { parsed: 2, entropy: false, resync: false };
                }
                None => {
                    // Keep the last two bytes: they may start an SOI.
                    let keep = self.buffer.len().min(2);
                    let dropped = self.buffer.len() - keep;
                    if dropped > 0 && !scan.resync && self.buffer[..dropped].iter().any(|byte| !byte.is_ascii_whitespace()) {
                        out(Piece::Refused(format!("{dropped} bytes that are not a JPEG, skipped")));
                        scan.resync = true;
                    }
                    self.buffer.drain(..dropped);
                    return false;
                }
            }
        }
        let max = self.max_frame_bytes;
        let buffer = &self.buffer;
        let mut position = scan.parsed;
        let outcome = loop {
            if position > max {
                break Outcome::Refuse(format!("a frame over the {max}-byte limit, dropped"));
            }
            if scan.entropy {
                // Entropy-coded data runs to the next FF that is neither stuffing (FF00), a
                // restart marker (FFD0-FFD7) nor fill (FFFF).
                match next_marker(buffer, position) {
                    Some(marker) => {
                        position = marker;
                        scan.entropy = false;
                    }
                    None => break Outcome::NeedMore(buffer.len().saturating_sub(1).max(position)),
                }
            }
            if position + 2 > buffer.len() {
                break Outcome::NeedMore(position);
            }
            if buffer[position] != 0xFF {
                break Outcome::Refuse("a corrupt frame (no marker where one must be), dropped".to_string());
            }
            let marker = buffer[position + 1];
            match marker {
                0xFF => position += 1,
                0xD9 => break Outcome::Frame(position + 2),
                0xD8 => break Outcome::Refuse("a frame cut short by the next one, dropped".to_string()),
                0xD0..=0xD7 | 0x01 => position += 2,
                _ => {
                    if position + 4 > buffer.len() {
                        break Outcome::NeedMore(position);
                    }
                    let length = usize::from(u16::from_be_bytes([buffer[position + 2], buffer[position + 3]]));
                    if length < 2 {
                        break Outcome::Refuse("a corrupt frame (bad segment length), dropped".to_string());
                    }
                    position += 2 + length;
                    if marker == 0xDA {
                        scan.entropy = true;
                    }
                }
            }
        };
        match outcome {
            Outcome::NeedMore(parsed) => {
                scan.parsed = parsed;
                if self.buffer.len() > max + 2 {
                    out(Piece::Refused(format!("a frame over the {max}-byte limit, dropped")));
                    self.buffer.drain(..self.buffer.len() - 2);
                    *scan = JpegScan { parsed: 0, entropy: false, resync: true };
                    return true;
                }
                false
            }
            Outcome::Frame(end) => {
                let frame: Vec<u8> = self.buffer.drain(..end).collect();
                *scan = JpegScan::default();
                if frame.len() > max {
                    out(Piece::Refused(format!("a {}-byte frame over the {max}-byte limit, dropped", frame.len())));
                } else {
                    out(Piece::Frame(frame));
                }
                true
            }
            Outcome::Refuse(reason) => {
                out(Piece::Refused(reason));
                // Resynchronise just after the refused frame's SOI: a segment length read from
                // a cut frame may have jumped over the next frame's SOI.
                self.buffer.drain(..2.min(self.buffer.len()));
                *scan = JpegScan { parsed: 0, entropy: false, resync: true };
                true
            }
        }
    }

    /// One step of the multipart parser; `false` when it needs more bytes.
    fn step_multipart(&mut self, out: &mut dyn FnMut(Piece)) -> bool {
        let max = self.max_frame_bytes;
        let Mode::Multipart(part) = &mut self.mode else { return false };
        match part.state {
            PartState::Delimiter => {
                let found = match &part.delimiter {
                    Some(delimiter) => find(&self.buffer, delimiter).map(|start| (start, delimiter.len())),
                    None => find(&self.buffer, b"--").map(|start| {
                        let line_end = self.buffer[start..].iter().position(|&byte| byte == b'\n').map(|end| start + end);
                        (start, line_end.map_or(0, |end| trim_cr(&self.buffer[start..end]).len()))
                    }),
                };
                let Some((start, length)) = found else {
                    let keep = self.buffer.len().min(part.delimiter.as_ref().map_or(2, Vec::len));
                    self.buffer.drain(..self.buffer.len() - keep);
                    return false;
                };
                if length == 0 {
                    return false; // the first delimiter line is not complete yet
                }
                if part.delimiter.is_none() {
                    part.delimiter = Some(self.buffer[start..start + length].to_vec());
                }
                // The rest of the delimiter line (`--` closes the stream; whitespace).
                let Some(line_end) = self.buffer[start..].iter().position(|&byte| byte == b'\n') else { return false };
                self.buffer.drain(..start + line_end + 1);
                part.state = PartState::Headers;
                true
            }
            PartState::Headers => {
                let Some((headers_end, body_start)) = headers_end(&self.buffer) else {
                    if self.buffer.len() > 64 * 1024 {
                        out(Piece::Refused("a part whose headers never end, skipped".to_string()));
                        self.buffer.clear();
                        part.state = PartState::Delimiter;
                        return true;
                    }
                    return false;
                };
                let headers = String::from_utf8_lossy(&self.buffer[..headers_end]).into_owned();
                self.buffer.drain(..body_start);
                let length = headers.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok()).flatten()
                });
                part.state = match length {
                    Some(length) if length > max => {
                        out(Piece::Refused(format!("a {length}-byte part over the {max}-byte limit, skipped")));
                        PartState::SkipUntilDelimiter
                    }
                    Some(length) => PartState::Body(length),
                    None => PartState::BodyUntilDelimiter,
                };
                true
            }
            PartState::Body(length) => {
                if self.buffer.len() < length {
                    return false;
                }
                let body: Vec<u8> = self.buffer.drain(..length).collect();
                part.state = PartState::Delimiter;
                out(jpeg_part(body));
                true
            }
            PartState::BodyUntilDelimiter | PartState::SkipUntilDelimiter => {
                let Some(delimiter) = part.delimiter.clone() else { return false };
                match find(&self.buffer, &delimiter) {
                    Some(end) => {
                        let body: Vec<u8> = self.buffer.drain(..end).collect();
                        let skipping = part.state == PartState::SkipUntilDelimiter;
                        part.state = PartState::Delimiter;
                        if !skipping {
                            out(jpeg_part(trim_line_end(body)));
                        }
                        true
                    }
                    None if self.buffer.len() > max + delimiter.len() => {
                        if part.state == PartState::BodyUntilDelimiter {
                            out(Piece::Refused(format!("a part over the {max}-byte limit, skipped")));
                        }
                        part.state = PartState::SkipUntilDelimiter;
                        let keep = delimiter.len();
                        self.buffer.drain(..self.buffer.len() - keep);
                        false
                    }
                    None => false,
                }
            }
        }
    }
}

enum Outcome {
    NeedMore(usize),
    Frame(usize),
    Refuse(String),
}

/// A multipart body: a frame if it is a JPEG.
fn jpeg_part(body: Vec<u8>) -> Piece {
    let start = body.iter().position(|byte| !byte.is_ascii_whitespace()).unwrap_or(body.len());
    if body[start..].starts_with(&[0xFF, 0xD8]) {
        let mut body = body;
        body.drain(..start);
        Piece::Frame(body)
    } else {
        Piece::Refused(format!("a {}-byte part that is not a JPEG, skipped", body.len()))
    }
}

/// Where the next marker after entropy-coded data starts, from `from`.
fn next_marker(buffer: &[u8], from: usize) -> Option<usize> {
    let mut index = from;
    while index + 1 < buffer.len() {
        if buffer[index] == 0xFF {
            match buffer[index + 1] {
                0x00 | 0xD0..=0xD7 | 0xFF => index += 1,
                _ => return Some(index),
            }
        }
        index += 1;
    }
    None
}

/// End of the header block (`\r\n\r\n` or `\n\n`): (headers end, body start).
fn headers_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let crlf = find(buffer, b"\r\n\r\n").map(|at| (at, at + 4));
    let lf = find(buffer, b"\n\n").map(|at| (at, at + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_line_end(mut body: Vec<u8>) -> Vec<u8> {
    if body.ends_with(b"\n") {
        body.pop();
        if body.ends_with(b"\r") {
            body.pop();
        }
    }
    body
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Logs a source's refusals: the first at once, then at most one summary line a minute (a
/// broken 30 fps stream must not flood the journal).
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// How often a summary line may come.
    pub const INTERVAL: Duration = Duration::from_secs(60);

    /// Notes one refusal of `source`.
    pub fn note(&mut self, source: &str, reason: &str) {
        let now = Instant::now();
        if self.last.is_none_or(|last| now.duration_since(last) >= Self::INTERVAL) {
            let more =
                if self.suppressed > 0 { format!(" ({} more since the last report)", self.suppressed) } else { String::new() };
            tracing::warn!("{source}: {reason}{more}");
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

/// Reads `reader` into `splitter` and each whole frame into `mailbox` until the stream ends
/// (`Ok(Finished)`), `stop` is set (`Ok(Stopped)`), nothing came for `io_timeout`, or a read
/// fails. The reader must return `WouldBlock` or `TimedOut` within [`StopToken::POLL`] when
/// no data comes (a socket read timeout, [`PolledFd`]).
pub fn pump(
    reader: &mut dyn Read,
    splitter: &mut FrameSplitter,
    mailbox: &Mailbox,
    stop: &StopToken,
    io_timeout: Duration,
    source: &str,
) -> Result<SourceEnd, SourceError> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut last_data = Instant::now();
    let mut refusals = RefusalLog::default();
    loop {
        if stop.is_stopped() {
            return Ok(SourceEnd::Stopped);
        }
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(SourceEnd::Finished),
            Ok(read) => {
                last_data = Instant::now();
                splitter.push(&buffer[..read], &mut |piece| match piece {
                    Piece::Frame(bytes) => mailbox.put(Frame::encoded(bytes)),
                    Piece::Refused(reason) => {
                        mailbox.refuse();
                        refusals.note(source, &reason);
                    }
                });
            }
            Err(error)
                if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) =>
            {
                if last_data.elapsed() > io_timeout {
                    return Err(SourceError::Protocol(format!("{source}: no data for {:.0} s", io_timeout.as_secs_f64())));
                }
            }
            Err(error) => return Err(SourceError::io(format!("{source}: reading"), error)),
        }
    }
}

/// A file descriptor read through `poll(2)`: a read waits at most [`StopToken::POLL`] and then
/// returns `WouldBlock`, so the reader stays stoppable (standard input, a child's stdout).
pub struct PolledFd<'fd> {
    fd: BorrowedFd<'fd>,
}

impl<'fd> PolledFd<'fd> {
    /// Wraps `fd`.
    pub fn new(fd: BorrowedFd<'fd>) -> PolledFd<'fd> {
        PolledFd { fd }
    }
}

impl Read for PolledFd<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let mut poll = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let timeout = i32::try_from(StopToken::POLL.as_millis()).unwrap_or(200);
        // SAFETY: one valid pollfd, borrowed for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // SAFETY: `buffer` is valid for `buffer.len()` writable bytes; the fd is borrowed open.
        let read = unsafe { libc::read(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(read as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real baseline JPEG of `width` × `height`, with the given grey level.
    fn jpeg(width: u32, height: u32, level: u8) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([level, (x % 256) as u8, (y % 256) as u8]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 80).encode_image(&image).expect("encode");
        bytes
    }

    /// `jpeg` with an APP1 segment holding another whole JPEG (an EXIF thumbnail) after SOI.
    fn with_thumbnail(main: &[u8], thumbnail: &[u8]) -> Vec<u8> {
        let mut segment = b"Exif\0\0".to_vec();
        segment.extend_from_slice(thumbnail);
        let length = u16::try_from(segment.len() + 2).expect("small thumbnail");
        let mut out = main[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&segment);
        out.extend_from_slice(&main[2..]);
        out
    }

    fn split(splitter: &mut FrameSplitter, stream: &[u8], chunk: usize) -> Vec<Piece> {
        let mut pieces = Vec::new();
        for part in stream.chunks(chunk.max(1)) {
            splitter.push(part, &mut |piece| pieces.push(piece));
        }
        pieces
    }

    /// Frame lengths and refusals, short enough for an assertion message.
    fn summary(pieces: &[Piece]) -> Vec<String> {
        pieces
            .iter()
            .map(|piece| match piece {
                Piece::Frame(bytes) => format!("frame {}", bytes.len()),
                Piece::Refused(why) => why.clone(),
            })
            .collect()
    }

    fn frames(pieces: &[Piece]) -> Vec<&[u8]> {
        pieces.iter().filter_map(|piece| if let Piece::Frame(bytes) = piece { Some(bytes.as_slice()) } else { None }).collect()
    }

    #[test]
    fn concatenated_jpegs_come_out_whole_thumbnails_included() {
        let a = jpeg(64, 48, 10);
        let b = with_thumbnail(&jpeg(80, 60, 200), &jpeg(16, 12, 99));
        let c = jpeg(33, 17, 128);
        let stream = [a.clone(), b.clone(), c.clone()].concat();
        for chunk in [1, 7, 4096, stream.len()] {
            let pieces = split(&mut FrameSplitter::jpeg(1 << 20), &stream, chunk);
            assert_eq!(frames(&pieces), [&a[..], &b[..], &c[..]], "chunk {chunk}");
            assert_eq!(pieces.len(), 3);
        }
        assert!(image::load_from_memory(&b).is_ok(), "the thumbnailed JPEG is valid");
    }

    #[test]
    fn progressive_jpegs_with_many_scans_come_out_whole() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/progressive.jpg");
        let progressive =
            std::fs::read(&path).expect("tests/fixtures/images/progressive.jpg (made by make_progressive.sh beside it)");
        let scans = progressive.windows(2).filter(|window| window == &[0xFF, 0xDA]).count();
        assert!(scans > 1, "a progressive JPEG has several scans");
        let stream = [progressive.clone(), progressive.clone()].concat();
        let pieces = split(&mut FrameSplitter::detect(1 << 22), &stream, 1000);
        assert_eq!(frames(&pieces), [&progressive[..], &progressive[..]]);
    }

    #[test]
    fn garbage_cut_and_oversize_frames_are_refused_and_the_stream_resynchronises() {
        let good = jpeg(40, 30, 50);
        let big = jpeg(400, 300, 60);
        let mut stream = b"garbage\x00\xff".to_vec();
        stream.extend_from_slice(&good);
        stream.extend_from_slice(&good[..good.len() / 2]); // cut short by the next SOI
        stream.extend_from_slice(&good);
        stream.extend_from_slice(&big); // over the limit below
        stream.extend_from_slice(&good);
        let limit = good.len() * 2;
        assert!(big.len() > limit);
        for chunk in [3, 512, stream.len()] {
            let pieces = split(&mut FrameSplitter::jpeg(limit), &stream, chunk);
            assert!(frames(&pieces) == [&good[..], &good[..], &good[..]], "chunk {chunk}: {:?}", summary(&pieces));
            let refused = pieces.iter().filter(|piece| matches!(piece, Piece::Refused(_))).count();
            assert!(refused >= 3, "garbage, the cut frame and the big one, chunk {chunk}: {:?}", summary(&pieces));
        }
    }

    #[test]
    fn multipart_mjpeg_with_and_without_lengths() {
        let a = jpeg(20, 20, 1);
        let b = with_thumbnail(&jpeg(30, 20, 2), &jpeg(8, 8, 3));
        let mut with_lengths = Vec::new();
        for frame in [&a, &b] {
            with_lengths.extend_from_slice(
                format!("--myboundary\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", frame.len()).as_bytes(),
            );
            with_lengths.extend_from_slice(frame);
            with_lengths.extend_from_slice(b"\r\n");
        }
        let mut without = Vec::new();
        for frame in [&a, &b] {
            without.extend_from_slice(b"--myboundary\nContent-Type: image/jpeg\n\n");
            without.extend_from_slice(frame);
            without.extend_from_slice(b"\n");
        }
        without.extend_from_slice(b"--myboundary--\n");
        for (stream, boundary) in [(&with_lengths, Some("myboundary")), (&without, Some("--myboundary")), (&with_lengths, None)] {
            for chunk in [1, 13, stream.len()] {
                let mut splitter = match boundary {
                    Some(boundary) => FrameSplitter::multipart(Some(boundary), 1 << 20),
                    None => FrameSplitter::detect(1 << 20),
                };
                let pieces = split(&mut splitter, stream, chunk);
                assert_eq!(frames(&pieces), [&a[..], &b[..]], "chunk {chunk}, boundary {boundary:?}");
            }
        }
        let mut not_jpeg = b"--b\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello\r\n".to_vec();
        not_jpeg.extend_from_slice(format!("--b\r\nContent-Length: {}\r\n\r\n", a.len()).as_bytes());
        not_jpeg.extend_from_slice(&a);
        let pieces = split(&mut FrameSplitter::multipart(Some("b"), 1 << 20), &not_jpeg, 9);
        assert_eq!(frames(&pieces), [&a[..]]);
        assert!(matches!(&pieces[0], Piece::Refused(_)), "{pieces:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
        /// Any chunking of a stream gives the same pieces.
        #[test]
        fn chunking_never_changes_the_frames(cuts in proptest::collection::vec(1usize..400, 1..40), garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let frames_in = [jpeg(16, 16, 1), with_thumbnail(&jpeg(24, 16, 2), &jpeg(8, 8, 3)), jpeg(20, 12, 4)];
            let mut stream = garbage.clone();
            for frame in &frames_in {
                stream.extend_from_slice(frame);
            }
            let whole = split(&mut FrameSplitter::jpeg(1 << 20), &stream, stream.len());
            let mut chunked = Vec::new();
            let mut splitter = FrameSplitter::jpeg(1 << 20);
            let mut rest = &stream[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at((*cut).min(rest.len()));
                splitter.push(head, &mut |piece| chunked.push(piece));
                rest = tail;
            }
            proptest::prop_assert_eq!(frames(&chunked), frames(&whole));
            let expected: Vec<&[u8]> = frames_in.iter().map(Vec::as_slice).collect();
            proptest::prop_assert_eq!(frames(&whole), expected);
        }
    }
}
