//! The fast subscription index: an inverted index of roaring bitmaps behind
//! the [`SubscriptionIndex`] trait, returning exactly what
//! [`Subscription::matches`] (the reference rule) selects.
//!
//! It owns, for every subscription it holds, a dense slot id, the user's
//! interned name, the `Arc<Subscription>` it hands to callers and the numeric
//! bounds in a compact form; and, per subscription type, the sets that turn an
//! event into its matching slots. It must not do I/O or lock anything: the
//! caller owns synchronisation (today a `std::sync::RwLock` in `state`).
//!
//! # Layout
//! - Slots: subscriptions get dense `u32` ids; a removed subscription's slot
//!   goes on a free list and is reused by the next new one, so sets stay
//!   dense. A replaced subscription (same user, same name) keeps its slot.
//!   A slot is 32 bytes: the `Arc<Subscription>`, the user's id, and the
//!   first bound inline (field id, low, high); the rare further bounds live
//!   in a side map keyed by slot.
//! - Per type: `all`, the set of its slots.
//! - Per (type, dimension): `constrained`, the slots that name the dimension in
//!   their `filters`, and per value the posting set of slots that list it.
//!   The *wildcard* set of the dimension (the type's slots that do not name
//!   it) is `all − constrained`; it is not stored but applied as a difference
//!   during the intersection (see below). Storing it would cost a copy of
//!   `all` for every dimension any subscription names (a client inventing
//!   dimension names could make each one cost |type|/8 bytes) and an update of
//!   every such set on each upsert; the difference costs the same bitmap pass
//!   at match time as intersecting with a stored set would.
//! - Interning: each type, dimension and value string is stored once, as the
//!   key of the map at its level (type → dimension → value → posting), and
//!   freed with its last subscription. Keying postings by the value string
//!   rather than by a value id saves the hot path a second hash lookup per
//!   event dimension and needs no refcounted value table. Bound field names
//!   are interned to dense `u32` ids (refcounted). A user's name is one
//!   `Arc<str>`, shared by the per-user map's key and the user-id table the
//!   callback's `&Arc<str>` points into; user ids are reused like slots.
//! - Per user: the slots ordered by subscription name (the name lives in the
//!   `Subscription`, not duplicated), for replace-by-name, limits and `list`.
//!
//! # Matching
//! For an event of type T: for each dimension d that some subscription of T
//! constrains, the candidates are `posting[d, event's value] ∪ (all −
//! constrained[d])`, or only the wildcard part when the event lacks d (or
//! carries a value nobody listed). Dimensions are taken smallest candidate
//! set first: the first one is the starting set (borrowed when it is a plain
//! posting), each next one narrows it as `(acc ∩ posting) ∪ (acc −
//! constrained)`. Event dimensions no subscription of T names are ignored.
//! Survivors then have their bounds checked (`lo ≤ v ≤ hi`; a missing field
//! or NaN fails) before the callback. A dimension's or field's value is the
//! event's first entry for it, as in [`MatchQuery::dimension`].
//!
//! Allocation: a constant number of buffers per event (at most one bitmap
//! per dimension of T plus the few roaring allocates inside an operation, a
//! small vector of the event's bound fields and one of the dimensions'
//! sets), none per candidate: candidates are checked in fixed batches on the
//! stack. No scratch is kept in the index or in a thread local, so matching
//! needs only `&self` and runs from any number of threads at once.
//!
//! # Updates and concurrency
//! `upsert` and `remove` touch only the sets named by that one subscription:
//! O(dimensions × values) bitmap inserts or removes, plus the user's slot list.
//! There is no rebuild, and a new dimension costs nothing beyond its own sets.
//! The router holds the index in a `RwLock<Box<dyn SubscriptionIndex>>`, so
//! one update holds the write lock for one subscription's worth of work.
//! Measured at 1M subscriptions (docs/BENCHMARKS.md, "Subscription index"):
//! a replace takes 8 µs at the median and 36 µs at p99, a remove plus a new
//! insert 4 µs and 13 µs; at 10k, 3.4 µs and 2.3 µs at the median.
//!
//! The other direction matters more at scale: a match holds the read lock
//! for as long as it runs, callbacks included, and a popular event at 1M
//! subscriptions selects around 100k of them (milliseconds). A writer waits
//! for the matches in flight, and readers arriving meanwhile wait behind it.
//! The next steps, if that shows in latency: shard the index by subscription
//! type (one lock each), keep callbacks cheap (collect, deliver after the
//! lock), or publish immutable per-type shards through an `arc-swap` (or a
//! left-right pair) so matching never waits for a writer at all.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use roaring::RoaringBitmap;
use switchyard_common::subscription::{MatchQuery, Subscription};

use crate::index::{IndexError, SubscriptionIndex};

