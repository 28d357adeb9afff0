//! The control service: answers subscription-change requests from edges.
//!
//! Serves `<prefix>.control` in the routers' queue group. A change is
//! validated, authorized, written to the subscription bucket and applied to
//! this router's index before `ok` goes back; other routers apply it from
//! their watchers and check that they have before matching (see
//! [`crate::store`]). Requests are served concurrently (bounded), since an
//! authorization request to the application may take a while.
//!
//! An addition (`subscribe`, `join`) is counted against the user's cap and
//! written with a guard on the user's keys, retried when another router
//! changed them meanwhile, so the caps hold exactly across routers. A
//! removal of something absent writes nothing.

use std::sync::Arc;

use async_nats::Subscriber;
use futures::StreamExt;
use switchyard_common::control::{self, ControlOp, ControlReply, ControlRequest};
use switchyard_common::ids;
use switchyard_common::subject::{Subjects, ROUTER_QUEUE_GROUP};
use switchyard_common::subscription::name_field;
use switchyard_common::ErrorCode;
use tokio_util::sync::CancellationToken;

use crate::authz::{Authz, Caller, Decision};
use crate::change::Change;
use crate::state::{error, JoinCheck, RouterState};
use crate::store::{Store, StoreError};

/// Most control requests in progress at once on one router.
const CONCURRENCY: usize = 64;

/// Most tries of a guarded addition that keeps losing to other changes of
/// the same user's keys (each loss means another change of them landed).
const GUARD_ATTEMPTS: u32 = 32;

/// What an addition should do after counting.
enum Admit {
    /// Nothing to write (already there).
    Done,
    /// Write the change.
    Write,
}

/// What the control service works with.
pub struct ControlService {
    /// Publishes replies.
    pub client: async_nats::Client,
    /// The in-memory index.
    pub state: Arc<RouterState>,
    /// The subscription bucket.
    pub store: Store,
    /// Join and type authorization.
    pub authz: Authz,
    /// The latest keyed events, for snapshots.
    pub latest: Arc<crate::latest::Latest>,
}

/// Subscribes to control requests (in the routers' queue group).
pub async fn subscribe(
    client: &async_nats::Client,
    subjects: &Subjects,
) -> Result<Subscriber, async_nats::SubscribeError> {
    client
        .queue_subscribe(subjects.control(), ROUTER_QUEUE_GROUP.to_string())
        .await
}

impl ControlService {
    /// Serves control requests from `requests` (see [`subscribe`]) until cancelled.
    pub async fn serve(self: Arc<Self>, requests: Subscriber, cancel: CancellationToken) {
        let this = &*self;
        let served = requests
            .take_until(cancel.cancelled())
            .for_each_concurrent(CONCURRENCY, |msg| async move {
                let Some(reply_to) = msg.reply.clone() else {
                    tracing::warn!("control message without a reply subject ignored");
                    return;
                };
                let reply = match control::decode::<ControlRequest>(&msg.payload) {
                    Ok(req) => {
                        let reply = this.handle(&req).await;
                        let result = match &reply {
                            ControlReply::Error { code, .. } => code.as_str(),
                            _ => "ok",
                        };
                        metrics::counter!("switchyard_router_control_requests_total", "op" => op_name(&req), "result" => result).increment(1);
                        reply
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable control request");
                        metrics::counter!("switchyard_router_control_requests_total", "op" => "unknown", "result" => "internal").increment(1);
                        error(ErrorCode::Internal, "undecodable control request")
                    }
                };
                if let Err(e) = this.client.publish(reply_to, control::encode(&reply).into()).await {
                    tracing::error!(error = %e, "control reply failed");
                }
            });
        served.await;
    }

    /// Decides and carries out one request from an edge (on behalf of the user).
    pub async fn handle(&self, req: &ControlRequest) -> ControlReply {
        self.handle_as(req, false).await
    }

    /// Carries out one request from the application API: the application
    /// is trusted, so no type or room authorization; names and caps hold.
    pub async fn handle_trusted(&self, req: &ControlRequest) -> ControlReply {
        self.handle_as(req, true).await
    }

