//! Grouping one event's deliveries by user partition, for the match stage's
//! hand-off to the delivery stage (pure: no NATS, no clock).
//!
//! The match stage decides who gets an event and with which body (bodies
//! differ only by the matching subscription names and `fields`); this
//! groups those (user, body) pairs into one [`HandoffWriter`] per user
//! partition, each body carried once per partition. A [`Fanout`] may hold
//! several events before it is drained (live-only events are sent per
//! batch of events, durable ones per event).

use bytes::Bytes;
use switchyard_common::fanout::{user_partition, HandoffWriter};

/// A partition's message is cut (and a new one started, the event going on
/// in it) past this size: NATS' default max payload is 1 MiB.
pub const SPLIT_BYTES: usize = 512 * 1024;

/// Per-partition hand-off messages being built.
pub struct Fanout {
    partitions: u32,
    outs: Vec<PartitionOut>,
    /// Messages cut at [`SPLIT_BYTES`], in order, waiting for [`Fanout::drain`].
    cut: Vec<(u32, Bytes)>,
    /// Partitions with an open event.
    touched: Vec<u32>,
    event_ref: String,
    durable: bool,
}

#[derive(Default)]
struct PartitionOut {
    writer: HandoffWriter,
    open: bool,
    /// The open event's bodies in this partition: (variant, index in the message).
    local: Vec<(u32, u16)>,
    /// Messages of this partition handed out so far in the current drain.
    parts: u32,
}

impl Fanout {
    /// Builders for `partitions` user partitions.
    pub fn new(partitions: u32) -> Fanout {
        Fanout {
            partitions,
            outs: (0..partitions).map(|_| PartitionOut::default()).collect(),
            cut: Vec::new(),
            touched: Vec::new(),
            event_ref: String::new(),
            durable: false,
        }
    }

    /// Starts an event; partitions join it as their users are named.
    pub fn begin(&mut self, event_ref: &str, durable: bool) {
        debug_assert!(self.touched.is_empty(), "end the previous event first");
        self.event_ref.clear();
        self.event_ref.push_str(event_ref);
        self.durable = durable;
    }

    /// `user` gets body `variant` of the event (`body` is its bytes; the same
    /// variant must always come with the same bytes within one event).
    pub fn to_user(&mut self, user: &str, variant: u32, body: &[u8]) {
        let p = user_partition(user, self.partitions);
        let out = &mut self.outs[p as usize];
        if !out.open {
            out.writer.begin_event(&self.event_ref, self.durable, false);
            out.open = true;
            out.local.clear();
            self.touched.push(p);
        }
        let idx = match out.local.iter().find(|(v, _)| *v == variant) {
            Some(&(_, idx)) => idx,
            None if out.writer.has_body_room() => {
                let idx = out.writer.body(body);
                out.local.push((variant, idx));
                idx
            }
            // 65,535 distinct bodies in one partition: repeat the last one's
            // slot with fresh bytes is not possible, so start a new event
            // record for the rest (same event ref: the log's message ids
            // still name each user once).
            None => {
                out.writer.end_event();
                out.writer.begin_event(&self.event_ref, self.durable, false);
                out.local.clear();
                let idx = out.writer.body(body);
                out.local.push((variant, idx));
                idx
            }
        };
        out.writer.target(user, idx);
        if out.writer.len() >= SPLIT_BYTES {
            // Too big for one NATS message: this one ends here, the event
            // goes on in the next (its bodies carried again as needed).
            out.writer.end_event();
            self.cut.push((p, out.writer.take()));
            out.writer.begin_event(&self.event_ref, self.durable, false);
            out.local.clear();
        }
    }

    /// Every user of every partition gets `body` (a broadcast).
    pub fn to_all(&mut self, body: &[u8]) {
        for p in 0..self.partitions {
            let out = &mut self.outs[p as usize];
            debug_assert!(!out.open);
            out.writer.begin_event(&self.event_ref, self.durable, true);
            out.writer.body(body);
            out.open = true;
            self.touched.push(p);
        }
    }

    /// Closes the event in every partition it reached.
    pub fn end(&mut self) {
        for p in self.touched.drain(..) {
            let out = &mut self.outs[p as usize];
            out.writer.end_event();
            out.open = false;
        }
    }

    /// Bytes waiting in the largest partition message (or more than
    /// [`SPLIT_BYTES`] when messages were already cut).
    pub fn largest(&self) -> usize {
        if !self.cut.is_empty() {
            return usize::MAX;
        }
        self.outs.iter().map(|o| o.writer.len()).max().unwrap_or(0)
    }

