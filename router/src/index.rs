//! The subscription index: which users' subscriptions match an event.
//!
//! [`SubscriptionIndex`] is the interface every index implements; the router
//! only talks to it. [`ScanIndex`] is the simple, obviously correct one: it
//! groups subscriptions by type and checks each against the event with
//! [`Subscription::matches`], the reference rule. It is O(subscriptions of
//! the type) per event; the fast inverted index replaces it behind the same
//! trait. Pure code: no I/O, no locks (the caller owns synchronisation).
//!
//! Matching hands out a [`SubRef`], not the `Subscription`: what delivery
//! needs after the lock is let go is the name and `fields`, and a handle that
//! holds only those (plus whatever private bytes an index packs behind them)
//! lets an index keep each subscription in a few dozen bytes instead of the
//! kilobyte a parsed `Subscription` costs. The whole subscription is only
//! needed again by `list`, a rare control op, and an index rebuilds it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;

use switchyard_common::subscription::{MatchQuery, Subscription};
use triomphe::ThinArc;

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
    fn upsert(&mut self, user: &str, sub: &Subscription, max_per_user: usize) -> Result<(), IndexError>;
    /// Removes the user's subscription `name`; whether it existed.
    fn remove(&mut self, user: &str, name: &str) -> bool;
    /// The user's subscriptions, ordered by name, equal to what was upserted.
    fn list(&self, user: &str) -> Vec<Subscription>;
    /// How many subscriptions `user` holds, and whether one of them is `name`
    /// (the per-user cap counts new names only).
    fn holds(&self, user: &str, name: &str) -> (usize, bool);
    /// How many distinct dimension names the subscriptions of `sub_type`
    /// filter on, and how many of `dims` are not among them. Matching scans
    /// a type's dimensions for every event, so the router bounds their
    /// number before accepting a subscription that would add some.
    fn dimension_growth(&self, sub_type: &str, dims: &[&str]) -> (usize, usize);
    /// Calls `f` once per matching (user, subscription).
    fn for_each_match(&self, event: &MatchQuery<'_>, f: &mut dyn FnMut(&Arc<str>, &SubRef));
    /// Number of subscriptions held.
    fn len(&self) -> usize;
    /// Whether the index holds no subscription.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A matched subscription as delivery sees it: its name, `fields` and
/// `throttle_ms`.
///
/// One thin reference-counted allocation (an 8-byte pointer; cloning it is one
/// atomic increment, no allocation), so a matcher can collect handles under
/// the index's read lock and use them after releasing it. The bytes are the
/// name, then `fields`, then the throttle, then an opaque tail that the index
/// that made the handle may use for its own bookkeeping; each part is
/// length-prefixed or a number (LEB128), so `name()` reads one byte of header
/// for names under 128 bytes.
#[derive(Clone)]
pub struct SubRef(ThinArc<(), u8>);

impl SubRef {
    /// A handle holding what delivery needs of `sub` only.
    pub fn new(sub: &Subscription) -> SubRef {
        SubRef::with_tail(sub, &[])
    }

    /// A handle holding what delivery needs of `sub`, and `tail` (bytes
    /// private to the index).
    pub(crate) fn with_tail(sub: &Subscription, tail: &[u8]) -> SubRef {
        let (name, fields) = (&sub.name, sub.fields.as_deref());
        let fields_len: usize = fields.map_or(0, |f| f.iter().map(|s| 5 + s.len()).sum());
        let mut bytes = Vec::with_capacity(15 + name.len() + fields_len + tail.len());
        put_uint(&mut bytes, name.len());
        bytes.extend_from_slice(name.as_bytes());
        match fields {
            None => put_uint(&mut bytes, 0),
            Some(fields) => {
                put_uint(&mut bytes, fields.len() + 1);
                for f in fields {
                    put_uint(&mut bytes, f.len());
                    bytes.extend_from_slice(f.as_bytes());
                }
            }
        }
        // 0: unthrottled (a throttle is at least 1 ms).
        put_uint(&mut bytes, sub.throttle_ms.map_or(0, |t| t as usize));
        bytes.extend_from_slice(tail);
        SubRef(ThinArc::from_header_and_slice((), &bytes))
    }

    fn bytes(&self) -> &[u8] {
        &self.0.slice
    }

    /// The name and the reader positioned after it.
    fn split_name(&self) -> (&str, Reader<'_>) {
        let mut r = Reader(self.bytes());
        let name = r.str();
        (name, r)
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        self.split_name().0
    }

    /// The top-level payload keys to deliver; `None` delivers the whole payload.
    pub fn fields(&self) -> Option<Fields<'_>> {
        let (_, mut r) = self.split_name();
        match r.uint() {
            0 => None,
            n => Some(Fields { left: n - 1, r }),
        }
    }

    /// The reader positioned after the fields (at the throttle).
    fn after_fields(&self) -> Reader<'_> {
        let (_, mut r) = self.split_name();
        match r.uint() {
            0 => r,
            n => Reader(Fields { left: n - 1, r }.rest()),
        }
    }

    /// The subscription's `throttle_ms`; `None` when unthrottled.
    pub fn throttle_ms(&self) -> Option<NonZeroU32> {
        NonZeroU32::new(self.after_fields().uint() as u32)
    }

    /// The index's private bytes after the name, fields and throttle.
    pub(crate) fn tail(&self) -> &[u8] {
        let mut r = self.after_fields();
        r.uint();
        r.0
    }

    /// Heap bytes of the allocation: the reference count, the length and the bytes.
    pub(crate) fn heap_len(&self) -> usize {
        16 + self.bytes().len()
    }
}

