//! Announcing this node's users to their delivery partitions, and saying
//! that the node is alive.
//!
//! One task serves every partition: whenever the user table has changes it
//! sends each partition, in one request (`<prefix>.reg.<p>`), the users
//! that came or went since the last announcement (or the whole set when the
//! partition does not know this node), one request in flight per partition
//! so they arrive in order. The answer releases every connection that
//! waited for it with the partition's `pos` and `epoch`. A partition that
//! answers `late` stored deliveries it could not send here; the
//! connections that were already live are told to reconnect and resume.
//! Every second the node publishes its id on `<prefix>.edges.heartbeat`;
//! routers forget the users of a node that stops.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use switchyard_common::client::{encode_server_frame, ServerFrame};
use switchyard_common::fanout::{PresenceReply, PresenceUpdate};
use switchyard_common::subject::Subjects;
use switchyard_common::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::intake::{RegisterError, RegisterReply, Registration, UserTable};

/// How often the node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Users per announcement message (a full set is split into several).
const USERS_PER_MESSAGE: usize = 4096;
/// How long one announcement waits for its partition's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Longest pause before an unanswered announcement is tried again.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// How widely the reconnects after a late answer are spread.
const LATE_SPREAD_MS: u64 = 2000;

/// What one announcement carried, to put back if it fails.
struct Sent {
    partition: u32,
    full: bool,
    users: Vec<Arc<str>>,
    waiters: Vec<RegisterReply>,
    /// More users of a full set remain for the next message.
    more: bool,
}

