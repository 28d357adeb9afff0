//! The node's live intake: one NATS subscription (`<prefix>.edge.<edge id>`)
//! and the user → connections table it dispatches to.
//!
//! Delivery partitions send this edge one message per batch, each body once
//! and the users (with their `pos`) inside; the dispatcher hands each item
//! to the named users' connections (or, for a broadcast, to every user of
//! the batch's partition on this node) without waiting: a connection's
//! queue applies flow control. There is no per-user subscription, channel
//! or task. The table is sharded by user partition, and each shard also
//! keeps what this node has not yet announced of its users to that
//! partition ([`crate::presence`] sends it).
//!
//! It must not hold a shard lock across `.await` (it never awaits under one).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::StreamExt;
use switchyard_common::delivery::{peek_meta, DeliveryMeta};
use switchyard_common::fanout::{decode_edge_message, user_partition, EdgeMessage, Recipient};
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::conn::{ConnHandle, Delivery};

/// Where a registered user's log is and from where live deliveries flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// A valid `ready.pos`: everything of the user's up to here is in the
    /// log, everything after reaches this node live.
    pub pos: u64,
    /// The log's identity for the user (`ready.epoch`).
    pub epoch: String,
    /// The log stream holding the user's deliveries.
    pub stream: String,
}

/// Why a user could not be registered with its delivery partition.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    /// No router answered for the user's partition in time.
    #[error("the delivery partition did not answer")]
    Unavailable,
    /// The node is shutting down.
    #[error("edge stopping")]
    Stopped,
}

/// A waiting registration's answer.
pub type RegisterReply = oneshot::Sender<Result<Registration, RegisterError>>;

/// One user partition's part of the table.
#[derive(Default)]
pub struct Shard {
    /// Users with connections on this node.
    pub users: HashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    /// Users whose presence changed since the last announcement.
    pub dirty: HashSet<Arc<str>>,
    /// The next announcement must carry the whole set (the partition does not know this node).
    pub full: bool,
    /// A whole set is being sent in parts; the next one is this part.
    pub full_part: Option<u32>,
    /// Registrations waiting for the next announcement's answer.
    pub waiters: Vec<RegisterReply>,
    /// An announcement is on its way (one at a time per partition, in order).
    pub in_flight: bool,
}

/// User → connections, sharded by user partition.
pub struct UserTable {
    shards: Vec<Mutex<Shard>>,
    /// Wakes the announcer: a shard has something to announce.
    pub announce: Notify,
    /// Connections in the table (watched while draining).
    connections: watch::Sender<usize>,
    /// Users in the table.
    users: AtomicUsize,
}

impl UserTable {
    /// A table for `partitions` user partitions; every shard starts needing a full announcement.
    pub fn new(partitions: u32) -> UserTable {
        UserTable {
            shards: (0..partitions.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        full: true,
                        ..Shard::default()
                    })
                })
                .collect(),
            announce: Notify::new(),
            connections: watch::channel(0).0,
            users: AtomicUsize::new(0),
        }
    }

    /// User partitions.
    pub fn partitions(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The partition of `user`.
    pub fn partition_of(&self, user: &str) -> u32 {
        user_partition(user, self.partitions())
    }

    /// Locks one shard (briefly; never across `.await`).
    pub fn shard(&self, partition: u32) -> MutexGuard<'_, Shard> {
        self.shards[partition as usize].lock().expect("user table lock")
    }

    /// Adds a connection; the answer comes once this node's presence of the
    /// user is announced to (and acknowledged by) the user's partition.
    pub fn add(&self, conn: Arc<ConnHandle>, reply: RegisterReply) {
        let p = self.partition_of(conn.user());
        {
            let mut shard = self.shard(p);
            let user = conn.user().clone();
            let conns = shard.users.entry(user.clone()).or_default();
            let first = conns.is_empty();
            conns.push(conn);
            if first {
                shard.dirty.insert(user);
                self.users.fetch_add(1, Ordering::Relaxed);
            }
            shard.waiters.push(reply);
        }
        self.counted(1, 0);
        self.announce.notify_one();
    }

    /// Removes a connection (idempotent); the last one of a user makes the user absent.
    pub fn remove(&self, conn: &ConnHandle) {
        let p = self.partition_of(conn.user());
        let gone = {
            let mut shard = self.shard(p);
            let Some(conns) = shard.users.get_mut(conn.user()) else {
                return;
            };
            let before = conns.len();
            conns.retain(|c| c.id != conn.id);
            if conns.len() == before {
                return;
            }
            if conns.is_empty() {
                shard.users.remove(conn.user());
                shard.dirty.insert(conn.user().clone());
                self.users.fetch_sub(1, Ordering::Relaxed);
                true
            } else {
                false
            }
        };
        self.counted(0, 1);
        if gone {
            self.announce.notify_one();
        }
    }

    fn counted(&self, added: usize, removed: usize) {
        let mut now = 0;
        self.connections.send_modify(|n| {
            *n = (*n + added).saturating_sub(removed);
            now = *n;
        });
        metrics::gauge!("switchyard_edge_connections").set(now as f64);
        metrics::gauge!("switchyard_edge_users").set(self.users.load(Ordering::Relaxed) as f64);
    }

    /// Every connection in the table now (each shard locked only to copy its handles).
    pub fn connections(&self) -> Vec<Arc<ConnHandle>> {
        let mut out = Vec::with_capacity(*self.connections.borrow());
        for s in &self.shards {
            out.extend(s.lock().expect("user table lock").users.values().flatten().cloned());
        }
        out
    }

    /// The connections of `user` on this node now.
    pub fn connections_of(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        let shard = self.shard(self.partition_of(user));
        shard.users.get(user).cloned().unwrap_or_default()
    }

    /// How many connections `user` has on this node.
    pub fn connection_count_of(&self, user: &str) -> usize {
        let shard = self.shard(self.partition_of(user));
        shard.users.get(user).map_or(0, Vec::len)
    }

    /// Connections in the table now.
    pub fn connections_now(&self) -> usize {
        *self.connections.borrow()
    }

    /// Watches the number of connections in the table.
    pub fn connection_count(&self) -> watch::Receiver<usize> {
        self.connections.subscribe()
    }

    /// Marks a partition as not knowing this node (its next announcement is full).
    pub fn resync(&self, partition: u32) {
        if let Some(s) = self.shards.get(partition as usize) {
            let mut shard = s.lock().expect("user table lock");
            shard.full = true;
            shard.full_part = None;
            drop(shard);
            self.announce.notify_one();
        }
    }

    /// Marks every partition as not knowing this node.
    pub fn resync_all(&self) {
        for p in 0..self.partitions() {
            self.resync(p);
        }
    }

    /// Users on this node.
    pub fn user_count(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }
}

