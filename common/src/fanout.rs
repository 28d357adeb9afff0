//! The router tier's own messages on NATS: the match stage's hand-off of
//! one event's targets to a delivery partition, a delivery partition's live
//! batch for one edge, and the presence messages edges send to delivery
//! partitions.
//!
//! The two hot formats are a small binary layout rather than MessagePack
//! maps: they carry many users and bodies per message, are read by our own
//! code only, and decode without copying (bodies are [`Bytes`] slices of the
//! received payload). Integers are big-endian. Each message starts with a
//! magic byte and a version, so a stray message is refused, not misread.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The user partition of `user`: a stable hash (FNV-1a, 64-bit) of the id
/// modulo `partitions`. Routers and edges must agree on it, so it lives here.
pub fn user_partition(user: &str, partitions: u32) -> u32 {
    let h = crate::hash::fnv1a(user.as_bytes());
    (h % u64::from(partitions.max(1))) as u32
}

/// Why an internal message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FanoutError {
    /// Not one of our messages, or a version we do not speak.
    #[error("unknown message kind or version")]
    Magic,
    /// The message ends inside a field.
    #[error("message truncated")]
    Truncated,
    /// A user id or name is not UTF-8.
    #[error("name is not UTF-8")]
    Utf8,
    /// An item names a body that was not sent before it.
    #[error("item refers to body {0}, which is not in the message")]
    BodyIndex(usize),
    /// An entry tag that this version does not define.
    #[error("unknown entry tag {0}")]
    Tag(u8),
}

const HANDOFF_MAGIC: [u8; 2] = [b'H', 1];
const EDGE_MAGIC: [u8; 2] = [b'E', 1];

const ENTRY_BODY: u8 = 0;
const ENTRY_USER: u8 = 1;
const ENTRY_BROADCAST: u8 = 2;
const ENTRY_END: u8 = 0xff;

const FLAG_DURABLE: u8 = 1;
const FLAG_BROADCAST: u8 = 2;
const FLAG_POS: u8 = 1;

const KIND_DELIVERIES: u8 = 1;
const KIND_SYNC: u8 = 2;

/// Most bodies one message may carry (body indexes are 16-bit).
pub const MAX_BODIES: usize = u16::MAX as usize;

/// Reads big-endian fields from a payload, slicing bodies out of it.
struct Cursor<'a> {
    payload: &'a Bytes,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FanoutError> {
        let bytes: &'a [u8] = &self.payload[..];
        let end = self.at.checked_add(n).ok_or(FanoutError::Truncated)?;
        let out = bytes.get(self.at..end).ok_or(FanoutError::Truncated)?;
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FanoutError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FanoutError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FanoutError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FanoutError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn str8(&mut self) -> Result<&'a str, FanoutError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| FanoutError::Utf8)
    }

    fn str16(&mut self) -> Result<&'a str, FanoutError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| FanoutError::Utf8)
    }

    fn body(&mut self) -> Result<Bytes, FanoutError> {
        let n = self.u32()? as usize;
        let start = self.at;
        self.take(n)?;
        Ok(self.payload.slice(start..start + n))
    }

    fn done(&self) -> bool {
        self.at >= self.payload.len()
    }
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u8::MAX as usize, "user ids are at most 64 bytes");
    out.push(s.len().min(255) as u8);
    out.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
}

