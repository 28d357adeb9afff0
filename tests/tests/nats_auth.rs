//! The example NATS authorization (`k8s/nats-permissions.conf`) against a
//! real fleet: routers and edges log in with their own users and work with
//! only the permissions the example grants them; a back end may call the
//! application API, a producer may publish events but not call the API.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use switchyard_common::secret::Secret;
use switchyard_common::transcode::{json_to_msgpack, msgpack_to_json};
use switchyard_edge::EdgeConfig;
use switchyard_router::config::RouterConfig;
use switchyard_tests::fleet::{metrics_handle, TEST_SECRET};
use switchyard_tests::nats_server::NatsServer;
use switchyard_tests::ws_client::WsClient;

const PASSWORDS: &[(&str, &str)] = &[
    ("SY_ROUTER_PASSWORD", "router-pw"),
    ("SY_EDGE_PASSWORD", "edge-pw"),
    ("SY_BACKEND_PASSWORD", "backend-pw"),
    ("SY_PRODUCER_PASSWORD", "producer-pw"),
];

async fn login(url: &str, user: &str, password: &str) -> Result<async_nats::Client> {
    Ok(async_nats::ConnectOptions::new()
        .user_and_password(user.into(), password.into())
        .connect(url)
        .await?)
}

fn msgpack(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    json_to_msgpack(v, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_permissions_run_a_fleet_and_keep_producers_off_the_api() -> Result<()> {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/nats-permissions.conf");
    let nats = NatsServer::start_with_config(Some((&conf, PASSWORDS)))?;
    let url = nats.url();

    let mut rc = RouterConfig::embedded(&url);
    rc.metrics = Some(metrics_handle());
    // Credentials in the URL, as an operator may write them.
    rc.nats.nats_url = url.replace("nats://", "nats://switchyard-router:router-pw@");
    let router = switchyard_router::start(rc).await.context("router with its own user")?;
    let mut ec = EdgeConfig::embedded(&url, TEST_SECRET);
    ec.metrics = Some(metrics_handle());
    ec.nats.nats_user = Some("switchyard-edge".into());
    ec.nats.nats_password = Some(Secret::new("edge-pw".to_string()));
    let edge = switchyard_edge::start(ec).await.context("edge with its own user")?;

    let token = switchyard_tests::tokens::token(TEST_SECRET, "alice", 3600, json!({}));
    let (mut alice, _) = WsClient::connect_ready(&format!("ws://{}/ws", edge.ws_addr), &token, &[]).await?;

    // A producer publishes; the event arrives.
    let producer = login(&url, "producer", "producer-pw").await?;
    let event = json!({"data": {"n": 1}, "target": {"users": ["alice"]}});
    producer.publish("sy.events.note", msgpack(&event).into()).await?;
    let evs = alice.take_events(1).await?;
    assert_eq!(evs[0]["data"]["n"], 1);
    // A keyed tick: the router stores it as its key's latest (for snapshots) with its own rights.
    alice
        .ok(
            json!({"op": "subscribe", "sub": "t", "type": "tick", "filters": {"symbol": ["AAPL"]}}),
            7,
        )
        .await?;
    let tick = json!({"data": {"px": 5}, "target": {"match": {"symbol": "AAPL"}}, "durable": false});
    producer.publish("sy.events.tick.AAPL", msgpack(&tick).into()).await?;
    assert_eq!(alice.take_events(1).await?[0]["data"]["px"], 5);
    alice
        .send(&json!({"op": "subscribe", "id": 8, "sub": "t2", "type": "tick", "filters": {"symbol": ["AAPL"]}, "snapshot": true}))
        .await?;
    // The `ok` and the snapshot event, in either order.
    let (mut ok, mut px) = (false, None);
    while !ok || px.is_none() {
        let f = alice
            .frame()
            .await
            .context("no snapshot under the example permissions")?;
        match f["op"].as_str() {
            Some("ok") if f["id"] == 8 => ok = true,
            Some("event") if f["snapshot"] == true => px = Some(f["data"]["px"].clone()),
            _ => bail!("unexpected frame {f}"),
        }
    }
    assert_eq!(px, Some(json!(5)));

    // The back end calls the API.
    let backend = login(&url, "app-backend", "backend-pw").await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        backend.request("sy.api.presence", msgpack(&json!({"users": ["alice"]})).into()),
    )
    .await
    .context("API reply timed out")??;
    let mut text = Vec::new();
    msgpack_to_json(&reply.payload, &mut text)?;
    let reply: Value = serde_json::from_slice(&text)?;
    assert_eq!(reply, json!({"result": {"users": {"alice": {"connections": 1}}}}));

    // The producer may not: its request never reaches a router.
    let denied = tokio::time::timeout(
        Duration::from_secs(3),
        producer.request("sy.api.disconnect", msgpack(&json!({"user": "alice"})).into()),
    )
    .await;
    if let Ok(Ok(m)) = denied {
        bail!("a producer called the API: {:?}", m.payload);
    }
    assert_eq!(
        alice.request(json!({"op": "ping"}), 1).await?["op"],
        "pong",
        "alice still connected"
    );

    edge.shutdown().await;
    router.shutdown().await;
    Ok(())
}
