//! PLACEHOLDER (being written): frames on standard input.
use super::{FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{Mailbox, StopToken};
/// Frames on standard input.
pub struct StdinSource;
impl StdinSource {
    /// A reader of standard input.
    pub fn new(_options: &SourceOptions) -> StdinSource { StdinSource }
}
impl FrameSource for StdinSource {
    fn run(&mut self, _mailbox: &Mailbox, _stop: &StopToken) -> Result<SourceEnd, SourceError> {
        Err(SourceError::Unsupported("not yet".into()))
    }
}
