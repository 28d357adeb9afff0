//! Which edges are alive, from their heartbeats, for every delivery partition.
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
    let mut beats = client.subscribe(subjects.edges_heartbeat()).await?;
    let mut byes = client.subscribe(subjects.edges_bye()).await?;
    let (tx, rx) = watch::channel(EdgeSet::default());
    let task = async move {
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let mut sweep = tokio::time::interval((timeout / 8).max(Duration::from_millis(100)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = tokio::select! {
                _ = cancel.cancelled() => return,
                m = beats.next() => match m {
                    Some(m) => match std::str::from_utf8(&m.payload) {
                        Ok(id) if !id.is_empty() && id.len() <= 64 => seen.insert(id.to_string(), Instant::now()).is_none(),
                        _ => false,
                    },
                    None => return,
                },
                m = byes.next() => match m {
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
                metrics::gauge!("switchyard_router_edges").set(seen.len() as f64);
                tx.send_replace(Arc::new(seen.keys().cloned().collect()));
            }
        }
    };
    Ok((rx, task))
}