    async fn handle_as(&self, req: &ControlRequest, trusted: bool) -> ControlReply {
        if !ids::is_valid_user_id(&req.user) {
            return error(ErrorCode::Unauthorized, "invalid user id");
        }
        let user = req.user.as_str();
        let caller = Caller {
            user,
            roles: &req.roles,
            rooms: &req.rooms,
        };
        let result: Result<ControlReply, ControlReply> = async {
            match &req.op {
                ControlOp::Subscribe(raw) => {
                    let sub = self.state.check_subscription(raw)?;
                    if !trusted {
                        if let Decision::Deny(m) = self.authz.subscribe(caller, &sub).await {
                            return Err(error(ErrorCode::Forbidden, m));
                        }
                    }
                    self.state.check_type_dimensions(&sub)?;
                    let snapshot = raw.wants_snapshot().unwrap_or(false);
                    let name = sub.name.clone();
                    let change = Change::Subscribe {
                        user: user.to_string(),
                        sub,
                    };
                    self.add(&change, || {
                        self.state.check_room_for(user, &name).map(|()| Admit::Write)
                    })
                    .await?;
                    match (&change, snapshot) {
                        // After the subscription is written: see crate::latest.
                        (Change::Subscribe { sub, .. }, true) => {
                            Ok(ControlReply::Snapshot(self.latest.snapshot(sub).await))
                        }
                        _ => Ok(ControlReply::Ok),
                    }
                }
                ControlOp::Unsubscribe { sub } => {
                    let name = name_field(sub, "subscription name", ids::is_valid_sub_name)
                        .map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
                    self.remove(&Change::Unsubscribe {
                        user: user.to_string(),
                        name: name.to_string(),
                    })
                    .await
                }
                ControlOp::List => {
                    self.store.catch_up().await.map_err(unavailable)?;
                    Ok(ControlReply::Subs(self.state.list(user)))
                }
                ControlOp::Join { room } => {
                    let room = name_field(room, "room name", ids::is_valid_room)
                        .map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
                    if !trusted {
                        if let Decision::Deny(m) = self.authz.join(caller, room).await {
                            return Err(error(ErrorCode::Forbidden, m));
                        }
                    }
                    let change = Change::Join {
                        room: room.to_string(),
                        user: user.to_string(),
                    };
                    self.add(&change, || match self.state.check_join(user, room)? {
                        JoinCheck::AlreadyMember => Ok(Admit::Done),
                        JoinCheck::Join => Ok(Admit::Write),
                    })
                    .await
                }
                ControlOp::Leave { room } => {
                    let room = name_field(room, "room name", ids::is_valid_room)
                        .map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
                    self.remove(&Change::Leave {
                        room: room.to_string(),
                        user: user.to_string(),
                    })
                    .await
                }
            }
        }
        .await;
        result.unwrap_or_else(|e| e)
    }
}

impl ControlService {
    /// Writes an addition once `check` (run against an index that has
    /// applied every change of the user's keys) allows it, guarded so that
    /// no change of those keys lands between the count and the write.
    async fn add(
        &self,
        change: &Change,
        check: impl Fn() -> Result<Admit, ControlReply>,
    ) -> Result<ControlReply, ControlReply> {
        for attempt in 0..GUARD_ATTEMPTS {
            let seen = self.store.user_revision(change).await.map_err(unavailable)?;
            self.store.wait_applied(seen).await.map_err(unavailable)?;
            if let Admit::Done = check()? {
                return Ok(ControlReply::Ok);
            }
            match self.store.write(change, Some(seen)).await {
                Ok(revision) => {
                    self.store.wait_applied(revision).await.map_err(unavailable)?;
                    return Ok(ControlReply::Ok);
                }
                Err(StoreError::Conflict) => {
                    metrics::counter!("switchyard_router_store_conflicts_total").increment(1);
                    // Another change of this user's keys landed (or, on a
                    // cluster, is landing): count again after it.
                    tokio::time::sleep(std::time::Duration::from_millis(u64::from(attempt.min(20)))).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(unavailable(StoreError::Conflict))
    }

    /// Writes a removal, or nothing when there is nothing to remove.
    async fn remove(&self, change: &Change) -> Result<ControlReply, ControlReply> {
        if !self.store.is_present(change).await.map_err(unavailable)? {
            metrics::counter!("switchyard_router_absent_removals_total").increment(1);
            return Ok(ControlReply::Ok);
        }
        let revision = self.store.write(change, None).await.map_err(unavailable)?;
        self.store.wait_applied(revision).await.map_err(unavailable)?;
        Ok(ControlReply::Ok)
    }
}

fn unavailable(e: StoreError) -> ControlReply {
    if let StoreError::Full = e {
        tracing::error!(error = %e, "subscription store full");
        return error(ErrorCode::Unavailable, "subscription store full, try again later");
    }
    tracing::warn!(error = %e, "subscription store unavailable");
    error(ErrorCode::Unavailable, "subscription store unavailable, try again")
}

fn op_name(req: &ControlRequest) -> &'static str {
    match req.op {
        ControlOp::Subscribe(_) => "subscribe",
        ControlOp::Unsubscribe { .. } => "unsubscribe",
        ControlOp::List => "list",
        ControlOp::Join { .. } => "join",
        ControlOp::Leave { .. } => "leave",
    }
}
