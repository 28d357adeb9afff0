//! The application API (docs/PROTOCOL.md, "Application API over NATS"):
//! trusted back ends manage users, connections and subscriptions with
//! requests on `<prefix>.api.<method>`.
//!
//! Routers serve it in their queue group. What lives in the router tier
//! (subscriptions, rooms) goes through the same control path as the
//! client ops, without authorization; what lives at the edges
//! (connections) goes to every edge at once ([`crate::gather`]), and the
//! answer waits for every live edge, so a `result` has taken effect
//! fleet-wide. Revocations are written to their bucket first, then every
//! edge confirms it has them before the reply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use switchyard_common::api::{self, ApiCode, ApiError, ApiRequest, Empty, Revocation};
use switchyard_common::command::{self, EdgeAnswer, EdgeCommand, EdgeOutcome, RouterStats};
use switchyard_common::control::{ControlOp, ControlReply, ControlRequest};
use switchyard_common::revocation::{self as revoked, Entry};
use switchyard_common::subject::{Subjects, ROUTER_QUEUE_GROUP};
use switchyard_common::subscription::{RawSubscription, Subscription};
use switchyard_common::{Encoding, ErrorCode};
use switchyard_runtime::clock::now_ms;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::ControlService;
use crate::edges::EdgeSet;
use crate::gather::{gather, GatherError};

/// API requests in progress at once on one router.
const CONCURRENCY: usize = 64;
/// Tries of a revocation write that keeps losing to another write of the same key.
const REVOKE_ATTEMPTS: u32 = 8;
/// Members asked about per question to the edges (`room_presence`).
const MEMBERS_PER_QUESTION: usize = 5000;

/// What the API service works with.
pub struct ApiService {
    /// Core NATS: replies, questions to edges and routers.
    pub client: async_nats::Client,
    /// Subject names.
    pub subjects: Subjects,
    /// Subscriptions and rooms (the client ops' path).
    pub control: Arc<ControlService>,
    /// The revocation bucket.
    pub revocations: kv::Store,
    /// JetStream, for revocation writes with their own TTL.
    pub js: async_nats::jetstream::Context,
    /// The longest token lifetime (how long a user revocation is kept after `before`).
    pub max_token_lifetime: Duration,
    /// How long to wait for every edge or router to answer.
    pub wait: Duration,
    /// The live edges.
    pub edges: watch::Receiver<EdgeSet>,
    /// The live routers.
    pub routers: watch::Receiver<EdgeSet>,
    /// Before this, not every live edge has been heard from yet.
    pub edges_known_at: tokio::time::Instant,
}

/// Subscribes to every API method (in the routers' queue group).
pub async fn subscribe(
    client: &async_nats::Client,
    subjects: &Subjects,
) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
    client
        .queue_subscribe(subjects.api_wildcard(), ROUTER_QUEUE_GROUP.to_string())
        .await
}

impl ApiService {
    /// Serves API requests from `requests` until `cancel`.
    pub async fn serve(self, requests: async_nats::Subscriber, cancel: CancellationToken) {
        let this = &self;
        let prefix = format!("{}.api.", self.subjects.prefix());
        let prefix = prefix.as_str();
        requests
            .take_until(cancel.cancelled())
            .for_each_concurrent(CONCURRENCY, |msg| async move {
                let Some(reply_to) = msg.reply.clone() else {
                    return;
                };
                let content_type = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Content-Type"))
                    .map(|v| v.as_str());
                let enc = api::encoding_of(content_type);
                let method = msg.subject.as_str().strip_prefix(prefix).unwrap_or("");
                let label = api::METHODS
                    .iter()
                    .find(|m| **m == method)
                    .copied()
                    .unwrap_or("unknown");
                let reply = match api::parse_request(method, enc, &msg.payload) {
                    Ok(req) => this.handle(req, enc).await,
                    Err(e) => Err(e),
                };
                let (result, payload) = match reply {
                    Ok(payload) => ("ok", payload),
                    Err(e) => {
                        if e.code == ApiCode::Internal || e.code == ApiCode::Unavailable {
                            tracing::warn!(method = label, error = %e, "application API request failed");
                        }
                        (e.code.as_str(), api::encode_error(enc, &e))
                    }
                };
                metrics::counter!("switchyard_router_api_requests_total", "method" => label, "result" => result)
                    .increment(1);
                if let Err(e) = this.client.publish(reply_to, payload.into()).await {
                    tracing::warn!(error = %e, "application API reply failed");
                }
            })
            .await;
    }

