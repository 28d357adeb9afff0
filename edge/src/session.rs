//! One WebSocket connection: authentication, the reader loop and the writer.
//!
//! Each connection has a reader (this module's [`run`], the connection's
//! task) and a writer task that owns the socket's write half. The reader
//! never writes: replies, pongs and close frames go to the writer's control
//! queue, which the writer serves before data so a backlog of events cannot
//! hold them up. Whenever the writer wakes for data it drains what is queued
//! (up to the batch caps) into one `event` or `batch` frame, so an idle
//! connection gets each event at once and a busy one fewer, larger frames.
//!
//! fastwebsockets' `read_frame` is not cancel-safe; the reader only races it
//! against its own end (auth timeout, connection closing), after which it
//! never reads again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use switchyard_common::client::{
    decode_client_frame, encode_rpc_result, encode_server_frame, ClientOp, Resume, ServerFrame,
};
use switchyard_common::control::{ControlOp, ControlReply};
use switchyard_common::delivery::{write_batch_frame_skipping, write_event_frame};
use switchyard_common::{CloseCode, Encoding, ErrorCode};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::auth::Claims;
use crate::conn::{channels, now_ms, Barrier, ConnHandle, ConnQueues, ConnSenders, Control, Delivery};
use crate::intake::Registration;
use crate::log::LogError;
use crate::node::{Node, UserSlot};
use crate::wsread::{Incoming, MessageReader};

type Io = TokioIo<Upgraded>;

/// Authentication done before the upgrade (header or query token).
pub struct PreAuth {
    /// The verified claims.
    pub claims: Claims,
    /// Resume point from the upgrade URL.
    pub resume: Option<Resume>,
    /// The user's connection slot on this node.
    pub slot: UserSlot,
}

/// Why the reader stopped.
enum End {
    /// The client closed, the socket failed or the writer stopped.
    Gone,
    /// We asked the writer to close.
    Closed,
}

/// Runs one upgraded connection to its end.
pub async fn run(
    node: Arc<Node>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    encoding: Encoding,
    pre_auth: Option<PreAuth>,
    _permit: OwnedSemaphorePermit,
) {
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    // Our own reader (no buffer while idle); fastwebsockets writes. The
    // reader it builds beside the writer is dropped at once.
    let (rd, wr) = tokio::io::split(ws.into_inner());
    let rd = MessageReader::new(rd, node.config.max_frame_bytes);
    let (_, wr) = fastwebsockets::after_handshake_split(tokio::io::empty(), wr, Role::Server);
    let (senders, queues) = channels(node.config.outbound());
    let conn_done = node.cancel.child_token();
    let writer = Writer {
        ws: wr,
        encoding,
        batch_max_events: node.config.batch_max_events,
        // Allocated on first use: most connections are idle most of the time.
        buf: Vec::new(),
        batch: Vec::new(),
        stall_limit: std::time::Duration::from_millis(node.config.write_stall_ms.max(node.config.slow_consumer_ms)),
        linger: (node.config.linger_ms > 0).then(|| std::time::Duration::from_millis(node.config.linger_ms)),
        sent_close: false,
        last_pos: 0,
    };
    node.tasks
        .spawn(writer.run(queues, conn_done.clone(), node.cancel.clone()));
    metrics::counter!("switchyard_edge_connections_total").increment(1);

    let mut reader = Reader {
        rd,
        node: node.clone(),
        encoding,
        senders,
        conn_done: conn_done.clone(),
        bad_frames: VecDeque::new(),
        ops: node.config.op_limiter(),
    };
    let auth = match pre_auth {
        Some(p) => Some((p.claims, p.resume, None, p.slot)),
        // One-shot steps are boxed: the connection's task keeps, for its
        // whole life, room for the largest future it ever awaits inline.
        None => match Box::pin(reader.frame_auth()).await {
            None => None,
            Some((claims, resume, id)) => match node.user_slots.try_acquire(&claims.sub) {
                Some(slot) => Some((claims, resume, id, slot)),
                None => {
                    metrics::counter!("switchyard_edge_refused_total", "reason" => "user_connections").increment(1);
                    reader
                        .senders
                        .control(Control::Close(
                            CloseCode::PolicyViolation.code(),
                            "too many connections for this user",
                        ))
                        .await;
                    None
                }
            },
        },
    };
    let Some((claims, resume, auth_id, _slot)) = auth else {
        conn_done.cancel();
        return;
    };
    let conn = ConnHandle::new(
        node.next_conn_id(),
        Arc::from(claims.sub.as_str()),
        encoding,
        reader.senders.clone(),
        claims.exp,
        node.config.queue_events,
    );
    let registration = match Box::pin(node.hub.register(
        conn.clone(),
        std::time::Duration::from_millis(node.config.register_timeout_ms),
    ))
    .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, user = %claims.sub, "cannot register connection with its delivery partition");
            reader
                .reply_error(None, ErrorCode::Unavailable, "delivery unavailable; reconnect later")
                .await;
            reader
                .senders
                .control(Control::Close(1011, "delivery unavailable"))
                .await;
            node.hub.unregister(&conn);
            conn_done.cancel();
            return;
        }
    };
    conn.mark_registered();
    let conn_name = format!("{}-{}", node.node_id, conn.id);
    if let Err(e) = Box::pin(start_delivery(
        &node,
        &mut reader,
        &conn,
        &conn_name,
        &claims,
        &registration,
        resume,
        auth_id,
    ))
    .await
    {
        tracing::warn!(error = %e, conn = %conn_name, "cannot start delivery");
        reader
            .reply_error(
                None,
                ErrorCode::Unavailable,
                "delivery log unavailable; reconnect later",
            )
            .await;
        reader
            .senders
            .control(Control::Close(1011, "delivery log unavailable"))
            .await;
        node.hub.unregister(&conn);
        conn_done.cancel();
        return;
    }
    tracing::debug!(conn = %conn_name, user = %claims.sub, "connection ready");
    Box::pin(reader.serve(conn.clone(), claims)).await;
    node.hub.unregister(&conn);
    conn_done.cancel();
}

