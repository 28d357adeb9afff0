//! The application API over NATS (docs/PROTOCOL.md, "Application API"),
//! against a real fleet with two edges (and two routers where the answer
//! must be fleet-wide): disconnect, revoke, server-side subscriptions and
//! rooms, presence, room presence, stats, and the presence events.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_common::transcode::{json_to_msgpack, msgpack_to_json};
use switchyard_tests::fleet::{Fleet, TEST_SECRET};
use switchyard_tests::tokens;
use switchyard_tests::ws_client::{Connect, ConnectError, WsClient};

/// Generous: an answer waits for every edge, bounded by the router's API wait.
const WAIT: Duration = Duration::from_secs(10);

/// Calls `method` with a MessagePack body; the decoded reply.
async fn api(fleet: &Fleet, method: &str, body: Value) -> Result<Value> {
    let mut payload = Vec::new();
    json_to_msgpack(&body, &mut payload);
    let reply = tokio::time::timeout(WAIT, fleet.producer.request(format!("sy.api.{method}"), payload.into()))
        .await
        .context("API reply timed out")??;
    let mut json = Vec::new();
    msgpack_to_json(&reply.payload, &mut json)?;
    Ok(serde_json::from_slice(&json)?)
}

/// Calls `method` and returns its `result`, failing on an error reply.
async fn ok(fleet: &Fleet, method: &str, body: Value) -> Result<Value> {
    let reply = api(fleet, method, body).await?;
    match reply.get("result") {
        Some(r) => Ok(r.clone()),
        None => bail!("{method}: expected a result, got {reply}"),
    }
}

