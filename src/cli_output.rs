//! Where the binary writes, and how it behaves when it cannot.
//!
//! - Results go to stdout, one JSON line each, flushed as soon as known. A closed stdout
//!   (`cac-edge classify … | head -1`) ends the run quietly with exit 0, like ripgrep; any other
//!   write error ends it with the error.
//! - Everything else goes through `tracing` to stderr: ONNX Runtime's own log lines too (ort's
//!   `tracing` feature). `RUST_LOG` sets the filter; otherwise `-q` shows errors only, the default
//!   shows cac-edge's notes and warnings (and ONNX Runtime's warnings), `-v`/`-vv` add debug and
//!   trace lines. A stderr that cannot be written (a full log disk, `2>/dev/full`) never stops
//!   the run: those lines are dropped, the results still written.

use std::fmt;
use std::io::{self, Write};

use clap::Args;
use serde::Serialize;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// `-q` and `-v`.
#[derive(Args)]
#[command(next_help_heading = "Logging")]
pub(crate) struct Verbosity {
    /// Print errors only (RUST_LOG, when set, decides instead).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More detail on stderr: -v debug, -vv trace (RUST_LOG, when set, decides instead).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

impl Verbosity {
    fn default_filter(&self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn,cac_edge=info",
            (false, 1) => "info,cac_edge=debug",
            (false, _) => "trace",
        }
    }
}

/// Routes log events to stderr. Write errors are ignored (never a panic, never a stop).
pub(crate) fn init_logging(verbosity: &Verbosity) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(verbosity.default_filter()));
    let stderr_lines = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(false)
        .event_format(PlainFormat)
        // Its own complaint about a failed write would go through eprintln!, which panics.
        .log_internal_errors(false);
    let subscriber = tracing_subscriber::registry().with(filter).with(stderr_lines);
    // Only fails if a subscriber is already set (not the case in main).
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// "message" for notes, "warning: message", "error: message"; debug and trace lines name their
/// source ("debug ort: …"), since ONNX Runtime's lines arrive there too.
struct PlainFormat;

impl<S, N> FormatEvent<S, N> for PlainFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, context: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let metadata = event.metadata();
        match *metadata.level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            Level::INFO if !metadata.target().starts_with("cac_edge") => write!(writer, "{}: ", metadata.target())?,
            Level::INFO => {}
            level => write!(writer, "{} {}: ", level.as_str().to_lowercase(), metadata.target())?,
        }
        context.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Why writing results stopped.
#[derive(Debug)]
pub(crate) enum OutputError {
    /// The reader went away (a closed pipe): stop quietly.
    Closed,
    /// Any other failure (a full disk): stop and say so.
    Failed(io::Error),
}

/// Results on stdout, one JSON line each.
pub(crate) struct ResultLines {
    out: io::StdoutLock<'static>,
}

impl ResultLines {
    pub(crate) fn new() -> ResultLines {
        ResultLines { out: io::stdout().lock() }
    }

    pub(crate) fn write(&mut self, record: &impl Serialize) -> Result<(), OutputError> {
        cac_edge::report::write_json_line(&mut self.out, record).map_err(|error| match error.kind() {
            io::ErrorKind::BrokenPipe => OutputError::Closed,
            _ => OutputError::Failed(error),
        })
    }
}

/// Plain text on stdout (tables, cache info, completions): a closed pipe stops quietly.
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(error).context("writing to stdout")),
        _ => Ok(()),
    }
}
