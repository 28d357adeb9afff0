//! The control service: answers subscription-change requests from edges.
//!
//! Serves `<prefix>.control` in the routers' queue group. A change is
//! validated, authorized, written to the subscription bucket and applied to
//! this router's index before `ok` goes back; other routers apply it from
//! their watchers and check that they have before matching (see
//! [`crate::store`]). Requests are served concurrently (bounded), since an
//! authorization request to the application may take a while.

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
use crate::state::{error, RouterState};
use crate::store::{Change, Store, StoreError};

/// Most control requests in progress at once on one router.
const CONCURRENCY: usize = 64;

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
    pub async fn serve(self, requests: Subscriber, cancel: CancellationToken) {
        let this = &self;
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

    /// Decides and carries out one request.
    pub async fn handle(&self, req: &ControlRequest) -> ControlReply {
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
                    if let Decision::Deny(m) = self.authz.subscribe(caller, &sub).await {
                        return Err(error(ErrorCode::Forbidden, m));
                    }
                    // The per-user cap counts what every router accepted.
                    self.store.catch_up().await.map_err(unavailable)?;
                    self.state.check_room_for(user, &sub.name)?;
                    self.state.check_type_dimensions(&sub)?;
                    let change = Change::Subscribe {
                        user: user.to_string(),
                        sub,
                    };
                    self.store.put_and_apply(&change).await.map_err(unavailable)?;
                    Ok(ControlReply::Ok)
                }
                ControlOp::Unsubscribe { sub } => {
                    let name = name_field(sub, "subscription name", ids::is_valid_sub_name)
                        .map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
                    let change = Change::Unsubscribe {
                        user: user.to_string(),
                        name: name.to_string(),
                    };
                    self.store.put_and_apply(&change).await.map_err(unavailable)?;
                    Ok(ControlReply::Ok)
                }
                ControlOp::List => {
                    self.store.catch_up().await.map_err(unavailable)?;
                    Ok(ControlReply::Subs(self.state.list(user)))
                }
                ControlOp::Join { room } => {
                    let room = name_field(room, "room name", ids::is_valid_room)
                        .map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
                    if let Decision::Deny(m) = self.authz.join(caller, room).await {
                        return Err(error(ErrorCode::Forbidden, m));
                    }
                    let change = Change::Join {
                        room: room.to_string(),
                        user: user.to_string(),
                    };
                    self.store.put_and_apply(&change).await.map_err(unavailable)?;
                    Ok(ControlReply::Ok)
                }
                ControlOp::Leave { room } => {
                    let room = name_field(room, "room name", ids::is_valid_room)
                        .map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
                    let change = Change::Leave {
                        room: room.to_string(),
                        user: user.to_string(),
                    };
                    self.store.put_and_apply(&change).await.map_err(unavailable)?;
                    Ok(ControlReply::Ok)
                }
            }
        }
        .await;
        result.unwrap_or_else(|e| e)
    }
}

fn unavailable(e: StoreError) -> ControlReply {
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
