//! `cac-edge`: the command line over the `cac_edge` library. Each command lives in its own
//! `cli_*` file; this one parses, sets up logging, loads ONNX Runtime once, and turns the outcome
//! into an exit code.
//!
//! Exit codes: 0 every image classified (or stdout closed by its reader); 1 some images failed
//! (the others are reported) or none were found; 2 nothing could run (bad arguments, bundle,
//! cache or ONNX Runtime library).

// stdout carries the JSON lines consumers parse, and a print macro panics on a closed or full
// stream: results go through `cli_output`, messages through tracing.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use cac_edge::Runtime;

mod cli_args;
#[cfg(feature = "tooling")]
mod cli_bench;
mod cli_cache;
mod cli_classify;
mod cli_doctor;
mod cli_errors;
#[cfg(feature = "tooling")]
mod cli_eval;
mod cli_output;
#[cfg(feature = "serve")]
mod cli_serve;

use cli_args::RuntimeArgs;

/// `--version`: the release, the commit, the ONNX Runtime API level and the features built in.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CAC_EDGE_GIT_COMMIT"),
    "; ONNX Runtime API level ",
    "17",
    "+; features: ",
    env!("CAC_EDGE_FEATURES"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "cac-edge",
    version = VERSION,
    about = "Calibrated open-vocabulary CLIP classification on edge devices",
    long_about = "Calibrated open-vocabulary CLIP classification on edge devices.\n\n\
        Runs a fine-tuned CLIP classifier (a bundle of ONNX encoders) through ONNX Runtime and gives \
        every prediction a confidence calibrated by Contrast-Aware Calibration, so a threshold like \
        \"act if confidence >= 0.8\" holds for classes added by name as well as trained ones.\n\n\
        Typical use: `cache build` once per bundle and class list, then `classify` images; \
        `doctor` checks a box; `eval` measures calibration on labeled images.",
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    verbosity: cli_output::Verbosity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build or inspect the text-feature cache of a bundle and a class list.
    #[command(subcommand)]
    Cache(cli_cache::CacheCommand),
    /// Classify images: one JSON line per image on stdout, a summary on stderr.
    Classify(Box<cli_classify::ClassifyArgs>),
    /// Check this box: ONNX Runtime, execution providers, CPU, bundle and cache.
    Doctor(cli_doctor::DoctorArgs),
    /// Calibration report on a labeled image set: metrics, reliability diagrams, thresholds.
    #[cfg(feature = "tooling")]
    Eval(Box<cli_eval::EvalArgs>),
    /// Measure latency and throughput of the encoder and the full pipeline. The images are all
    /// decoded once and kept in memory: a few dozen to a few hundred are enough.
    #[cfg(feature = "tooling")]
    Bench(cli_bench::BenchArgs),
    /// Run the always-on camera service: frames from folders, stdin, HTTP, RTSP or V4L2 cameras,
    /// one JSON line per decision, an HTTP API with health, metrics and each camera's latest
    /// decision (configured by serve.toml; docs/SERVE.md).
    #[cfg(feature = "serve")]
    Serve(cli_serve::ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell to complete for: bash, zsh, fish, elvish or powershell.
        #[arg(help_heading = "Output")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `cac-edge man > cac-edge.1`.
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli_output::init_logging(&cli.verbosity);
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            cli_errors::report(&error);
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    // ONNX Runtime is loaded once, here, by the commands that run encoders, and handed to them.
    let load = |args: &RuntimeArgs| Runtime::load(args.ort_lib.as_deref());
    match &command {
        Command::Cache(cli_cache::CacheCommand::Build(args)) => {
            cli_cache::build(args, &load(&args.runtime)?).map(|()| ExitCode::SUCCESS)
        }
        Command::Cache(cli_cache::CacheCommand::Info { cache }) => cli_cache::info(cache).map(|()| ExitCode::SUCCESS),
        Command::Classify(args) => cli_classify::run(args, &load(&args.runtime)?),
        // doctor reports a library that does not load as its first failed check.
        Command::Doctor(args) => cli_doctor::run(args, load(&args.runtime).as_ref()),
        #[cfg(feature = "tooling")]
        Command::Eval(args) => cli_eval::run(args, &load(&args.runtime)?),
        #[cfg(feature = "tooling")]
        Command::Bench(args) => cli_bench::run(args, &load(&args.runtime)?),
        #[cfg(feature = "serve")]
        Command::Serve(args) => cli_serve::run(args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "cac-edge", &mut script);
            cli_output::print_stdout(&String::from_utf8_lossy(&script)).map(|()| ExitCode::SUCCESS)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            cli_output::print_stdout(&String::from_utf8_lossy(&page)).map(|()| ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every command says what it does and sits under a heading.
    #[test]
    fn every_argument_has_help_and_a_heading() {
        let command = Cli::command();
        command.clone().debug_assert();
        let mut unhelpful = Vec::new();
        let mut commands = vec![command];
        while let Some(command) = commands.pop() {
            for argument in command.get_arguments() {
                let id = argument.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let described = argument.get_help().is_some_and(|help| help.to_string().len() > 10);
                if !described || argument.get_help_heading().is_none() {
                    unhelpful.push(format!("{} {id}", command.get_name()));
                }
            }
            commands.extend(command.get_subcommands().cloned());
        }
        assert!(unhelpful.is_empty(), "arguments without help or heading: {unhelpful:?}");
    }
}
