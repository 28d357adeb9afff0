//! The hub: which users have connections on this node, and the NATS
//! subscriptions that feed them.
//!
//! A cloneable [`Hub`] handle talks to one hub task over a bounded channel.
//! The hub task owns the user → connections table and the sweeper
//! (heartbeat pings, idle and token-expiry closes) that runs over every
//! connection once per tick: one timer for the node, not one per connection.
//! Each user with local connections gets a pump task that owns that user's
//! live subscription and fans each delivery out to the user's connections;
//! when the last connection goes, the pump ends and its subscription is
//! dropped (unsubscribed).
//!
//! Broadcasts arrive on one node-wide subscription. A user's events must
//! reach each connection in `pos` order, and broadcasts interleave with the
//! user's own events, but two NATS subscriptions are two channels with no
//! order between them. The NATS client pushes messages into those channels
//! in socket order, which is stream order, so a pump restores the order:
//! whenever it takes a message it first gathers everything that arrived
//! before it on either path (its own subscription, and the broadcast relay,
//! drained under a lock into a broadcast channel), then merges by `pos`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use async_nats::Subscriber;
use futures::{FutureExt, StreamExt};
use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::subject::Subjects;
use switchyard_common::{CloseCode, Encoding, ErrorCode};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{now_ms, ConnHandle, Control, Delivery};

/// Why a connection could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub task is gone (node shutting down).
    #[error("hub stopped")]
    Stopped,
    /// NATS refused the user's subscription.
    #[error("cannot subscribe to the user's deliveries: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

enum Command {
    Register {
        conn: Arc<ConnHandle>,
        encoding: Encoding,
        done: oneshot::Sender<Result<(), HubError>>,
    },
    Unregister {
        conn: Arc<ConnHandle>,
    },
    Drain {
        spread: Duration,
        reason: &'static str,
    },
}

enum PumpCommand {
    Add(Arc<ConnHandle>),
    Remove(u64),
}

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::Sender<Command>,
    connections: watch::Receiver<usize>,
}

struct UserSlot {
    conns: usize,
    pump: mpsc::Sender<PumpCommand>,
}

/// Broadcasts waiting to be fanned out; this many may queue per pump before it lags.
const BROADCAST_BACKLOG: usize = 4096;

/// Wakes the hub task when a broadcast arrives, whoever polled the subscription.
struct NotifyWaker(Arc<Notify>);

impl Wake for NotifyWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

/// The node-wide broadcast subscription, drained into a broadcast channel by
/// whichever task needs it first (under a lock never held across `.await`).
struct BroadcastRelay {
    sub: Mutex<Subscriber>,
    waker: Waker,
    tx: broadcast::Sender<Delivery>,
}

impl BroadcastRelay {
    /// Moves every broadcast that has arrived into the channel; false when the subscription ended.
    fn drain(&self) -> bool {
        let mut cx = Context::from_waker(&self.waker);
        let mut sub = self.sub.lock().expect("relay lock");
        loop {
            match sub.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(msg)) => {
                    // No receiver just means no user is connected here.
                    let _ = self.tx.send(Delivery::from_message(&msg));
                }
                Poll::Ready(None) => return false,
                Poll::Pending => return true,
            }
        }
    }
}

struct HubTask {
    client: async_nats::Client,
    subjects: Subjects,
    users: HashMap<Arc<str>, UserSlot>,
    conns: HashMap<u64, (Arc<ConnHandle>, Encoding)>,
    relay: Arc<BroadcastRelay>,
    tasks: TaskTracker,
    heartbeat: Duration,
    slow_consumer: Duration,
    last_ping_ms: u64,
    connections: watch::Sender<usize>,
}

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

impl Hub {
    /// Starts the hub task: subscribes to broadcasts and runs the sweeper.
    pub async fn start(
        client: async_nats::Client,
        subjects: Subjects,
        sweep: SweepConfig,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Hub, async_nats::SubscribeError> {
        let sub = client.subscribe(subjects.live_all()).await?;
        let notify = Arc::new(Notify::new());
        let relay = Arc::new(BroadcastRelay {
            sub: Mutex::new(sub),
            waker: Waker::from(Arc::new(NotifyWaker(notify.clone()))),
            tx: broadcast::channel(BROADCAST_BACKLOG).0,
        });
        let (tx, rx) = mpsc::channel(1024);
        let (count_tx, count_rx) = watch::channel(0);
        let task = HubTask {
            client,
            subjects,
            users: HashMap::new(),
            conns: HashMap::new(),
            relay,
            tasks: tasks.clone(),
            heartbeat: sweep.heartbeat,
            slow_consumer: sweep.slow_consumer,
            last_ping_ms: now_ms(),
            connections: count_tx,
        };
        tasks.spawn(task.run(rx, notify, cancel));
        Ok(Hub {
            tx,
            connections: count_rx,
        })
    }

    /// Adds a connection; its user's deliveries flow to it (held until the
    /// connection releases them) once this returns and the NATS client has
    /// been flushed.
    pub async fn register(&self, conn: Arc<ConnHandle>, encoding: Encoding) -> Result<(), HubError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Register { conn, encoding, done })
            .await
            .map_err(|_| HubError::Stopped)?;
        wait.await.map_err(|_| HubError::Stopped)?
    }

    /// Tells every connection to reconnect elsewhere, with delays spread over
    /// `spread`, and closes it with 1001.
    pub async fn drain(&self, spread: Duration) {
        self.reconnect_all(spread, "draining").await;
    }

    /// Tells every connection to reconnect (and resume), with delays spread
    /// over `spread`, giving `reason`, and closes it with 1001.
    pub async fn reconnect_all(&self, spread: Duration, reason: &'static str) {
        if self.tx.send(Command::Drain { spread, reason }).await.is_err() {
            tracing::debug!("hub already stopped at drain");
        }
    }

    /// Waits until no connection is registered, or `timeout` passes; whether they are all gone.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let mut rx = self.connections.clone();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Removes a connection (idempotent).
    pub async fn unregister(&self, conn: Arc<ConnHandle>) {
        if self.tx.send(Command::Unregister { conn }).await.is_err() {
            tracing::debug!("hub already stopped at unregister");
        }
    }
}

