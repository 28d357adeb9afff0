//! `switchyard-snapshot-bench`: how long a `subscribe` with `snapshot: true`
//! takes, from the request to its `ok` and every snapshot event, against a
//! running fleet (scripts/bench-load.sh runs it beside a load scenario with
//! `BESIDE`).
//!
//! It stores the latest event of `--keys` keys of one type (each key its own
//! `symbol`), then, `--rounds` times, subscribes with `--values` symbols
//! (a new subscription name each round, so each is a new subscription) and
//! waits for the `ok` and the `--values` snapshot events. Prints the
//! latencies' percentiles as one JSON line.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use switchyard_edge::config::DEV_JWT_SECRET;
use switchyard_tests::tokens::token;
use switchyard_tests::ws_client::{Incoming, WsClient};

#[derive(Parser)]
#[command(about = "Measure subscribe-with-snapshot latency against a running fleet")]
struct Args {
    /// NATS, where the keyed events are published.
    #[arg(long, env = "SWITCHYARD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The edge's WebSocket URL.
    #[arg(long, env = "SY_WS_URL", default_value = "ws://127.0.0.1:8080/ws")]
    ws_url: String,
    /// Keys of the type with a latest event.
    #[arg(long, default_value_t = 5000)]
    keys: usize,
    /// Filter values (symbols) per subscription.
    #[arg(long, default_value_t = 10)]
    values: usize,
    /// Subscriptions measured.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Wait before starting (lets a load scenario warm up), in seconds.
    #[arg(long, default_value_t = 0)]
    delay_s: u64,
    /// Pause between rounds, in ms (each round is two ops; the edge's op
    /// rate limit is 20 per second by default).
    #[arg(long, default_value_t = 110)]
    pace_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    tokio::time::sleep(Duration::from_secs(a.delay_s)).await;
    let nats = async_nats::connect(a.nats_url.as_str()).await?;
    let js = async_nats::jetstream::new(nats);
    // The latest event of every key, acknowledged so they are stored before we measure.
    let mut acks = Vec::with_capacity(a.keys);
    for k in 0..a.keys {
        let event = json!({
            "data": {"symbol": format!("S{k}"), "px": k},
            "target": {"match": {"symbol": format!("S{k}")}},
            "durable": false,
        });
        let mut payload = Vec::new();
        switchyard_common::transcode::json_to_msgpack(&event, &mut payload);
        acks.push(js.publish(format!("sy.events.quote.S{k}"), payload.into()).await?);
        if acks.len() >= 512 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    let tok = token(DEV_JWT_SECRET, "snapshot-bench", 3600, json!({}));
    let (mut c, _) = WsClient::connect_ready(&a.ws_url, &tok, &[]).await?;
    // Until the routers have stored every key, snapshots are short: wait for a full one.
    let probe: Vec<String> = (a.keys - a.values.min(a.keys)..a.keys)
        .map(|k| format!("S{k}"))
        .collect();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if subscribe(&mut c, "probe", &probe, 0).await? == probe.len() {
            break;
        }
        if Instant::now() > until {
            bail!("the last keys never reached the snapshot store");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut micros = Vec::with_capacity(a.rounds);
    for round in 0..a.rounds {
        let first = (round * 97) % (a.keys - a.values.min(a.keys) + 1);
        let symbols: Vec<String> = (first..first + a.values).map(|k| format!("S{}", k % a.keys)).collect();
        let started = Instant::now();
        let got = subscribe(&mut c, &format!("r{round}"), &symbols, round as u32 + 1).await?;
        micros.push(started.elapsed().as_micros() as u64);
        if got != a.values {
            bail!("round {round}: {got} snapshot events, expected {}", a.values);
        }
        tokio::time::sleep(Duration::from_millis(a.pace_ms)).await;
        // Unsubscribe so the subscription cap is never reached.
        let r = c
            .request(
                json!({"op": "unsubscribe", "sub": format!("r{round}")}),
                1_000_000 + round as u32,
            )
            .await?;
        if r["op"] != "ok" {
            bail!("unsubscribe refused: {r}");
        }
    }
    micros.sort_unstable();
    let pct = |p: f64| micros[((micros.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    println!(
        "{}",
        json!({
            "keys": a.keys, "values": a.values, "rounds": a.rounds,
            "ms_p50": pct(0.5), "ms_p90": pct(0.9), "ms_p99": pct(0.99), "ms_max": pct(1.0),
            "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        })
    );
    Ok(())
}

/// Subscribes `name` to `symbols` with a snapshot and waits for its `ok`
/// and its snapshot events (no more arrive after the `ok` once those are
/// in: live quotes are not published here); how many snapshot events came.
async fn subscribe(c: &mut WsClient, name: &str, symbols: &[String], id: u32) -> Result<usize> {
    c.send(&json!({"op": "subscribe", "id": id, "sub": name, "type": "quote",
        "filters": {"symbol": symbols}, "snapshot": true}))
        .await?;
    let mut ok = false;
    let mut events = 0usize;
    loop {
        // After the `ok`, wait briefly for stragglers only while some are missing.
        let wait = if ok && events >= symbols.len() {
            break;
        } else if ok {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(10)
        };
        match c.next_within(wait).await.context("reading")? {
            None if ok => break,
            None => bail!("no ok for {name}"),
            Some(Incoming::Closed(code, why)) => bail!("closed {code} {why}"),
            Some(Incoming::Frame(f)) => match f["op"].as_str() {
                Some("ok") if f["id"] == id => ok = true,
                Some("error") => bail!("{name}: {f}"),
                Some("event") if f["snapshot"] == true => events += 1,
                Some("batch") => {
                    events += f["events"]
                        .as_array()
                        .map_or(0, |evs| evs.iter().filter(|e| e["snapshot"] == true).count())
                }
                _ => {}
            },
        }
    }
    Ok(events)
}
