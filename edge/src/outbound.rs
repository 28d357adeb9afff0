//! The outbound queue of one connection and its flow-control policy
//! (docs/PROTOCOL.md, "Flow control on each connection"): the token-bucket rate
//! limit, conflation by key, the priority-aware slow-consumer bound, batch
//! draining, and the counts behind `dropped` notices.
//!
//! It owns policy and bookkeeping only. It must not do I/O, take locks, await,
//! start timers or read the clock: the caller passes `now`, wraps the queue in
//! its own (briefly held) lock, wakes the writer when [`PushOutcome::wake`]
//! says so, sends the `dropped` frames and closes a connection that stays full
//! (see [`OutboundQueue::full_since`]).
//!
//! # Policy, in the order [`OutboundQueue::push`] applies it
//! 1. Conflation: a delivery with a conflation key that is neither `critical`
//!    nor replayed supersedes a queued, unsent delivery with the same key (that
//!    is itself neither `critical` nor replayed): the old one leaves the queue
//!    and the new one joins at the end, so `pos` order holds. The superseded
//!    delivery is counted as conflated, not dropped. The newcomer keeps the
//!    higher of the two priorities, so superseding a `high` event with a `low`
//!    one cannot turn it into something the slow-consumer rule may drop.
//! 2. Rate limit: a token bucket (`rate_per_s`, `burst`) refilled lazily from
//!    `now`. `critical` and replayed deliveries bypass it, and so does a
//!    delivery that supersedes a queued one (it adds nothing to what the
//!    client will receive). A cut delivery is counted as `rate_limited`.
//! 3. Slow consumer: the queue holds at most `max_events` deliveries and
//!    `max_bytes` of bodies. To make room, queued `low` deliveries are dropped
//!    oldest first, then queued `normal` ones; a `low` newcomer only displaces
//!    `low` ones. A `low` or `normal` newcomer that cannot fit even so is
//!    itself dropped, and nothing queued is sacrificed for it. `high` and
//!    `critical` deliveries are never dropped: when they cannot fit they are
//!    queued anyway, so the bounds can be exceeded, but then only by `high`
//!    and `critical` deliveries (the queue holds no `low` or `normal` one while
//!    it is over a bound). Drops are counted as `slow_consumer`.
//!
//! Before all of these, throttling ([`crate::throttle`]): a delivery that
//! the router marked with a throttle (a keyed, non-`critical` event that
//! only throttled subscriptions of the user matched), unless replayed,
//! passes at most once per interval per conflation key; the newest one
//! within the interval waits outside the queue and joins it (through the
//! rules above) when the interval has passed, at the next push or when the
//! writer calls [`OutboundQueue::release_throttled`] at
//! [`OutboundQueue::throttle_due`]. Merged-away deliveries are not drops.
//! A delivery of the same key that is not throttled drops an older waiting
//! one, so nothing stale follows a newer value. The throttle table exists
//! only while a connection has throttled deliveries within their interval.
//!
//! Every operation is O(1) (expected, for the key map) apart from
//! [`OutboundQueue::drain_batch`], which is O(events moved). Storage is a slab
//! of entries threaded on intrusive lists (queue order, and one list per
//! droppable priority), so removing from the middle leaves no tombstones to
//! skip or compact; it is released when the queue drains empty.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_common::event::Prio;

use crate::snapshot::SnapshotWatches;
use crate::throttle::{Offer, Throttle};

/// One event on its way to a connection: the delivery body (see
/// `switchyard_common::delivery`) and what flow control needs to know
/// without decoding it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The delivery body (event frame map without `op`/`pos`).
    pub body: Bytes,
    /// Position in the delivery log; `None` for non-durable events.
    pub pos: Option<u64>,
    /// Priority (decides what a slow connection drops first).
    pub prio: Prio,
    /// Hash of the event's (`type`, `key`) when it has a key: the conflation identity.
    pub conflation_key: Option<u64>,
    /// Replayed from the log on resume: never rate limited, conflated or throttled.
    pub replayed: bool,
    /// The throttle the router computed for this user (a keyed event that
    /// only throttled subscriptions matched); `None` for most deliveries.
    pub throttle_ms: Option<NonZeroU32>,
    /// Held back by the throttle and released later: it may follow a
    /// delivery with a higher `pos`, and then goes without its `pos` (the
    /// client's resume point is past it already) instead of being skipped
    /// as a duplicate.
    pub throttle_released: bool,
}

impl Delivery {
    /// A delivery for `body` at `pos`.
    pub fn new(body: Bytes, pos: Option<u64>, replayed: bool) -> Delivery {
        let meta = switchyard_common::delivery::peek_meta(&body).unwrap_or_default();
        Delivery {
            body,
            pos,
            prio: meta.prio,
            conflation_key: meta.conflation_key,
            replayed,
            throttle_ms: meta.throttle_ms,
            throttle_released: false,
        }
    }
}

/// How long a drop may wait for its `dropped` notice (docs/PROTOCOL.md: "sent
/// before the next event or within 1 s").
pub const DROPPED_NOTICE_WITHIN: Duration = Duration::from_secs(1);

/// Flow-control limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundConfig {
    /// Most deliveries queued (default 1024); only `high` and `critical` ones may exceed it.
    pub max_events: usize,
    /// Most body bytes queued (default 1 MiB); only `high` and `critical` ones may exceed it.
    pub max_bytes: usize,
    /// Most deliveries per drained batch (default 50); 0 counts as 1.
    pub batch_max_events: usize,
    /// Most body bytes per drained batch (default 64 KiB); a larger delivery goes alone.
    pub batch_max_bytes: usize,
    /// Sustained deliveries per second (default 100); 0 turns the rate limit off.
    pub rate_per_s: u32,
    /// Deliveries allowed at once on a rested connection (default 200); 0 counts as 1.
    pub burst: u32,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            max_events: 1024,
            max_bytes: 1 << 20,
            batch_max_events: 50,
            batch_max_bytes: 64 << 10,
            rate_per_s: 100,
            burst: 200,
        }
    }
}

/// What [`OutboundQueue::push`] did with the pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Queued.
    Queued,
    /// Queued, superseding a queued delivery with the same conflation key.
    Replaced,
    /// Cut by the rate limit (counted as `rate_limited`).
    RateLimited,
    /// Dropped: no room, even after dropping what it may displace (counted as `slow_consumer`).
    SlowConsumer,
    /// Kept back by the throttle (it waits for its key's interval); not a drop.
    Throttled,
}

/// The result of one [`OutboundQueue::push`].
#[must_use = "the writer may need waking"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// What happened to the pushed delivery.
    pub fate: Fate,
    /// Queued deliveries dropped to make room for it (counted as `slow_consumer`).
    pub evicted: usize,
    /// Wake the writer: the queue went from empty to non-empty, or an
    /// unreported drop is now [`DROPPED_NOTICE_WITHIN`] old (reported once
    /// per notice).
    pub wake: bool,
    /// The throttle's next due time moved earlier: a writer sleeping until
    /// [`OutboundQueue::throttle_due`] must look again.
    pub rearm: bool,
}

/// Drops not yet reported to the client, per `dropped` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dropped {
    /// Deliveries cut by the rate limit (`reason: "rate_limited"`).
    pub rate_limited: u64,
    /// Deliveries dropped for a full queue (`reason: "slow_consumer"`).
    pub slow_consumer: u64,
}

impl Dropped {
    /// Whether nothing was dropped.
    pub fn is_empty(&self) -> bool {
        self.rate_limited == 0 && self.slow_consumer == 0
    }
}

/// The end of a list / no slot.
const NIL: u32 = u32::MAX;
/// The droppable priorities, each with its own list: index 0 `low`, 1 `normal`.
const LOW: usize = 0;
const NORMAL: usize = 1;
/// Slots (and key-map entries) kept when the queue drains empty; more are released.
const RETAINED_CAPACITY: usize = 64;

/// Head, tail and totals of one intrusive list.
#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
    bytes: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
        bytes: 0,
    };
}

