//! The match stage: producer events in, their targets handed off to the
//! delivery stage, one message per user partition.
//!
//! A [`Worker`] processes one partition of an event stream (see
//! [`crate::events`]) while its router holds that partition's lease (see
//! [`crate::lease`]). It decodes, deduplicates by producer `id`, matches
//! (index, rooms, direct targets), encodes each user's body (subscription
//! names, `fields`) and groups the (user, body) pairs by user partition
//! ([`crate::handoff`]); a malformed event is counted and acknowledged
//! (dropped), never fatal.
//!
//! # Order, acknowledgement and failover
//! Durable events go to the hand-off stream (JetStream, one message per
//! event and user partition, message id `<event>:<partition>`), whose
//! acknowledgements are awaited in a pipeline (a [`FuturesOrdered`] of
//! events, bounded); an event is acknowledged only when all its hand-offs
//! are stored, in event order. Every event before the first unacknowledged
//! one is thus handed off, and the event stream (work-queue retention)
//! holds only what is still owed. A worker that starts (after a failover,
//! or a restart after an error) recreates the partition's consumer from the
//! oldest message left, so nothing is skipped and the order is kept; the
//! hand-off stream stores a redone hand-off once (same message id), and the
//! delivery stage's own message ids (`<event>:<user>`) keep a redo that gets
//! through from being logged twice. `<event>` is the producer's `id`, or
//! the event's stream sequence.
//!
//! Live-only events (ticks) go to the delivery stage over core NATS, every
//! event of a fetched batch in one message per user partition: they carry
//! no `pos` and no promise (a redo after a router died can repeat them).
//!
//! It must not hold a state lock while publishing or awaiting.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use switchyard_common::event::{is_json_content_type, parse_event, ProducerEvent, Target};
use switchyard_common::hash::fnv1a;
use switchyard_common::subject::Subjects;
use switchyard_runtime::now_ms;
use tokio_util::sync::CancellationToken;

use crate::events::Partition;
use crate::handoff::Fanout;
use crate::state::RouterState;
use crate::store::Store;
use crate::targeting::Targeter;

/// Producer ids seen within the dedup window.
pub type DedupCache = moka::sync::Cache<String, ()>;

/// Builds the dedup cache for a window.
pub fn dedup_cache(window: Duration) -> DedupCache {
    moka::sync::Cache::builder()
        .max_capacity(1_000_000)
        .time_to_live(window)
        .build()
}

