//! Partition ownership: which router processes which event partition (the
//! match stage) and which user partition (the delivery stage).
//!
//! Each partition has a lease, a key `p.<partition>` in the key-value bucket
//! `<BASE>_LEASES`, whose `max_age` is the lease TTL. A router takes a free
//! partition with a create (which fails while another router's lease is
//! alive), renews its leases with compare-and-set updates every TTL/5, and
//! stops a partition's worker as soon as a renewal fails or its last good
//! renewal is older than TTL/2, well before another router could take the
//! key (after a full TTL without renewal). A router that dies simply stops
//! renewing; its partitions are taken over about one TTL later.
//!
//! Routers announce themselves on `<prefix>.routers.heartbeat` every tick;
//! each counts the routers heard from recently and holds at most its fair
//! share (`ceil(partitions / routers)`), releasing the excess after
//! draining it, so partitions spread when routers join and gather when they
//! leave. Each router tries free partitions in an order of its own (a hash
//! of its id), so routers that start together do not all race for the same
//! keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use switchyard_common::subject::Subjects;
use switchyard_runtime::nats::Storage;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::Partition;
use crate::ingest::{Shared, Worker};

/// One unit of work a router leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// An event-stream partition: the match stage.
    Events(Partition),
    /// A user partition: the delivery stage.
    Users(u32),
}

impl Unit {
    /// A short name for the lease key and logs: `k3`, `t0`, `u5`.
    pub fn name(&self) -> String {
        match self {
            Unit::Events(p) => p.name(),
            Unit::Users(n) => format!("u{n}"),
        }
    }
}