fn put_body(out: &mut Vec<u8>, body: &[u8]) {
    out.push(ENTRY_BODY);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

// ---------------------------------------------------------------- hand-off

/// Builds one hand-off message: the targets of one or more events that fall
/// in one user partition, each event's bodies carried once.
#[derive(Debug, Default)]
pub struct HandoffWriter {
    buf: Vec<u8>,
    events: usize,
    /// Bodies written in the open event.
    bodies: usize,
    open: bool,
}

impl HandoffWriter {
    /// An empty message.
    pub fn new() -> HandoffWriter {
        HandoffWriter::default()
    }

    /// Starts an event. `event_ref` names it in the delivery log's message
    /// ids (at most 65,535 bytes); `durable` events are stored per user.
    pub fn begin_event(&mut self, event_ref: &str, durable: bool, broadcast: bool) {
        debug_assert!(!self.open, "finish the previous event first");
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&HANDOFF_MAGIC);
        }
        let r = &event_ref.as_bytes()[..event_ref.len().min(u16::MAX as usize)];
        self.buf.extend_from_slice(&(r.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(r);
        let mut flags = 0;
        if durable {
            flags |= FLAG_DURABLE;
        }
        if broadcast {
            flags |= FLAG_BROADCAST;
        }
        self.buf.push(flags);
        self.bodies = 0;
        self.open = true;
    }

    /// Adds a body to the open event; returns its index for [`HandoffWriter::target`].
    pub fn body(&mut self, body: &[u8]) -> u16 {
        put_body(&mut self.buf, body);
        self.bodies += 1;
        (self.bodies - 1) as u16
    }

    /// Whether the open event has room for another body.
    pub fn has_body_room(&self) -> bool {
        self.bodies < MAX_BODIES
    }

    /// Names a user who gets body `body` of the open event.
    pub fn target(&mut self, user: &str, body: u16) {
        debug_assert!((body as usize) < self.bodies);
        self.buf.push(ENTRY_USER);
        self.buf.extend_from_slice(&body.to_be_bytes());
        put_str8(&mut self.buf, user);
    }

    /// Closes the open event.
    pub fn end_event(&mut self) {
        debug_assert!(self.open);
        self.buf.push(ENTRY_END);
        self.events += 1;
        self.open = false;
    }

    /// Events in the message.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no event was written.
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Takes the message, leaving the writer empty (its buffer's capacity is
    /// not kept: the message goes to NATS as it is).
    pub fn take(&mut self) -> Bytes {
        debug_assert!(!self.open);
        self.events = 0;
        Bytes::from(std::mem::take(&mut self.buf))
    }
}

/// The header of one event in a hand-off message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffEvent<'a> {
    /// Names the event in the delivery log's message ids.
    pub event_ref: &'a str,
    /// Stored per user in the delivery log.
    pub durable: bool,
    /// For every user of the partition (body 0), not for named users.
    pub broadcast: bool,
}

/// Reads the events of a hand-off message one at a time.
pub struct HandoffReader<'a> {
    cur: Cursor<'a>,
}

impl<'a> HandoffReader<'a> {
    /// Checks the header.
    pub fn new(payload: &'a Bytes) -> Result<HandoffReader<'a>, FanoutError> {
        let mut cur = Cursor { payload, at: 0 };
        if cur.take(2)? != HANDOFF_MAGIC {
            return Err(FanoutError::Magic);
        }
        Ok(HandoffReader { cur })
    }

    /// The next event, its bodies into `bodies` and its targets (user, body
    /// index) into `targets` (both cleared first); `None` at the end.
    pub fn next_event(
        &mut self,
        bodies: &mut Vec<Bytes>,
        targets: &mut Vec<(&'a str, u16)>,
    ) -> Result<Option<HandoffEvent<'a>>, FanoutError> {
        bodies.clear();
        targets.clear();
        if self.cur.done() {
            return Ok(None);
        }
        let event_ref = self.cur.str16()?;
        let flags = self.cur.u8()?;
        loop {
            match self.cur.u8()? {
                ENTRY_BODY => bodies.push(self.cur.body()?),
                ENTRY_USER => {
                    let idx = self.cur.u16()?;
                    if idx as usize >= bodies.len() {
                        return Err(FanoutError::BodyIndex(idx as usize));
                    }
                    targets.push((self.cur.str8()?, idx));
                }
                ENTRY_END => break,
                t => return Err(FanoutError::Tag(t)),
            }
        }
        Ok(Some(HandoffEvent {
            event_ref,
            durable: flags & FLAG_DURABLE != 0,
            broadcast: flags & FLAG_BROADCAST != 0,
        }))
    }
}

// ---------------------------------------------------------------- edge batches

/// Builds one live batch for one edge from one delivery partition: bodies
/// once, then who gets which, in order.
#[derive(Debug, Default)]
pub struct EdgeBatchWriter {
    buf: Vec<u8>,
    bodies: usize,
    items: usize,
}

impl EdgeBatchWriter {
    /// An empty batch for user partition `partition`.
    pub fn new(partition: u32) -> EdgeBatchWriter {
        let mut w = EdgeBatchWriter::default();
        w.reset(partition);
        w
    }

