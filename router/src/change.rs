//! A change to the subscription state (subscribe, unsubscribe, join,
//! leave) and how it is written as a key and value of the subscription
//! bucket. Pure: both [`crate::store`] (which writes and watches the bucket)
//! and [`crate::state`] (which applies changes to the index and rooms) use
//! it, and it uses neither.

use switchyard_common::control;
use switchyard_common::subscription::Subscription;

/// A change to the subscription state, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace `sub` for `user`.
    Subscribe {
        /// The owner.
        user: String,
        /// The normalized subscription.
        sub: Subscription,
    },
    /// Remove `user`'s subscription `name`.
    Unsubscribe {
        /// The owner.
        user: String,
        /// The subscription name.
        name: String,
    },
    /// `user` joins `room`.
    Join {
        /// The room.
        room: String,
        /// The member.
        user: String,
    },
    /// `user` leaves `room`.
    Leave {
        /// The room.
        room: String,
        /// The member.
        user: String,
    },
}

impl Change {
    /// Whether the change removes something (written as a tombstone).
    pub fn is_removal(&self) -> bool {
        matches!(self, Change::Unsubscribe { .. } | Change::Leave { .. })
    }

    /// The key filter (relative to the bucket) of every key of the same
    /// kind that belongs to the change's user: what a per-user cap counts.
    pub fn user_filter(&self) -> String {
        match self {
            Change::Subscribe { user, .. } | Change::Unsubscribe { user, .. } => format!("s.{user}.*"),
            Change::Join { user, .. } | Change::Leave { user, .. } => format!("r.*.{user}"),
        }
    }
}

/// Escapes a room name into one key token.
fn escape_room(room: &str) -> String {
    room.replace('.', "=2E").replace(':', "=3A")
}

fn unescape_room(token: &str) -> String {
    token.replace("=2E", ".").replace("=3A", ":")
}

/// The key and value that store `change`.
pub fn encode_change(change: &Change) -> (String, Vec<u8>) {
    match change {
        Change::Subscribe { user, sub } => (format!("s.{user}.{}", sub.name), control::encode(sub)),
        Change::Unsubscribe { user, name } => (format!("s.{user}.{name}"), Vec::new()),
        Change::Join { room, user } => (format!("r.{}.{user}", escape_room(room)), vec![1]),
        Change::Leave { room, user } => (format!("r.{}.{user}", escape_room(room)), Vec::new()),
    }
}

/// The change a key and value stand for (an empty value is a removal).
pub fn decode_change(key: &str, value: &[u8]) -> Option<Change> {
    let mut parts = key.splitn(3, '.');
    let (kind, a, b) = (parts.next()?, parts.next()?, parts.next()?);
    match (kind, value.is_empty()) {
        ("s", true) => Some(Change::Unsubscribe {
            user: a.to_string(),
            name: b.to_string(),
        }),
        ("s", false) => {
            let sub: Subscription = control::decode(value).ok()?;
            (sub.name == b).then(|| Change::Subscribe {
                user: a.to_string(),
                sub,
            })
        }
        ("r", true) => Some(Change::Leave {
            room: unescape_room(a),
            user: b.to_string(),
        }),
        ("r", false) => Some(Change::Join {
            room: unescape_room(a),
            user: b.to_string(),
        }),
        _ => None,
    }
}
