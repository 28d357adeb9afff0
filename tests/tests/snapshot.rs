//! `snapshot: true` on subscribe (docs/PROTOCOL.md, "Snapshots") against a
//! real fleet: the latest event of each matching key, marked, without
//! `pos`; nothing for other keys; only the newest per key; refused when not
//! a boolean; and, with ticks racing the subscribes, every client ends with
//! the latest value of every key.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::{Incoming, WsClient};

fn tick(symbol: &str, px: u64) -> Value {
    json!({
        "data": {"symbol": symbol, "px": px},
        "target": {"match": {"symbol": symbol}},
        "durable": false,
    })
}

/// Waits for the `ok` of request `id` and collects every event until the
/// client has, for each key in `want`, an event with that `px`; returns the
/// events seen (batches flattened).
async fn read_until(c: &mut WsClient, id: u64, want: &HashMap<String, u64>) -> Result<Vec<Value>> {
    let mut ok = false;
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !ok || want.iter().any(|(k, px)| last.get(k) != Some(px)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(incoming) = c.next_within(left).await? else {
            bail!("waited 20 s; ok {ok}, last values {last:?}, wanted {want:?}");
        };
        let f = match incoming {
            Incoming::Frame(f) => f,
            Incoming::Closed(code, why) => bail!("closed {code} {why}"),
        };
        let events = match f["op"].as_str() {
            Some("ok") if f["id"] == id => {
                ok = true;
                continue;
            }
            Some("event") => vec![f],
            Some("batch") => f["events"].as_array().cloned().unwrap_or_default(),
            _ => bail!("unexpected frame {f}"),
        };
        for e in events {
            if let (Some(k), Some(px)) = (e["key"].as_str(), e["data"]["px"].as_u64()) {
                last.insert(k.to_string(), px);
            }
            seen.push(e);
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_the_latest_event_of_each_matching_key() -> Result<()> {
    let fleet = Fleet::start().await?;
    for (sym, px) in [("AAPL", 1), ("AAPL", 2), ("MSFT", 7), ("NVDA", 9)] {
        fleet.publish(&format!("tick.{sym}"), &tick(sym, px)).await?;
    }
    // An unkeyed event of the type is never a snapshot.
    fleet
        .publish(
            "tick",
            &json!({"data": {"px": 99}, "target": {"match": {"symbol": "AAPL"}}}),
        )
        .await?;
    fleet.settle().await?;

    let (mut c, _) = fleet.connect(&fleet.ws_url(), "alice", None).await?;
    c.send(&json!({"op": "subscribe", "id": 1, "sub": "watch", "type": "tick",
        "filters": {"symbol": ["AAPL", "MSFT"]}, "snapshot": true}))
        .await?;
    let want = HashMap::from([("AAPL".to_string(), 2), ("MSFT".to_string(), 7)]);
    let seen = read_until(&mut c, 1, &want).await?;
    assert_eq!(seen.len(), 2, "one per matching key: {seen:?}");
    for e in &seen {
        assert_eq!(e["snapshot"], true);
        assert!(e.get("pos").is_none(), "{e}");
        assert_eq!(e["sub"], json!(["watch"]));
        assert_eq!(e["type"], "tick");
    }
    // Nothing more (no NVDA, no unkeyed event, no older AAPL).
    assert_eq!(c.request(json!({"op": "ping"}), 2).await?["op"], "pong");

    // Live events follow, unmarked.
    fleet.publish("tick.AAPL", &tick("AAPL", 3)).await?;
    let live = c.take_events(1).await?;
    assert_eq!(live[0]["data"]["px"], 3);
    assert!(live[0].get("snapshot").is_none());

    // Without `snapshot`, nothing but `ok`; a non-boolean is refused.
    let r = c
        .request(
            json!({"op": "subscribe", "sub": "plain", "type": "tick", "filters": {"symbol": ["NVDA"]}}),
            3,
        )
        .await?;
    assert_eq!(r["op"], "ok");
    assert_eq!(c.request(json!({"op": "ping"}), 4).await?["op"], "pong");
    let r = c
        .request(
            json!({"op": "subscribe", "sub": "bad", "type": "tick", "snapshot": "yes"}),
            5,
        )
        .await?;
    assert_eq!(r["code"], "invalid_filter");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_racing_live_ticks_end_with_the_latest_value_of_every_key() -> Result<()> {
    let fleet = Fleet::start().await?;
    const KEYS: [&str; 3] = ["K1", "K2", "K3"];
    const TICKS: u64 = 300;
    const CLIENTS: usize = 6;
    fleet.publish("tick.K1", &tick("K1", 0)).await?;
    fleet.settle().await?;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (c, _) = fleet.connect(&fleet.ws_url(), &format!("racer{i}"), None).await?;
        clients.push(c);
    }
    // Ticks on every key while the clients subscribe at different moments.
    let producer = {
        let client = fleet.producer.clone();
        tokio::spawn(async move {
            for px in 1..=TICKS {
                for k in KEYS {
                    let mut payload = Vec::new();
                    switchyard_common::transcode::json_to_msgpack(&tick(k, px), &mut payload);
                    client.publish(format!("sy.events.tick.{k}"), payload.into()).await?;
                }
                if px % 10 == 0 {
                    client.flush().await?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            client.flush().await?;
            anyhow::Ok(())
        })
    };
    let step = TICKS as usize / CLIENTS;
    for (i, c) in clients.iter_mut().enumerate() {
        // Stagger: wait until ticks are roughly at i * step.
        tokio::time::sleep(Duration::from_millis((i * step / 10 * 2) as u64)).await;
        c.send(&json!({"op": "subscribe", "id": 1, "sub": "w", "type": "tick",
            "filters": {"symbol": KEYS}, "snapshot": true}))
            .await?;
    }
    producer.await??;
    // Every client ends with the last tick of every key (read_until waits
    // for exactly that), whatever its snapshot raced. A live tick already on
    // its way may still land after a newer snapshot entry; the newer tick
    // then follows it live (docs/PROTOCOL.md, "Snapshots").
    let want: HashMap<String, u64> = KEYS.iter().map(|k| (k.to_string(), TICKS)).collect();
    for c in clients.iter_mut() {
        read_until(c, 1, &want).await?;
    }
    // A client subscribing once the ticks stopped gets the last of each, from the snapshot alone.
    let (mut late, _) = fleet.connect(&fleet.ws_url(), "late", None).await?;
    late.send(&json!({"op": "subscribe", "id": 1, "sub": "w", "type": "tick",
        "filters": {"symbol": KEYS}, "snapshot": true}))
        .await?;
    let seen = read_until(&mut late, 1, &want).await?;
    assert_eq!(seen.len(), KEYS.len(), "{seen:?}");
    assert!(seen.iter().all(|e| e["snapshot"] == true));
    Ok(())
}
