//! Per-connection throttling of keyed events (docs/PROTOCOL.md,
//! "Throttling"): per (`type`, `key`), at most one delivery every
//! `throttle_ms`; a newer delivery of the key replaces the one waiting, and
//! the waiting one goes when its interval has passed.
//!
//! Pure policy with the clock passed in, used by [`crate::outbound`] (which
//! decides what is throttled at all: the router marks a delivery with its
//! effective throttle, and `critical` and replayed deliveries never are). It
//! must not do I/O, take locks or start timers: the connection's writer
//! sleeps until [`Throttle::next_due`] (one deadline per connection, never a
//! timer per message; [`sleep_until`]) and then calls
//! [`Throttle::release_due`]. Precision: a waiting delivery goes within
//! about a millisecond of its due time (tokio's timer) when the writer is
//! idle, and at the latest when the socket has taken what it was writing.
//!
//! A table exists only for a connection that has received a throttled
//! delivery, and it is dropped again once every key's interval has run out
//! with nothing waiting ([`Throttle::is_expired`]), so other connections
//! pay nothing.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use crate::outbound::{Delivery, KeyHasher};

/// Slots kept before the first sweep of expired ones; a sweep happens when
/// the table has doubled since the last one, so it is O(1) per delivery.
const FIRST_SWEEP_AT: usize = 64;

/// One key's state: when a delivery of it last went on, and the one waiting.
#[derive(Debug)]
struct Slot {
    /// When the last delivery of the key was let through.
    sent_at: Instant,
    /// The key's interval (from the latest delivery's `throttle_ms`).
    interval: Duration,
    /// The delivery waiting for the interval, with its arrival number.
    waiting: Option<(u64, Delivery)>,
}

impl Slot {
    fn due(&self) -> Instant {
        self.sent_at + self.interval
    }
}

/// What [`Throttle::offer`] did with a delivery.
#[derive(Debug)]
pub enum Offer {
    /// Let through now: queue it.
    Pass(Delivery),
    /// Kept waiting (replacing the one that waited, if `merged`).
    Held {
        /// A waiting delivery of the same key was replaced (merged away).
        merged: bool,
    },
}

/// The throttle table of one connection.
#[derive(Debug)]
pub struct Throttle {
    /// Conflation key (hash of `type` and `key`) → slot.
    slots: HashMap<u64, Slot, BuildHasherDefault<KeyHasher>>,
    /// (due, arrival, key) of every waiting delivery; entries whose slot no
    /// longer waits with that arrival number are stale and skipped.
    due: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    /// Arrival numbers, so deliveries released together go in arrival order.
    arrivals: u64,
    /// Deliveries waiting now.
    waiting: usize,
    /// When every slot will have expired (the latest `sent_at + interval`).
    expires_at: Instant,
    /// Sweep expired slots when the table reaches this size.
    sweep_at: usize,
    /// Scratch for [`Throttle::release_due`], kept between calls.
    released: Vec<(u64, Delivery)>,
}

impl Throttle {
    /// An empty table.
    pub fn new(now: Instant) -> Throttle {
        Throttle {
            slots: HashMap::default(),
            due: BinaryHeap::new(),
            arrivals: 0,
            waiting: 0,
            expires_at: now,
            sweep_at: FIRST_SWEEP_AT,
            released: Vec::new(),
        }
    }

    /// Offers a throttled delivery with conflation key `key` at `now`.
    pub fn offer(&mut self, d: Delivery, key: u64, throttle_ms: NonZeroU32, now: Instant) -> Offer {
        let interval = Duration::from_millis(u64::from(throttle_ms.get()));
        if self.slots.len() >= self.sweep_at && !self.slots.contains_key(&key) {
            self.sweep(now);
        }
        let Some(slot) = self.slots.get_mut(&key) else {
            self.slots.insert(
                key,
                Slot {
                    sent_at: now,
                    interval,
                    waiting: None,
                },
            );
            self.expires_at = self.expires_at.max(now + interval);
            return Offer::Pass(d);
        };
        slot.interval = interval;
        let due = slot.due();
        if slot.waiting.is_none() && now >= due {
            slot.sent_at = now;
            self.expires_at = self.expires_at.max(now + interval);
            return Offer::Pass(d);
        }
        // Something went within the interval (or waits already): this one
        // waits, replacing the older one. A waiting one that is already due
        // is released by the caller before it offers more, so `due` is ahead.
        self.arrivals += 1;
        let merged = slot.waiting.replace((self.arrivals, d)).is_some();
        if !merged {
            self.waiting += 1;
        }
        self.due.push(Reverse((due, self.arrivals, key)));
        Offer::Held { merged }
    }

