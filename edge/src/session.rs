//! One WebSocket connection's task: authentication, the reader loop, and
//! the order of `ready`, replay and live events.
//!
//! One task per connection. It runs two futures side by side: this
//! module's session (auth, registration, resume, then answering frames)
//! and the connection's writer ([`ConnHandle::write_loop`]). The session
//! never writes to the socket: replies, pongs and close frames go to the
//! writer's control queue, which the writer serves before data, so a
//! backlog of events cannot hold them up. Live events mostly do not pass
//! through this task at all: the dispatcher writes them to an idle socket
//! itself ([`crate::conn`]).
//!
//! The reader ([`MessageReader`]) is cancel-safe, so the session can race
//! it against the connection's end.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::OpCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use switchyard_common::client::{
    decode_client_frame, encode_rpc_result, encode_server_frame, ClientOp, Resume, ServerFrame,
};
use switchyard_common::control::{ControlOp, ControlReply};
use switchyard_common::{CloseCode, Encoding, ErrorCode};
use tokio::io::ReadHalf;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::auth::Claims;
use switchyard_runtime::now_ms;

use crate::conn::{ConnHandle, ConnSettings, Control};
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

/// Runs one upgraded connection to its end: the connection's one task.
pub async fn run(
    node: Arc<Node>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    encoding: Encoding,
    deflate: Option<crate::deflate::Agreed>,
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
    // Our own reader (no buffer while idle) and our own frame writer
    // (frames as bytes that the dispatcher can also push): fastwebsockets
    // only did the handshake.
    let (rd, wr) = tokio::io::split(ws.into_inner());
    let conn = ConnHandle::new(
        node.next_conn_id(),
        encoding,
        conn_settings(&node.config),
        Some(Box::new(wr)),
    );
    let _deflate_count = deflate.map(|agreed| {
        conn.set_deflate(crate::deflate::FrameDeflater::new(&agreed, &node.config.deflate));
        crate::deflate::Negotiated::count()
    });
    let conn_done = node.cancel.child_token();
    metrics::counter!("switchyard_edge_connections_total").increment(1);
    let stall_limit = node.config.write_stall.max(node.config.slow_consumer);
    let linger = (!node.config.linger.is_zero()).then_some(node.config.linger);
    let mut reader = Reader {
        rd: MessageReader::new(rd, node.config.max_frame_bytes).with_deflate(deflate.is_some()),
        node: node.clone(),
        encoding,
        conn: conn.clone(),
        conn_done: conn_done.clone(),
        bad_frames: VecDeque::new(),
        ops: node.config.op_limiter(),
        early: VecDeque::new(),
    };
    let writer = conn.write_loop(&conn_done, &node.cancel, stall_limit, linger);
    let session = session(&mut reader, pre_auth);
    tokio::pin!(writer, session);
    let reason = tokio::select! {
        end = &mut writer => {
            // We sent a close: give the client a moment to answer it before
            // the socket goes, so it reads our close frame rather than a reset.
            if end.sent_close
                && tokio::time::timeout(CLOSE_GRACE, &mut session).await.is_err()
            {
                tracing::debug!(conn = conn.id, "client did not answer our close in time");
            }
            end.reason
        }
        () = &mut session => {
            // Let the writer send what the session left for it (a close
            // echo, an error and a close), briefly.
            conn_done.cancel();
            match tokio::time::timeout(CLOSE_GRACE, &mut writer).await {
                Ok(end) => end.reason,
                Err(_) => "socket stalled",
            }
        }
    };
    tracing::debug!(conn = conn.id, user = %conn.user(), reason, "connection closed");
    conn_done.cancel();
    node.hub.unregister(&conn);
    conn.detach();
}

/// How this node's connections send, from its configuration.
fn conn_settings(config: &crate::config::EdgeConfig) -> ConnSettings {
    ConnSettings {
        outbound: config.outbound(),
        hold_cap: config.queue_events,
        // Lingering for fuller batches and writing at once exclude each other.
        direct_writes: config.linger.is_zero(),
    }
}

