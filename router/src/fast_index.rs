//! The inverted subscription index the router matches with: roaring-bitmap
//! posting sets behind the [`SubscriptionIndex`] trait.
//!
//! It owns, per subscription, a dense slot (the packed [`SubRef`], the user,
//! the bounds) and, per subscription type, the sets that turn an event into
//! its matching slots: the type's slots, per dimension the slots that
//! constrain it, and per value its posting set. Invariants: it selects
//! exactly what [`Subscription::matches`] selects (property-tested against
//! the scan index in `router/tests/index_equivalence.rs`); a dimension's
//! wildcard set is never stored (it is `all − constrained`, applied during
//! the intersection); an update touches only its own subscription's sets;
//! matching allocates nothing per candidate and needs only `&self`. It must
//! not do I/O or lock anything: the caller owns synchronisation (`state`).
//! Design and trade-offs: docs/ARCHITECTURE.md, "The router's index";
//! numbers: docs/BENCHMARKS.md, "Subscription index".

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use roaring::RoaringBitmap;
use switchyard_common::subscription::{MatchQuery, Subscription};

use crate::index::{put_uint, IndexError, Reader, SubRef, SubscriptionIndex};

/// One numeric bound of a subscription: `lo ≤ value of field ≤ hi`.
///
/// A field with only `min` gets `hi = +∞`, only `max` gets `lo = −∞`: both
/// comparisons still fail for NaN, exactly as the single one in the
/// reference rule does. `field` carries [`HAS_MIN`] and [`HAS_MAX`] beside
/// the id, so `list` gives back exactly the maps it was given (a `min` of
/// −∞ is not the same subscription as no `min`).
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
/// Set in a bound's field when it came from `min`.
const HAS_MIN: u32 = 1 << 30;
/// Set in a bound's field when it came from `max`.
const HAS_MAX: u32 = 1 << 29;
/// The field id bits of a bound's field. The all-ones id is never given
/// out, so no bound's field equals [`NO_FIELD`].
const FIELD_ID: u32 = HAS_MAX - 1;

