//! End-to-end tests of `throttle_ms` (docs/PROTOCOL.md, "Throttling"): a
//! real nats-server, router and edge, and WebSocket clients.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use switchyard_tests::fleet::{http_get, metric, Fleet};
use switchyard_tests::ws_client::WsClient;

type R = anyhow::Result<()>;

const JSON: &[&str] = &["switchyard.v1.json"];

fn tick(symbol: &str, i: u64) -> Value {
    json!({"type": "tick", "key": symbol, "data": {"i": i}, "target": {"match": {"symbol": symbol}}})
}

/// Reads events until the last one of every key in `last` has arrived
/// (each wait bounded by the client's generous timeout); returns every
/// event received, in order.
async fn until_last(c: &mut WsClient, last: &BTreeMap<&str, u64>) -> anyhow::Result<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    let done = |out: &[Value]| {
        last.iter().all(|(k, n)| {
            out.iter()
                .any(|e| e["key"] == *k && e["data"]["i"].as_u64() == Some(*n))
        })
    };
    while !done(&out) {
        let f = c.frame().await?;
        match f["op"].as_str() {
            Some("event") => out.push(f),
            Some("batch") => out.extend(f["events"].as_array().cloned().unwrap_or_default()),
            _ => anyhow::bail!("unexpected frame: {f}"),
        }
    }
    Ok(out)
}

/// The `i` values received per key, in order.
fn per_key(evs: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in evs {
        m.entry(e["key"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(e["data"]["i"].as_u64().unwrap());
    }
    m
}

/// The most events a 1000 ms throttle can let through, per key, between
/// `since` (before the first publish) and now (after the last arrival):
/// one at once, then one per full second. A bound on the outcome that
/// holds however slow the machine is.
fn most_per_key(since: std::time::Instant) -> usize {
    1 + since.elapsed().as_millis() as usize / 1000
}

/// `pos` only grows on a connection, throttled or not.
fn assert_pos_grows(evs: &[Value]) {
    let pos: Vec<u64> = evs.iter().filter_map(|e| e["pos"].as_u64()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "pos not increasing: {pos:?}");
}

#[tokio::test]
async fn a_burst_per_key_is_merged_and_the_last_value_arrives() -> R {
    let fleet = Fleet::start().await?;
    let (mut c, _) = WsClient::connect_ready(&fleet.ws_url(), &fleet.token("alice", json!({})), JSON).await?;
    c.ok(
        json!({"op":"subscribe","sub":"slow","type":"tick","filters":{"symbol":["AAPL","TSLA"]},"throttle_ms":1000}),
        1,
    )
    .await?;
    let subs = c.request(json!({"op":"list"}), 2).await?;
    assert_eq!(subs["subs"][0]["throttle_ms"], 1000, "{subs}");
    for (id, bad) in [json!(0), json!(3_600_001), json!("100"), json!(1.5), json!(-1)]
        .into_iter()
        .enumerate()
    {
        let r = c
            .request(
                json!({"op":"subscribe","sub":"bad","type":"tick","throttle_ms":bad}),
                10 + id as u32,
            )
            .await?;
        assert_eq!(r["code"], "invalid_filter", "throttle_ms {bad}: {r}");
    }

    const N: u64 = 30;
    let since = std::time::Instant::now();
    for i in 0..N {
        for sym in ["AAPL", "TSLA"] {
            fleet.publish(&format!("tick.{sym}"), &tick(sym, i)).await?;
        }
    }
    let last = BTreeMap::from([("AAPL", N - 1), ("TSLA", N - 1)]);
    let evs = until_last(&mut c, &last).await?;
    let most = most_per_key(since);
    let got = per_key(&evs);
    for (sym, values) in &got {
        assert!(
            values.len() <= most,
            "{sym}: {} of {N} events, at most {most} allowed: {values:?}",
            values.len()
        );
        assert!(
            values.windows(2).all(|w| w[0] < w[1]),
            "{sym}: stale after newer: {values:?}"
        );
        assert_eq!(values.last(), Some(&(N - 1)), "{sym}: the last value");
    }
    assert!(evs.iter().all(|e| e.get("~t").is_none() && e["sub"] == json!(["slow"])));
    assert_pos_grows(&evs);
    // The throttle did it (not only conflation): the edge counted holds.
    // (The metrics recorder is shared by the tests of this binary: > 0 only.)
    let (_, page) = http_get(fleet.edge_admin(), "/metrics").await?;
    assert!(
        metric(&page, "switchyard_edge_throttled_total") > 0.0,
        "no throttling counted"
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_event_that_also_matches_an_unthrottled_subscription_is_not_throttled() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut bob, _) = WsClient::connect_ready(&url, &fleet.token("bob", json!({})), JSON).await?;
    let (mut carol, _) = WsClient::connect_ready(&url, &fleet.token("carol", json!({})), JSON).await?;
    // bob: AAPL and TSLA throttled, TSLA also unthrottled. carol: unthrottled.
    bob.ok(
        json!({"op":"subscribe","sub":"slow","type":"tick","filters":{"symbol":["AAPL","TSLA"]},"throttle_ms":1000}),
        1,
    )
    .await?;
    bob.ok(
        json!({"op":"subscribe","sub":"fast","type":"tick","filters":{"symbol":["TSLA"]}}),
        2,
    )
    .await?;
    carol
        .ok(
            json!({"op":"subscribe","sub":"all","type":"tick","filters":{"symbol":["AAPL","TSLA"]}}),
            1,
        )
        .await?;
    let list = carol.request(json!({"op":"list"}), 2).await?;
    assert!(list["subs"][0].get("throttle_ms").is_none(), "{list}");

    // Paced by carol: each pair is published once she has the one before,
    // so no connection has two events of a key queued at once (conflation
    // stays out of it; it may merge queued events of a key, by design).
    const N: u64 = 20;
    let since = std::time::Instant::now();
    let mut carol_evs = Vec::new();
    for i in 0..N {
        for sym in ["AAPL", "TSLA"] {
            fleet.publish(&format!("tick.{sym}"), &tick(sym, i)).await?;
        }
        carol_evs.extend(until_last(&mut carol, &BTreeMap::from([("AAPL", i), ("TSLA", i)])).await?);
    }
    let last = BTreeMap::from([("AAPL", N - 1), ("TSLA", N - 1)]);
    let bob_evs = until_last(&mut bob, &last).await?;
    let most = most_per_key(since);
    let all: Vec<u64> = (0..N).collect();
    let b = per_key(&bob_evs);
    assert_eq!(b["TSLA"], all, "TSLA also matches bob's unthrottled subscription");
    assert!(
        b["AAPL"].len() <= most && b["AAPL"].len() < N as usize,
        "AAPL throttled (at most {most}): {:?}",
        b["AAPL"]
    );
    assert_eq!(b["AAPL"].last(), Some(&(N - 1)));
    let c = per_key(&carol_evs);
    assert_eq!(c["AAPL"], all, "carol's subscriptions are not throttled");
    assert_eq!(c["TSLA"], all);
    assert_pos_grows(&bob_evs);
    assert_pos_grows(&carol_evs);
    fleet.shutdown().await;
    Ok(())
}