    /// Carries out one request; the encoded `result` reply.
    pub async fn handle(&self, req: ApiRequest, enc: Encoding) -> Result<Vec<u8>, ApiError> {
        match req {
            ApiRequest::Disconnect {
                user,
                reconnect,
                reason,
            } => {
                let answers = self
                    .ask_edges(&EdgeCommand::Disconnect {
                        user,
                        reconnect,
                        reason,
                    })
                    .await?;
                let mut connections = 0u64;
                for outcome in answers {
                    match outcome {
                        EdgeOutcome::Connections(n) => connections += n,
                        other => return Err(failed(other)),
                    }
                }
                #[derive(Serialize)]
                struct Closed {
                    connections: u64,
                }
                Ok(api::encode_result(enc, &Closed { connections }))
            }
            ApiRequest::Revoke(r) => {
                self.revoke(r).await?;
                Ok(api::encode_result(enc, &Empty {}))
            }
            ApiRequest::Subscribe { user, raw } => {
                self.subscribe(user, *raw).await?;
                Ok(api::encode_result(enc, &Empty {}))
            }
            ApiRequest::Unsubscribe { user, sub } => {
                self.control(user, ControlOp::Unsubscribe { sub: sub.into() }, false)
                    .await?;
                Ok(api::encode_result(enc, &Empty {}))
            }
            ApiRequest::Join { user, room } => {
                self.control(user, ControlOp::Join { room: room.into() }, true).await?;
                Ok(api::encode_result(enc, &Empty {}))
            }
            ApiRequest::Leave { user, room } => {
                self.control(user, ControlOp::Leave { room: room.into() }, false)
                    .await?;
                Ok(api::encode_result(enc, &Empty {}))
            }
            ApiRequest::List { user } => {
                let ControlReply::Subs(subs) = self.control(user.clone(), ControlOp::List, false).await? else {
                    return Err(internal("list did not answer subscriptions"));
                };
                #[derive(Serialize)]
                struct Listing {
                    subs: Vec<Subscription>,
                    rooms: Vec<String>,
                }
                let rooms = self.control.state.rooms_of(&user);
                Ok(api::encode_result(enc, &Listing { subs, rooms }))
            }
            ApiRequest::Presence { users } => {
                let counts = self.connection_counts(users).await?;
                #[derive(Serialize)]
                struct Connections {
                    connections: u32,
                }
                #[derive(Serialize)]
                struct Users {
                    users: HashMap<String, Connections>,
                }
                let users = counts
                    .into_iter()
                    .map(|(u, connections)| (u, Connections { connections }))
                    .collect();
                Ok(api::encode_result(enc, &Users { users }))
            }
            ApiRequest::RoomPresence { room, limit } => {
                self.control.store.catch_up().await.map_err(store_unavailable)?;
                let members = self.control.state.members(&room);
                let (online, truncated) = self.online_members(&members, limit).await?;
                #[derive(Serialize)]
                struct RoomPresence {
                    members: usize,
                    online: Vec<String>,
                    truncated: bool,
                }
                let reply = RoomPresence {
                    members: members.len(),
                    online,
                    truncated,
                };
                Ok(api::encode_result(enc, &reply))
            }
            ApiRequest::Stats => Ok(api::encode_result(enc, &self.stats().await?)),
        }
    }

    /// A subscription or room change (or list) through the client ops'
    /// path, trusted. `adds`: the client op's refusals are this method's
    /// (`subscribe`, `join`); for the others a malformed name is `bad_request`.
    async fn control(&self, user: String, op: ControlOp, adds: bool) -> Result<ControlReply, ApiError> {
        let req = ControlRequest {
            user,
            rooms: Vec::new(),
            roles: Vec::new(),
            op,
        };
        match self.control.handle_trusted(&req).await {
            ControlReply::Error { code, message } => Err(ApiError {
                code: match code {
                    ErrorCode::InvalidFilter if adds => ApiCode::InvalidFilter,
                    ErrorCode::TooManySubscriptions => ApiCode::TooManySubscriptions,
                    ErrorCode::TooManyRooms => ApiCode::TooManyRooms,
                    ErrorCode::Unavailable => ApiCode::Unavailable,
                    ErrorCode::Internal => ApiCode::Internal,
                    _ => ApiCode::BadRequest,
                },
                message,
            }),
            reply => Ok(reply),
        }
    }