/// One numeric bound of a subscription: `lo ≤ value of field ≤ hi`.
///
/// A field with only `min` gets `hi = +∞`, only `max` gets `lo = −∞`: both
/// comparisons still fail for NaN, exactly as the single one in the
/// reference rule does.
#[derive(Debug, Clone, Copy)]
struct Bound {
    field: u32,
    lo: f64,
    hi: f64,
}

/// Candidates whose slots are read together before their callbacks (see `FastIndex::emit`).
const EMIT_BATCH: usize = 32;

/// `Slot::field` of a subscription without bounds.
const NO_FIELD: u32 = u32::MAX;
/// Set in `Slot::field` when `FastIndex::more_bounds` holds further bounds.
const MORE_BOUNDS: u32 = 1 << 31;

/// One held subscription: 32 bytes, two to a cache line, the first bound inline.
///
/// Matching reads the slot of every candidate, and at 1M subscriptions that
/// read is most of the cost of a match: the bound inline saves a second
/// cache miss (it was two thirds of the per-match time), and the user as an
/// id into `FastIndex::names` rather than an `Arc<str>` keeps the slot at 32
/// bytes, so no slot straddles two cache lines.
struct Slot {
    sub: Arc<Subscription>,
    /// Index into `FastIndex::names`.
    user: u32,
    /// Field id of the first bound, [`NO_FIELD`] when there is none; with
    /// [`MORE_BOUNDS`] set when there are others.
    field: u32,
    lo: f64,
    hi: f64,
}

/// One user's entry in the per-user map.
struct User {
    /// Index into `FastIndex::names`.
    id: u32,
    /// The user's slots, ordered by subscription name.
    slots: Vec<u32>,
}

/// The sets of one subscription type.
#[derive(Default)]
struct TypeIndex {
    /// Every slot of the type.
    all: RoaringBitmap,
    /// The dimensions some subscription of the type constrains (few; scanned).
    dims: Vec<DimIndex>,
}

/// The sets of one (type, dimension).
struct DimIndex {
    name: Box<str>,
    /// Slots that name this dimension in `filters`.
    constrained: RoaringBitmap,
    /// Value → slots that list it.
    postings: HashMap<Box<str>, RoaringBitmap>,
}

/// Bound field names → dense ids, refcounted by the bounds that use them.
#[derive(Default)]
struct FieldIds {
    ids: HashMap<Box<str>, (u32, u32)>,
    free: Vec<u32>,
    next: u32,
}

impl FieldIds {
    fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).map(|(id, _)| *id)
    }

    fn acquire(&mut self, name: &str) -> u32 {
        if let Some((id, refs)) = self.ids.get_mut(name) {
            *refs += 1;
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        assert!(id < MORE_BOUNDS, "at most 2^31 bound field names");
        self.ids.insert(name.into(), (id, 1));
        id
    }

    fn release(&mut self, name: &str) {
        if let Some((id, refs)) = self.ids.get_mut(name) {
            *refs -= 1;
            if *refs == 0 {
                self.free.push(*id);
                self.ids.remove(name);
            }
        }
    }
}

/// Estimated heap bytes held by a [`FastIndex`], by part, excluding the
/// `Subscription` values themselves (which every index must keep whole to
/// hand them out) but including the `Arc` pointers to them.
///
/// Method: vector and hash-map capacities times element sizes (hash maps as
/// hashbrown lays them out: buckets × (entry + 1 control byte)), roaring
/// containers from `RoaringBitmap::statistics()` (array containers 2 bytes
/// per value of capacity, bitmap containers 8 KiB, 32 bytes per container
/// entry), and every heap block rounded as glibc's malloc does (16-byte
/// steps, 8-byte header, 32 bytes at least).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapBytes {
    /// The slot table: user and subscription pointers, first bound inline.
    pub slots: usize,
    /// Bounds beyond each subscription's first.
    pub bounds: usize,
    /// The per-user map, its interned names and slot lists.
    pub users: usize,
    /// Per-type, per-dimension and per-value sets, with their maps and keys.
    pub sets: usize,
    /// Free lists and the bound field interner.
    pub other: usize,
}

impl HeapBytes {
    /// The sum of all parts.
    pub fn total(&self) -> usize {
        self.slots + self.bounds + self.users + self.sets + self.other
    }
}

/// A heap block of `n` requested bytes as glibc's malloc sizes it.
fn block(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).div_ceil(16).max(2) * 16
    }
}

fn map_bytes<K, V>(map: &HashMap<K, V>) -> usize {
    if map.capacity() == 0 {
        return 0;
    }
    let buckets = (map.capacity() * 8 / 7).next_power_of_two();
    block(buckets * (std::mem::size_of::<(K, V)>() + 1) + 16)
}

