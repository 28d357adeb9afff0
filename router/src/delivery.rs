//! The delivery stage: one worker per user partition, the only writer of
//! its users' log entries and live copies.
//!
//! A [`Worker`] runs while its router holds the partition's lease. It takes
//! the match stage's hand-offs for the partition (durable ones from the
//! hand-off stream, in order; live-only ones from `<prefix>.tlive.<p>`),
//! stores each durable delivery on `<prefix>.deliver.<p>.<user>` (or the
//! partition's broadcast subject) with message id `<event>:<user>`, learns
//! its `pos` from the store acknowledgement, and sends the live copies to
//! the edges holding the users ([`crate::presence`]): one message per edge
//! per wave of work, each body once, users and positions inside, in `pos`
//! order. A hand-off is acknowledged only after its live copies are sent,
//! so a worker that dies redoes it: the log stores nothing twice (message
//! ids; a duplicate's acknowledgement carries the first copy's `pos`) and
//! edges skip positions a connection already has.
//!
//! Edges announce their users on `<prefix>.reg.<p>` (request/reply); the
//! reply's `pos` is a valid `ready.pos` (everything of the partition's
//! users up to it is stored, everything after reaches the edge live). A
//! worker that starts asks every live edge to announce its full set and
//! waits for them (bounded) before it delivers anything.
//!
//! It must not hold a lock across `.await`; it holds none at all: the
//! partition's state is this task's own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use switchyard_common::fanout::{encode_sync_request, HandoffReader, PresenceReply, PresenceUpdate};
use switchyard_common::subject::Subjects;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::batches::{EdgeBatches, Routed};
use crate::edges::EdgeSet;
use crate::presence::{EdgeSlot, Presence};

/// Hand-offs fetched ahead of their acknowledgement.
const MAX_HANDOFFS_IN_FLIGHT: usize = 512;
/// Log stores awaiting acknowledgement, per worker.
const MAX_STORES_IN_FLIGHT: usize = 10_000;
/// One hand-off's stores are awaited inline past this many.
const STORES_PER_HANDOFF_INLINE: usize = 4096;
/// An edge's batch is closed before it grows past this size (NATS' default
/// max payload is 1 MiB; a single larger body still goes alone).
const EDGE_FLUSH_BYTES: usize = 512 * 1024;
/// Messages taken from a subscription in one wave.
const WAVE: usize = 256;
/// How long a stopping worker waits for outstanding stores.
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// An edge that does not announce itself after a sync request is asked again after this long.
const SYNC_RETRY: Duration = Duration::from_secs(1);
/// How often presence changes become presence events (and the partition's
/// user count is published for `stats`): users who leave and come back
/// within one interval produce no event.
const PRESENCE_EVENTS_EVERY: Duration = Duration::from_secs(1);

