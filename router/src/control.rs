//! The control service: answers subscription-change requests from edges.
//!
//! Serves `<prefix>.control` in the routers' queue group. Each request is
//! applied to [`RouterState`] before the reply is sent, so an `ok` holds for
//! every event this router matches afterwards.

use std::sync::Arc;

use async_nats::Subscriber;
use futures::StreamExt;
use switchyard_common::control::{self, ControlReply, ControlRequest};
use switchyard_common::subject::{Subjects, ROUTER_QUEUE_GROUP};
use switchyard_common::ErrorCode;
use tokio_util::sync::CancellationToken;

use crate::state::RouterState;

/// Subscribes to control requests (in the routers' queue group).
pub async fn subscribe(
    client: &async_nats::Client,
    subjects: &Subjects,
) -> Result<Subscriber, async_nats::SubscribeError> {
    client
        .queue_subscribe(subjects.control(), ROUTER_QUEUE_GROUP.to_string())
        .await
}

/// Serves control requests from `requests` (see [`subscribe`]) until cancelled.
pub async fn serve(
    client: async_nats::Client,
    mut requests: Subscriber,
    state: Arc<RouterState>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            msg = requests.next() => match msg { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!("control message without a reply subject ignored");
            continue;
        };
        let reply = match control::decode::<ControlRequest>(&msg.payload) {
            Ok(req) => {
                let reply = state.apply(&req);
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
                ControlReply::Error {
                    code: ErrorCode::Internal,
                    message: "undecodable control request".into(),
                }
            }
        };
        metrics::gauge!("switchyard_router_subscriptions").set(state.subscription_count() as f64);
        if let Err(e) = client.publish(reply_to, control::encode(&reply).into()).await {
            tracing::error!(error = %e, "control reply failed");
        }
    }
}

fn op_name(req: &ControlRequest) -> &'static str {
    use switchyard_common::control::ControlOp::*;
    match req.op {
        Subscribe(_) => "subscribe",
        Unsubscribe { .. } => "unsubscribe",
        List => "list",
        Join { .. } => "join",
        Leave { .. } => "leave",
    }
}