/// Why leasing could not start.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease bucket could not be created or opened.
    #[error("cannot open the lease bucket")]
    Open(#[from] switchyard_runtime::nats::KvOpenError),
    /// The heartbeat subscription failed.
    #[error("cannot subscribe to router heartbeats: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// The lease bucket's configuration (TTL = `ttl`).
pub fn bucket_config(subjects: &Subjects, ttl: Duration, replicas: usize, storage: Storage) -> kv::Config {
    kv::Config {
        bucket: subjects.lease_bucket(),
        description: "Switchyard router partition leases".into(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas,
        // File by default so that leases, like everything else, survive a
        // NATS restart; a bucket that vanished anyway is created again.
        storage: storage.into(),
        ..Default::default()
    }
}

/// Opens the lease bucket, creating it when missing.
pub async fn open_bucket(js: &async_nats::jetstream::Context, config: &kv::Config) -> Result<kv::Store, LeaseError> {
    Ok(switchyard_runtime::nats::open_or_create_kv(js, config).await?)
}

struct Owned {
    revision: u64,
    renewed: Instant,
    cancel: CancellationToken,
    worker: JoinHandle<()>,
}

/// Holds this router's leases and runs a worker per leased partition.
pub struct Supervisor {
    id: String,
    kv: kv::Store,
    bucket: kv::Config,
    /// A lease operation failed this tick: make sure the bucket exists.
    trouble: bool,
    shared: Arc<Shared>,
    delivery: Arc<crate::delivery::Shared>,
    partitions: Vec<Unit>,
    ttl: Duration,
    owned: HashMap<Unit, Owned>,
    peers: HashMap<String, Instant>,
}

fn lease_key(p: Unit) -> String {
    format!("p.{}", p.name())
}

impl Supervisor {
    /// A supervisor for router `id` over `partitions`.
    pub fn new(
        id: String,
        kv: kv::Store,
        bucket: kv::Config,
        shared: Arc<Shared>,
        delivery: Arc<crate::delivery::Shared>,
        partitions: Vec<Unit>,
        ttl: Duration,
    ) -> Supervisor {
        // Each router walks the partitions from its own starting point.
        let start = id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % partitions.len().max(1);
        let mut partitions = partitions;
        partitions.rotate_left(start);
        Supervisor {
            id,
            kv,
            bucket,
            trouble: false,
            shared,
            delivery,
            partitions,
            ttl,
            owned: HashMap::new(),
            peers: HashMap::new(),
        }
    }

    /// Subscribes to heartbeats (before returning, so none is missed at start).
    pub async fn heartbeats(&self) -> Result<async_nats::Subscriber, LeaseError> {
        Ok(self
            .shared
            .client
            .subscribe(self.shared.subjects.router_heartbeat())
            .await?)
    }

    /// Runs until cancelled, then stops every worker and releases every lease.
    pub async fn run(
        mut self,
        mut heartbeats: async_nats::Subscriber,
        mut reconnects: tokio::sync::watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        let tick = self.ttl / 5;
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconnects.mark_unchanged();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = reconnects.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    // After a reconnect, rebuild every consumer from the
                    // oldest unacknowledged event rather than trust a pull
                    // that the server may have forgotten.
                    let owned: Vec<(Unit, u64)> =
                        self.owned.iter().map(|(p, o)| (*p, o.revision)).collect();
                    tracing::info!(partitions = owned.len(), "reconnected: restarting partition workers");
                    for (p, revision) in owned {
                        if let Some(o) = self.owned.remove(&p) {
                            o.cancel.cancel();
                            let _ = tokio::time::timeout(Duration::from_secs(2), o.worker).await;
                        }
                        self.start(p, revision);
                    }
                }
                hb = heartbeats.next() => {
                    if let Some(msg) = hb {
                        if let Ok(peer) = std::str::from_utf8(&msg.payload) {
                            if peer != self.id {
                                self.peers.insert(peer.to_string(), Instant::now());
                            }
                        }
                    }
                }
                _ = ticker.tick() => self.tick().await,
            }
        }
        // Stop every worker at once, then free the leases (bounded: with NATS
        // gone they simply expire).
        for owned in self.owned.values() {
            owned.cancel.cancel();
        }
        let owned: Vec<Unit> = self.owned.keys().copied().collect();
        let releasing = async {
            for p in owned {
                self.release(p).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(4), releasing).await.is_err() {
            tracing::warn!("partition leases not released at shutdown; they expire after one TTL");
        }
    }

    async fn tick(&mut self) {
        if let Err(e) = self
            .shared
            .client
            .publish(self.shared.subjects.router_heartbeat(), self.id.clone().into())
            .await
        {
            tracing::debug!(error = %e, "router heartbeat failed");
        }
        let now = Instant::now();
        self.peers.retain(|_, seen| now.duration_since(*seen) < self.ttl);
        if std::mem::take(&mut self.trouble) {
            // e.g. a NATS restart lost a memory-stored bucket: create it again.
            match open_bucket(&self.shared.js, &self.bucket).await {
                Ok(kv) => self.kv = kv,
                Err(e) => tracing::warn!(error = %e, "lease bucket unavailable"),
            }
        }
        self.renew().await;
        let routers = self.peers.len() + 1;
        let fair = self.partitions.len().div_ceil(routers);
        // Release the excess (drained first), then take free partitions up to the share.
        while self.owned.len() > fair {
            let Some(&p) = self.owned.keys().max_by_key(|p| p.name()) else {
                break;
            };
            tracing::info!(partition = %p.name(), routers, "releasing partition to rebalance");
            self.release(p).await;
        }
        if self.owned.len() < fair {
            for p in self.partitions.clone() {
                if self.owned.len() >= fair {
                    break;
                }
                if self.owned.contains_key(&p) {
                    continue;
                }
                match self.kv.create(lease_key(p), self.id.clone().into()).await {
                    Ok(revision) => self.start(p, revision),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => {
                        tracing::debug!(partition = %p.name(), error = %e, "lease create failed");
                        self.trouble = true;
                    }
                }
            }
        }
        metrics::gauge!("switchyard_router_partitions_owned").set(self.owned.len() as f64);
        metrics::gauge!("switchyard_router_peers").set(routers as f64);
    }

    fn start(&mut self, p: Unit, revision: u64) {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let handle = match p {
            Unit::Events(partition) => {
                let worker = Worker::new(self.shared.clone(), partition);
                tokio::spawn(async move {
                    if let Err(e) = worker.run(stop).await {
                        metrics::counter!("switchyard_router_worker_errors_total").increment(1);
                        tracing::warn!(partition = %p.name(), error = %e, "partition worker stopped; it restarts from the oldest unacknowledged event");
                    }
                })
            }
            Unit::Users(partition) => {
                let worker = crate::delivery::Worker::new(self.delivery.clone(), partition);
                tokio::spawn(async move {
                    if let Err(e) = worker.run(stop).await {
                        metrics::counter!("switchyard_router_worker_errors_total").increment(1);
                        tracing::warn!(partition = %p.name(), error = %e, "delivery worker stopped; it restarts from the oldest unacknowledged hand-off");
                    }
                })
            }
        };
        tracing::info!(partition = %p.name(), "partition leased");
        self.owned.insert(
            p,
            Owned {
                revision,
                renewed: Instant::now(),
                cancel,
                worker: handle,
            },
        );
    }

    /// Renews every lease; stops the workers whose lease is no longer safe,
    /// and restarts workers that stopped on an error while the lease holds.
    async fn renew(&mut self) {
        let now = Instant::now();
        let mut lost = Vec::new();
        let mut restart = Vec::new();
        for (&p, owned) in self.owned.iter_mut() {
            match self
                .kv
                .update(lease_key(p), self.id.clone().into(), owned.revision)
                .await
            {
                Ok(rev) => {
                    owned.revision = rev;
                    owned.renewed = now;
                }
                Err(e) => {
                    tracing::warn!(partition = %p.name(), error = %e, "lease renewal failed");
                    self.trouble = true;
                }
            }
            if now.duration_since(owned.renewed) > self.ttl / 2 {
                lost.push(p);
            } else if owned.worker.is_finished() {
                restart.push(p);
            }
        }
        for p in lost {
            if let Some(owned) = self.owned.remove(&p) {
                metrics::counter!("switchyard_router_leases_lost_total").increment(1);
                tracing::warn!(partition = %p.name(), "lease lost; worker stopped");
                owned.cancel.cancel();
            }
        }
        for p in restart {
            if let Some(owned) = self.owned.remove(&p) {
                self.start(p, owned.revision);
            }
        }
    }

    /// Stops the worker (letting it settle what is in flight) and frees the lease.
    async fn release(&mut self, p: Unit) {
        let Some(owned) = self.owned.remove(&p) else {
            return;
        };
        owned.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), owned.worker).await;
        if let Err(e) = self.kv.delete_expect_revision(lease_key(p), Some(owned.revision)).await {
            tracing::debug!(partition = %p.name(), error = %e, "lease not released (it will expire)");
        }
    }
}