/// Sends `ready`, replays the log when a resume was asked, sends `resumed`,
/// and then lets live deliveries through: the order PROTOCOL.md promises.
///
/// The registration's `pos` is the floor: everything of the user's up to it
/// is in the log, everything after reaches this connection live (held
/// until the end of this function). A `since` ahead of it replays nothing,
/// is not `recovered`, and does not hold back live events.
#[allow(clippy::too_many_arguments)]
async fn start_delivery(
    node: &Node,
    reader: &mut Reader,
    conn: &ConnHandle,
    conn_name: &str,
    claims: &Claims,
    reg: &Registration,
    resume: Option<Resume>,
    auth_id: Option<u32>,
) -> Result<(), LogError> {
    let ready = ServerFrame::Ready {
        id: auth_id,
        conn: conn_name,
        user: &claims.sub,
        epoch: &reg.epoch,
        pos: reg.pos,
        server_time: now_ms(),
        heartbeat_ms: node.config.heartbeat_ms,
        limits: node.config.limits(),
    };
    let Some(resume) = resume else {
        // No resume: live events after `ready.pos`.
        reader.barrier(&ready, Some(reg.pos)).await;
        if conn.release() {
            resume_instead(reader, conn).await;
        }
        return Ok(());
    };
    reader.barrier(&ready, None).await;
    // Never closed, so this waits its turn and always gets a permit. Taken
    // after `ready`, so a waiting client knows it is connected.
    let log_slot = node.log_slots.acquire().await.ok();
    let log = node.log.user_log(&claims.sub, reg);
    let same_epoch = resume.epoch == reg.epoch;
    let after = if same_epoch { resume.since.min(reg.pos) } else { 0 };
    let recovered = same_epoch && node.log.recovered(&log, resume.since, reg.pos).await?;
    let mut replayed = node.log.replay(&log, after, reg.pos, &reader.senders).await?;
    let mut upto = reg.pos;
    // Live events that did not fit the hold while replaying are still in
    // the log: catch up from there (bounded), then switch to live.
    for _ in 0..MAX_CATCH_UP_ROUNDS {
        if !conn.take_hold_overflow() {
            break;
        }
        upto = node.log.state(&log).await?.last_seq;
        let more = node
            .log
            .replay(&log, replayed.last_pos.max(after), upto, &reader.senders)
            .await?;
        replayed.count += more.count;
        replayed.last_pos = more.last_pos;
    }
    drop(log_slot);
    let floor = upto.max(replayed.last_pos);
    reader
        .barrier(
            &ServerFrame::Resumed {
                recovered,
                replayed: replayed.count,
            },
            Some(floor),
        )
        .await;
    if conn.release() {
        resume_instead(reader, conn).await;
    }
    tracing::debug!(conn = %conn_name, replayed = replayed.count, recovered, "resumed");
    Ok(())
}

