//! V4L2 capture devices (`v4l2:/dev/video0`): USB (UVC) webcams and other Linux cameras; feature
//! `v4l2`, Linux only.
//!
//! The device is asked for MJPEG when it offers it (the camera compresses, and a frame travels as
//! its bytes, decoded only if the scheduler takes it), else for YUYV, which is converted to RGB
//! here ([`yuyv_to_rgb`]). The frame size is the one the device is set to (its default, or what
//! `v4l2-ctl --set-fmt-video` chose); the frame rate is the device's own. Frames are read through
//! memory-mapped streaming I/O; when several are ready only the newest is delivered, the older
//! ones go straight back to the driver. Each wait for a frame lasts at most
//! [`StopToken::POLL`], so a stop is honoured; an unplugged camera ends the run with an error and
//! the supervisor reopens the device with backoff (the node comes back when the camera does).
//!
//! From the `v4l` crate only the kernel's structures (bindgen's reading of linux/videodev2.h:
//! exact layouts on every target), the ioctl numbers and the open/ioctl/mmap wrappers are used.
//! Its higher-level types are not: their conversions panic on values a driver may legitimately
//! return (a card name that is not UTF-8, a colorspace newer than the crate), and its mmap stream
//! cannot resume after a dequeue timeout (it queues again a buffer that is still queued).
//!
//! Tests with a camera are ignored by default; on a box with a camera at /dev/video0 (or
//! `CAC_EDGE_V4L2_DEVICE`): `cargo test --features v4l2 -- --ignored v4l2`.

use std::borrow::Cow;
use std::io;
use std::os::raw::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use v4l::v4l2::vidioc;
use v4l::v4l_sys::{
    v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_CAPTURE as VIDEO_CAPTURE, v4l2_buffer, v4l2_capability, v4l2_field_V4L2_FIELD_ANY,
    v4l2_fmtdesc, v4l2_format, v4l2_memory_V4L2_MEMORY_MMAP as MEMORY_MMAP, v4l2_requestbuffers, V4L2_BUF_FLAG_ERROR,
    V4L2_CAP_DEVICE_CAPS, V4L2_CAP_STREAMING, V4L2_CAP_VIDEO_CAPTURE,
};
use v4l::Device;

