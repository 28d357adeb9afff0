//! Presence in one user partition: which edges hold which of its users
//! (pure: no NATS, no clock).
//!
//! The delivery stage sends each user's live copies to the edges listed
//! here. Edges announce changes ([`PresenceUpdate`]); an edge this table
//! does not know (new, forgotten, or met by a new owner of the partition)
//! must first send its whole set of users (`full`). A full set that
//! arrives after the partition has stored deliveries it could not send to
//! that edge is answered `late`, so the edge makes those users resume.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_common::fanout::PresenceUpdate;

/// A known edge's slot (an index into the table's edges).
pub type EdgeSlot = u16;

/// What applying an update decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The edge is unknown and sent changes: it must send its full set.
    pub resync: bool,
    /// Deliveries were stored since this table's owner started that the
    /// edge's users may not have received live.
    pub late: bool,
}

#[derive(Debug)]
struct Edge {
    id: String,
    /// `<prefix>.edge.<id>`.
    subject: String,
    users: usize,
    /// Every part of the edge's full set has arrived.
    complete: bool,
    /// It was complete before its current full set began.
    was_complete: bool,
}

/// The edges holding one partition's users.
#[derive(Debug, Default)]
pub struct Presence {
    edges: Vec<Option<Edge>>,
    by_id: HashMap<String, EdgeSlot>,
    users: HashMap<Arc<str>, Vec<EdgeSlot>>,
    /// Users touched since [`Presence::take_changes`], with whether they
    /// were present before the first touch; `None` while changes are not
    /// tracked (a new owner rebuilding the table announces nobody).
    touched: Option<HashMap<Arc<str>, bool>>,
}

impl Presence {
    /// An empty table.
    pub fn new() -> Presence {
        Presence::default()
    }

    /// Applies an edge's update. `subject` makes the edge's live subject
    /// from its id; `moved` says whether this partition stored deliveries
    /// since its owner started (an edge that was not synced all along may
    /// have missed their live copies).
    pub fn apply(&mut self, update: &PresenceUpdate, subject: impl FnOnce(&str) -> String, moved: bool) -> Applied {
        let known = self.by_id.get(&update.edge).copied();
        let resync = Applied {
            resync: true,
            late: false,
        };
        let slot = match (known, update.full, update.part) {
            // Changes, or a later part of a full set, from an edge whose
            // set this table does not have (whole): start over with a full set.
            (None, _, p) if !update.full || p > 0 => return resync,
            (Some(slot), false, _) if !self.edge_ref(slot).complete => return resync,
            (Some(slot), true, p) if p > 0 && self.edge_ref(slot).complete => return resync,
            (Some(slot), true, 0) => {
                self.clear_edge(slot);
                let edge = self.edge_mut(slot);
                edge.was_complete = edge.complete;
                edge.complete = false;
                slot
            }
            (Some(slot), _, _) => slot,
            (None, _, _) => self.add_edge(&update.edge, subject(&update.edge)),
        };
        for (user, present) in &update.users {
            self.touch(user);
            if *present {
                let slots = self.users.entry(Arc::from(user.as_str())).or_default();
                if !slots.contains(&slot) {
                    slots.push(slot);
                    self.edge_mut(slot).users += 1;
                }
            } else if let Some(slots) = self.users.get_mut(user.as_str()) {
                let removed = match slots.iter().position(|s| *s == slot) {
                    Some(i) => {
                        slots.swap_remove(i);
                        true
                    }
                    None => false,
                };
                if slots.is_empty() {
                    self.users.remove(user.as_str());
                }
                if removed {
                    self.edge_mut(slot).users -= 1;
                }
            }
        }
        let mut late = false;
        if update.full && !update.more {
            let edge = self.edge_mut(slot);
            edge.complete = true;
            // An edge this table did not hold whole until now may have
            // missed live copies sent meanwhile.
            late = !edge.was_complete && moved;
            edge.was_complete = true;
        }
        Applied { resync: false, late }
    }

    /// Forgets an edge and its users (it stopped, or stopped saying it is alive).
    pub fn forget(&mut self, edge: &str) {
        if let Some(slot) = self.by_id.remove(edge) {
            self.clear_edge(slot);
            self.edges[slot as usize] = None;
        }
    }

    /// Whether the table holds `edge`'s whole set of users.
    pub fn knows(&self, edge: &str) -> bool {
        self.by_id.get(edge).is_some_and(|&slot| self.edge_ref(slot).complete)
    }

