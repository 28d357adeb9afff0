//! The router's in-memory state: the subscription index and room table,
//! and the one place that applies control requests to them.
//!
//! Locks are `std::sync::RwLock`s held only for in-memory work, never across
//! an `.await`: matching takes a read lock, collects its targets and lets go
//! before anything is published.

use std::sync::{Arc, RwLock};

use switchyard_common::control::{ControlOp, ControlReply, ControlRequest};
use switchyard_common::ids;
use switchyard_common::subscription::{name_field, Subscription};
use switchyard_common::ErrorCode;

use crate::fast_index::FastIndex;
use crate::index::{IndexError, SubscriptionIndex};
use crate::rooms::Rooms;

/// Shared router state.
pub struct RouterState {
    /// The subscription index.
    pub index: RwLock<Box<dyn SubscriptionIndex>>,
    /// Room memberships.
    pub rooms: RwLock<Rooms>,
    max_subscriptions: usize,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ControlReply {
    ControlReply::Error {
        code,
        message: message.into(),
    }
}

impl RouterState {
    /// Empty state with the simple index.
    pub fn new(max_subscriptions: usize) -> Arc<RouterState> {
        Arc::new(RouterState {
            index: RwLock::new(Box::new(FastIndex::new())),
            rooms: RwLock::new(Rooms::new()),
            max_subscriptions,
        })
    }

    /// Applies one control request and says what to answer.
    pub fn apply(&self, req: &ControlRequest) -> ControlReply {
        if !ids::is_valid_user_id(&req.user) {
            return error(ErrorCode::Unauthorized, "invalid user id");
        }
        let user = req.user.as_str();
        match &req.op {
            ControlOp::Subscribe(raw) => {
                let sub = match Subscription::from_raw(raw) {
                    Ok(s) => s,
                    Err(e) => return error(ErrorCode::InvalidFilter, e.0),
                };
                let result = self
                    .index
                    .write()
                    .expect("index lock")
                    .upsert(user, sub, self.max_subscriptions);
                match result {
                    Ok(()) => ControlReply::Ok,
                    Err(e @ IndexError::TooManySubscriptions(_)) => {
                        error(ErrorCode::TooManySubscriptions, e.to_string())
                    }
                }
            }
            ControlOp::Unsubscribe { sub } => match name_field(sub, "subscription name", ids::is_valid_sub_name) {
                Ok(name) => {
                    self.index.write().expect("index lock").remove(user, name);
                    ControlReply::Ok
                }
                Err(e) => error(ErrorCode::InvalidFilter, e.0),
            },
            ControlOp::List => ControlReply::Subs(self.index.read().expect("index lock").list(user)),
            ControlOp::Join { room } => match name_field(room, "room name", ids::is_valid_room) {
                Ok(room) if ids::room_allowed(&req.rooms, room) => {
                    self.rooms.write().expect("rooms lock").join(room, user);
                    ControlReply::Ok
                }
                Ok(room) => error(
                    ErrorCode::Forbidden,
                    format!("the token does not allow joining {room:?}"),
                ),
                Err(e) => error(ErrorCode::InvalidFilter, e.0),
            },
            ControlOp::Leave { room } => match name_field(room, "room name", ids::is_valid_room) {
                Ok(room) => {
                    self.rooms.write().expect("rooms lock").leave(room, user);
                    ControlReply::Ok
                }
                Err(e) => error(ErrorCode::InvalidFilter, e.0),
            },
        }
    }

    /// Number of subscriptions held (for the gauge).
    pub fn subscription_count(&self) -> usize {
        self.index.read().expect("index lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;
    use switchyard_common::subscription::RawSubscription;

    fn req(user: &str, rooms: &[&str], op: ControlOp) -> ControlRequest {
        ControlRequest {
            user: user.into(),
            rooms: rooms.iter().map(|s| s.to_string()).collect(),
            op,
        }
    }

    fn code(r: ControlReply) -> Option<ErrorCode> {
        match r {
            ControlReply::Error { code, .. } => Some(code),
            _ => None,
        }
    }

    #[test]
    fn join_needs_the_rooms_claim() {
        let s = RouterState::new(10);
        assert_eq!(
            code(s.apply(&req(
                "u1",
                &["desk:*"],
                ControlOp::Join {
                    room: Value::from("desk:fx")
                }
            ))),
            None
        );
        assert_eq!(
            code(s.apply(&req(
                "u1",
                &["desk:*"],
                ControlOp::Join {
                    room: Value::from("lobby")
                }
            ))),
            Some(ErrorCode::Forbidden)
        );
        assert_eq!(
            code(s.apply(&req(
                "u1",
                &[],
                ControlOp::Join {
                    room: Value::from("a b")
                }
            ))),
            Some(ErrorCode::InvalidFilter)
        );
        assert_eq!(
            code(s.apply(&req("u1", &[], ControlOp::Leave { room: Value::from(3) }))),
            Some(ErrorCode::InvalidFilter)
        );
    }

    #[test]
    fn subscribe_errors() {
        let s = RouterState::new(1);
        let raw = |name: &str| RawSubscription {
            sub: Value::from(name),
            sub_type: Value::from("tick"),
            filters: None,
            min: None,
            max: None,
            fields: None,
        };
        assert_eq!(code(s.apply(&req("u1", &[], ControlOp::Subscribe(raw("a"))))), None);
        assert_eq!(
            code(s.apply(&req("u1", &[], ControlOp::Subscribe(raw("b"))))),
            Some(ErrorCode::TooManySubscriptions)
        );
        assert_eq!(
            code(s.apply(&req("u1", &[], ControlOp::Subscribe(raw("a.b"))))),
            Some(ErrorCode::InvalidFilter)
        );
        assert_eq!(
            code(s.apply(&req("a.b", &[], ControlOp::List))),
            Some(ErrorCode::Unauthorized)
        );
        assert_eq!(
            code(s.apply(&req("u1", &[], ControlOp::Unsubscribe { sub: Value::from("zz") }))),
            None
        );
        assert_eq!(
            code(s.apply(&req(
                "u1",
                &[],
                ControlOp::Unsubscribe {
                    sub: Value::from("a.b")
                }
            ))),
            Some(ErrorCode::InvalidFilter)
        );
    }
}