/// Live durable deliveries overflowed the hold while `ready` (and the
/// replay) went out: they are in the log, not on their way. The client is
/// told to reconnect at once and resume from what it has; going live
/// would skip them.
async fn resume_instead(reader: &mut Reader, conn: &ConnHandle) {
    metrics::counter!("switchyard_edge_hold_overflow_resyncs_total").increment(1);
    tracing::debug!(conn = conn.id, "hold overflowed: the client resumes");
    reader
        .send(&ServerFrame::Reconnect {
            after_ms: 0,
            reason: "resync",
        })
        .await;
    reader
        .senders
        .control(Control::Close(CloseCode::GoingAway.code(), "resync"))
        .await;
}

/// How long the writer waits for the client to answer a close it sent.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How many times a resume catches up from the log before going live.
const MAX_CATCH_UP_ROUNDS: usize = 5;

struct Reader {
    rd: MessageReader<ReadHalf<Io>>,
    node: Arc<Node>,
    encoding: Encoding,
    senders: ConnSenders,
    conn_done: CancellationToken,
    /// Times (unix ms) of recent bad frames, for the budget.
    bad_frames: VecDeque<u64>,
    /// The op rate limit (checked after decoding: bad frames spend nothing).
    ops: crate::op_limit::OpLimiter,
}

