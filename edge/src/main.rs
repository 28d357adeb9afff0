//! `switchyard-edge`: parses configuration and runs the edge until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use switchyard_edge::{start, EdgeConfig};

/// jemalloc with background purging: memory a storm took goes back to the
/// system within seconds (glibc's malloc kept it: docs/BENCHMARKS.md,
/// "Reconnect storms").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = EdgeConfig::parse();
    switchyard_runtime::logging::init(config.log_format);
    tracing::info!(config = ?config, "effective configuration");
    let edge = match start(config).await {
        Ok(r) => r,
        Err(e) => return switchyard_runtime::exit_on_start_error("switchyard-edge", &e, e.is_config()),
    };
    switchyard_runtime::shutdown::wait_for_signal().await;
    tracing::info!("SIGTERM: draining");
    edge.drain().await;
    edge.shutdown().await;
    ExitCode::SUCCESS
}