    /// A delivery of `key` that is not throttled is about to be queued (an
    /// unthrottled match, a `critical` or a replayed one). A waiting
    /// delivery older than it would be stale after it, so it is dropped:
    /// every live delivery is newer than one that waits; a replayed one is
    /// when its `pos` is at least the waiting one's. Whether one was dropped.
    pub fn supersede(&mut self, key: u64, d: &Delivery) -> bool {
        let Some(slot) = self.slots.get_mut(&key) else {
            return false;
        };
        let older = match &slot.waiting {
            None => false,
            Some((_, w)) if d.replayed => matches!((w.pos, d.pos), (Some(w), Some(r)) if w <= r),
            Some(_) => true,
        };
        if older {
            slot.waiting = None;
            self.waiting -= 1;
        }
        older
    }

    /// When the table next needs the caller: the earliest waiting
    /// delivery's due time, or, with nothing waiting, when every key's
    /// interval has run out (the table can then be dropped).
    pub fn next_due(&self) -> Instant {
        match self.due.peek() {
            Some(Reverse((due, _, _))) if self.waiting > 0 => *due,
            _ => self.expires_at,
        }
    }

    /// Hands the waiting deliveries whose interval has passed at `now` to
    /// `out`, in the order they arrived; each key's interval restarts.
    pub fn release_due(&mut self, now: Instant, mut out: impl FnMut(Delivery)) {
        let mut released = std::mem::take(&mut self.released);
        while let Some(&Reverse((due, arrival, key))) = self.due.peek() {
            if due > now {
                break;
            }
            self.due.pop();
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            if !matches!(&slot.waiting, Some((a, _)) if *a == arrival) {
                // Replaced (a newer entry exists) or superseded: stale.
                continue;
            }
            if let Some((a, mut d)) = slot.waiting.take() {
                // It may now follow a delivery with a higher `pos`: the
                // writer then sends it without its `pos` (see
                // crate::outbound::Delivery::throttle_released).
                d.throttle_released = true;
                let w = (a, d);
                slot.sent_at = now;
                self.expires_at = self.expires_at.max(now + slot.interval);
                self.waiting -= 1;
                released.push(w);
            }
        }
        if self.waiting == 0 {
            self.due.clear();
        }
        released.sort_unstable_by_key(|(a, _)| *a);
        for (_, d) in released.drain(..) {
            out(d);
        }
        self.released = released;
    }

    /// Whether nothing waits and every key's interval has run out at
    /// `now`: the table holds nothing that changes what happens next.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.waiting == 0 && now >= self.expires_at
    }

    /// Deliveries waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Removes slots whose interval ran out with nothing waiting (a new
    /// delivery of such a key would pass anyway), so the table stays as
    /// large as the keys active within their interval.
    fn sweep(&mut self, now: Instant) {
        self.slots.retain(|_, s| s.waiting.is_some() || s.due() > now);
        self.sweep_at = (self.slots.len() * 2).max(FIRST_SWEEP_AT);
    }
}