impl Reader {
    /// Reads the next complete data message; `None` when the connection ended.
    async fn next_message(&mut self) -> Option<(OpCode, Bytes)> {
        loop {
            let read = tokio::select! {
                _ = self.conn_done.cancelled() => return None,
                m = self.rd.read_message() => m,
            };
            let reply = match read {
                Ok(Incoming::Message(op, payload)) => return Some((op, Bytes::from(payload))),
                Ok(Incoming::Pong) => return Some((OpCode::Pong, Bytes::new())),
                Ok(Incoming::Ping(p)) => Control::Pong(p.into_boxed_slice()),
                Ok(Incoming::Close(p)) => {
                    self.senders.control(Control::CloseEcho(p.into_boxed_slice())).await;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "read ended");
                    if let Some((code, reason)) = e.close() {
                        metrics::counter!("switchyard_edge_closed_total", "reason" => e.kind()).increment(1);
                        self.senders.control(Control::Close(code, reason)).await;
                    }
                    return None;
                }
            };
            if !self.senders.control(reply).await {
                tracing::debug!("read ended: writer gone");
                return None;
            }
        }
    }

    async fn send(&mut self, frame: &ServerFrame<'_>) {
        let mut buf = Vec::with_capacity(64);
        encode_server_frame(self.encoding, frame, &mut buf);
        self.senders.control(Control::Frame(buf.into_boxed_slice())).await;
    }

    /// Sends a frame after everything queued, waiting until it is written.
    async fn barrier(&mut self, frame: &ServerFrame<'_>, floor: Option<u64>) {
        let mut buf = Vec::with_capacity(256);
        encode_server_frame(self.encoding, frame, &mut buf);
        self.senders.barrier(buf, floor).await;
    }

    async fn reply_error(&mut self, id: Option<u32>, code: ErrorCode, message: &str) {
        self.send(&ServerFrame::Error {
            id,
            code: code.as_str(),
            message,
        })
        .await;
    }

    async fn refuse(&mut self, id: Option<u32>, code: ErrorCode, message: &str, close: CloseCode) {
        metrics::counter!("switchyard_edge_auth_failures_total", "reason" => code.as_str()).increment(1);
        self.reply_error(id, code, message).await;
        self.senders.control(Control::Close(close.code(), "unauthorized")).await;
    }

    /// Waits for the first frame, which must be a valid `auth`.
    async fn frame_auth(&mut self) -> Option<(Claims, Option<Resume>, Option<u32>)> {
        let deadline = tokio::time::Instant::now() + self.node.config.auth_timeout();
        let msg = loop {
            match tokio::time::timeout_at(deadline, self.next_message()).await {
                Err(_) => {
                    self.refuse(
                        None,
                        ErrorCode::Unauthorized,
                        "no auth frame in time",
                        CloseCode::Unauthorized,
                    )
                    .await;
                    return None;
                }
                Ok(None) => return None,
                Ok(Some((OpCode::Ping | OpCode::Pong, _))) => continue,
                Ok(Some(m)) => break m,
            }
        };
        let frame = match self.decode(msg) {
            Ok(f) => f,
            Err(e) => {
                // A bad resume point is a bad frame; anything else undecodable is unauthorized.
                let code = if e.is_bad_resume() {
                    ErrorCode::BadFrame
                } else {
                    ErrorCode::Unauthorized
                };
                self.refuse(e.id, code, &e.message, CloseCode::Unauthorized).await;
                return None;
            }
        };
        let ClientOp::Auth { token, resume } = frame.op else {
            self.refuse(
                frame.id,
                ErrorCode::Unauthorized,
                "the first frame must be auth",
                CloseCode::Unauthorized,
            )
            .await;
            return None;
        };
        match self.node.verifier.verify(&token) {
            Ok(claims) => Some((claims, resume, frame.id)),
            Err(e) => {
                tracing::debug!(reason = e.reason(), "frame auth refused");
                self.refuse(
                    frame.id,
                    ErrorCode::Unauthorized,
                    "invalid token",
                    CloseCode::Unauthorized,
                )
                .await;
                None
            }
        }
    }

    fn decode(
        &self,
        (opcode, payload): (OpCode, Bytes),
    ) -> Result<switchyard_common::client::ClientFrame, switchyard_common::client::FrameError> {
        let expected = match self.encoding {
            Encoding::MsgPack => OpCode::Binary,
            Encoding::Json => OpCode::Text,
        };
        if opcode != expected {
            return Err(switchyard_common::client::FrameError {
                id: None,
                code: ErrorCode::BadFrame,
                message: match self.encoding {
                    Encoding::MsgPack => "text frame on a MessagePack connection".into(),
                    Encoding::Json => "binary frame on a JSON connection".into(),
                },
                kind: switchyard_common::client::FrameErrorKind::Invalid,
            });
        }
        decode_client_frame(self.encoding, &payload)
    }

    /// Counts a bad frame; whether the budget is spent.
    fn bad_frame_budget_spent(&mut self) -> bool {
        let now = now_ms();
        while self.bad_frames.front().is_some_and(|t| now.saturating_sub(*t) > 60_000) {
            self.bad_frames.pop_front();
        }
        self.bad_frames.push_back(now);
        self.bad_frames.len() > self.node.config.bad_frame_budget as usize
    }

    /// The authenticated loop: answer frames until the connection ends.
    async fn serve(&mut self, conn: Arc<ConnHandle>, mut claims: Claims) -> End {
        loop {
            let Some(msg) = self.next_message().await else {
                return End::Gone;
            };
            conn.touch(now_ms());
            if matches!(msg.0, OpCode::Ping | OpCode::Pong) {
                continue;
            }
            metrics::counter!("switchyard_edge_frames_in_total").increment(1);
            let frame = match self.decode(msg) {
                Ok(f) => f,
                Err(e) => {
                    metrics::counter!("switchyard_edge_bad_frames_total").increment(1);
                    self.reply_error(e.id, e.code, &e.message).await;
                    if e.code == ErrorCode::BadFrame && self.bad_frame_budget_spent() {
                        metrics::counter!("switchyard_edge_closed_total", "reason" => "bad_frames").increment(1);
                        self.senders
                            .control(Control::Close(
                                CloseCode::PolicyViolation.code(),
                                "bad frame budget spent",
                            ))
                            .await;
                        return End::Closed;
                    }
                    continue;
                }
            };
            if !self.ops.admit(&frame.op, std::time::Instant::now()) {
                metrics::counter!("switchyard_edge_ops_rate_limited_total").increment(1);
                self.reply_error(frame.id, ErrorCode::RateLimited, "too many requests; slow down")
                    .await;
                continue;
            }
            // Boxed: handling a frame awaits requests with large futures, and
            // the connection's task would otherwise keep room for them forever.
            if let Some(end) = Box::pin(self.handle_op(frame, &conn, &mut claims)).await {
                return end;
            }
        }
    }

    /// Answers one decoded frame; `Some` when the connection must end.
    async fn handle_op(
        &mut self,
        frame: switchyard_common::client::ClientFrame,
        conn: &ConnHandle,
        claims: &mut Claims,
    ) -> Option<End> {
        let id = frame.id;
        let control_op = match frame.op {
            ClientOp::Ping => {
                self.send(&ServerFrame::Pong {
                    id,
                    server_time: now_ms(),
                })
                .await;
                return None;
            }
            ClientOp::Auth { token, .. } => {
                match self.node.verifier.verify(&token) {
                    Ok(fresh) if fresh.sub == claims.sub => {
                        conn.exp_s.store(fresh.exp, Ordering::Relaxed);
                        *claims = fresh;
                        self.send(&ServerFrame::Ok { id }).await;
                    }
                    Ok(_) => {
                        self.refuse(
                            id,
                            ErrorCode::Unauthorized,
                            "token for another user",
                            CloseCode::Unauthorized,
                        )
                        .await;
                        return Some(End::Closed);
                    }
                    Err(e) => {
                        tracing::debug!(reason = e.reason(), "refresh refused");
                        self.reply_error(id, ErrorCode::Unauthorized, "invalid token; keeping the current one")
                            .await;
                    }
                }
                return None;
            }
            ClientOp::Rpc { method, data } => {
                match Box::pin(self.node.backend.rpc(&claims.sub, &claims.roles, &method, &data)).await {
                    Ok(reply) => {
                        let mut buf = Vec::with_capacity(reply.len() + 32);
                        encode_rpc_result(self.encoding, id, &reply, &mut buf);
                        self.senders.control(Control::Frame(buf.into_boxed_slice())).await;
                    }
                    Err(e) => {
                        self.send(&ServerFrame::Error {
                            id,
                            code: e.code(),
                            message: &e.to_string(),
                        })
                        .await
                    }
                }
                return None;
            }
            ClientOp::Subscribe(raw) => ControlOp::Subscribe(raw),
            ClientOp::Unsubscribe { sub } => ControlOp::Unsubscribe { sub },
            ClientOp::List => ControlOp::List,
            ClientOp::Join { room } => ControlOp::Join { room },
            ClientOp::Leave { room } => ControlOp::Leave { room },
        };
        match Box::pin(
            self.node
                .backend
                .control(&claims.sub, &claims.rooms, &claims.roles, control_op),
        )
        .await
        {
            Ok(ControlReply::Ok) => self.send(&ServerFrame::Ok { id }).await,
            Ok(ControlReply::Subs(subs)) => self.send(&ServerFrame::Subs { id, subs: &subs }).await,
            Ok(ControlReply::Error { code, message }) => self.reply_error(id, code, &message).await,
            Err(e) => {
                self.send(&ServerFrame::Error {
                    id,
                    code: e.code(),
                    message: &e.to_string(),
                })
                .await
            }
        }
        None
    }
}

