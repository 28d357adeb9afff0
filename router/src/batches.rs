//! Live batches per edge, being built by a delivery worker (pure: no NATS).
//!
//! Each delivery goes to every edge holding its user (or, for a broadcast,
//! every edge holding any of the partition's users); each edge's batch
//! carries a body once per event, and is cut before it grows past the
//! limit (NATS refuses messages over its max payload), the delivery that
//! did not fit starting the next batch with its body again. Batches come
//! out per edge in the order they were built.

use bytes::Bytes;
use switchyard_common::fanout::EdgeBatchWriter;

use crate::presence::{EdgeSlot, Presence};

/// Most bytes one item adds to an edge batch (tag, body index, position, user id).
pub const ITEM_BYTES: usize = 1 + 2 + 9 + 1 + 255;

/// One delivery to route.
#[derive(Debug, Clone, Copy)]
pub struct Routed<'a> {
    /// The user, or `None` for the partition's broadcast.
    pub to: Option<&'a str>,
    /// Which event (bodies are shared within one event only).
    pub event: u64,
    /// Which of the event's bodies.
    pub body_no: u16,
    /// The body's bytes.
    pub body: &'a [u8],
    /// The log position, for durable deliveries.
    pub pos: Option<u64>,
}

/// An edge's batch being built, with the bodies it already carries.
#[derive(Default)]
struct EdgeOut {
    writer: Option<EdgeBatchWriter>,
    /// (event, body number) → index in the batch, for the last few bodies.
    recent: Vec<(u64, u16, u16)>,
}

/// The batches of one delivery partition, one per edge slot.
pub struct EdgeBatches {
    partition: u32,
    limit: usize,
    outs: Vec<EdgeOut>,
    /// Batches cut at the limit, in order, waiting to be sent.
    full: Vec<(EdgeSlot, Bytes)>,
    /// Deliveries routed since the last [`EdgeBatches::take_all`].
    routed: u64,
}

impl EdgeBatches {
    /// Batches for user partition `partition`, each cut below `limit` bytes.
    pub fn new(partition: u32, limit: usize) -> EdgeBatches {
        EdgeBatches {
            partition,
            limit,
            outs: Vec::new(),
            full: Vec::new(),
            routed: 0,
        }
    }

    /// Adds one delivery to the batch of every edge that should get it.
    pub fn route(&mut self, presence: &Presence, d: Routed<'_>) {
        match d.to {
            Some(user) => {
                for &slot in presence.edges_of(user) {
                    self.add(slot, d);
                }
            }
            None => {
                for slot in presence.edges_with_users() {
                    self.add(slot, d);
                }
            }
        }
    }

    fn add(&mut self, slot: EdgeSlot, d: Routed<'_>) {
        let i = slot as usize;
        if self.outs.len() <= i {
            self.outs.resize_with(i + 1, EdgeOut::default);
        }
        let partition = self.partition;
        let out = &mut self.outs[i];
        let writer = out.writer.get_or_insert_with(|| EdgeBatchWriter::new(partition));
        let mut known = out
            .recent
            .iter()
            .find(|(e, b, _)| *e == d.event && *b == d.body_no)
            .map(|&(_, _, idx)| idx);
        let adds = ITEM_BYTES + if known.is_some() { 0 } else { d.body.len() };
        if !writer.is_empty() && writer.len() + adds > self.limit {
            // Full: this batch goes as it is; the delivery starts the next
            // (with its body again).
            self.full.push((slot, writer.take(partition)));
            out.recent.clear();
            known = None;
        }
        let idx = match known {
            Some(idx) => idx,
            None => {
                let idx = writer.body(d.body);
                if out.recent.len() >= 8 {
                    out.recent.remove(0);
                }
                out.recent.push((d.event, d.body_no, idx));
                idx
            }
        };
        match d.to {
            Some(user) => writer.user(user, idx, d.pos),
            None => writer.broadcast(idx, d.pos),
        }
        self.routed += 1;
    }