    /// `subscribe`; with `snapshot`, the snapshot goes to each connection
    /// the user has now, kept in order with the subscription's live events
    /// (the edges start watching before the subscription is written).
    async fn subscribe(&self, user: String, raw: RawSubscription) -> Result<(), ApiError> {
        let snapshot_of = match (raw.wants_snapshot(), raw.sub.as_str()) {
            (Ok(true), Some(name)) if switchyard_common::ids::is_valid_sub_name(name) => Some(name.to_string()),
            _ => None,
        };
        if let Some(sub) = &snapshot_of {
            let expect = EdgeCommand::ExpectSnapshot {
                user: user.clone(),
                sub: sub.clone(),
            };
            self.ask_edges(&expect).await?;
        }
        let reply = self.control(user.clone(), ControlOp::Subscribe(raw), true).await;
        let Some(sub) = snapshot_of else {
            return reply.map(|_| ());
        };
        // Sent even when the subscribe failed: it ends the edges' watch.
        let (bodies, done) = match reply {
            Ok(ControlReply::Snapshot(bodies)) => (bodies, Ok(())),
            other => (Vec::new(), other.map(|_| ())),
        };
        self.ask_edges(&EdgeCommand::Snapshot { user, sub, bodies }).await?;
        done
    }

    /// Connections per user, fleet-wide, for users with at least one.
    async fn connection_counts(&self, users: Vec<String>) -> Result<HashMap<String, u32>, ApiError> {
        let mut total: HashMap<String, u32> = HashMap::new();
        if users.is_empty() {
            return Ok(total);
        }
        for outcome in self.ask_edges(&EdgeCommand::Count { users }).await? {
            match outcome {
                EdgeOutcome::Counts(counts) => {
                    for (user, n) in counts {
                        *total.entry(user).or_default() += n;
                    }
                }
                other => return Err(failed(other)),
            }
        }
        Ok(total)
    }

    /// The room members with a connection (at most `limit`, sorted), and
    /// whether more are online than listed.
    async fn online_members(&self, members: &[Arc<str>], limit: usize) -> Result<(Vec<String>, bool), ApiError> {
        let mut online: Vec<String> = Vec::new();
        for chunk in members.chunks(MEMBERS_PER_QUESTION) {
            let asked = chunk.iter().map(|m| m.to_string()).collect();
            let mut counts: Vec<String> = self.connection_counts(asked).await?.into_keys().collect();
            online.append(&mut counts);
            if online.len() > limit {
                break;
            }
        }
        online.sort();
        let truncated = online.len() > limit;
        online.truncate(limit);
        Ok((online, truncated))
    }

    async fn stats(&self) -> Result<Stats, ApiError> {
        let mut stats = Stats::default();
        for outcome in self.ask_edges(&EdgeCommand::Stats).await? {
            match outcome {
                EdgeOutcome::Stats { connections } => {
                    stats.edges += 1;
                    stats.connections += connections;
                }
                other => return Err(failed(other)),
            }
        }
        // Users come from the delivery stage: one user on two edges is one user.
        let routers = self.routers.borrow().clone();
        let answers = gather(
            &self.client,
            self.subjects.routers_command(),
            Bytes::new(),
            &routers,
            self.wait,
            |buf| {
                let s = command::decode::<RouterStats>(buf).ok()?;
                Some((s.router.clone(), s))
            },
        )
        .await
        .map_err(fleet_unavailable)?;
        stats.routers = answers.len() as u64;
        let mut per_partition: HashMap<u32, u64> = HashMap::new();
        for answer in answers {
            for (p, n) in answer.partitions {
                // A partition changing hands may be counted by both: keep one.
                let entry = per_partition.entry(p).or_default();
                *entry = (*entry).max(n);
            }
        }
        stats.users = per_partition.values().sum();
        self.control.store.catch_up().await.map_err(store_unavailable)?;
        stats.subscriptions = self.control.state.subscription_count() as u64;
        stats.rooms = self.control.state.room_count() as u64;
        Ok(stats)
    }

    /// Writes a revocation (keeping the stronger of it and any already
    /// there), then waits until every edge has it in force.
    async fn revoke(&self, r: Revocation) -> Result<(), ApiError> {
        let now_s = now_ms() / 1000;
        let (key, entry) = match &r {
            Revocation::User { user, before } => (
                revoked::user_key(user),
                Entry {
                    at: *before,
                    expires: before.saturating_add(self.max_token_lifetime.as_secs()),
                },
            ),
            Revocation::Token { jti, until } => (
                revoked::token_key(jti),
                Entry {
                    at: *until,
                    expires: *until,
                },
            ),
        };
        if entry.expires <= now_s {
            // Every token it would cover has expired already.
            return Ok(());
        }
        let revision = self.write_revocation(&key, entry, now_s).await?;
        for outcome in self.ask_edges(&EdgeCommand::Revoked { revision }).await? {
            if outcome != EdgeOutcome::Applied {
                return Err(failed(outcome));
            }
        }
        Ok(())
    }

