//! The production fleet's shape on one machine, as separate processes: a
//! 3-node nats-server cluster with JetStream (delivery log with 3
//! replicas), two routers and two edges (the real binaries). Under steady
//! durable traffic, the edges are restarted one after the other the way
//! Kubernetes replaces a pod (SIGTERM, drain, exit, start again) and one
//! router is killed with SIGKILL. Clients follow the `reconnect` advice to
//! the other edge and resume with `epoch` + `since`; at the end every client
//! must have every durable event exactly once, in publish order.
//!
//! What it relies on beyond the edge's drain and resume: that an event
//! taken in by a router that then dies is still delivered (durable ingest,
//! the router tier's JetStream event stream), and that events on one
//! subject stay in order across routers (partitioned ingest).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use switchyard_common::transcode::json_to_msgpack;
use switchyard_tests::fleet::TEST_SECRET;
use switchyard_tests::nats_cluster::NatsCluster;
use switchyard_tests::processes::{EdgeProcess, RouterProcess};
use switchyard_tests::tokens;
use switchyard_tests::ws_client::{Connect, Incoming, WsClient};
use tokio_util::sync::CancellationToken;

/// Users, each with one connection; they start spread over both edges.
const USERS: usize = 6;
/// Durable events published, each to every user.
const EVENTS: u64 = 500;
/// Time between two events (25 events/s, 150 deliveries/s).
const INTERVAL: Duration = Duration::from_millis(40);
/// After this event the producer sends a burst back to back and a router
/// is killed right after it, so that it dies with events in flight.
const BURST_AFTER: u64 = 300;
/// Events in that burst.
const BURST: u64 = 100;
/// Longest a client may be without a connection before the test gives up.
const CLIENT_DEADLINE: Duration = Duration::from_secs(90);

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    /// `data.seq` of every event received, in arrival order.
    seqs: Vec<u64>,
    /// The delivery log's epoch, from the first `ready`.
    epoch: Option<String>,
    /// Largest `pos` received (or the first `ready.pos`): where to resume.
    last_pos: u64,
    /// Connections that reached `ready`, and on which edge (0 or 1).
    edges: Vec<usize>,
    /// `reconnect` frames received.
    reconnect_advice: u32,
    /// Anything a correct fleet would not do.
    problems: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_restart_and_a_router_dies_under_traffic_without_loss_or_duplicates() -> Result<()> {
    let started = Instant::now();
    let cluster = NatsCluster::start(3).await?;
    let nats = cluster.urls();
    let logs = tempfile::Builder::new().prefix("switchyard-fleet-").tempdir()?;
    let router_settings = [
        ("SWITCHYARD_LOG_REPLICAS", "3"),
        ("SWITCHYARD_LOG_MAX_PER_USER", "100000"),
    ];
    // One at a time, as a rollout would; the first creates the delivery log.
    let mut r1 = RouterProcess::start("router-1", &nats, &router_settings, logs.path()).await?;
    let r2 = RouterProcess::start("router-2", &nats, &router_settings, logs.path()).await?;
    let edge_settings = [
        ("SWITCHYARD_DRAIN_SPREAD_MS", "1000"),
        ("SWITCHYARD_DRAIN_TIMEOUT_MS", "8000"),
        ("SWITCHYARD_RATE_PER_S", "1000"),
        ("SWITCHYARD_BURST", "2000"),
    ];
    let mut edge_a = EdgeProcess::start("edge-a", &nats, TEST_SECRET, &edge_settings, logs.path()).await?;
    let mut edge_b = EdgeProcess::start("edge-b", &nats, TEST_SECRET, &edge_settings, logs.path()).await?;
    let urls = Arc::new([edge_a.ws_url(), edge_b.ws_url()]);
    eprintln!(
        "fleet up after {:?}; logs in {}",
        started.elapsed(),
        logs.path().display()
    );

    let users: Vec<String> = (0..USERS).map(|i| format!("fleet-user-{i}")).collect();
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    let mut seen = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let state = Arc::new(Mutex::new(Seen::default()));
        seen.push(state.clone());
        clients.push(tokio::spawn(run_client(
            user.clone(),
            urls.clone(),
            i % 2,
            state,
            stop.clone(),
        )));
    }
    wait_until("every client is connected", Duration::from_secs(20), || {
        seen.iter().all(|s| !s.lock().expect("lock").edges.is_empty())
    })
    .await?;

    let producer = async_nats::connect(nats.split(',').collect::<Vec<_>>()).await?;
    let fences = fence(&producer).await?;
    eprintln!("path ready after {fences} fence event(s), at {:?}", started.elapsed());
    let (burst_tx, burst_rx) = tokio::sync::oneshot::channel();
    let publishing = tokio::spawn(publish(producer, users.clone(), burst_tx));

    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = edge_a.restart(Duration::from_secs(20)).await?;
    eprintln!("edge-a drained ({status}) and restarted at {:?}", started.elapsed());
    assert!(status.success(), "edge-a did not exit cleanly after SIGTERM: {status}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = edge_b.restart(Duration::from_secs(20)).await?;
    eprintln!("edge-b drained ({status}) and restarted at {:?}", started.elapsed());
    assert!(status.success(), "edge-b did not exit cleanly after SIGTERM: {status}");
    burst_rx.await.context("the producer ended before its burst")?;
    r1.process.kill()?;
    eprintln!("router-1 killed right after a burst at {:?}", started.elapsed());

    publishing.await.context("producer task")??;
    eprintln!("producer done at {:?}", started.elapsed());
    let caught_up = wait_until("every client has the last event", Duration::from_secs(30), || {
        seen.iter().all(|s| s.lock().expect("lock").seqs.contains(&EVENTS))
    })
    .await;
    // A little longer, so anything arriving after the last event (late, or twice) is seen too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    for c in clients {
        c.await.context("client task")??;
    }
    eprintln!("finished at {:?}", started.elapsed());

    let mut report = Vec::new();
    for (user, state) in users.iter().zip(&seen) {
        let s = state.lock().expect("lock");
        eprintln!(
            "{user}: {} events, connections on edges {:?}, {} reconnect frames",
            s.seqs.len(),
            s.edges,
            s.reconnect_advice
        );
        report.extend(check_client(user, &s));
    }
    if let Err(e) = caught_up {
        report.push(e.to_string());
    }
    if !report.is_empty() {
        let mut msg = format!(
            "the fleet lost, duplicated or reordered events:\n  {}",
            report.join("\n  ")
        );
        for p in [&r1.process, &r2.process, &edge_a.process, &edge_b.process] {
            msg.push_str(&format!("\n--- {} (last lines) ---\n{}", p.name(), p.log_tail(25)));
        }
        bail!(msg);
    }
    drop(cluster);
    Ok(())
}