fn bitmap_bytes(b: &RoaringBitmap) -> usize {
    let s = b.statistics();
    // roaring 0.10 reports array capacity × 4 bytes (values are u16) and
    // bitmap containers in bits, so both are recomputed here.
    let array_values = (s.n_bytes_array_containers / 4) as usize;
    let arrays = if s.n_array_containers == 0 {
        0
    } else {
        s.n_array_containers as usize * block(2 * array_values / s.n_array_containers as usize)
    };
    arrays + s.n_bitset_containers as usize * block(8192) + block(32 * s.n_containers as usize)
}

/// The inverted subscription index; see the module documentation.
#[derive(Default)]
pub struct FastIndex {
    types: HashMap<Box<str>, TypeIndex>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// User → id and slots.
    users: HashMap<Arc<str>, User>,
    /// User id → name (the same `Arc` as the map's key); a freed id holds an
    /// empty name until it is reused.
    names: Vec<Arc<str>>,
    free_users: Vec<u32>,
    fields: FieldIds,
    /// Bounds beyond the first, by slot (rare: most subscriptions have at most one).
    more_bounds: HashMap<u32, Box<[Bound]>>,
    count: usize,
}

/// Where the subscription `name` is (or would go) in a user's slot list.
fn find(list: &[u32], slots: &[Option<Slot>], name: &str) -> Result<usize, usize> {
    list.binary_search_by(|&s| match &slots[s as usize] {
        Some(slot) => slot.sub.name.as_str().cmp(name),
        None => unreachable!("a user's slot list names a free slot"),
    })
}

fn bound_holds(b: Bound, values: &[(u32, f64)]) -> bool {
    values
        .iter()
        .find(|(f, _)| *f == b.field)
        .is_some_and(|&(_, v)| v >= b.lo && v <= b.hi)
}

impl FastIndex {
    /// An empty index.
    pub fn new() -> FastIndex {
        FastIndex::default()
    }

    /// Estimated heap bytes of the index structures, by part.
    pub fn heap_bytes(&self) -> HeapBytes {
        let mut h = HeapBytes {
            slots: block(self.slots.capacity() * std::mem::size_of::<Option<Slot>>()),
            ..HeapBytes::default()
        };
        h.bounds = map_bytes(&self.more_bounds);
        for more in self.more_bounds.values() {
            h.bounds += block(std::mem::size_of_val::<[Bound]>(more));
        }
        h.users = map_bytes(&self.users)
            + block(self.names.capacity() * std::mem::size_of::<Arc<str>>())
            + block(self.free_users.capacity() * 4);
        for (name, user) in &self.users {
            // An Arc<str> block holds two counters and the bytes.
            h.users += block(16 + name.len()) + block(user.slots.capacity() * 4);
        }
        h.sets = map_bytes(&self.types);
        for (name, t) in &self.types {
            h.sets += block(name.len()) + bitmap_bytes(&t.all);
            h.sets += block(t.dims.capacity() * std::mem::size_of::<DimIndex>());
            for d in &t.dims {
                h.sets += block(d.name.len()) + bitmap_bytes(&d.constrained) + map_bytes(&d.postings);
                for (value, posting) in &d.postings {
                    h.sets += block(value.len()) + bitmap_bytes(posting);
                }
            }
        }
        h.other =
            block(self.free.capacity() * 4) + map_bytes(&self.fields.ids) + block(self.fields.free.capacity() * 4);
        for name in self.fields.ids.keys() {
            h.other += block(name.len());
        }
        h
    }

    /// The id of `user`, registering the name if it is new.
    fn user_id(&mut self, user: &str) -> u32 {
        if let Some(u) = self.users.get(user) {
            return u.id;
        }
        let name: Arc<str> = Arc::from(user);
        let id = match self.free_users.pop() {
            Some(id) => {
                self.names[id as usize] = name.clone();
                id
            }
            None => {
                self.names.push(name.clone());
                u32::try_from(self.names.len() - 1).expect("at most 2^32 users")
            }
        };
        self.users.insert(name, User { id, slots: Vec::new() });
        id
    }

    /// A slot id for a new subscription: a freed one if any.
    fn alloc_slot(&mut self) -> u32 {
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        let slot = u32::try_from(self.slots.len()).expect("at most 2^32 subscriptions");
        self.slots.push(None);
        slot
    }

