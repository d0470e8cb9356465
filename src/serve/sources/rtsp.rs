//! PLACEHOLDER (being written): frames on an RTSP camera.
use super::{FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{Mailbox, StopToken};
/// Frames on an RTSP camera.
pub struct RtspSource;
impl RtspSource {
    /// A reader of an RTSP camera.
    pub fn new(_url: &str, _options: &SourceOptions) -> RtspSource { RtspSource }
}
impl FrameSource for RtspSource {
    fn run(&mut self, _mailbox: &Mailbox, _stop: &StopToken) -> Result<SourceEnd, SourceError> {
        Err(SourceError::Unsupported("not yet".into()))
    }
}
