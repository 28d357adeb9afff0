//! One connection's shared state, in one place, and the writer that sends
//! what it queues.
//!
//! A [`ConnHandle`] is created when the upgrade completes and is the only
//! home of what other components see of the connection: the user table and
//! the sweeper hold it, the live dispatcher delivers through it. What only
//! the connection's own task needs (the read half, claims, op limits) lives
//! in that task ([`crate::session`]).
//!
//! Outgoing bytes: every frame goes into the *wire*, a byte buffer in front
//! of the socket's write half, under one lock. Deliveries pass the
//! connection's flow-control queue ([`crate::outbound`]) first. When a live
//! delivery finds the queue, the wire and the control queue empty, the
//! dispatcher writes the frame to the socket itself, without waiting: no
//! task is woken, which is most deliveries on a connection that keeps up.
//! Otherwise (or when the socket takes only part of it) the connection's
//! task ([`ConnHandle::write_loop`]) sends what is left, serving control
//! frames (replies, pings, closes) before data.
//!
//! A connection starts *holding*: live deliveries that arrive while it
//! sends `ready` and replays the log are parked (bounded) and released in
//! order afterwards, so nothing live overtakes the replay.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::delivery::{write_batch_frame_skipping, write_event_frame};
use switchyard_common::{CloseCode, Encoding, ErrorCode};
use switchyard_runtime::now_ms;
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::control_queue::ControlQueue;
use crate::deflate::{self, FrameDeflater};
pub use crate::outbound::Delivery;
use crate::outbound::{Fate, OutboundConfig, OutboundQueue};
use crate::wsframe;

/// The socket's write half, whatever carries it (TCP, TLS, a test pipe).
pub type WriteIo = Box<dyn AsyncWrite + Send + Unpin>;

/// Something for the connection's writer to send that is not a delivery.
///
/// Kept to 24 bytes (payloads boxed): they sit in the control queue's buffer.
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
    /// Acknowledged once the frame is in the wire, after the queued data.
    pub done: oneshot::Sender<()>,
}

/// A wire buffer larger than this is given back once it has been sent, so
/// a burst (a replay, a storm) leaves no high-water mark behind.
const KEEP_WIRE_BYTES: usize = 64 * 1024;

/// How a connection's outgoing side behaves.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// Flow-control limits of the outbound queue.
    pub outbound: OutboundConfig,
    /// Most live deliveries parked while the connection starts.
    pub hold_cap: usize,
    /// Whether the live dispatcher may write to an idle socket itself
    /// (off when the operator asked batches to linger).
    pub direct_writes: bool,
}

/// Live deliveries parked while the connection sends `ready` and replays.
#[derive(Debug, Default)]
struct Hold {
    active: bool,
    items: Vec<Delivery>,
    /// A durable delivery did not fit: the replay must catch up from the log.
    overflowed: bool,
}

/// Bytes on their way to the socket, and what decides which events still go.
struct Wire {
    /// `None` in unit tests without a socket, and once the connection ended.
    io: Option<WriteIo>,
    /// Encoded frames; `buf[sent..]` is not yet taken by the socket.
    buf: Vec<u8>,
    sent: usize,
    /// Bytes were written since the last flush (TLS keeps them otherwise).
    unflushed: bool,
    /// A write failed: the connection is over.
    failed: bool,
    /// A close frame is in the wire: nothing may follow it.
    closed: bool,
    /// Bytes the socket took so far (progress, for the stall deadline).
    written: u64,
    /// Highest `pos` sent (or the floor set by a barrier): durable events
    /// at or below it are duplicates and are skipped, which keeps `pos`
    /// strictly increasing on the wire.
    last_pos: u64,
    /// Scratch: the batch being encoded, and its frame payload.
    batch: Vec<Delivery>,
    payload: Vec<u8>,
    /// permessage-deflate, when the connection negotiated it: every data
    /// frame is framed through [`deflate::put_data_frame`].
    deflate: Option<FrameDeflater>,
}

impl Wire {
    /// Nothing waits to be written: a new frame may go straight to the socket.
    fn idle(&self) -> bool {
        !self.busy() && !self.closed && self.io.is_some()
    }

