//! The handle other components hold on one live connection.
//!
//! Deliveries go into the connection's outbound queue without waiting; its
//! policy ([`crate::outbound`]) rate limits, conflates and drops for a slow
//! consumer, and the writer reports drops in `dropped` frames. Control frames
//! (replies, pings, close) have their own small queue so data cannot block
//! them. A connection starts *holding*: live deliveries that arrive while it
//! sends `ready` and replays the log are parked (bounded) and released in
//! order afterwards, so nothing live overtakes the replay.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use switchyard_common::event::Prio;
use switchyard_common::{CloseCode, Encoding};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::outbound::{Fate, OutboundConfig, OutboundQueue};

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
    /// Replayed from the log on resume: never rate limited, never conflated.
    pub replayed: bool,
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
        }
    }
}

/// Something for the connection's writer to send that is not a delivery.
///
/// Kept to 24 bytes (payloads boxed): every connection's control queue
/// allocates a block of 32 of these up front.
#[derive(Debug)]
pub enum Control {
    /// An encoded control frame (reply, error...).
    Frame(Box<[u8]>),
    /// Write everything already in the data queue, then this frame; then
    /// skip durable events at or below `floor`, and acknowledge. Orders
    /// `ready` and `resumed` against the events around them.
    Barrier(Box<Barrier>),
    /// A WebSocket pong answering the client's ping.
    Pong(Box<[u8]>),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// Echo of the client's close frame; the writer then stops.
    CloseEcho(Box<[u8]>),
    /// Close the connection with this code and reason; the writer then stops.
    Close(u16, &'static str),
    /// Drop counters changed: send a `dropped` notice now.
    DroppedNotice,
}

/// See [`Control::Barrier`].
#[derive(Debug)]
pub struct Barrier {
    /// The frame to write after the queued data.
    pub frame: Vec<u8>,
    /// Durable events at or below this position are no longer sent.
    pub floor: Option<u64>,
    /// Acknowledged once the frame is written.
    pub done: oneshot::Sender<()>,
}

/// A connection's outbound queue (flow-control policy in
/// [`crate::outbound`]) with the signals around it. The lock is held only
/// for queue operations, never across `.await`.
pub struct Outbound {
    queue: Mutex<OutboundQueue>,
    /// Wakes the writer: there is something to send.
    wake: Notify,
    /// Wakes a replay waiting for room: the writer took a batch.
    room: Notify,
    /// Drops that happened outside the queue (a full hold, lagging
    /// broadcasts), reported as `slow_consumer`.
    extra_slow: AtomicU64,
    /// A `DroppedNotice` sits in the control queue; the sweeper adds no other.
    notice_queued: AtomicBool,
    /// A heartbeat `Ping` sits in the control queue; the sweeper adds no other.
    ping_queued: AtomicBool,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

impl Outbound {
    /// Locks the queue (briefly; never across `.await`).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, OutboundQueue> {
        self.queue.lock().expect("outbound queue lock")
    }

    /// Drops recorded outside the queue since the last call.
    pub fn take_extra_slow(&self) -> u64 {
        self.extra_slow.swap(0, Ordering::Relaxed)
    }

    /// Waits until the writer has something to send.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Tells a waiting replay that the writer made room.
    pub fn made_room(&self) {
        self.room.notify_one();
    }

    /// The writer took the queued `DroppedNotice`; the sweeper may queue another.
    pub fn took_notice(&self) {
        self.notice_queued.store(false, Ordering::Relaxed);
    }

