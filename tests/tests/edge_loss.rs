//! An edge that dies without a word: the routers forget it (their metrics,
//! read here, belong to this test binary alone) and its users resume on
//! another edge without losing anything.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use switchyard_tests::fleet::{Fleet, TEST_SECRET};
use switchyard_tests::processes::EdgeProcess;
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
async fn a_killed_edge_is_forgotten_and_its_users_resume_elsewhere_without_loss() -> Result<()> {
    let fleet = Fleet::start_custom(|r| r.edge_timeout_ms = 1500, |_| {}).await?;
    let logs = tempfile::tempdir()?;
    let mut doomed = EdgeProcess::start("edge-doomed", &fleet.nats.url(), TEST_SECRET, &[], logs.path()).await?;
    let mut plan = Plan::new(6);
    set_up(&fleet.ws_url(), &plan).await?;
    let mut seen: BTreeMap<String, Seen> = plan.users.iter().map(|u| (u.clone(), Seen::default())).collect();
    let mut on_doomed = Vec::new();
    for u in &plan.users {
        let s = seen.get_mut(u).expect("user");
        on_doomed.push(connect(&doomed.ws_url(), u, s).await?);
    }
    for n in 0..20u64 {
        let (tail, body) = plan.event(n);
        fleet.publish(&tail, &body).await?;
    }
    fleet.settle().await?;
    for (u, c) in plan.users.iter().zip(on_doomed.iter_mut()) {
        let s = seen.get_mut(u).expect("user");
        let want = plan.owed[u].len();
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while s.durable.len() < want && tokio::time::Instant::now() < until {
            read_for(c, s, Duration::from_millis(100)).await?;
        }
    }
    // The edge dies without a word; events keep coming while its users are away.
    doomed.process.kill()?;
    drop(on_doomed);
    for n in 20..60u64 {
        let (tail, body) = plan.event(n);
        fleet.publish(&tail, &body).await?;
    }
    fleet.settle().await?;
    // The routers forget it: only the surviving edge is counted.
    let admin = fleet.router.as_ref().expect("router").admin_addr;
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = switchyard_tests::fleet::http_get(admin, "/metrics").await?;
        if metrics.lines().any(|l| l == "switchyard_router_edges 1") {
            break;
        }
        if tokio::time::Instant::now() > until {
            bail!("the dead edge was not forgotten");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its users resume on the other edge and miss nothing.
    for u in &plan.users {
        let s = seen.get_mut(u).expect("user");
        let mut c = connect(&fleet.ws_url(), u, s).await?;
        read_for(&mut c, s, Duration::from_millis(100)).await?;
    }
    check(&plan, &seen);
    fleet.shutdown().await;
    Ok(())
}
