//! The subscription index: which users' subscriptions match an event.
//!
//! [`SubscriptionIndex`] is the interface every index implements; the router
//! only talks to it. [`ScanIndex`] is the simple, obviously correct one: it
//! groups subscriptions by type and checks each against the event with
//! [`Subscription::matches`], the reference rule. It is O(subscriptions of
//! the type) per event; the fast inverted index replaces it behind the same
//! trait. Pure code: no I/O, no locks (the caller owns synchronisation).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use switchyard_common::subscription::{MatchQuery, Subscription};

/// Why an upsert was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// The user already holds the maximum number of subscriptions.
    #[error("a user may hold at most {0} subscriptions")]
    TooManySubscriptions(usize),
}

/// What every subscription index offers the router.
pub trait SubscriptionIndex: Send + Sync {
    /// Adds `sub` for `user`, replacing the user's subscription of the same name.
    /// A new name beyond `max_per_user` is refused.
    fn upsert(&mut self, user: &str, sub: Subscription, max_per_user: usize) -> Result<(), IndexError>;
    /// Removes the user's subscription `name`; whether it existed.
    fn remove(&mut self, user: &str, name: &str) -> bool;
    /// The user's subscriptions, ordered by name.
    fn list(&self, user: &str) -> Vec<Subscription>;
    /// Calls `f` once per matching (user, subscription).
    fn for_each_match(&self, event: &MatchQuery<'_>, f: &mut dyn FnMut(&Arc<str>, &Arc<Subscription>));
    /// Number of subscriptions held.
    fn len(&self) -> usize;
    /// Whether the index holds no subscription.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One user's subscription, as listed under its type.
type Entry = (Arc<str>, Arc<Subscription>);

/// A linear-scan index grouped by subscription type.
#[derive(Default)]
pub struct ScanIndex {
    by_type: HashMap<String, Vec<Entry>>,
    by_user: HashMap<Arc<str>, BTreeMap<String, Arc<Subscription>>>,
    count: usize,
}

impl ScanIndex {
    /// An empty index.
    pub fn new() -> ScanIndex {
        ScanIndex::default()
    }

    fn detach(&mut self, user: &str, old: &Subscription) {
        if let Some(list) = self.by_type.get_mut(&old.sub_type) {
            list.retain(|(u, s)| !(&**u == user && s.name == old.name));
            if list.is_empty() {
                self.by_type.remove(&old.sub_type);
            }
        }
    }
}

impl SubscriptionIndex for ScanIndex {
    fn upsert(&mut self, user: &str, sub: Subscription, max_per_user: usize) -> Result<(), IndexError> {
        let key: Arc<str> = match self.by_user.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        };
        let subs = self.by_user.entry(key.clone()).or_default();
        let previous = subs.get(&sub.name).cloned();
        if previous.is_none() && subs.len() >= max_per_user {
            if subs.is_empty() {
                self.by_user.remove(user);
            }
            return Err(IndexError::TooManySubscriptions(max_per_user));
        }
        let sub = Arc::new(sub);
        subs.insert(sub.name.clone(), sub.clone());
        match previous {
            Some(old) => self.detach(user, &old),
            None => self.count += 1,
        }
        self.by_type.entry(sub.sub_type.clone()).or_default().push((key, sub));
        Ok(())
    }

    fn remove(&mut self, user: &str, name: &str) -> bool {
        let Some(subs) = self.by_user.get_mut(user) else {
            return false;
        };
        let Some(old) = subs.remove(name) else { return false };
        if subs.is_empty() {
            self.by_user.remove(user);
        }
        self.detach(user, &old);
        self.count -= 1;
        true
    }

    fn list(&self, user: &str) -> Vec<Subscription> {
        self.by_user
            .get(user)
            .map(|subs| subs.values().map(|s| (**s).clone()).collect())
            .unwrap_or_default()
    }

    fn for_each_match(&self, event: &MatchQuery<'_>, f: &mut dyn FnMut(&Arc<str>, &Arc<Subscription>)) {
        if let Some(list) = self.by_type.get(event.sub_type) {
            for (user, sub) in list {
                if sub.matches(event) {
                    f(user, sub);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sub(name: &str, ty: &str, dims: &[(&str, &[&str])]) -> Subscription {
        Subscription {
            name: name.into(),
            sub_type: ty.into(),
            filters: dims
                .iter()
                .map(|(d, v)| (d.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            fields: None,
        }
    }

    fn matches(idx: &ScanIndex, ty: &str, dims: &[(&str, &str)]) -> Vec<String> {
        let dims: Vec<(String, String)> = dims.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let mut out = Vec::new();
        idx.for_each_match(
            &MatchQuery {
                sub_type: ty,
                dimensions: &dims,
                values: &[],
            },
            &mut |u, s| out.push(format!("{u}/{}", s.name)),
        );
        out.sort();
        out
    }

    #[test]
    fn upsert_replaces_by_name() {
        let mut idx = ScanIndex::new();
        idx.upsert("u1", sub("a", "tick", &[("symbol", &["AAPL"])]), 10)
            .unwrap();
        assert_eq!(matches(&idx, "tick", &[("symbol", "AAPL")]), vec!["u1/a"]);
        idx.upsert("u1", sub("a", "tick", &[("symbol", &["TSLA"])]), 10)
            .unwrap();
        assert_eq!(idx.len(), 1);
        assert!(matches(&idx, "tick", &[("symbol", "AAPL")]).is_empty());
        assert_eq!(matches(&idx, "tick", &[("symbol", "TSLA")]), vec!["u1/a"]);
        idx.upsert("u1", sub("a", "alert", &[]), 10).unwrap();
        assert!(matches(&idx, "tick", &[("symbol", "TSLA")]).is_empty());
        assert_eq!(matches(&idx, "alert", &[]), vec!["u1/a"]);
    }

    #[test]
    fn remove_and_limits() {
        let mut idx = ScanIndex::new();
        idx.upsert("u1", sub("a", "tick", &[]), 2).unwrap();
        idx.upsert("u2", sub("a", "tick", &[]), 2).unwrap();
        idx.upsert("u1", sub("b", "tick", &[]), 2).unwrap();
        assert_eq!(
            idx.upsert("u1", sub("c", "tick", &[]), 2),
            Err(IndexError::TooManySubscriptions(2))
        );
        idx.upsert("u1", sub("b", "tick", &[("x", &["1"])]), 2).unwrap();
        assert_eq!(matches(&idx, "tick", &[]), vec!["u1/a", "u2/a"]);
        assert!(idx.remove("u1", "a"));
        assert!(!idx.remove("u1", "a"));
        assert_eq!(matches(&idx, "tick", &[]), vec!["u2/a"]);
        assert_eq!(idx.list("u1").len(), 1);
        assert_eq!(idx.len(), 2);
    }
}