    /// Adds `slot` (holding `sub`) to the sets `sub` names and makes its
    /// slot entry (bounds beyond the first go to `more_bounds`).
    fn attach(&mut self, slot: u32, user: u32, sub: Arc<Subscription>) -> Slot {
        let t = match self.types.get_mut(sub.sub_type.as_str()) {
            Some(t) => t,
            None => self.types.entry(sub.sub_type.as_str().into()).or_default(),
        };
        t.all.insert(slot);
        for (dim, values) in &sub.filters {
            let d = match t.dims.iter().position(|d| *d.name == **dim) {
                Some(i) => &mut t.dims[i],
                None => {
                    t.dims.push(DimIndex {
                        name: dim.as_str().into(),
                        constrained: RoaringBitmap::new(),
                        postings: HashMap::new(),
                    });
                    t.dims.last_mut().expect("just pushed")
                }
            };
            d.constrained.insert(slot);
            for v in values {
                match d.postings.get_mut(v.as_str()) {
                    Some(p) => {
                        p.insert(slot);
                    }
                    None => {
                        let mut p = RoaringBitmap::new();
                        p.insert(slot);
                        d.postings.insert(v.as_str().into(), p);
                    }
                }
            }
        }
        let mut bounds: Vec<Bound> = Vec::with_capacity(sub.min.len() + sub.max.len());
        for (field, lo) in &sub.min {
            bounds.push(Bound {
                field: self.fields.acquire(field),
                lo: *lo,
                hi: f64::INFINITY,
            });
        }
        for (field, hi) in &sub.max {
            let id = self.fields.acquire(field);
            match bounds.iter_mut().find(|b| b.field == id) {
                Some(b) => {
                    b.hi = *hi;
                    // One entry per field: the second reference is not kept.
                    self.fields.release(field);
                }
                None => bounds.push(Bound {
                    field: id,
                    lo: f64::NEG_INFINITY,
                    hi: *hi,
                }),
            }
        }
        let first = bounds.first().copied().unwrap_or(Bound {
            field: NO_FIELD,
            lo: 0.0,
            hi: 0.0,
        });
        let mut field = first.field;
        if bounds.len() > 1 {
            self.more_bounds.insert(slot, bounds[1..].into());
            field |= MORE_BOUNDS;
        }
        Slot {
            sub,
            user,
            field,
            lo: first.lo,
            hi: first.hi,
        }
    }

    /// Removes `slot` (holding `sub`) from the sets `sub` names.
    fn detach(&mut self, slot: u32, sub: &Subscription) {
        self.more_bounds.remove(&slot);
        if let Some(t) = self.types.get_mut(sub.sub_type.as_str()) {
            t.all.remove(slot);
            for (dim, values) in &sub.filters {
                let Some(i) = t.dims.iter().position(|d| *d.name == **dim) else {
                    continue;
                };
                let d = &mut t.dims[i];
                d.constrained.remove(slot);
                for v in values {
                    if let Some(p) = d.postings.get_mut(v.as_str()) {
                        p.remove(slot);
                        if p.is_empty() {
                            d.postings.remove(v.as_str());
                        }
                    }
                }
                if d.constrained.is_empty() {
                    t.dims.swap_remove(i);
                }
            }
            if t.all.is_empty() {
                self.types.remove(sub.sub_type.as_str());
            }
        }
        // One reference per distinct bound field, as `attach` took them.
        for field in sub.min.keys() {
            self.fields.release(field);
        }
        for field in sub.max.keys().filter(|f| !sub.min.contains_key(*f)) {
            self.fields.release(field);
        }
    }

    /// Whether the subscription in slot `s` is held and its bounds hold.
    fn passes(&self, s: u32, values: &[(u32, f64)]) -> bool {
        let Some(slot) = &self.slots[s as usize] else {
            return false;
        };
        if slot.field == NO_FIELD {
            return true;
        }
        let first = Bound {
            field: slot.field & !MORE_BOUNDS,
            lo: slot.lo,
            hi: slot.hi,
        };
        bound_holds(first, values)
            && (slot.field & MORE_BOUNDS == 0
                || self
                    .more_bounds
                    .get(&s)
                    .is_some_and(|more| more.iter().all(|b| bound_holds(*b, values))))
    }

    /// Checks the bounds of `candidates` and calls `f` for those that hold.
    ///
    /// Candidates go in batches of [`EMIT_BATCH`]: a first pass reads every
    /// slot of the batch and checks its bounds, a second calls `f`. The first
    /// pass's slot reads do not depend on each other, so their cache misses
    /// overlap instead of being paid one after the other around each call.
    fn emit(
        &self,
        candidates: impl Iterator<Item = u32>,
        values: &[(u32, f64)],
        f: &mut dyn FnMut(&Arc<str>, &Arc<Subscription>),
    ) {
        let mut batch = [0u32; EMIT_BATCH];
        let mut n = 0;
        let mut flush = |batch: &[u32]| {
            let mut pass = [false; EMIT_BATCH];
            for (p, &s) in pass.iter_mut().zip(batch) {
                *p = self.passes(s, values);
            }
            for (&p, &s) in pass.iter().zip(batch) {
                if let (true, Some(slot)) = (p, &self.slots[s as usize]) {
                    f(&self.names[slot.user as usize], &slot.sub);
                }
            }
        };
        for s in candidates {
            batch[n] = s;
            n += 1;
            if n == EMIT_BATCH {
                flush(&batch);
                n = 0;
            }
        }
        flush(&batch[..n]);
    }
}

