//! The hub: the connections on this node, and the sweeper that looks after
//! them.
//!
//! Registering a connection puts it in the user table that the live intake
//! dispatches to ([`crate::intake`]), which is also the node's one list of
//! connections (for the sweeper and for draining), then waits until the user's delivery
//! partition has acknowledged this node's presence of the user
//! ([`crate::presence`]); the answer holds the user's `ready.pos` and
//! `epoch`. The sweeper runs over every connection once per tick (heartbeat
//! pings, idle, token-expiry and slow-consumer closes): one timer for the
//! node, not one per connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::{CloseCode, ErrorCode};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use switchyard_runtime::now_ms;

use crate::conn::{ConnHandle, Control};
use crate::intake::{RegisterError, Registration, UserTable};

/// How often the sweeper looks at every connection (pings go out every heartbeat).
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Sweeper settings.
#[derive(Debug, Clone, Copy)]
pub struct SweepConfig {
    /// Ping interval; two silent intervals close the connection.
    pub heartbeat: Duration,
    /// A queue full this long closes the connection with 4009.
    pub slow_consumer: Duration,
}

/// Handle to the node's connections.
#[derive(Clone)]
pub struct Hub {
    table: Arc<UserTable>,
}

impl Hub {
    /// A hub over `table`, with its sweeper running until `cancel`.
    pub fn start(table: Arc<UserTable>, sweep: SweepConfig, tasks: &TaskTracker, cancel: CancellationToken) -> Hub {
        let hub = Hub { table };
        tasks.spawn(hub.clone().sweeper(sweep, cancel));
        hub
    }

    /// The user table the live intake dispatches to.
    pub fn table(&self) -> &Arc<UserTable> {
        &self.table
    }

    /// Adds a connection; its user's live deliveries flow to it (held until
    /// the connection releases them) from the moment this is called, and the
    /// answer says from which `pos` on they are complete.
    pub async fn register(&self, conn: Arc<ConnHandle>, wait: Duration) -> Result<Registration, RegisterError> {
        let (reply, answer) = oneshot::channel();
        self.table.add(conn, reply);
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RegisterError::Stopped),
            Err(_) => Err(RegisterError::Unavailable),
        }
    }

    /// Removes a connection (idempotent).
    pub fn unregister(&self, conn: &ConnHandle) {
        self.table.remove(conn);
    }

    /// Tells every connection to reconnect elsewhere, with delays spread over
    /// `spread`, and closes it with 1001.
    pub fn drain(&self, spread: Duration) {
        self.reconnect_all(spread, "draining");
    }

    /// Tells every connection to reconnect (and resume), with delays spread
    /// over `spread`, giving `reason`, and closes it with 1001.
    pub fn reconnect_all(&self, spread: Duration, reason: &'static str) {
        let conns = self.table.connections();
        let n = conns.len().max(1) as u64;
        for (i, conn) in conns.iter().enumerate() {
            let after_ms = spread.as_millis() as u64 * i as u64 / n;
            let mut frame = Vec::new();
            encode_server_frame(conn.encoding, &ServerFrame::Reconnect { after_ms, reason }, &mut frame);
            conn.try_control(Control::Frame(frame.into_boxed_slice()));
            conn.try_control(Control::Close(CloseCode::GoingAway.code(), reason));
        }
        tracing::info!(connections = conns.len(), reason, "reconnect sent to every connection");
    }

    /// Waits until no connection is registered, or `timeout` passes; whether they are all gone.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let mut rx = self.table.connection_count();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn sweeper(self, sweep: SweepConfig, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY.min(sweep.heartbeat));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ping_ms = now_ms();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = now_ms();
            let ping = now.saturating_sub(last_ping_ms) >= sweep.heartbeat.as_millis() as u64;
            if ping {
                last_ping_ms = now;
            }
            let instant = std::time::Instant::now();
            let idle_limit = 2 * sweep.heartbeat.as_millis() as u64;
            for conn in self.table.connections() {
                let (full_since, drop_pending) = {
                    let q = conn.queue();
                    (q.full_since(), q.dropped_pending_since().is_some())
                };
                if now.saturating_sub(conn.last_rx_ms.load(Ordering::Relaxed)) > idle_limit {
                    conn.close_once(CloseCode::HeartbeatTimeout, "heartbeat timeout", None);
                } else if conn.exp_s.load(Ordering::Relaxed).saturating_mul(1000) <= now {
                    let mut frame = Vec::new();
                    let err = ServerFrame::Error {
                        id: None,
                        code: ErrorCode::TokenExpired.as_str(),
                        message: "token expired",
                    };
                    encode_server_frame(conn.encoding, &err, &mut frame);
                    conn.close_once(CloseCode::TokenExpired, "token expired", Some(frame));
                } else if full_since.is_some_and(|t| instant.duration_since(t) >= sweep.slow_consumer) {
                    conn.close_once(CloseCode::SlowConsumer, "slow consumer", None);
                } else {
                    if drop_pending {
                        conn.request_dropped_notice();
                    }
                    if ping {
                        conn.request_ping();
                    }
                }
            }
        }
    }
}
