//! The router's in-memory state: the subscription index and room table,
//! the pure checks on control requests, and the one place that applies
//! stored changes to them.
//!
//! Changes reach the index only through [`RouterState::apply_change`],
//! called by the store's watcher ([`crate::store`]), so every router applies
//! the same changes in the bucket's order; a rebuild replays the bucket into
//! a [`Replica`] off to the side and swaps it in ([`RouterState::install`]). Locks are `std::sync::RwLock`s
//! held only for in-memory work, never across an `.await`: matching takes a
//! read lock, collects its targets and lets go before anything is published.

use std::sync::{Arc, RwLock};

use switchyard_common::control::ControlReply;
use switchyard_common::ids;
use switchyard_common::subscription::{RawSubscription, Subscription};
use switchyard_common::ErrorCode;

use crate::change::Change;
use crate::fast_index::FastIndex;
use crate::index::SubscriptionIndex;
use crate::rooms::Rooms;

/// Operator limits on what one user may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Subscriptions per user.
    pub max_subscriptions: usize,
    /// Filter dimensions per subscription.
    pub max_dimensions: usize,
    /// Values per filter dimension.
    pub max_values_per_dimension: usize,
    /// Rooms per user (default 100).
    pub max_rooms: usize,
    /// Distinct dimension names per subscription type, over all users'
    /// subscriptions of the type (the matcher scans them for every event).
    pub max_type_dimensions: usize,
}

/// The default cap on rooms per user (1.1; docs/PROTOCOL.md, "Client ops").
pub const DEFAULT_MAX_ROOMS: usize = 100;

/// Default of [`Limits::max_type_dimensions`] (`SWITCHYARD_MAX_TYPE_DIMENSIONS`).
pub const DEFAULT_MAX_TYPE_DIMENSIONS: usize = 64;

impl Limits {
    /// The given subscription cap and the protocol's own caps for the rest.
    pub fn with_max_subscriptions(max_subscriptions: usize) -> Limits {
        Limits {
            max_subscriptions,
            max_dimensions: switchyard_common::subscription::MAX_FILTER_DIMENSIONS,
            max_values_per_dimension: switchyard_common::subscription::MAX_VALUES_PER_DIMENSION,
            max_rooms: DEFAULT_MAX_ROOMS,
            max_type_dimensions: DEFAULT_MAX_TYPE_DIMENSIONS,
        }
    }
}

/// Shared router state.
pub struct RouterState {
    /// The subscription index.
    pub index: RwLock<Box<dyn SubscriptionIndex>>,
    /// Room memberships.
    pub rooms: RwLock<Rooms>,
    limits: Limits,
}

/// An index and room table built from a replay of the bucket, off to the
/// side of the ones serving, then swapped in whole.
pub struct Replica {
    index: Box<dyn SubscriptionIndex>,
    rooms: Rooms,
}

impl Default for Replica {
    fn default() -> Self {
        Replica::new()
    }
}

impl Replica {
    /// Empty, with the fast index.
    pub fn new() -> Replica {
        Replica {
            index: Box::new(FastIndex::new()),
            rooms: Rooms::new(),
        }
    }

    /// Applies a stored change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Subscribe { .. } | Change::Unsubscribe { .. } => apply_to_index(self.index.as_mut(), change),
            Change::Join { .. } | Change::Leave { .. } => apply_to_rooms(&mut self.rooms, change),
        }
    }
}

/// What a join should do, once allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinCheck {
    /// The user is already in the room: nothing to write, nothing counted.
    AlreadyMember,
    /// Write the membership.
    Join,
}

fn apply_to_index(index: &mut dyn SubscriptionIndex, change: &Change) {
    match change {
        Change::Subscribe { user, sub } => {
            if !ids::is_valid_user_id(user) {
                return;
            }
            // Already accepted by the router that stored it: no cap here.
            let _ = index.upsert(user, sub, usize::MAX);
        }
        Change::Unsubscribe { user, name } => {
            index.remove(user, name);
        }
        Change::Join { .. } | Change::Leave { .. } => {}
    }
}

fn apply_to_rooms(rooms: &mut Rooms, change: &Change) {
    match change {
        Change::Join { room, user } => {
            if ids::is_valid_user_id(user) && ids::is_valid_room(room) {
                rooms.join(room, user);
            }
        }
        Change::Leave { room, user } => {
            rooms.leave(room, user);
        }
        Change::Subscribe { .. } | Change::Unsubscribe { .. } => {}
    }
}