    /// Takes every batch with something in it, per edge in the order they
    /// were built, and how many deliveries they hold in all.
    pub fn take_all(&mut self) -> (Vec<(EdgeSlot, Bytes)>, u64) {
        let mut out = std::mem::take(&mut self.full);
        for (slot, o) in self.outs.iter_mut().enumerate() {
            if let Some(w) = o.writer.as_mut() {
                if !w.is_empty() {
                    out.push((slot as EdgeSlot, w.take(self.partition)));
                    o.recent.clear();
                }
            }
        }
        (out, std::mem::take(&mut self.routed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_common::fanout::{decode_edge_message, EdgeMessage, FanoutError, PresenceUpdate, Recipient};

    fn presence(edges: &[(&str, &[&str])]) -> Presence {
        let mut p = Presence::new();
        for (edge, users) in edges {
            let update = PresenceUpdate {
                edge: edge.to_string(),
                full: true,
                part: 0,
                more: false,
                users: users.iter().map(|u| (u.to_string(), true)).collect(),
            };
            p.apply(&update, |id| format!("sy.edge.{id}"), false);
        }
        p
    }

    /// One item read back: recipient (`None`: the partition), body, pos.
    type Item = (Option<String>, Bytes, Option<u64>);

    /// Every item in a batch.
    fn items(batch: &Bytes) -> Result<Vec<Item>, FanoutError> {
        let EdgeMessage::Deliveries { mut items, .. } = decode_edge_message(batch)? else {
            panic!("not a batch");
        };
        let mut bodies = Vec::new();
        let mut out = Vec::new();
        while let Some(item) = items.next_item(&mut bodies)? {
            let to = match item.to {
                Recipient::User(u) => Some(u.to_string()),
                Recipient::Partition => None,
            };
            out.push((to, bodies[item.body as usize].clone(), item.pos));
        }
        Ok(out)
    }

    #[test]
    fn each_edge_gets_its_users_and_broadcasts_with_each_body_once() {
        let p = presence(&[("e1", &["alice", "bob"]), ("e2", &["alice"])]);
        let mut b = EdgeBatches::new(3, 512 * 1024);
        let body = b"tick";
        for (user, pos) in [("alice", 10), ("bob", 11), ("carol", 12)] {
            b.route(
                &p,
                Routed {
                    to: Some(user),
                    event: 1,
                    body_no: 0,
                    body,
                    pos: Some(pos),
                },
            );
        }
        b.route(
            &p,
            Routed {
                to: None,
                event: 2,
                body_no: 0,
                body: b"news",
                pos: None,
            },
        );
        let (batches, routed) = b.take_all();
        assert_eq!(
            routed,
            2 + 1 + 2,
            "alice twice (two edges), bob once, carol nowhere, the broadcast per edge"
        );
        assert_eq!(batches.len(), 2);
        for (slot, batch) in &batches {
            let got = items(batch).unwrap();
            let edge = p.edge_id(*slot).unwrap();
            let users: Vec<_> = got.iter().map(|(u, _, _)| u.clone()).collect();
            match edge {
                "e1" => assert_eq!(users, [Some("alice".into()), Some("bob".into()), None]),
                _ => assert_eq!(users, [Some("alice".into()), None]),
            }
            // The tick's body is carried once per batch.
            assert!(batch.windows(4).filter(|w| w == b"tick").count() == 1, "{edge}");
        }
        assert!(b.take_all().0.is_empty(), "taken batches are gone");
    }

    #[test]
    fn a_batch_is_cut_before_the_limit_and_nothing_is_lost_or_reordered() {
        let users: Vec<String> = (0..400).map(|i| format!("user{i}")).collect();
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let p = presence(&[("e1", &refs)]);
        let limit = 8 * 1024;
        let mut b = EdgeBatches::new(0, limit);
        let body = vec![b'x'; 1500];
        // One event for everyone (one body, many items), then a few events with bodies of their own.
        let mut pos = 0;
        for u in &users {
            pos += 1;
            b.route(
                &p,
                Routed {
                    to: Some(u),
                    event: 1,
                    body_no: 0,
                    body: &body,
                    pos: Some(pos),
                },
            );
        }
        for e in 2..12 {
            pos += 1;
            b.route(
                &p,
                Routed {
                    to: Some("user7"),
                    event: e,
                    body_no: 0,
                    body: &body,
                    pos: Some(pos),
                },
            );
        }
        let (batches, routed) = b.take_all();
        assert_eq!(routed, 410);
        assert!(batches.len() > 2, "{} batches", batches.len());
        let mut positions = Vec::new();
        for (_, batch) in &batches {
            assert!(batch.len() <= limit, "{} bytes over {limit}", batch.len());
            for (_, body, p) in items(batch).unwrap() {
                assert_eq!(body.len(), 1500, "every item finds its body in its own batch");
                positions.push(p.unwrap());
            }
        }
        assert_eq!(positions, (1..=410).collect::<Vec<u64>>(), "all of them, in order");
    }
}
