//! Frames on standard input: concatenated JPEGs (`ffmpeg … -f image2pipe -c:v mjpeg -`) or
//! multipart MJPEG, told apart by the first bytes. The end of input ends the source for good.

use std::os::fd::{AsFd, BorrowedFd};

use super::stream::{pump, FrameSplitter, PolledFd};
use super::{FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{Mailbox, StopToken};

/// The reader of standard input.
pub struct StdinSource {
    options: SourceOptions,
}

impl StdinSource {
    /// Reads standard input.
    pub fn new(options: &SourceOptions) -> StdinSource {
        StdinSource { options: options.clone() }
    }
}

impl FrameSource for StdinSource {
    fn run(&mut self, mailbox: &Mailbox, stop: &StopToken) -> Result<SourceEnd, SourceError> {
        let stdin = std::io::stdin();
        read_fd(stdin.as_fd(), &self.options, mailbox, stop)
    }
}

/// Reads frames from `fd` until its end (`Finished`) or `stop`. A stream that pauses is not an
/// error here: standard input has no other end to reconnect to, so the stall watchdog (if set)
/// decides.
pub fn read_fd(
    fd: BorrowedFd<'_>,
    options: &SourceOptions,
    mailbox: &Mailbox,
    stop: &StopToken,
) -> Result<SourceEnd, SourceError> {
    let mut splitter = FrameSplitter::detect(options.max_frame_bytes);
    let forever = std::time::Duration::from_secs(u64::MAX / 4);
    pump(&mut PolledFd::new(fd), &mut splitter, mailbox, stop, forever, "stdin")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::frame::Wake;
    use std::io::Write;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    fn jpeg(level: u8) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(24, 16, image::Rgb([level, 0, 0]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut bytes).encode_image(&image).expect("encode");
        bytes
    }

    #[test]
    fn a_pipe_of_jpegs_is_read_to_its_end_and_stop_is_honoured() {
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        let mailbox = Mailbox::new(Arc::new(Wake::default()));
        let frames = [jpeg(1), jpeg(2), jpeg(3)];
        let written = frames.concat();
        let writer_thread = std::thread::spawn(move || {
            writer.write_all(b"junk").expect("write");
            writer.write_all(&written).expect("write");
        });
        let end = read_fd(reader.as_fd(), &SourceOptions::default(), &mailbox, &StopToken::new()).expect("reads");
        writer_thread.join().expect("writer");
        assert_eq!(end, SourceEnd::Finished);
        assert_eq!(mailbox.counters.received.load(Ordering::Relaxed), 3);
        assert_eq!(mailbox.counters.refused.load(Ordering::Relaxed), 1);
        let newest = mailbox.take().expect("a frame");
        assert!(matches!(newest.payload, crate::serve::frame::FramePayload::Encoded(ref bytes) if bytes[..] == frames[2][..]));

        // A pipe that stays open and silent: stop ends the read within a poll.
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let stop = StopToken::new();
        let stopper = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            stopper.stop();
        });
        let started = std::time::Instant::now();
        let end = read_fd(reader.as_fd(), &SourceOptions::default(), &mailbox, &stop).expect("stops");
        assert_eq!(end, SourceEnd::Stopped);
        assert!(started.elapsed() < StopToken::POLL * 3, "{:?}", started.elapsed());
    }
}