    /// Gives back the buffers of a wire with nothing in it.
    fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = Vec::new();
            self.payload = Vec::new();
            self.batch = Vec::new();
        }
    }

    /// Whether anything is left to write or flush.
    fn busy(&self) -> bool {
        !self.buf.is_empty() || self.unflushed || self.failed
    }

    /// Pushes the buffer to the socket: `Ready(Ok)` once all of it is
    /// written and flushed. Never blocks; a caller with a no-op waker must
    /// wake the connection's task on `Pending`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let Some(io) = self.io.as_mut() else {
            // No socket (unit tests): the bytes go nowhere.
            self.buf.clear();
            self.sent = 0;
            return Poll::Ready(Ok(()));
        };
        while self.sent < self.buf.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.buf[self.sent..]) {
                Poll::Ready(Ok(0)) => {
                    self.failed = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.sent += n;
                    self.written += n as u64;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        self.sent = 0;
        if self.buf.capacity() > KEEP_WIRE_BYTES {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        if self.payload.capacity() > KEEP_WIRE_BYTES {
            self.payload = Vec::new();
        }
        if self.unflushed {
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// What a revocation can name in a connection's current token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenId {
    /// `iat`, unix seconds.
    pub iat: Option<u64>,
    /// `jti`.
    pub jti: Option<Box<str>>,
}

/// How the writer stopped, for the connection's end and its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterEnd {
    /// We sent a close frame: the client should answer it.
    pub sent_close: bool,
    /// Why the connection ends (the close reason, or what happened to the socket).
    pub reason: &'static str,
}

impl WriterEnd {
    fn done(reason: &'static str) -> WriterEnd {
        WriterEnd {
            sent_close: false,
            reason,
        }
    }
}

/// Shared reference to one connection, held by the user table, the
/// sweeper, and the connection's own task.
pub struct ConnHandle {
    /// Node-unique connection id.
    pub id: u64,
    user: OnceLock<Arc<str>>,
    /// The connection's encoding (for frames others queue for it).
    pub encoding: Encoding,
    control: ControlQueue,
    queue: Mutex<OutboundQueue>,
    wire: Mutex<Wire>,
    /// Wakes the writer: there is something to send.
    wake: Notify,
    /// Wakes a replay waiting for room: the writer took a batch.
    room: Notify,
    holding: AtomicBool,
    hold: Mutex<Hold>,
    hold_cap: usize,
    direct_writes: bool,
    /// Drops that happened outside the queue (a full hold), reported as `slow_consumer`.
    extra_slow: AtomicU64,
    /// A `DroppedNotice` sits in the control queue; the sweeper adds no other.
    notice_queued: AtomicBool,
    /// A heartbeat `Ping` sits in the control queue; the sweeper adds no other.
    ping_queued: AtomicBool,
    /// Unix ms of the last frame received from the client.
    pub last_rx_ms: AtomicU64,
    /// Token expiry, unix seconds (set at authentication, updated by refresh).
    pub exp_s: AtomicU64,
    /// The current token's `iat` and `jti`, for revocations that arrive
    /// while the connection is open (see `crate::revocations`).
    token: Mutex<TokenId>,
    closing: AtomicBool,
    registered: AtomicBool,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("id", &self.id)
            .field("user", &self.user.get())
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

impl ConnHandle {
    /// A connection writing to `io` (once its [`ConnHandle::write_loop`]
    /// runs), holding live deliveries until [`ConnHandle::release`].
    pub fn new(id: u64, encoding: Encoding, settings: ConnSettings, io: Option<WriteIo>) -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id,
            user: OnceLock::new(),
            encoding,
            control: ControlQueue::default(),
            queue: Mutex::new(OutboundQueue::new(settings.outbound)),
            wire: Mutex::new(Wire {
                io,
                // Allocated on first use: most connections are idle most of the time.
                buf: Vec::new(),
                sent: 0,
                unflushed: false,
                failed: false,
                closed: false,
                written: 0,
                last_pos: 0,
                batch: Vec::new(),
                payload: Vec::new(),
                deflate: None,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            holding: AtomicBool::new(true),
            hold: Mutex::new(Hold {
                active: true,
                items: Vec::new(),
                overflowed: false,
            }),
            hold_cap: settings.hold_cap,
            direct_writes: settings.direct_writes,
            extra_slow: AtomicU64::new(0),
            notice_queued: AtomicBool::new(false),
            ping_queued: AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(now_ms()),
            exp_s: AtomicU64::new(u64::MAX),
            token: Mutex::new(TokenId::default()),
            closing: AtomicBool::new(false),
            registered: AtomicBool::new(false),
        })
    }

    /// Records who authenticated on this connection (once; before it
    /// joins the user table) and its token: when it expires, and what a
    /// revocation may name (set again by every refresh).
    pub fn authenticated(&self, user: &str, exp_s: u64, token: TokenId) {
        let _ = self.user.set(Arc::from(user));
        self.refreshed(exp_s, token);
    }

    /// A refresh replaced the token.
    pub fn refreshed(&self, exp_s: u64, token: TokenId) {
        self.exp_s.store(exp_s, Ordering::Relaxed);
        *self.token.lock().expect("token lock") = token;
    }

    /// The current token's `iat` and `jti`.
    pub fn token(&self) -> TokenId {
        self.token.lock().expect("token lock").clone()
    }

    /// The authenticated user ("" before authentication; only
    /// authenticated connections are in the user table).
    pub fn user(&self) -> &Arc<str> {
        static NOBODY: OnceLock<Arc<str>> = OnceLock::new();
        self.user.get().unwrap_or_else(|| NOBODY.get_or_init(|| Arc::from("")))
    }

    /// Compresses this connection's data frames from now on (it negotiated
    /// permessage-deflate); called before anything is written.
    pub fn set_deflate(&self, deflater: FrameDeflater) {
        self.wire().deflate = Some(deflater);
    }

    /// Locks the outbound queue (briefly; never across `.await`).
    pub fn queue(&self) -> MutexGuard<'_, OutboundQueue> {
        self.queue.lock().expect("outbound queue lock")
    }

    fn wire(&self) -> MutexGuard<'_, Wire> {
        self.wire.lock().expect("wire lock")
    }

    /// Queues a live delivery without waiting (parked while holding); a
    /// full queue counts a drop. True when the queue went from empty to
    /// non-empty: the caller then calls [`ConnHandle::write_now`] (after
    /// releasing its own locks) or the delivery waits for the next wake.
    #[must_use]
    pub fn deliver(&self, d: Delivery) -> bool {
        if self.holding.load(Ordering::Acquire) {
            let mut hold = self.hold.lock().expect("hold lock");
            if hold.active {
                if hold.items.len() < self.hold_cap {
                    hold.items.push(d);
                } else if d.pos.is_some() {
                    hold.overflowed = true;
                } else {
                    drop(hold);
                    self.count_dropped(1);
                }
                return false;
            }
        }
        self.push(d)
    }

    /// Sends what is queued now if the socket is idle and takes it without
    /// waiting; otherwise (or for what is left) wakes the writer.
    pub fn write_now(&self) {
        if !self.direct_writes || !self.control.is_empty() {
            self.wake.notify_one();
            return;
        }
        let Ok(mut wire) = self.wire.try_lock() else {
            // The writer is at the socket: it will see the queue.
            self.wake.notify_one();
            return;
        };
        if !wire.idle() {
            drop(wire);
            self.wake.notify_one();
            return;
        }
        let more = self.fill(&mut wire);
        let mut cx = Context::from_waker(Waker::noop());
        let done = matches!(wire.poll_send(&mut cx), Poll::Ready(Ok(())));
        drop(wire);
        if done {
            metrics::counter!("switchyard_edge_direct_writes_total").increment(1);
        }
        // Pending: the no-op waker took the socket's write interest, so the
        // writer must poll again; an error ends the connection there; and a
        // queue longer than one batch still has more.
        if !done || more {
            self.wake.notify_one();
        }
    }

    fn push(&self, d: Delivery) -> bool {
        let outcome = self.queue().push(d, Instant::now());
        if outcome.rearm {
            // The writer sleeps until the throttle's due time: a sooner one now.
            self.wake.notify_one();
        }
        match outcome.fate {
            Fate::Queued | Fate::Replaced => {}
            Fate::Throttled => metrics::counter!("switchyard_edge_throttled_total").increment(1),
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
        outcome.wake
    }

    /// The subscribe of `sub` asked for a snapshot: keep it in order with
    /// the subscription's live events from now on (see `crate::snapshot`).
    pub fn expect_snapshot(&self, sub: &str) {
        self.queue().expect_snapshot(sub, Instant::now());
    }

    /// The snapshot of `sub` arrived: queues what may still be sent
    /// (counted in `switchyard_edge_snapshot_events_total`); how many.
    pub fn snapshot_arrived(&self, sub: &str, bodies: &[bytes::Bytes]) -> usize {
        let (n, wake) = {
            let mut q = self.queue();
            let was_empty = q.is_empty();
            let n = q.snapshot_arrived(sub, bodies, Instant::now());
            (n, was_empty && !q.is_empty())
        };
        metrics::counter!("switchyard_edge_snapshot_events_total").increment(n as u64);
        if wake {
            self.write_now();
        }
        n
    }

    fn count_dropped(&self, n: u64) {
        metrics::counter!("switchyard_edge_dropped_total", "reason" => "slow_consumer").increment(n);
        self.extra_slow.fetch_add(n, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Durable deliveries held now (and whether any did not fit): what
    /// came live for the user's log since the registration.
    pub fn held_durable(&self) -> u64 {
        let hold = self.hold.lock().expect("hold lock");
        hold.items.iter().filter(|d| d.pos.is_some()).count() as u64 + u64::from(hold.overflowed) * self.hold_cap as u64
    }

    /// Whether durable deliveries were lost from the hold since the last call.
    pub fn take_hold_overflow(&self) -> bool {
        std::mem::take(&mut self.hold.lock().expect("hold lock").overflowed)
    }

    /// Ends holding: queues what was held, in order, then lets deliveries
    /// through. Durable deliveries at or below `floor` (what `ready` or the
    /// replay already covered) are left out, so they spend no rate limit.
    ///
    /// Returns whether a durable delivery did not fit the hold since the
    /// last [`ConnHandle::take_hold_overflow`]: the connection has then
    /// missed it live and must resume from the log instead of going on.
    #[must_use]
    pub fn release(&self, floor: u64) -> bool {
        let mut hold = self.hold.lock().expect("hold lock");
        let mut wake = false;
        for d in hold.items.drain(..) {
            if d.pos.is_some_and(|pos| pos <= floor) {
                continue;
            }
            wake |= self.push(d);
        }
        hold.active = false;
        self.holding.store(false, Ordering::Release);
        let overflowed = std::mem::take(&mut hold.overflowed);
        drop(hold);
        if wake {
            self.wake.notify_one();
        }
        overflowed
    }

    /// Queues a replayed delivery once the queue is at most half full: a
    /// replay is paced by the writer and never overflows the queue. False
    /// when the connection is gone.
    pub async fn replayed(&self, d: Delivery) -> bool {
        loop {
            if self.control.is_closed() {
                return false;
            }
            let room = self.room.notified();
            {
                let mut q = self.queue();
                // Below half of both bounds, so a replayed event is never
                // dropped for room.
                if q.len() < (q.config().max_events / 2).max(1) && q.bytes() < q.config().max_bytes / 2 {
                    let outcome = q.push(d, Instant::now());
                    drop(q);
                    if outcome.wake {
                        self.wake.notify_one();
                    }
                    return true;
                }
            }
            // Bounded wait, so a writer that died cannot strand the replay.
            if tokio::time::timeout(Duration::from_secs(1), room).await.is_err() {
                continue;
            }
        }
    }

    /// Queues a control frame, waiting for room (used by the connection's own reader).
    ///
    /// The send is boxed: callers await this in many places, and each of
    /// them would otherwise keep room for the channel's send future in the
    /// connection's task for the connection's whole life.
    pub async fn control(&self, c: Control) -> bool {
        Box::pin(self.control.push(c)).await
    }

    /// Writes `frame` after everything queued so far and waits until it is in the wire.
    pub async fn barrier(&self, frame: Vec<u8>, floor: Option<u64>) -> bool {
        let (done, written) = oneshot::channel();
        Box::pin(
            self.control
                .push(Control::Barrier(Box::new(Barrier { frame, floor, done }))),
        )
        .await
            && written.await.is_ok()
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

    /// Queues a control frame without waiting (used by shared tasks such as the sweeper).
    pub fn try_control(&self, c: Control) -> bool {
        self.control.try_push(c)
    }

    /// Asks the writer for a `dropped` notice, unless one is already queued,
    /// so a writer stuck on a full socket does not collect one per sweep.
    pub fn request_dropped_notice(&self) {
        let flag = &self.notice_queued;
        if !flag.swap(true, Ordering::Relaxed) && !self.try_control(Control::DroppedNotice) {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Asks the writer for a heartbeat ping, unless one is already queued.
    pub fn request_ping(&self) {
        let flag = &self.ping_queued;
        if !flag.swap(true, Ordering::Relaxed) && !self.try_control(Control::Ping) {
            flag.store(false, Ordering::Relaxed);
        }
    }

    /// Closes the connection with `code` (after `frame`, if any), once;
    /// later calls do nothing. Whether this call closed it. Counted in `switchyard_edge_closed_total`.
    ///
    /// When the control queue has no room for the frames (a writer stuck on
    /// a full socket while the sweeper keeps queueing notices), nothing is
    /// queued and the connection is not marked closing, so the caller's next
    /// round tries again instead of the close being lost.
    pub fn close_once(&self, code: CloseCode, reason: &'static str, frame: Option<Vec<u8>>) -> bool {
        if self.closing.swap(true, Ordering::Relaxed) {
            return false;
        }
        let queued = match frame {
            Some(f) => self.control.try_push_all([
                Control::Frame(f.into_boxed_slice()),
                Control::Close(code.code(), reason),
            ]),
            None => self.control.try_push(Control::Close(code.code(), reason)),
        };
        if !queued {
            self.closing.store(false, Ordering::Relaxed);
            return false;
        }
        metrics::counter!("switchyard_edge_closed_total", "reason" => reason).increment(1);
        true
    }

    /// Records that the client sent something.
    pub fn touch(&self, now_ms: u64) {
        self.last_rx_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Lets go of the socket's write half (the connection is over).
    pub fn detach(&self) {
        self.wire().io = None;
    }

    /// Sends queued data and control frames until the connection closes:
    /// the writer half of the connection's task. Control frames go first;
    /// data goes as one `event` or `batch` frame per drained batch. A
    /// socket that takes nothing for `stall_limit` ends the connection (no
    /// close frame can get through a full socket; the client resumes).
    pub async fn write_loop(
        &self,
        conn_done: &CancellationToken,
        node_cancel: &CancellationToken,
        stall_limit: Duration,
        linger: Option<Duration>,
    ) -> WriterEnd {
        // However the writer ends (even dropped), sends fail from then on.
        let _closed = CloseOnDrop(&self.control);
        let control = &self.control;
        let result: io::Result<WriterEnd> = async {
            loop {
                if let Some(c) = control.try_pop() {
                    if let Some(end) = self.put_control(c) {
                        self.send(stall_limit).await?;
                        return Ok(end);
                    }
                    continue;
                }
                let busy = {
                    let mut wire = self.wire();
                    if wire.buf.is_empty() && !wire.closed {
                        self.fill(&mut wire);
                    }
                    wire.busy()
                };
                if busy {
                    self.send(stall_limit).await?;
                    continue;
                }
                // About to wait: an idle connection keeps no buffers. A busy
                // one is written by the dispatcher and rarely gets here.
                self.wire().release_buffers();
                // Throttled deliveries wait for their key's interval: one
                // deadline for the connection, only while it has some.
                let throttle_due = self.queue().throttle_due();
                tokio::select! {
                    biased;
                    c = control.pop() => match c {
                        Some(c) => {
                            if let Some(end) = self.put_control(c) {
                                self.send(stall_limit).await?;
                                return Ok(end);
                            }
                        }
                        None => return Ok(WriterEnd::done("session ended")),
                    },
                    _ = node_cancel.cancelled() => {
                        {
                            let mut wire = self.wire();
                            wsframe::put_close(&mut wire.buf, CloseCode::GoingAway.code(), "server shutting down");
                            wire.closed = true;
                        }
                        self.send(stall_limit).await?;
                        return Ok(WriterEnd { sent_close: true, reason: "server shutting down" });
                    }
                    _ = conn_done.cancelled() => return Ok(WriterEnd::done("session ended")),
                    _ = crate::throttle::sleep_until(throttle_due) => {
                        // The loop's next fill sends what this queued.
                        let _ = self.queue().release_throttled(Instant::now());
                    }
                    _ = self.wake.notified() => {
                        if let Some(linger) = linger {
                            // Operators who prefer fewer, larger frames let a batch fill a little.
                            let short = {
                                let q = self.queue();
                                q.len() < q.config().batch_max_events
                            };
                            if short {
                                tokio::time::sleep(linger).await;
                            }
                        }
                    }
                }
            }
        }
        .await;
        match result {
            Ok(end) => end,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => WriterEnd::done("socket stalled"),
            Err(e) => {
                tracing::debug!(conn = self.id, error = %e, "writer ended");
                WriterEnd::done("socket error")
            }
        }
    }

    /// Writes the wire out, failing after `stall_limit` without progress.
    /// The deadline restarts whenever the socket takes bytes: a slow but
    /// reading client is not cut off, one that reads nothing is.
    async fn send(&self, stall_limit: Duration) -> io::Result<()> {
        loop {
            let before = self.wire().written;
            let send = std::future::poll_fn(|cx| self.wire().poll_send(cx));
            if let Ok(r) = tokio::time::timeout(stall_limit, send).await {
                return r;
            }
            if self.wire().written != before {
                continue;
            }
            {
                metrics::counter!("switchyard_edge_closed_total", "reason" => "socket stalled").increment(1);
                tracing::debug!(
                    conn = self.id,
                    "socket write stalled past the slow-consumer deadline; dropping the connection"
                );
                self.wire().failed = true;
                return Err(io::ErrorKind::TimedOut.into());
            }
        }
    }

    /// Puts one control item into the wire; `Some` when the writer stops after it.
    fn put_control(&self, c: Control) -> Option<WriterEnd> {
        let data_op = data_opcode(self.encoding);
        let mut wire = self.wire();
        match c {
            Control::Frame(bytes) => {
                let w = &mut *wire;
                deflate::put_data_frame(&mut w.buf, data_op, &bytes, w.deflate.as_mut());
            }
            Control::Barrier(b) => {
                let Barrier { frame, floor, done } = *b;
                while self.fill(&mut wire) {}
                let w = &mut *wire;
                deflate::put_data_frame(&mut w.buf, data_op, &frame, w.deflate.as_mut());
                if let Some(floor) = floor {
                    wire.last_pos = wire.last_pos.max(floor);
                }
                // The session may have given up waiting; nothing to tell it then.
                let _ = done.send(());
            }
            Control::Pong(p) => wsframe::put_frame(&mut wire.buf, wsframe::PONG, &p),
            Control::Ping => {
                self.ping_queued.store(false, Ordering::Relaxed);
                wsframe::put_frame(&mut wire.buf, wsframe::PING, &[]);
            }
            Control::DroppedNotice => {
                self.notice_queued.store(false, Ordering::Relaxed);
                let dropped = self.queue().take_dropped();
                self.put_dropped(&mut wire, dropped);
            }
            Control::CloseEcho(p) => {
                wsframe::put_frame(&mut wire.buf, wsframe::CLOSE, &p);
                wire.closed = true;
                return Some(WriterEnd::done("client closed"));
            }
            Control::Close(code, reason) => {
                wsframe::put_close(&mut wire.buf, code, reason);
                wire.closed = true;
                return Some(WriterEnd {
                    sent_close: true,
                    reason,
                });
            }
        }
        None
    }

    /// Appends `dropped` notices for what was cut since the last ones.
    fn put_dropped(&self, wire: &mut Wire, dropped: Option<crate::outbound::Dropped>) {
        let extra_slow = self.extra_slow.swap(0, Ordering::Relaxed);
        let (rate_limited, slow) = dropped.map_or((0, 0), |d| (d.rate_limited, d.slow_consumer));
        for (reason, count) in [("rate_limited", rate_limited), ("slow_consumer", slow + extra_slow)] {
            if count > 0 {
                wire.payload.clear();
                encode_server_frame(
                    self.encoding,
                    &ServerFrame::Dropped { count, reason },
                    &mut wire.payload,
                );
                let Wire {
                    buf, payload, deflate, ..
                } = wire;
                deflate::put_data_frame(buf, data_opcode(self.encoding), payload, deflate.as_mut());
            }
        }
    }

    /// Moves batches from the queue into the wire until one puts bytes in
    /// it or the queue is empty: a batch of nothing but positions already
    /// sent puts none, and stopping there would leave events queued with
    /// nobody woken for them. Whether the queue still holds more.
    fn fill(&self, wire: &mut Wire) -> bool {
        let start = wire.buf.len();
        loop {
            let more = self.fill_batch(wire);
            if !more || wire.buf.len() > start {
                return more;
            }
        }
    }

    /// Moves one batch (up to the batch caps) from the queue into the wire
    /// as one `event` or `batch` frame, after any `dropped` notices due.
    /// Whether the queue still holds more.
    fn fill_batch(&self, wire: &mut Wire) -> bool {
        let (dropped, more) = {
            let mut queue = self.queue();
            if queue.throttle_due().is_some_and(|due| due <= Instant::now()) {
                let _ = queue.release_throttled(Instant::now());
            }
            if queue.is_empty() && self.extra_slow.load(Ordering::Relaxed) == 0 {
                return false;
            }
            wire.batch.clear();
            queue.drain_batch(&mut wire.batch);
            (queue.take_dropped(), !queue.is_empty())
        };
        self.room.notify_one();
        self.put_dropped(wire, dropped);
        let Wire {
            buf,
            batch,
            payload,
            last_pos,
            deflate,
            ..
        } = wire;
        batch.retain_mut(|d| match d.pos {
            Some(_) if d.throttle_released && d.pos <= Some(*last_pos) => {
                // Held by the throttle while later positions went out: it
                // goes without `pos`, which the client is past already.
                d.pos = None;
                true
            }
            Some(pos) if pos <= *last_pos => {
                metrics::counter!("switchyard_edge_duplicates_skipped_total").increment(1);
                false
            }
            Some(pos) => {
                *last_pos = pos;
                true
            }
            None => true,
        });
        if batch.is_empty() {
            return more;
        }
        payload.clear();
        // Each event converts on its own: one that cannot (a JSON client,
        // a payload that does not transcode) costs only itself.
        let (written, skipped, error) = if batch.len() == 1 {
            match write_event_frame(self.encoding, &batch[0].body, batch[0].pos, payload) {
                Ok(()) => (1, 0, None),
                Err(e) => (0, 1, Some(e)),
            }
        } else {
            let r = write_batch_frame_skipping(self.encoding, batch.iter().map(|d| (&d.body[..], d.pos)), payload);
            (r.written, r.skipped, r.first_error)
        };
        let data_op = data_opcode(self.encoding);
        if skipped > 0 {
            metrics::counter!("switchyard_edge_bad_deliveries_total").increment(skipped as u64);
            if let Some(e) = &error {
                tracing::warn!(error = %e, skipped, "undeliverable events skipped");
            }
            let mut notice = Vec::with_capacity(96);
            let message = format!("{skipped} event(s) could not be encoded for this connection and were skipped");
            encode_server_frame(
                self.encoding,
                &ServerFrame::Error {
                    id: None,
                    code: ErrorCode::Internal.as_str(),
                    message: &message,
                },
                &mut notice,
            );
            deflate::put_data_frame(buf, data_op, &notice, deflate.as_mut());
        }
        if written > 0 {
            metrics::counter!("switchyard_edge_deliveries_total").increment(written as u64);
            record_latency(batch);
            deflate::put_data_frame(buf, data_op, payload, deflate.as_mut());
        }
        more
    }
}

/// Closes the control queue when the writer ends, however it ends.
struct CloseOnDrop<'a>(&'a ControlQueue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The data opcode of the connection's encoding (binary for MessagePack, text for JSON).
fn data_opcode(encoding: Encoding) -> u8 {
    match encoding {
        Encoding::MsgPack => wsframe::BINARY,
        Encoding::Json => wsframe::TEXT,
    }
}

/// Records `switchyard_edge_delivery_latency_seconds`: from the event's `ts`
/// (stamped by the router when it took the event in) to this frame's
/// encoding, once per frame, for the oldest live event in it. Replayed
/// events are left out: their age says how long the client was away, not
/// how slow we are.
fn record_latency(batch: &[Delivery]) {
    let Some(ts) = batch
        .iter()
        .find(|d| !d.replayed)
        .and_then(|d| switchyard_common::delivery::peek_ts(&d.body))
    else {
        return;
    };
    let ms = now_ms().saturating_sub(ts);
    metrics::histogram!("switchyard_edge_delivery_latency_seconds").record(ms as f64 / 1000.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::body;
    use tokio::io::AsyncReadExt;

    fn settings() -> ConnSettings {
        ConnSettings {
            outbound: OutboundConfig::default(),
            hold_cap: 16,
            direct_writes: true,
        }
    }

    fn handle() -> Arc<ConnHandle> {
        let conn = ConnHandle::new(1, Encoding::MsgPack, settings(), None);
        conn.authenticated("alice", u64::MAX, TokenId::default());
        conn
    }

    /// Reads one server frame (unmasked, short) off `rd`: opcode and payload.
    async fn read_frame(rd: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        rd.read_exact(&mut head).await.unwrap();
        let mut len = (head[1] & 0x7f) as usize;
        if len == 126 {
            let mut ext = [0u8; 2];
            rd.read_exact(&mut ext).await.unwrap();
            len = u16::from_be_bytes(ext) as usize;
        }
        let mut payload = vec![0; len];
        rd.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    }

    fn event_data(payload: &[u8]) -> (i64, Option<u64>) {
        let v: rmpv::Value = rmpv::decode::read_value(&mut &payload[..]).unwrap();
        let get = |k: &str| {
            v.as_map()
                .unwrap()
                .iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v.clone())
        };
        (
            get("data").unwrap().as_i64().unwrap(),
            get("pos").and_then(|p| p.as_u64()),
        )
    }

    /// Runs `conn`'s writer; cancel the token to end it.
    fn spawn_writer(conn: &Arc<ConnHandle>) -> (tokio::task::JoinHandle<WriterEnd>, CancellationToken) {
        let done = CancellationToken::new();
        let conn = conn.clone();
        let token = done.clone();
        let writer = tokio::spawn(async move {
            let cancel = CancellationToken::new();
            conn.write_loop(&token, &cancel, Duration::from_secs(30), None).await
        });
        (writer, done)
    }

    #[test]
    fn control_items_stay_small() {
        // They sit in the control queue's buffer.
        assert!(
            std::mem::size_of::<Control>() <= 24,
            "{}",
            std::mem::size_of::<Control>()
        );
    }

    #[tokio::test]
    async fn an_idle_socket_gets_a_live_delivery_from_the_dispatcher_itself() {
        let (wr, mut rd) = tokio::io::duplex(64 * 1024);
        let conn = ConnHandle::new(1, Encoding::MsgPack, settings(), Some(Box::new(wr)));
        assert!(!conn.release(0));
        assert!(conn.deliver(Delivery::new(body(1), Some(5), false)));
        conn.write_now();
        // No writer runs in this test: the frame can only have come from write_now.
        let (op, payload) = read_frame(&mut rd).await;
        assert_eq!(op, wsframe::BINARY);
        assert_eq!(event_data(&payload), (1, Some(5)));
        assert!(conn.queue().is_empty());
        // A duplicate position is skipped, a later one goes.
        assert!(conn.deliver(Delivery::new(body(2), Some(5), false)));
        conn.write_now();
        assert!(conn.deliver(Delivery::new(body(3), Some(6), false)));
        conn.write_now();
        let (_, payload) = read_frame(&mut rd).await;
        assert_eq!(event_data(&payload), (3, Some(6)));
    }

    #[tokio::test]
    async fn a_full_socket_leaves_the_rest_to_the_writer_in_order() {
        // A pipe that holds less than one frame: the dispatcher's write is
        // partial, and the writer finishes it before anything else.
        let (wr, mut rd) = tokio::io::duplex(8);
        let conn = ConnHandle::new(1, Encoding::MsgPack, settings(), Some(Box::new(wr)));
        assert!(!conn.release(0));
        assert!(conn.deliver(Delivery::new(body(1), Some(1), false)));
        conn.write_now();
        assert!(conn.deliver(Delivery::new(body(2), Some(2), false)));
        conn.write_now();
        let (writer, done) = spawn_writer(&conn);
        let mut got = Vec::new();
        while got.len() < 2 {
            let (op, payload) = read_frame(&mut rd).await;
            assert_eq!(op, wsframe::BINARY);
            // One event or a batch of the rest.
            let v: rmpv::Value = rmpv::decode::read_value(&mut &payload[..]).unwrap();
            let map = v.as_map().unwrap();
            let is_batch = map
                .iter()
                .any(|(k, v)| k.as_str() == Some("op") && v.as_str() == Some("batch"));
            if is_batch {
                let events = map
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("events"))
                    .unwrap()
                    .1
                    .clone();
                for e in events.as_array().unwrap() {
                    let mut b = Vec::new();
                    rmpv::encode::write_value(&mut b, e).unwrap();
                    got.push(event_data(&b));
                }
            } else {
                got.push(event_data(&payload));
            }
        }
        assert_eq!(got, vec![(1, Some(1)), (2, Some(2))]);
        done.cancel();
        assert_eq!(writer.await.unwrap(), WriterEnd::done("session ended"));
    }

    #[tokio::test]
    async fn a_held_connection_writes_nothing_until_released_and_control_goes_first() {
        let (wr, mut rd) = tokio::io::duplex(64 * 1024);
        let conn = ConnHandle::new(1, Encoding::MsgPack, settings(), Some(Box::new(wr)));
        assert!(!conn.deliver(Delivery::new(body(1), Some(1), false)), "held");
        let (writer, done) = spawn_writer(&conn);
        assert!(conn.barrier(b"ready".to_vec(), Some(0)).await);
        assert!(!conn.release(0));
        let (_, first) = read_frame(&mut rd).await;
        assert_eq!(first, b"ready");
        let (_, second) = read_frame(&mut rd).await;
        assert_eq!(event_data(&second), (1, Some(1)));
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", None);
        let (op, close) = read_frame(&mut rd).await;
        assert_eq!(op, wsframe::CLOSE);
        assert_eq!(&close[..2], 4009u16.to_be_bytes());
        assert_eq!(
            writer.await.unwrap(),
            WriterEnd {
                sent_close: true,
                reason: "slow consumer"
            }
        );
        drop(done);
    }

    #[tokio::test]
    async fn a_batch_of_only_duplicates_does_not_put_the_writer_to_sleep() {
        let (wr, mut rd) = tokio::io::duplex(64 * 1024);
        let writer_only = ConnSettings {
            direct_writes: false,
            ..settings()
        };
        let conn = ConnHandle::new(1, Encoding::MsgPack, writer_only, Some(Box::new(wr)));
        let (writer, done) = spawn_writer(&conn);
        assert!(conn.barrier(b"ready".to_vec(), Some(100)).await);
        assert!(!conn.release(100));
        assert_eq!(read_frame(&mut rd).await.1, b"ready");
        // A redo sends 60 positions this connection already has (more than
        // one batch), then a new one: the new one must still go out.
        for pos in 1..=60 {
            let _ = conn.deliver(Delivery::new(body(0), Some(pos), false));
        }
        let _ = conn.deliver(Delivery::new(body(7), Some(101), false));
        conn.write_now();
        let (_, payload) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut rd))
            .await
            .expect("the new event arrives");
        assert_eq!(event_data(&payload), (7, Some(101)));
        done.cancel();
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn nothing_follows_a_close_frame() {
        let (wr, mut rd) = tokio::io::duplex(64 * 1024);
        let conn = ConnHandle::new(1, Encoding::MsgPack, settings(), Some(Box::new(wr)));
        let (writer, _done) = spawn_writer(&conn);
        assert!(!conn.release(0));
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", None);
        assert!(writer.await.unwrap().sent_close);
        // A live delivery after the close (the connection is still in the
        // user table during the close grace) must not reach the socket.
        assert!(conn.deliver(Delivery::new(body(1), Some(1), false)));
        conn.write_now();
        conn.detach();
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut rest).await.unwrap();
        assert_eq!(rest[0] & 0x0f, wsframe::CLOSE, "the close frame first");
        assert_eq!(rest.len(), 2 + rest[1] as usize, "and nothing after it: {rest:?}");
    }

    #[test]
    fn a_close_that_finds_the_control_queue_full_is_retried_not_lost() {
        let conn = handle();
        let control = &conn.control;
        for _ in 0..crate::control_queue::CAPACITY {
            assert!(conn.try_control(Control::Pong(Box::default())));
        }
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", Some(vec![1]));
        // Room for one of the two frames is not enough: nothing goes in.
        assert!(control.try_pop().is_some());
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", Some(vec![1]));
        assert!(control.try_pop().is_some());
        conn.close_once(CloseCode::SlowConsumer, "slow consumer", Some(vec![2]));
        let mut tail = Vec::new();
        while let Some(c) = control.try_pop() {
            tail.push(c);
        }
        assert_eq!(tail.len(), crate::control_queue::CAPACITY - 2 + 2, "{tail:?}");
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
        assert!(control.try_pop().is_none());
    }

    #[test]
    fn the_sweeper_queues_at_most_one_ping_and_one_notice_until_the_writer_takes_them() {
        let conn = handle();
        let control = &conn.control;
        for _ in 0..10 {
            conn.request_ping();
            conn.request_dropped_notice();
        }
        let ping = control.try_pop().unwrap();
        assert!(matches!(ping, Control::Ping));
        assert!(matches!(control.try_pop(), Some(Control::DroppedNotice)));
        assert!(control.try_pop().is_none());
        conn.request_ping();
        assert!(control.try_pop().is_none(), "the writer has not taken the first ping");
        assert!(conn.put_control(ping).is_none());
        conn.request_ping();
        assert!(matches!(control.try_pop(), Some(Control::Ping)));
    }
}