/// The connection's protocol side: authenticate, register, start delivery
/// (with the resume), then answer frames until the connection ends.
async fn session(reader: &mut Reader, pre_auth: Option<PreAuth>) {
    let node = reader.node.clone();
    let conn = reader.conn.clone();
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
                    conn.control(Control::Close(
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
        return;
    };
    conn.authenticated(&claims.sub, claims.exp, claims.token_id());
    let registration = match Box::pin(node.hub.register(conn.clone(), node.config.register_timeout)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, conn = conn.id, user = %claims.sub, "cannot register connection with its delivery partition");
            reader
                .reply_error(None, ErrorCode::Unavailable, "delivery unavailable; reconnect later")
                .await;
            conn.control(Control::Close(1011, "delivery unavailable")).await;
            return;
        }
    };
    conn.mark_registered();
    // A revocation that arrived after the token was checked and before the
    // connection was in the user table did not see it (crate::revocations).
    if node.revocations.is_revoked(&claims.sub, &conn.token()) {
        crate::revocations::close_revoked(&conn);
        return;
    }
    let conn_name = format!("{}-{}", node.node_id, conn.id);
    let started = Box::pin(start_delivery(
        &node,
        reader,
        &conn,
        &conn_name,
        &claims,
        &registration,
        resume,
        auth_id,
    ))
    .await;
    match started {
        Ok(true) => {}
        // The client left while its resume was read: nothing to serve.
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, conn = %conn_name, user = %claims.sub, "cannot start delivery");
            reader
                .reply_error(
                    None,
                    ErrorCode::Unavailable,
                    "delivery log unavailable; reconnect later",
                )
                .await;
            conn.control(Control::Close(1011, "delivery log unavailable")).await;
            return;
        }
    }
    tracing::debug!(conn = %conn_name, user = %claims.sub, "connection ready");
    Box::pin(reader.serve(claims)).await;
}

/// Sends `ready`, replays the log when a resume was asked, sends `resumed`,
/// and then lets live deliveries through: the order docs/PROTOCOL.md promises ("What follows `ready`").
/// Ok(false) when the client left on the way.
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
) -> Result<bool, LogError> {
    let ready = ServerFrame::Ready {
        id: auth_id,
        conn: conn_name,
        user: &claims.sub,
        epoch: &reg.epoch,
        pos: reg.pos,
        server_time: now_ms(),
        heartbeat_ms: node.config.heartbeat.as_millis() as u64,
        limits: node.config.limits(),
    };
    let Some(resume) = resume else {
        // No resume: live events after `ready.pos`.
        reader.barrier(&ready, Some(reg.pos)).await;
        if conn.release(reg.pos) {
            resume_instead(reader, conn).await;
        }
        return Ok(true);
    };
    reader.barrier(&ready, None).await;
    let same_epoch = resume.epoch == reg.epoch;
    // The reads, paced by the node's log slots. The client is read from
    // meanwhile (pings answered, pongs noted, early frames kept for
    // later), so a resume waiting its turn in a storm is not taken for a
    // dead connection.
    let reads = async {
        // Never closed, so this waits its turn and always gets a permit.
        // Taken after `ready`, so a waiting client knows it is connected.
        let _log_slot = node.log_slots.acquire().await.ok();
        let log = node.log.user_log(&claims.sub, reg);
        let after = if same_epoch { resume.since.min(reg.pos) } else { 0 };
        let since = if same_epoch { resume.since } else { after };
        let mut replayed = node.log.replay(&log, after, since, reg.pos, conn).await?;
        let mut upto = reg.pos;
        // Live events that did not fit the hold while replaying are still in
        // the log: catch up from there (bounded), then switch to live.
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            if !conn.take_hold_overflow() {
                break;
            }
            upto = node.log.state(&log).await?.last_seq;
            let from = replayed.last_pos.max(after);
            let more = node.log.replay(&log, from, from, upto, conn).await?;
            replayed.count += more.count;
            replayed.last_pos = more.last_pos;
            // Disjoint ranges: what each subject holds after `since` adds up.
            for (n, m) in replayed.after_since.iter_mut().zip(more.after_since) {
                *n += m;
            }
        }
        let recovered = same_epoch
            && node
                .log
                .recovered(&log, resume.since, reg.pos, &replayed, conn.held_durable())
                .await?;
        Ok::<_, LogError>((replayed, upto, recovered))
    };
    let Some(read) = reader.while_reading(reads).await else {
        // The connection ended while it waited.
        return Ok(false);
    };
    let (replayed, upto, recovered) = read?;
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
    if conn.release(floor) {
        resume_instead(reader, conn).await;
    }
    tracing::debug!(conn = %conn_name, replayed = replayed.count, recovered, "resumed");
    Ok(true)
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
        .conn
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
    conn: Arc<ConnHandle>,
    conn_done: CancellationToken,
    /// Times (unix ms) of recent bad frames, for the budget.
    bad_frames: VecDeque<u64>,
    /// The op rate limit (checked after decoding: bad frames spend nothing).
    ops: crate::op_limit::OpLimiter,
    /// Data messages that arrived while the resume was read, handled after it.
    early: VecDeque<(OpCode, Bytes)>,
}

