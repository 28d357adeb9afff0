//! `switchyard-demo-producer`: publishes demo market ticks and pattern
//! alerts to NATS, as a real producer would, so a new fleet has events flowing.

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use switchyard_common::transcode::json_to_msgpack;

#[derive(Parser)]
#[command(about = "Publish demo ticks and pattern alerts to a Switchyard fleet")]
struct Args {
    /// NATS URL.
    #[arg(long, env = "SWITCHYARD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Subject prefix.
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "sy")]
    prefix: String,
    /// Ticks per second (over all symbols).
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Stop after this many seconds (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
}

const SYMBOLS: [&str; 6] = ["AAPL", "TSLA", "NVDA", "MSFT", "AMZN", "META"];
const PATTERNS: [&str; 4] = ["BreakoutBO", "HeadShoulders", "DoubleBottom", "BullFlag"];
const TIERS: [&str; 3] = ["intraday", "daily", "weekly"];

/// A tiny deterministic generator; the demo needs variety, not randomness.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let client = async_nats::connect(a.nats_url.as_str()).await?;
    eprintln!(
        "publishing ~{} ticks/s and a pattern alert every ~2 s to {} (prefix {})",
        a.rate, a.nats_url, a.prefix
    );
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut prices: Vec<f64> = vec![190.0, 250.0, 120.0, 420.0, 180.0, 500.0];
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / a.rate.max(1)));
    let deadline = (a.duration_s > 0).then(|| tokio::time::Instant::now() + Duration::from_secs(a.duration_s));
    let mut n: u64 = 0;
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        n += 1;
        let i = (rng.next() % SYMBOLS.len() as u64) as usize;
        prices[i] *= 1.0 + (rng.unit() - 0.5) * 0.002;
        let sym = SYMBOLS[i];
        let tick_event = json!({
            "data": {"symbol": sym, "price": (prices[i] * 100.0).round() / 100.0, "seq": n},
            "target": {"match": {"symbol": sym}},
            "durable": false,
        });
        buf.clear();
        json_to_msgpack(&tick_event, &mut buf);
        client
            .publish(format!("{}.events.tick.{sym}", a.prefix), buf.clone().into())
            .await?;
        if n.is_multiple_of(2 * a.rate.max(1)) {
            let confidence = (rng.unit() * 100.0).round() / 100.0;
            let pattern = PATTERNS[(rng.next() % PATTERNS.len() as u64) as usize];
            let tier = TIERS[(rng.next() % TIERS.len() as u64) as usize];
            let alert = json!({
                "id": format!("alert-{n}"),
                "prio": "high",
                "data": {"symbol": sym, "pattern": pattern, "tier": tier, "confidence": confidence, "price": prices[i]},
                "target": {"match": {"symbol": sym, "pattern_type": pattern, "tier": tier}, "values": {"confidence": confidence}},
            });
            buf.clear();
            json_to_msgpack(&alert, &mut buf);
            client
                .publish(format!("{}.events.pattern", a.prefix), buf.clone().into())
                .await?;
        }
    }
    client.flush().await?;
    Ok(())
}