/// Publishes `EVENTS` durable events, each targeting every user, at a
/// steady rate (but for one burst, announced on `burst_sent`), on one
/// subject (so they must arrive in publish order).
async fn publish(
    producer: async_nats::Client,
    users: Vec<String>,
    burst_sent: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let mut tick = tokio::time::interval(INTERVAL);
    let mut burst_sent = Some(burst_sent);
    for seq in 1..=EVENTS {
        if seq == BURST_AFTER + BURST + 1 {
            producer.flush().await?;
            if let Some(tx) = burst_sent.take() {
                // The receiver is gone only when the test already failed.
                let _ = tx.send(());
            }
        }
        if !(BURST_AFTER + 1..=BURST_AFTER + BURST).contains(&seq) {
            tick.tick().await;
        }
        let mut payload = Vec::new();
        json_to_msgpack(
            &json!({"data": {"seq": seq}, "target": {"users": users}, "durable": true}),
            &mut payload,
        );
        producer.publish("sy.events.fleet", payload.into()).await?;
    }
    producer.flush().await?;
    Ok(())
}

/// Waits until an event published now is stored in the delivery log, so the
/// test starts on a working path: routers ready and the log's stream able to
/// store. Publishes a fence event (to a user no client is) every 500 ms until
/// one arrives; returns how many it took. More than one means events
/// published right after the fleet reported ready were lost (see
/// docs/OPERATIONS.md: a new R3 stream takes a moment to elect its leader,
/// and routers publish deliveries without waiting for JetStream's ack).
async fn fence(producer: &async_nats::Client) -> Result<u32> {
    let js = async_nats::jetstream::new(producer.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    for attempt in 1u32.. {
        let mut payload = Vec::new();
        json_to_msgpack(
            &json!({"data": attempt, "target": {"users": ["zz-fence"]}}),
            &mut payload,
        );
        producer.publish("sy.events.fence", payload.into()).await?;
        producer.flush().await?;
        let next = Instant::now() + Duration::from_millis(500);
        while Instant::now() < next {
            let (stream, subject) = switchyard_tests::fleet::user_log("zz-fence");
            let stored = match js.get_stream(stream).await {
                Ok(stream) => stream.get_last_raw_message_by_subject(&subject).await.is_ok(),
                Err(_) => false,
            };
            if stored {
                return Ok(attempt);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if Instant::now() >= deadline {
            bail!("no fence event reached the delivery log within 15 s");
        }
    }
    unreachable!("the loop returns or fails")
}

/// One user's client: connects to its home edge, follows `reconnect`
/// advice (or a lost connection) to the other edge, and resumes from the
/// last position it saw, until `stop`.
async fn run_client(
    user: String,
    urls: Arc<[String; 2]>,
    home: usize,
    state: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) -> Result<()> {
    let token = tokens::token(TEST_SECRET, &user, 3600, json!({}));
    let mut edge = home;
    let mut last_connected = Instant::now();
    while !stop.is_cancelled() {
        if last_connected.elapsed() > CLIENT_DEADLINE {
            bail!("{user}: no connection to any edge for {CLIENT_DEADLINE:?}");
        }
        let resume = {
            let s = state.lock().expect("lock");
            s.epoch.as_ref().map(|e| format!("epoch={e}&since={}", s.last_pos))
        };
        let opts = Connect {
            bearer: Some(token.clone()),
            protocols: vec![],
            query: resume.clone(),
        };
        let mut c = match tokio::time::timeout(Duration::from_secs(5), WsClient::connect(&urls[edge], &opts)).await {
            Ok(Ok(c)) => c,
            // Refused (draining: 503; or down): try the other edge.
            _ => {
                edge = 1 - edge;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ready = match c.next_within(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(f)) if f["op"] == "ready" => f,
            _ => {
                edge = 1 - edge;
                continue;
            }
        };
        {
            let mut s = state.lock().expect("lock");
            let epoch = ready["epoch"].as_str().unwrap_or_default().to_string();
            match &s.epoch {
                None => {
                    s.epoch = Some(epoch);
                    s.last_pos = ready["pos"].as_u64().unwrap_or(0);
                }
                Some(e) if *e != epoch => {
                    let p = format!("epoch changed from {e} to {epoch}");
                    s.problems.push(p);
                }
                Some(_) => {}
            }
            s.edges.push(edge);
        }
        edge = read_until_gone(&mut c, edge, &state, &stop).await?;
        last_connected = Instant::now();
    }
    Ok(())
}

/// Reads frames until the connection ends, the server advises to
/// reconnect, or `stop`; returns the edge to connect to next.
async fn read_until_gone(
    c: &mut WsClient,
    edge: usize,
    state: &Mutex<Seen>,
    stop: &CancellationToken,
) -> Result<usize> {
    while !stop.is_cancelled() {
        let Some(incoming) = c.next_within(Duration::from_millis(250)).await? else {
            continue;
        };
        let f = match incoming {
            Incoming::Frame(f) => f,
            Incoming::Closed(..) => return Ok(1 - edge),
        };
        let reconnect_after = {
            let mut s = state.lock().expect("lock");
            match f["op"].as_str() {
                Some("event") => take(&mut s, &f),
                Some("batch") => {
                    for e in f["events"].as_array().map(Vec::as_slice).unwrap_or_default() {
                        take(&mut s, e);
                    }
                }
                Some("resumed") if f["recovered"] != true => s.problems.push(format!("resume not recovered: {f}")),
                Some("resumed") => {}
                Some("reconnect") => s.reconnect_advice += 1,
                _ => s.problems.push(format!("unexpected frame {f}")),
            }
            (f["op"] == "reconnect").then(|| f["after_ms"].as_u64().unwrap_or(0).min(5_000))
        };
        if let Some(after) = reconnect_after {
            tokio::time::sleep(Duration::from_millis(after)).await;
            return Ok(1 - edge);
        }
    }
    Ok(edge)
}

/// Records one event: its `seq`, and whether its `pos` moved forward.
fn take(s: &mut Seen, e: &Value) {
    let Some(pos) = e["pos"].as_u64() else {
        s.problems.push(format!("durable event without pos: {e}"));
        return;
    };
    if pos <= s.last_pos {
        s.problems
            .push(format!("pos {pos} after {} (duplicate or out of order)", s.last_pos));
    }
    s.last_pos = s.last_pos.max(pos);
    match e["data"]["seq"].as_u64() {
        Some(seq) => s.seqs.push(seq),
        None => s.problems.push(format!("event without data.seq: {e}")),
    }
}

/// Everything wrong with what one client saw.
fn check_client(user: &str, s: &Seen) -> Vec<String> {
    let mut out: Vec<String> = s.problems.iter().map(|p| format!("{user}: {p}")).collect();
    let mut counts = vec![0u32; EVENTS as usize + 1];
    for &seq in &s.seqs {
        match counts.get_mut(seq as usize) {
            Some(c) if seq > 0 => *c += 1,
            _ => out.push(format!("{user}: unknown seq {seq}")),
        }
    }
    let missing: Vec<u64> = (1..=EVENTS).filter(|&q| counts[q as usize] == 0).collect();
    let duplicated: Vec<u64> = (1..=EVENTS).filter(|&q| counts[q as usize] > 1).collect();
    let reordered: Vec<u64> = s.seqs.windows(2).filter(|w| w[0] >= w[1]).map(|w| w[1]).collect();
    if !missing.is_empty() {
        out.push(format!("{user}: {} events lost: {}", missing.len(), brief(&missing)));
    }
    if !duplicated.is_empty() {
        out.push(format!(
            "{user}: {} events duplicated: {}",
            duplicated.len(),
            brief(&duplicated)
        ));
    }
    if !reordered.is_empty() {
        out.push(format!(
            "{user}: {} events arrived after a later one: {}",
            reordered.len(),
            brief(&reordered)
        ));
    }
    // Edge A's clients moved at A's restart, and everyone was on B when B restarted.
    if s.edges.len() < 2 || s.reconnect_advice < 1 {
        out.push(format!(
            "{user}: expected to be moved by a drain: connections on edges {:?}, {} reconnect frames",
            s.edges, s.reconnect_advice
        ));
    }
    out
}

/// The range and first few numbers of a non-empty list, for messages.
fn brief(v: &[u64]) -> String {
    let head: Vec<String> = v.iter().take(20).map(u64::to_string).collect();
    let (lo, hi) = (v.iter().min().unwrap_or(&0), v.iter().max().unwrap_or(&0));
    let more = if v.len() > 20 { " ..." } else { "" };
    format!("seq {lo}..={hi}: {}{more}", head.join(", "))
}

/// Polls `done` until it holds, at most `timeout`.
async fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
