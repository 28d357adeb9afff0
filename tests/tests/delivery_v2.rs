//! The router tier's two stages and the edges' one-subscription intake,
//! checked as clients see them: with clients connecting, resuming and
//! disconnecting all the time over two routers and two edges, every durable
//! event a user is owed arrives exactly once, in `pos` order per
//! connection; users on several edges get each event once per connection.
//! (An edge that dies: `edge_loss.rs`, a test binary of its own so that the
//! router's metrics it reads are its own.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use switchyard_tests::churn::{check, connect, read_for, set_up, Plan, Seen};
use switchyard_tests::fleet::Fleet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_over_two_routers_and_two_edges_delivers_every_durable_event_exactly_once() -> Result<()> {
    let fleet = Fleet::start().await?;
    let router2 = fleet.start_router(|_| {}).await?;
    let edge2 = fleet.start_edge().await?;
    let urls = [fleet.ws_url(), format!("ws://{}/ws", edge2.ws_addr)];
    let mut plan = Plan::new(10);
    set_up(&urls[0], &plan).await?;
    let mut seen: BTreeMap<String, Seen> = plan.users.iter().map(|u| (u.clone(), Seen::default())).collect();
    // Everyone connects once to learn the epoch and a starting position.
    for (i, u) in plan.users.iter().enumerate() {
        let c = connect(&urls[i % 2], u, seen.get_mut(u).expect("user")).await?;
        drop(c);
    }
    // A producer publishes durable events (and live-only ticks between
    // them) while users connect, read a little, drop and resume, moving
    // between edges.
    let mut events = Vec::new();
    for n in 0..240u64 {
        events.push(plan.event(n));
    }
    let producer = fleet.producer.clone();
    let publishing = tokio::spawn(async move {
        for (i, (tail, body)) in events.into_iter().enumerate() {
            let mut payload = Vec::new();
            switchyard_common::transcode::json_to_msgpack(&body, &mut payload);
            producer.publish(format!("sy.events.{tail}"), payload.into()).await?;
            if i % 3 == 0 {
                let mut tick = Vec::new();
                switchyard_common::transcode::json_to_msgpack(
                    &json!({"data": {"tick": i}, "target": {"all": true}, "durable": false}),
                    &mut tick,
                );
                producer.publish("sy.events.tick.X", tick.into()).await?;
            }
            if i % 4 == 0 {
                producer.flush().await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        producer.flush().await?;
        anyhow::Ok(())
    });
    let mut round = 0usize;
    while !publishing.is_finished() && round < 400 {
        let u = plan.users[round % plan.users.len()].clone();
        let url = &urls[(round / plan.users.len()) % 2];
        let s = seen.get_mut(&u).expect("user");
        let mut c = connect(url, &u, s).await?;
        read_for(&mut c, s, Duration::from_millis(40)).await?;
        drop(c);
        round += 1;
    }
    publishing.await??;
    fleet.settle().await?;
    // Finally everyone resumes once more and must then hold exactly what it is owed.
    for (i, u) in plan.users.iter().enumerate() {
        let s = seen.get_mut(u).expect("user");
        let mut c = connect(&urls[i % 2], u, s).await?;
        read_for(&mut c, s, Duration::from_millis(200)).await?;
    }
    check(&plan, &seen);
    edge2.shutdown().await;
    router2.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_users_on_two_edges_get_rooms_broadcasts_and_matches_once_each() -> Result<()> {
    let fleet = Fleet::start().await?;
    let router2 = fleet.start_router(|_| {}).await?;
    let edge2 = fleet.start_edge().await?;
    let urls = [fleet.ws_url(), format!("ws://{}/ws", edge2.ws_addr)];
    let mut plan = Plan::new(8);
    set_up(&urls[0], &plan).await?;
    let mut seen: BTreeMap<String, Seen> = plan.users.iter().map(|u| (u.clone(), Seen::default())).collect();
    // Each user connected on both edges at once: each connection gets everything once.
    let mut conns = Vec::new();
    for u in &plan.users {
        for url in &urls {
            let mut s = Seen::default();
            let c = connect(url, u, &mut s).await?;
            conns.push((u.clone(), c, s));
        }
    }
    for n in 0..40u64 {
        let (tail, body) = plan.event(n);
        fleet.publish(&tail, &body).await?;
    }
    fleet.settle().await?;
    for (u, c, s) in &mut conns {
        let want = plan.owed[u.as_str()].len();
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while s.durable.len() < want && tokio::time::Instant::now() < until {
            read_for(c, s, Duration::from_millis(100)).await?;
        }
    }
    for (u, _, s) in conns {
        let entry = seen.get_mut(&u).expect("user");
        // Both connections of the user are checked against the plan separately.
        let set: BTreeSet<u64> = s.durable.iter().copied().collect();
        assert_eq!(set.len(), s.durable.len(), "{u} got an event twice on one connection");
        assert_eq!(&set, &plan.owed[&u], "{u} on one connection");
        entry.durable = s.durable;
    }
    check(&plan, &seen);
    edge2.shutdown().await;
    router2.shutdown().await;
    fleet.shutdown().await;
    Ok(())
}