/// An error reply.
pub fn error(code: ErrorCode, message: impl Into<String>) -> ControlReply {
    ControlReply::Error {
        code,
        message: message.into(),
    }
}

impl RouterState {
    /// Empty state with the fast index.
    pub fn new(limits: Limits) -> Arc<RouterState> {
        Arc::new(RouterState {
            index: RwLock::new(Box::new(FastIndex::new())),
            rooms: RwLock::new(Rooms::new()),
            limits,
        })
    }

    /// Validates a subscription against the protocol rules and the operator
    /// limits on its shape (not the per-user count: see [`RouterState::check_room_for`]).
    pub fn check_subscription(&self, raw: &RawSubscription) -> Result<Subscription, ControlReply> {
        let sub = Subscription::from_raw(raw).map_err(|e| error(ErrorCode::InvalidFilter, e.0))?;
        if sub.filters.len() > self.limits.max_dimensions {
            return Err(error(
                ErrorCode::InvalidFilter,
                format!("at most {} filter dimensions", self.limits.max_dimensions),
            ));
        }
        if let Some((dim, _)) = sub
            .filters
            .iter()
            .find(|(_, v)| v.len() > self.limits.max_values_per_dimension)
        {
            return Err(error(
                ErrorCode::InvalidFilter,
                format!(
                    "filters.{dim} must list 1 to {} values",
                    self.limits.max_values_per_dimension
                ),
            ));
        }
        Ok(sub)
    }

    /// Whether `user` may add (or replace) subscription `name` without
    /// going past the per-user limit.
    pub fn check_room_for(&self, user: &str, name: &str) -> Result<(), ControlReply> {
        let (held, has_name) = self.index.read().expect("index lock").holds(user, name);
        if held >= self.limits.max_subscriptions && !has_name {
            return Err(error(
                ErrorCode::TooManySubscriptions,
                format!("at most {} subscriptions per user", self.limits.max_subscriptions),
            ));
        }
        Ok(())
    }

    /// Whether `user` may join `room` without going past the rooms cap
    /// (a room the user is already in does not count).
    pub fn check_join(&self, user: &str, room: &str) -> Result<JoinCheck, ControlReply> {
        let rooms = self.rooms.read().expect("rooms lock");
        if rooms.is_member(room, user) {
            return Ok(JoinCheck::AlreadyMember);
        }
        if rooms.rooms_of(user) >= self.limits.max_rooms {
            return Err(error(
                ErrorCode::TooManyRooms,
                format!("at most {} rooms per user", self.limits.max_rooms),
            ));
        }
        Ok(JoinCheck::Join)
    }

    /// Whether `sub` may be added without pushing the distinct dimension
    /// names of its type past the operator's bound. A subscription that
    /// names only dimensions its type already has always passes (also when
    /// the type is over the bound, which concurrent subscribes can cause:
    /// each checks what has been applied, so subscribes in flight at the
    /// same moment can each add their new names).
    pub fn check_type_dimensions(&self, sub: &Subscription) -> Result<(), ControlReply> {
        let dims: Vec<&str> = sub.filters.keys().map(String::as_str).collect();
        let (held, new) = self
            .index
            .read()
            .expect("index lock")
            .dimension_growth(&sub.sub_type, &dims);
        if new > 0 && held + new > self.limits.max_type_dimensions {
            return Err(error(
                ErrorCode::InvalidFilter,
                format!(
                    "subscriptions of type {} may filter on at most {} distinct dimensions ({held} in use, this adds {new})",
                    sub.sub_type, self.limits.max_type_dimensions
                ),
            ));
        }
        Ok(())
    }

    /// Applies a stored change (from the store's watcher).
    pub fn apply_change(&self, change: &Change) {
        match change {
            Change::Subscribe { .. } | Change::Unsubscribe { .. } => {
                apply_to_index(self.index.write().expect("index lock").as_mut(), change)
            }
            Change::Join { .. } | Change::Leave { .. } => {
                apply_to_rooms(&mut self.rooms.write().expect("rooms lock"), change)
            }
        }
    }

    /// Replaces the index and room table with a rebuilt `replica`; the old
    /// ones are freed after the locks are let go.
    pub fn install(&self, replica: Replica) {
        let old_index = std::mem::replace(&mut *self.index.write().expect("index lock"), replica.index);
        let old_rooms = std::mem::replace(&mut *self.rooms.write().expect("rooms lock"), replica.rooms);
        drop((old_index, old_rooms));
    }