    fn reset(&mut self, partition: u32) {
        self.buf.clear();
        self.buf.extend_from_slice(&EDGE_MAGIC);
        self.buf.push(KIND_DELIVERIES);
        self.buf.extend_from_slice(&partition.to_be_bytes());
        self.bodies = 0;
        self.items = 0;
    }

    /// Adds a body; returns its index.
    pub fn body(&mut self, body: &[u8]) -> u16 {
        put_body(&mut self.buf, body);
        self.bodies += 1;
        (self.bodies - 1) as u16
    }

    /// Bodies so far.
    pub fn bodies(&self) -> usize {
        self.bodies
    }

    /// `user` gets body `body`, at `pos` when durable.
    pub fn user(&mut self, user: &str, body: u16, pos: Option<u64>) {
        self.buf.push(ENTRY_USER);
        self.item_tail(body, pos);
        put_str8(&mut self.buf, user);
    }

    /// Every user of the partition on the edge gets body `body` (a broadcast), at `pos` when durable.
    pub fn broadcast(&mut self, body: u16, pos: Option<u64>) {
        self.buf.push(ENTRY_BROADCAST);
        self.item_tail(body, pos);
    }

    fn item_tail(&mut self, body: u16, pos: Option<u64>) {
        debug_assert!((body as usize) < self.bodies);
        self.buf.extend_from_slice(&body.to_be_bytes());
        match pos {
            Some(p) => {
                self.buf.push(FLAG_POS);
                self.buf.extend_from_slice(&p.to_be_bytes());
            }
            None => self.buf.push(0),
        }
        self.items += 1;
    }

    /// Items so far.
    pub fn items(&self) -> usize {
        self.items
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the batch has no item.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// Takes the batch and starts an empty one for the same partition.
    pub fn take(&mut self, partition: u32) -> Bytes {
        let out = Bytes::copy_from_slice(&self.buf);
        self.reset(partition);
        out
    }
}

/// A "re-announce your users of this partition" request, from a delivery
/// partition's new owner (or one that had forgotten the edge) to an edge.
pub fn encode_sync_request(partition: u32) -> Bytes {
    let mut buf = Vec::with_capacity(7);
    buf.extend_from_slice(&EDGE_MAGIC);
    buf.push(KIND_SYNC);
    buf.extend_from_slice(&partition.to_be_bytes());
    Bytes::from(buf)
}

/// Who gets an item of an edge batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient<'a> {
    /// One user.
    User(&'a str),
    /// Every user of the batch's partition on this edge.
    Partition,
}

/// One delivery in an edge batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeItem<'a> {
    /// Who gets it.
    pub to: Recipient<'a>,
    /// Index into the batch's bodies.
    pub body: u16,
    /// The log position, for durable deliveries.
    pub pos: Option<u64>,
}

/// A message on an edge's subject.
#[derive(Debug)]
pub enum EdgeMessage<'a> {
    /// Live deliveries; iterate with [`EdgeItems::next_item`].
    Deliveries {
        /// The user partition they come from.
        partition: u32,
        /// Their items, bodies collected as they come.
        items: EdgeItems<'a>,
    },
    /// Re-announce the users of this partition.
    Sync {
        /// The partition.
        partition: u32,
    },
}

/// The items of an edge batch, read in order.
pub struct EdgeItems<'a> {
    cur: Cursor<'a>,
}

impl std::fmt::Debug for EdgeItems<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeItems").field("at", &self.cur.at).finish()
    }
}

