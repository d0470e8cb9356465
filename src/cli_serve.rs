//! `cac-edge serve`: the always-on camera service, configured by serve.toml.
//!
//! Signals: SIGTERM/SIGINT stop intake, finish the frame in flight, flush and exit 0 within
//! [`SHUTDOWN_GRACE`]; SIGHUP reloads the configuration, the model and the outputs (a file of
//! JSON lines is reopened for logrotate even when the new configuration is refused).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use cac_edge::serve::config::{self, DEFAULT_CONFIG_PATH};
use cac_edge::serve::Service;
use cac_edge::Runtime;

use crate::cli_args::RUNTIME;

/// How long a stop may take, from SIGTERM to exit.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);

const SERVICE: &str = "Service";

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The service's configuration (TOML; docs/FORMATS.md §7).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH, help_heading = SERVICE)]
    config: PathBuf,
    /// Check the configuration, open the bundle and verify the cache it names, then exit (0 valid,
    /// 2 not) without starting any camera.
    #[arg(long, help_heading = SERVICE)]
    check_config: bool,
    /// ONNX Runtime shared library (default: service.onnxruntime in the config, then
    /// ORT_DYLIB_PATH, then the default locations).
    #[arg(long, value_name = "FILE", help_heading = RUNTIME)]
    ort_lib: Option<PathBuf>,
}

pub(crate) fn run(args: &ServeArgs) -> Result<ExitCode> {
    let config = config::load(&args.config)?;
    let library = args.ort_lib.clone().or_else(|| config.service.onnxruntime.clone());
    let runtime = Runtime::load(library.as_deref())?;
    if args.check_config {
        return check(config, &runtime);
    }
    // Signals are caught before the service starts: a SIGTERM during start-up waits its turn
    // instead of killing the process half-way.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install the signal handlers")?;
    let signal_handle = signals.handle();
    let (signal_tx, received) = mpsc::channel();
    std::thread::Builder::new().name("signals".to_string()).spawn(move || {
        for signal in signals.forever() {
            if signal_tx.send(signal).is_err() {
                break;
            }
        }
    })?;
    let mut service = Service::start(config, &runtime)?;
    loop {
        match received.recv_timeout(Duration::from_millis(250)) {
            Ok(SIGHUP) => {
                tracing::info!("SIGHUP: reloading {}", args.config.display());
                if service.reload(config::load(&args.config)).is_err() {
                    service.reopen_outputs();
                }
            }
            Ok(signal) => {
                tracing::info!("{}: stopping", if signal == SIGINT { "SIGINT" } else { "SIGTERM" });
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if service.is_finished() => {
                tracing::info!("every source has ended: stopping");
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    service.shut_down(SHUTDOWN_GRACE);
    signal_handle.close();
    Ok(ExitCode::SUCCESS)
}

/// `--check-config`: everything `start` would check, without starting.
fn check(config: cac_edge::serve::ServeConfig, runtime: &std::sync::Arc<Runtime>) -> Result<ExitCode> {
    let classifier = cac_edge::serve::service::open_classifier(&config, runtime)
        .with_context(|| format!("{}: [model] cannot be opened", config.path.display()))?;
    tracing::info!(
        "{}: valid; {} camera(s) ({}), bundle {}, {} classes, threshold {}",
        config.path.display(),
        config.cameras.len(),
        config.cameras.iter().map(|camera| format!("{} ← {}", camera.name, camera.source)).collect::<Vec<_>>().join(", "),
        classifier.bundle().name(),
        classifier.cache().num_classes(),
        classifier.threshold().value,
    );
    Ok(ExitCode::SUCCESS)
}
