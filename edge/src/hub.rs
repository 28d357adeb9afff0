//! The hub: which users have connections on this node, and the one NATS
//! subscription per such user that feeds them.
//!
//! A cloneable [`Hub`] handle talks to one hub task over a bounded channel.
//! The hub task owns the user → connections table, the node-wide broadcast
//! subscription, and the sweeper (heartbeat pings, idle and token-expiry
//! closes) that runs over every connection once per tick: one timer for the
//! node, not one per connection. Each user with local connections gets a
//! pump task that owns that user's NATS subscription and fans each delivery
//! out to the user's connections; when the last connection goes, the pump
//! ends and its subscription is dropped (unsubscribed).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subscriber;
use futures::StreamExt;
use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::subject::Subjects;
use switchyard_common::{CloseCode, Encoding, ErrorCode};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{now_ms, ConnHandle, Control};

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
}

enum PumpCommand {
    Add(Arc<ConnHandle>),
    Remove(u64),
}

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::Sender<Command>,
}

struct UserSlot {
    conns: usize,
    pump: mpsc::Sender<PumpCommand>,
}

struct HubTask {
    client: async_nats::Client,
    subjects: Subjects,
    users: HashMap<Arc<str>, UserSlot>,
    conns: HashMap<u64, (Arc<ConnHandle>, Encoding)>,
    tasks: TaskTracker,
    heartbeat: Duration,
}

/// Sweeper settings.
#[derive(Debug, Clone, Copy)]
pub struct SweepConfig {
    /// Ping interval; two silent intervals close the connection.
    pub heartbeat: Duration,
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
        let broadcast = client.subscribe(subjects.broadcast()).await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = HubTask {
            client,
            subjects,
            users: HashMap::new(),
            conns: HashMap::new(),
            tasks: tasks.clone(),
            heartbeat: sweep.heartbeat,
        };
        tasks.spawn(task.run(rx, broadcast, cancel));
        Ok(Hub { tx })
    }

    /// Adds a connection; its user's deliveries flow to it once this returns
    /// and the NATS client has been flushed.
    pub async fn register(&self, conn: Arc<ConnHandle>, encoding: Encoding) -> Result<(), HubError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Register { conn, encoding, done })
            .await
            .map_err(|_| HubError::Stopped)?;
        wait.await.map_err(|_| HubError::Stopped)?
    }

    /// Removes a connection (idempotent).
    pub async fn unregister(&self, conn: Arc<ConnHandle>) {
        if self.tx.send(Command::Unregister { conn }).await.is_err() {
            tracing::debug!("hub already stopped at unregister");
        }
    }
}

impl HubTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut broadcast: Subscriber, cancel: CancellationToken) {
        let mut sweep = tokio::time::interval(self.heartbeat);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                msg = broadcast.next() => match msg {
                    Some(msg) => {
                        for (conn, _) in self.conns.values() {
                            conn.deliver(msg.payload.clone());
                        }
                    }
                    None => {
                        tracing::error!("broadcast subscription ended");
                        break;
                    }
                },
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
        }
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
        let sub = self.client.subscribe(self.subjects.deliver(&conn.user)).await?;
        let (pump_tx, pump_rx) = mpsc::channel(64);
        self.tasks.spawn(pump(sub, vec![conn.clone()], pump_rx));
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

    /// Heartbeat pings, idle closes and token-expiry closes, for every connection.
    fn sweep(&self) {
        let now = now_ms();
        let idle_limit = 2 * self.heartbeat.as_millis() as u64;
        for (conn, encoding) in self.conns.values() {
            if now.saturating_sub(conn.last_rx_ms.load(Ordering::Relaxed)) > idle_limit {
                metrics::counter!("switchyard_edge_closed_total", "reason" => "heartbeat").increment(1);
                conn.try_control(Control::Close(CloseCode::HeartbeatTimeout.code(), "heartbeat timeout"));
            } else if conn.exp_s.load(Ordering::Relaxed).saturating_mul(1000) <= now {
                metrics::counter!("switchyard_edge_closed_total", "reason" => "token_expired").increment(1);
                let mut frame = Vec::new();
                let err = ServerFrame::Error {
                    id: None,
                    code: ErrorCode::TokenExpired.as_str(),
                    message: "token expired",
                };
                encode_server_frame(*encoding, &err, &mut frame);
                conn.try_control(Control::Frame(frame));
                conn.try_control(Control::Close(CloseCode::TokenExpired.code(), "token expired"));
            } else {
                conn.try_control(Control::Ping);
            }
        }
    }
}

/// Fans one user's deliveries out to that user's connections on this node.
async fn pump(mut sub: Subscriber, mut conns: Vec<Arc<ConnHandle>>, mut commands: mpsc::Receiver<PumpCommand>) {
    loop {
        tokio::select! {
            biased;
            cmd = commands.recv() => match cmd {
                Some(PumpCommand::Add(c)) => conns.push(c),
                Some(PumpCommand::Remove(id)) => conns.retain(|c| c.id != id),
                None => break,
            },
            msg = sub.next() => match msg {
                Some(msg) => {
                    metrics::counter!("switchyard_edge_deliveries_in_total").increment(1);
                    for c in &conns {
                        c.deliver(msg.payload.clone());
                    }
                }
                None => break,
            },
        }
    }
}