    /// Writes `entry` under `key` unless a stronger one is there, with a TTL
    /// that ends when no token it covers can be valid; the revision in force.
    async fn write_revocation(&self, key: &str, entry: Entry, now_s: u64) -> Result<u64, ApiError> {
        let subject = format!("$KV.{}.{key}", self.revocations.name);
        for _ in 0..REVOKE_ATTEMPTS {
            let current = self.revocations.entry(key).await.map_err(|e| {
                tracing::warn!(error = %e, "revocation bucket read failed");
                ApiError::unavailable("revocation bucket unavailable, try again")
            })?;
            let (last, existing) = match &current {
                Some(e) => (
                    e.revision,
                    (e.operation == kv::Operation::Put)
                        .then(|| Entry::decode(&e.value))
                        .flatten(),
                ),
                None => (0, None),
            };
            let merged = match existing {
                Some(old) if old.at >= entry.at && old.expires >= entry.expires => return Ok(last),
                Some(old) => Entry {
                    at: old.at.max(entry.at),
                    expires: old.expires.max(entry.expires),
                },
                None => entry,
            };
            let mut headers = HeaderMap::new();
            let ttl_s = merged.expires.saturating_sub(now_s).max(1);
            headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_s.to_string().as_str());
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.to_string().as_str(),
            );
            let written = async {
                self.js
                    .publish_with_headers(subject.clone(), headers, merged.encode().into())
                    .await?
                    .await
            };
            match written.await {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation write failed");
                    return Err(ApiError::unavailable("revocation bucket unavailable, try again"));
                }
            }
        }
        Err(ApiError::unavailable("the revocation kept changing; try again"))
    }

    /// Sends `cmd` to every edge and returns each live edge's outcome.
    async fn ask_edges(&self, cmd: &EdgeCommand) -> Result<Vec<EdgeOutcome>, ApiError> {
        // A router that has just started has not heard every edge yet.
        tokio::time::sleep_until(self.edges_known_at).await;
        let edges = self.edges.borrow().clone();
        gather(
            &self.client,
            self.subjects.edges_command(),
            command::encode(cmd).into(),
            &edges,
            self.wait,
            |buf| {
                let a = command::decode::<EdgeAnswer>(buf).ok()?;
                Some((a.edge, a.outcome))
            },
        )
        .await
        .map_err(fleet_unavailable)
    }
}

/// `stats`' result.
#[derive(Debug, Default, Serialize)]
struct Stats {
    edges: u64,
    routers: u64,
    connections: u64,
    users: u64,
    subscriptions: u64,
    rooms: u64,
}

/// Answers `<prefix>.routers.command` (the users present in the user
/// partitions this router delivers for) until `cancel`.
pub async fn serve_router_questions(
    client: async_nats::Client,
    subjects: Subjects,
    router: String,
    delivery: Arc<crate::delivery::Shared>,
    cancel: CancellationToken,
) {
    let Ok(mut questions) = client.subscribe(subjects.routers_command()).await else {
        tracing::error!("cannot subscribe to router questions; stats will be unavailable");
        return;
    };
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = questions.next() => match m {
                Some(m) => m,
                None => return,
            },
        };
        let Some(reply) = msg.reply else { continue };
        let mut partitions: Vec<(u32, u64)> = delivery
            .present_users
            .lock()
            .expect("present users lock")
            .iter()
            .map(|(p, n)| (*p, *n))
            .collect();
        partitions.sort_unstable();
        let answer = RouterStats {
            router: router.clone(),
            partitions,
        };
        if let Err(e) = client.publish(reply, command::encode(&answer).into()).await {
            tracing::warn!(error = %e, "router question answer failed");
        }
    }
}

fn failed(outcome: EdgeOutcome) -> ApiError {
    match outcome {
        EdgeOutcome::Failed(why) => ApiError::unavailable(format!("an edge could not do it: {why}")),
        _ => internal("an edge answered something else"),
    }
}

fn internal(message: &str) -> ApiError {
    ApiError {
        code: ApiCode::Internal,
        message: message.into(),
    }
}

fn fleet_unavailable(e: GatherError) -> ApiError {
    ApiError::unavailable(format!("{e}; try again"))
}

fn store_unavailable(e: crate::store::StoreError) -> ApiError {
    tracing::warn!(error = %e, "subscription store unavailable");
    ApiError::unavailable("subscription store unavailable, try again")
}