use super::yuyv::{mjpeg_with_huffman_tables, yuyv_to_rgb};
use super::{FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{Frame, Mailbox, StopToken};

/// Buffers shared with the driver: enough that the camera never waits for us, few enough that a
/// frame never queues long (only the newest ready one is delivered anyway).
const BUFFERS: u32 = 4;
/// `V4L2_BUF_FLAG_TIMESTAMP_MASK` and `_MONOTONIC`: the buffer's timestamp is CLOCK_MONOTONIC.
const TIMESTAMP_MASK: u32 = 0xE000;
const TIMESTAMP_MONOTONIC: u32 = 0x2000;

/// The pixel formats read, in order of preference (V4L2 fourcc codes; the C macros are not
/// available to bindgen).
const MJPEG: u32 = u32::from_le_bytes(*b"MJPG");
const JPEG: u32 = u32::from_le_bytes(*b"JPEG");
const YUYV: u32 = u32::from_le_bytes(*b"YUYV");

/// The reader of one V4L2 capture device.
pub struct V4l2Source {
    path: PathBuf,
    max_frame_bytes: usize,
}

impl V4l2Source {
    /// Reads the device at `path` (e.g. /dev/video0 or a stable /dev/v4l/by-id/… link). Nothing is
    /// opened until the source runs.
    pub fn new(path: PathBuf, options: &SourceOptions) -> V4l2Source {
        V4l2Source { path, max_frame_bytes: options.max_frame_bytes }
    }
}

impl FrameSource for V4l2Source {
    fn run(&mut self, mailbox: &Mailbox, stop: &StopToken) -> Result<SourceEnd, SourceError> {
        let path = &self.path;
        let device = Device::with_path(path).map_err(|error| open_error(path, error))?;
        let fd = device.handle().fd();
        check_capabilities(fd, path)?;
        let format = negotiate_format(fd, path)?;
        // Declared after `device`: dropped (streaming stopped, buffers unmapped) before the file
        // descriptor is closed.
        let mut stream = Stream::start(fd).map_err(|error| device_error(path, "starting capture", error))?;
        tracing::info!(
            "{}: capturing {} {}x{} ({} buffers)",
            path.display(),
            fourcc_name(format.fourcc),
            format.width,
            format.height,
            stream.buffers.len()
        );
        loop {
            if stop.is_stopped() {
                return Ok(SourceEnd::Stopped);
            }
            let Some(ready) = stream.newest(StopToken::POLL).map_err(|error| device_error(path, "reading a frame", error))?
            else {
                continue;
            };
            match self.frame(&format, &stream, &ready) {
                Ok(frame) => mailbox.put(frame),
                Err(reason) => {
                    tracing::debug!("{}: frame {} refused: {reason}", path.display(), ready.sequence);
                    mailbox.refuse();
                }
            }
            stream.queue(ready.index).map_err(|error| device_error(path, "returning a buffer", error))?;
        }
    }
}

impl V4l2Source {
    /// The frame in a dequeued buffer, or why it is refused.
    fn frame(&self, format: &Format, stream: &Stream, ready: &Ready) -> Result<Frame, String> {
        if ready.flags & V4L2_BUF_FLAG_ERROR != 0 {
            return Err("the driver marked it as corrupted".into());
        }
        let bytes = stream.bytes(ready);
        if bytes.is_empty() {
            return Err("empty buffer".into());
        }
        let mut frame = if format.fourcc == YUYV {
            let image =
                yuyv_to_rgb(bytes, format.width, format.height, format.bytes_per_line).map_err(|error| error.to_string())?;
            Frame::rgb(image)
        } else {
            if bytes.len() > self.max_frame_bytes {
                return Err(format!("{} bytes, more than the limit of {}", bytes.len(), self.max_frame_bytes));
            }
            match mjpeg_with_huffman_tables(bytes).map_err(|error| error.to_string())? {
                Cow::Borrowed(bytes) => Frame::encoded(bytes),
                Cow::Owned(bytes) => Frame::encoded(bytes),
            }
        };
        if let Some(age) = ready.age {
            frame.captured_at = SystemTime::now().checked_sub(age).unwrap_or(frame.captured_at);
        }
        Ok(frame)
    }
}

/// The format the device was set to.
#[derive(Debug, Clone, Copy)]
struct Format {
    fourcc: u32,
    width: u32,
    height: u32,
    bytes_per_line: u32,
}

/// A buffer taken from the driver.
#[derive(Debug)]
struct Ready {
    index: u32,
    bytes_used: usize,
    flags: u32,
    sequence: u32,
    /// How long ago the camera captured it (from the driver's monotonic timestamp).
    age: Option<Duration>,
}

/// The driver's mmap buffers while capture is on.
struct Stream {
    fd: c_int,
    /// Start and length of each mapped buffer, by index.
    buffers: Vec<(*mut c_void, usize)>,
    streaming: bool,
}

impl Stream {
    /// Requests and maps the buffers, queues them all and starts capture.
    fn start(fd: c_int) -> io::Result<Stream> {
        // SAFETY: zeroed: v4l2_requestbuffers is plain integers; all zeros is a valid value.
        let mut request =
            v4l2_requestbuffers { count: BUFFERS, type_: VIDEO_CAPTURE, memory: MEMORY_MMAP, ..unsafe { std::mem::zeroed() } };
        ioctl(fd, vidioc::VIDIOC_REQBUFS, &mut request)?;
        if request.count == 0 {
            return Err(io::Error::other("the driver granted no capture buffers"));
        }
        // From here on Drop releases whatever was mapped, whichever step fails.
        let mut stream = Stream { fd, buffers: Vec::with_capacity(request.count as usize), streaming: false };
        for index in 0..request.count {
            let mut buffer = buffer_query(index);
            ioctl(fd, vidioc::VIDIOC_QUERYBUF, &mut buffer)?;
            let length = buffer.length as usize;
            // SAFETY: QUERYBUF filled `m.offset` for an MMAP buffer (the union's member for this
            // memory type); mapping it shared at that offset and length is what the V4L2 API
            // prescribes, and v4l2::mmap reports MAP_FAILED as an error.
            let start = unsafe {
                v4l::v4l2::mmap(
                    std::ptr::null_mut(),
                    length,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    buffer.m.offset as libc::off_t,
                )?
            };
            stream.buffers.push((start, length));
        }
        for index in 0..request.count {
            stream.queue(index)?;
        }
        let mut kind = VIDEO_CAPTURE;
        ioctl(fd, vidioc::VIDIOC_STREAMON, &mut kind)?;
        stream.streaming = true;
        Ok(stream)
    }

    /// Gives buffer `index` back to the driver.
    fn queue(&mut self, index: u32) -> io::Result<()> {
        ioctl(self.fd, vidioc::VIDIOC_QBUF, &mut buffer_query(index))
    }

    /// Waits up to `timeout` for a frame; when several are ready, returns the newest and queues
    /// the older ones again at once.
    fn newest(&mut self, timeout: Duration) -> io::Result<Option<Ready>> {
        let mut poll = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        let millis = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            // A signal for the service (SIGHUP, SIGTERM) landed on this thread: look again.
            return if error.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(error) };
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut newest: Option<Ready> = None;
        loop {
            let mut buffer = buffer_query(0);
            match ioctl(self.fd, vidioc::VIDIOC_DQBUF, &mut buffer) {
                Ok(()) => {}
                // Nothing (more) ready: the device is opened non-blocking.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    if let Some(older) = newest.take() {
                        // Best effort: the run is ending with `error` anyway.
                        let _ = self.queue(older.index);
                    }
                    return Err(error);
                }
            }
            if let Some(older) = newest.take() {
                self.queue(older.index)?;
            }
            if buffer.index as usize >= self.buffers.len() {
                return Err(io::Error::other(format!("the driver returned buffer {} of {}", buffer.index, self.buffers.len())));
            }
            newest = Some(Ready {
                index: buffer.index,
                bytes_used: buffer.bytesused as usize,
                flags: buffer.flags,
                sequence: buffer.sequence,
                age: monotonic_age(&buffer),
            });
        }
        if newest.is_none() && poll.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            // Nothing to dequeue, yet the driver flags an error: it would flag it forever.
            return Err(io::Error::other("the device reported an error and has no frame"));
        }
        Ok(newest)
    }

    /// The bytes of a dequeued buffer (its `bytesused`, at most its length).
    fn bytes(&self, ready: &Ready) -> &[u8] {
        let (start, length) = self.buffers[ready.index as usize];
        // SAFETY: the mapping is valid for `length` bytes until Drop unmaps it, which cannot
        // happen while `self` is borrowed; the buffer is dequeued, so the driver does not write
        // it until `queue`, which needs `&mut self` and so ends this borrow first.
        let buffer = unsafe { std::slice::from_raw_parts(start.cast::<u8>(), length) };
        &buffer[..ready.bytes_used.min(length)]
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Errors are ignored: after an unplug every call fails with ENODEV, and the kernel frees
        // the buffers with the file descriptor anyway.
        if self.streaming {
            let mut kind = VIDEO_CAPTURE;
            let _ = ioctl(self.fd, vidioc::VIDIOC_STREAMOFF, &mut kind);
        }
        for &(start, length) in &self.buffers {
            // SAFETY: each (start, length) is a mapping made in `start` and not unmapped since;
            // no slice of it outlives this borrow of `self`.
            let _ = unsafe { v4l::v4l2::munmap(start, length) };
        }
        // SAFETY: zeroed: plain integers.
        let mut release =
            v4l2_requestbuffers { count: 0, type_: VIDEO_CAPTURE, memory: MEMORY_MMAP, ..unsafe { std::mem::zeroed() } };
        let _ = ioctl(self.fd, vidioc::VIDIOC_REQBUFS, &mut release);
    }
}