/// Runs the announcer and the heartbeat until `cancel`.
pub async fn run(
    client: async_nats::Client,
    subjects: Subjects,
    edge_id: String,
    table: Arc<UserTable>,
    cancel: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = FuturesUnordered::new();
    let mut backoff = Duration::from_millis(50);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        // Start an announcement for every partition that has something to say.
        if retry_at.is_none_or(|t| tokio::time::Instant::now() >= t) {
            retry_at = None;
            for p in 0..table.partitions() {
                if let Some(sent) = take(&table, p, &edge_id) {
                    let (update, sent) = sent;
                    let payload = rmp_serde::to_vec_named(&update).expect("a plain struct encodes");
                    let request = client.request(subjects.presence_register(p), payload.into());
                    in_flight.push(async move {
                        let answer = tokio::time::timeout(ANSWER_WAIT, request).await;
                        (sent, answer)
                    });
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = table.announce.notified() => {}
            _ = heartbeat.tick() => {
                if let Err(e) = client.publish(subjects.edges_heartbeat(), edge_id.clone().into()).await {
                    tracing::debug!(error = %e, "edge heartbeat failed");
                }
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {}
            Some((sent, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                let reply = match answer {
                    Ok(Ok(msg)) => rmp_serde::from_slice::<PresenceReply>(&msg.payload).ok(),
                    Ok(Err(e)) => {
                        tracing::debug!(partition = sent.partition, error = %e, "announcement not answered");
                        None
                    }
                    Err(_) => None,
                };
                match reply {
                    Some(reply) => {
                        backoff = Duration::from_millis(50);
                        answered(&table, sent, reply);
                    }
                    None => {
                        metrics::counter!("switchyard_edge_announce_retries_total").increment(1);
                        put_back(&table, sent);
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
    // Routers forget this node's users at once rather than after the edge timeout.
    if let Err(e) = client.publish(subjects.edges_bye(), edge_id.into()).await {
        tracing::debug!(error = %e, "edge bye failed");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    for p in 0..table.partitions() {
        for w in std::mem::take(&mut table.shard(p).waiters) {
            let _ = w.send(Err(RegisterError::Stopped));
        }
    }
}

/// Takes what partition `p` has to announce (marking it in flight).
fn take(table: &UserTable, p: u32, edge_id: &str) -> Option<(PresenceUpdate, Sent)> {
    let mut shard = table.shard(p);
    // Connections that gave up waiting (timed out, closed) need no answer.
    shard.waiters.retain(|w| !w.is_closed());
    if shard.in_flight
        || (!shard.full && shard.full_part.is_none() && shard.dirty.is_empty() && shard.waiters.is_empty())
    {
        return None;
    }
    // A full set starts over (`full`) or goes on in parts (`full_part`).
    let (full, part) = match (shard.full, shard.full_part) {
        (true, _) => (true, 0),
        (false, Some(k)) => (true, k),
        (false, None) => (false, 0),
    };
    let mut users: Vec<Arc<str>> = if shard.full {
        shard.dirty.clear();
        shard.users.keys().cloned().collect()
    } else {
        let n = shard.dirty.len().min(USERS_PER_MESSAGE);
        let taken: Vec<Arc<str>> = shard.dirty.iter().take(n).cloned().collect();
        for u in &taken {
            shard.dirty.remove(u);
        }
        taken
    };
    if users.len() > USERS_PER_MESSAGE {
        // The rest follows in the next messages.
        for u in users.drain(USERS_PER_MESSAGE..) {
            shard.dirty.insert(u);
        }
    }
    // Waiters are answered only by the message that announces the last of
    // the users waiting to be announced.
    let more = !shard.dirty.is_empty();
    let update = PresenceUpdate {
        edge: edge_id.to_string(),
        full,
        part,
        more: full && more,
        users: users
            .iter()
            .map(|u| (u.to_string(), shard.users.contains_key(u)))
            .collect(),
    };
    shard.full = false;
    shard.full_part = (full && more).then_some(part + 1);
    shard.in_flight = true;
    let waiters = if more {
        Vec::new()
    } else {
        std::mem::take(&mut shard.waiters)
    };
    Some((
        update,
        Sent {
            partition: p,
            full,
            users,
            waiters,
            more,
        },
    ))
}

/// An announcement went unanswered: what it said is still to be said.
fn put_back(table: &UserTable, sent: Sent) {
    {
        let mut shard = table.shard(sent.partition);
        shard.in_flight = false;
        if sent.full {
            // A full set that did not get through is sent again from its start.
            shard.full = true;
            shard.full_part = None;
        } else {
            shard.dirty.extend(sent.users);
        }
        shard.waiters.extend(sent.waiters);
    }
    table.announce.notify_one();
}

/// An announcement was answered.
fn answered(table: &UserTable, sent: Sent, reply: PresenceReply) {
    if reply.partitions != table.partitions() {
        tracing::error!(
            routers = reply.partitions,
            edge = table.partitions(),
            "SWITCHYARD_USER_PARTITIONS differs between routers and this edge; deliveries will go astray"
        );
    }
    if reply.resync {
        // The partition does not know this node: everything again, as a full set.
        let mut shard = table.shard(sent.partition);
        shard.in_flight = false;
        shard.full = true;
        shard.full_part = None;
        shard.waiters.extend(sent.waiters);
        drop(shard);
        table.announce.notify_one();
        return;
    }
    let registration = Registration {
        pos: reply.pos,
        epoch: reply.epoch,
        stream: reply.stream,
    };
    let mut shard = table.shard(sent.partition);
    shard.in_flight = false;
    if reply.late {
        tracing::warn!(
            partition = sent.partition,
            "the partition stored deliveries while it did not know this node: its live clients resume"
        );
        metrics::counter!("switchyard_edge_late_resyncs_total").increment(1);
        // Every connection already answered, live or still replaying: the
        // ones waiting for this very answer get its `pos` and are fine.
        let live: Vec<_> = shard
            .users
            .values()
            .flatten()
            .filter(|c| c.is_registered())
            .cloned()
            .collect();
        let n = live.len().max(1) as u64;
        for (i, conn) in live.iter().enumerate() {
            let mut frame = Vec::new();
            let after_ms = LATE_SPREAD_MS * i as u64 / n;
            encode_server_frame(
                conn.encoding,
                &ServerFrame::Reconnect {
                    after_ms,
                    reason: "resync",
                },
                &mut frame,
            );
            conn.close_once(CloseCode::GoingAway, "resync", Some(frame));
        }
    }
    drop(shard);
    for w in sent.waiters {
        // A connection that gave up waiting is simply gone.
        let _ = w.send(Ok(registration.clone()));
    }
    if sent.more {
        table.announce.notify_one();
    }
}
