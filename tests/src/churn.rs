//! Clients that connect, read, drop and resume while a producer's plan
//! says which durable events each user is owed: the checks behind the
//! delivery tests (`tests/tests/delivery_v2.rs`, `edge_loss.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::fleet::TEST_SECRET;
use crate::ws_client::{Connect, Incoming, WsClient};

/// What one user has received across its chain of resumed connections.
#[derive(Default)]
pub struct Seen {
    /// The epoch of the first `ready`.
    pub epoch: Option<String>,
    /// The largest `pos` seen.
    pub pos: u64,
    /// Durable event ids, in arrival order over all connections.
    pub durable: Vec<u64>,
}

/// Connects `user` (resuming from what it has seen, if anything) and reads
/// until `resumed` (or just `ready`), checking the order.
pub async fn connect(url: &str, user: &str, seen: &mut Seen) -> Result<WsClient> {
    let query = seen.epoch.as_ref().map(|e| format!("epoch={e}&since={}", seen.pos));
    let opts = Connect {
        bearer: Some(crate::tokens::token(
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
pub fn take(f: &Value, seen: &mut Seen) -> Result<()> {
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
pub async fn read_for(c: &mut WsClient, seen: &mut Seen, wait: Duration) -> Result<()> {
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
pub struct Plan {
    /// The users, `churn0`, `churn1`, ...
    pub users: Vec<String>,
    /// For each user, the ids of the durable events it is owed.
    pub owed: BTreeMap<String, BTreeSet<u64>>,
}

impl Plan {
    /// A plan for `n` users.
    pub fn new(n: usize) -> Plan {
        let users: Vec<String> = (0..n).map(|i| format!("churn{i}")).collect();
        let owed = users.iter().map(|u| (u.clone(), BTreeSet::new())).collect();
        Plan { users, owed }
    }

    /// Event `n`: its subject tail and body, and who is owed it.
    pub fn event(&mut self, n: u64) -> (String, Value) {
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
pub async fn set_up(url: &str, plan: &Plan) -> Result<()> {
    for (i, u) in plan.users.iter().enumerate() {
        let token = crate::tokens::token(TEST_SECRET, u, 3600, json!({"rooms": ["desk"]}));
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

/// Every user has exactly what it was owed, once (panics otherwise).
pub fn check(plan: &Plan, seen: &BTreeMap<String, Seen>) {
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