impl HubTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, notify: Arc<Notify>, cancel: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY.min(self.heartbeat));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.tick().await;
        // Register the relay's waker before the first broadcast can arrive.
        self.relay.drain();
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                _ = notify.notified() => {
                    if !without_budget(|| self.relay.drain()) {
                        tracing::error!("broadcast subscription ended");
                        break;
                    }
                }
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Register { conn, encoding, done } => {
                let result = self.add(conn, encoding).await;
                if done.send(result).is_err() {
                    tracing::debug!("connection left before registration finished");
                }
            }
            Command::Unregister { conn } => self.remove(&conn),
            Command::Drain { spread, reason } => self.drain(spread, reason),
        }
        self.connections.send_replace(self.conns.len());
        metrics::gauge!("switchyard_edge_connections").set(self.conns.len() as f64);
        metrics::gauge!("switchyard_edge_users").set(self.users.len() as f64);
    }

    async fn add(&mut self, conn: Arc<ConnHandle>, encoding: Encoding) -> Result<(), HubError> {
        if let Some(slot) = self.users.get_mut(&conn.user) {
            if slot.pump.send(PumpCommand::Add(conn.clone())).await.is_ok() {
                slot.conns += 1;
                self.conns.insert(conn.id, (conn, encoding));
                return Ok(());
            }
            // The pump died (its subscription ended); start a fresh one below.
            self.users.remove(&conn.user);
        }
        let sub = self.client.subscribe(self.subjects.live(&conn.user)).await?;
        let (pump_tx, pump_rx) = mpsc::channel(64);
        let pump = Pump {
            sub,
            relay: self.relay.clone(),
            broadcasts: self.relay.tx.subscribe(),
            conns: vec![conn.clone()],
            own: Vec::new(),
            shared: Vec::new(),
        };
        self.tasks.spawn(pump.run(pump_rx));
        self.users.insert(
            conn.user.clone(),
            UserSlot {
                conns: 1,
                pump: pump_tx,
            },
        );
        self.conns.insert(conn.id, (conn, encoding));
        Ok(())
    }

    fn remove(&mut self, conn: &ConnHandle) {
        if self.conns.remove(&conn.id).is_none() {
            return;
        }
        let Some(slot) = self.users.get_mut(&conn.user) else {
            return;
        };
        slot.conns -= 1;
        if slot.conns == 0 {
            // Dropping the sender ends the pump, which drops (unsubscribes) the subscription.
            self.users.remove(&conn.user);
        } else if slot.pump.try_send(PumpCommand::Remove(conn.id)).is_err() {
            tracing::warn!(
                conn = conn.id,
                "pump busy; connection will be pruned when its queue closes"
            );
        }
    }

    fn drain(&self, spread: Duration, reason: &'static str) {
        let n = self.conns.len().max(1) as u64;
        for (i, (conn, encoding)) in self.conns.values().enumerate() {
            let after_ms = spread.as_millis() as u64 * i as u64 / n;
            let mut frame = Vec::new();
            encode_server_frame(*encoding, &ServerFrame::Reconnect { after_ms, reason }, &mut frame);
            conn.try_control(Control::Frame(frame.into_boxed_slice()));
            conn.try_control(Control::Close(CloseCode::GoingAway.code(), reason));
        }
        tracing::info!(
            connections = self.conns.len(),
            reason,
            "reconnect sent to every connection"
        );
    }

    /// Heartbeat pings (every heartbeat), idle closes and token-expiry closes
    /// (checked every second), for every connection.
    fn sweep(&mut self) {
        let now = now_ms();
        let instant = std::time::Instant::now();
        let ping = now.saturating_sub(self.last_ping_ms) >= self.heartbeat.as_millis() as u64;
        if ping {
            self.last_ping_ms = now;
        }
        let idle_limit = 2 * self.heartbeat.as_millis() as u64;
        for (conn, encoding) in self.conns.values() {
            let (full_since, drop_pending) = {
                let q = conn.outbound().lock();
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
                encode_server_frame(*encoding, &err, &mut frame);
                conn.close_once(CloseCode::TokenExpired, "token expired", Some(frame));
            } else if full_since.is_some_and(|t| instant.duration_since(t) >= self.slow_consumer) {
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

/// Runs `f` with tokio's cooperative budget lifted, so channel polls inside
/// it report what they hold instead of yielding.
fn without_budget<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::unconstrained(async move { f() })
        .now_or_never()
        .expect("a synchronous closure is always ready")
}

/// Fans one user's deliveries, and the node's broadcasts, out to that
/// user's connections on this node, in `pos` order.
struct Pump {
    sub: Subscriber,
    relay: Arc<BroadcastRelay>,
    broadcasts: broadcast::Receiver<Delivery>,
    conns: Vec<Arc<ConnHandle>>,
    /// Gathered from the user's own subscription, in arrival order.
    own: Vec<Delivery>,
    /// Gathered broadcasts, in arrival order.
    shared: Vec<Delivery>,
}

impl Pump {
    async fn run(mut self, mut commands: mpsc::Receiver<PumpCommand>) {
        loop {
            if self.shared.is_empty() {
                tokio::select! {
                    biased;
                    cmd = commands.recv() => match cmd {
                        Some(PumpCommand::Add(c)) => self.conns.push(c),
                        Some(PumpCommand::Remove(id)) => self.conns.retain(|c| c.id != id),
                        None => break,
                    },
                    msg = self.sub.next() => match msg {
                        Some(msg) => self.own.push(Delivery::from_message(&msg)),
                        None => break,
                    },
                    b = self.broadcasts.recv() => match b {
                        Ok(d) => self.shared.push(d),
                        Err(broadcast::error::RecvError::Lagged(n)) => self.lagged(n),
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            } else {
                // Broadcasts are held back from the last round: finish them
                // first, but let other tasks run.
                tokio::task::yield_now().await;
            }
            // Outside tokio's cooperative budget: a budget-exhausted channel
            // would report "empty" while holding messages, and a round must
            // see everything that has arrived.
            without_budget(|| self.round());
        }
    }

    /// One merge round (run without tokio's budget). The NATS client pushes messages into the two
    /// channels in socket order (stream order), so:
    /// (A) broadcasts taken before (B) the user's own messages are complete:
    ///     every own message with a smaller `pos` was pushed before them, so B has it;
    /// own messages taken in B are complete after (C) another broadcast drain;
    /// broadcasts first seen in C are safe only up to the largest `pos` seen
    /// in A and B; later ones wait for the next round (which starts at once).
    fn round(&mut self) {
        self.take_broadcasts(); // A
        let safe = self.shared.len();
        while let Some(Some(msg)) = self.sub.next().now_or_never() {
            self.own.push(Delivery::from_message(&msg)); // B
        }
        let limit = self
            .own
            .iter()
            .chain(&self.shared[..safe])
            .filter_map(|d| d.pos)
            .max()
            .unwrap_or(0);
        self.take_broadcasts(); // C
        let split = self.shared[safe..]
            .iter()
            .position(|d| d.pos.is_some_and(|p| p > limit))
            .map_or(self.shared.len(), |i| safe + i);
        self.dispatch(split);
    }

    fn take_broadcasts(&mut self) {
        self.relay.drain();
        loop {
            match self.broadcasts.try_recv() {
                Ok(d) => self.shared.push(d),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.lagged(n),
                Err(_) => break,
            }
        }
    }

    fn lagged(&self, n: u64) {
        tracing::warn!(
            missed = n,
            "broadcasts lagged behind; connections will see a dropped notice"
        );
        for c in &self.conns {
            c.missed(n);
        }
    }

    /// Merges all own messages with the first `shared_upto` broadcasts by
    /// `pos` (each path keeps its own order; events without `pos` go out as
    /// they come) and hands each event to every connection; broadcasts past
    /// `shared_upto` stay for the next round.
    fn dispatch(&mut self, shared_upto: usize) {
        metrics::counter!("switchyard_edge_deliveries_in_total").increment((self.own.len() + shared_upto) as u64);
        let (mut a, mut b) = (0, 0);
        while a < self.own.len() || b < shared_upto {
            let take_own = match (self.own.get(a), self.shared[..shared_upto].get(b)) {
                (Some(x), Some(y)) => match (x.pos, y.pos) {
                    (Some(px), Some(py)) => px < py,
                    (None, _) => true,
                    (Some(_), None) => false,
                },
                (Some(_), None) => true,
                _ => false,
            };
            let d = if take_own {
                a += 1;
                &self.own[a - 1]
            } else {
                b += 1;
                &self.shared[b - 1]
            };
            for c in &self.conns {
                c.deliver(d.clone());
            }
        }
        self.own.clear();
        self.shared.drain(..shared_upto);
    }
}
