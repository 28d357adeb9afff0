//! Room memberships: which users belong to which rooms.
//!
//! Membership belongs to the user, not to a connection, and lasts until
//! `leave`. Authorization (the token's `rooms` claim) is checked by the
//! caller before [`Rooms::join`]; this module only keeps the sets.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The room → members table.
#[derive(Default)]
pub struct Rooms {
    members: HashMap<String, HashSet<Arc<str>>>,
}

impl Rooms {
    /// An empty table.
    pub fn new() -> Rooms {
        Rooms::default()
    }

    /// Adds `user` to `room`; whether it was new.
    pub fn join(&mut self, room: &str, user: &str) -> bool {
        self.members
            .entry(room.to_string())
            .or_default()
            .insert(Arc::from(user))
    }

    /// Removes `user` from `room`; whether it was a member.
    pub fn leave(&mut self, room: &str, user: &str) -> bool {
        let Some(set) = self.members.get_mut(room) else {
            return false;
        };
        let removed = set.remove(user);
        if set.is_empty() {
            self.members.remove(room);
        }
        removed
    }

    /// Calls `f` for each member of `room`.
    pub fn for_each_member(&self, room: &str, mut f: impl FnMut(&Arc<str>)) {
        if let Some(set) = self.members.get(room) {
            set.iter().for_each(&mut f);
        }
    }

    /// Number of non-empty rooms.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no room has members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave() {
        let mut r = Rooms::new();
        assert!(r.join("lobby", "u1"));
        assert!(!r.join("lobby", "u1"));
        r.join("lobby", "u2");
        let mut seen = Vec::new();
        r.for_each_member("lobby", |u| seen.push(u.to_string()));
        seen.sort();
        assert_eq!(seen, ["u1", "u2"]);
        assert!(r.leave("lobby", "u1"));
        assert!(!r.leave("lobby", "u1"));
        r.leave("lobby", "u2");
        assert!(r.is_empty());
    }
}