impl fmt::Debug for SubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubRef")
            .field("name", &self.name())
            .field("fields", &self.fields().map(|f| f.collect::<Vec<_>>()))
            .field("throttle_ms", &self.throttle_ms())
            .finish()
    }
}

/// The names in a [`SubRef`]'s `fields`, in the order they were given.
#[derive(Clone)]
pub struct Fields<'a> {
    left: usize,
    r: Reader<'a>,
}

impl<'a> Fields<'a> {
    /// The bytes after the last field.
    fn rest(mut self) -> &'a [u8] {
        for _ in self.by_ref() {}
        self.r.0
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(self.r.str())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Fields<'_> {}

/// Appends `n` as LEB128 (7 bits a byte, low first).
pub(crate) fn put_uint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads what [`put_uint`] and [`SubRef`] wrote. The bytes are always the
/// index's own, so running out of them is a bug and panics.
#[derive(Clone)]
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    /// The next LEB128 number.
    pub(crate) fn uint(&mut self) -> usize {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            let (&b, rest) = self.0.split_first().expect("packed bytes end early");
            self.0 = rest;
            n |= usize::from(b & 0x7f) << shift;
            if b < 0x80 {
                return n;
            }
            shift += 7;
        }
    }

    /// The next length-prefixed string.
    fn str(&mut self) -> &'a str {
        let len = self.uint();
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).expect("packed from a str")
    }
}

/// One user's subscription, as listed under its type, with the handle matching hands out.
type Entry = (Arc<str>, Arc<Subscription>, SubRef);

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
            list.retain(|(u, s, _)| !(&**u == user && s.name == old.name));
            if list.is_empty() {
                self.by_type.remove(&old.sub_type);
            }
        }
    }
}