/// The error code of a refused call.
async fn refused(fleet: &Fleet, method: &str, body: Value) -> Result<String> {
    let reply = api(fleet, method, body).await?;
    match reply["error"]["code"].as_str() {
        Some(code) => Ok(code.to_string()),
        None => bail!("{method}: expected an error, got {reply}"),
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Connects with header auth using `token`.
async fn connect_with(url: &str, token: &str) -> Result<WsClient, ConnectError> {
    let opts = Connect {
        bearer: Some(token.to_string()),
        protocols: vec![],
        query: None,
    };
    WsClient::connect(url, &opts).await
}

fn ws_url(edge: &switchyard_edge::RunningEdge) -> String {
    format!("ws://{}/ws", edge.ws_addr)
}

/// Waits until `f` (polled every 100 ms) gives `Some`, within `WAIT`.
async fn eventually<T, F: std::future::Future<Output = Result<Option<T>>>>(mut f: impl FnMut() -> F) -> Result<T> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > until {
            bail!("condition not met within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_every_connection_of_the_user_on_every_edge() -> Result<()> {
    let fleet = Fleet::start().await?;
    let edge2 = fleet.start_edge().await?;
    let (mut a1, _) = fleet.connect(&fleet.ws_url(), "alice", None).await?;
    let (mut a2, _) = fleet.connect(&ws_url(&edge2), "alice", None).await?;
    let (mut bob, _) = fleet.connect(&ws_url(&edge2), "bob", None).await?;

    let result = ok(
        &fleet,
        "disconnect",
        json!({"user": "alice", "reconnect": true, "reason": "maintenance"}),
    )
    .await?;
    assert_eq!(result, json!({"connections": 2}));
    for c in [&mut a1, &mut a2] {
        let f = c.expect_op("reconnect").await?;
        assert_eq!(f["after_ms"], 0);
        assert_eq!(f["reason"], "maintenance");
        assert_eq!(c.expect_close().await?, 4003);
    }
    // Others are untouched.
    assert_eq!(bob.request(json!({"op": "ping"}), 1).await?["op"], "pong");

    // Idempotent: nobody left to close.
    assert_eq!(
        ok(&fleet, "disconnect", json!({"user": "alice"})).await?,
        json!({"connections": 0})
    );
    // Without `reconnect`, the close comes alone.
    let result = ok(&fleet, "disconnect", json!({"user": "bob"})).await?;
    assert_eq!(result, json!({"connections": 1}));
    match bob.next().await? {
        switchyard_tests::ws_client::Incoming::Closed(code, _) => assert_eq!(code, 4003),
        other => bail!("expected the close, got {other:?}"),
    }
    assert_eq!(
        refused(&fleet, "disconnect", json!({"user": "not valid"})).await?,
        "bad_request"
    );
    drop(edge2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_revocation_holds_on_every_edge_including_one_started_later() -> Result<()> {
    let fleet = Fleet::start().await?;
    let old = tokens::token(TEST_SECRET, "alice", 3600, json!({"iat": now_s() - 60}));
    let (mut live, _) = WsClient::connect_ready(&fleet.ws_url(), &old, &[]).await?;
    let (mut other, _) = fleet.connect(&fleet.ws_url(), "bob", None).await?;

    assert_eq!(
        ok(&fleet, "revoke", json!({"user": "alice", "before": now_s() - 30})).await?,
        json!({})
    );
    // The live connection using the old token is told and closed.
    let err = live.expect_op("error").await?;
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(live.expect_close().await?, 4001);
    assert_eq!(other.request(json!({"op": "ping"}), 1).await?["op"], "pong");

    // An edge started after the revocation refuses the old token at the upgrade...
    let edge2 = fleet.start_edge().await?;
    match connect_with(&ws_url(&edge2), &old).await {
        Err(ConnectError::Status(status)) => assert_eq!(status, 401),
        Ok(_) => bail!("a revoked token was accepted"),
        Err(e) => bail!("unexpected failure: {e:?}"),
    }
    // ...and in the auth frame.
    let mut framed = WsClient::connect(&ws_url(&edge2), &Connect::default())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    framed.send(&json!({"op": "auth", "token": old, "id": 1})).await?;
    assert_eq!(framed.expect_op("error").await?["code"], "unauthorized");
    assert_eq!(framed.expect_close().await?, 4001);

    // A token issued after `before` is fine; refreshing with the old one is refused.
    let fresh = tokens::token(TEST_SECRET, "alice", 3600, json!({}));
    let (mut c, _) = WsClient::connect_ready(&ws_url(&edge2), &fresh, &[]).await?;
    let r = c.request(json!({"op": "auth", "token": old}), 2).await?;
    assert_eq!(r["code"], "unauthorized");
    assert_eq!(
        c.request(json!({"op": "ping"}), 3).await?["op"],
        "pong",
        "the connection keeps its token"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revocation_by_jti_closes_and_refuses_that_token_only() -> Result<()> {
    let fleet = Fleet::start().await?;
    let edge2 = fleet.start_edge().await?;
    let leaked = tokens::token(TEST_SECRET, "alice", 3600, json!({"jti": "leaked/1"}));
    let other = tokens::token(TEST_SECRET, "alice", 3600, json!({"jti": "fine"}));
    let (mut c1, _) = WsClient::connect_ready(&fleet.ws_url(), &leaked, &[]).await?;
    let (mut c2, _) = WsClient::connect_ready(&ws_url(&edge2), &other, &[]).await?;

    let until = now_s() + 3600;
    assert_eq!(
        ok(&fleet, "revoke", json!({"jti": "leaked/1", "until": until})).await?,
        json!({})
    );
    assert_eq!(c1.expect_close().await?, 4001);
    assert_eq!(c2.request(json!({"op": "ping"}), 1).await?["op"], "pong");
    // Revoked on the other edge too, at once (the reply came after every edge had it).
    match connect_with(&ws_url(&edge2), &leaked).await {
        Err(ConnectError::Status(status)) => assert_eq!(status, 401),
        Ok(_) => bail!("a revoked token was accepted"),
        Err(e) => bail!("unexpected failure: {e:?}"),
    }
    // Idempotent, and an earlier `until` does not shorten it.
    assert_eq!(
        ok(&fleet, "revoke", json!({"jti": "leaked/1", "until": now_s() + 10})).await?,
        json!({})
    );
    assert!(connect_with(&fleet.ws_url(), &leaked).await.is_err());
    assert_eq!(refused(&fleet, "revoke", json!({"jti": "x"})).await?, "bad_request");
    assert_eq!(
        refused(&fleet, "revoke", json!({"user": "alice"})).await?,
        "bad_request"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_rooms_made_by_the_application() -> Result<()> {
    let fleet = Fleet::start().await?;
    let (mut alice, _) = fleet.connect(&fleet.ws_url(), "alice", None).await?;
    let sub = json!({"user": "alice", "sub": "watch", "type": "tick", "filters": {"symbol": ["AAPL"]}});
    assert_eq!(ok(&fleet, "subscribe", sub.clone()).await?, json!({}));
    assert_eq!(ok(&fleet, "subscribe", sub).await?, json!({}), "idempotent");
    fleet
        .publish(
            "tick",
            &json!({"data": {"px": 1}, "target": {"match": {"symbol": "AAPL"}}}),
        )
        .await?;
    let evs = alice.take_events(1).await?;
    assert_eq!(evs[0]["sub"], json!(["watch"]));

    assert_eq!(
        ok(&fleet, "join", json!({"user": "alice", "room": "desk:1"})).await?,
        json!({})
    );
    fleet
        .publish("news", &json!({"data": {"n": 1}, "target": {"room": "desk:1"}}))
        .await?;
    let evs = alice.take_events(1).await?;
    assert_eq!(evs[0]["type"], "news");

    let listing = ok(&fleet, "list", json!({"user": "alice"})).await?;
    assert_eq!(listing["rooms"], json!(["desk:1"]));
    assert_eq!(listing["subs"][0]["sub"], "watch");
    assert_eq!(listing["subs"][0]["filters"], json!({"symbol": ["AAPL"]}));
    // The client sees the same state.
    let subs = alice.request(json!({"op": "list"}), 1).await?;
    assert_eq!(subs["subs"][0]["sub"], "watch");

    assert_eq!(
        ok(&fleet, "leave", json!({"user": "alice", "room": "desk:1"})).await?,
        json!({})
    );
    assert_eq!(
        ok(&fleet, "unsubscribe", json!({"user": "alice", "sub": "watch"})).await?,
        json!({})
    );
    assert_eq!(
        ok(&fleet, "unsubscribe", json!({"user": "alice", "sub": "watch"})).await?,
        json!({})
    );
    assert_eq!(
        ok(&fleet, "list", json!({"user": "alice"})).await?,
        json!({"subs": [], "rooms": []})
    );

    // The client op's refusals, and malformed requests.
    let bad_type = json!({"user": "alice", "sub": "s", "type": "Not-A-Type"});
    assert_eq!(refused(&fleet, "subscribe", bad_type).await?, "invalid_filter");
    assert_eq!(
        refused(&fleet, "subscribe", json!({"user": "alice", "sub": "s"})).await?,
        "bad_request"
    );
    assert_eq!(
        refused(&fleet, "unsubscribe", json!({"user": "alice", "sub": "a b"})).await?,
        "bad_request"
    );
    assert_eq!(
        refused(&fleet, "join", json!({"user": "alice", "room": ""})).await?,
        "bad_request"
    );
    assert_eq!(refused(&fleet, "no_such_method", json!({})).await?, "bad_request");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_for_an_offline_user_fills_their_offline_queue() -> Result<()> {
    let fleet = Fleet::start().await?;
    let sub = json!({"user": "olga", "sub": "alerts", "type": "alert", "filters": {"desk": ["fx"]}});
    assert_eq!(ok(&fleet, "subscribe", sub).await?, json!({}));
    assert_eq!(
        ok(&fleet, "join", json!({"user": "olga", "room": "ops"})).await?,
        json!({})
    );
    fleet
        .publish("alert", &json!({"data": {"i": 1}, "target": {"match": {"desk": "fx"}}}))
        .await?;
    fleet
        .publish("alert", &json!({"data": {"i": 2}, "target": {"room": "ops"}}))
        .await?;
    fleet.settle().await?;
    // Olga never connected: she resumes from the start of the log.
    let (mut olga, _) = fleet.connect(&fleet.ws_url(), "olga", Some(("unknown", 0))).await?;
    let (evs, _resumed) = olga.replay().await?;
    let got: Vec<i64> = evs.iter().map(|e| e["data"]["i"].as_i64().unwrap_or(-1)).collect();
    assert_eq!(got, vec![1, 2]);
    assert_eq!(evs[0]["sub"], json!(["alerts"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_room_presence_and_stats_count_the_whole_fleet() -> Result<()> {
    let fleet = Fleet::start().await?;
    let _router2 = fleet.start_router(|_| {}).await?;
    let edge2 = fleet.start_edge().await?;
    let (_a1, _) = fleet.connect(&fleet.ws_url(), "alice", None).await?;
    let (_a2, _) = fleet.connect(&ws_url(&edge2), "alice", None).await?;
    let (_b, _) = fleet.connect(&ws_url(&edge2), "bob", None).await?;

    let presence = ok(&fleet, "presence", json!({"users": ["alice", "bob", "carol"]})).await?;
    assert_eq!(
        presence,
        json!({"users": {"alice": {"connections": 2}, "bob": {"connections": 1}}})
    );

    for u in ["alice", "bob", "carol"] {
        ok(&fleet, "join", json!({"user": u, "room": "lobby"})).await?;
    }
    let room = ok(&fleet, "room_presence", json!({"room": "lobby"})).await?;
    assert_eq!(
        room,
        json!({"members": 3, "online": ["alice", "bob"], "truncated": false})
    );
    let room = ok(&fleet, "room_presence", json!({"room": "lobby", "limit": 1})).await?;
    assert_eq!(room["online"].as_array().map(Vec::len), Some(1));
    assert_eq!(room["truncated"], true);
    assert_eq!(
        ok(&fleet, "room_presence", json!({"room": "empty"})).await?,
        json!({"members": 0, "online": [], "truncated": false})
    );

    // Users come from the delivery stage, eventually consistent.
    let stats = eventually(|| async {
        let s = ok(&fleet, "stats", json!({})).await?;
        Ok((s["users"] == 2 && s["routers"] == 2).then_some(s))
    })
    .await?;
    assert_eq!(stats["edges"], 2);
    assert_eq!(stats["connections"], 3);
    assert_eq!(stats["rooms"], 1);

    // JSON in, JSON out.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let reply = fleet
        .producer
        .request_with_headers(
            "sy.api.presence".to_string(),
            headers,
            br#"{"users":["bob"]}"#.to_vec().into(),
        )
        .await?;
    let reply: Value = serde_json::from_slice(&reply.payload).context("a JSON reply")?;
    assert_eq!(reply, json!({"result": {"users": {"bob": {"connections": 1}}}}));
    assert_eq!(
        refused(&fleet, "room_presence", json!({"room": "lobby", "limit": 0})).await?,
        "bad_request"
    );
    Ok(())
}

/// Waits until the router delivers for every user partition: a router
/// announces the users who come and go only from then on (users already
/// connected while it rebuilt its presence are not news).
async fn delivering_everywhere(fleet: &Fleet) -> Result<()> {
    eventually(|| async {
        let reply = fleet.producer.request("sy.routers.command", "".into()).await?;
        let stats: switchyard_common::command::RouterStats = switchyard_common::command::decode(&reply.payload)?;
        Ok((stats.partitions.len() == 8).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_follow_the_first_and_last_connection() -> Result<()> {
    let fleet = Fleet::start().await?;
    let edge2 = fleet.start_edge().await?;
    delivering_everywhere(&fleet).await?;
    let mut events = fleet.producer.subscribe("sy.presence.*").await?;
    fleet.producer.flush().await?;
    let mut next_for = async |user: &str| -> Result<(String, Value)> {
        loop {
            let msg = tokio::time::timeout(WAIT, events.next())
                .await
                .context("no presence event")?
                .context("subscription ended")?;
            let mut json = Vec::new();
            msgpack_to_json(&msg.payload, &mut json)?;
            let v: Value = serde_json::from_slice(&json)?;
            if v["user"] == user {
                return Ok((msg.subject.to_string(), v));
            }
        }
    };
    let (c1, _) = fleet.connect(&fleet.ws_url(), "dora", None).await?;
    let (subject, ev) = next_for("dora").await?;
    assert_eq!(subject, "sy.presence.online");
    assert!(ev["ts"].as_u64().is_some_and(|ts| ts > 0));
    // A second connection on another edge, then both gone: one offline event.
    let (c2, _) = fleet.connect(&ws_url(&edge2), "dora", None).await?;
    drop(c1);
    drop(c2);
    let (subject, _) = next_for("dora").await?;
    assert_eq!(subject, "sy.presence.offline");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_asked_by_the_application_reaches_every_connection_of_the_user() -> Result<()> {
    let fleet = Fleet::start().await?;
    let edge2 = fleet.start_edge().await?;
    let tick = |px: u64| json!({"data": {"px": px}, "target": {"match": {"symbol": "AAPL"}}, "durable": false});
    fleet.publish("tick.AAPL", &tick(1)).await?;
    fleet.publish("tick.AAPL", &tick(2)).await?;
    fleet.settle().await?;
    let (mut c1, _) = fleet.connect(&fleet.ws_url(), "alice", None).await?;
    let (mut c2, _) = fleet.connect(&ws_url(&edge2), "alice", None).await?;
    let sub = json!({"user": "alice", "sub": "px", "type": "tick", "filters": {"symbol": ["AAPL"]}, "snapshot": true});
    assert_eq!(ok(&fleet, "subscribe", sub).await?, json!({}));
    for c in [&mut c1, &mut c2] {
        let evs = c.take_events(1).await?;
        assert_eq!(evs[0]["snapshot"], true);
        assert_eq!(evs[0]["data"]["px"], 2);
        assert_eq!(evs[0]["sub"], json!(["px"]));
    }
    // For a user with no connection, the subscription is made all the same.
    let offline = json!({"user": "bob", "sub": "px", "type": "tick", "snapshot": true});
    assert_eq!(ok(&fleet, "subscribe", offline).await?, json!({}));
    assert_eq!(
        ok(&fleet, "list", json!({"user": "bob"})).await?["subs"][0]["sub"],
        "px"
    );
    let bad = json!({"user": "bob", "sub": "px", "type": "tick", "snapshot": 1});
    assert_eq!(refused(&fleet, "subscribe", bad).await?, "invalid_filter");
    Ok(())
}
