//! Which edges (and routers) are alive, from their heartbeats.
//!
//! Edges publish their id on `<prefix>.edges.heartbeat` every second and on
//! `<prefix>.edges.bye` when they stop. One task per router keeps the set
//! and publishes it through a `watch`; an edge not heard from for the edge
//! timeout is dropped from it, and each delivery partition then forgets that
//! edge's users.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchyard_common::subject::Subjects;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The edges alive now.
pub type EdgeSet = Arc<HashSet<String>>;

/// Subscribes to edge heartbeats; the returned receiver sees the live set.
pub async fn track(
    client: async_nats::Client,
    subjects: &Subjects,
    timeout: Duration,
    cancel: CancellationToken,
) -> Result<(watch::Receiver<EdgeSet>, impl std::future::Future<Output = ()>), async_nats::SubscribeError> {
    let byes = Some(subjects.edges_bye());
    track_peers(
        client,
        subjects.edges_heartbeat(),
        byes,
        timeout,
        "switchyard_router_edges",
        cancel,
    )
    .await
}

/// Subscribes to router heartbeats (this router's own included); the
/// returned receiver sees the routers alive (the application API's `stats`
/// and its questions to every router). A router stopping says nothing: it
/// is dropped after `timeout`.
pub async fn track_routers(
    client: async_nats::Client,
    subjects: &Subjects,
    timeout: Duration,
    cancel: CancellationToken,
) -> Result<(watch::Receiver<EdgeSet>, impl std::future::Future<Output = ()>), async_nats::SubscribeError> {
    track_peers(
        client,
        subjects.router_heartbeat(),
        None,
        timeout,
        "switchyard_router_routers",
        cancel,
    )
    .await
}

/// Keeps the set of peers whose heartbeat (their id as the payload) on
/// `beats` arrived within `timeout`, less those that said goodbye on `byes`.
async fn track_peers(
    client: async_nats::Client,
    beats: String,
    byes: Option<String>,
    timeout: Duration,
    gauge: &'static str,
    cancel: CancellationToken,
) -> Result<(watch::Receiver<EdgeSet>, impl std::future::Future<Output = ()>), async_nats::SubscribeError> {
    let mut beats = client.subscribe(beats).await?;
    let mut byes = match byes {
        Some(subject) => Some(client.subscribe(subject).await?),
        None => None,
    };
    let (tx, rx) = watch::channel(EdgeSet::default());
    let task = async move {
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let mut sweep = tokio::time::interval((timeout / 8).max(Duration::from_millis(100)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let bye = async {
                match byes.as_mut() {
                    Some(byes) => byes.next().await,
                    None => std::future::pending().await,
                }
            };
            let changed = tokio::select! {
                _ = cancel.cancelled() => return,
                m = beats.next() => match m {
                    Some(m) => match std::str::from_utf8(&m.payload) {
                        Ok(id) if !id.is_empty() && id.len() <= 64 => seen.insert(id.to_string(), Instant::now()).is_none(),
                        _ => false,
                    },
                    None => return,
                },
                m = bye => match m {
                    Some(m) => std::str::from_utf8(&m.payload).is_ok_and(|id| seen.remove(id).is_some()),
                    None => return,
                },
                _ = sweep.tick() => {
                    let before = seen.len();
                    seen.retain(|_, at| at.elapsed() < timeout);
                    seen.len() != before
                }
            };
            if changed {
                metrics::gauge!(gauge).set(seen.len() as f64);
                tx.send_replace(Arc::new(seen.keys().cloned().collect()));
            }
        }
    };
    Ok((rx, task))
}