/// One dimension's candidates for an event: its posting (if the event has a
/// listed value) and its constrained set, with the candidate count.
struct DimCandidates<'a> {
    posting: Option<&'a RoaringBitmap>,
    constrained: &'a RoaringBitmap,
    /// Whether every slot of the type names the dimension (no wildcard part).
    total: bool,
    size: u64,
}

impl SubscriptionIndex for FastIndex {
    fn upsert(&mut self, user: &str, sub: Subscription, max_per_user: usize) -> Result<(), IndexError> {
        let existing = self
            .users
            .get(user)
            .and_then(|u| find(&u.slots, &self.slots, &sub.name).ok().map(|i| u.slots[i]));
        let sub = Arc::new(sub);
        match existing {
            Some(slot) => {
                let old = self.slots[slot as usize].take().expect("listed slot is held");
                self.detach(slot, &old.sub);
                self.slots[slot as usize] = Some(self.attach(slot, old.user, sub));
            }
            None => {
                let held = self.users.get(user).map_or(0, |u| u.slots.len());
                if held >= max_per_user {
                    return Err(IndexError::TooManySubscriptions(max_per_user));
                }
                let id = self.user_id(user);
                let slot = self.alloc_slot();
                let list = &mut self.users.get_mut(user).expect("just registered").slots;
                let pos = find(list, &self.slots, &sub.name).expect_err("name not held yet");
                list.insert(pos, slot);
                self.slots[slot as usize] = Some(self.attach(slot, id, sub));
                self.count += 1;
            }
        }
        Ok(())
    }

    fn remove(&mut self, user: &str, name: &str) -> bool {
        let Some(u) = self.users.get_mut(user) else {
            return false;
        };
        let Ok(i) = find(&u.slots, &self.slots, name) else {
            return false;
        };
        let slot = u.slots.remove(i);
        if u.slots.is_empty() {
            let id = u.id;
            self.users.remove(user);
            self.names[id as usize] = Arc::from("");
            self.free_users.push(id);
        }
        let old = self.slots[slot as usize].take().expect("listed slot is held");
        self.detach(slot, &old.sub);
        self.free.push(slot);
        self.count -= 1;
        true
    }

