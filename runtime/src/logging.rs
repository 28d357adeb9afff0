//! Process logging for both binaries: the `SWITCHYARD_LOG` filter and the
//! `SWITCHYARD_LOG_FORMAT` output format, set up once in `main`.
//!
//! `json` writes one JSON object per line with the event's fields at the top
//! level (`timestamp`, `level`, `target`, `message`, and fields such as a
//! connection's `conn_id`, `user`, `reason`), plus the fields of the
//! enclosing spans, so a log pipeline can index them without parsing text.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: the filter from `SWITCHYARD_LOG`
/// (`tracing` env-filter syntax; `info` when unset or invalid), lines in `format`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