/// Sleeps until `due`, or forever without one: the writer's one throttle
/// deadline, created only when the connection has a throttle table.
pub async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use switchyard_common::event::Prio;

    use super::*;

    fn ev(id: u64, pos: Option<u64>) -> Delivery {
        Delivery {
            body: Bytes::from(id.to_le_bytes().to_vec()),
            pos,
            prio: Prio::Normal,
            conflation_key: Some(1),
            replayed: false,
            throttle_ms: NonZeroU32::new(100),
            throttle_released: false,
        }
    }

    fn id(d: &Delivery) -> u64 {
        u64::from_le_bytes(d.body[..8].try_into().unwrap())
    }

    const MS100: NonZeroU32 = NonZeroU32::new(100).unwrap();

    #[test]
    fn first_passes_then_latest_waits_and_goes_when_due() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        assert!(matches!(t.offer(ev(1, None), 7, MS100, t0), Offer::Pass(_)));
        assert!(matches!(
            t.offer(ev(2, None), 7, MS100, t0 + Duration::from_millis(10)),
            Offer::Held { merged: false }
        ));
        assert!(matches!(
            t.offer(ev(3, None), 7, MS100, t0 + Duration::from_millis(20)),
            Offer::Held { merged: true }
        ));
        assert_eq!(t.next_due(), t0 + Duration::from_millis(100));
        let mut out = Vec::new();
        t.release_due(t0 + Duration::from_millis(99), |d| out.push(d));
        assert!(out.is_empty(), "not before the interval");
        t.release_due(t0 + Duration::from_millis(100), |d| out.push(d));
        assert_eq!(out.iter().map(id).collect::<Vec<_>>(), [3], "the latest only");
        assert!(out[0].throttle_released);
        // The interval restarts at the release.
        assert!(matches!(
            t.offer(ev(4, None), 7, MS100, t0 + Duration::from_millis(150)),
            Offer::Held { .. }
        ));
        assert_eq!(t.next_due(), t0 + Duration::from_millis(200));
        assert!(!t.is_expired(t0 + Duration::from_millis(500)));
        out.clear();
        t.release_due(t0 + Duration::from_millis(200), |d| out.push(d));
        assert_eq!(out.iter().map(id).collect::<Vec<_>>(), [4]);
        assert_eq!(t.next_due(), t0 + Duration::from_millis(300));
        assert!(t.is_expired(t0 + Duration::from_millis(300)));
    }

    #[test]
    fn keys_are_independent_and_released_in_arrival_order() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        assert!(matches!(t.offer(ev(1, None), 1, MS100, t0), Offer::Pass(_)));
        let t5 = t0 + Duration::from_millis(5);
        assert!(matches!(t.offer(ev(2, None), 2, MS100, t5), Offer::Pass(_)));
        let t10 = t0 + Duration::from_millis(10);
        assert!(matches!(t.offer(ev(3, None), 2, MS100, t10), Offer::Held { .. }));
        assert!(matches!(t.offer(ev(4, None), 1, MS100, t10), Offer::Held { .. }));
        let mut out = Vec::new();
        t.release_due(t0 + Duration::from_millis(105), |d| out.push(d));
        assert_eq!(out.iter().map(id).collect::<Vec<_>>(), [3, 4], "arrival order");
    }

    #[test]
    fn a_newer_unthrottled_or_replayed_delivery_drops_the_waiting_one() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        let _ = t.offer(ev(1, Some(1)), 7, MS100, t0);
        let _ = t.offer(ev(2, Some(5)), 7, MS100, t0);
        let mut replay = ev(9, Some(4));
        replay.replayed = true;
        assert!(!t.supersede(7, &replay), "an older replayed one leaves it");
        replay.pos = Some(5);
        assert!(
            t.supersede(7, &replay),
            "the same pos replayed: the waiting one is a duplicate"
        );
        assert_eq!(t.waiting(), 0);
        let _ = t.offer(ev(3, Some(6)), 7, MS100, t0);
        assert!(t.supersede(7, &ev(10, Some(7))), "a live one is newer");
        assert!(!t.supersede(8, &ev(10, Some(7))), "another key");
        let mut out = Vec::new();
        t.release_due(t0 + Duration::from_secs(1), |d| out.push(d));
        assert!(out.is_empty());
    }

    #[test]
    fn expired_keys_are_swept_as_the_table_grows() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        for k in 0..1000u64 {
            let now = t0 + Duration::from_millis(k * 10);
            assert!(matches!(t.offer(ev(k, None), k, MS100, now), Offer::Pass(_)));
        }
        assert!(t.slots.len() < 2 * FIRST_SWEEP_AT, "{} slots", t.slots.len());
    }
}