    fn list(&self, user: &str) -> Vec<Subscription> {
        self.users
            .get(user)
            .map(|u| {
                u.slots
                    .iter()
                    .filter_map(|&s| self.slots[s as usize].as_ref())
                    .map(|slot| (*slot.sub).clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn for_each_match(&self, event: &MatchQuery<'_>, f: &mut dyn FnMut(&Arc<str>, &Arc<Subscription>)) {
        let Some(t) = self.types.get(event.sub_type) else {
            return;
        };
        // The event's values under field ids; unknown fields bound nothing.
        // Order is kept, so the first entry for a field wins, as in `MatchQuery::value`.
        let values: Vec<(u32, f64)> = event
            .values
            .iter()
            .filter_map(|(name, v)| self.fields.get(name).map(|id| (id, *v)))
            .collect();
        let all = t.all.len();
        let mut dims: Vec<DimCandidates<'_>> = Vec::with_capacity(t.dims.len());
        for d in &t.dims {
            let posting = event.dimension(&d.name).and_then(|v| d.postings.get(v));
            let constrained = d.constrained.len();
            let size = posting.map_or(0, |p| p.len()) + (all - constrained);
            if size == 0 {
                return;
            }
            dims.push(DimCandidates {
                posting,
                constrained: &d.constrained,
                total: constrained == all,
                size,
            });
        }
        dims.sort_unstable_by_key(|d| d.size);
        let Some((first, rest)) = dims.split_first() else {
            // No subscription of the type filters on anything.
            self.emit(t.all.iter(), &values, f);
            return;
        };
        // The accumulator borrows the first set when it is a plain posting (no
        // wildcard part), so the first narrowing step reads it in place
        // instead of copying it; later steps work in place on their own result.
        let mut acc = match (first.total, first.posting) {
            (true, Some(p)) => Cow::Borrowed(p),
            (true, None) => return,
            (false, p) => {
                let mut acc = &t.all - first.constrained;
                if let Some(p) = p {
                    acc |= p;
                }
                Cow::Owned(acc)
            }
        };
        for d in rest {
            acc = match (acc, d.posting, d.total) {
                (Cow::Borrowed(a), Some(p), true) => Cow::Owned(a & p),
                (Cow::Borrowed(a), Some(p), false) => {
                    let mut next = a - d.constrained;
                    next |= a & p;
                    Cow::Owned(next)
                }
                (Cow::Borrowed(a), None, _) => Cow::Owned(a - d.constrained),
                (Cow::Owned(mut a), Some(p), true) => {
                    a &= p;
                    Cow::Owned(a)
                }
                (Cow::Owned(mut a), Some(p), false) => {
                    let hit = &a & p;
                    a -= d.constrained;
                    a |= hit;
                    Cow::Owned(a)
                }
                (Cow::Owned(mut a), None, _) => {
                    a -= d.constrained;
                    Cow::Owned(a)
                }
            };
            if acc.is_empty() {
                return;
            }
        }
        self.emit(acc.iter(), &values, f);
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
                .map(|(d, v)| {
                    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
                    v.sort();
                    (d.to_string(), v)
                })
                .collect(),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            fields: None,
        }
    }

    fn bounded(mut s: Subscription, min: &[(&str, f64)], max: &[(&str, f64)]) -> Subscription {
        s.min = min.iter().map(|(f, v)| (f.to_string(), *v)).collect();
        s.max = max.iter().map(|(f, v)| (f.to_string(), *v)).collect();
        s
    }

    fn query(idx: &FastIndex, ty: &str, dims: &[(&str, &str)], values: &[(&str, f64)]) -> Vec<String> {
        let dims: Vec<(String, String)> = dims.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let values: Vec<(String, f64)> = values.iter().map(|(a, b)| (a.to_string(), *b)).collect();
        let mut out = Vec::new();
        idx.for_each_match(
            &MatchQuery {
                sub_type: ty,
                dimensions: &dims,
                values: &values,
            },
            &mut |u, s| out.push(format!("{u}/{}", s.name)),
        );
        out.sort();
        out
    }

    fn matches(idx: &FastIndex, ty: &str, dims: &[(&str, &str)]) -> Vec<String> {
        query(idx, ty, dims, &[])
    }

    #[test]
    fn wildcard_dimensions_match_anything() {
        let mut idx = FastIndex::new();
        idx.upsert("u1", sub("sym", "t", &[("symbol", &["AAPL"])]), 10).unwrap();
        idx.upsert("u1", sub("tier", "t", &[("tier", &["daily"])]), 10).unwrap();
        idx.upsert(
            "u2",
            sub("both", "t", &[("symbol", &["AAPL", "TSLA"]), ("tier", &["daily"])]),
            10,
        )
        .unwrap();
        idx.upsert("u2", sub("any", "t", &[]), 10).unwrap();
        assert_eq!(
            matches(&idx, "t", &[("symbol", "AAPL"), ("tier", "daily"), ("extra", "x")]),
            vec!["u1/sym", "u1/tier", "u2/any", "u2/both"]
        );
        assert_eq!(
            matches(&idx, "t", &[("symbol", "TSLA"), ("tier", "weekly")]),
            vec!["u2/any"]
        );
        assert_eq!(
            matches(&idx, "t", &[("tier", "daily"), ("symbol", "TSLA")]),
            vec!["u1/tier", "u2/any", "u2/both"]
        );
        assert!(matches(&idx, "other", &[("symbol", "AAPL")]).is_empty());
    }

    #[test]
    fn dimensions_every_subscription_names() {
        // No wildcard part on either dimension: plain posting intersections.
        let mut idx = FastIndex::new();
        idx.upsert("u1", sub("a", "t", &[("s", &["x", "y"]), ("k", &["1"])]), 10)
            .unwrap();
        idx.upsert("u1", sub("b", "t", &[("s", &["x"]), ("k", &["1", "2"])]), 10)
            .unwrap();
        idx.upsert("u2", sub("c", "t", &[("s", &["y"]), ("k", &["2"]), ("m", &["z"])]), 10)
            .unwrap();
        assert_eq!(matches(&idx, "t", &[("s", "x"), ("k", "1")]), vec!["u1/a", "u1/b"]);
        assert_eq!(matches(&idx, "t", &[("s", "x"), ("k", "2")]), vec!["u1/b"]);
        assert_eq!(matches(&idx, "t", &[("s", "y"), ("k", "2")]), Vec::<String>::new());
        assert_eq!(matches(&idx, "t", &[("s", "y"), ("k", "2"), ("m", "z")]), vec!["u2/c"]);
        assert!(matches(&idx, "t", &[("s", "x")]).is_empty());
        assert!(matches(&idx, "t", &[("s", "q"), ("k", "1")]).is_empty());
    }

    #[test]
    fn event_lacking_a_constrained_dimension() {
        let mut idx = FastIndex::new();
        idx.upsert("u1", sub("a", "t", &[("symbol", &["AAPL"]), ("tier", &["daily"])]), 10)
            .unwrap();
        idx.upsert("u1", sub("b", "t", &[("symbol", &["AAPL"])]), 10).unwrap();
        assert_eq!(matches(&idx, "t", &[("symbol", "AAPL")]), vec!["u1/b"]);
        assert!(matches(&idx, "t", &[("tier", "daily")]).is_empty());
        assert!(matches(&idx, "t", &[]).is_empty());
        // The first entry for a dimension is the event's value, as in MatchQuery::dimension.
        assert!(matches(&idx, "t", &[("symbol", "TSLA"), ("symbol", "AAPL")]).is_empty());
        assert_eq!(
            matches(&idx, "t", &[("symbol", "AAPL"), ("symbol", "TSLA")]),
            vec!["u1/b"]
        );
    }

    #[test]
    fn bounds_on_missing_fields_and_nan() {
        let mut idx = FastIndex::new();
        idx.upsert("u", bounded(sub("min", "t", &[]), &[("c", 0.6)], &[]), 10)
            .unwrap();
        idx.upsert("u", bounded(sub("max", "t", &[]), &[], &[("c", 0.6)]), 10)
            .unwrap();
        idx.upsert("u", bounded(sub("range", "t", &[]), &[("c", 0.2)], &[("c", 0.8)]), 10)
            .unwrap();
        idx.upsert("u", bounded(sub("two", "t", &[]), &[("c", 0.5), ("p", 1.0)], &[]), 10)
            .unwrap();
        idx.upsert("u", sub("none", "t", &[]), 10).unwrap();
        assert_eq!(query(&idx, "t", &[], &[]), vec!["u/none"]);
        assert_eq!(query(&idx, "t", &[], &[("other", 1.0)]), vec!["u/none"]);
        assert_eq!(
            query(&idx, "t", &[], &[("c", 0.6)]),
            vec!["u/max", "u/min", "u/none", "u/range"]
        );
        assert_eq!(query(&idx, "t", &[], &[("c", 0.9)]), vec!["u/min", "u/none"]);
        assert_eq!(query(&idx, "t", &[], &[("c", 0.1)]), vec!["u/max", "u/none"]);
        assert_eq!(
            query(&idx, "t", &[], &[("c", 0.7), ("p", 1.0)]),
            vec!["u/min", "u/none", "u/range", "u/two"]
        );
        assert_eq!(query(&idx, "t", &[], &[("c", f64::NAN)]), vec!["u/none"]);
        assert_eq!(query(&idx, "t", &[], &[("c", f64::INFINITY)]), vec!["u/min", "u/none"]);
        // First entry wins.
        assert_eq!(
            query(&idx, "t", &[], &[("c", 0.1), ("c", 0.9)]),
            vec!["u/max", "u/none"]
        );
        // Bounds beyond the first live outside the slot.
        idx.upsert(
            "u",
            bounded(sub("three", "t", &[]), &[("a", 1.0), ("b", 1.0)], &[("c", 1.0)]),
            10,
        )
        .unwrap();
        assert_eq!(idx.more_bounds.len(), 2);
        let all = [("a", 1.0), ("b", 1.0), ("c", 1.0), ("p", 1.0)];
        assert!(query(&idx, "t", &[], &all).contains(&"u/three".to_string()));
        for skip in 0..3 {
            let some: Vec<(&str, f64)> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, v)| *v)
                .collect();
            assert!(!query(&idx, "t", &[], &some).contains(&"u/three".to_string()));
        }
        idx.remove("u", "three");
        idx.remove("u", "two");
        assert!(idx.more_bounds.is_empty());
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 32);
    }

