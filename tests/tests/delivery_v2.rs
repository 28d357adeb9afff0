//! The router tier's two stages and the edges' one-subscription intake,
//! checked as clients see them: with clients connecting, resuming and
//! disconnecting all the time over two routers and two edges, every durable
//! event a user is owed arrives exactly once, in `pos` order per
//! connection; users on several edges get each event once per connection.
//! (An edge that dies: `edge_loss.rs`, a test binary of its own so that the
//! router's metrics it reads are its own.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use switchyard_tests::fleet::{Fleet, TEST_SECRET};
use switchyard_tests::ws_client::{Connect, Incoming, WsClient};

/// What one user has received across its chain of resumed connections.
#[derive(Default)]
struct Seen {
    epoch: Option<String>,
    pos: u64,
    /// Durable event ids, in arrival order over all connections.
    durable: Vec<u64>,
}

/// Connects `user` (resuming from what it has seen, if anything) and reads
/// until `resumed` (or just `ready`), checking the order.
async fn connect(url: &str, user: &str, seen: &mut Seen) -> Result<WsClient> {
    let query = seen.epoch.as_ref().map(|e| format!("epoch={e}&since={}", seen.pos));
    let opts = Connect {
        bearer: Some(switchyard_tests::tokens::token(
            TEST_SECRET,
            user,
            3600,
            json!({"rooms": ["desk"]}),
        )),
        protocols: vec![],
        query,
    };
    let mut c = WsClient::connect(url, &opts)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let ready = c.expect_op("ready").await?;
    let epoch = ready["epoch"].as_str().context("epoch")?.to_string();
    if seen.epoch.is_none() {
        seen.epoch = Some(epoch);
        seen.pos = ready["pos"].as_u64().context("pos")?;
        return Ok(c);
    }
    assert_eq!(seen.epoch.as_deref(), Some(epoch.as_str()), "the epoch stays");
    loop {
        let f = c.frame().await?;
        match f["op"].as_str() {
            Some("resumed") => return Ok(c),
            _ => take(&f, seen)?,
        }
    }
}

/// Records the durable events of an `event` or `batch` frame.
fn take(f: &Value, seen: &mut Seen) -> Result<()> {
    let events = match f["op"].as_str() {
        Some("event") => vec![f.clone()],
        Some("batch") => f["events"].as_array().cloned().context("events")?,
        Some("dropped") => bail!("unexpected dropped notice {f}"),
        _ => bail!("unexpected frame {f}"),
    };
    for e in events {
        let Some(pos) = e["pos"].as_u64() else { continue };
        assert!(pos > seen.pos, "pos {pos} after {} (not increasing): {e}", seen.pos);
        seen.pos = pos;
        seen.durable.push(e["data"]["n"].as_u64().context("n")?);
    }
    Ok(())
}

/// Reads whatever arrives within `wait`.
async fn read_for(c: &mut WsClient, seen: &mut Seen, wait: Duration) -> Result<()> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        match c.next_within(left).await? {
            None => return Ok(()),
            Some(Incoming::Frame(f)) => take(&f, seen)?,
            Some(Incoming::Closed(code, reason)) => bail!("closed {code} {reason}"),
        }
    }
}

/// Which durable events each user is owed, as the producer planned them.
struct Plan {
    users: Vec<String>,
    owed: BTreeMap<String, BTreeSet<u64>>,
}

impl Plan {
    fn new(n: usize) -> Plan {
        let users: Vec<String> = (0..n).map(|i| format!("churn{i}")).collect();
        let owed = users.iter().map(|u| (u.clone(), BTreeSet::new())).collect();
        Plan { users, owed }
    }

    /// Event `n`: its subject tail and body, and who is owed it.
    fn event(&mut self, n: u64) -> (String, Value) {
        let users = self.users.clone();
        let (tail, target, owed): (&str, Value, Vec<String>) = match n % 4 {
            // Subscription match: even users subscribed to `churn`.
            0 => (
                "churn",
                json!({"match": {"sym": "X"}}),
                users.iter().step_by(2).cloned().collect(),
            ),
            // The room: odd users joined `desk`.
            1 => (
                "roomy",
                json!({"room": "desk"}),
                users.iter().skip(1).step_by(2).cloned().collect(),
            ),
            // One user directly.
            2 => {
                let u = users[(n as usize / 4) % users.len()].clone();
                ("direct", json!({"users": [u.clone()]}), vec![u])
            }
            // Everyone.
            _ => ("news", json!({"all": true}), users.clone()),
        };
        for u in owed {
            self.owed.get_mut(&u).expect("a planned user").insert(n);
        }
        (tail.to_string(), json!({"data": {"n": n}, "target": target}))
    }
}

/// Subscribes the even users and puts the odd ones in the room.
async fn set_up(url: &str, plan: &Plan) -> Result<()> {
    for (i, u) in plan.users.iter().enumerate() {
        let token = switchyard_tests::tokens::token(TEST_SECRET, u, 3600, json!({"rooms": ["desk"]}));
        let (mut c, _) = WsClient::connect_ready(url, &token, &[]).await?;
        if i % 2 == 0 {
            c.ok(
                json!({"op":"subscribe","sub":"s","type":"churn","filters":{"sym":["X"]}}),
                1,
            )
            .await?;
        } else {
            c.ok(json!({"op":"join","room":"desk"}), 1).await?;
        }
    }
    Ok(())
}

/// Every user has exactly what it was owed, once.
fn check(plan: &Plan, seen: &BTreeMap<String, Seen>) {
    for (u, owed) in &plan.owed {
        let got = &seen[u].durable;
        let set: BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(set.len(), got.len(), "{u} got a durable event twice: {got:?}");
        let missing: Vec<_> = owed.difference(&set).collect();
        let extra: Vec<_> = set.difference(owed).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{u}: missing {missing:?}, not owed {extra:?}"
        );
    }
}

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
