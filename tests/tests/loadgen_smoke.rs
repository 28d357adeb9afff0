//! A short run of the load generator against an in-process fleet: a few
//! seconds, a few users, and zero tolerance. Every expected event must
//! arrive exactly once and in order: ticks (W1), durable alerts (W2), and
//! durable events across a reconnect storm with resume (W4).

use anyhow::Result;
use clap::Parser;
use serde_json::Value;
use switchyard_tests::fleet::{Fleet, TEST_SECRET};
use switchyard_tests::loadgen::{run, LoadConfig};

async fn smoke(scenario: &str, extra: &[&str]) -> Result<Value> {
    let fleet = Fleet::start_with(|c| {
        c.rate_per_s = 1_000_000;
        c.burst = 1_000_000;
    })
    .await?;
    let edge = fleet.edge.as_ref().expect("edge").ws_addr.to_string();
    let nats = fleet.nats.url();
    let mut args = vec![
        "switchyard-loadgen",
        "--scenario",
        scenario,
        "--edge",
        &edge,
        "--nats-url",
        &nats,
        "--secret",
        TEST_SECRET,
        "--sources",
        "4",
        "--progress",
        "false",
        "--warmup-s",
        "0.5",
        "--duration-s",
        "2",
        "--drain-s",
        "20",
        "--connect-timeout-s",
        "60",
    ];
    args.extend_from_slice(extra);
    let summary =
        tokio::time::timeout(std::time::Duration::from_secs(120), run(LoadConfig::parse_from(args))).await??;
    fleet.shutdown().await;
    Ok(summary)
}

fn assert_clean(s: &Value) {
    let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    assert!(n("expected") > 0, "nothing was expected: {s}");
    assert_eq!(n("unique"), n("expected"), "{s}");
    for k in [
        "lost",
        "unexpected",
        "duplicated",
        "out_of_order",
        "clients_failed",
        "dropped_rate_limited",
        "dropped_slow_consumer",
    ] {
        assert_eq!(n(k), 0, "{k} in {s}");
    }
    assert!(s["latency_us"]["p50"].as_u64().is_some(), "no latency recorded: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn market_fan_out_loses_nothing() -> Result<()> {
    let s = smoke(
        "w1",
        &[
            "--users",
            "30",
            "--symbols",
            "20",
            "--symbols-per-user",
            "5",
            "--rate",
            "100",
        ],
    )
    .await?;
    assert_clean(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn market_fan_out_with_deflate_loses_nothing() -> Result<()> {
    // Every client negotiates deflate (the load generator refuses a
    // connection that did not), so nothing may be lost through the edge's
    // compressed frames and the clients' inflating.
    let s = smoke(
        "w1",
        &[
            "--users",
            "30",
            "--symbols",
            "20",
            "--symbols-per-user",
            "5",
            "--rate",
            "400",
            "--deflate",
        ],
    )
    .await?;
    assert_clean(&s);
    assert_eq!(s["deflate"], true, "{s}");
    assert!(s["window"]["wire_bytes"].as_u64().unwrap_or(0) > 0, "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_alerts_lose_nothing() -> Result<()> {
    let s = smoke(
        "w2",
        &[
            "--users",
            "30",
            "--symbols",
            "5",
            "--subs-per-user",
            "3",
            "--rate",
            "100",
        ],
    )
    .await?;
    assert_clean(&s);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_resumes_without_loss() -> Result<()> {
    let s = smoke(
        "w4",
        &[
            "--users",
            "30",
            "--groups",
            "3",
            "--rate",
            "60",
            "--storm-after-s",
            "1.5",
            "--storm-tail-s",
            "1",
            "--storm-timeout-s",
            "60",
        ],
    )
    .await?;
    assert_clean(&s);
    assert_eq!(s["storm"]["all_back"], true, "{s}");
    assert_eq!(s["storm"]["resumed"], 30, "{s}");
    assert_eq!(s["resumed_not_recovered"], 0, "{s}");
    Ok(())
}