/// Most data messages kept while a resume is read; past it the client is
/// no longer read from until the resume is done (its TCP window fills).
const EARLY_FRAMES: usize = 16;

impl Reader {
    /// Runs `work` while reading from the client: pings are answered,
    /// pongs and frames keep the connection alive, and data messages wait
    /// in `early` (at most [`EARLY_FRAMES`]) for [`Reader::serve`].
    /// `None` when the connection ended first.
    async fn while_reading<T>(&mut self, work: impl std::future::Future<Output = T>) -> Option<T> {
        let mut work = std::pin::pin!(work);
        loop {
            if self.early.len() >= EARLY_FRAMES {
                return Some(work.await);
            }
            tokio::select! {
                done = &mut work => return Some(done),
                msg = self.next_message() => {
                    let msg = msg?;
                    self.conn.touch(now_ms());
                    if !matches!(msg.0, OpCode::Ping | OpCode::Pong) {
                        self.early.push_back(msg);
                    }
                }
            }
        }
    }

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
                    self.conn.control(Control::CloseEcho(p.into_boxed_slice())).await;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "read ended");
                    if let Some((code, reason)) = e.close() {
                        metrics::counter!("switchyard_edge_closed_total", "reason" => e.kind()).increment(1);
                        self.conn.control(Control::Close(code, reason)).await;
                    }
                    return None;
                }
            };
            if !self.conn.control(reply).await {
                tracing::debug!("read ended: writer gone");
                return None;
            }
        }
    }

    async fn send(&mut self, frame: &ServerFrame<'_>) {
        let mut buf = Vec::with_capacity(64);
        encode_server_frame(self.encoding, frame, &mut buf);
        self.conn.control(Control::Frame(buf.into_boxed_slice())).await;
    }

    /// Sends a frame after everything queued, waiting until it is written.
    async fn barrier(&mut self, frame: &ServerFrame<'_>, floor: Option<u64>) {
        let mut buf = Vec::with_capacity(256);
        encode_server_frame(self.encoding, frame, &mut buf);
        self.conn.barrier(buf, floor).await;
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
        self.conn.control(Control::Close(close.code(), "unauthorized")).await;
    }

    /// Waits for the first frame, which must be a valid `auth`.
    async fn frame_auth(&mut self) -> Option<(Claims, Option<Resume>, Option<u32>)> {
        let deadline = tokio::time::Instant::now() + self.node.config.auth_timeout;
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
        match self.node.verify(&token) {
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
    async fn serve(&mut self, mut claims: Claims) -> End {
        let conn = self.conn.clone();
        loop {
            let msg = match self.early.pop_front() {
                Some(m) => m,
                None => match self.next_message().await {
                    Some(m) => m,
                    None => return End::Gone,
                },
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
                        self.conn
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
        let mut snapshot_of: Option<String> = None;
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
                match self.node.verify(&token) {
                    Ok(fresh) if fresh.sub == claims.sub => {
                        conn.refreshed(fresh.exp, fresh.token_id());
                        *claims = fresh;
                        // As at connect: a revocation may have landed between the check and now.
                        if self.node.revocations.is_revoked(&claims.sub, &conn.token()) {
                            crate::revocations::close_revoked(conn);
                            return Some(End::Closed);
                        }
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
                        self.conn.control(Control::Frame(buf.into_boxed_slice())).await;
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
            ClientOp::Subscribe(raw) => {
                // Noted before the router can apply the subscription.
                if raw.wants_snapshot() == Ok(true) {
                    if let Some(name) = raw.sub.as_str() {
                        conn.expect_snapshot(name);
                        snapshot_of = Some(name.to_string());
                    }
                }
                ControlOp::Subscribe(raw)
            }
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
            Ok(ControlReply::Snapshot(bodies)) => {
                if let Some(name) = snapshot_of.take() {
                    conn.snapshot_arrived(&name, &crate::snapshot::bodies(bodies));
                }
                self.send(&ServerFrame::Ok { id }).await
            }
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
        if let Some(name) = &snapshot_of {
            // No snapshot came (refused, or the router did not answer): stop watching.
            conn.snapshot_arrived(name, &[]);
        }
        None
    }
}