/// A queued delivery and its links: `prev`/`next` in queue order,
/// `class_prev`/`class_next` in its priority's list (unused for `high` and
/// `critical`, which are never dropped).
#[derive(Debug)]
struct Entry {
    d: Delivery,
    prev: u32,
    next: u32,
    class_prev: u32,
    class_next: u32,
}

#[derive(Debug)]
enum Slot {
    Used(Entry),
    /// A free slot and the next free one.
    Free(u32),
}

/// Conflation keys are already 64-bit hashes (FNV-1a of type and key); one
/// folded multiply spreads them over the map's buckets, far cheaper than SipHash.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

/// The list of a droppable priority.
fn class_of(prio: Prio) -> Option<usize> {
    match prio {
        Prio::Low => Some(LOW),
        Prio::Normal => Some(NORMAL),
        Prio::High | Prio::Critical => None,
    }
}

/// The conflation key under which a delivery may supersede or be superseded.
fn conflatable_key(d: &Delivery) -> Option<u64> {
    if d.prio == Prio::Critical || d.replayed {
        return None;
    }
    d.conflation_key
}

/// A token bucket refilled lazily from the `now` its caller passes in: the
/// rate limit on deliveries here, and on client ops in [`crate::op_limit`].
///
/// Modelled GCRA-style by the time it will be full again, so it is one
/// timestamp, allocates nothing and never needs a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Time between tokens; `None` without a limit.
    interval: Option<Duration>,
    /// How far ahead of `now` the bucket may be spent: `burst` tokens.
    burst_span: Duration,
    /// When the bucket is full again (GCRA's theoretical arrival time).
    full_at: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens (0 counts as 1) refilled at
    /// `rate_per_s`; a rate of 0 turns the limit off.
    pub fn new(rate_per_s: u32, burst: u32) -> TokenBucket {
        let interval = (rate_per_s > 0).then(|| Duration::from_secs(1) / rate_per_s);
        TokenBucket {
            interval,
            burst_span: interval.unwrap_or_default() * burst.max(1),
            full_at: None,
        }
    }

    /// Takes a token at `now`; whether there was one (a refusal spends nothing).
    pub fn try_take(&mut self, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return true;
        };
        let full_at = self.full_at.map_or(now, |t| t.max(now)) + interval;
        if full_at.saturating_duration_since(now) > self.burst_span {
            return false;
        }
        self.full_at = Some(full_at);
        true
    }
}

/// One connection's outbound queue; see the module documentation for the policy.
#[derive(Debug)]
pub struct OutboundQueue {
    config: OutboundConfig,
    slots: Vec<Slot>,
    free: u32,
    /// All queued deliveries, oldest first; its `len` and `bytes` are the queue's.
    order: List,
    /// Queued `low` and `normal` deliveries, oldest first.
    classes: [List; 2],
    /// Conflation key → slot of the queued delivery that has it.
    keys: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    /// The rate limit's token bucket.
    bucket: TokenBucket,
    full_since: Option<Instant>,
    pending: Dropped,
    pending_since: Option<Instant>,
    /// A wake was already asked for the pending drops.
    notice_woken: bool,
    total_rate_limited: u64,
    total_slow_consumer: u64,
    total_conflated: u64,
    /// Throttled deliveries waiting for their key's interval; `None` (no
    /// memory) on a connection without throttled deliveries in flight.
    throttle: Option<Box<Throttle>>,
    total_throttled: u64,
    /// Snapshots on their way (`crate::snapshot`); `None` (no memory) on
    /// a connection waiting for none.
    snapshots: Option<Box<SnapshotWatches>>,
}

impl OutboundQueue {
    /// An empty queue with a full bucket; allocates nothing until used.
    pub fn new(config: OutboundConfig) -> OutboundQueue {
        OutboundQueue {
            config,
            slots: Vec::new(),
            free: NIL,
            order: List::EMPTY,
            classes: [List::EMPTY; 2],
            keys: HashMap::default(),
            bucket: TokenBucket::new(config.rate_per_s, config.burst),
            full_since: None,
            pending: Dropped::default(),
            pending_since: None,
            notice_woken: false,
            total_rate_limited: 0,
            total_slow_consumer: 0,
            total_conflated: 0,
            throttle: None,
            total_throttled: 0,
            snapshots: None,
        }
    }

    /// Starts keeping the snapshot of subscription `sub` in order with its
    /// live events (see `crate::snapshot`).
    pub fn expect_snapshot(&mut self, sub: &str, now: Instant) {
        self.snapshots.get_or_insert_with(Default::default).begin(sub, now);
    }

    /// Queues the snapshot of `sub` (entries of keys whose live events came
    /// first are left out); how many entries were queued. Snapshot entries
    /// are not rate limited, conflated or throttled, like a replay.
    pub fn snapshot_arrived(&mut self, sub: &str, bodies: &[Bytes], now: Instant) -> usize {
        let Some(watches) = self.snapshots.as_deref_mut() else {
            return 0;
        };
        let deliveries: Vec<Delivery> = bodies.iter().map(|b| Delivery::new(b.clone(), None, true)).collect();
        let sent = watches.finish(sub, deliveries.iter().map(|d| (d.conflation_key, &d.body)));
        if watches.is_empty() {
            self.snapshots = None;
        }
        let n = sent.len();
        for body in sent {
            let _ = self.push(Delivery::new(body, None, true), now);
        }
        n
    }

    /// The limits this queue applies.
    pub fn config(&self) -> &OutboundConfig {
        &self.config
    }

    /// Deliveries queued.
    pub fn len(&self) -> usize {
        self.order.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.order.len == 0
    }

    /// Body bytes queued.
    pub fn bytes(&self) -> usize {
        self.order.bytes
    }

    /// Since when the queue has been full: set by the first push that found no
    /// room while the queue was above half of a bound, cleared once draining
    /// brings it to half of both bounds or below.
    /// The caller closes the connection (4009) when this is older than its deadline.
    pub fn full_since(&self) -> Option<Instant> {
        self.full_since
    }

    /// When the oldest drop not yet taken by [`OutboundQueue::take_dropped`] happened.
    pub fn dropped_pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    /// Deliveries cut by the rate limit since the queue was created.
    pub fn total_rate_limited(&self) -> u64 {
        self.total_rate_limited
    }

    /// Deliveries dropped for a full queue since the queue was created.
    pub fn total_slow_consumer(&self) -> u64 {
        self.total_slow_consumer
    }

    /// Deliveries superseded by a newer one with the same key since the queue was created.
    pub fn total_conflated(&self) -> u64 {
        self.total_conflated
    }

    /// Deliveries the throttle merged away (a newer one of the key came
    /// within the interval) since the queue was created.
    pub fn total_throttled(&self) -> u64 {
        self.total_throttled
    }

    /// When the throttle next needs [`OutboundQueue::release_throttled`]:
    /// a waiting delivery is due, or the table can be let go. `None` when
    /// the connection has no throttle table.
    pub fn throttle_due(&self) -> Option<Instant> {
        self.throttle.as_ref().map(|t| t.next_due())
    }

    /// Queues the throttled deliveries due at `now` (and lets the throttle
    /// table go once it holds nothing). Whether the writer needs waking:
    /// the queue went from empty to non-empty.
    pub fn release_throttled(&mut self, now: Instant) -> bool {
        let was_empty = self.is_empty();
        self.release_due(now);
        was_empty && !self.is_empty()
    }