    #[test]
    fn upsert_changes_type_and_dimensions() {
        let mut idx = FastIndex::new();
        idx.upsert("u1", sub("a", "tick", &[("symbol", &["AAPL"])]), 10)
            .unwrap();
        idx.upsert("u1", sub("a", "tick", &[("tier", &["daily"])]), 10).unwrap();
        assert_eq!(idx.len(), 1);
        assert!(matches(&idx, "tick", &[("symbol", "AAPL")]).is_empty());
        assert_eq!(
            matches(&idx, "tick", &[("symbol", "AAPL"), ("tier", "daily")]),
            vec!["u1/a"]
        );
        idx.upsert("u1", bounded(sub("a", "alert", &[]), &[("c", 1.0)], &[]), 10)
            .unwrap();
        assert!(matches(&idx, "tick", &[("tier", "daily")]).is_empty());
        assert!(query(&idx, "alert", &[], &[("c", 0.5)]).is_empty());
        assert_eq!(query(&idx, "alert", &[], &[("c", 1.5)]), vec!["u1/a"]);
        idx.upsert("u1", sub("a", "alert", &[]), 10).unwrap();
        assert_eq!(query(&idx, "alert", &[], &[]), vec!["u1/a"]);
        // Nothing of the old type, dimensions or bound fields is left behind.
        assert_eq!(idx.types.len(), 1);
        assert!(idx.types["alert"].dims.is_empty());
        assert!(idx.fields.ids.is_empty());
        assert_eq!(idx.slots.len(), 1);
    }