/// A capture MMAP buffer descriptor for `index`.
fn buffer_query(index: u32) -> v4l2_buffer {
    // SAFETY: v4l2_buffer is integers, a timeval, a timecode and a union of an integer and
    // pointers; all zeros is a valid value of each (null pointers are never dereferenced here).
    v4l2_buffer { index, type_: VIDEO_CAPTURE, memory: MEMORY_MMAP, ..unsafe { std::mem::zeroed() } }
}

/// How long ago a buffer's frame was captured, when its timestamp is CLOCK_MONOTONIC (UVC's is).
fn monotonic_age(buffer: &v4l2_buffer) -> Option<Duration> {
    if buffer.flags & TIMESTAMP_MASK != TIMESTAMP_MONOTONIC {
        return None;
    }
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return None;
    }
    let captured =
        Duration::new(u64::try_from(buffer.timestamp.tv_sec).ok()?, u32::try_from(buffer.timestamp.tv_usec).ok()? * 1000);
    let now = Duration::new(u64::try_from(now.tv_sec).ok()?, u32::try_from(now.tv_nsec).ok()?);
    now.checked_sub(captured)
}

/// An ioctl on a V4L2 structure, retried when a signal interrupts it.
fn ioctl<T>(fd: c_int, request: vidioc::_IOC_TYPE, argument: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: every call site pairs the request with the structure type it encodes
        // (VIDIOC_X takes struct v4l2_x, STREAMON/OFF an int-sized buffer type), and `argument`
        // is a valid, exclusive reference for the duration of the call.
        match unsafe { v4l::v4l2::ioctl(fd, request, (argument as *mut T).cast::<c_void>()) } {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// Refuses nodes that cannot stream video frames (the metadata node a UVC camera also has, a
/// codec, an output).
fn check_capabilities(fd: c_int, path: &Path) -> Result<(), SourceError> {
    // SAFETY: zeroed: byte arrays and integers.
    let mut capability: v4l2_capability = unsafe { std::mem::zeroed() };
    ioctl(fd, vidioc::VIDIOC_QUERYCAP, &mut capability).map_err(|error| {
        if error.raw_os_error() == Some(libc::ENOTTY) {
            SourceError::Unsupported(format!("{}: not a V4L2 device", path.display()))
        } else {
            device_error(path, "asking what the device is", error)
        }
    })?;
    // device_caps describe this node; `capabilities` the whole physical device.
    let caps = if capability.capabilities & V4L2_CAP_DEVICE_CAPS != 0 { capability.device_caps } else { capability.capabilities };
    if caps & V4L2_CAP_VIDEO_CAPTURE == 0 || caps & V4L2_CAP_STREAMING == 0 {
        let card = String::from_utf8_lossy(&capability.card);
        return Err(SourceError::Unsupported(format!(
            "{} ({}) is not a streaming video capture node; a UVC camera's second node is its metadata: use the first (`v4l2-ctl --list-devices`)",
            path.display(),
            card.trim_end_matches('\0')
        )));
    }
    Ok(())
}

/// Sets MJPEG if offered, else YUYV, at the device's current frame size.
fn negotiate_format(fd: c_int, path: &Path) -> Result<Format, SourceError> {
    let offered = offered_formats(fd).map_err(|error| device_error(path, "listing its formats", error))?;
    let Some(&wanted) = [MJPEG, JPEG, YUYV].iter().find(|fourcc| offered.contains(fourcc)) else {
        let names = offered.iter().map(|&fourcc| fourcc_name(fourcc)).collect::<Vec<_>>().join(", ");
        return Err(SourceError::Unsupported(format!("{} offers {names}; this source reads MJPEG or YUYV", path.display())));
    };
    // SAFETY: zeroed: integers and a union of plain structures.
    let mut format: v4l2_format = unsafe { std::mem::zeroed() };
    format.type_ = VIDEO_CAPTURE;
    ioctl(fd, vidioc::VIDIOC_G_FMT, &mut format).map_err(|error| device_error(path, "reading its format", error))?;
    // SAFETY: for VIDEO_CAPTURE the union member in use is `pix` (G_FMT filled it).
    let pix = unsafe { &mut format.fmt.pix };
    pix.pixelformat = wanted;
    pix.field = v4l2_field_V4L2_FIELD_ANY;
    // Left for the driver to compute for the new format.
    pix.bytesperline = 0;
    pix.sizeimage = 0;
    ioctl(fd, vidioc::VIDIOC_S_FMT, &mut format).map_err(|error| device_error(path, "setting its format", error))?;
    // SAFETY: as above; S_FMT wrote back the format it set.
    let pix = unsafe { format.fmt.pix };
    if pix.pixelformat != wanted {
        return Err(SourceError::Protocol(format!(
            "{}: asked for {}, the driver set {}",
            path.display(),
            fourcc_name(wanted),
            fourcc_name(pix.pixelformat)
        )));
    }
    Ok(Format { fourcc: pix.pixelformat, width: pix.width, height: pix.height, bytes_per_line: pix.bytesperline })
}

/// The pixel formats the device offers for video capture.
fn offered_formats(fd: c_int) -> io::Result<Vec<u32>> {
    let mut formats = Vec::new();
    // A driver lists a handful; the bound only guards against one that never says EINVAL.
    for index in 0..64 {
        // SAFETY: zeroed: integers and a byte array.
        let mut description: v4l2_fmtdesc = unsafe { std::mem::zeroed() };
        description.index = index;
        description.type_ = VIDEO_CAPTURE;
        match ioctl(fd, vidioc::VIDIOC_ENUM_FMT, &mut description) {
            Ok(()) => formats.push(description.pixelformat),
            // EINVAL marks the end of the list.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => break,
            Err(error) => return Err(error),
        }
    }
    Ok(formats)
}

/// "MJPG", "YUYV", … (or the number, when not printable).
fn fourcc_name(fourcc: u32) -> String {
    let bytes = fourcc.to_le_bytes();
    if bytes.iter().all(|byte| byte.is_ascii_graphic() || *byte == b' ') {
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    } else {
        format!("{fourcc:#010x}")
    }
}

fn open_error(path: &Path, error: io::Error) -> SourceError {
    let hint = match error.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => " (is the camera plugged in? `v4l2-ctl --list-devices`)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (the service's user needs the `video` group)",
        Some(libc::EBUSY) => " (another program is using the camera)",
        _ => "",
    };
    SourceError::io(format!("opening {}{hint}", path.display()), error)
}

fn device_error(path: &Path, doing: &str, error: io::Error) -> SourceError {
    if error.raw_os_error() == Some(libc::ENODEV) {
        return SourceError::io(format!("{}: the camera was unplugged ({doing})", path.display()), error);
    }
    SourceError::io(format!("{}: {doing}", path.display()), error)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::serve::frame::{FramePayload, Wake};

    #[test]
    fn fourcc_names_read_as_v4l2_prints_them() {
        assert_eq!(fourcc_name(MJPEG), "MJPG");
        assert_eq!(fourcc_name(YUYV), "YUYV");
        assert_eq!(fourcc_name(u32::from_le_bytes(*b"Y8  ")), "Y8");
        assert_eq!(fourcc_name(7), "0x00000007");
    }

    #[test]
    fn a_missing_device_is_an_error_with_a_hint_not_a_panic() {
        let mut source = V4l2Source::new("/dev/video-does-not-exist".into(), &SourceOptions::default());
        let mailbox = Mailbox::new(Arc::new(Wake::default()));
        let error = source.run(&mailbox, &StopToken::new()).expect_err("no such device").to_string();
        assert!(error.contains("plugged in"), "{error}");
    }

    #[test]
    fn a_file_that_is_not_a_device_is_refused_as_unsupported() {
        let mut source = V4l2Source::new("/dev/null".into(), &SourceOptions::default());
        let mailbox = Mailbox::new(Arc::new(Wake::default()));
        let error = source.run(&mailbox, &StopToken::new()).expect_err("not V4L2");
        assert!(matches!(error, SourceError::Unsupported(_)), "{error}");
    }

    fn camera() -> PathBuf {
        std::env::var_os("CAC_EDGE_V4L2_DEVICE").map_or_else(|| PathBuf::from("/dev/video0"), PathBuf::from)
    }

    /// On a box with a camera: `cargo test --features v4l2 -- --ignored v4l2`.
    #[test]
    #[ignore = "needs a V4L2 camera (/dev/video0 or CAC_EDGE_V4L2_DEVICE)"]
    fn v4l2_camera_delivers_decodable_frames_and_stops_within_the_poll_interval() {
        let mailbox = Arc::new(Mailbox::new(Arc::new(Wake::default())));
        let stop = StopToken::new();
        let runner = {
            let (mailbox, stop) = (Arc::clone(&mailbox), stop.clone());
            std::thread::spawn(move || V4l2Source::new(camera(), &SourceOptions::default()).run(&mailbox, &stop))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let frame = loop {
            if let Some(frame) = mailbox.take() {
                break frame;
            }
            assert!(Instant::now() < deadline, "no frame in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let image = match frame.payload {
            FramePayload::Encoded(bytes) => image::load_from_memory(&bytes).expect("the MJPEG frame decodes").to_rgb8(),
            FramePayload::Rgb(image) => (*image).clone(),
        };
        assert!(image.width() > 0 && image.height() > 0);
        let stopped = Instant::now();
        stop.stop();
        let end = runner.join().expect("the source thread").expect("a clean stop");
        assert_eq!(end, SourceEnd::Stopped);
        assert!(stopped.elapsed() < StopToken::POLL * 3, "stopped after {:?}", stopped.elapsed());
    }
}