    /// Takes every partition's messages that hold an event, a partition's
    /// in the order they were built, numbered from 0 per partition (a very
    /// wide event's later messages need message ids of their own).
    pub fn drain(&mut self, mut f: impl FnMut(u32, u32, Bytes)) {
        debug_assert!(self.touched.is_empty());
        for (p, msg) in self.cut.drain(..) {
            let out = &mut self.outs[p as usize];
            f(p, out.parts, msg);
            out.parts += 1;
        }
        for (p, out) in self.outs.iter_mut().enumerate() {
            if !out.writer.is_empty() {
                f(p as u32, out.parts, out.writer.take());
            }
            out.parts = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_common::fanout::HandoffReader;

    /// One decoded event: its ref, whether a broadcast, its bodies and targets.
    type Decoded = (String, bool, Vec<Bytes>, Vec<(String, u16)>);

    fn read(msg: &Bytes) -> Vec<Decoded> {
        let mut r = HandoffReader::new(msg).unwrap();
        let (mut bodies, mut targets) = (Vec::new(), Vec::new());
        let mut out = Vec::new();
        while let Some(e) = r.next_event(&mut bodies, &mut targets).unwrap() {
            out.push((
                e.event_ref.to_string(),
                e.broadcast,
                bodies.clone(),
                targets.iter().map(|(u, i)| (u.to_string(), *i)).collect(),
            ));
        }
        out
    }

    #[test]
    fn users_are_grouped_by_partition_with_each_body_once() {
        let mut f = Fanout::new(4);
        let users: Vec<String> = (0..40).map(|i| format!("user{i}")).collect();
        f.begin("st:1", true);
        for (i, u) in users.iter().enumerate() {
            let v = (i % 2) as u32;
            f.to_user(u, v, if v == 0 { b"even" } else { b"odd" });
        }
        f.end();
        let mut seen = Vec::new();
        f.drain(|p, _, msg| {
            let events = read(&msg);
            assert_eq!(events.len(), 1);
            let (r, broadcast, bodies, targets) = &events[0];
            assert_eq!(r, "st:1");
            assert!(!broadcast);
            assert!(bodies.len() <= 2, "each body once per partition: {bodies:?}");
            for (u, idx) in targets {
                assert_eq!(user_partition(u, 4), p);
                let i: usize = u[4..].parse().unwrap();
                let want: &[u8] = if i.is_multiple_of(2) { b"even" } else { b"odd" };
                assert_eq!(&bodies[*idx as usize][..], want);
                seen.push(u.clone());
            }
        });
        seen.sort();
        let mut all = users.clone();
        all.sort();
        assert_eq!(seen, all, "every user exactly once");
    }

    #[test]
    fn a_huge_event_is_cut_into_messages_below_the_limit_without_losing_anyone() {
        let mut f = Fanout::new(1);
        f.begin("st:2", true);
        let body = vec![b'x'; 1000];
        // Every user a body of its own: about 2 MiB for one partition.
        for i in 0..2000u32 {
            f.to_user(&format!("user{i}"), i, &body);
        }
        f.end();
        let mut msgs = Vec::new();
        f.drain(|_, part, m| msgs.push((part, m)));
        assert!(msgs.len() >= 4, "{} messages", msgs.len());
        let parts: Vec<u32> = msgs.iter().map(|(part, _)| *part).collect();
        assert_eq!(parts, (0..msgs.len() as u32).collect::<Vec<_>>(), "numbered in order");
        let mut seen = Vec::new();
        for (_, m) in &msgs {
            assert!(m.len() < SPLIT_BYTES + 2048, "{} bytes", m.len());
            for (r, _, bodies, targets) in read(m) {
                assert_eq!(r, "st:2");
                for (u, idx) in targets {
                    assert_eq!(bodies[idx as usize].len(), 1000);
                    seen.push(u);
                }
            }
        }
        assert_eq!(seen.len(), 2000);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 2000, "everyone once");
    }

    #[test]
    fn broadcasts_reach_every_partition_and_events_accumulate_until_drained() {
        let mut f = Fanout::new(3);
        f.begin("a", false);
        f.to_all(b"hello");
        f.end();
        f.begin("b", false);
        f.to_user("alice", 0, b"x");
        f.end();
        let mut got = Vec::new();
        f.drain(|p, _, msg| got.push((p, read(&msg))));
        assert_eq!(got.len(), 3);
        let alice = user_partition("alice", 3);
        for (p, events) in got {
            assert_eq!(events[0].0, "a");
            assert!(events[0].1);
            assert_eq!(events.len(), if p == alice { 2 } else { 1 });
        }
        let mut again = 0;
        f.drain(|_, _, _| again += 1);
        assert_eq!(again, 0, "drained messages are gone");
    }
}
