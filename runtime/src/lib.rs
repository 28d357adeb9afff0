//! What both Switchyard tiers run on: the tokio and NATS side that the router
//! and the edge share, so each concern has one home. `switchyard-common`
//! stays free of tokio and NATS (the protocol is fuzzed and benchmarked
//! alone); anything here may use both, but nothing here knows about routing
//! or connections.
//!
//! # Layout
//! - [`admin`]: the `/healthz`, `/readyz`, `/metrics` endpoint and the Prometheus recorder.
//! - [`http`]: small HTTP response helpers.
//! - [`logging`]: the log filter and the text or JSON log format.
//! - [`nats`]: connecting (bounded wait for the first connection), opening
//!   or creating a KV bucket, the typed [`nats::Storage`] setting.
//! - [`shutdown`]: waiting for SIGTERM or Ctrl-C.
//! - [`clock`]: wall-clock milliseconds.
//! - [`config`]: parsers for shared configuration value types (durations).
//!
//! Also here: [`StartError`] (the start failures both tiers share) and
//! [`exit_on_start_error`] (how a binary reports one and which code it exits with).

pub mod admin;
pub mod clock;
pub mod config;
pub mod http;
pub mod logging;
pub mod nats;
pub mod shutdown;

pub use clock::now_ms;

/// Why a tier could not start, for the causes both tiers share; each tier's
/// own `StartError` wraps it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// NATS could not be reached (or logged in to).
    #[error("cannot connect to NATS")]
    Nats(#[from] nats::NatsConnectError),
    /// A NATS subscription failed.
    #[error("cannot subscribe")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// A listener could not be bound.
    #[error("cannot bind a listener")]
    Bind(#[from] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("cannot install the metrics recorder")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

/// Binds `addr` and returns the listener with the address it got (port 0
/// picks a free one).
pub async fn bind(addr: std::net::SocketAddr) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), StartError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// `error` and each of its sources, joined by `: ` (what a one-line log or
/// an exit message should show).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// What a binary does when its tier did not start: prints `error` with its
/// sources to stderr and returns the exit code, 64 (`EX_USAGE`) when the
/// configuration is at fault, 1 otherwise.
pub fn exit_on_start_error(binary: &str, error: &dyn std::error::Error, config_fault: bool) -> std::process::ExitCode {
    eprintln!("{binary}: {}", error_chain(error));
    if config_fault {
        std::process::ExitCode::from(64)
    } else {
        std::process::ExitCode::FAILURE
    }
}