impl SubscriptionIndex for ScanIndex {
    fn upsert(&mut self, user: &str, sub: &Subscription, max_per_user: usize) -> Result<(), IndexError> {
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
        let sub = Arc::new(sub.clone());
        subs.insert(sub.name.clone(), sub.clone());
        match previous {
            Some(old) => self.detach(user, &old),
            None => self.count += 1,
        }
        let handle = SubRef::new(&sub);
        self.by_type
            .entry(sub.sub_type.clone())
            .or_default()
            .push((key, sub, handle));
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

    fn holds(&self, user: &str, name: &str) -> (usize, bool) {
        self.by_user
            .get(user)
            .map_or((0, false), |subs| (subs.len(), subs.contains_key(name)))
    }

    fn dimension_growth(&self, sub_type: &str, dims: &[&str]) -> (usize, usize) {
        let held: std::collections::HashSet<&str> = self
            .by_type
            .get(sub_type)
            .into_iter()
            .flatten()
            .flat_map(|(_, s, _)| s.filters.keys().map(String::as_str))
            .collect();
        (held.len(), dims.iter().filter(|d| !held.contains(**d)).count())
    }

    fn for_each_match(&self, event: &MatchQuery<'_>, f: &mut dyn FnMut(&Arc<str>, &SubRef)) {
        if let Some(list) = self.by_type.get(event.sub_type) {
            for (user, sub, handle) in list {
                if sub.matches(event) {
                    f(user, handle);
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
            throttle_ms: None,
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
            &mut |u, s| out.push(format!("{u}/{}", s.name())),
        );
        out.sort();
        out
    }

    #[test]
    fn upsert_replaces_by_name() {
        let mut idx = ScanIndex::new();
        idx.upsert("u1", &sub("a", "tick", &[("symbol", &["AAPL"])]), 10)
            .unwrap();
        assert_eq!(matches(&idx, "tick", &[("symbol", "AAPL")]), vec!["u1/a"]);
        idx.upsert("u1", &sub("a", "tick", &[("symbol", &["TSLA"])]), 10)
            .unwrap();
        assert_eq!(idx.len(), 1);
        assert!(matches(&idx, "tick", &[("symbol", "AAPL")]).is_empty());
        assert_eq!(matches(&idx, "tick", &[("symbol", "TSLA")]), vec!["u1/a"]);
        idx.upsert("u1", &sub("a", "alert", &[]), 10).unwrap();
        assert!(matches(&idx, "tick", &[("symbol", "TSLA")]).is_empty());
        assert_eq!(matches(&idx, "alert", &[]), vec!["u1/a"]);
    }

    #[test]
    fn remove_and_limits() {
        let mut idx = ScanIndex::new();
        idx.upsert("u1", &sub("a", "tick", &[]), 2).unwrap();
        idx.upsert("u2", &sub("a", "tick", &[]), 2).unwrap();
        idx.upsert("u1", &sub("b", "tick", &[]), 2).unwrap();
        assert_eq!(
            idx.upsert("u1", &sub("c", "tick", &[]), 2),
            Err(IndexError::TooManySubscriptions(2))
        );
        idx.upsert("u1", &sub("b", "tick", &[("x", &["1"])]), 2).unwrap();
        assert_eq!(matches(&idx, "tick", &[]), vec!["u1/a", "u2/a"]);
        assert!(idx.remove("u1", "a"));
        assert!(!idx.remove("u1", "a"));
        assert_eq!(matches(&idx, "tick", &[]), vec!["u2/a"]);
        assert_eq!(idx.list("u1").len(), 1);
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn sub_ref_round_trips_name_fields_and_tail() {
        let long = "n".repeat(300);
        let fields = ["a".to_string(), "b".repeat(200), String::new()];
        for (name, fields, throttle, tail) in [
            ("s", None, None, &[][..]),
            ("s", Some(&fields[..]), Some(1), &[1, 2, 3][..]),
            (long.as_str(), Some(&fields[..0]), Some(3_600_000), &[0x80, 0][..]),
            ("", None, Some(200), &[7][..]),
        ] {
            let sub = Subscription {
                name: name.to_string(),
                sub_type: "t".into(),
                filters: BTreeMap::new(),
                min: BTreeMap::new(),
                max: BTreeMap::new(),
                fields: fields.map(|f| f.to_vec()),
                throttle_ms: throttle,
            };
            let r = SubRef::with_tail(&sub, tail);
            assert_eq!(r.name(), name);
            assert_eq!(
                r.fields().map(|f| f.collect::<Vec<_>>()),
                fields.map(|f| f.iter().map(String::as_str).collect())
            );
            assert_eq!(r.throttle_ms().map(NonZeroU32::get), throttle);
            assert_eq!(r.tail(), tail);
            assert_eq!(r.clone().name(), name);
        }
        let mut out = Vec::new();
        for n in [0, 1, 127, 128, 16_383, 16_384, usize::MAX] {
            out.clear();
            put_uint(&mut out, n);
            assert_eq!(Reader(&out).uint(), n);
        }
    }
}