    /// Applies the flow-control policy to `d` at `now`: throttle,
    /// conflation, rate limit, slow-consumer bound (see the module
    /// documentation).
    pub fn push(&mut self, d: Delivery, now: Instant) -> PushOutcome {
        if let (Some(watches), false) = (self.snapshots.as_deref_mut(), d.replayed) {
            watches.observe(d.conflation_key, &d.body, now);
        }
        let was_empty = self.is_empty();
        let (fate, evicted, rearm) = if d.throttle_ms.is_none() && self.throttle.is_none() {
            let (fate, evicted) = self.enqueue(d, now);
            (fate, evicted, false)
        } else {
            let due_before = self.throttle_due();
            // What is due goes first: it is older than `d`.
            let released_evicted = self.release_due(now);
            let (fate, evicted) = match self.throttle_step(d, now) {
                Some(d) => self.enqueue(d, now),
                None => (Fate::Throttled, 0),
            };
            let rearm = match (due_before, self.throttle_due()) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(before), Some(after)) => after < before,
            };
            (fate, evicted + released_evicted, rearm)
        };
        let notice_due = !self.notice_woken
            && self
                .pending_since
                .is_some_and(|t| now.saturating_duration_since(t) >= DROPPED_NOTICE_WITHIN);
        self.notice_woken |= notice_due;
        PushOutcome {
            fate,
            evicted,
            wake: (was_empty && !self.is_empty()) || notice_due,
            rearm,
        }
    }

    /// The throttle's step: `Some` when `d` goes on to the queue now.
    fn throttle_step(&mut self, d: Delivery, now: Instant) -> Option<Delivery> {
        let Some(key) = d.conflation_key else {
            return Some(d);
        };
        match d.throttle_ms {
            Some(ms) if d.prio != Prio::Critical && !d.replayed => {
                let t = self.throttle.get_or_insert_with(|| Box::new(Throttle::new(now)));
                match t.offer(d, key, ms, now) {
                    Offer::Pass(d) => Some(d),
                    Offer::Held { merged } => {
                        self.total_throttled += u64::from(merged);
                        None
                    }
                }
            }
            _ => {
                if let Some(t) = self.throttle.as_mut() {
                    self.total_throttled += u64::from(t.supersede(key, &d));
                }
                Some(d)
            }
        }
    }

    /// Queues what the throttle has due at `now`; returns how many queued
    /// deliveries that evicted. Lets the table go when it holds nothing.
    fn release_due(&mut self, now: Instant) -> usize {
        let Some(mut t) = self.throttle.take() else {
            return 0;
        };
        let mut evicted = 0;
        if t.next_due() <= now {
            // Their own cuts (rate limit, room) are counted in the queue's
            // totals and the `dropped` notices like any other delivery's.
            t.release_due(now, |d| evicted += self.enqueue(d, now).1);
        }
        if !t.is_expired(now) {
            self.throttle = Some(t);
        }
        evicted
    }

    /// Conflation, rate limit and slow-consumer bound for `d` at `now`.
    fn enqueue(&mut self, mut d: Delivery, now: Instant) -> (Fate, usize) {
        let superseded = conflatable_key(&d).and_then(|k| self.keys.get(&k).copied());
        let (fate, evicted) = match superseded {
            Some(slot) => {
                d.prio = d.prio.max(self.entry(slot).d.prio);
                self.admit(d, Some(slot), now)
            }
            None if d.prio != Prio::Critical && !d.replayed && !self.bucket.try_take(now) => {
                self.total_rate_limited += 1;
                self.pending.rate_limited += 1;
                self.pending_since.get_or_insert(now);
                (Fate::RateLimited, 0)
            }
            None => self.admit(d, None, now),
        };
        (fate, evicted)
    }

    /// Moves the next deliveries, in queue order, to the end of `out`: at
    /// most `batch_max_events`, stopping before the batch's bodies would pass
    /// `batch_max_bytes` (a larger delivery goes alone). Returns how many.
    pub fn drain_batch(&mut self, out: &mut Vec<Delivery>) -> usize {
        let max_events = self.config.batch_max_events.max(1);
        let mut moved = 0;
        let mut bytes = 0;
        while moved < max_events && self.order.head != NIL {
            let size = self.entry(self.order.head).d.body.len();
            if moved > 0 && bytes + size > self.config.batch_max_bytes {
                break;
            }
            out.push(self.remove(self.order.head));
            moved += 1;
            bytes += size;
        }
        if self.at_low_water() {
            self.full_since = None;
        }
        if self.is_empty() {
            self.release_storage();
        }
        moved
    }

    /// The drops since the last call, for `dropped` notices (one per non-zero
    /// reason); `None` when there were none.
    pub fn take_dropped(&mut self) -> Option<Dropped> {
        let taken = std::mem::take(&mut self.pending);
        self.pending_since = None;
        self.notice_woken = false;
        (!taken.is_empty()).then_some(taken)
    }

    /// Queues `d` (superseding the delivery in slot `superseded`) if the
    /// bounds allow, dropping what it may displace; returns its fate and how
    /// many queued deliveries were dropped.
    fn admit(&mut self, d: Delivery, superseded: Option<u32>, now: Instant) -> (Fate, usize) {
        let size = d.body.len();
        let (max_events, max_bytes) = (self.config.max_events, self.config.max_bytes);
        let fits = |len: usize, bytes: usize| len < max_events && bytes.saturating_add(size) <= max_bytes;
        // The queue as it will be once the superseded delivery is gone.
        let (mut len, mut bytes) = (self.order.len, self.order.bytes);
        let mut old_class = None;
        if let Some(slot) = superseded {
            let old = &self.entry(slot).d;
            len -= 1;
            bytes -= old.body.len();
            old_class = class_of(old.prio).map(|c| (c, old.body.len()));
        }
        // What a newcomer may displace: a `low` one only `low` ones.
        let victims: &[usize] = if d.prio == Prio::Low { &[LOW] } else { &[LOW, NORMAL] };
        if !fits(len, bytes) {
            // One oversized body does not make a near-empty queue full.
            if !self.at_low_water() {
                self.full_since.get_or_insert(now);
            }
            if class_of(d.prio).is_some() {
                let (mut n, mut b) = victims.iter().fold((0, 0), |(n, b), &c| {
                    (n + self.classes[c].len, b + self.classes[c].bytes)
                });
                if let Some((_, old_size)) = old_class.filter(|(c, _)| victims.contains(c)) {
                    n -= 1;
                    b -= old_size;
                }
                if !fits(len - n, bytes - b) {
                    // Dropping all it may displace would not make room: keep them.
                    self.note_slow_consumer(1, now);
                    return (Fate::SlowConsumer, 0);
                }
            }
        }
        let fate = match superseded {
            Some(slot) => {
                self.remove(slot);
                self.total_conflated += 1;
                Fate::Replaced
            }
            None => Fate::Queued,
        };
        let mut evicted = 0;
        while !fits(self.order.len, self.order.bytes) {
            let Some(victim) = victims.iter().map(|&c| self.classes[c].head).find(|&h| h != NIL) else {
                // Only `high` and `critical` left, and `d` is one of them: over the bound.
                break;
            };
            self.remove(victim);
            evicted += 1;
        }
        if evicted > 0 {
            self.note_slow_consumer(evicted, now);
        }
        self.push_back(d);
        (fate, evicted)
    }

    /// Whether the queue is at or below half of both bounds.
    fn at_low_water(&self) -> bool {
        self.order.len <= self.config.max_events / 2 && self.order.bytes <= self.config.max_bytes / 2
    }

    fn note_slow_consumer(&mut self, n: usize, now: Instant) {
        self.total_slow_consumer += n as u64;
        self.pending.slow_consumer += n as u64;
        self.pending_since.get_or_insert(now);
    }

    fn entry(&self, slot: u32) -> &Entry {
        match &self.slots[slot as usize] {
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!("outbound slot {slot} is linked but free"),
        }
    }

    fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        match &mut self.slots[slot as usize] {
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!("outbound slot {slot} is linked but free"),
        }
    }

    /// Appends `d` to the queue (and to its priority's list, and the key map).
    fn push_back(&mut self, d: Delivery) {
        let size = d.body.len();
        let class = class_of(d.prio);
        let key = conflatable_key(&d);
        let entry = Entry {
            d,
            prev: self.order.tail,
            next: NIL,
            class_prev: class.map_or(NIL, |c| self.classes[c].tail),
            class_next: NIL,
        };
        let slot = if self.free != NIL {
            let slot = self.free;
            let Slot::Free(next_free) = self.slots[slot as usize] else {
                unreachable!("outbound free list holds a used slot")
            };
            self.free = next_free;
            self.slots[slot as usize] = Slot::Used(entry);
            slot
        } else {
            let slot = u32::try_from(self.slots.len())
                .ok()
                .filter(|&s| s != NIL)
                .expect("outbound queue beyond u32::MAX entries");
            self.slots.push(Slot::Used(entry));
            slot
        };
        match self.order.tail {
            NIL => self.order.head = slot,
            tail => self.entry_mut(tail).next = slot,
        }
        self.order.tail = slot;
        self.order.len += 1;
        self.order.bytes += size;
        if let Some(c) = class {
            match self.classes[c].tail {
                NIL => self.classes[c].head = slot,
                tail => self.entry_mut(tail).class_next = slot,
            }
            let list = &mut self.classes[c];
            list.tail = slot;
            list.len += 1;
            list.bytes += size;
        }
        if let Some(k) = key {
            let before = self.keys.insert(k, slot);
            debug_assert!(before.is_none(), "two queued deliveries with conflation key {k}");
        }
    }

    /// Unlinks the delivery in `slot` from every list and the key map and frees the slot.
    fn remove(&mut self, slot: u32) -> Delivery {
        let Slot::Used(e) = std::mem::replace(&mut self.slots[slot as usize], Slot::Free(self.free)) else {
            unreachable!("outbound slot {slot} removed twice")
        };
        self.free = slot;
        let size = e.d.body.len();
        match e.prev {
            NIL => self.order.head = e.next,
            prev => self.entry_mut(prev).next = e.next,
        }
        match e.next {
            NIL => self.order.tail = e.prev,
            next => self.entry_mut(next).prev = e.prev,
        }
        self.order.len -= 1;
        self.order.bytes -= size;
        if let Some(c) = class_of(e.d.prio) {
            match e.class_prev {
                NIL => self.classes[c].head = e.class_next,
                prev => self.entry_mut(prev).class_next = e.class_next,
            }
            match e.class_next {
                NIL => self.classes[c].tail = e.class_prev,
                next => self.entry_mut(next).class_prev = e.class_prev,
            }
            self.classes[c].len -= 1;
            self.classes[c].bytes -= size;
        }
        if let Some(k) = conflatable_key(&e.d) {
            let was = self.keys.remove(&k);
            debug_assert_eq!(was, Some(slot), "conflation key {k} mapped elsewhere");
        }
        e.d
    }

    /// Resets the (empty) slab, releasing memory a burst left behind so idle
    /// connections stay small.
    fn release_storage(&mut self) {
        debug_assert!(self.is_empty() && self.keys.is_empty());
        self.slots.clear();
        self.free = NIL;
        if self.slots.capacity() > RETAINED_CAPACITY {
            self.slots.shrink_to(RETAINED_CAPACITY);
        }
        if self.keys.capacity() > RETAINED_CAPACITY {
            self.keys.shrink_to(RETAINED_CAPACITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;

    /// A delivery whose body (`size` bytes, at least 8) starts with `id`,
    /// durable at `pos = id`.
    fn ev(id: u64, prio: Prio, key: Option<u64>, size: usize) -> Delivery {
        assert!(size >= 8);
        let mut body = vec![0u8; size];
        body[..8].copy_from_slice(&id.to_le_bytes());
        Delivery {
            body: Bytes::from(body),
            pos: Some(id),
            prio,
            conflation_key: key,
            replayed: false,
            throttle_ms: None,
            throttle_released: false,
        }
    }

    /// A throttled delivery (`throttle_ms`) with conflation key `key`.
    fn thr(id: u64, prio: Prio, key: u64, throttle_ms: u32) -> Delivery {
        Delivery {
            throttle_ms: NonZeroU32::new(throttle_ms),
            ..ev(id, prio, Some(key), 10)
        }
    }

    fn drained(q: &mut OutboundQueue) -> Vec<u64> {
        let mut out = Vec::new();
        while q.drain_batch(&mut out) > 0 {}
        out.iter().map(id_of).collect()
    }

    fn id_of(d: &Delivery) -> u64 {
        u64::from_le_bytes(d.body[..8].try_into().unwrap())
    }

    fn drain_ids(q: &mut OutboundQueue) -> Vec<u64> {
        let mut out = Vec::new();
        q.drain_batch(&mut out);
        out.iter().map(id_of).collect()
    }

    fn drain_all(q: &mut OutboundQueue) -> Vec<Delivery> {
        let mut out = Vec::new();
        while q.drain_batch(&mut out) > 0 {}
        out
    }

    /// Small bounds, no rate limit.
    fn small(max_events: usize, max_bytes: usize) -> OutboundConfig {
        OutboundConfig {
            max_events,
            max_bytes,
            batch_max_events: 100,
            batch_max_bytes: 1 << 20,
            rate_per_s: 0,
            burst: 0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    impl OutboundQueue {
        /// Walks every list and the key map; panics on any inconsistency.
        fn check_structure(&self) {
            let mut used = HashSet::new();
            let (mut len, mut bytes, mut prev) = (0, 0, NIL);
            let mut class_seen = [Vec::new(), Vec::new()];
            let mut keyed = 0;
            let mut at = self.order.head;
            while at != NIL {
                let e = self.entry(at);
                assert_eq!(e.prev, prev);
                assert!(used.insert(at), "cycle in queue order");
                len += 1;
                bytes += e.d.body.len();
                if let Some(c) = class_of(e.d.prio) {
                    class_seen[c].push(at);
                }
                if let Some(k) = conflatable_key(&e.d) {
                    keyed += 1;
                    assert_eq!(self.keys.get(&k), Some(&at));
                }
                prev = at;
                at = e.next;
            }
            assert_eq!(self.order.tail, prev);
            assert_eq!((self.order.len, self.order.bytes), (len, bytes));
            assert_eq!(self.keys.len(), keyed);
            for (c, seen) in class_seen.iter().enumerate() {
                let list = self.classes[c];
                let (mut walked, mut b, mut prev, mut at) = (Vec::new(), 0, NIL, list.head);
                while at != NIL {
                    let e = self.entry(at);
                    assert_eq!(e.class_prev, prev);
                    walked.push(at);
                    b += e.d.body.len();
                    prev = at;
                    at = e.class_next;
                }
                assert_eq!(list.tail, prev);
                assert_eq!(&walked, seen, "priority list out of queue order");
                assert_eq!((list.len, list.bytes), (walked.len(), b));
            }
            let mut free = 0;
            let mut at = self.free;
            while at != NIL {
                let Slot::Free(next) = self.slots[at as usize] else {
                    panic!("used slot on the free list")
                };
                free += 1;
                at = next;
            }
            assert_eq!(free + used.len(), self.slots.len());
        }

        /// Ids and priorities of the queued deliveries, in queue order.
        fn queued(&self) -> Vec<(u64, Prio)> {
            let mut ids = Vec::new();
            let mut at = self.order.head;
            while at != NIL {
                let e = self.entry(at);
                ids.push((id_of(&e.d), e.d.prio));
                at = e.next;
            }
            ids
        }

        fn droppable_len(&self) -> usize {
            self.classes[LOW].len + self.classes[NORMAL].len
        }
    }

    #[test]
    fn throttle_latest_wins_and_the_interval_is_honoured() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig::default());
        assert_eq!(q.throttle_due(), None, "no table before a throttled delivery");
        let o = q.push(thr(1, Prio::Normal, 7, 100), t0);
        assert_eq!(o.fate, Fate::Queued);
        assert!(o.rearm, "the writer learns of the table");
        for (i, id) in (2..=5).enumerate() {
            let o = q.push(thr(id, Prio::Normal, 7, 100), t0 + ms(10 * i as u64 + 10));
            assert_eq!(o.fate, Fate::Throttled);
            assert!(!o.wake);
        }
        assert_eq!(drained(&mut q), [1]);
        assert_eq!(q.total_throttled(), 3, "2, 3 and 4 merged away");
        assert_eq!(q.take_dropped(), None, "merged-away deliveries are not drops");
        assert_eq!(q.throttle_due(), Some(t0 + ms(100)));
        assert!(!q.release_throttled(t0 + ms(99)));
        assert!(q.release_throttled(t0 + ms(100)));
        let mut out = Vec::new();
        q.drain_batch(&mut out);
        assert_eq!(out.iter().map(id_of).collect::<Vec<_>>(), [5], "the latest value");
        assert!(out[0].throttle_released);
        // Due again 100 ms after the release; then the table goes.
        assert_eq!(q.throttle_due(), Some(t0 + ms(200)));
        assert!(!q.release_throttled(t0 + ms(200)));
        assert_eq!(q.throttle_due(), None, "an expired table is let go");
        assert_eq!(q.push(thr(6, Prio::Normal, 7, 100), t0 + ms(201)).fate, Fate::Queued);
    }

    #[test]
    fn a_due_delivery_goes_before_the_next_push() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig::default());
        let _ = q.push(thr(1, Prio::Normal, 7, 100), t0);
        assert_eq!(drained(&mut q), [1]);
        let _ = q.push(thr(2, Prio::Normal, 7, 100), t0 + ms(1));
        // No writer ran the timer: the next push releases 2 first, then
        // 3 finds the interval restarted and waits.
        let o = q.push(thr(3, Prio::Normal, 7, 100), t0 + ms(150));
        assert_eq!(o.fate, Fate::Throttled);
        assert_eq!(drained(&mut q), [2]);
    }

    #[test]
    fn unkeyed_critical_and_replayed_deliveries_are_not_throttled() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig::default());
        let _ = q.push(thr(1, Prio::Normal, 7, 1000), t0);
        let unkeyed = Delivery {
            conflation_key: None,
            ..thr(2, Prio::Normal, 7, 1000)
        };
        assert_eq!(q.push(unkeyed, t0).fate, Fate::Queued);
        assert_eq!(q.push(thr(3, Prio::Critical, 7, 1000), t0).fate, Fate::Queued);
        let replayed = Delivery {
            replayed: true,
            ..thr(4, Prio::Normal, 7, 1000)
        };
        assert_eq!(q.push(replayed, t0).fate, Fate::Queued);
        assert_eq!(drained(&mut q), [1, 2, 3, 4]);
    }

    #[test]
    fn a_newer_unthrottled_delivery_of_the_key_drops_the_waiting_one() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig::default());
        let _ = q.push(thr(1, Prio::Normal, 7, 100), t0);
        assert_eq!(q.push(thr(2, Prio::Normal, 7, 100), t0).fate, Fate::Throttled);
        // The same key matched an unthrottled subscription too: not throttled.
        assert_eq!(q.push(ev(3, Prio::Normal, Some(7), 10), t0).fate, Fate::Replaced);
        assert!(!q.release_throttled(t0 + ms(100)));
        assert_eq!(drained(&mut q), [3], "2 would be stale after 3");
    }

    #[test]
    fn throttled_keys_are_independent() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig::default());
        for (i, key) in [1u64, 2, 1, 2, 1, 2].into_iter().enumerate() {
            let _ = q.push(thr(i as u64 + 1, Prio::Normal, key, 100), t0 + ms(i as u64));
        }
        assert_eq!(drained(&mut q), [1, 2]);
        assert!(q.release_throttled(t0 + ms(101)));
        assert_eq!(drained(&mut q), [5, 6], "each key's latest, in arrival order");
    }

    #[test]
    fn first_push_wakes_the_writer_and_drain_keeps_order() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10, 1000));
        assert!(q.push(ev(1, Prio::Normal, None, 10), t0).wake);
        assert!(!q.push(ev(2, Prio::Low, None, 20), t0).wake);
        assert!(!q.push(ev(3, Prio::Critical, None, 30), t0).wake);
        assert_eq!((q.len(), q.bytes()), (3, 60));
        assert_eq!(drain_ids(&mut q), [1, 2, 3]);
        assert!(q.is_empty() && q.bytes() == 0);
        assert!(q.push(ev(4, Prio::Normal, None, 10), t0).wake, "empty again: wake");
    }

    #[test]
    fn batches_respect_event_and_byte_caps() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            batch_max_events: 3,
            batch_max_bytes: 100,
            ..small(100, 10_000)
        });
        for id in 1..=5 {
            let _ = q.push(ev(id, Prio::Normal, None, 10), t0);
        }
        assert_eq!(drain_ids(&mut q), [1, 2, 3]);
        assert_eq!(drain_ids(&mut q), [4, 5]);
        for (id, size) in [(6, 40), (7, 40), (8, 40), (9, 150), (10, 10)] {
            let _ = q.push(ev(id, Prio::Normal, None, size), t0);
        }
        assert_eq!(drain_ids(&mut q), [6, 7], "a third 40 would pass 100 bytes");
        assert_eq!(drain_ids(&mut q), [8], "stops before the oversized one");
        assert_eq!(drain_ids(&mut q), [9], "an oversized delivery goes alone");
        assert_eq!(drain_ids(&mut q), [10]);
        assert_eq!(q.drain_batch(&mut Vec::new()), 0);
    }

    #[test]
    fn zero_batch_cap_still_drains_one() {
        let mut q = OutboundQueue::new(OutboundConfig {
            batch_max_events: 0,
            ..small(10, 1000)
        });
        let _ = q.push(ev(1, Prio::Normal, None, 10), Instant::now());
        assert_eq!(drain_ids(&mut q), [1]);
    }

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            rate_per_s: 10,
            burst: 5,
            ..small(1000, 1 << 20)
        });
        let mut id = 0;
        let mut push = |q: &mut OutboundQueue, t: Instant| {
            id += 1;
            q.push(ev(id, Prio::High, None, 10), t).fate
        };
        for _ in 0..5 {
            assert_eq!(push(&mut q, t0), Fate::Queued);
        }
        assert_eq!(push(&mut q, t0), Fate::RateLimited);
        assert_eq!(push(&mut q, t0 + ms(99)), Fate::RateLimited, "a token takes 100 ms");
        assert_eq!(push(&mut q, t0 + ms(100)), Fate::Queued);
        assert_eq!(push(&mut q, t0 + ms(100)), Fate::RateLimited);
        // A long rest refills the bucket to the burst, no further.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(push(&mut q, t1), Fate::Queued);
        }
        assert_eq!(push(&mut q, t1), Fate::RateLimited);
        assert_eq!(q.total_rate_limited(), 4);
        assert_eq!(q.len(), 11);
        // A clock that steps back (callers race for the lock) is harmless.
        assert_eq!(push(&mut q, t1 - ms(500)), Fate::RateLimited);
    }

    #[test]
    fn critical_and_replayed_bypass_the_rate_limit_without_spending_tokens() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            rate_per_s: 1,
            burst: 1,
            ..small(1000, 1 << 20)
        });
        assert_eq!(q.push(ev(1, Prio::Normal, None, 10), t0).fate, Fate::Queued);
        assert_eq!(q.push(ev(2, Prio::Normal, None, 10), t0).fate, Fate::RateLimited);
        for id in 3..10 {
            assert_eq!(q.push(ev(id, Prio::Critical, None, 10), t0).fate, Fate::Queued);
            let replayed = Delivery {
                replayed: true,
                ..ev(100 + id, Prio::Low, None, 10)
            };
            assert_eq!(q.push(replayed, t0).fate, Fate::Queued);
        }
        assert_eq!(
            q.push(ev(20, Prio::Normal, None, 10), t0 + Duration::from_secs(1)).fate,
            Fate::Queued,
            "the bypassing deliveries took no token"
        );
    }

    #[test]
    fn zero_rate_turns_the_limit_off() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(100_000, 1 << 30));
        for id in 0..10_000 {
            assert_eq!(q.push(ev(id + 1, Prio::Low, None, 8), t0).fate, Fate::Queued);
        }
    }

    #[test]
    fn drops_are_counted_per_reason_until_taken() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            rate_per_s: 1,
            burst: 1,
            ..small(1, 1000)
        });
        assert_eq!(q.take_dropped(), None);
        assert_eq!(q.dropped_pending_since(), None);
        let _ = q.push(ev(1, Prio::Normal, None, 10), t0);
        let _ = q.push(ev(2, Prio::Normal, None, 10), t0 + ms(10));
        let _ = q.push(ev(3, Prio::Normal, None, 10), t0 + ms(20));
        assert_eq!(q.dropped_pending_since(), Some(t0 + ms(10)));
        // A token again; the queue (1 event) is full of a `normal`, which goes.
        let out = q.push(ev(4, Prio::High, None, 10), t0 + ms(1500));
        assert_eq!((out.fate, out.evicted), (Fate::Queued, 1));
        assert_eq!(
            q.take_dropped(),
            Some(Dropped {
                rate_limited: 2,
                slow_consumer: 1
            })
        );
        assert_eq!((q.take_dropped(), q.dropped_pending_since()), (None, None));
        assert_eq!(
            (q.total_rate_limited(), q.total_slow_consumer(), q.total_conflated()),
            (2, 1, 0)
        );
    }

    #[test]
    fn a_drop_notice_due_wakes_the_writer_once() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            rate_per_s: 1,
            burst: 1,
            ..small(1000, 1 << 20)
        });
        assert!(q.push(ev(1, Prio::Normal, None, 10), t0).wake);
        let cut = q.push(ev(2, Prio::Normal, None, 10), t0 + ms(100));
        assert_eq!(
            (cut.fate, cut.wake),
            (Fate::RateLimited, false),
            "the writer has events to send first"
        );
        assert!(!q.push(ev(3, Prio::Normal, None, 10), t0 + ms(600)).wake);
        let due = q.push(ev(4, Prio::Normal, None, 10), t0 + ms(1100));
        assert!(due.wake, "the first drop is 1 s old");
        assert!(!q.push(ev(5, Prio::Normal, None, 10), t0 + ms(1200)).wake, "asked once");
        assert!(q.take_dropped().is_some());
        let _ = q.push(ev(6, Prio::Normal, None, 10), t0 + ms(1300));
        assert!(
            q.push(ev(7, Prio::Normal, None, 10), t0 + ms(2300)).wake,
            "re-armed by take"
        );
    }

    #[test]
    fn conflation_supersedes_and_moves_to_the_end() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10, 1000));
        let _ = q.push(ev(1, Prio::Normal, Some(7), 10), t0);
        let _ = q.push(ev(2, Prio::Normal, Some(8), 20), t0);
        let out = q.push(ev(3, Prio::Normal, Some(7), 30), t0);
        assert_eq!((out.fate, out.evicted, out.wake), (Fate::Replaced, 0, false));
        assert_eq!((q.len(), q.bytes(), q.total_conflated()), (2, 50, 1));
        assert_eq!(q.take_dropped(), None, "superseded is not dropped");
        q.check_structure();
        assert_eq!(drain_ids(&mut q), [2, 3]);
        // Once sent, a key no longer conflates.
        assert_eq!(q.push(ev(4, Prio::Normal, Some(7), 10), t0).fate, Fate::Queued);
    }

    #[test]
    fn a_snapshot_entry_never_follows_a_live_event_of_its_key() {
        use switchyard_common::delivery::{encode_delivery_with, BodyExtras};
        use switchyard_common::event::{ProducerEvent, Target};
        let body = |key: &str, n: u8, snapshot: bool| {
            let ev = ProducerEvent {
                event_type: "tick".into(),
                data: Bytes::from(vec![n]),
                id: None,
                target: Target::All,
                prio: Prio::Normal,
                key: Some(key.into()),
                durable: false,
            };
            let mut out = Vec::new();
            let extras = BodyExtras {
                snapshot,
                ..BodyExtras::default()
            };
            encode_delivery_with(&ev, 1, &["w"], &ev.data, extras, &mut out);
            Bytes::from(out)
        };
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10, 10_000));
        q.expect_snapshot("w", t0);
        // K1's live tick arrives before the snapshot answer.
        let _ = q.push(Delivery::new(body("K1", 5, false), None, false), t0);
        let sent = q.snapshot_arrived("w", &[body("K1", 4, true), body("K2", 4, true)], t0);
        assert_eq!(sent, 1, "K1's older snapshot entry is left out");
        let mut out = Vec::new();
        q.drain_batch(&mut out);
        let got: Vec<Bytes> = out.into_iter().map(|d| d.body).collect();
        assert_eq!(got, vec![body("K1", 5, false), body("K2", 4, true)]);
        // An answer nobody waits for any more is not sent.
        assert_eq!(q.snapshot_arrived("w", &[body("K3", 1, true)], t0), 0);
        assert!(q.snapshots.is_none(), "no memory kept once answered");
    }

    #[test]
    fn critical_and_replayed_are_never_conflated() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10, 1000));
        let replayed = |id| Delivery {
            replayed: true,
            ..ev(id, Prio::Normal, Some(7), 10)
        };
        assert_eq!(q.push(ev(1, Prio::Critical, Some(7), 10), t0).fate, Fate::Queued);
        assert_eq!(q.push(replayed(2), t0).fate, Fate::Queued);
        assert_eq!(q.push(ev(3, Prio::Normal, Some(7), 10), t0).fate, Fate::Queued);
        assert_eq!(q.push(ev(4, Prio::Critical, Some(7), 10), t0).fate, Fate::Queued);
        assert_eq!(q.push(replayed(5), t0).fate, Fate::Queued);
        assert_eq!(q.push(ev(6, Prio::Low, Some(7), 10), t0).fate, Fate::Replaced);
        q.check_structure();
        assert_eq!(drain_ids(&mut q), [1, 2, 4, 5, 6]);
    }

    #[test]
    fn a_superseding_delivery_keeps_the_higher_priority() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10, 1000));
        let _ = q.push(ev(1, Prio::High, Some(7), 10), t0);
        assert_eq!(q.push(ev(2, Prio::Low, Some(7), 10), t0).fate, Fate::Replaced);
        let drained = drain_all(&mut q);
        assert_eq!((id_of(&drained[0]), drained[0].prio), (2, Prio::High));
    }

    #[test]
    fn conflation_bypasses_the_rate_limit() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            rate_per_s: 1,
            burst: 1,
            ..small(10, 1000)
        });
        assert_eq!(q.push(ev(1, Prio::Normal, Some(7), 10), t0).fate, Fate::Queued);
        assert_eq!(q.push(ev(2, Prio::Normal, None, 10), t0).fate, Fate::RateLimited);
        assert_eq!(q.push(ev(3, Prio::Normal, Some(7), 10), t0).fate, Fate::Replaced);
        assert_eq!(drain_ids(&mut q), [3], "the client gets the latest value");
    }

    #[test]
    fn a_full_queue_drops_low_then_normal_oldest_first() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(4, 10_000));
        for (id, prio) in [(1, Prio::Normal), (2, Prio::Low), (3, Prio::Normal), (4, Prio::Low)] {
            let _ = q.push(ev(id, prio, Some(id), 10), t0);
        }
        for id in 5..=7 {
            let out = q.push(ev(id, Prio::Normal, None, 10), t0);
            assert_eq!((out.fate, out.evicted), (Fate::Queued, 1));
            q.check_structure();
        }
        assert_eq!(q.total_slow_consumer(), 3);
        assert_eq!(q.keys.len(), 1, "evicted keys leave the map");
        assert_eq!(drain_ids(&mut q), [3, 5, 6, 7]);
    }

    #[test]
    fn a_low_delivery_never_displaces_a_normal_one() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(2, 10_000));
        let _ = q.push(ev(1, Prio::Normal, None, 10), t0);
        let _ = q.push(ev(2, Prio::Low, None, 10), t0);
        let out = q.push(ev(3, Prio::Low, None, 10), t0);
        assert_eq!((out.fate, out.evicted), (Fate::Queued, 1), "a low may displace a low");
        let out = q.push(ev(4, Prio::Low, None, 10), t0 + ms(1));
        assert_eq!(out.evicted, 1);
        let _ = q.push(ev(5, Prio::Normal, None, 10), t0 + ms(2));
        let out = q.push(ev(6, Prio::Low, None, 10), t0 + ms(3));
        assert_eq!((out.fate, out.evicted), (Fate::SlowConsumer, 0));
        assert_eq!(drain_ids(&mut q), [1, 5]);
        assert_eq!(q.take_dropped().unwrap().slow_consumer, 4);
    }

    #[test]
    fn high_and_critical_are_never_dropped_and_may_pass_the_bound() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(3, 10_000));
        let _ = q.push(ev(1, Prio::Low, None, 10), t0);
        let _ = q.push(ev(2, Prio::Normal, None, 10), t0);
        let _ = q.push(ev(3, Prio::High, None, 10), t0);
        assert_eq!(q.push(ev(4, Prio::High, None, 10), t0).evicted, 1);
        assert_eq!(q.push(ev(5, Prio::Critical, None, 10), t0).evicted, 1);
        let over = q.push(ev(6, Prio::High, None, 10), t0);
        assert_eq!((over.fate, over.evicted), (Fate::Queued, 0));
        assert_eq!(q.len(), 4, "over the bound, with high and critical only");
        assert_eq!(q.push(ev(7, Prio::Normal, None, 10), t0).fate, Fate::SlowConsumer);
        assert_eq!(q.push(ev(8, Prio::Critical, None, 10), t0).fate, Fate::Queued);
        assert_eq!(q.full_since(), Some(t0));
        assert_eq!(drain_ids(&mut q), [3, 4, 5, 6, 8]);
    }

    #[test]
    fn the_byte_bound_drops_too() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(100, 100));
        let _ = q.push(ev(1, Prio::Normal, None, 40), t0);
        let _ = q.push(ev(2, Prio::Normal, None, 40), t0);
        let out = q.push(ev(3, Prio::Normal, None, 40), t0);
        assert_eq!((out.fate, out.evicted), (Fate::Queued, 1));
        let out = q.push(ev(4, Prio::Normal, None, 101), t0);
        assert_eq!(
            (out.fate, out.evicted),
            (Fate::SlowConsumer, 0),
            "can never fit: nothing sacrificed"
        );
        assert_eq!(drain_ids(&mut q), [2, 3]);
    }

    #[test]
    fn nothing_is_evicted_for_a_delivery_that_would_not_fit_anyway() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(100, 100));
        let _ = q.push(ev(1, Prio::High, None, 60), t0);
        let _ = q.push(ev(2, Prio::Normal, None, 30), t0);
        let out = q.push(ev(3, Prio::Normal, None, 50), t0);
        assert_eq!((out.fate, out.evicted), (Fate::SlowConsumer, 0));
        assert_eq!(drain_ids(&mut q), [1, 2]);
    }

    #[test]
    fn a_superseding_delivery_that_does_not_fit_leaves_the_old_one() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(100, 100));
        let _ = q.push(ev(1, Prio::Normal, Some(7), 40), t0);
        let _ = q.push(ev(2, Prio::High, None, 50), t0);
        let out = q.push(ev(3, Prio::Normal, Some(7), 60), t0);
        assert_eq!((out.fate, out.evicted), (Fate::SlowConsumer, 0));
        assert_eq!(q.total_conflated(), 0);
        q.check_structure();
        let out = q.push(ev(4, Prio::Normal, Some(7), 45), t0);
        assert_eq!(out.fate, Fate::Replaced, "the old one is still conflatable");
        assert_eq!((q.len(), q.bytes()), (2, 95));
        assert_eq!(drain_ids(&mut q), [2, 4]);
    }

    #[test]
    fn full_since_is_set_when_full_and_cleared_at_half() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(OutboundConfig {
            batch_max_events: 1,
            ..small(4, 10_000)
        });
        for id in 1..=4 {
            let _ = q.push(ev(id, Prio::Normal, None, 10), t0);
        }
        assert_eq!(q.full_since(), None, "at the bound, not past it");
        let _ = q.push(ev(5, Prio::Normal, None, 10), t0 + ms(5));
        let _ = q.push(ev(6, Prio::Normal, None, 10), t0 + ms(9));
        assert_eq!(q.full_since(), Some(t0 + ms(5)));
        drain_ids(&mut q);
        assert_eq!(q.full_since(), Some(t0 + ms(5)), "3 of 4 is still full");
        drain_ids(&mut q);
        assert_eq!(q.full_since(), None);
    }

    #[test]
    fn one_oversized_delivery_does_not_make_the_queue_full() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10, 100));
        assert_eq!(q.push(ev(1, Prio::Low, None, 500), t0).fate, Fate::SlowConsumer);
        assert_eq!(q.full_since(), None);
        assert_eq!(q.push(ev(2, Prio::High, None, 500), t0).fate, Fate::Queued);
        assert_eq!(q.full_since(), None);
    }

    #[test]
    fn memory_of_a_burst_is_released_when_the_queue_drains() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(10_000, 1 << 30));
        assert_eq!(q.slots.capacity(), 0, "no allocation before use");
        for id in 0..5000 {
            let _ = q.push(ev(id + 1, Prio::Normal, Some(id), 8), t0);
        }
        drain_all(&mut q);
        assert!(q.slots.capacity() <= RETAINED_CAPACITY);
        assert!(q.keys.capacity() <= 2 * RETAINED_CAPACITY);
    }

    #[test]
    fn free_slots_are_reused() {
        let t0 = Instant::now();
        let mut q = OutboundQueue::new(small(4, 10_000));
        for id in 1..=1000 {
            let _ = q.push(ev(id, Prio::Normal, Some(id % 3), 10), t0);
            if id % 7 == 0 {
                drain_ids(&mut q);
            }
            q.check_structure();
        }
        assert!(q.slots.len() <= 5);
    }

    /// One step of the property test.
    #[derive(Debug, Clone)]
    enum Op {
        Push {
            prio: Prio,
            key: Option<u64>,
            size: usize,
            replayed: bool,
            durable: bool,
            after_ms: u64,
        },
        Drain,
        TakeDropped,
    }

    fn prio() -> impl Strategy<Value = Prio> {
        prop_oneof![
            Just(Prio::Low),
            Just(Prio::Normal),
            Just(Prio::High),
            Just(Prio::Critical)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let push = (
            prio(),
            proptest::option::weighted(0.6, 0..4u64),
            prop_oneof![9 => 8..64usize, 1 => 64..400usize],
            proptest::bool::weighted(0.15),
            proptest::bool::weighted(0.8),
            prop_oneof![3 => Just(0u64), 2 => 0..200u64],
        )
            .prop_map(|(prio, key, size, replayed, durable, after_ms)| Op::Push {
                prio,
                key,
                size,
                replayed,
                durable,
                after_ms,
            });
        prop_oneof![6 => push, 3 => Just(Op::Drain), 1 => Just(Op::TakeDropped)]
    }

    fn config() -> impl Strategy<Value = OutboundConfig> {
        (1..10usize, 16..400usize, 0..5usize, 8..200usize, 0..40u32, 0..8u32).prop_map(
            |(max_events, max_bytes, batch_max_events, batch_max_bytes, rate_per_s, burst)| OutboundConfig {
                max_events,
                max_bytes,
                batch_max_events,
                batch_max_bytes,
                rate_per_s,
                burst,
            },
        )
    }

    /// What the test knows of each pushed delivery.
    struct Pushed {
        prio: Prio,
        replayed: bool,
        /// Priority it was queued with (raised when it superseded a higher one).
        effective: Prio,
        fate: Fate,
    }

    /// What left the queue in one push, besides the delivery it superseded
    /// (`superseded`), was evicted: as many as reported, `low` and `normal`
    /// only, oldest first in each, `low` before `normal`, and a `low`
    /// newcomer displaced only `low` ones.
    fn check_evictions(
        before: Vec<(u64, Prio)>,
        q: &OutboundQueue,
        superseded: Option<u64>,
        out: &PushOutcome,
    ) -> Result<(), TestCaseError> {
        let after: HashSet<u64> = q.queued().iter().map(|&(id, _)| id).collect();
        let others: Vec<(u64, Prio)> = before.into_iter().filter(|&(id, _)| Some(id) != superseded).collect();
        let evicted: Vec<(u64, Prio)> = others.iter().copied().filter(|(id, _)| !after.contains(id)).collect();
        prop_assert_eq!(evicted.len(), out.evicted);
        prop_assert!(evicted.iter().all(|&(_, p)| p <= Prio::Normal), "evicted {:?}", evicted);
        for class in [Prio::Low, Prio::Normal] {
            let mut kept = others
                .iter()
                .filter(|&&(_, p)| p == class)
                .map(|(id, _)| after.contains(id));
            // Evicted ones (false) come first, then only kept ones (true).
            prop_assert!(
                kept.by_ref().find(|&k| k).is_none() || kept.all(|k| k),
                "eviction not oldest first"
            );
        }
        if evicted.iter().any(|&(_, p)| p == Prio::Normal) {
            prop_assert!(
                !others.iter().any(|&(id, p)| p == Prio::Low && after.contains(&id)),
                "a normal delivery evicted while a low one stayed"
            );
        }
        if out.evicted > 0 && q.entry(q.order.tail).d.prio == Prio::Low {
            prop_assert!(
                evicted.iter().all(|&(_, p)| p == Prio::Low),
                "a low delivery displaced a normal one"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn the_policy_holds_for_any_sequence(config in config(), ops in proptest::collection::vec(op(), 1..300)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut q = OutboundQueue::new(config);
            let mut pushed: Vec<Pushed> = Vec::new();
            let mut superseded: HashSet<u64> = HashSet::new();
            let mut drained: Vec<Delivery> = Vec::new();
            let mut reported = Dropped::default();
            let mut tokens_taken = 0u64;
            let mut evicted = 0u64;
            for op in ops {
                match op {
                    Op::Push { prio, key, size, replayed, durable, after_ms } => {
                        now += ms(after_ms);
                        let id = pushed.len() as u64 + 1;
                        let d = Delivery {
                            pos: durable.then_some(id),
                            replayed,
                            ..ev(id, prio, key, size)
                        };
                        let target = conflatable_key(&d)
                            .and_then(|k| q.keys.get(&k))
                            .map(|&slot| id_of(&q.entry(slot).d));
                        let was_empty = q.is_empty();
                        let before = q.queued();
                        let out = q.push(d, now);
                        check_evictions(before, &q, target, &out)?;
                        let bypass = prio == Prio::Critical || replayed;
                        let mut effective = prio;
                        match out.fate {
                            Fate::Replaced => {
                                let old = target.expect("replaced without a queued key");
                                let o = &pushed[old as usize - 1];
                                prop_assert!(!bypass && o.prio != Prio::Critical && !o.replayed);
                                effective = effective.max(o.effective);
                                superseded.insert(old);
                            }
                            Fate::RateLimited => {
                                prop_assert!(!bypass && target.is_none());
                                prop_assert_eq!(out.evicted, 0);
                            }
                            Fate::SlowConsumer => {
                                prop_assert!(prio <= Prio::Normal);
                                prop_assert_eq!(out.evicted, 0);
                            }
                            Fate::Queued => prop_assert!(target.is_none()),
                            Fate::Throttled => prop_assert!(false, "nothing here is throttled"),
                        }
                        if !bypass && target.is_none() && matches!(out.fate, Fate::Queued | Fate::SlowConsumer) {
                            tokens_taken += 1;
                        }
                        if was_empty && !q.is_empty() {
                            prop_assert!(out.wake);
                        }
                        evicted += out.evicted as u64;
                        pushed.push(Pushed { prio, replayed, effective, fate: out.fate });
                    }
                    Op::Drain => {
                        let before = (q.len(), drained.len());
                        let n = q.drain_batch(&mut drained);
                        prop_assert_eq!(n, drained.len() - before.1);
                        prop_assert!(n <= config.batch_max_events.max(1));
                        prop_assert_eq!(n == 0, before.0 == 0);
                        let bytes: usize = drained[before.1..].iter().map(|d| d.body.len()).sum();
                        prop_assert!(n <= 1 || bytes <= config.batch_max_bytes);
                        if q.len() <= config.max_events / 2 && q.bytes() <= config.max_bytes / 2 {
                            prop_assert_eq!(q.full_since(), None, "still full at half");
                        }
                    }
                    Op::TakeDropped => {
                        if let Some(d) = q.take_dropped() {
                            prop_assert!(!d.is_empty());
                            reported.rate_limited += d.rate_limited;
                            reported.slow_consumer += d.slow_consumer;
                        }
                        prop_assert_eq!(q.dropped_pending_since(), None);
                    }
                }
                q.check_structure();
                // Bounds hold, except by `high` and `critical` deliveries.
                prop_assert!(
                    (q.len() <= config.max_events && q.bytes() <= config.max_bytes) || q.droppable_len() == 0,
                    "over the bound with droppable deliveries queued"
                );
                // The token bucket: no more than the burst plus the rate since the start.
                if config.rate_per_s > 0 {
                    let allowed = u64::from(config.burst.max(1))
                        + (now - t0).as_millis() as u64 * u64::from(config.rate_per_s) / 1000;
                    prop_assert!(tokens_taken <= allowed + 1, "{} tokens, {} allowed", tokens_taken, allowed);
                }
            }
            let queued = q.len();
            drained.extend(drain_all(&mut q));
            if let Some(d) = q.take_dropped() {
                reported.rate_limited += d.rate_limited;
                reported.slow_consumer += d.slow_consumer;
            }
            prop_assert!(q.is_empty() && q.bytes() == 0 && q.full_since().is_none());

            // Conservation: every pushed delivery is drained, dropped, superseded or queued.
            let drained_before_end = drained.len() - queued;
            prop_assert_eq!(
                pushed.len() as u64,
                drained_before_end as u64 + q.total_rate_limited() + q.total_slow_consumer()
                    + q.total_conflated() + queued as u64
            );
            prop_assert_eq!(reported, Dropped {
                rate_limited: q.total_rate_limited(),
                slow_consumer: q.total_slow_consumer(),
            });
            let count = |f: Fate| pushed.iter().filter(|p| p.fate == f).count() as u64;
            prop_assert_eq!(count(Fate::RateLimited), q.total_rate_limited());
            prop_assert_eq!(count(Fate::SlowConsumer) + evicted, q.total_slow_consumer());
            prop_assert_eq!(count(Fate::Replaced), q.total_conflated());
            prop_assert_eq!(superseded.len() as u64, q.total_conflated());

            // Durable deliveries leave in strictly increasing `pos` order, each once.
            let mut last_pos = 0;
            for d in drained.iter().filter_map(|d| d.pos) {
                prop_assert!(d > last_pos, "pos {} after {}", d, last_pos);
                last_pos = d;
            }
            let delivered: HashSet<u64> = drained.iter().map(id_of).collect();
            prop_assert_eq!(delivered.len(), drained.len());
            let mut evicted_seen = 0;
            let mut by_id: HashMap<u64, &Pushed> = HashMap::new();
            for (i, p) in pushed.iter().enumerate() {
                let id = i as u64 + 1;
                by_id.insert(id, p);
                let queued = matches!(p.fate, Fate::Queued | Fate::Replaced);
                if !queued || delivered.contains(&id) {
                    prop_assert_eq!(queued, delivered.contains(&id));
                    continue;
                }
                if superseded.contains(&id) {
                    prop_assert!(p.prio != Prio::Critical && !p.replayed, "critical or replayed conflated");
                    continue;
                }
                // Queued, not delivered, not superseded: evicted for a slow consumer.
                prop_assert!(p.effective <= Prio::Normal, "a {:?} delivery was evicted", p.effective);
                evicted_seen += 1;
            }
            prop_assert_eq!(evicted_seen, evicted);
            for d in &drained {
                let p = by_id[&id_of(d)];
                prop_assert_eq!(d.prio, p.effective);
            }
            prop_assert!(pushed.iter().filter(|p| p.prio == Prio::Critical).all(|p| p.fate == Fate::Queued));
        }
    }
}