    /// The writer took the queued heartbeat `Ping`; the sweeper may queue another.
    pub fn took_ping(&self) {
        self.ping_queued.store(false, Ordering::Relaxed);
    }
}

/// Sending ends of a connection's queues, created before the user is known.
#[derive(Debug, Clone)]
pub struct ConnSenders {
    out: Arc<Outbound>,
    control: mpsc::Sender<Control>,
}

/// Receiving ends owned by the connection's writer.
pub struct ConnQueues {
    /// Deliveries, behind the flow-control policy.
    pub out: Arc<Outbound>,
    /// Control frames.
    pub control: mpsc::Receiver<Control>,
}

/// Room for control frames per connection.
const CONTROL_QUEUE: usize = 64;

/// Creates a connection's bounded queues.
pub fn channels(config: OutboundConfig) -> (ConnSenders, ConnQueues) {
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let out = Arc::new(Outbound {
        queue: Mutex::new(OutboundQueue::new(config)),
        wake: Notify::new(),
        room: Notify::new(),
        extra_slow: AtomicU64::new(0),
        notice_queued: AtomicBool::new(false),
        ping_queued: AtomicBool::new(false),
    });
    (
        ConnSenders {
            out: out.clone(),
            control: ctl_tx,
        },
        ConnQueues { out, control: ctl_rx },
    )
}

impl ConnSenders {
    /// Queues a control frame, waiting for room (used by the connection's own reader).
    ///
    /// The send is boxed: callers await this in many places, and each of
    /// them would otherwise keep room for the channel's send future in the
    /// connection's task for the connection's whole life.
    pub async fn control(&self, c: Control) -> bool {
        Box::pin(self.control.send(c)).await.is_ok()
    }

    /// Queues a replayed delivery once the queue is at most half full: a
    /// replay is paced by the writer and never overflows the queue. False
    /// when the connection is gone.
    pub async fn replayed(&self, d: Delivery) -> bool {
        loop {
            if self.control.is_closed() {
                return false;
            }
            let room = self.out.room.notified();
            {
                let mut q = self.out.lock();
                if q.len() < (q.config().max_events / 2).max(1) {
                    let outcome = q.push(d, Instant::now());
                    drop(q);
                    if outcome.wake {
                        self.out.wake.notify_one();
                    }
                    return true;
                }
            }
            // Bounded wait, so a writer that died cannot strand the replay.
            if tokio::time::timeout(std::time::Duration::from_secs(1), room)
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    /// Writes `frame` after everything queued so far and waits until it is written.
    pub async fn barrier(&self, frame: Vec<u8>, floor: Option<u64>) -> bool {
        let (done, written) = oneshot::channel();
        Box::pin(
            self.control
                .send(Control::Barrier(Box::new(Barrier { frame, floor, done }))),
        )
        .await
        .is_ok()
            && written.await.is_ok()
    }

    /// A sender for the control queue, for fastwebsockets' obligated replies.
    pub fn control_sender(&self) -> mpsc::Sender<Control> {
        self.control.clone()
    }

    fn count_dropped(&self, n: u64) {
        metrics::counter!("switchyard_edge_dropped_total", "reason" => "slow_consumer").increment(n);
        self.out.extra_slow.fetch_add(n, Ordering::Relaxed);
        self.out.wake.notify_one();
    }

    fn try_deliver(&self, d: Delivery) {
        let outcome = self.out.lock().push(d, Instant::now());
        match outcome.fate {
            Fate::Queued | Fate::Replaced => {}
            Fate::RateLimited => {
                metrics::counter!("switchyard_edge_dropped_total", "reason" => "rate_limited").increment(1)
            }
            Fate::SlowConsumer => {
                metrics::counter!("switchyard_edge_dropped_total", "reason" => "slow_consumer").increment(1)
            }
        }
        if outcome.fate == Fate::Replaced {
            metrics::counter!("switchyard_edge_conflated_total").increment(1);
        }
        if outcome.evicted > 0 {
            metrics::counter!("switchyard_edge_dropped_total", "reason" => "slow_consumer")
                .increment(outcome.evicted as u64);
        }
        if outcome.wake {
            self.out.wake.notify_one();
        }
    }
}

/// Live deliveries parked while the connection sends `ready` and replays.
#[derive(Debug, Default)]
struct Hold {
    active: bool,
    items: Vec<Delivery>,
    /// A durable delivery did not fit: the replay must catch up from the log.
    overflowed: bool,
}

/// Shared reference to an authenticated connection, held by the hub and the user table.
#[derive(Debug)]
pub struct ConnHandle {
    /// Node-unique connection id.
    pub id: u64,
    /// The authenticated user.
    pub user: Arc<str>,
    /// The connection's encoding (for frames others queue for it).
    pub encoding: Encoding,
    senders: ConnSenders,
    holding: AtomicBool,
    hold: Mutex<Hold>,
    hold_cap: usize,
    /// Unix ms of the last frame received from the client.
    pub last_rx_ms: AtomicU64,
    /// Token expiry, unix seconds (updated by refresh).
    pub exp_s: AtomicU64,
    closing: AtomicBool,
    registered: AtomicBool,
}

impl ConnHandle {
    /// A handle for an authenticated connection, holding live deliveries
    /// (at most `hold_cap`) until [`ConnHandle::release`].
    pub fn new(
        id: u64,
        user: Arc<str>,
        encoding: Encoding,
        senders: ConnSenders,
        exp_s: u64,
        hold_cap: usize,
    ) -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id,
            user,
            encoding,
            senders,
            holding: AtomicBool::new(true),
            hold: Mutex::new(Hold {
                active: true,
                items: Vec::new(),
                overflowed: false,
            }),
            hold_cap,
            last_rx_ms: AtomicU64::new(now_ms()),
            exp_s: AtomicU64::new(exp_s),
            closing: AtomicBool::new(false),
            registered: AtomicBool::new(false),
        })
    }