impl<'a> EdgeItems<'a> {
    /// The next item; bodies met on the way are pushed to `bodies` (which
    /// the caller keeps for the whole batch). `None` at the end.
    pub fn next_item(&mut self, bodies: &mut Vec<Bytes>) -> Result<Option<EdgeItem<'a>>, FanoutError> {
        loop {
            if self.cur.done() {
                return Ok(None);
            }
            let tag = self.cur.u8()?;
            match tag {
                ENTRY_BODY => bodies.push(self.cur.body()?),
                ENTRY_USER | ENTRY_BROADCAST => {
                    let body = self.cur.u16()?;
                    if body as usize >= bodies.len() {
                        return Err(FanoutError::BodyIndex(body as usize));
                    }
                    let pos = match self.cur.u8()? {
                        0 => None,
                        _ => Some(self.cur.u64()?),
                    };
                    let to = if tag == ENTRY_USER {
                        Recipient::User(self.cur.str8()?)
                    } else {
                        Recipient::Partition
                    };
                    return Ok(Some(EdgeItem { to, body, pos }));
                }
                t => return Err(FanoutError::Tag(t)),
            }
        }
    }
}

/// Reads the header of a message on an edge's subject.
pub fn decode_edge_message(payload: &Bytes) -> Result<EdgeMessage<'_>, FanoutError> {
    let mut cur = Cursor { payload, at: 0 };
    if cur.take(2)? != EDGE_MAGIC {
        return Err(FanoutError::Magic);
    }
    let kind = cur.u8()?;
    let partition = cur.u32()?;
    match kind {
        KIND_DELIVERIES => Ok(EdgeMessage::Deliveries {
            partition,
            items: EdgeItems { cur },
        }),
        KIND_SYNC => Ok(EdgeMessage::Sync { partition }),
        _ => Err(FanoutError::Magic),
    }
}

// ---------------------------------------------------------------- presence

/// An edge tells a delivery partition which of its users it holds
/// (MessagePack, request/reply on `<prefix>.reg.<partition>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    /// The edge's id (its live subject is `<prefix>.edge.<id>`).
    pub edge: String,
    /// The edge's whole set of users in the partition (replacing what the
    /// partition knew of this edge), rather than changes. A large set comes
    /// in several parts: `part` 0 replaces, later parts add, and `more`
    /// says another part follows.
    pub full: bool,
    /// Which part of a full set this is (0: the first, or the only one).
    #[serde(default)]
    pub part: u32,
    /// Another part of this full set follows.
    #[serde(default)]
    pub more: bool,
    /// Users and whether the edge now holds them.
    pub users: Vec<(String, bool)>,
}