    /// Ids of the known edges.
    pub fn edge_ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.keys().map(String::as_str)
    }

    /// The edges holding `user`.
    pub fn edges_of(&self, user: &str) -> &[EdgeSlot] {
        self.users.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Edges holding at least one of the partition's users (for broadcasts).
    pub fn edges_with_users(&self) -> impl Iterator<Item = EdgeSlot> + '_ {
        self.edges
            .iter()
            .enumerate()
            .filter(|(_, e)| e.as_ref().is_some_and(|e| e.users > 0))
            .map(|(i, _)| i as EdgeSlot)
    }

    /// Slots in use (and free ones) so far: the bound for per-slot buffers.
    pub fn slot_count(&self) -> usize {
        self.edges.len()
    }

    /// The live subject of the edge in `slot`.
    pub fn subject(&self, slot: EdgeSlot) -> Option<&str> {
        self.edges
            .get(slot as usize)
            .and_then(|e| e.as_ref())
            .map(|e| e.subject.as_str())
    }

    /// Users with at least one edge.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Starts tracking which users come and go (for presence events), from
    /// the table as it is now.
    pub fn track_changes(&mut self) {
        self.touched.get_or_insert_with(HashMap::new);
    }

    /// Users whose presence changed since the last call, with whether they
    /// are present now. A user who left and came back (or the reverse) in
    /// between is not listed: nothing changed.
    pub fn take_changes(&mut self) -> Vec<(Arc<str>, bool)> {
        let Some(touched) = self.touched.as_mut() else {
            return Vec::new();
        };
        let users = &self.users;
        touched
            .drain()
            .filter_map(|(user, before)| {
                let now = users.contains_key(&user);
                (now != before).then_some((user, now))
            })
            .collect()
    }

    fn touch(&mut self, user: &str) {
        let Some(touched) = self.touched.as_mut() else {
            return;
        };
        if !touched.contains_key(user) {
            let (user, before) = match self.users.get_key_value(user) {
                Some((u, _)) => (u.clone(), true),
                None => (Arc::from(user), false),
            };
            touched.insert(user, before);
        }
    }

    fn edge_ref(&self, slot: EdgeSlot) -> &Edge {
        self.edges[slot as usize].as_ref().expect("slot in use")
    }

    fn edge_mut(&mut self, slot: EdgeSlot) -> &mut Edge {
        self.edges[slot as usize].as_mut().expect("slot in use")
    }

    fn add_edge(&mut self, id: &str, subject: String) -> EdgeSlot {
        let edge = Edge {
            id: id.to_string(),
            subject,
            users: 0,
            complete: false,
            was_complete: false,
        };
        let slot = match self.edges.iter().position(Option::is_none) {
            Some(free) => {
                self.edges[free] = Some(edge);
                free
            }
            None => {
                self.edges.push(Some(edge));
                self.edges.len() - 1
            }
        } as EdgeSlot;
        self.by_id.insert(id.to_string(), slot);
        slot
    }

    fn clear_edge(&mut self, slot: EdgeSlot) {
        if self.edges[slot as usize].as_ref().is_some_and(|e| e.users == 0) {
            return;
        }
        let touched = &mut self.touched;
        self.users.retain(|user, slots| {
            if let Some(touched) = touched.as_mut() {
                if slots.contains(&slot) && !touched.contains_key(user) {
                    touched.insert(user.clone(), true);
                }
            }
            slots.retain(|s| *s != slot);
            !slots.is_empty()
        });
        if let Some(e) = self.edges[slot as usize].as_mut() {
            e.users = 0;
        }
    }

    /// The id of the edge in `slot` (for logs).
    pub fn edge_id(&self, slot: EdgeSlot) -> Option<&str> {
        self.edges
            .get(slot as usize)
            .and_then(|e| e.as_ref())
            .map(|e| e.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(edge: &str, full: bool, users: &[(&str, bool)]) -> PresenceUpdate {
        PresenceUpdate {
            edge: edge.into(),
            full,
            part: 0,
            more: false,
            users: users.iter().map(|(u, p)| (u.to_string(), *p)).collect(),
        }
    }

    #[test]
    fn a_full_set_in_parts_is_known_only_after_its_last_part() {
        let mut p = Presence::new();
        let mut first = update("e1", true, &[("alice", true)]);
        first.more = true;
        let a = p.apply(&first, subject, false);
        assert!(!a.resync && !a.late);
        assert!(!p.knows("e1"), "not whole yet");
        assert_eq!(p.edges_of("alice").len(), 1, "its users are served already");
        // Changes before the set is whole: start over.
        assert!(p.apply(&update("e1", false, &[("bob", true)]), subject, false).resync);
        let mut second = update("e1", true, &[("bob", true)]);
        second.part = 1;
        // Deliveries went out between the parts: the set is late.
        let a = p.apply(&second, subject, true);
        assert!(a.late && !a.resync);
        assert!(p.knows("e1"));
        assert_eq!(p.edges_of("alice").len(), 1, "later parts add");
        assert_eq!(p.edges_of("bob").len(), 1);
        // A later part with no first part (a router that restarted meanwhile) starts over.
        let mut q = Presence::new();
        assert!(q.apply(&second, subject, false).resync);
    }

    fn subject(id: &str) -> String {
        format!("sy.edge.{id}")
    }

    #[test]
    fn an_unknown_edge_must_send_its_full_set_first() {
        let mut p = Presence::new();
        let a = p.apply(&update("e1", false, &[("alice", true)]), subject, false);
        assert!(a.resync);
        assert!(p.edges_of("alice").is_empty());
        let a = p.apply(&update("e1", true, &[("alice", true)]), subject, false);
        assert_eq!(
            a,
            Applied {
                resync: false,
                late: false
            }
        );
        let slot = p.edges_of("alice")[0];
        assert_eq!(p.subject(slot), Some("sy.edge.e1"));
        let a = p.apply(&update("e1", false, &[("bob", true), ("alice", false)]), subject, true);
        assert!(!a.resync && !a.late, "a known edge's changes are never late");
        assert!(p.edges_of("alice").is_empty());
        assert_eq!(p.edges_of("bob"), [slot]);
    }

    #[test]
    fn users_on_several_edges_and_forgetting_an_edge() {
        let mut p = Presence::new();
        p.apply(&update("e1", true, &[("alice", true), ("bob", true)]), subject, false);
        p.apply(&update("e2", true, &[("alice", true)]), subject, false);
        assert_eq!(p.edges_of("alice").len(), 2);
        assert_eq!(p.edges_with_users().count(), 2);
        p.forget("e1");
        assert!(!p.knows("e1"));
        assert_eq!(p.edges_of("alice").len(), 1);
        assert!(p.edges_of("bob").is_empty());
        assert_eq!(p.user_count(), 1);
        // A forgotten edge that comes back is late if deliveries were stored meanwhile.
        let a = p.apply(&update("e1", true, &[("bob", true)]), subject, true);
        assert!(a.late);
        assert_eq!(p.edges_of("bob").len(), 1);
        // Its slot was reused, not leaked.
        assert_eq!(p.slot_count(), 2);
    }

    #[test]
    fn a_full_set_replaces_what_the_edge_had() {
        let mut p = Presence::new();
        p.apply(&update("e1", true, &[("alice", true), ("bob", true)]), subject, false);
        p.apply(&update("e1", true, &[("carol", true)]), subject, true);
        assert!(p.edges_of("alice").is_empty() && p.edges_of("bob").is_empty());
        assert_eq!(p.edges_of("carol").len(), 1);
        assert_eq!(p.user_count(), 1);
        // Repeated announcements do not double-count.
        p.apply(
            &update("e1", false, &[("carol", true), ("carol", true)]),
            subject,
            false,
        );
        p.apply(&update("e1", false, &[("carol", false)]), subject, false);
        assert_eq!(p.user_count(), 0);
        assert_eq!(p.edges_with_users().count(), 0);
    }

    fn sorted(mut changes: Vec<(Arc<str>, bool)>) -> Vec<(String, bool)> {
        changes.sort();
        changes.into_iter().map(|(u, on)| (u.to_string(), on)).collect()
    }

    #[test]
    fn changes_are_first_and_last_connections_fleet_wide() {
        let mut p = Presence::new();
        // Rebuilding the table (a new owner) announces nobody.
        p.apply(&update("e1", true, &[("alice", true), ("bob", true)]), subject, false);
        p.track_changes();
        assert!(p.take_changes().is_empty());
        // carol arrives; alice gets a second edge (no change); bob leaves.
        p.apply(&update("e1", false, &[("carol", true), ("bob", false)]), subject, false);
        p.apply(&update("e2", true, &[("alice", true)]), subject, false);
        assert_eq!(
            sorted(p.take_changes()),
            vec![("bob".to_string(), false), ("carol".to_string(), true)]
        );
        // Gone and back between two looks: nothing to announce.
        p.apply(&update("e1", false, &[("carol", false)]), subject, false);
        p.apply(&update("e2", false, &[("carol", true)]), subject, false);
        assert!(p.take_changes().is_empty());
        // An edge resending its whole set changes nobody; one that dies takes
        // away only the users it alone held.
        p.apply(&update("e1", true, &[("alice", true)]), subject, false);
        assert!(p.take_changes().is_empty());
        p.forget("e2");
        assert_eq!(sorted(p.take_changes()), vec![("carol".to_string(), false)]);
        p.forget("e1");
        assert_eq!(sorted(p.take_changes()), vec![("alice".to_string(), false)]);
    }
}
