//! PLACEHOLDER (being written): frames on an HTTP camera.
use super::{FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{Mailbox, StopToken};
/// Frames on an HTTP camera.
pub struct HttpSource;
impl HttpSource {
    /// A reader of an HTTP camera.
    pub fn new(_url: &str, _options: &SourceOptions) -> HttpSource { HttpSource }
}
impl FrameSource for HttpSource {
    fn run(&mut self, _mailbox: &Mailbox, _stop: &StopToken) -> Result<SourceEnd, SourceError> {
        Err(SourceError::Unsupported("not yet".into()))
    }
}