/// The connection's writer: owns the socket's write half.
struct Writer {
    ws: WebSocketWrite<WriteHalf<Io>>,
    encoding: Encoding,
    batch_max_events: usize,
    buf: Vec<u8>,
    batch: Vec<Delivery>,
    /// Longest a socket write may block before the connection is dropped.
    stall_limit: std::time::Duration,
    /// Optional wait after a wake for a batch to fill (off by default).
    linger: Option<std::time::Duration>,
    /// Whether this side sent a close frame (then it waits for the client's answer).
    sent_close: bool,
    /// Highest `pos` written (or the floor set by a barrier): durable events
    /// at or below it are duplicates and are skipped, which keeps `pos`
    /// strictly increasing on the wire.
    last_pos: u64,
}

impl Writer {
    async fn run(mut self, mut q: ConnQueues, conn_done: CancellationToken, node_cancel: CancellationToken) {
        let result: Result<(), WebSocketError> = async {
            loop {
                if let Ok(c) = q.control.try_recv() {
                    // Boxed, like the write below: the writer of an idle connection
                    // then keeps no room for them while it waits.
                    if Box::pin(self.control(c, &mut q)).await? {
                        return Ok(());
                    }
                    continue;
                }
                if q.out.lock().is_empty() {
                    tokio::select! {
                        biased;
                        c = q.control.recv() => match c {
                            Some(c) => {
                                if Box::pin(self.control(c, &mut q)).await? {
                                    return Ok(());
                                }
                                continue;
                            }
                            None => return Ok(()),
                        },
                        _ = node_cancel.cancelled() => {
                            self.ws.write_frame(Frame::close(CloseCode::GoingAway.code(), b"server shutting down")).await?;
                            self.sent_close = true;
                            self.ws.flush().await?;
                            return Ok(());
                        }
                        _ = conn_done.cancelled() => return Ok(()),
                        _ = q.out.woken() => {
                            if let Some(linger) = self.linger {
                                // Operators who prefer fewer, larger frames let a batch fill a little.
                                if q.out.lock().len() < self.batch_max_events {
                                    tokio::time::sleep(linger).await;
                                }
                            }
                        }
                    };
                }
                // A client that stops reading stalls the socket itself. The
                // sweeper's 4009 waits in the control queue and goes out as
                // soon as the client reads again; one that never does is
                // dropped after the write-stall limit (no close frame can get
                // through a full socket). Either way the client resumes.
                let stall_limit = self.stall_limit;
                let write = Box::pin(async {
                    self.write_batch(&mut q).await?;
                    self.ws.flush().await
                });
                match tokio::time::timeout(stall_limit, write).await {
                    Ok(r) => r?,
                    Err(_) => {
                        metrics::counter!("switchyard_edge_closed_total", "reason" => "socket stalled").increment(1);
                        tracing::debug!("socket write stalled past the slow-consumer deadline; dropping the connection");
                        return Ok(());
                    }
                }
            }
        }
        .await;
        match result {
            // We sent a close: give the client a moment to answer it before the
            // socket goes, so it reads our close frame rather than a reset.
            Ok(()) if self.sent_close => {
                if tokio::time::timeout(CLOSE_GRACE, conn_done.cancelled()).await.is_err() {
                    tracing::debug!("client did not answer our close in time");
                }
            }
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "writer ended"),
        }
        conn_done.cancel();
    }

    /// Writes what is queued, up to the batch caps, as one `event` or
    /// `batch` frame, after any `dropped` notices that are due.
    async fn write_batch(&mut self, q: &mut ConnQueues) -> Result<(), WebSocketError> {
        self.batch.clear();
        let dropped = {
            let mut queue = q.out.lock();
            queue.drain_batch(&mut self.batch);
            queue.take_dropped()
        };
        q.out.made_room();
        let extra_slow = q.out.take_extra_slow();
        let (rate_limited, slow) = dropped.map_or((0, 0), |d| (d.rate_limited, d.slow_consumer));
        self.dropped_notice("rate_limited", rate_limited).await?;
        self.dropped_notice("slow_consumer", slow + extra_slow).await?;
        let last_pos = &mut self.last_pos;
        self.batch.retain(|d| match d.pos {
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
        if self.batch.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        // Each event converts on its own: one that cannot (a JSON client,
        // a payload that does not transcode) costs only itself.
        let (written, skipped, error) = if self.batch.len() == 1 {
            match write_event_frame(self.encoding, &self.batch[0].body, self.batch[0].pos, &mut self.buf) {
                Ok(()) => (1, 0, None),
                Err(e) => (0, 1, Some(e)),
            }
        } else {
            let r = write_batch_frame_skipping(
                self.encoding,
                self.batch.iter().map(|d| (&d.body[..], d.pos)),
                &mut self.buf,
            );
            (r.written, r.skipped, r.first_error)
        };
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
            self.ws.write_frame(data_frame(self.encoding, &notice)).await?;
        }
        if written == 0 {
            return Ok(());
        }
        metrics::counter!("switchyard_edge_deliveries_total").increment(written as u64);
        record_latency(&self.batch);
        let frame = data_frame(self.encoding, &self.buf);
        self.ws.write_frame(frame).await
    }

    async fn dropped_notice(&mut self, reason: &str, count: u64) -> Result<(), WebSocketError> {
        if count == 0 {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(48);
        encode_server_frame(self.encoding, &ServerFrame::Dropped { count, reason }, &mut buf);
        self.ws.write_frame(data_frame(self.encoding, &buf)).await
    }

    /// Writes one control item; whether the connection is now closed.
    async fn control(&mut self, c: Control, q: &mut ConnQueues) -> Result<bool, WebSocketError> {
        let closed = match c {
            Control::Frame(bytes) => {
                self.ws.write_frame(data_frame(self.encoding, &bytes)).await?;
                false
            }
            Control::Barrier(b) => {
                let Barrier { frame, floor, done } = *b;
                while !q.out.lock().is_empty() {
                    self.write_batch(q).await?;
                }
                self.ws.write_frame(data_frame(self.encoding, &frame)).await?;
                if let Some(floor) = floor {
                    self.last_pos = self.last_pos.max(floor);
                }
                // The session may have given up waiting; nothing to tell it then.
                let _ = done.send(());
                false
            }
            Control::Pong(p) => {
                self.ws.write_frame(Frame::pong(Payload::Borrowed(&p))).await?;
                false
            }
            Control::Ping => {
                q.out.took_ping();
                self.ws
                    .write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[])))
                    .await?;
                false
            }
            Control::DroppedNotice => {
                q.out.took_notice();
                let dropped = q.out.lock().take_dropped();
                let extra_slow = q.out.take_extra_slow();
                let (rate_limited, slow) = dropped.map_or((0, 0), |d| (d.rate_limited, d.slow_consumer));
                self.dropped_notice("rate_limited", rate_limited).await?;
                self.dropped_notice("slow_consumer", slow + extra_slow).await?;
                false
            }
            Control::CloseEcho(p) => {
                self.ws.write_frame(Frame::close_raw(Payload::Borrowed(&p))).await?;
                true
            }
            Control::Close(code, reason) => {
                self.ws.write_frame(Frame::close(code, reason.as_bytes())).await?;
                self.sent_close = true;
                true
            }
        };
        self.ws.flush().await?;
        Ok(closed)
    }
}

/// A data frame of the connection's encoding (binary for MessagePack, text for JSON).
fn data_frame(encoding: Encoding, buf: &[u8]) -> Frame<'_> {
    let payload = Payload::Borrowed(buf);
    match encoding {
        Encoding::MsgPack => Frame::binary(payload),
        Encoding::Json => Frame::text(payload),
    }
}

/// Records `switchyard_edge_delivery_latency_seconds`: from the event's `ts`
/// (stamped by the router when it took the event in) to this frame's write,
/// once per frame, for the oldest live event in it. Replayed events are left
/// out: their age says how long the client was away, not how slow we are.
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