    /// Queues a live delivery without waiting; a full queue counts a drop.
    pub fn deliver(&self, d: Delivery) {
        if self.holding.load(Ordering::Acquire) {
            let mut hold = self.hold.lock().expect("hold lock");
            if hold.active {
                if hold.items.len() < self.hold_cap {
                    hold.items.push(d);
                } else if d.pos.is_some() {
                    hold.overflowed = true;
                } else {
                    drop(hold);
                    self.senders.count_dropped(1);
                }
                return;
            }
        }
        self.senders.try_deliver(d);
    }

    /// Whether durable deliveries were lost from the hold since the last call.
    pub fn take_hold_overflow(&self) -> bool {
        std::mem::take(&mut self.hold.lock().expect("hold lock").overflowed)
    }

    /// Ends holding: queues what was held, in order, then lets deliveries through.
    ///
    /// Returns whether a durable delivery did not fit the hold since the
    /// last [`ConnHandle::take_hold_overflow`]: the connection has then
    /// missed it live and must resume from the log instead of going on.
    #[must_use]
    pub fn release(&self) -> bool {
        let mut hold = self.hold.lock().expect("hold lock");
        for d in hold.items.drain(..) {
            self.senders.try_deliver(d);
        }
        hold.active = false;
        self.holding.store(false, Ordering::Release);
        std::mem::take(&mut hold.overflowed)
    }

    /// The node's answer to this connection's registration came: from now
    /// on it counts as one of the node's users' connections (a late answer
    /// to its partition makes it resume).
    pub fn mark_registered(&self) {
        self.registered.store(true, Ordering::Release);
    }

    /// See [`ConnHandle::mark_registered`].
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// The connection's outbound queue (the sweeper reads its deadlines).
    pub fn outbound(&self) -> &Outbound {
        &self.senders.out
    }

    /// Queues a control frame without waiting (used by shared tasks such as the sweeper).
    pub fn try_control(&self, c: Control) -> bool {
        self.senders.control.try_send(c).is_ok()
    }