/// A delivery partition's answer to a [`PresenceUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceReply {
    /// Every durable delivery of the partition's users up to here is in the
    /// log, and every later one reaches the edge live: a valid `ready.pos`.
    pub pos: u64,
    /// The log's identity for these users (`ready.epoch`).
    pub epoch: String,
    /// The log stream holding these users' deliveries.
    pub stream: String,
    /// User partitions the router tier runs with (edges must agree).
    pub partitions: u32,
    /// The partition does not know this edge: send the full set, not changes.
    pub resync: bool,
    /// The partition stored deliveries for its users while it did not know
    /// this edge's users: their live copies did not reach the edge.
    pub late: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_partitions_are_stable_and_in_range() {
        assert_eq!(user_partition("alice", 8), user_partition("alice", 8));
        for u in ["a", "bob", "user-123", "Z"] {
            assert!(user_partition(u, 8) < 8);
        }
        assert_eq!(user_partition("anyone", 1), 0);
        // Pinned: routers and edges of different builds must agree.
        assert_eq!(user_partition("alice", 1 << 20), 14_599);
    }

    #[test]
    fn a_handoff_round_trips_events_bodies_and_targets() {
        let mut w = HandoffWriter::new();
        w.begin_event("st:9", true, false);
        let a = w.body(b"body-a");
        let b = w.body(b"body-b");
        w.target("alice", a);
        w.target("bob", b);
        w.target("carol", a);
        w.end_event();
        w.begin_event("i:x", false, true);
        w.body(b"everyone");
        w.end_event();
        assert_eq!(w.events(), 2);
        let msg = w.take();
        assert!(w.is_empty());
        let mut r = HandoffReader::new(&msg).unwrap();
        let (mut bodies, mut targets) = (Vec::new(), Vec::new());
        let e = r.next_event(&mut bodies, &mut targets).unwrap().unwrap();
        assert_eq!(
            e,
            HandoffEvent {
                event_ref: "st:9",
                durable: true,
                broadcast: false
            }
        );
        assert_eq!(bodies, [Bytes::from_static(b"body-a"), Bytes::from_static(b"body-b")]);
        assert_eq!(targets, [("alice", 0), ("bob", 1), ("carol", 0)]);
        let e = r.next_event(&mut bodies, &mut targets).unwrap().unwrap();
        assert!(e.broadcast && !e.durable);
        assert_eq!(bodies.len(), 1);
        assert!(targets.is_empty());
        assert_eq!(r.next_event(&mut bodies, &mut targets).unwrap(), None);
    }

    #[test]
    fn an_edge_batch_round_trips_in_order() {
        let mut w = EdgeBatchWriter::new(5);
        let a = w.body(b"A");
        w.user("alice", a, Some(10));
        w.user("bob", a, Some(11));
        let b = w.body(b"B");
        w.broadcast(b, None);
        w.user("alice", b, None);
        let msg = w.take(5);
        assert!(w.is_empty());
        let EdgeMessage::Deliveries { partition, mut items } = decode_edge_message(&msg).unwrap() else {
            panic!("not deliveries")
        };
        assert_eq!(partition, 5);
        let mut bodies = Vec::new();
        let mut got = Vec::new();
        while let Some(item) = items.next_item(&mut bodies).unwrap() {
            got.push(item);
        }
        assert_eq!(bodies, [Bytes::from_static(b"A"), Bytes::from_static(b"B")]);
        assert_eq!(
            got,
            [
                EdgeItem {
                    to: Recipient::User("alice"),
                    body: 0,
                    pos: Some(10)
                },
                EdgeItem {
                    to: Recipient::User("bob"),
                    body: 0,
                    pos: Some(11)
                },
                EdgeItem {
                    to: Recipient::Partition,
                    body: 1,
                    pos: None
                },
                EdgeItem {
                    to: Recipient::User("alice"),
                    body: 1,
                    pos: None
                },
            ]
        );
        assert!(matches!(
            decode_edge_message(&encode_sync_request(3)).unwrap(),
            EdgeMessage::Sync { partition: 3 }
        ));
    }

    #[test]
    fn truncated_or_foreign_messages_are_refused_not_misread() {
        let mut w = EdgeBatchWriter::new(1);
        let a = w.body(b"body");
        w.user("alice", a, Some(1));
        let msg = w.take(1);
        for cut in 0..msg.len() {
            let part = msg.slice(..cut);
            let outcome = decode_edge_message(&part).and_then(|m| match m {
                EdgeMessage::Deliveries { mut items, .. } => {
                    let mut bodies = Vec::new();
                    while items.next_item(&mut bodies)?.is_some() {}
                    Ok(())
                }
                EdgeMessage::Sync { .. } => Ok(()),
            });
            // A cut between two entries reads as a shorter batch; inside one it is an error.
            if outcome.is_ok() {
                assert!(cut == 7 || cut == 7 + 1 + 4 + 4, "cut {cut} read as whole");
            }
        }
        assert_eq!(
            decode_edge_message(&Bytes::from_static(b"xx")).unwrap_err(),
            FanoutError::Magic
        );
        let mut bad = EdgeBatchWriter::new(0);
        bad.body(b"x");
        let mut raw = bad.take(0).to_vec();
        raw.extend_from_slice(&[ENTRY_USER, 0, 9, 0, 1, b'a']);
        let raw = Bytes::from(raw);
        let EdgeMessage::Deliveries { mut items, .. } = decode_edge_message(&raw).unwrap() else {
            panic!()
        };
        assert_eq!(items.next_item(&mut Vec::new()).unwrap_err(), FanoutError::BodyIndex(9));
        assert_eq!(
            HandoffReader::new(&Bytes::from_static(b"E\x01")).err(),
            Some(FanoutError::Magic)
        );
    }
}
