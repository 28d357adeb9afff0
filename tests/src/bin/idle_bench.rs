//! `switchyard-idle-bench`: memory per idle connection on an edge process.
//!
//! Opens `--connections` authenticated WebSocket connections to an edge
//! (spread over several loopback source addresses), waits for `ready` on
//! each, holds them idle, and reports the edge's RSS (from /proc) before and
//! after: the delta divided by the count is the edge memory per idle
//! connection. Bounded by count and by `--timeout-s`. Run it through
//! `scripts/bench-idle.sh`, which starts the fleet as separate processes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use switchyard_edge::config::DEV_JWT_SECRET;
use switchyard_tests::tokens::token;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[derive(Parser)]
struct Args {
    /// Edge WebSocket address (host:port).
    #[arg(long, default_value = "127.0.0.1:18080")]
    edge: std::net::SocketAddr,
    /// The edge's process id (its RSS is read from /proc).
    #[arg(long)]
    edge_pid: u32,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Loopback source addresses to spread over (127.0.0.1 ..= 127.0.0.N).
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Distinct users (connections are spread over them).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let before = rss_kib(a.edge_pid)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(a.connections);
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut next = 0usize;
    while held.len() < a.connections {
        while next < a.connections && pending.len() < 256 {
            let i = next;
            next += 1;
            let src = std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % a.sources.max(1) as usize) as u8);
            let edge = a.edge;
            let user = format!("idle{}", i % a.users.max(1));
            pending.push(async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind((src, 0).into())?;
                let stream = socket.connect(edge).await?;
                let mut req = format!("ws://{edge}/ws").into_client_request()?;
                let t = token(DEV_JWT_SECRET, &user, 24 * 3600, json!({}));
                req.headers_mut()
                    .insert("Authorization", HeaderValue::from_str(&format!("Bearer {t}"))?);
                let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
                // Wait for `ready`.
                match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(_))) => anyhow::Ok(ws),
                    _ => bail!("no ready"),
                }
            });
        }
        match tokio::time::timeout_at(deadline.into(), pending.next()).await {
            Ok(Some(Ok(ws))) => held.push(ws),
            Ok(Some(Err(e))) => bail!("connection {} failed: {e}", held.len()),
            Ok(None) => break,
            Err(_) => bail!("timed out with {} of {} connected", held.len(), a.connections),
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    // Let the edge settle (allocator, lazily grown buffers) before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(a.edge_pid)?;
    let per_conn = (after.saturating_sub(before) as f64 * 1024.0) / held.len() as f64;
    println!(
        "{}",
        json!({"connections": held.len(), "edge_rss_before_kib": before, "edge_rss_after_kib": after,
               "edge_bytes_per_connection": per_conn.round(), "connect_seconds": (connect_s * 100.0).round() / 100.0})
    );
    Ok(())
}