    /// Asks the writer for a `dropped` notice, unless one is already queued,
    /// so a writer stuck on a full socket does not collect one per sweep.
    pub fn request_dropped_notice(&self) {
        let flag = &self.senders.out.notice_queued;
        if !flag.swap(true, Ordering::Relaxed) && !self.try_control(Control::DroppedNotice) {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Asks the writer for a heartbeat ping, unless one is already queued.
    pub fn request_ping(&self) {
        let flag = &self.senders.out.ping_queued;
        if !flag.swap(true, Ordering::Relaxed) && !self.try_control(Control::Ping) {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Closes the connection with `code` (after `frame`, if any), once;
    /// later calls do nothing. Counted in `switchyard_edge_closed_total`.
    ///
    /// When the control queue has no room for the frames (a writer stuck on
    /// a full socket while the sweeper keeps queueing notices), nothing is
    /// queued and the connection is not marked closing, so the caller's next
    /// round tries again instead of the close being lost.
    pub fn close_once(&self, code: CloseCode, reason: &'static str, frame: Option<Vec<u8>>) {
        if self.closing.swap(true, Ordering::Relaxed) {
            return;
        }
        let needed = 1 + usize::from(frame.is_some());
        let Ok(mut permits) = self.senders.control.try_reserve_many(needed) else {
            self.closing.store(false, Ordering::Relaxed);
            return;
        };
        metrics::counter!("switchyard_edge_closed_total", "reason" => reason).increment(1);
        for control in frame
            .map(|f| Control::Frame(f.into_boxed_slice()))
            .into_iter()
            .chain([Control::Close(code.code(), reason)])
        {
            if let Some(permit) = permits.next() {
                permit.send(control);
            }
        }
    }

    /// Records that the client sent something.
    pub fn touch(&self, now_ms: u64) {
        self.last_rx_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> (Arc<ConnHandle>, ConnQueues) {
        let (senders, queues) = channels(OutboundConfig::default());
        (
            ConnHandle::new(1, Arc::from("alice"), Encoding::MsgPack, senders, u64::MAX, 16),
            queues,
        )
    }

    #[test]
    fn control_items_stay_small() {
        // The control queue allocates room for 32 of them per connection.
        assert!(
            std::mem::size_of::<Control>() <= 24,
            "{}",
            std::mem::size_of::<Control>()
        );
    }

    #[test]
    fn a_close_that_finds_the_control_queue_full_is_retried_not_lost() {
        let (conn, mut queues) = handle();
        for _ in 0..CONTROL_QUEUE {
            assert!(conn.try_control(Control::Pong(Box::default())));
        }
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", Some(vec![1]));
        // Room for one of the two frames is not enough: nothing goes in.
        assert!(queues.control.try_recv().is_ok());
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", Some(vec![1]));
        assert!(queues.control.try_recv().is_ok());
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", Some(vec![2]));
        let mut tail = Vec::new();
        while let Ok(c) = queues.control.try_recv() {
            tail.push(c);
        }
        assert_eq!(tail.len(), CONTROL_QUEUE - 2 + 2, "{tail:?}");
        assert!(
            matches!(&tail[tail.len() - 2], Control::Frame(f) if f[..] == [2]),
            "{tail:?}"
        );
        assert!(
            matches!(tail.last(), Some(Control::Close(4009, "slow consumer"))),
            "{tail:?}"
        );
        // Once queued, a close is not repeated.
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", None);
        assert!(queues.control.try_recv().is_err());
    }

    #[test]
    fn the_sweeper_queues_at_most_one_ping_and_one_notice_until_the_writer_takes_them() {
        let (conn, mut queues) = handle();
        for _ in 0..10 {
            conn.request_ping();
            conn.request_dropped_notice();
        }
        assert!(matches!(queues.control.try_recv(), Ok(Control::Ping)));
        assert!(matches!(queues.control.try_recv(), Ok(Control::DroppedNotice)));
        assert!(queues.control.try_recv().is_err());
        conn.request_ping();
        assert!(
            queues.control.try_recv().is_err(),
            "the writer has not taken the first ping"
        );
        queues.out.took_ping();
        conn.request_ping();
        assert!(matches!(queues.control.try_recv(), Ok(Control::Ping)));
    }
}
