//! `switchyard-router`: parses configuration and runs the router until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use switchyard_router::{start, RouterConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let config = RouterConfig::parse();
    switchyard_runtime::logging::init(config.log_format);
    tracing::info!(config = ?config, "effective configuration");
    let router = match start(config).await {
        Ok(r) => r,
        Err(e) => return switchyard_runtime::exit_on_start_error("switchyard-router", &e, e.is_config()),
    };
    switchyard_runtime::shutdown::wait_for_signal().await;
    tracing::info!("shutting down");
    router.shutdown().await;
    ExitCode::SUCCESS
}
