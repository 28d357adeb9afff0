//! Room memberships: which users belong to which rooms.
//!
//! Membership belongs to the user, not to a connection, and lasts until
//! `leave`. Authorization (the token's `rooms` claim) and the per-user cap
//! are checked by the caller before [`Rooms::join`]; this module only keeps
//! the sets, and how many rooms each user is in so the cap is O(1) to check.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The room → members table.
#[derive(Default)]
pub struct Rooms {
    members: HashMap<String, HashSet<Arc<str>>>,
    /// User → number of rooms joined; its keys are the `Arc`s the member
    /// sets share, so a user's id is allocated once, not once per room.
    joined: HashMap<Arc<str>, u32>,
}

impl Rooms {
    /// An empty table.
    pub fn new() -> Rooms {
        Rooms::default()
    }

    /// Adds `user` to `room`; whether it was new.
    pub fn join(&mut self, room: &str, user: &str) -> bool {
        if self.is_member(room, user) {
            return false;
        }
        let user = match self.joined.get_key_value(user) {
            Some((u, _)) => u.clone(),
            None => Arc::from(user),
        };
        *self.joined.entry(user.clone()).or_insert(0) += 1;
        self.members.entry(room.to_string()).or_default().insert(user)
    }

    /// Whether `user` is in `room`.
    pub fn is_member(&self, room: &str, user: &str) -> bool {
        self.members.get(room).is_some_and(|set| set.contains(user))
    }

    /// How many rooms `user` is in.
    pub fn rooms_of(&self, user: &str) -> usize {
        self.joined.get(user).map_or(0, |n| *n as usize)
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
        if removed {
            if let Some(n) = self.joined.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    self.joined.remove(user);
                }
            }
        }
        removed
    }

    /// The rooms `user` is in, sorted (a scan of every room: for the
    /// application API's `list`, not for delivery).
    pub fn rooms_of_user(&self, user: &str) -> Vec<String> {
        if !self.joined.contains_key(user) {
            return Vec::new();
        }
        let mut rooms: Vec<String> = self
            .members
            .iter()
            .filter(|(_, set)| set.contains(user))
            .map(|(room, _)| room.clone())
            .collect();
        rooms.sort();
        rooms
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

    #[test]
    fn rooms_are_counted_per_user() {
        let mut r = Rooms::new();
        assert_eq!(r.rooms_of("u1"), 0);
        r.join("a", "u1");
        r.join("b", "u1");
        r.join("b", "u1");
        r.join("b", "u2");
        assert_eq!((r.rooms_of("u1"), r.rooms_of("u2")), (2, 1));
        assert!(r.is_member("b", "u1") && !r.is_member("a", "u2"));
        assert!(!r.leave("c", "u1"));
        assert!(!r.leave("a", "u2"));
        assert_eq!((r.rooms_of("u1"), r.rooms_of("u2")), (2, 1));
        r.leave("a", "u1");
        r.leave("b", "u1");
        assert_eq!(r.rooms_of("u1"), 0);
        assert!(!r.joined.contains_key("u1"), "a user in no room takes no memory");
        r.leave("b", "u2");
        assert!(r.is_empty() && r.joined.is_empty());
    }
}