/// Runs the dispatcher over the node's subscription until `cancel` or the subscription ends.
pub async fn dispatch(mut sub: async_nats::Subscriber, table: Arc<UserTable>, cancel: CancellationToken) {
    let mut scratch = DispatchScratch::default();
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => m,
                None => {
                    tracing::error!("the edge's live subscription ended");
                    return;
                }
            },
        };
        dispatch_one(&table, &msg.payload, &mut scratch);
    }
}

/// Buffers the dispatcher reuses from one message to the next.
#[derive(Default)]
pub struct DispatchScratch {
    bodies: Vec<Bytes>,
    metas: Vec<DeliveryMeta>,
    /// Connections whose queue this message made non-empty: written to
    /// once the message is through (one frame each, after the table's lock).
    ready: Vec<Arc<ConnHandle>>,
}

/// Hands one message's deliveries to their connections, then writes to
/// each connection it woke whose socket is idle (see [`ConnHandle::write_now`]).
pub fn dispatch_one(table: &UserTable, payload: &Bytes, scratch: &mut DispatchScratch) {
    let DispatchScratch { bodies, metas, ready } = scratch;
    let (partition, mut items) = match decode_edge_message(payload) {
        Ok(EdgeMessage::Deliveries { partition, items }) => (partition, items),
        Ok(EdgeMessage::Sync { partition }) => {
            tracing::debug!(partition, "a delivery partition asked for this node's users");
            table.resync(partition);
            return;
        }
        Err(e) => {
            metrics::counter!("switchyard_edge_bad_batches_total").increment(1);
            tracing::warn!(error = %e, "undecodable live batch dropped");
            return;
        }
    };
    if partition >= table.partitions() {
        tracing::error!(
            partition,
            partitions = table.partitions(),
            "live batch from a partition this node does not have: SWITCHYARD_USER_PARTITIONS differs between routers and edges"
        );
        return;
    }
    bodies.clear();
    metas.clear();
    let shard = table.shard(partition);
    let mut n = 0u64;
    loop {
        let item = match items.next_item(bodies) {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => {
                metrics::counter!("switchyard_edge_bad_batches_total").increment(1);
                tracing::warn!(error = %e, "live batch cut short");
                break;
            }
        };
        while metas.len() < bodies.len() {
            metas.push(peek_meta(&bodies[metas.len()]).unwrap_or_default());
        }
        let mut delivery = |conn: &Arc<ConnHandle>| {
            let meta = metas[item.body as usize];
            let woke = conn.deliver(Delivery {
                body: bodies[item.body as usize].clone(),
                pos: item.pos,
                prio: meta.prio,
                conflation_key: meta.conflation_key,
                replayed: false,
                throttle_ms: meta.throttle_ms,
                throttle_released: false,
            });
            if woke {
                ready.push(conn.clone());
            }
        };
        match item.to {
            Recipient::User(user) => {
                if let Some(conns) = shard.users.get(user) {
                    for c in conns {
                        delivery(c);
                        n += 1;
                    }
                }
            }
            Recipient::Partition => {
                for conns in shard.users.values() {
                    for c in conns {
                        delivery(c);
                        n += 1;
                    }
                }
            }
        }
    }
    drop(shard);
    for conn in ready.drain(..) {
        conn.write_now();
    }
    metrics::counter!("switchyard_edge_deliveries_in_total").increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::ConnSettings;
    use crate::outbound::OutboundConfig;
    use crate::test_support::body;
    use switchyard_common::fanout::{encode_sync_request, EdgeBatchWriter};
    use switchyard_common::Encoding;

    /// A connection without a socket: what reaches it stays in its queue.
    fn conn(id: u64, user: &str) -> (Arc<ConnHandle>, Arc<ConnHandle>) {
        let settings = ConnSettings {
            outbound: OutboundConfig::default(),
            hold_cap: 16,
            direct_writes: false,
        };
        let c = ConnHandle::new(id, Encoding::MsgPack, settings, None);
        c.authenticated(user, u64::MAX, crate::conn::TokenId::default());
        assert!(!c.release(0), "nothing overflowed");
        (c.clone(), c)
    }

    fn queued(q: &ConnHandle) -> Vec<(Bytes, Option<u64>)> {
        let mut out = Vec::new();
        q.queue().drain_batch(&mut out);
        out.into_iter().map(|d| (d.body, d.pos)).collect()
    }

    #[test]
    fn items_reach_the_named_users_connections_and_broadcasts_the_whole_partition() {
        let table = UserTable::new(1);
        let (a1, qa1) = conn(1, "alice");
        let (a2, qa2) = conn(2, "alice");
        let (b, qb) = conn(3, "bob");
        for c in [&a1, &a2, &b] {
            table.add(c.clone(), oneshot::channel().0);
        }
        let mut w = EdgeBatchWriter::new(0);
        let one = w.body(&body(1));
        w.user("alice", one, Some(7));
        w.user("carol", one, Some(8));
        let two = w.body(&body(2));
        w.broadcast(two, None);
        let msg = w.take(0);
        dispatch_one(&table, &msg, &mut DispatchScratch::default());
        let want_alice = vec![(body(1), Some(7)), (body(2), None)];
        assert_eq!(queued(&qa1), want_alice);
        assert_eq!(queued(&qa2), want_alice, "every connection of the user");
        assert_eq!(queued(&qb), vec![(body(2), None)]);
        // Gone connections get nothing more.
        table.remove(&a1);
        let mut w = EdgeBatchWriter::new(0);
        let three = w.body(&body(3));
        w.user("alice", three, Some(9));
        dispatch_one(&table, &w.take(0), &mut DispatchScratch::default());
        assert!(queued(&qa1).is_empty());
        assert_eq!(queued(&qa2), vec![(body(3), Some(9))]);
    }

    #[test]
    fn presence_changes_are_kept_for_the_announcer_and_sync_requests_ask_for_the_full_set() {
        let table = UserTable::new(2);
        let p = table.partition_of("alice");
        table.shard(p).full = false;
        let (a1, _q1) = conn(1, "alice");
        let (a2, _q2) = conn(2, "alice");
        table.add(a1.clone(), oneshot::channel().0);
        table.add(a2.clone(), oneshot::channel().0);
        {
            let shard = table.shard(p);
            assert_eq!(shard.dirty.len(), 1, "the user came once");
            assert_eq!(shard.waiters.len(), 2, "each connection waits for an answer");
        }
        table.shard(p).dirty.clear();
        table.remove(&a1);
        assert!(table.shard(p).dirty.is_empty(), "the user is still here");
        table.remove(&a2);
        assert!(
            table.shard(p).dirty.contains("alice"),
            "the last connection gone: the user went"
        );
        assert!(!table.shard(p).full);
        dispatch_one(&table, &encode_sync_request(p), &mut DispatchScratch::default());
        assert!(table.shard(p).full, "a sync request asks for the whole set");
    }

    #[test]
    fn garbage_and_foreign_partitions_are_dropped_without_harm() {
        let table = UserTable::new(1);
        let (a, qa) = conn(1, "alice");
        table.add(a, oneshot::channel().0);
        dispatch_one(
            &table,
            &Bytes::from_static(b"nonsense"),
            &mut DispatchScratch::default(),
        );
        let mut w = EdgeBatchWriter::new(5);
        let one = w.body(&body(1));
        w.user("alice", one, None);
        dispatch_one(&table, &w.take(5), &mut DispatchScratch::default());
        assert!(queued(&qa).is_empty());
    }
}
