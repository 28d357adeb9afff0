//! `switchyard-tail`: connects to an edge as a user, subscribes, and prints
//! every event as one JSON line. The quickest way to see events flowing.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use switchyard_edge::config::DEV_JWT_SECRET;
use switchyard_tests::tokens::token;
use switchyard_tests::ws_client::{Connect, Incoming, WsClient};

#[derive(Parser)]
#[command(about = "Print the events a Switchyard user receives")]
struct Args {
    /// Edge WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// User id to connect as.
    #[arg(long, default_value = "demo")]
    user: String,
    /// HMAC secret to sign the token with (defaults to the dev secret).
    #[arg(long, env = "SWITCHYARD_JWT_SECRET", hide_env_values = true, default_value = DEV_JWT_SECRET)]
    secret: String,
    /// Symbols whose ticks to subscribe to, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "AAPL,TSLA")]
    symbols: Vec<String>,
    /// Minimum confidence of pattern alerts to receive.
    #[arg(long, default_value_t = 0.7)]
    min_confidence: f64,
    /// Use the JSON subprotocol instead of MessagePack.
    #[arg(long)]
    json: bool,
    /// Exit after this many events (0: never).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Exit after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let jwt = token(&a.secret, &a.user, 24 * 3600, json!({"rooms": ["demo:*"]}));
    let protocols = if a.json {
        vec!["switchyard.v1.json".to_string()]
    } else {
        vec![]
    };
    let mut c = WsClient::connect(
        &a.url,
        &Connect {
            bearer: Some(jwt),
            protocols,
            query: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e:?} (is the fleet running? see README)", a.url))?;
    let ready = c.expect_op("ready").await.context("waiting for ready")?;
    eprintln!("connected as {} (conn {})", ready["user"], ready["conn"]);
    c.ok(
        json!({"op":"subscribe","sub":"ticks","type":"tick","filters":{"symbol": a.symbols}}),
        1,
    )
    .await?;
    c.ok(
        json!({"op":"subscribe","sub":"alerts","type":"pattern","min":{"confidence": a.min_confidence}}),
        2,
    )
    .await?;
    eprintln!(
        "subscribed: ticks for {:?}, pattern alerts with confidence >= {}",
        a.symbols, a.min_confidence
    );
    let deadline = (a.duration_s > 0).then(|| tokio::time::Instant::now() + Duration::from_secs(a.duration_s));
    let mut seen = 0u64;
    loop {
        let wait = deadline
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        if wait.is_zero() {
            break;
        }
        let Some(msg) = c.next_within(wait).await? else {
            continue;
        };
        let frame = match msg {
            Incoming::Frame(f) => f,
            Incoming::Closed(code, reason) => bail!("server closed the connection: {code} {reason}"),
        };
        let events: Vec<Value> = match frame["op"].as_str() {
            Some("event") => vec![frame],
            Some("batch") => frame["events"].as_array().cloned().unwrap_or_default(),
            _ => {
                eprintln!("{frame}");
                continue;
            }
        };
        for e in events {
            println!("{e}");
            seen += 1;
            if a.count > 0 && seen >= a.count {
                return Ok(());
            }
        }
    }
    Ok(())
}
