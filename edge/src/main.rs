//! `switchyard-edge`: parses configuration and runs the edge until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use switchyard_edge::{start, EdgeConfig};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = EdgeConfig::parse();
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
