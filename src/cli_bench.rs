//! `cac-edge bench`: latency and throughput of the encoder and the full pipeline.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub(crate) struct BenchArgs {}

pub(crate) fn run(_args: &BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("bench is not written yet")
}
