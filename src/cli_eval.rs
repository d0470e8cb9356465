//! `cac-edge eval`: a calibration report on a labeled image set.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub(crate) struct EvalArgs {}

pub(crate) fn run(_args: &EvalArgs) -> Result<ExitCode> {
    anyhow::bail!("eval is not written yet")
}