    #[test]
    fn remove_frees_everything() {
        let mut idx = FastIndex::new();
        idx.upsert(
            "u1",
            bounded(sub("a", "t", &[("s", &["x", "y"])]), &[("c", 0.0)], &[("c", 1.0)]),
            10,
        )
        .unwrap();
        idx.upsert("u2", sub("a", "t", &[("s", &["x"])]), 10).unwrap();
        assert!(idx.remove("u1", "a"));
        assert!(!idx.remove("u1", "a"));
        assert!(!idx.remove("u2", "b"));
        assert_eq!(matches(&idx, "t", &[("s", "x")]), vec!["u2/a"]);
        assert!(matches(&idx, "t", &[("s", "y")]).is_empty());
        assert_eq!(idx.len(), 1);
        assert!(idx.list("u1").is_empty());
        assert!(!idx.users.contains_key("u1"));
        assert!(idx.fields.ids.is_empty());
        assert!(idx.remove("u2", "a"));
        assert!(idx.is_empty());
        assert!(idx.types.is_empty());
        assert!(idx.users.is_empty());
        assert!(idx.names.iter().all(|n| n.is_empty()));
        // Freed user ids are reused.
        idx.upsert("u3", sub("a", "t", &[]), 10).unwrap();
        assert_eq!(idx.names.len(), 2);
        assert_eq!(matches(&idx, "t", &[]), vec!["u3/a"]);
    }

    #[test]
    fn freed_slots_are_reused() {
        let mut idx = FastIndex::new();
        for n in ["a", "b", "c"] {
            idx.upsert("u", sub(n, "t", &[]), 10).unwrap();
        }
        assert!(idx.remove("u", "b"));
        idx.upsert("v", sub("d", "t", &[("s", &["x"])]), 10).unwrap();
        assert_eq!(idx.slots.len(), 3);
        assert_eq!(idx.types["t"].all.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(matches(&idx, "t", &[("s", "x")]), vec!["u/a", "u/c", "v/d"]);
        // A replacement keeps its slot.
        idx.upsert("v", sub("d", "t", &[("s", &["y"])]), 10).unwrap();
        assert_eq!(idx.slots.len(), 3);
        assert_eq!(idx.free.len(), 0);
    }

    #[test]
    fn max_per_user_limits_new_names_only() {
        let mut idx = FastIndex::new();
        idx.upsert("u1", sub("a", "t", &[]), 2).unwrap();
        idx.upsert("u1", sub("b", "t", &[]), 2).unwrap();
        assert_eq!(
            idx.upsert("u1", sub("c", "t", &[]), 2),
            Err(IndexError::TooManySubscriptions(2))
        );
        idx.upsert("u1", sub("b", "t", &[("x", &["1"])]), 2).unwrap();
        idx.upsert("u2", sub("c", "t", &[]), 2).unwrap();
        assert_eq!(
            idx.upsert("u3", sub("a", "t", &[]), 0),
            Err(IndexError::TooManySubscriptions(0))
        );
        assert!(!idx.users.contains_key("u3"));
        assert_eq!(idx.len(), 3);
        assert_eq!(matches(&idx, "t", &[]), vec!["u1/a", "u2/c"]);
    }

    #[test]
    fn list_is_ordered_by_name() {
        let mut idx = FastIndex::new();
        for n in ["m", "b", "z", "a", "B"] {
            idx.upsert("u", sub(n, "t", &[]), 10).unwrap();
        }
        idx.upsert("u", sub("m", "other", &[]), 10).unwrap();
        idx.remove("u", "z");
        let names: Vec<String> = idx.list("u").into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["B", "a", "b", "m"]);
        assert_eq!(idx.list("u")[3].sub_type, "other");
        assert!(idx.list("nobody").is_empty());
    }

    #[test]
    fn users_share_one_name() {
        let mut idx = FastIndex::new();
        idx.upsert("u", sub("a", "t", &[]), 10).unwrap();
        idx.upsert("u", sub("b", "t", &[]), 10).unwrap();
        let mut users: Vec<Arc<str>> = Vec::new();
        idx.for_each_match(
            &MatchQuery {
                sub_type: "t",
                dimensions: &[],
                values: &[],
            },
            &mut |u, _| users.push(u.clone()),
        );
        assert_eq!(users.len(), 2);
        assert!(Arc::ptr_eq(&users[0], &users[1]));
    }

    #[test]
    fn heap_bytes_counts_every_part() {
        let mut idx = FastIndex::new();
        let empty = idx.heap_bytes().total();
        for i in 0..100 {
            idx.upsert(
                &format!("u{}", i % 7),
                sub(&format!("s{i}"), "t", &[("s", &["x"])]),
                100,
            )
            .unwrap();
        }
        let full = idx.heap_bytes();
        assert!(full.total() > empty);
        assert!(full.users > 0 && full.sets > 0 && full.slots > 0);
    }
}