/// Why a worker stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The hand-off consumer could not be set up.
    #[error(transparent)]
    Consumer(#[from] crate::workqueue::ConsumerError),
    /// The hand-off consumer failed (missed heartbeats, a NATS restart).
    #[error("hand-off consumer failed")]
    Messages(#[from] async_nats::jetstream::consumer::pull::MessagesError),
    /// The log stream (or the first one, for the epoch) could not be read.
    #[error("cannot read the delivery log stream")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// A subscription or consumer this worker reads ended.
    #[error("the {0} ended")]
    Ended(&'static str),
    /// A delivery could not be stored in the log.
    #[error("delivery log publish failed")]
    Publish(#[from] async_nats::jetstream::context::PublishError),
    /// A subscription failed.
    #[error("cannot subscribe")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// What every delivery worker of one router shares.
pub struct Shared {
    /// Core NATS: presence requests, live hand-offs, edge batches.
    pub client: async_nats::Client,
    /// JetStream: the hand-off consumer and the log stores.
    pub js: async_nats::jetstream::Context,
    /// Subject names.
    pub subjects: Subjects,
    /// User partitions.
    pub user_partitions: u32,
    /// Log streams the partitions are spread over.
    pub log_groups: u32,
    /// The log's settings (for the epoch).
    pub log: crate::log::LogSettings,
    /// The live edges.
    pub edges: watch::Receiver<EdgeSet>,
    /// How long a starting worker waits for the edges to announce their users.
    pub sync_wait: Duration,
    /// Before this, the router has not heard every live edge's heartbeat
    /// yet (it started less than a heartbeat interval ago): workers wait for
    /// it before they ask edges for their users.
    pub edges_known_at: tokio::time::Instant,
    /// Fault injection (tests, cargo feature `fault-injection`): abort after
    /// so many stored durable deliveries. Always `None` without the feature.
    pub crash: Option<crate::fault::CrashAfter>,
    /// User partitions whose worker stopped on a failed store: the redo can
    /// give an event a later `pos` than one already sent live, which edges
    /// would drop as already seen. The next worker treats every edge as
    /// late, so the partition's live clients resume from the log.
    pub failed_stores: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Users with a connection in each user partition this router delivers
    /// for (the application API's `stats`).
    pub present_users: std::sync::Mutex<std::collections::HashMap<u32, u64>>,
}

/// One delivery whose live copy goes out once it is stored.
struct Item {
    /// The user id (a slice of the hand-off), or `None` for the partition's broadcast.
    to: Option<Bytes>,
    /// Which event and which of its bodies, for sharing bodies in edge batches.
    event: u64,
    body_no: u16,
    body: Bytes,
    pos: u64,
}

/// A hand-off whose stores are on their way.
struct InFlight {
    msg: async_nats::jetstream::Message,
    items: Vec<Item>,
    pending: Vec<(usize, PublishAckFuture)>,
    /// Stores this hand-off added to the in-flight count.
    stores: usize,
}

async fn stored(mut f: InFlight) -> (InFlight, Result<(), async_nats::jetstream::context::PublishError>) {
    for (i, ack) in std::mem::take(&mut f.pending) {
        match ack.await {
            Ok(a) => f.items[i].pos = a.sequence,
            Err(e) => return (f, Err(e)),
        }
    }
    (f, Ok(()))
}

/// Processes one user partition.
pub struct Worker {
    shared: Arc<Shared>,
    partition: u32,
    presence: Presence,
    /// A valid `ready.pos`: the last stored position of this worker, or the
    /// log's last sequence when it started.
    pos: u64,
    /// This worker has sent live copies of stored deliveries (including
    /// redone ones, whose `pos` is older than this worker): an edge that
    /// announces itself from now on may have missed some.
    delivered: bool,
    epoch: String,
    stream: String,
    /// The live batches being built, one per edge.
    batches: EdgeBatches,
    /// Numbers events, so batches share bodies within one event only.
    event_no: u64,
    asked: std::collections::HashMap<String, Instant>,
    msg_id: String,
}

/// A presence event (`<prefix>.presence.online` / `.offline`).
#[derive(serde::Serialize)]
struct PresenceEvent<'a> {
    user: &'a str,
    ts: u64,
}

/// This router's entry in [`Shared::present_users`] while a worker
/// delivers for the partition; removed when it stops.
struct PresentUsers<'a> {
    shared: &'a Shared,
    partition: u32,
}

impl<'a> PresentUsers<'a> {
    fn new(shared: &'a Shared, partition: u32, users: usize) -> PresentUsers<'a> {
        shared
            .present_users
            .lock()
            .expect("present users lock")
            .insert(partition, users as u64);
        PresentUsers { shared, partition }
    }
}

impl Drop for PresentUsers<'_> {
    fn drop(&mut self) {
        self.shared
            .present_users
            .lock()
            .expect("present users lock")
            .remove(&self.partition);
    }
}

/// The hand-off consumer name of a user partition.
pub fn consumer_name(partition: u32) -> String {
    format!("deliver-u{partition}")
}

impl Worker {
    /// A worker for user partition `partition`.
    pub fn new(shared: Arc<Shared>, partition: u32) -> Worker {
        Worker {
            stream: shared.subjects.log_stream(partition % shared.log_groups.max(1)),
            shared,
            partition,
            presence: Presence::new(),
            pos: 0,
            delivered: false,
            epoch: String::new(),
            batches: EdgeBatches::new(partition, EDGE_FLUSH_BYTES),
            event_no: 0,
            asked: Default::default(),
            msg_id: String::new(),
        }
    }

    async fn consumer(&self) -> Result<pull::Stream, DeliveryError> {
        let subjects = &self.shared.subjects;
        let slice = crate::workqueue::Slice {
            stream: subjects.targets_stream(),
            consumer: consumer_name(self.partition),
            filter: subjects.targets(self.partition),
            max_ack_pending: MAX_HANDOFFS_IN_FLIGHT,
            batch: WAVE,
        };
        Ok(crate::workqueue::take_over(&self.shared.js, &slice).await?)
    }

    /// Delivers for the partition until `cancel` (then settles what is in
    /// flight, bounded) or an error.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), DeliveryError> {
        let client = self.shared.client.clone();
        let subjects = self.shared.subjects.clone();
        let mut registrations = client.subscribe(subjects.presence_register(self.partition)).await?;
        let mut live = client.subscribe(subjects.targets_live(self.partition)).await?;
        let info = self.shared.js.get_stream(&self.stream).await?.cached_info().clone();
        self.epoch = crate::log::epoch(&self.shared.js, &subjects, &self.shared.log).await?;
        self.pos = info.state.last_sequence;
        // After a failed store, everything sent live before is suspect: every
        // edge that announces itself is told it is late.
        self.delivered = self
            .shared
            .failed_stores
            .lock()
            .expect("failed stores lock")
            .remove(&self.partition);
        // Rebuild presence before delivering anything: every live edge
        // announces its users of this partition. A router that has just
        // started first hears every edge's heartbeat (answering
        // registrations meanwhile).
        while tokio::time::Instant::now() < self.shared.edges_known_at {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(self.shared.edges_known_at) => {}
                m = registrations.next() => match m {
                    Some(m) => self.register(m).await,
                    None => return Err(DeliveryError::Ended("presence subscription")),
                },
            }
        }
        let mut edges = self.shared.edges.clone();
        let known = edges.borrow_and_update().clone();
        let asked = std::time::Instant::now();
        self.ask_to_sync(&known).await;
        let deadline = tokio::time::Instant::now() + self.shared.sync_wait;
        while !known.iter().all(|id| self.presence.knows(id)) {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(partition = self.partition, "not every edge announced its users in time; late ones will resync their clients");
                    break;
                }
                m = registrations.next() => match m {
                    Some(m) => self.register(m).await,
                    None => return Err(DeliveryError::Ended("presence subscription")),
                },
            }
        }
        let rebuilt = asked.elapsed();
        metrics::histogram!("switchyard_router_presence_rebuild_seconds").record(rebuilt.as_secs_f64());
        let mut messages = self.consumer().await?;
        tracing::info!(
            partition = self.partition,
            edges = known.len(),
            users = self.presence.user_count(),
            presence_rebuilt_ms = rebuilt.as_millis() as u64,
            pos = self.pos,
            "delivering for user partition"
        );
        // From here on, users who come and go are announced.
        self.presence.track_changes();
        let shared = self.shared.clone();
        let _counted = PresentUsers::new(&shared, self.partition, self.presence.user_count());
        let mut presence_events = tokio::time::interval(PRESENCE_EVENTS_EVERY);
        presence_events.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: FuturesOrdered<_> = FuturesOrdered::new();
        let mut stores = 0usize;
        // A sync request can be lost; edges this partition does not know yet are asked again.
        let mut resync = tokio::time::interval(SYNC_RETRY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let room = pending.len() < MAX_HANDOFFS_IN_FLIGHT && stores < MAX_STORES_IN_FLIGHT;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                Some(done) = pending.next(), if !pending.is_empty() => {
                    let mut wave = vec![done];
                    while wave.len() < WAVE {
                        match pending.next().now_or_never() {
                            Some(Some(d)) => wave.push(d),
                            _ => break,
                        }
                    }
                    if let Err(e) = self.complete(wave, &mut stores).await {
                        break Err(e);
                    }
                }
                m = registrations.next() => match m {
                    Some(m) => self.register(m).await,
                    None => break Err(DeliveryError::Ended("presence subscription")),
                },
                _ = resync.tick() => {
                    let now = edges.borrow().clone();
                    self.ask_to_sync(&now).await;
                }
                _ = presence_events.tick() => self.announce_presence().await,
                changed = edges.changed() => {
                    if changed.is_ok() {
                        let now = edges.borrow_and_update().clone();
                        self.edges_changed(&now).await;
                    }
                }
                m = live.next() => match m {
                    Some(m) => {
                        self.live(&m.payload);
                        for _ in 1..WAVE {
                            match live.next().now_or_never() {
                                Some(Some(m)) => self.live(&m.payload),
                                _ => break,
                            }
                        }
                        self.flush().await;
                    }
                    None => break Err(DeliveryError::Ended("live hand-off subscription")),
                },
                m = messages.next(), if room => match m {
                    Some(Ok(m)) => match self.store(m).await {
                        Ok(Some(f)) => {
                            stores += f.stores;
                            pending.push_back(stored(f));
                        }
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    },
                    Some(Err(e)) => break Err(DeliveryError::Messages(e)),
                    None => break Err(DeliveryError::Ended("hand-off consumer")),
                },
            }
        };
        if matches!(result, Err(DeliveryError::Publish(_))) {
            self.shared
                .failed_stores
                .lock()
                .expect("failed stores lock")
                .insert(self.partition);
        }
        if result.is_ok() {
            let settle = async {
                while let Some(done) = pending.next().await {
                    if self.complete(vec![done], &mut stores).await.is_err() {
                        return;
                    }
                }
            };
            if tokio::time::timeout(DRAIN_WAIT, settle).await.is_err() {
                tracing::warn!(
                    partition = self.partition,
                    "in-flight hand-offs not settled before stopping"
                );
            }
        }
        result
    }

    /// Publishes a presence event for each user whose first connection on
    /// the fleet opened or last one closed since the last call, and the
    /// partition's user count.
    async fn announce_presence(&mut self) {
        let changes = self.presence.take_changes();
        if let Some(n) = self
            .shared
            .present_users
            .lock()
            .expect("present users lock")
            .get_mut(&self.partition)
        {
            *n = self.presence.user_count() as u64;
        }
        if changes.is_empty() {
            return;
        }
        let ts = switchyard_runtime::clock::now_ms();
        for (user, online) in changes {
            let event = PresenceEvent { user: &user, ts };
            let payload = rmp_serde::to_vec_named(&event).expect("a plain struct encodes");
            let subject = self.shared.subjects.presence_event(online);
            if let Err(e) = self.shared.client.publish(subject, payload.into()).await {
                tracing::warn!(error = %e, "presence event not published");
            }
            metrics::counter!("switchyard_router_presence_events_total", "kind" => if online { "online" } else { "offline" })
                .increment(1);
        }
    }

    /// Asks the edges in `ids` that this partition does not know to announce their users.
    async fn ask_to_sync(&mut self, ids: &EdgeSet) {
        let now = Instant::now();
        for id in ids.iter() {
            if self.presence.knows(id)
                || self
                    .asked
                    .get(id)
                    .is_some_and(|at| now.duration_since(*at) < SYNC_RETRY)
            {
                continue;
            }
            self.asked.insert(id.clone(), now);
            if let Err(e) = self
                .shared
                .client
                .publish(self.shared.subjects.edge(id), encode_sync_request(self.partition))
                .await
            {
                tracing::warn!(edge = %id, error = %e, "sync request failed");
            }
        }
        self.asked.retain(|id, _| ids.contains(id));
    }

    /// Forgets edges that stopped; asks new ones for their users.
    async fn edges_changed(&mut self, alive: &EdgeSet) {
        let gone: Vec<String> = self
            .presence
            .edge_ids()
            .filter(|id| !alive.contains(*id))
            .map(str::to_string)
            .collect();
        for id in gone {
            tracing::info!(partition = self.partition, edge = %id, "edge gone: its users' presence cleared");
            self.presence.forget(&id);
        }
        self.ask_to_sync(alive).await;
        metrics::gauge!("switchyard_router_present_users", "partition" => self.partition.to_string())
            .set(self.presence.user_count() as f64);
    }

    /// Answers an edge's presence update.
    async fn register(&mut self, msg: async_nats::Message) {
        let Some(reply_to) = msg.reply.clone() else {
            return;
        };
        let update: PresenceUpdate = match rmp_serde::from_slice(&msg.payload) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "malformed presence update ignored");
                return;
            }
        };
        let subjects = &self.shared.subjects;
        let applied = self.presence.apply(&update, |id| subjects.edge(id), self.delivered);
        if applied.late {
            metrics::counter!("switchyard_router_presence_late_total").increment(1);
        }
        let reply = PresenceReply {
            pos: self.pos,
            epoch: self.epoch.clone(),
            stream: self.stream.clone(),
            partitions: self.shared.user_partitions,
            resync: applied.resync,
            late: applied.late,
        };
        let payload = rmp_serde::to_vec_named(&reply).expect("a plain struct encodes");
        if let Err(e) = self.shared.client.publish(reply_to, payload.into()).await {
            tracing::warn!(error = %e, "presence reply failed");
        }
    }

    /// Adds one delivery to the batch of every edge that should get it.
    fn route(&mut self, to: Option<&str>, event: u64, body_no: u16, body: &Bytes, pos: Option<u64>) {
        self.batches.route(
            &self.presence,
            Routed {
                to,
                event,
                body_no,
                body,
                pos,
            },
        );
    }

    /// Sends every edge batch that has something in it, per edge in order.
    /// An edge a batch could not be sent to is forgotten: when it
    /// announces itself again it is told it is late, and its clients resume.
    async fn flush(&mut self) {
        let (batches, routed) = self.batches.take_all();
        metrics::counter!("switchyard_router_deliveries_total").increment(routed);
        let mut failed = Vec::new();
        for (slot, batch) in batches {
            if !self.send(slot as usize, batch).await && !failed.contains(&slot) {
                failed.push(slot);
            }
        }
        for slot in failed {
            if let Some(id) = self.presence.edge_id(slot).map(str::to_string) {
                tracing::warn!(partition = self.partition, edge = %id, "a live batch could not be sent: the edge is forgotten until it announces itself again");
                self.presence.forget(&id);
            }
        }
    }

    /// Publishes one batch to the edge in `slot`; false when it could not be sent.
    async fn send(&self, slot: usize, batch: Bytes) -> bool {
        let Some(subject) = self.presence.subject(slot as EdgeSlot) else {
            return true;
        };
        match self.shared.client.publish(subject.to_string(), batch).await {
            Ok(()) => true,
            Err(e) => {
                metrics::counter!("switchyard_router_publish_errors_total").increment(1);
                tracing::error!(error = %e, "publishing an edge batch failed");
                false
            }
        }
    }

    /// Routes a live-only hand-off's deliveries.
    fn live(&mut self, payload: &Bytes) {
        let mut reader = match HandoffReader::new(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "malformed live hand-off ignored");
                return;
            }
        };
        let (mut bodies, mut targets) = (Vec::new(), Vec::new());
        loop {
            match reader.next_event(&mut bodies, &mut targets) {
                Ok(Some(event)) => {
                    self.event_no += 1;
                    let n = self.event_no;
                    if event.broadcast {
                        if let Some(body) = bodies.first() {
                            self.route(None, n, 0, body, None);
                        }
                    }
                    for (user, b) in &targets {
                        self.route(Some(user), n, *b, &bodies[*b as usize], None);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed live hand-off cut short");
                    break;
                }
            }
        }
    }

    /// Stores a durable hand-off's deliveries; the returned in-flight entry
    /// completes when they are all stored.
    async fn store(&mut self, msg: async_nats::jetstream::Message) -> Result<Option<InFlight>, DeliveryError> {
        let payload = msg.payload.clone();
        let mut reader = match HandoffReader::new(&payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "malformed hand-off dropped");
                let _ = msg.ack().await;
                return Ok(None);
            }
        };
        let mut f = InFlight {
            msg,
            items: Vec::new(),
            pending: Vec::new(),
            stores: 0,
        };
        let (mut bodies, mut targets) = (Vec::new(), Vec::new());
        loop {
            let event = match reader.next_event(&mut bodies, &mut targets) {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed hand-off cut short");
                    break;
                }
            };
            self.event_no += 1;
            if event.broadcast {
                let Some(body) = bodies.first() else { continue };
                use std::fmt::Write;
                self.msg_id.clear();
                let _ = write!(self.msg_id, "{}:_all.{}", event.event_ref, self.partition);
                let subject = self.shared.subjects.deliver_all(self.partition);
                self.store_one(&mut f, subject, None, 0, body.clone()).await?;
            }
            for (user, b) in &targets {
                if !switchyard_common::ids::is_valid_user_id(user) {
                    continue;
                }
                use std::fmt::Write;
                self.msg_id.clear();
                let _ = write!(self.msg_id, "{}:{user}", event.event_ref);
                let subject = self.shared.subjects.deliver(self.partition, user);
                let to = payload.slice_ref(user.as_bytes());
                self.store_one(&mut f, subject, Some(to), *b, bodies[*b as usize].clone())
                    .await?;
            }
        }
        f.stores = f.items.len();
        Ok(Some(f))
    }

    async fn store_one(
        &mut self,
        f: &mut InFlight,
        subject: String,
        to: Option<Bytes>,
        body_no: u16,
        body: Bytes,
    ) -> Result<(), DeliveryError> {
        let publish = PublishMessage::build()
            .payload(body.clone())
            .message_id(self.msg_id.as_str());
        match self.shared.js.send_publish(subject, publish).await {
            Ok(ack) => {
                f.items.push(Item {
                    to,
                    event: self.event_no,
                    body_no,
                    body,
                    pos: 0,
                });
                f.pending.push((f.items.len() - 1, ack));
                if f.pending.len() >= STORES_PER_HANDOFF_INLINE {
                    // A very wide event: settle its stores now so that what
                    // is outstanding stays bounded.
                    for (i, ack) in std::mem::take(&mut f.pending) {
                        let a = ack.await?;
                        f.items[i].pos = a.sequence;
                    }
                }
                Ok(())
            }
            Err(e) => {
                metrics::counter!("switchyard_router_publish_errors_total").increment(1);
                if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                    tracing::error!(error = %e, "delivery larger than the server's max payload dropped");
                    return Ok(());
                }
                Err(DeliveryError::Publish(e))
            }
        }
    }

    /// Sends the live copies of stored hand-offs, in order, then acknowledges them.
    async fn complete(
        &mut self,
        wave: Vec<(InFlight, Result<(), async_nats::jetstream::context::PublishError>)>,
        stores: &mut usize,
    ) -> Result<(), DeliveryError> {
        let mut done = Vec::with_capacity(wave.len());
        let mut failed = None;
        for (f, result) in wave {
            *stores = stores.saturating_sub(f.stores);
            if let Err(e) = result {
                failed = Some(e);
                break;
            }
            for item in &f.items {
                self.delivered = true;
                self.pos = self.pos.max(item.pos);
                let to = item.to.as_ref().and_then(|u| std::str::from_utf8(u).ok());
                self.route(to, item.event, item.body_no, &item.body, Some(item.pos));
            }
            done.push(f);
        }
        let n: usize = done.iter().map(|f| f.items.len()).sum();
        if let Some(crash) = &self.shared.crash {
            crash.stored(n as u64);
        }
        self.flush().await;
        for f in done {
            if let Err(e) = f.msg.ack().await {
                // Offered again after the ack wait; the log's message ids keep the redo from storing twice.
                tracing::warn!(error = %e, "acknowledging a hand-off failed");
            }
        }
        match failed {
            Some(e) => Err(DeliveryError::Publish(e)),
            None => Ok(()),
        }
    }
}
