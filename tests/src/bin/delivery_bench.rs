//! `switchyard-delivery-bench`: deliveries per second through the whole
//! path (producer → NATS → router → [delivery log] → edge → WebSocket), on
//! this machine, durable versus non-durable.
//!
//! Starts its own nats-server (file storage, as in production), a router and
//! an edge in-process, connects `--users` MessagePack clients that each
//! subscribe to every `bench` event, then publishes `--events` events in
//! windows of `--window`, waiting for every client to receive each window
//! before sending the next (closed loop, so no queue overflows). Bounded by
//! count and by `--timeout-s`. Prints one JSON line per mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use switchyard_common::transcode::json_to_msgpack;
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::WsClient;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Connected users (one connection each).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Events published per mode (each reaches every user).
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// Events in flight before waiting for clients to catch up.
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Give up after this many seconds per mode.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    // Flow control off: this measures the delivery path, not the rate limit.
    let fleet = Fleet::start_with(|c| {
        c.rate_per_s = 10_000_000;
        c.burst = 10_000_000;
    })
    .await?;
    let received = Arc::new(AtomicU64::new(0));
    for u in 0..a.users {
        let (mut c, _) =
            WsClient::connect_ready(&fleet.ws_url(), &fleet.token(&format!("user{u}"), json!({})), &[]).await?;
        c.ok(json!({"op":"subscribe","sub":"all","type":"bench"}), 1).await?;
        let received = received.clone();
        tokio::spawn(async move {
            let mut ws = c.into_inner();
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Binary(b) = msg {
                    received.fetch_add(count_events(&b), Ordering::Relaxed);
                }
            }
        });
    }
    for durable in [false, true] {
        let start_count = received.load(Ordering::Relaxed);
        let payload = |i: usize| {
            let mut buf = Vec::new();
            let ev =
                json!({"data": {"i": i, "px": 101.25, "sym": "AAPL"}, "target": {"match": {}}, "durable": durable});
            json_to_msgpack(&ev, &mut buf);
            buf
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(a.timeout_s);
        let mut sent = 0usize;
        while sent < a.events {
            let n = a.window.min(a.events - sent);
            for i in sent..sent + n {
                fleet.producer.publish("sy.events.bench", payload(i).into()).await?;
            }
            fleet.producer.flush().await?;
            sent += n;
            let want = start_count + (sent * a.users) as u64;
            while received.load(Ordering::Relaxed) < want {
                if Instant::now() > deadline {
                    bail!(
                        "timed out: {} of {} deliveries",
                        received.load(Ordering::Relaxed) - start_count,
                        sent * a.users
                    );
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let deliveries = (a.events * a.users) as f64;
        println!(
            "{}",
            json!({"mode": if durable {"durable"} else {"non_durable"}, "users": a.users, "events": a.events,
                   "deliveries": deliveries, "seconds": (secs * 1000.0).round() / 1000.0,
                   "deliveries_per_s": (deliveries / secs).round()})
        );
    }
    fleet.shutdown().await;
    Ok(())
}

/// Events in one frame: 1 for `event`, the array length for `batch`.
fn count_events(frame: &[u8]) -> u64 {
    let Ok(v) = rmpv::decode::read_value(&mut &frame[..]) else {
        return 0;
    };
    let Some(map) = v.as_map() else { return 0 };
    match switchyard_common::value::get(map, "op").and_then(|o| o.as_str()) {
        Some("event") => 1,
        Some("batch") => switchyard_common::value::get(map, "events")
            .and_then(|e| e.as_array())
            .map_or(0, |a| a.len() as u64),
        _ => 0,
    }
}
