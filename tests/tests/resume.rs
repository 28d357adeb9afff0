//! The delivery log end to end: positions, resume on any edge, offline
//! users, trimming, epochs, and a nats-server restart.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use switchyard_tests::fleet::Fleet;
use switchyard_tests::ws_client::{data_i, event_pos, Connect, WsClient};

type R = anyhow::Result<()>;

fn direct(user: &str, i: u64) -> Value {
    json!({"data": {"i": i}, "target": {"users": [user]}})
}

fn assert_increasing(evs: &[Value]) {
    for w in evs.windows(2) {
        assert!(
            event_pos(&w[0]) < event_pos(&w[1]),
            "pos not increasing: {} then {}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test]
async fn resume_on_the_same_and_another_edge_gets_exactly_the_missed_events() -> R {
    let fleet = Fleet::start().await?;
    let edge_b = fleet.start_edge().await?;
    let url_a = fleet.ws_url();
    let url_b = format!("ws://{}/ws", edge_b.ws_addr);

    let (mut c, ready) = WsClient::connect_ready(&url_a, &fleet.token("alice", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    assert!(ready["pos"].is_u64());
    for i in 0..5 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    let first = c.take_events(5).await?;
    assert_eq!(data_i(&first), [0, 1, 2, 3, 4]);
    assert_increasing(&first);
    assert!(event_pos(&first[0]) > ready["pos"].as_u64().unwrap());
    let seen = event_pos(&first[4]);
    drop(c);

    for i in 5..10 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    // Resume on the other edge, by URL.
    fleet.settle().await?;
    let (mut c, ready) = fleet.connect(&url_b, "alice", Some((&epoch, seen))).await?;
    assert_eq!(ready["epoch"], epoch.as_str());
    let (evs, resumed) = c.replay().await?;
    assert_eq!(data_i(&evs), [5, 6, 7, 8, 9]);
    assert_increasing(&evs);
    assert!(event_pos(&evs[0]) > seen);
    assert_eq!(resumed, json!({"op":"resumed","recovered":true,"replayed":5}));
    fleet.publish("direct", &direct("alice", 10)).await?;
    let live = c.take_events(1).await?;
    assert_eq!(data_i(&live), [10]);
    let seen = event_pos(&live[0]);
    assert!(seen > event_pos(&evs[4]));
    drop(c);

    for i in 11..13 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    // Resume on the first edge, by auth frame (JSON).
    let mut c = WsClient::connect(
        &url_a,
        &Connect {
            protocols: vec!["switchyard.v1.json".into()],
            ..Default::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    fleet.settle().await?;
    c.send(&json!({"op":"auth","id":1,"token":fleet.token("alice", json!({})),"epoch":epoch,"since":seen}))
        .await?;
    assert_eq!(c.expect_op("ready").await?["id"], 1);
    let (evs, resumed) = c.replay().await?;
    assert_eq!(data_i(&evs), [11, 12]);
    assert_eq!(resumed["recovered"], true);
    assert_eq!(resumed["replayed"], 2);
    fleet.publish("direct", &direct("alice", 13)).await?;
    assert_eq!(data_i(&c.take_events(1).await?), [13]);
    // And nothing else in between: the next event is the next one published.
    fleet.publish("direct", &direct("alice", 14)).await?;
    assert_eq!(data_i(&c.take_events(1).await?), [14]);
    edge_b.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn ten_thousand_events_arrive_in_strictly_increasing_pos_order_on_every_connection() -> R {
    // A queue that holds them all: this test is about order, not slow consumers.
    let fleet = Fleet::start_with(|c| {
        c.queue_events = 20_000;
        c.queue_bytes = 64 << 20;
        c.rate_per_s = 1_000_000;
        c.burst = 1_000_000;
    })
    .await?;
    let t = fleet.token("alice", json!({}));
    let (mut a, _) = WsClient::connect_ready(&fleet.ws_url(), &t, &[]).await?;
    let (mut b, _) = WsClient::connect_ready(&fleet.ws_url(), &t, &["switchyard.v1.json"]).await?;
    a.ok(json!({"op":"subscribe","sub":"t","type":"tick"}), 1).await?;
    const N: u64 = 10_000;
    let producer = async {
        for i in 0..N {
            // Interleave the user's own path (direct, subscription match) with broadcasts.
            let ev = match i % 3 {
                0 => json!({"data": {"i": i}, "target": {"users": ["alice"]}}),
                1 => json!({"data": {"i": i}, "target": {"match": {"symbol": "X"}}}),
                _ => json!({"data": {"i": i}, "target": {"all": true}}),
            };
            // No key token: keyed events may be conflated, and this test counts every event.
            let subject = if i % 3 == 1 { "tick" } else { "misc" };
            let mut payload = Vec::new();
            switchyard_common::transcode::json_to_msgpack(&ev, &mut payload);
            fleet
                .producer
                .publish(format!("sy.events.{subject}"), payload.into())
                .await?;
            if i % 500 == 499 {
                fleet.producer.flush().await?;
                // Stay under the per-connection queue so this test measures order, not drops.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        fleet.producer.flush().await?;
        anyhow::Ok(())
    };
    let (p, ea, eb) = tokio::join!(producer, a.take_events(N as usize), b.take_events(N as usize));
    p?;
    for evs in [ea?, eb?] {
        assert_increasing(&evs);
        // Each subject keeps its order; the two subjects have none between them.
        let got = data_i(&evs);
        for subject_of in [|i: &u64| i % 3 == 1, |i: &u64| i % 3 != 1] {
            let one: Vec<u64> = got.iter().copied().filter(subject_of).collect();
            assert!(one.windows(2).all(|w| w[0] < w[1]), "a subject's events out of order");
        }
        let mut all = got;
        all.sort_unstable();
        assert_eq!(all, (0..N).collect::<Vec<_>>());
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn wrong_epoch_trimmed_history_and_a_future_since_are_not_recovered() -> R {
    let fleet = Fleet::start_custom(|r| r.log_max_per_user = 5, |_| {}).await?;
    let url = fleet.ws_url();
    let (mut c, ready) = WsClient::connect_ready(&url, &fleet.token("alice", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    for i in 0..3 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    let seen = event_pos(&c.take_events(3).await?[2]);
    drop(c);
    for i in 3..13 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    // Trimmed: only the last 5 are kept.
    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "alice", Some((&epoch, seen))).await?;
    let (evs, resumed) = c.replay().await?;
    assert_eq!(data_i(&evs), [8, 9, 10, 11, 12]);
    assert_eq!(resumed["recovered"], false);
    assert_eq!(resumed["replayed"], 5);
    let last = event_pos(&evs[4]);
    drop(c);
    // Wrong epoch: everything the log holds, not recovered.
    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "alice", Some(("bogus-epoch", last))).await?;
    let (evs, resumed) = c.replay().await?;
    assert_eq!(data_i(&evs), [8, 9, 10, 11, 12]);
    assert_eq!(resumed["recovered"], false);
    drop(c);
    // Beyond the log: nothing, not recovered.
    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "alice", Some((&epoch, last + 1000))).await?;
    let (evs, resumed) = c.replay().await?;
    assert!(evs.is_empty());
    assert_eq!(resumed, json!({"op":"resumed","recovered":false,"replayed":0}));
    drop(c);
    // Up to date: nothing to replay, recovered.
    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "alice", Some((&epoch, last))).await?;
    let (evs, resumed) = c.replay().await?;
    assert!(evs.is_empty());
    assert_eq!(resumed, json!({"op":"resumed","recovered":true,"replayed":0}));
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn offline_users_find_their_events_waiting() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut c, ready) = WsClient::connect_ready(&url, &fleet.token("bob", json!({"rooms": ["desk:*"]})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    c.ok(
        json!({"op":"subscribe","sub":"alerts","type":"pattern","min":{"confidence":0.5}}),
        1,
    )
    .await?;
    c.ok(json!({"op":"join","room":"desk:fx"}), 2).await?;
    let kept = ready["pos"].as_u64().unwrap();
    drop(c);
    // While bob is offline: a match, a non-match, a room event, a direct event, a broadcast.
    fleet
        .publish(
            "pattern",
            &json!({"data":{"i":1},"target":{"match":{},"values":{"confidence":0.9}}}),
        )
        .await?;
    fleet
        .publish(
            "pattern",
            &json!({"data":{"i":99},"target":{"match":{},"values":{"confidence":0.1}}}),
        )
        .await?;
    fleet
        .publish("chat", &json!({"data":{"i":2},"target":{"room":"desk:fx"}}))
        .await?;
    fleet.publish("direct", &direct("bob", 3)).await?;
    fleet
        .publish("news", &json!({"data":{"i":4},"target":{"all":true}}))
        .await?;
    // And carol, who never connected, gets a direct event.
    fleet.publish("direct", &direct("carol", 5)).await?;

    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "bob", Some((&epoch, kept))).await?;
    let (evs, resumed) = c.replay().await?;
    // Four subjects: in `pos` order, but no publish order among them.
    let mut got = data_i(&evs);
    got.sort_unstable();
    assert_eq!(got, [1, 2, 3, 4]);
    assert_increasing(&evs);
    let alert = evs.iter().find(|e| e["data"]["i"] == 1).context("the alert")?;
    assert_eq!(alert["sub"], json!(["alerts"]));
    assert_eq!(resumed["recovered"], true);

    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "carol", Some((&epoch, 0))).await?;
    let (evs, resumed) = c.replay().await?;
    // Carol gets her event and the durable broadcast; since 0 asks for
    // everything. They were published on different subjects, so docs/PROTOCOL.md
    // promises no order between them: compared as a set, in `pos` order.
    let mut got = data_i(&evs);
    got.sort_unstable();
    assert_eq!(got, [4, 5]);
    assert_increasing(&evs);
    assert_eq!(resumed["recovered"], true);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn non_durable_events_are_live_only() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut c, ready) = WsClient::connect_ready(&url, &fleet.token("alice", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    let tick = |i: u64| json!({"data": {"i": i}, "target": {"users": ["alice"]}, "durable": false});
    fleet.publish("direct", &direct("alice", 1)).await?;
    fleet.publish("tick", &tick(2)).await?;
    fleet.publish("direct", &direct("alice", 3)).await?;
    let mut evs = c.take_events(3).await?;
    evs.sort_by_key(|e| e["data"]["i"].as_u64());
    assert!(evs[1].get("pos").is_none(), "non-durable event has a pos: {}", evs[1]);
    assert!(evs[0]["pos"].is_u64() && evs[2]["pos"].is_u64());
    drop(c);
    fleet.publish("tick", &tick(4)).await?;
    fleet.publish("direct", &direct("alice", 5)).await?;
    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "alice", Some((&epoch, 0))).await?;
    let (evs, _) = c.replay().await?;
    assert_eq!(data_i(&evs), [1, 3, 5]);
    fleet.shutdown().await;
    Ok(())
}

async fn wait_ready(addr: std::net::SocketAddr) -> R {
    for _ in 0..300 {
        if switchyard_tests::fleet::http_get(addr, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} not ready after a nats-server restart")
}

#[tokio::test]
async fn resume_stays_correct_across_a_nats_server_restart() -> R {
    let mut fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut c, ready) = WsClient::connect_ready(&url, &fleet.token("alice", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    for i in 0..3 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    let seen = event_pos(&c.take_events(3).await?[2]);
    drop(c);

    fleet.nats.restart()?;
    wait_ready(fleet.edge_admin()).await?;
    wait_ready(fleet.router.as_ref().unwrap().admin_addr).await?;
    // The producer's client reconnects by itself; publish once it has.
    for _ in 0..200 {
        if fleet.producer.connection_state() == async_nats::connection::State::Connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past half a lease TTL (5 s by default): the router must still own its
    // partitions after the restart, not just be finishing what it had.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for i in 3..6 {
        fleet.publish("direct", &direct("alice", i)).await?;
    }
    fleet.settle().await?;
    let (mut c, ready) = fleet.connect(&url, "alice", Some((&epoch, seen))).await?;
    let (evs, resumed) = c.replay().await?;
    if ready["epoch"] == epoch.as_str() {
        // File storage kept the log: exactly the missed events, recovered.
        assert_eq!(data_i(&evs), [3, 4, 5]);
        assert!(event_pos(&evs[0]) > seen);
        assert_eq!(resumed["recovered"], true);
    } else {
        // A new incarnation must say so.
        assert_eq!(resumed["recovered"], false);
    }
    assert_eq!(ready["epoch"], epoch.as_str(), "file storage should keep the epoch");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn after_a_nats_reconnect_clients_are_told_to_resume_and_lose_nothing() -> R {
    let mut fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (mut c, ready) = WsClient::connect_ready(&url, &fleet.token("alice", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    fleet.publish("direct", &direct("alice", 0)).await?;
    let seen = event_pos(&c.take_events(1).await?[0]);

    // While the edge's NATS connection is down, its live subscriptions miss
    // whatever is published: the edge cannot know what, so it asks every
    // client to come back and resume from the log.
    fleet.nats.restart()?;
    let f = c.expect_op("reconnect").await?;
    assert_eq!(f["reason"], "resync", "{f}");
    assert!(f["after_ms"].as_u64().is_some_and(|ms| ms <= 2000), "{f}");
    assert_eq!(c.expect_close().await?, 1001);
    drop(c);

    wait_ready(fleet.edge_admin()).await?;
    for _ in 0..200 {
        if fleet.producer.connection_state() == async_nats::connection::State::Connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.publish("direct", &direct("alice", 1)).await?;
    fleet.settle().await?;
    let (mut c, _) = fleet.connect(&url, "alice", Some((&epoch, seen))).await?;
    let (evs, resumed) = c.replay().await?;
    assert_eq!(data_i(&evs), [1]);
    assert_eq!(resumed["recovered"], true);
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_since_ahead_of_the_log_is_not_recovered_and_live_events_still_flow() -> R {
    let fleet = Fleet::start().await?;
    let url = fleet.ws_url();
    let (c, ready) = WsClient::connect_ready(&url, &fleet.token("dora", json!({})), &[]).await?;
    let epoch = ready["epoch"].as_str().unwrap().to_string();
    let pos = ready["pos"].as_u64().unwrap();
    drop(c);
    fleet.publish("direct", &direct("dora", 1)).await?;
    fleet.settle().await?;
    // A position from nowhere (corrupted, or another deployment's).
    let (mut c, _) = fleet.connect(&url, "dora", Some((&epoch, pos + 1_000_000))).await?;
    let (evs, resumed) = c.replay().await?;
    assert!(evs.is_empty(), "nothing after a position beyond the log: {evs:?}");
    assert_eq!(resumed["recovered"], false);
    assert_eq!(resumed["replayed"], 0);
    // Live durable events are not held back by the bogus position.
    fleet.publish("direct", &direct("dora", 2)).await?;
    let got = c.take_events(1).await?;
    assert_eq!(data_i(&got), [2]);
    fleet.shutdown().await;
    Ok(())
}
