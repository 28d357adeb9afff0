//! Commands from the router tier for every edge (the application API's
//! fleet-wide work): disconnect a user, count connections, confirm that
//! revocations are in force.
//!
//! Every edge subscribes to `<prefix>.edges.command` (no queue group: each
//! must answer) and answers each command with its own id, so the router
//! can tell when every live edge has answered. Only this node's user table
//! is read; nothing here waits on NATS except the revocation check, which
//! is served concurrently (bounded) so it cannot hold up other commands.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::command::{self, EdgeAnswer, EdgeCommand, EdgeOutcome};
use switchyard_common::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::intake::UserTable;
use crate::revocations::Revocations;

/// Commands served at once.
const CONCURRENCY: usize = 16;
/// How long an edge waits for a revocation to reach it before saying it failed.
const REVOCATION_WAIT: Duration = Duration::from_millis(1500);

/// What answering commands needs.
pub struct Commands {
    /// The node's client (answers).
    pub client: async_nats::Client,
    /// This node's id.
    pub edge: String,
    /// The node's connections.
    pub table: Arc<UserTable>,
    /// The revocations in force here.
    pub revocations: Arc<Revocations>,
}

impl Commands {
    /// Answers commands from `sub` until `cancel`.
    pub async fn serve(self, sub: async_nats::Subscriber, cancel: CancellationToken) {
        let this = &self;
        sub.take_until(cancel.cancelled())
            .for_each_concurrent(CONCURRENCY, |msg| async move {
                let Some(reply) = msg.reply else { return };
                let outcome = match command::decode::<EdgeCommand>(&msg.payload) {
                    Ok(cmd) => this.run(cmd).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable edge command");
                        EdgeOutcome::Failed("undecodable command".into())
                    }
                };
                let answer = EdgeAnswer {
                    edge: this.edge.clone(),
                    outcome,
                };
                if let Err(e) = this.client.publish(reply, command::encode(&answer).into()).await {
                    tracing::warn!(error = %e, "edge command answer failed");
                }
            })
            .await;
    }

    /// Carries out one command.
    pub async fn run(&self, cmd: EdgeCommand) -> EdgeOutcome {
        match cmd {
            EdgeCommand::Disconnect {
                user,
                reconnect,
                reason,
            } => EdgeOutcome::Connections(self.disconnect(&user, reconnect, reason.as_deref())),
            EdgeCommand::Count { users } => EdgeOutcome::Counts(
                users
                    .into_iter()
                    .filter_map(|u| {
                        let n = self.table.connection_count_of(&u) as u32;
                        (n > 0).then_some((u, n))
                    })
                    .collect(),
            ),
            EdgeCommand::Stats => EdgeOutcome::Stats {
                connections: self.table.connections_now() as u64,
            },
            EdgeCommand::ExpectSnapshot { user, sub } => {
                let conns = self.table.connections_of(&user);
                for conn in &conns {
                    conn.expect_snapshot(&sub);
                }
                EdgeOutcome::Connections(conns.len() as u64)
            }
            EdgeCommand::Snapshot { user, sub, bodies } => {
                let bodies = crate::snapshot::bodies(bodies);
                let conns = self.table.connections_of(&user);
                for conn in &conns {
                    conn.snapshot_arrived(&sub, &bodies);
                }
                EdgeOutcome::Connections(conns.len() as u64)
            }
            EdgeCommand::Revoked { revision } => {
                if self.revocations.wait_applied(revision, REVOCATION_WAIT).await {
                    EdgeOutcome::Applied
                } else {
                    EdgeOutcome::Failed(format!("revision {revision} not applied in time"))
                }
            }
        }
    }

    /// Closes every connection of `user` here with 4003 (after `reconnect`
    /// with `after_ms` 0 when asked); how many this closed (a connection
    /// already closing is not counted again, so a repeated call counts 0).
    fn disconnect(&self, user: &str, reconnect: bool, reason: Option<&str>) -> u64 {
        let conns = self.table.connections_of(user);
        let mut closed = 0u64;
        for conn in &conns {
            let frame = reconnect.then(|| {
                let mut frame = Vec::new();
                let reconnect = ServerFrame::Reconnect {
                    after_ms: 0,
                    reason: reason.unwrap_or("disconnected"),
                };
                encode_server_frame(conn.encoding, &reconnect, &mut frame);
                frame
            });
            closed += u64::from(conn.close_once(CloseCode::Disconnected, "disconnected by the application", frame));
        }
        if closed > 0 {
            tracing::info!(
                user,
                connections = closed,
                reconnect,
                "user disconnected by the application"
            );
        }
        closed
    }
}
