//! Property test: [`FastIndex`] selects exactly what [`ScanIndex`] selects and
//! what filtering every held subscription with [`Subscription::matches`] (the
//! reference rule) selects, over random sequences of upserts (replacing by
//! name, refused past the per-user limit), removals and events.
//!
//! Alphabets are small (few types, dimensions, values, bound fields, users and
//! names) so that matches, replacements, slot reuse and refusals are common;
//! every subscription of one type names two given dimensions, so dimensions
//! without a wildcard part are common too;
//! bounds and event values include NaN and infinities, and events may repeat a
//! dimension or a field (the first entry counts). Matches are compared with
//! their `fields`, `list` with the subscriptions as upserted, `holds`
//! with the model's count and names, and `dimension_growth` with the
//! model's dimension names per type.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use switchyard_common::subscription::{MatchQuery, Subscription};
use switchyard_router::fast_index::FastIndex;
use switchyard_router::index::{ScanIndex, SubRef, SubscriptionIndex};

const MAX_PER_USER: usize = 3;
const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const TYPES: [&str; 3] = ["t0", "t1", "t2"];
const DIMS: [&str; 3] = ["x", "y", "z"];
/// Sorted, as validated subscriptions hold them.
const VALUES: [&str; 4] = ["0", "1", "2", "3"];
const FIELDS: [&str; 2] = ["f", "g"];

#[derive(Debug, Clone)]
struct Event {
    sub_type: String,
    dims: Vec<(String, String)>,
    values: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
enum Op {
    Upsert(&'static str, Subscription),
    Remove(&'static str, &'static str),
    Match(Event),
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => select(vec![-1.0, 0.0, 0.25, 0.5, 1.0, 2.0]),
        1 => select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY]),
    ]
}

fn bounds() -> impl Strategy<Value = BTreeMap<String, f64>> {
    prop::collection::btree_map(select(FIELDS.to_vec()).prop_map(String::from), number(), 0..=2)
}

fn subscription() -> impl Strategy<Value = Subscription> {
    let values = subsequence(VALUES.to_vec(), 1..=3).prop_map(|v| v.into_iter().map(String::from).collect());
    (
        select(NAMES.to_vec()),
        select(TYPES.to_vec()),
        prop::collection::btree_map(select(DIMS.to_vec()).prop_map(String::from), values.clone(), 0..=3),
        (values.clone(), values),
        bounds(),
        bounds(),
        prop::option::of(subsequence(vec!["p", "q", "r"], 0..=2)),
        prop::option::of(1..=3_600_000u32),
    )
        .prop_map(|(name, ty, mut filters, (x, y), min, max, fields, throttle_ms)| {
            // Every subscription of t0 names x and y (as every one names
            // `symbol` in practice), so some dimensions have no wildcard part.
            if ty == "t0" {
                filters.entry("x".to_string()).or_insert(x);
                filters.entry("y".to_string()).or_insert(y);
            }
            Subscription {
                name: name.into(),
                sub_type: ty.into(),
                filters,
                min,
                max,
                fields: fields.map(|f| f.into_iter().map(String::from).collect()),
                throttle_ms,
            }
        })
}

fn event() -> impl Strategy<Value = Event> {
    let dim = (select(vec!["x", "y", "z", "w"]), select(vec!["0", "1", "2", "3", "4"]))
        .prop_map(|(d, v)| (d.to_string(), v.to_string()));
    let value = (select(vec!["f", "g", "h"]), number()).prop_map(|(f, v)| (f.to_string(), v));
    (
        select(vec!["t0", "t1", "t2", "t3"]),
        prop::collection::vec(dim, 0..=5),
        prop::collection::vec(value, 0..=3),
    )
        .prop_map(|(ty, dims, values)| Event {
            sub_type: ty.into(),
            dims,
            values,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (select(USERS.to_vec()), subscription()).prop_map(|(u, s)| Op::Upsert(u, s)),
        2 => (select(USERS.to_vec()), select(NAMES.to_vec())).prop_map(|(u, n)| Op::Remove(u, n)),
        4 => event().prop_map(Op::Match),
    ]
}

/// A match as delivery sees it: user, subscription name, `fields` and throttle.
type Match = (String, String, Option<Vec<String>>, Option<u32>);

/// Every match an index reports, sorted, duplicates kept.
fn matched(idx: &dyn SubscriptionIndex, q: &MatchQuery<'_>) -> Vec<Match> {
    let mut out = Vec::new();
    idx.for_each_match(q, &mut |u: &Arc<str>, s: &SubRef| {
        out.push((
            u.to_string(),
            s.name().to_string(),
            s.fields().map(|f| f.map(String::from).collect()),
            s.throttle_ms().map(|t| t.get()),
        ))
    });
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fast_index_matches_scan_index_and_reference(ops in prop::collection::vec(op(), 1..80)) {
        let mut fast = FastIndex::new();
        let mut scan = ScanIndex::new();
        // The reference: every held subscription by (user, name).
        let mut model: BTreeMap<(String, String), Subscription> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Upsert(user, sub) => {
                    let key = (user.to_string(), sub.name.clone());
                    let held = model.keys().filter(|(u, _)| u == user).count();
                    let accepted = model.contains_key(&key) || held < MAX_PER_USER;
                    let f = fast.upsert(user, &sub, MAX_PER_USER);
                    let s = scan.upsert(user, &sub, MAX_PER_USER);
                    prop_assert_eq!(&f, &s);
                    prop_assert_eq!(f.is_ok(), accepted);
                    if accepted {
                        model.insert(key, sub);
                    }
                }
                Op::Remove(user, name) => {
                    let existed = model.remove(&(user.to_string(), name.to_string())).is_some();
                    prop_assert_eq!(fast.remove(user, name), existed);
                    prop_assert_eq!(scan.remove(user, name), existed);
                }
                Op::Match(ev) => {
                    let q = MatchQuery { sub_type: &ev.sub_type, dimensions: &ev.dims, values: &ev.values };
                    let want: Vec<Match> = model
                        .iter()
                        .filter(|(_, s)| s.matches(&q))
                        .map(|((u, n), s)| (u.clone(), n.clone(), s.fields.clone(), s.throttle_ms))
                        .collect();
                    prop_assert_eq!(&matched(&scan, &q), &want);
                    prop_assert_eq!(&matched(&fast, &q), &want, "event {:?}", ev);
                }
            }
            prop_assert_eq!(fast.len(), model.len());
            for ty in TYPES {
                let held: std::collections::BTreeSet<&str> = model
                    .values()
                    .filter(|s| s.sub_type == ty)
                    .flat_map(|s| s.filters.keys().map(String::as_str))
                    .collect();
                let want = (held.len(), ["x", "w"].iter().filter(|d| !held.contains(**d)).count());
                prop_assert_eq!(fast.dimension_growth(ty, &["x", "w"]), want);
                prop_assert_eq!(scan.dimension_growth(ty, &["x", "w"]), want);
            }
        }
        for user in USERS {
            let want: Vec<Subscription> =
                model.iter().filter(|((u, _), _)| u == user).map(|(_, s)| s.clone()).collect();
            let got = fast.list(user);
            // Compared by Debug text: NaN bounds are not equal to themselves.
            prop_assert_eq!(format!("{got:?}"), format!("{want:?}"));
            prop_assert_eq!(format!("{:?}", scan.list(user)), format!("{want:?}"));
            for name in NAMES {
                let held = (want.len(), want.iter().any(|s| s.name == name));
                prop_assert_eq!(fast.holds(user, name), held);
                prop_assert_eq!(scan.holds(user, name), held);
            }
        }
    }
}
