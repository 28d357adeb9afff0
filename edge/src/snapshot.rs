//! Keeping a snapshot in order with live events (pure: no I/O, clock
//! passed in).
//!
//! A `subscribe` with `snapshot: true` gets, per matching key, that key's
//! latest event from the router tier; the new subscription's live events
//! may reach the connection before that answer does. A snapshot entry must
//! never land after a live event of its key, or the client would end with
//! an older value. So, from before the subscribe is sent until its
//! snapshot arrives, the connection notes the keys of the live events that
//! name the new subscription, and drops the snapshot entries of those keys.
//!
//! Why the live event is at least as new as the entry it replaces: it
//! matched the new subscription, so its router matched it after the
//! subscription was written; an event of the same key stored as the latest
//! before it was matched earlier (same key, same partition, in order), and
//! the snapshot is read after the subscription was written
//! (`switchyard_router::latest`), so the entry is that event or an older one.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_bytes::ByteBuf;
use switchyard_common::delivery::body_has_sub;

/// A snapshot not answered within this long is given up (its router went
/// away): the watch stops noting keys.
const WATCH_FOR: Duration = Duration::from_secs(30);
/// Most keys one watch notes; past it, the snapshot is dropped whole rather
/// than risk an entry older than a live event.
const MAX_KEYS: usize = 100_000;

/// The router's snapshot bodies as the connection queues them.
pub fn bodies(from_router: Vec<ByteBuf>) -> Vec<Bytes> {
    from_router.into_iter().map(|b| Bytes::from(b.into_vec())).collect()
}

/// The snapshots a connection waits for (usually none or one).
#[derive(Debug, Default)]
pub struct SnapshotWatches {
    watches: Vec<Watch>,
}

#[derive(Debug)]
struct Watch {
    sub: Box<str>,
    since: Instant,
    keys: HashSet<u64>,
    overflowed: bool,
}

impl SnapshotWatches {
    /// Starts noting the live keys of subscription `sub` (replacing an
    /// earlier watch of the same name).
    pub fn begin(&mut self, sub: &str, now: Instant) {
        self.expire(now);
        self.watches.retain(|w| &*w.sub != sub);
        self.watches.push(Watch {
            sub: sub.into(),
            since: now,
            keys: HashSet::new(),
            overflowed: false,
        });
    }

    /// Notes a live delivery (its conflation key and body).
    pub fn observe(&mut self, key: Option<u64>, body: &[u8], now: Instant) {
        let Some(key) = key else { return };
        self.expire(now);
        for w in &mut self.watches {
            if !w.overflowed && body_has_sub(body, &w.sub) {
                if w.keys.len() >= MAX_KEYS {
                    w.overflowed = true;
                    w.keys = HashSet::new();
                } else {
                    w.keys.insert(key);
                }
            }
        }
    }

    /// Ends the watch of `sub`: the entries (with their conflation keys)
    /// that may still be sent. Without a watch (given up, or never begun)
    /// nothing is sent: the order could not be kept.
    pub fn finish<'a>(&mut self, sub: &str, entries: impl IntoIterator<Item = (Option<u64>, &'a Bytes)>) -> Vec<Bytes> {
        let Some(at) = self.watches.iter().position(|w| &*w.sub == sub) else {
            return Vec::new();
        };
        let w = self.watches.swap_remove(at);
        if w.overflowed {
            return Vec::new();
        }
        entries
            .into_iter()
            .filter(|(key, _)| key.is_some_and(|k| !w.keys.contains(&k)))
            .map(|(_, body)| body.clone())
            .collect()
    }

    /// Whether no watch is open (the queue can drop this).
    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        self.watches
            .retain(|w| now.saturating_duration_since(w.since) < WATCH_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_common::delivery::encode_delivery;
    use switchyard_common::event::{Prio, ProducerEvent, Target};

    fn body(subs: &[&str]) -> Bytes {
        let ev = ProducerEvent {
            event_type: "tick".into(),
            data: Bytes::from_static(&[0x01]),
            id: None,
            target: Target::All,
            prio: Prio::Normal,
            key: Some("k".into()),
            durable: false,
        };
        let mut out = Vec::new();
        encode_delivery(&ev, 1, subs, &ev.data, &mut out);
        Bytes::from(out)
    }

    #[test]
    fn entries_of_keys_seen_live_for_the_new_subscription_are_dropped() {
        let t0 = Instant::now();
        let mut w = SnapshotWatches::default();
        w.begin("watch", t0);
        w.observe(Some(1), &body(&["watch"]), t0);
        // Another subscription's event of key 2 says nothing about "watch".
        w.observe(Some(2), &body(&["other"]), t0);
        w.observe(None, &body(&["watch"]), t0);
        let entries = [body(&["watch"]), body(&["watch"]), body(&["watch"])];
        let sent = w.finish(
            "watch",
            [(Some(1), &entries[0]), (Some(2), &entries[1]), (Some(3), &entries[2])],
        );
        assert_eq!(sent.len(), 2, "key 1 was seen live");
        assert!(w.is_empty());
    }

    #[test]
    fn without_a_watch_nothing_is_sent() {
        let t0 = Instant::now();
        let mut w = SnapshotWatches::default();
        let entry = body(&["watch"]);
        assert!(w.finish("watch", [(Some(1), &entry)]).is_empty());
        w.begin("watch", t0);
        w.observe(Some(9), &body(&["watch"]), t0 + WATCH_FOR);
        assert!(w.is_empty(), "given up after {WATCH_FOR:?}");
        assert!(w.finish("watch", [(Some(1), &entry)]).is_empty());
    }

    #[test]
    fn watches_of_two_subscriptions_are_separate() {
        let t0 = Instant::now();
        let mut w = SnapshotWatches::default();
        w.begin("a", t0);
        w.begin("b", t0);
        w.observe(Some(1), &body(&["a"]), t0);
        let entry = body(&["b"]);
        assert_eq!(w.finish("b", [(Some(1), &entry)]).len(), 1);
        assert_eq!(w.finish("a", [(Some(1), &entry)]).len(), 0);
    }
}
