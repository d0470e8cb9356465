//! `cac-edge doctor`: the checks as text (default) or JSON, exit 2 when one fails.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use cac_edge::doctor::{self, Check, DoctorRequest, Status};
use cac_edge::runtime::RuntimeError;
use cac_edge::Runtime;

use crate::cli_args::{probability, RuntimeArgs, MODEL, OUTPUT};
use crate::cli_output::print_stdout;

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// A bundle to check: its files, hashes, and that every encoder loads.
    #[arg(long, value_name = "DIR", help_heading = MODEL)]
    bundle: Option<PathBuf>,
    /// A cache to check against the bundle (needs --bundle).
    #[arg(long, requires = "bundle", value_name = "FILE", help_heading = MODEL)]
    cache: Option<PathBuf>,
    /// The threshold classify will be run with (reported with the calibration).
    #[arg(long, value_parser = probability, help_heading = OUTPUT)]
    threshold: Option<f64>,
    /// The service's config (serve.toml): checks it, each camera's source, the bundle and cache it
    /// names (unless --bundle is given), and — when the service runs — each camera's last frame
    /// age from its HTTP API.
    #[cfg(feature = "serve")]
    #[arg(long, value_name = "FILE", help_heading = MODEL)]
    config: Option<PathBuf>,
    /// Print the checks as JSON instead of text.
    #[arg(long, help_heading = OUTPUT)]
    json: bool,
    #[command(flatten)]
    pub(crate) runtime: RuntimeArgs,
}

/// `runtime` is the outcome of loading ONNX Runtime: doctor reports a failure instead of stopping.
pub(crate) fn run(args: &DoctorArgs, runtime: Result<&Arc<Runtime>, &RuntimeError>) -> Result<ExitCode> {
    #[cfg_attr(not(feature = "serve"), allow(unused_mut, reason = "only --config (serve) fills the request in"))]
    let mut request = DoctorRequest {
        session: args.runtime.session_options(),
        bundle: args.bundle.clone(),
        cache: args.cache.clone(),
        threshold: args.threshold,
    };
    #[cfg(feature = "serve")]
    let service_checks = match &args.config {
        Some(path) => {
            let (checks, config) = cac_edge::serve::doctor::service_checks(path);
            if let (Some(config), None) = (config, &request.bundle) {
                request.bundle = Some(config.model.bundle);
                request.cache = Some(config.model.cache);
                request.threshold = request.threshold.or(config.model.options.threshold);
                request.session = config.model.options.session;
            }
            checks
        }
        None => Vec::new(),
    };
    #[allow(unused_mut, reason = "only the serve feature adds checks")]
    let mut checks = doctor::examine(&request, runtime.map(Arc::as_ref));
    #[cfg(feature = "serve")]
    checks.extend(service_checks);
    let text = if args.json { serde_json::to_string_pretty(&checks)? + "\n" } else { human(&checks) };
    print_stdout(&text)?;
    Ok(if doctor::healthy(&checks) { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn human(checks: &[Check]) -> String {
    let mut text = String::new();
    for check in checks {
        let status = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(text, "[{status}] {}: {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            let _ = writeln!(text, "       fix: {fix}");
        }
    }
    text
}