    /// The user's subscriptions.
    pub fn list(&self, user: &str) -> Vec<Subscription> {
        self.index.read().expect("index lock").list(user)
    }

    /// Number of subscriptions held (for the gauge).
    pub fn subscription_count(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    /// The rooms `user` is in, sorted.
    pub fn rooms_of(&self, user: &str) -> Vec<String> {
        self.rooms.read().expect("rooms lock").rooms_of_user(user)
    }

    /// The members of `room`.
    pub fn members(&self, room: &str) -> Vec<std::sync::Arc<str>> {
        let mut members = Vec::new();
        self.rooms
            .read()
            .expect("rooms lock")
            .for_each_member(room, |m| members.push(m.clone()));
        members
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.rooms.read().expect("rooms lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn raw(name: &str, dims: usize, values: usize) -> RawSubscription {
        let filters = (0..dims)
            .map(|d| {
                (
                    Value::from(format!("d{d}")),
                    Value::Array((0..values).map(|v| Value::from(format!("v{v}"))).collect()),
                )
            })
            .collect();
        RawSubscription {
            sub: Value::from(name),
            sub_type: Value::from("tick"),
            filters: Some(Value::Map(filters)),
            min: None,
            max: None,
            fields: None,
            throttle_ms: None,
            snapshot: None,
        }
    }

    fn code(r: Result<impl Sized, ControlReply>) -> Option<ErrorCode> {
        match r {
            Err(ControlReply::Error { code, .. }) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn operator_limits_on_shape_use_invalid_filter() {
        let s = RouterState::new(Limits {
            max_subscriptions: 2,
            max_dimensions: 2,
            max_values_per_dimension: 3,
            max_rooms: 1,
            max_type_dimensions: DEFAULT_MAX_TYPE_DIMENSIONS,
        });
        assert_eq!(code(s.check_subscription(&raw("a", 2, 3))), None);
        assert_eq!(
            code(s.check_subscription(&raw("a", 3, 1))),
            Some(ErrorCode::InvalidFilter)
        );
        assert_eq!(
            code(s.check_subscription(&raw("a", 1, 4))),
            Some(ErrorCode::InvalidFilter)
        );
        assert_eq!(
            code(s.check_subscription(&raw("a.b", 1, 1))),
            Some(ErrorCode::InvalidFilter)
        );
    }

    #[test]
    fn the_per_user_cap_counts_new_names_only() {
        let s = RouterState::new(Limits::with_max_subscriptions(1));
        let sub = s.check_subscription(&raw("a", 1, 1)).unwrap();
        assert_eq!(code(s.check_room_for("u1", "a")), None);
        s.apply_change(&Change::Subscribe { user: "u1".into(), sub });
        assert_eq!(code(s.check_room_for("u1", "a")), None, "replacing is not adding");
        assert_eq!(code(s.check_room_for("u1", "b")), Some(ErrorCode::TooManySubscriptions));
        assert_eq!(code(s.check_room_for("u2", "b")), None);
        s.apply_change(&Change::Unsubscribe {
            user: "u1".into(),
            name: "a".into(),
        });
        assert_eq!(code(s.check_room_for("u1", "b")), None);
    }

    /// A subscription of type `tick` filtering on the named dimensions.
    fn with_dims(name: &str, dims: &[&str]) -> RawSubscription {
        RawSubscription {
            sub: Value::from(name),
            sub_type: Value::from("tick"),
            filters: Some(Value::Map(
                dims.iter()
                    .map(|d| (Value::from(*d), Value::Array(vec![Value::from("v")])))
                    .collect(),
            )),
            min: None,
            max: None,
            fields: None,
            throttle_ms: None,
            snapshot: None,
        }
    }

    #[test]
    fn distinct_dimensions_per_type_are_bounded() {
        let s = RouterState::new(Limits {
            max_type_dimensions: 3,
            ..Limits::with_max_subscriptions(100)
        });
        let add = |user: &str, name: &str, dims: &[&str]| {
            let sub = s.check_subscription(&with_dims(name, dims)).unwrap();
            s.check_type_dimensions(&sub)?;
            s.apply_change(&Change::Subscribe { user: user.into(), sub });
            Ok::<(), ControlReply>(())
        };
        assert_eq!(code(add("u1", "a", &["d1", "d2"])), None);
        assert_eq!(code(add("u2", "a", &["d2", "d3"])), None);
        // A fourth name, from any user, is refused with a clear message.
        let refused = add("u3", "a", &["d4"]);
        let Err(ControlReply::Error { code: c, message }) = refused else {
            panic!("accepted: {refused:?}")
        };
        assert_eq!(c, ErrorCode::InvalidFilter);
        assert!(message.contains("at most 3 distinct dimensions"), "{message}");
        // Names already in use stay usable; other types are not affected.
        assert_eq!(code(add("u3", "b", &["d1", "d3"])), None);
        assert_eq!(code(add("u3", "c", &[])), None);
        let other = s.check_subscription(&RawSubscription {
            sub_type: Value::from("quote"),
            ..with_dims("q", &["x1", "x2", "x3"])
        });
        assert_eq!(code(s.check_type_dimensions(&other.unwrap())), None);
        // When the last subscription naming a dimension goes, its room is free.
        s.apply_change(&Change::Unsubscribe {
            user: "u1".into(),
            name: "a".into(),
        });
        s.apply_change(&Change::Unsubscribe {
            user: "u3".into(),
            name: "b".into(),
        });
        assert_eq!(code(add("u3", "d", &["d4"])), None);
    }

    #[test]
    fn stored_changes_drive_rooms_and_hostile_ones_are_ignored() {
        let s = RouterState::new(Limits::with_max_subscriptions(1));
        s.apply_change(&Change::Join {
            room: "desk:fx".into(),
            user: "u1".into(),
        });
        s.apply_change(&Change::Join {
            room: "bad room".into(),
            user: "u1".into(),
        });
        s.apply_change(&Change::Join {
            room: "lobby".into(),
            user: "bad.user".into(),
        });
        let members = |room: &str| {
            let mut v = Vec::new();
            s.rooms.read().unwrap().for_each_member(room, |u| v.push(u.to_string()));
            v
        };
        assert_eq!(members("desk:fx"), vec!["u1"]);
        assert_eq!(s.rooms.read().unwrap().len(), 1);
        s.apply_change(&Change::Leave {
            room: "desk:fx".into(),
            user: "u1".into(),
        });
        assert!(members("desk:fx").is_empty());
    }

    #[test]
    fn the_rooms_cap_counts_new_rooms_only() {
        let s = RouterState::new(Limits {
            max_rooms: 2,
            ..Limits::with_max_subscriptions(1)
        });
        let join = |room: &str| {
            s.apply_change(&Change::Join {
                room: room.into(),
                user: "u1".into(),
            })
        };
        assert_eq!(s.check_join("u1", "a"), Ok(JoinCheck::Join));
        join("a");
        assert_eq!(s.check_join("u1", "a"), Ok(JoinCheck::AlreadyMember));
        join("b");
        assert_eq!(
            s.check_join("u1", "b"),
            Ok(JoinCheck::AlreadyMember),
            "rejoining is not adding"
        );
        assert_eq!(code(s.check_join("u1", "c")), Some(ErrorCode::TooManyRooms));
        assert_eq!(s.check_join("u2", "c"), Ok(JoinCheck::Join), "the cap is per user");
        s.apply_change(&Change::Leave {
            room: "a".into(),
            user: "u1".into(),
        });
        assert_eq!(s.check_join("u1", "c"), Ok(JoinCheck::Join));
    }

    #[test]
    fn an_installed_replica_replaces_everything() {
        let s = RouterState::new(Limits::with_max_subscriptions(10));
        let sub = s.check_subscription(&raw("old", 1, 1)).unwrap();
        s.apply_change(&Change::Subscribe { user: "u1".into(), sub });
        s.apply_change(&Change::Join {
            room: "gone".into(),
            user: "u1".into(),
        });
        let mut r = Replica::new();
        let sub = s.check_subscription(&raw("new", 1, 1)).unwrap();
        r.apply(&Change::Subscribe { user: "u1".into(), sub });
        r.apply(&Change::Join {
            room: "kept".into(),
            user: "u1".into(),
        });
        r.apply(&Change::Join {
            room: "bad room".into(),
            user: "u1".into(),
        });
        s.install(r);
        let names: Vec<_> = s.list("u1").into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["new"]);
        assert_eq!(s.check_join("u1", "kept"), Ok(JoinCheck::AlreadyMember));
        assert_eq!(s.check_join("u1", "gone"), Ok(JoinCheck::Join));
        assert_eq!(s.rooms.read().unwrap().len(), 1);
    }
}
