//! `switchyard-edge`: parses configuration and runs the edge until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use switchyard_edge::{start, EdgeConfig, StartError};

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
        Err(e @ (StartError::Config(_) | StartError::Auth(_) | StartError::Tls(_))) => {
            eprintln!("switchyard-edge: {e}");
            return ExitCode::from(64);
        }
        Err(e) => {
            eprintln!("switchyard-edge: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    tracing::info!("SIGTERM: draining");
    edge.drain().await;
    edge.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C either");
            }
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
