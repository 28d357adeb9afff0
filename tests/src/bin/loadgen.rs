//! `switchyard-loadgen`: drives running edges with many WebSocket clients
//! and a NATS producer, accounts for every event, and prints a JSON summary
//! on stdout (progress lines go to stderr). The scenario scripts
//! (`scripts/bench-*.sh`) start the servers and pass their pids with
//! `--watch name=pid`; see docs/BENCHMARKS.md.
//!
//! Exit status: 0 when every expected event arrived once and in order,
//! 1 when anything was lost, duplicated or out of order, 2 on a setup error.

use clap::Parser;
use switchyard_tests::loadgen::{run, LoadConfig};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SWITCHYARD_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cfg = LoadConfig::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard-loadgen: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(summary) => {
            println!("{summary}");
            let bad = ["lost", "duplicated", "out_of_order", "clients_failed"]
                .iter()
                .any(|k| summary[k].as_u64().unwrap_or(0) > 0);
            std::process::exit(i32::from(bad));
        }
        Err(e) => {
            eprintln!("switchyard-loadgen: {e:#}");
            std::process::exit(2);
        }
    }
}