/// Most events fetched ahead of the stream's acknowledgement.
const MAX_EVENTS_IN_FLIGHT: usize = 1024;
/// Most durable deliveries awaiting the log's acknowledgement, per worker.
const MAX_ACKS_IN_FLIGHT: usize = 10_000;
/// Most messages taken from the consumer before one consistency check.
const BATCH: usize = 256;
/// Live-only hand-offs are sent once one partition's message reaches this size.
const LIVE_FLUSH_BYTES: usize = 256 * 1024;
/// Publish acknowledgements the JetStream context may have in flight; above
/// what a worker ever holds (`MAX_ACKS_IN_FLIGHT` plus one event's
/// hand-offs per worker), so a publish never waits for a permit that only a later
/// poll of the same worker could free.
pub const JS_MAX_ACK_INFLIGHT: usize = 1 << 20;
/// How long a stopping worker waits for outstanding acknowledgements.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// Why a worker stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The partition's consumer could not be set up.
    #[error(transparent)]
    Consumer(#[from] crate::workqueue::ConsumerError),
    /// The partition's consumer failed (missed heartbeats, a NATS restart).
    #[error("event consumer failed")]
    Messages(#[from] pull::MessagesError),
    /// The partition's consumer ended.
    #[error("the event consumer ended")]
    Ended,
    /// A hand-off could not be stored.
    #[error("hand-off publish failed")]
    Publish(#[from] PublishError),
}

/// What every worker of one router shares.
pub struct Shared {
    /// Core NATS, for live deliveries.
    pub client: async_nats::Client,
    /// JetStream, for durable deliveries and the event consumers.
    pub js: async_nats::jetstream::Context,
    /// Subject names.
    pub subjects: Subjects,
    /// The index and rooms.
    pub state: Arc<RouterState>,
    /// The subscription bucket (for the consistency check).
    pub store: Store,
    /// Producer ids seen recently.
    pub dedup: DedupCache,
    /// User partitions of the delivery stage.
    pub user_partitions: u32,
    /// The latest keyed event per key, for snapshots.
    pub latest: Arc<crate::latest::Latest>,
}

/// An event whose durable deliveries are on their way to the log.
struct InFlight {
    msg: async_nats::jetstream::Message,
    acks: Vec<PublishAckFuture>,
    /// How many durable deliveries it awaited (for the in-flight bound).
    durable: usize,
}

/// Processes one partition.
pub struct Worker {
    shared: Arc<Shared>,
    partition: Partition,
    /// Turns an event into its targets (reused buffers).
    targeter: Targeter,
    msg_id: String,
    event_ref: String,
    /// Durable events' hand-offs (sent per event).
    durable_out: Fanout,
    /// Live-only events' hand-offs (sent per fetched batch).
    live_out: Fanout,
    /// Reused for latest-event entries.
    latest_buf: Vec<u8>,
}

/// Waits for an event's durable deliveries to be stored.
async fn stored(mut f: InFlight) -> (InFlight, Result<(), PublishError>) {
    for ack in std::mem::take(&mut f.acks) {
        if let Err(e) = ack.await {
            return (f, Err(e));
        }
    }
    (f, Ok(()))
}

/// Events whose durable deliveries are on their way, in stream order.
struct Pipeline<F: Future> {
    pending: FuturesOrdered<F>,
    /// The producer ids of the events in `pending`, in the same order.
    ids: std::collections::VecDeque<Option<String>>,
    /// Durable deliveries in `pending` not yet known stored.
    outstanding: usize,
    make: fn(InFlight) -> F,
}

impl<F: Future<Output = (InFlight, Result<(), PublishError>)>> Pipeline<F> {
    fn new(make: fn(InFlight) -> F) -> Pipeline<F> {
        Pipeline {
            pending: FuturesOrdered::new(),
            ids: std::collections::VecDeque::new(),
            outstanding: 0,
            make,
        }
    }

    /// Adds an event and its producer id (forgotten again if it has to be redone).
    fn push(&mut self, f: InFlight, id: Option<String>) {
        self.ids.push_back(id);
        self.outstanding += f.durable;
        self.pending.push_back((self.make)(f));
    }
}

/// Longest a batch waits for its latest-event writes before it is matched
/// anyway (see [`Worker::process`]).
const LATEST_WAIT: Duration = Duration::from_millis(500);

/// An event's stream sequence and publish time (unix ms).
fn published(msg: &async_nats::jetstream::Message) -> (u64, u64) {
    match msg.info() {
        Ok(info) => (
            info.stream_sequence,
            (info.published.unix_timestamp_nanos() / 1_000_000) as u64,
        ),
        Err(_) => (0, now_ms()),
    }
}

/// The consumer name of a partition (one per partition, shared by routers over time).
pub fn consumer_name(partition: Partition) -> String {
    format!("router-{}", partition.name())
}

impl Worker {
    /// A worker for `partition`.
    pub fn new(shared: Arc<Shared>, partition: Partition) -> Worker {
        Worker {
            partition,
            targeter: Targeter::default(),
            msg_id: String::new(),
            event_ref: String::new(),
            durable_out: Fanout::new(shared.user_partitions),
            live_out: Fanout::new(shared.user_partitions),
            latest_buf: Vec::new(),
            shared,
        }
    }

    /// (Re)creates the partition's consumer starting from the oldest message left.
    async fn consumer(&self) -> Result<pull::Stream, IngestError> {
        let subjects = &self.shared.subjects;
        let slice = crate::workqueue::Slice {
            stream: subjects.events_stream(self.partition.shape),
            consumer: consumer_name(self.partition),
            filter: subjects.events_partition_filter(self.partition.shape, self.partition.number),
            max_ack_pending: MAX_EVENTS_IN_FLIGHT,
            batch: BATCH,
        };
        Ok(crate::workqueue::take_over(&self.shared.js, &slice).await?)
    }

    /// Processes the partition until `cancel` (then drains what is in
    /// flight, bounded) or an error (then forgets the ids of unacknowledged
    /// events, so that their redo is not mistaken for a duplicate).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), IngestError> {
        let mut messages = self.consumer().await?;
        tracing::info!(partition = %self.partition.name(), "processing partition");
        let mut pipeline = Pipeline::new(stored);
        let mut batch: Vec<async_nats::jetstream::Message> = Vec::with_capacity(BATCH);
        let result = loop {
            let room = pipeline.pending.len() < MAX_EVENTS_IN_FLIGHT && pipeline.outstanding < MAX_ACKS_IN_FLIGHT;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                Some((done, stored_result)) = pipeline.pending.next(), if !pipeline.pending.is_empty() => {
                    if let Err(e) = self.complete(&mut pipeline, done, stored_result).await {
                        break Err(e);
                    }
                }
                m = messages.next(), if room => {
                    let first = match m {
                        Some(Ok(m)) => m,
                        // Missed heartbeats (a NATS restart, a lost pull):
                        // start over from the oldest unacknowledged event.
                        Some(Err(e)) => break Err(IngestError::Messages(e)),
                        None => break Err(IngestError::Ended),
                    };
                    batch.clear();
                    batch.push(first);
                    while batch.len() < BATCH {
                        match messages.next().now_or_never() {
                            Some(Some(Ok(m))) => batch.push(m),
                            _ => break,
                        }
                    }
                    if let Err(e) = self.process(&mut batch, &mut pipeline).await {
                        break Err(e);
                    }
                }
            }
        };
        if result.is_ok() {
            // Stopping (lease released): settle what is in flight, in order.
            let drained = tokio::time::timeout(DRAIN_WAIT, async {
                while let Some((done, r)) = pipeline.pending.next().await {
                    if self.complete(&mut pipeline, done, r).await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if drained.is_err() {
                tracing::warn!(partition = %self.partition.name(), "in-flight events not settled before stopping");
            }
        }
        // Whatever is still unacknowledged will be redone by the next owner.
        for id in std::mem::take(&mut pipeline.ids) {
            self.forget(id.as_deref());
        }
        result
    }

    /// Acknowledges an event whose deliveries are stored (the pipeline's
    /// front); on a failed delivery, forgets its id and fails the worker.
    async fn complete<F: Future>(
        &self,
        pipeline: &mut Pipeline<F>,
        done: InFlight,
        stored_result: Result<(), PublishError>,
    ) -> Result<(), IngestError> {
        let id = pipeline.ids.pop_front().flatten();
        pipeline.outstanding = pipeline.outstanding.saturating_sub(done.durable);
        if let Err(e) = stored_result {
            self.forget(id.as_deref());
            return Err(IngestError::Publish(e));
        }
        self.acknowledge(&done.msg).await;
        Ok(())
    }

    /// Forgets the ids of a batch's events that were deduplicated but will
    /// not be handled (the worker is failing): their redo must not look
    /// like a duplicate.
    fn forget_rest(
        &self,
        rest: impl Iterator<Item = (async_nats::jetstream::Message, Option<ProducerEvent>, u64, u64)>,
    ) {
        for (_, event, _, _) in rest {
            self.forget(event.as_ref().and_then(|e| e.id.as_deref()));
        }
    }

    fn forget(&self, id: Option<&str>) {
        if let Some(id) = id {
            self.shared.dedup.invalidate(id);
        }
    }

    async fn acknowledge(&self, msg: &async_nats::jetstream::Message) {
        if let Err(e) = msg.ack().await {
            // The server offers it again after the ack wait; the log's
            // message ids keep the redo from delivering twice.
            tracing::warn!(error = %e, "acknowledging an event failed");
        }
    }

    /// Handles a batch of messages, adding each to the pipeline; waits for
    /// the pipeline's front when too many acknowledgements are outstanding.
    async fn process<F>(
        &mut self,
        batch: &mut Vec<async_nats::jetstream::Message>,
        pipeline: &mut Pipeline<F>,
    ) -> Result<(), IngestError>
    where
        F: Future<Output = (InFlight, Result<(), PublishError>)>,
    {
        let mut events = Vec::with_capacity(batch.len());
        let mut needs_index = false;
        let mut latest_acks = Vec::new();
        for msg in batch.drain(..) {
            // Duplicates are dropped here, before they could make an older
            // event the latest of its key again.
            let event = self.decode(&msg).filter(|e| self.fresh(e));
            let (seq, ts) = published(&msg);
            if let Some(e) = &event {
                needs_index |= matches!(e.target, Target::Room(_) | Target::Match { .. });
                if let Some(ack) = self.shared.latest.write(e, ts, &mut self.latest_buf).await {
                    latest_acks.push(ack);
                }
            }
            events.push((msg, event, seq, ts));
        }
        // Keyed events are the latest of their key before this batch is
        // matched (crate::latest: a snapshot misses nothing the live path
        // did). Bounded: snapshots are a convenience, and a latest-event
        // store that does not answer (gone, or refused by NATS permissions)
        // must not hold up delivery.
        if !latest_acks.is_empty() {
            let stored = async {
                for ack in latest_acks {
                    if let Err(e) = ack.await {
                        metrics::counter!("switchyard_router_latest_write_errors_total").increment(1);
                        tracing::warn!(error = %e, "storing a latest event failed");
                    }
                }
            };
            if tokio::time::timeout(LATEST_WAIT, stored).await.is_err() {
                metrics::counter!("switchyard_router_latest_write_errors_total").increment(1);
                tracing::warn!("latest events not acknowledged in time; matching the batch anyway");
            }
        }
        // The promise behind `ok`: every change stored before this batch was
        // fetched is in the index before the batch is matched.
        if needs_index {
            if let Err(e) = self.shared.store.catch_up().await {
                tracing::warn!(error = %e, "matching with an index that may lag the subscription bucket");
            }
        }
        let mut events = events.into_iter();
        while let Some((msg, event, seq, ts)) = events.next() {
            while pipeline.outstanding >= MAX_ACKS_IN_FLIGHT {
                let Some((done, r)) = pipeline.pending.next().await else {
                    break;
                };
                if let Err(e) = self.complete(pipeline, done, r).await {
                    self.forget(event.as_ref().and_then(|e| e.id.as_deref()));
                    self.forget_rest(events);
                    return Err(e);
                }
            }
            let mut f = InFlight {
                msg,
                acks: Vec::new(),
                durable: 0,
            };
            let mut id = None;
            if let Some(mut event) = event {
                metrics::histogram!("switchyard_router_event_lag_seconds")
                    .record(now_ms().saturating_sub(ts) as f64 / 1000.0);
                let delivered = self.deliver(&event, ts, seq, &mut f.acks).await;
                f.durable = f.acks.len();
                id = event.id.take();
                match delivered {
                    Ok(n) => metrics::counter!("switchyard_router_deliveries_total").increment(n as u64),
                    Err(e) => {
                        self.forget(id.as_deref());
                        self.forget_rest(events);
                        return Err(e);
                    }
                }
            }
            pipeline.push(f, id);
            if self.live_out.largest() >= LIVE_FLUSH_BYTES {
                self.flush_live().await;
            }
        }
        self.flush_live().await;
        Ok(())
    }

    /// Sends the live-only hand-offs gathered so far, one message per user partition.
    async fn flush_live(&mut self) {
        let mut msgs = Vec::new();
        self.live_out.drain(|p, _, msg| msgs.push((p, msg)));
        for (p, msg) in msgs {
            if let Err(e) = self
                .shared
                .client
                .publish(self.shared.subjects.targets_live(p), msg)
                .await
            {
                metrics::counter!("switchyard_router_publish_errors_total").increment(1);
                tracing::error!(error = %e, "publishing a live hand-off failed");
            }
        }
    }

    /// Decodes one message; `None` (counted) when malformed.
    fn decode(&self, msg: &async_nats::jetstream::Message) -> Option<ProducerEvent> {
        metrics::counter!("switchyard_router_events_total").increment(1);
        let Some((ty, key)) = self.shared.subjects.parse_partitioned_event(msg.subject.as_str()) else {
            metrics::counter!("switchyard_router_events_malformed_total", "reason" => "subject").increment(1);
            tracing::warn!(subject = %msg.subject, "stored event on an unexpected subject");
            return None;
        };
        let json = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .is_some_and(|v| is_json_content_type(v.as_str()));
        match parse_event(ty, key, &msg.payload, json) {
            Ok(e) => Some(e),
            Err(e) => {
                metrics::counter!("switchyard_router_events_malformed_total", "reason" => e.reason()).increment(1);
                tracing::warn!(subject = %msg.subject, error = %e, "malformed producer event dropped");
                None
            }
        }
    }

    /// Whether the event's producer id (if any) is new within the window.
    fn fresh(&self, event: &ProducerEvent) -> bool {
        let Some(id) = &event.id else {
            return true;
        };
        let mut fresh = false;
        self.shared.dedup.entry_by_ref(id).or_insert_with(|| fresh = true);
        if !fresh {
            metrics::counter!("switchyard_router_events_duplicate_total").increment(1);
        }
        fresh
    }

    /// Hands the event's targets to their user partitions; durable
    /// hand-offs add their pending acknowledgement to `acks`. Returns the
    /// number of deliveries (users, or 1 for a broadcast).
    async fn deliver(
        &mut self,
        event: &ProducerEvent,
        ts: u64,
        seq: u64,
        acks: &mut Vec<PublishAckFuture>,
    ) -> Result<usize, IngestError> {
        EventRef {
            id: event.id.as_deref(),
            shape: self.partition.shape.tag(),
            seq,
        }
        .write(&mut self.event_ref);
        let mut fanout = if event.durable {
            std::mem::replace(&mut self.durable_out, Fanout::new(0))
        } else {
            std::mem::replace(&mut self.live_out, Fanout::new(0))
        };
        fanout.begin(&self.event_ref, event.durable);
        let delivered = self.targeter.target(&self.shared.state, event, ts, &mut fanout);
        fanout.end();
        if event.durable {
            let mut msgs = Vec::new();
            fanout.drain(|p, part, msg| msgs.push((p, part, msg)));
            self.durable_out = fanout;
            for (p, part, msg) in msgs {
                self.hand_off(p, part, msg, acks).await?;
            }
        } else {
            self.live_out = fanout;
        }
        Ok(delivered)
    }

    /// Stores one hand-off in the hand-off stream, its acknowledgement into `acks`.
    async fn hand_off(
        &mut self,
        partition: u32,
        part: u32,
        msg: Bytes,
        acks: &mut Vec<PublishAckFuture>,
    ) -> Result<(), IngestError> {
        use std::fmt::Write;
        self.msg_id.clear();
        let _ = write!(self.msg_id, "{}:{partition}", self.event_ref);
        if part > 0 {
            let _ = write!(self.msg_id, ".{part}");
        }
        let publish = PublishMessage::build().payload(msg).message_id(self.msg_id.as_str());
        match self
            .shared
            .js
            .send_publish(self.shared.subjects.targets(partition), publish)
            .await
        {
            Ok(ack) => {
                acks.push(ack);
                Ok(())
            }
            Err(e) => {
                metrics::counter!("switchyard_router_publish_errors_total").increment(1);
                if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                    // This hand-off can never be stored; redoing the event would not help.
                    tracing::error!(error = %e, partition, "hand-off larger than the server's max payload dropped");
                    return Ok(());
                }
                Err(IngestError::Publish(e))
            }
        }
    }
}

/// What names an event in the delivery log's message ids.
struct EventRef<'a> {
    id: Option<&'a str>,
    shape: &'static str,
    seq: u64,
}

impl EventRef<'_> {
    /// `i:<producer id>` (the id hashed when it is not plain printable ASCII
    /// of at most 128 bytes), or `s<shape>:<seq>`. The delivery stage adds
    /// `:<user>` (or `:_all.<partition>`) for the log's message ids.
    fn write(&self, out: &mut String) {
        use std::fmt::Write;
        out.clear();
        match self.id {
            Some(id) if id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) => {
                let _ = write!(out, "i:{id}");
            }
            Some(id) => {
                let _ = write!(out, "h:{:016x}{:04x}", fnv1a(id.as_bytes()), id.len() & 0xffff);
            }
            None => {
                let _ = write!(out, "s{}:{}", self.shape, self.seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_refs_name_the_event() {
        let mut out = String::new();
        let r = EventRef {
            id: Some("ord-1"),
            shape: "k",
            seq: 9,
        };
        r.write(&mut out);
        assert_eq!(out, "i:ord-1");
        let r = EventRef {
            id: None,
            shape: "t",
            seq: 9,
        };
        r.write(&mut out);
        assert_eq!(out, "st:9");
        let r = EventRef {
            id: Some("with space\r\n"),
            shape: "t",
            seq: 9,
        };
        r.write(&mut out);
        assert!(out.starts_with("h:") && out.bytes().all(|b| b.is_ascii_graphic()));
    }
}