/// One held subscription: 32 bytes, two to a cache line, the first bound inline.
///
/// Matching reads the slot of every candidate, and at 1M subscriptions that
/// read is most of the cost of a match: the bound inline saves a second
/// cache miss (it was two thirds of the per-match time), and the user as an
/// id into `FastIndex::names` rather than an `Arc<str>`, with the `SubRef` a
/// thin pointer, keeps the slot at 32 bytes, so no slot straddles two cache
/// lines.
struct Slot {
    sub: SubRef,
    /// Index into `FastIndex::names`.
    user: u32,
    /// Field id and flags of the first bound, [`NO_FIELD`] when there is
    /// none; with [`MORE_BOUNDS`] set when there are others.
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

/// Strings with a dense id and a value each: the map at one level of the
/// index (types, a dimension's values, bound fields).
///
/// Looking up by string is the map's; by id, `keys` gives the string back
/// (the same `Arc` as the map's key). Freed ids are reused first.
struct Interned<V> {
    map: HashMap<Arc<str>, (u32, V)>,
    /// Id → string; `None` for a freed id.
    keys: Vec<Option<Arc<str>>>,
    free: Vec<u32>,
}

impl<V> Default for Interned<V> {
    fn default() -> Self {
        Interned {
            map: HashMap::new(),
            keys: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<V> Interned<V> {
    fn get(&self, key: &str) -> Option<&(u32, V)> {
        self.map.get(key)
    }

    /// The string of a live id.
    fn key(&self, id: u32) -> &str {
        self.keys[id as usize].as_deref().expect("a live id")
    }

    fn by_id(&self, id: u32) -> Option<&V> {
        let key = self.keys.get(id as usize)?.as_deref()?;
        self.map.get(key).map(|(_, v)| v)
    }

    fn by_id_mut(&mut self, id: u32) -> Option<&mut V> {
        let key = self.keys.get(id as usize)?.as_deref()?;
        self.map.get_mut(key).map(|(_, v)| v)
    }

    /// The id and value of `key`, made with `make` if it is new.
    fn entry(&mut self, key: &str, make: impl FnOnce() -> V) -> (u32, &mut V) {
        if !self.map.contains_key(key) {
            let id = self.free.pop().unwrap_or_else(|| {
                self.keys.push(None);
                u32::try_from(self.keys.len() - 1).expect("at most 2^32 names")
            });
            let key: Arc<str> = Arc::from(key);
            self.keys[id as usize] = Some(key.clone());
            self.map.insert(key, (id, make()));
        }
        let (id, value) = self.map.get_mut(key).expect("just made");
        (*id, value)
    }

    /// Frees `id` and its string.
    fn remove(&mut self, id: u32) {
        if let Some(key) = self.keys.get_mut(id as usize).and_then(Option::take) {
            self.map.remove(&*key);
            self.free.push(id);
        }
    }

    /// Heap bytes of the map, the id table, the free list and the strings,
    /// plus `value` for each value's own heap.
    fn heap_bytes(&self, value: impl Fn(&V) -> usize) -> usize {
        let mut n = map_bytes(&self.map)
            + block(self.keys.capacity() * std::mem::size_of::<Option<Arc<str>>>())
            + block(self.free.capacity() * 4);
        for (key, (_, v)) in &self.map {
            n += block(16 + key.len()) + value(v);
        }
        n
    }
}

/// The sets of one subscription type.
#[derive(Default)]
struct TypeIndex {
    /// Every slot of the type.
    all: RoaringBitmap,
    /// The dimensions some subscription of the type constrains (few; scanned).
    dims: Vec<DimIndex>,
    /// Dimension ids freed with their dimension, reused first.
    free_dims: Vec<u32>,
    /// The next dimension id never given out.
    next_dim: u32,
}

/// The sets of one (type, dimension).
struct DimIndex {
    /// Id within the type, as `SubRef` tails name it.
    id: u32,
    name: Box<str>,
    /// Slots that name this dimension in `filters`.
    constrained: RoaringBitmap,
    /// Value → slots that list it.
    postings: Interned<RoaringBitmap>,
}

/// Estimated heap bytes held by a [`FastIndex`], by part: everything it
/// holds, the subscriptions included.
///
/// Method: vector and hash-map capacities times element sizes (hash maps as
/// hashbrown lays them out: buckets × (entry + 1 control byte)), roaring
/// containers from `RoaringBitmap::statistics()` (array containers 2 bytes
/// per value of capacity, bitmap containers 8 KiB, 32 bytes per container
/// entry), and every heap block rounded as glibc's malloc does (16-byte
/// steps, 8-byte header, 32 bytes at least).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapBytes {
    /// The slot table: `SubRef` pointers, user ids, first bound inline.
    pub slots: usize,
    /// The `SubRef` allocations: names, `fields` and the ids of each
    /// subscription's type, dimensions and values.
    pub subs: usize,
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
        self.slots + self.subs + self.bounds + self.users + self.sets + self.other
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
    types: Interned<TypeIndex>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// User → id and slots.
    users: HashMap<Arc<str>, User>,
    /// User id → name (the same `Arc` as the map's key); a freed id holds an
    /// empty name until it is reused.
    names: Vec<Arc<str>>,
    free_users: Vec<u32>,
    /// Bound field names, refcounted by the bounds that use them.
    fields: Interned<u32>,
    /// Bounds beyond the first, by slot (rare: most subscriptions have at most one).
    more_bounds: HashMap<u32, Box<[Bound]>>,
    count: usize,
}

/// Where the subscription `name` is (or would go) in a user's slot list.
fn find(list: &[u32], slots: &[Option<Slot>], name: &str) -> Result<usize, usize> {
    list.binary_search_by(|&s| match &slots[s as usize] {
        Some(slot) => slot.sub.name().cmp(name),
        None => unreachable!("a user's slot list names a free slot"),
    })
}

fn bound_holds(b: Bound, values: &[(u32, f64)]) -> bool {
    let field = b.field & FIELD_ID;
    values
        .iter()
        .find(|(f, _)| *f == field)
        .is_some_and(|&(_, v)| v >= b.lo && v <= b.hi)
}

impl FastIndex {
    /// An empty index.
    pub fn new() -> FastIndex {
        FastIndex::default()
    }

    /// Estimated heap bytes of everything the index holds, by part.
    pub fn heap_bytes(&self) -> HeapBytes {
        let mut h = HeapBytes {
            slots: block(self.slots.capacity() * std::mem::size_of::<Option<Slot>>()),
            ..HeapBytes::default()
        };
        for slot in self.slots.iter().flatten() {
            h.subs += block(slot.sub.heap_len());
        }
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
        h.sets = self.types.heap_bytes(|t| {
            let mut n = bitmap_bytes(&t.all)
                + block(t.dims.capacity() * std::mem::size_of::<DimIndex>())
                + block(t.free_dims.capacity() * 4);
            for d in &t.dims {
                n += block(d.name.len()) + bitmap_bytes(&d.constrained) + d.postings.heap_bytes(bitmap_bytes);
            }
            n
        });
        h.other = block(self.free.capacity() * 4) + self.fields.heap_bytes(|_| 0);
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

    /// A reference to bound field `name`'s id, registering it if it is new.
    fn acquire_field(&mut self, name: &str) -> u32 {
        let (id, refs) = self.fields.entry(name, || 0);
        *refs += 1;
        assert!(id < FIELD_ID, "at most 2^29 - 1 bound field names");
        id
    }

    fn release_field(&mut self, id: u32) {
        if let Some(refs) = self.fields.by_id_mut(id) {
            *refs -= 1;
            if *refs == 0 {
                self.fields.remove(id);
            }
        }
    }

    /// Adds `slot` to the sets `sub` names and makes its slot entry (bounds
    /// beyond the first go to `more_bounds`).
    fn attach(&mut self, slot: u32, user: u32, sub: &Subscription) -> Slot {
        // The ids `detach` and `list` will need: type, then per dimension
        // its id, its value count and its values' ids.
        let mut tail = Vec::with_capacity(8 + 4 * sub.filters.len());
        let (type_id, t) = self.types.entry(&sub.sub_type, TypeIndex::default);
        put_uint(&mut tail, type_id as usize);
        put_uint(&mut tail, sub.filters.len());
        t.all.insert(slot);
        for (dim, values) in &sub.filters {
            let i = match t.dims.iter().position(|d| *d.name == **dim) {
                Some(i) => i,
                None => {
                    let id = t.free_dims.pop().unwrap_or_else(|| {
                        t.next_dim += 1;
                        t.next_dim - 1
                    });
                    t.dims.push(DimIndex {
                        id,
                        name: dim.as_str().into(),
                        constrained: RoaringBitmap::new(),
                        postings: Interned::default(),
                    });
                    t.dims.len() - 1
                }
            };
            let d = &mut t.dims[i];
            put_uint(&mut tail, d.id as usize);
            put_uint(&mut tail, values.len());
            d.constrained.insert(slot);
            for v in values {
                let (id, posting) = d.postings.entry(v, RoaringBitmap::new);
                posting.insert(slot);
                put_uint(&mut tail, id as usize);
            }
        }
        let mut bounds: Vec<Bound> = Vec::with_capacity(sub.min.len() + sub.max.len());
        for (field, lo) in &sub.min {
            bounds.push(Bound {
                field: self.acquire_field(field) | HAS_MIN,
                lo: *lo,
                hi: f64::INFINITY,
            });
        }
        for (field, hi) in &sub.max {
            let id = self.acquire_field(field);
            match bounds.iter_mut().find(|b| b.field & FIELD_ID == id) {
                Some(b) => {
                    b.hi = *hi;
                    b.field |= HAS_MAX;
                    // One reference per field: the second is not kept.
                    self.release_field(id);
                }
                None => bounds.push(Bound {
                    field: id | HAS_MAX,
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
            sub: SubRef::with_tail(sub, &tail),
            user,
            field,
            lo: first.lo,
            hi: first.hi,
        }
    }

    /// Removes slot `s` (holding `slot`) from the sets its `SubRef` names and
    /// releases its bound fields.
    fn detach(&mut self, s: u32, slot: &Slot) {
        let more = self.more_bounds.remove(&s);
        let mut r = Reader(slot.sub.tail());
        let type_id = r.uint() as u32;
        if let Some(t) = self.types.by_id_mut(type_id) {
            t.all.remove(s);
            for _ in 0..r.uint() {
                let dim = r.uint() as u32;
                let values = r.uint();
                let i = t.dims.iter().position(|d| d.id == dim).expect("a held dimension");
                let d = &mut t.dims[i];
                d.constrained.remove(s);
                for _ in 0..values {
                    let id = r.uint() as u32;
                    if let Some(p) = d.postings.by_id_mut(id) {
                        p.remove(s);
                        if p.is_empty() {
                            d.postings.remove(id);
                        }
                    }
                }
                if d.constrained.is_empty() {
                    t.free_dims.push(dim);
                    t.dims.swap_remove(i);
                }
            }
            if t.all.is_empty() {
                self.types.remove(type_id);
            }
        }
        // One reference per distinct bound field, as `attach` took them.
        if slot.field != NO_FIELD {
            self.release_field(slot.field & FIELD_ID);
        }
        for b in more.iter().flat_map(|m| m.iter()) {
            self.release_field(b.field & FIELD_ID);
        }
    }

    /// The `Subscription` slot `s` (holding `slot`) was made from.
    fn subscription(&self, s: u32, slot: &Slot) -> Subscription {
        let mut r = Reader(slot.sub.tail());
        let type_id = r.uint() as u32;
        let t = self.types.by_id(type_id).expect("a held type");
        let mut filters = BTreeMap::new();
        for _ in 0..r.uint() {
            let dim = r.uint() as u32;
            let d = t.dims.iter().find(|d| d.id == dim).expect("a held dimension");
            let values = (0..r.uint())
                .map(|_| d.postings.key(r.uint() as u32).to_string())
                .collect();
            filters.insert(d.name.to_string(), values);
        }
        let (mut min, mut max) = (BTreeMap::new(), BTreeMap::new());
        let first = (slot.field != NO_FIELD).then_some(Bound {
            field: slot.field,
            lo: slot.lo,
            hi: slot.hi,
        });
        let more = self.more_bounds.get(&s).map_or(&[][..], |m| &m[..]);
        for b in first.iter().chain(more) {
            let name = self.fields.key(b.field & FIELD_ID);
            if b.field & HAS_MIN != 0 {
                min.insert(name.to_string(), b.lo);
            }
            if b.field & HAS_MAX != 0 {
                max.insert(name.to_string(), b.hi);
            }
        }
        Subscription {
            name: slot.sub.name().to_string(),
            sub_type: self.types.key(type_id).to_string(),
            filters,
            min,
            max,
            fields: slot.sub.fields().map(|f| f.map(str::to_string).collect()),
            throttle_ms: slot.sub.throttle_ms().map(std::num::NonZeroU32::get),
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
            field: slot.field,
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
        f: &mut dyn FnMut(&Arc<str>, &SubRef),
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
    fn upsert(&mut self, user: &str, sub: &Subscription, max_per_user: usize) -> Result<(), IndexError> {
        let existing = self
            .users
            .get(user)
            .and_then(|u| find(&u.slots, &self.slots, &sub.name).ok().map(|i| u.slots[i]));
        match existing {
            Some(slot) => {
                let old = self.slots[slot as usize].take().expect("listed slot is held");
                self.detach(slot, &old);
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
        self.detach(slot, &old);
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
                    .filter_map(|&s| Some(self.subscription(s, self.slots[s as usize].as_ref()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn holds(&self, user: &str, name: &str) -> (usize, bool) {
        self.users.get(user).map_or((0, false), |u| {
            (u.slots.len(), find(&u.slots, &self.slots, name).is_ok())
        })
    }

    fn dimension_growth(&self, sub_type: &str, dims: &[&str]) -> (usize, usize) {
        let Some((_, t)) = self.types.get(sub_type) else {
            return (0, dims.len());
        };
        let new = dims.iter().filter(|d| !t.dims.iter().any(|x| *x.name == ***d)).count();
        (t.dims.len(), new)
    }

    fn for_each_match(&self, event: &MatchQuery<'_>, f: &mut dyn FnMut(&Arc<str>, &SubRef)) {
        let Some((_, t)) = self.types.get(event.sub_type) else {
            return;
        };
        // The event's values under field ids; unknown fields bound nothing.
        // Order is kept, so the first entry for a field wins, as in `MatchQuery::value`.
        let values: Vec<(u32, f64)> = event
            .values
            .iter()
            .filter_map(|(name, v)| self.fields.get(name).map(|(id, _)| (*id, *v)))
            .collect();
        let all = t.all.len();
        let mut dims: Vec<DimCandidates<'_>> = Vec::with_capacity(t.dims.len());
        for d in &t.dims {
            let posting = event.dimension(&d.name).and_then(|v| d.postings.get(v)).map(|(_, p)| p);
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
            throttle_ms: None,
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
            &mut |u, s| out.push(format!("{u}/{}", s.name())),
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
        idx.upsert("u1", &sub("sym", "t", &[("symbol", &["AAPL"])]), 10)
            .unwrap();
        idx.upsert("u1", &sub("tier", "t", &[("tier", &["daily"])]), 10)
            .unwrap();
        idx.upsert(
            "u2",
            &sub("both", "t", &[("symbol", &["AAPL", "TSLA"]), ("tier", &["daily"])]),
            10,
        )
        .unwrap();
        idx.upsert("u2", &sub("any", "t", &[]), 10).unwrap();
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
        idx.upsert("u1", &sub("a", "t", &[("s", &["x", "y"]), ("k", &["1"])]), 10)
            .unwrap();
        idx.upsert("u1", &sub("b", "t", &[("s", &["x"]), ("k", &["1", "2"])]), 10)
            .unwrap();
        idx.upsert("u2", &sub("c", "t", &[("s", &["y"]), ("k", &["2"]), ("m", &["z"])]), 10)
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
        idx.upsert("u1", &sub("a", "t", &[("symbol", &["AAPL"]), ("tier", &["daily"])]), 10)
            .unwrap();
        idx.upsert("u1", &sub("b", "t", &[("symbol", &["AAPL"])]), 10).unwrap();
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
        idx.upsert("u", &bounded(sub("min", "t", &[]), &[("c", 0.6)], &[]), 10)
            .unwrap();
        idx.upsert("u", &bounded(sub("max", "t", &[]), &[], &[("c", 0.6)]), 10)
            .unwrap();
        idx.upsert("u", &bounded(sub("range", "t", &[]), &[("c", 0.2)], &[("c", 0.8)]), 10)
            .unwrap();
        idx.upsert("u", &bounded(sub("two", "t", &[]), &[("c", 0.5), ("p", 1.0)], &[]), 10)
            .unwrap();
        idx.upsert("u", &sub("none", "t", &[]), 10).unwrap();
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
            &bounded(sub("three", "t", &[]), &[("a", 1.0), ("b", 1.0)], &[("c", 1.0)]),
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
        idx.upsert("u1", &sub("a", "tick", &[("symbol", &["AAPL"])]), 10)
            .unwrap();
        idx.upsert("u1", &sub("a", "tick", &[("tier", &["daily"])]), 10)
            .unwrap();
        assert_eq!(idx.len(), 1);
        assert!(matches(&idx, "tick", &[("symbol", "AAPL")]).is_empty());
        assert_eq!(
            matches(&idx, "tick", &[("symbol", "AAPL"), ("tier", "daily")]),
            vec!["u1/a"]
        );
        idx.upsert("u1", &bounded(sub("a", "alert", &[]), &[("c", 1.0)], &[]), 10)
            .unwrap();
        assert!(matches(&idx, "tick", &[("tier", "daily")]).is_empty());
        assert!(query(&idx, "alert", &[], &[("c", 0.5)]).is_empty());
        assert_eq!(query(&idx, "alert", &[], &[("c", 1.5)]), vec!["u1/a"]);
        idx.upsert("u1", &sub("a", "alert", &[]), 10).unwrap();
        assert_eq!(query(&idx, "alert", &[], &[]), vec!["u1/a"]);
        // Nothing of the old type, dimensions or bound fields is left behind.
        assert_eq!(idx.types.map.len(), 1);
        assert!(idx.types.get("alert").unwrap().1.dims.is_empty());
        assert!(idx.fields.map.is_empty());
        assert_eq!(idx.slots.len(), 1);
    }

    #[test]
    fn remove_frees_everything() {
        let mut idx = FastIndex::new();
        idx.upsert(
            "u1",
            &bounded(sub("a", "t", &[("s", &["x", "y"])]), &[("c", 0.0)], &[("c", 1.0)]),
            10,
        )
        .unwrap();
        idx.upsert("u2", &sub("a", "t", &[("s", &["x"])]), 10).unwrap();
        assert!(idx.remove("u1", "a"));
        assert!(!idx.remove("u1", "a"));
        assert!(!idx.remove("u2", "b"));
        assert_eq!(matches(&idx, "t", &[("s", "x")]), vec!["u2/a"]);
        assert!(matches(&idx, "t", &[("s", "y")]).is_empty());
        assert_eq!(idx.len(), 1);
        assert!(idx.list("u1").is_empty());
        assert!(!idx.users.contains_key("u1"));
        assert!(idx.fields.map.is_empty());
        assert!(idx.remove("u2", "a"));
        assert!(idx.is_empty());
        assert!(idx.types.map.is_empty());
        assert!(idx.users.is_empty());
        assert!(idx.names.iter().all(|n| n.is_empty()));
        // Freed user ids are reused.
        idx.upsert("u3", &sub("a", "t", &[]), 10).unwrap();
        assert_eq!(idx.names.len(), 2);
        assert_eq!(matches(&idx, "t", &[]), vec!["u3/a"]);
    }

    #[test]
    fn freed_slots_are_reused() {
        let mut idx = FastIndex::new();
        for n in ["a", "b", "c"] {
            idx.upsert("u", &sub(n, "t", &[]), 10).unwrap();
        }
        assert!(idx.remove("u", "b"));
        idx.upsert("v", &sub("d", "t", &[("s", &["x"])]), 10).unwrap();
        assert_eq!(idx.slots.len(), 3);
        assert_eq!(
            idx.types.get("t").unwrap().1.all.iter().collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(matches(&idx, "t", &[("s", "x")]), vec!["u/a", "u/c", "v/d"]);
        // A replacement keeps its slot.
        idx.upsert("v", &sub("d", "t", &[("s", &["y"])]), 10).unwrap();
        assert_eq!(idx.slots.len(), 3);
        assert_eq!(idx.free.len(), 0);
    }

    #[test]
    fn max_per_user_limits_new_names_only() {
        let mut idx = FastIndex::new();
        idx.upsert("u1", &sub("a", "t", &[]), 2).unwrap();
        idx.upsert("u1", &sub("b", "t", &[]), 2).unwrap();
        assert_eq!(
            idx.upsert("u1", &sub("c", "t", &[]), 2),
            Err(IndexError::TooManySubscriptions(2))
        );
        idx.upsert("u1", &sub("b", "t", &[("x", &["1"])]), 2).unwrap();
        idx.upsert("u2", &sub("c", "t", &[]), 2).unwrap();
        assert_eq!(
            idx.upsert("u3", &sub("a", "t", &[]), 0),
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
            idx.upsert("u", &sub(n, "t", &[]), 10).unwrap();
        }
        idx.upsert("u", &sub("m", "other", &[]), 10).unwrap();
        idx.remove("u", "z");
        let names: Vec<String> = idx.list("u").into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["B", "a", "b", "m"]);
        assert_eq!(idx.list("u")[3].sub_type, "other");
        assert!(idx.list("nobody").is_empty());
    }

    #[test]
    fn list_gives_back_exactly_what_was_upserted() {
        let mut idx = FastIndex::new();
        let mut odd = bounded(
            sub("odd", "t", &[("s", &["x", "y"]), ("k", &["1"])]),
            &[("a", f64::NEG_INFINITY), ("b", 0.5)],
            &[("b", 0.75), ("c", f64::INFINITY)],
        );
        // Not what validation lets through, but what a bucket entry may hold.
        odd.filters.insert("d".into(), vec!["z".into(), "a".into(), "z".into()]);
        odd.fields = Some(vec!["price".into(), "qty".into()]);
        let plain = bounded(sub("plain", "t", &[("s", &["y"])]), &[], &[("b", 1.0)]);
        let mut none = sub("none", "u", &[]);
        none.fields = Some(Vec::new());
        for s in [&odd, &plain, &none] {
            idx.upsert("u", s, 10).unwrap();
        }
        assert_eq!(idx.list("u"), vec![none.clone(), odd.clone(), plain.clone()]);
        let mut fields = Vec::new();
        idx.for_each_match(
            &MatchQuery {
                sub_type: "u",
                dimensions: &[],
                values: &[],
            },
            &mut |_, s| fields.push(s.fields().map(|f| f.count())),
        );
        assert_eq!(fields, vec![Some(0)]);
        assert_eq!(idx.holds("u", "odd"), (3, true));
        assert_eq!(idx.holds("u", "other"), (3, false));
        assert_eq!(idx.holds("v", "odd"), (0, false));
        // Replacing and removing leave the others' ids intact.
        idx.remove("u", "plain");
        let mut odd2 = odd.clone();
        odd2.filters.remove("k");
        idx.upsert("u", &odd2, 10).unwrap();
        assert_eq!(idx.list("u"), vec![none, odd2]);
    }

    #[test]
    fn users_share_one_name() {
        let mut idx = FastIndex::new();
        idx.upsert("u", &sub("a", "t", &[]), 10).unwrap();
        idx.upsert("u", &sub("b", "t", &[]), 10).unwrap();
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
                &sub(&format!("s{i}"), "t", &[("s", &["x"])]),
                100,
            )
            .unwrap();
        }
        let full = idx.heap_bytes();
        assert!(full.total() > empty);
        assert!(full.users > 0 && full.sets > 0 && full.slots > 0);
    }
}
