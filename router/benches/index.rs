//! Subscription index: matching time per event, update time and memory of
//! [`FastIndex`] at 10k, 100k and 1M subscriptions, with [`ScanIndex`] at 10k
//! for comparison, on a realistic workload.
//!
//! Workload (fixed-seed SplitMix64, so every run sees the same data), all of
//! one type `tier_patterns`, users = subscriptions / 5 (each subscription
//! goes to a random user):
//! - `symbol`: 1–3 values drawn Zipf (s = 1.1) from 5,000 symbols (rank 1 is
//!   the most popular);
//! - `pattern_type`: on about half, 1–2 of 20 values;
//! - `tier`: on about half, 1–2 of 3 values;
//! - `min.confidence` in [0.5, 0.9) on about a third.
//!
//! Events: `symbol` Zipf from the same ranking, `pattern_type`, `tier` and
//! `exchange` (which no subscription names) uniform, `confidence` uniform in
//! [0, 1). The callback only counts matches.
//!
//! `cargo bench -p switchyard-router --bench index` runs criterion (mean time
//! per event, `Throughput` in events) and then prints a report: mean and p99
//! per event from 100k individually timed events, 2k for the scan (`Instant`
//! around each match, sorted), matches per event, update times, bytes per
//! subscription and a comparison of roaring bitmaps with sorted `Vec<u32>`
//! sets. Memory is measured in a fresh child process per case (this binary
//! re-run with `SWITCHYARD_INDEX_BENCH_MEM` set): the growth of resident
//! memory (`/proc/self/statm`) while building, and the index's own estimate
//! of its heap ([`FastIndex::heap_bytes`]); both cover everything the index
//! holds, the subscriptions included. For scale, a third case keeps the same
//! subscriptions as parsed `Arc<Subscription>` values, which is what the
//! index kept before it packed them. Without `--bench` (as under `cargo test
//! --benches`) only the 10k cases run, once each, and no report is printed.

// Criterion's generated items are undocumented and the workspace turns missing docs into warnings.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use roaring::RoaringBitmap;
use switchyard_common::subscription::{MatchQuery, Subscription};
use switchyard_router::fast_index::FastIndex;
use switchyard_router::index::{ScanIndex, SubscriptionIndex};

const SUB_TYPE: &str = "tier_patterns";
const SYMBOLS: usize = 5_000;
const ZIPF_S: f64 = 1.1;
const PATTERNS: usize = 20;
const TIERS: [&str; 3] = ["intraday", "daily", "weekly"];
const EXCHANGES: [&str; 4] = ["XNAS", "XNYS", "ARCX", "BATS"];
const SUBS_PER_USER: u64 = 5;
/// Generous: users are drawn at random, so some get more than five.
const MAX_PER_USER: usize = 1_000;
/// Pre-built events the criterion loop cycles through (a power of two).
const BENCH_EVENTS: usize = 4_096;
/// Individually timed events for the percentiles.
const TIMED_EVENTS: usize = 100_000;
/// The same for the scan index, which takes milliseconds per event.
const TIMED_SCAN_EVENTS: usize = 2_000;
/// Events with at most this many matches also get a p99 of their own: the
/// index's cost apart from the size of the answer.
const SELECTIVE: u64 = 1_000;
/// Individually timed updates.
const TIMED_UPDATES: usize = 10_000;
const MEM_ENV: &str = "SWITCHYARD_INDEX_BENCH_MEM";

/// SplitMix64: a small deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Integer in `0..n`, without modulo bias worth speaking of.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Zipf over ranks `0..n` with exponent `s`, by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1)
    }
}

/// Generates the workload.
struct Workload {
    rng: Rng,
    zipf: Zipf,
    symbols: Vec<String>,
    patterns: Vec<String>,
    tiers: Vec<String>,
    users: u64,
}

/// 1 to `max` distinct values drawn uniformly from `from`, sorted.
fn pick_values(rng: &mut Rng, from: &[String], max: u64) -> Vec<String> {
    let n = 1 + rng.below(max);
    let mut v: Vec<String> = (0..n)
        .map(|_| from[rng.below(from.len() as u64) as usize].clone())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// An event as the router would hand it to the index.
struct Event {
    dims: Vec<(String, String)>,
    values: Vec<(String, f64)>,
}

impl Event {
    fn query(&self) -> MatchQuery<'_> {
        MatchQuery {
            sub_type: SUB_TYPE,
            dimensions: &self.dims,
            values: &self.values,
        }
    }
}

impl Workload {
    fn new(subs: usize, seed: u64) -> Workload {
        Workload {
            rng: Rng(seed),
            zipf: Zipf::new(SYMBOLS, ZIPF_S),
            symbols: (0..SYMBOLS).map(|i| format!("S{i:04}")).collect(),
            patterns: (0..PATTERNS).map(|i| format!("Pattern{i:02}")).collect(),
            tiers: TIERS.iter().map(|s| s.to_string()).collect(),
            users: (subs as u64 / SUBS_PER_USER).max(1),
        }
    }

    /// The `i`-th subscription and its user.
    fn subscription(&mut self, i: usize) -> (String, Subscription) {
        let user = format!("user{:07}", self.rng.below(self.users));
        let mut filters = BTreeMap::new();
        let n = 1 + self.rng.below(3);
        let mut symbols: Vec<String> = (0..n)
            .map(|_| self.symbols[self.zipf.sample(&mut self.rng)].clone())
            .collect();
        symbols.sort_unstable();
        symbols.dedup();
        filters.insert("symbol".to_string(), symbols);
        if self.rng.chance(1, 2) {
            filters.insert(
                "pattern_type".to_string(),
                pick_values(&mut self.rng, &self.patterns, 2),
            );
        }
        if self.rng.chance(1, 2) {
            filters.insert("tier".to_string(), pick_values(&mut self.rng, &self.tiers, 2));
        }
        let mut min = BTreeMap::new();
        if self.rng.chance(1, 3) {
            min.insert("confidence".to_string(), 0.5 + (self.rng.below(40) as f64) / 100.0);
        }
        let sub = Subscription {
            name: format!("sub{i}"),
            sub_type: SUB_TYPE.to_string(),
            filters,
            min,
            max: BTreeMap::new(),
            fields: None,
            throttle_ms: None,
        };
        (user, sub)
    }

    fn event(&mut self) -> Event {
        let symbol = self.symbols[self.zipf.sample(&mut self.rng)].clone();
        let pattern = self.patterns[self.rng.below(PATTERNS as u64) as usize].clone();
        let tier = TIERS[self.rng.below(3) as usize].to_string();
        let exchange = EXCHANGES[self.rng.below(4) as usize].to_string();
        Event {
            dims: vec![
                ("symbol".into(), symbol),
                ("pattern_type".into(), pattern),
                ("tier".into(), tier),
                ("exchange".into(), exchange),
            ],
            values: vec![("confidence".into(), self.rng.unit())],
        }
    }
}

fn build(index: &mut dyn SubscriptionIndex, work: &mut Workload, n: usize) {
    for i in 0..n {
        let (user, sub) = work.subscription(i);
        index.upsert(&user, &sub, MAX_PER_USER).expect("under the limit");
    }
}

fn count_matches(index: &dyn SubscriptionIndex, q: &MatchQuery<'_>) -> usize {
    let mut n = 0usize;
    index.for_each_match(q, &mut |u, s| {
        black_box((u, s));
        n += 1;
    });
    n
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 => format!("{}M", n / 1_000_000),
        n => format!("{}k", n / 1_000),
    }
}

/// What the report prints for one index and size.
struct Row {
    index: &'static str,
    subs: usize,
    mean_ns: f64,
    p50_ns: u64,
    p99_ns: u64,
    mean_matches: f64,
    p99_matches: u64,
    /// p99 over the events with at most `SELECTIVE` matches, and their share.
    p99_selective_ns: u64,
    selective_share: f64,
    replace: Option<(f64, u64, u64)>,
    churn: Option<(f64, u64, u64)>,
}

/// Times `count` fresh events one by one.
fn time_events(index: &dyn SubscriptionIndex, name: &'static str, subs: usize, count: usize) -> Row {
    let mut work = Workload::new(subs, 0xE7E7);
    let events: Vec<Event> = (0..count).map(|_| work.event()).collect();
    let mut times = Vec::with_capacity(events.len());
    let mut matches = Vec::with_capacity(events.len());
    for e in &events {
        let q = e.query();
        let start = Instant::now();
        let n = count_matches(index, &q);
        times.push(start.elapsed().as_nanos() as u64);
        matches.push(n as u64);
    }
    let mean_ns = times.iter().sum::<u64>() as f64 / times.len() as f64;
    let mean_matches = matches.iter().sum::<u64>() as f64 / matches.len() as f64;
    let mut selective: Vec<u64> = times
        .iter()
        .zip(&matches)
        .filter(|(_, &m)| m <= SELECTIVE)
        .map(|(&t, _)| t)
        .collect();
    selective.sort_unstable();
    let selective_share = selective.len() as f64 / times.len() as f64;
    times.sort_unstable();
    matches.sort_unstable();
    Row {
        index: name,
        subs,
        mean_ns,
        p50_ns: percentile(&times, 0.5),
        p99_ns: percentile(&times, 0.99),
        mean_matches,
        p99_matches: percentile(&matches, 0.99),
        p99_selective_ns: if selective.is_empty() {
            0
        } else {
            percentile(&selective, 0.99)
        },
        selective_share,
        replace: None,
        churn: None,
    }
}

/// Mean, p50 and p99 of `times`.
fn summary(mut times: Vec<u64>) -> (f64, u64, u64) {
    let mean = times.iter().sum::<u64>() as f64 / times.len() as f64;
    times.sort_unstable();
    (mean, percentile(&times, 0.5), percentile(&times, 0.99))
}

/// Times single updates on a built index: replacing an existing subscription
/// by a new random one, and removing one then adding a new one (slot reuse).
fn time_updates(index: &mut dyn SubscriptionIndex, subs: usize) -> ((f64, u64, u64), (f64, u64, u64)) {
    // Same seed as the build: regenerates the users and names that exist.
    let mut existing = Workload::new(subs, 1);
    let mut fresh = Workload::new(subs, 0xF2E5);
    let step = (subs / TIMED_UPDATES).max(1);
    let mut replace = Vec::with_capacity(TIMED_UPDATES);
    let mut churn = Vec::with_capacity(TIMED_UPDATES);
    for i in 0..subs {
        let (user, sub) = existing.subscription(i);
        if i % step != 0 || replace.len() == TIMED_UPDATES {
            continue;
        }
        let (_, mut new) = fresh.subscription(i);
        new.name = sub.name.clone();
        let start = Instant::now();
        index.upsert(&user, &new, MAX_PER_USER).expect("replace");
        replace.push(start.elapsed().as_nanos() as u64);
        let (_, mut new) = fresh.subscription(i);
        new.name = format!("churn{i}");
        let start = Instant::now();
        assert!(index.remove(&user, &sub.name));
        index.upsert(&user, &new, MAX_PER_USER).expect("insert");
        churn.push(start.elapsed().as_nanos() as u64);
    }
    (summary(replace), summary(churn))
}

fn bench_size(c: &mut Criterion, index: &dyn SubscriptionIndex, name: &str, subs: usize) {
    let mut work = Workload::new(subs, 0xBE7C);
    let events: Vec<Event> = (0..BENCH_EVENTS).map(|_| work.event()).collect();
    let mut group = c.benchmark_group("index_match");
    group.throughput(Throughput::Elements(1));
    group.bench_with_input(BenchmarkId::new(name, label(subs)), &events, |b, events| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & (BENCH_EVENTS - 1);
            count_matches(index, &events[i].query())
        })
    });
    group.finish();
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm");
    pages * 4096
}

/// Child mode: builds one case and prints `key=value` lines.
fn memory_child(spec: &str) {
    let (kind, n) = spec.split_once(':').expect("kind:n");
    let n: usize = n.parse().expect("n");
    let mut work = Workload::new(n, 1);
    let before = rss();
    match kind {
        "fast" => {
            let mut index = FastIndex::new();
            build(&mut index, &mut work, n);
            let after = rss();
            let h = index.heap_bytes();
            println!("rss={}", after - before);
            println!("estimate={}", h.total());
            println!(
                "parts=slots {} / subs {} / bounds {} / users {} / sets {} / other {}",
                h.slots / n,
                h.subs / n,
                h.bounds / n,
                h.users / n,
                h.sets / n,
                h.other / n
            );
            black_box(&index);
        }
        "scan" => {
            let mut index = ScanIndex::new();
            build(&mut index, &mut work, n);
            println!("rss={}", rss() - before);
            black_box(&index);
        }
        "payload" => {
            // The subscriptions alone as parsed values (Arc<Subscription>, what the
            // index kept before packing them), less the vector of pointers.
            let mut subs: Vec<Arc<Subscription>> = Vec::with_capacity(n);
            for i in 0..n {
                subs.push(Arc::new(work.subscription(i).1));
            }
            println!("rss={}", rss() - before - n * 8);
            black_box(&subs);
        }
        other => panic!("unknown memory case {other}"),
    }
}

/// Runs a memory case in a fresh process; `(rss bytes, estimate bytes, parts)`.
fn memory(kind: &str, n: usize) -> (usize, Option<usize>, Option<String>) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .env(MEM_ENV, format!("{kind}:{n}"))
        .output()
        .expect("run memory child");
    assert!(
        out.status.success(),
        "memory child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
    };
    (
        get("rss").and_then(|v| v.parse().ok()).expect("rss"),
        get("estimate").and_then(|v| v.parse().ok()),
        get("parts"),
    )
}

/// Sorted-vector set operations, for the comparison with roaring.
mod sorted {
    pub fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].cmp(&b[j]) {
                std::cmp::Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    out.push(a[i]);
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        out
    }

    /// Keeps the elements of `acc` that are (`keep`) or are not in `b`,
    /// galloping through `b` when it is much larger.
    pub fn filter(acc: &mut Vec<u32>, b: &[u32], keep: bool) {
        let mut lo = 0;
        acc.retain(|&x| {
            let mut step = 1;
            let mut hi = lo;
            while hi < b.len() && b[hi] < x {
                lo = hi;
                hi += step;
                step *= 2;
            }
            let hi = hi.min(b.len());
            lo += b[lo..hi].partition_point(|&y| y < x);
            (lo < b.len() && b[lo] == x) == keep
        });
    }
}

/// One dimension of the comparison: the posting for the event's value and the constrained set.
struct DimSets<S> {
    postings: std::collections::HashMap<String, S>,
    constrained: S,
}

/// Candidate computation with roaring and with sorted vectors on the same
/// sets (the 1M workload), so the choice of representation is measured:
/// `(roaring mean ns, vec mean ns, roaring bytes, vec bytes)`.
fn compare_sets(subs: usize) -> (f64, f64, usize, usize) {
    let mut work = Workload::new(subs, 1);
    let dims = ["symbol", "pattern_type", "tier"];
    let mut vecs: Vec<DimSets<Vec<u32>>> = dims
        .iter()
        .map(|_| DimSets {
            postings: Default::default(),
            constrained: Vec::new(),
        })
        .collect();
    for i in 0..subs as u32 {
        let (_, sub) = work.subscription(i as usize);
        for (d, sets) in dims.iter().zip(vecs.iter_mut()) {
            if let Some(values) = sub.filters.get(*d) {
                sets.constrained.push(i);
                for v in values {
                    sets.postings.entry(v.clone()).or_default().push(i);
                }
            }
        }
    }
    let all: Vec<u32> = (0..subs as u32).collect();
    let to_roaring = |v: &Vec<u32>| RoaringBitmap::from_sorted_iter(v.iter().copied()).expect("sorted");
    let roars: Vec<DimSets<RoaringBitmap>> = vecs
        .iter()
        .map(|d| DimSets {
            postings: d.postings.iter().map(|(k, v)| (k.clone(), to_roaring(v))).collect(),
            constrained: to_roaring(&d.constrained),
        })
        .collect();
    let all_r = to_roaring(&all);
    let vec_bytes: usize = vecs
        .iter()
        .map(|d| d.constrained.capacity() * 4 + d.postings.values().map(|p| p.capacity() * 4 + 16).sum::<usize>())
        .sum();
    let roaring_bytes: usize = roars
        .iter()
        .map(|d| d.constrained.serialized_size() + d.postings.values().map(|p| p.serialized_size()).sum::<usize>())
        .sum();
    let mut ework = Workload::new(subs, 0xC0FE);
    let events: Vec<Event> = (0..2_000).map(|_| ework.event()).collect();
    let mut total = [0u64; 2];
    let mut check = [0u64; 2];
    for e in &events {
        // Roaring: the index's algorithm (smallest first, then (acc ∩ p) ∪ (acc − c)).
        let start = Instant::now();
        let mut order: Vec<(usize, u64)> = (0..3)
            .map(|k| {
                let p = roars[k].postings.get(&e.dims[k].1).map_or(0, |p| p.len());
                (k, p + subs as u64 - roars[k].constrained.len())
            })
            .collect();
        order.sort_unstable_by_key(|o| o.1);
        let (k0, _) = order[0];
        let mut acc = &all_r - &roars[k0].constrained;
        if let Some(p) = roars[k0].postings.get(&e.dims[k0].1) {
            acc |= p;
        }
        for &(k, _) in &order[1..] {
            let hit = roars[k].postings.get(&e.dims[k].1).map(|p| &acc & p);
            acc -= &roars[k].constrained;
            if let Some(hit) = hit {
                acc |= hit;
            }
        }
        acc.iter().for_each(|x| {
            black_box(x);
        });
        check[0] += acc.len();
        total[0] += start.elapsed().as_nanos() as u64;
        // Sorted vectors, same order and algorithm.
        let start = Instant::now();
        let (k0, _) = order[0];
        let mut wild = all.clone();
        sorted::filter(&mut wild, &vecs[k0].constrained, false);
        let mut acc = match vecs[k0].postings.get(&e.dims[k0].1) {
            Some(p) => sorted::union(p, &wild),
            None => wild,
        };
        for &(k, _) in &order[1..] {
            let mut hit = acc.clone();
            match vecs[k].postings.get(&e.dims[k].1) {
                Some(p) => sorted::filter(&mut hit, p, true),
                None => hit.clear(),
            }
            sorted::filter(&mut acc, &vecs[k].constrained, false);
            acc = sorted::union(&acc, &hit);
        }
        acc.iter().for_each(|x| {
            black_box(x);
        });
        check[1] += acc.len() as u64;
        total[1] += start.elapsed().as_nanos() as u64;
    }
    assert_eq!(check[0], check[1], "both representations agree");
    let n = events.len() as f64;
    (total[0] as f64 / n, total[1] as f64 / n, roaring_bytes, vec_bytes)
}

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1_000.0)
}

fn main() {
    if let Ok(spec) = std::env::var(MEM_ENV) {
        memory_child(&spec);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let sizes: &[usize] = if full { &[10_000, 100_000, 1_000_000] } else { &[10_000] };
    let mut rows = Vec::new();
    {
        let mut scan = ScanIndex::new();
        build(&mut scan, &mut Workload::new(10_000, 1), 10_000);
        bench_size(&mut c, &scan, "scan", 10_000);
        if full {
            rows.push(time_events(&scan, "ScanIndex", 10_000, TIMED_SCAN_EVENTS));
        }
    }
    for &n in sizes {
        let mut index = FastIndex::new();
        let start = Instant::now();
        build(&mut index, &mut Workload::new(n, 1), n);
        let built = start.elapsed();
        if full {
            eprintln!("built FastIndex of {} in {:.1} s", label(n), built.as_secs_f64());
        }
        bench_size(&mut c, &index, "fast", n);
        if full {
            let mut row = time_events(&index, "FastIndex", n, TIMED_EVENTS);
            let (replace, churn) = time_updates(&mut index, n);
            row.replace = Some(replace);
            row.churn = Some(churn);
            rows.push(row);
        }
    }
    c.final_summary();
    if !full {
        return;
    }

    println!("\n## Matching (events timed one by one: 100k for FastIndex, 2k for ScanIndex)\n");
    println!(
        "| index | subs | mean µs/event | p50 µs | p99 µs | mean matches/event | p99 matches | ns per match (mean) \
         | p99 µs, events with ≤ {SELECTIVE} matches (share) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {:.1} | {} ({:.0} %) |",
            r.index,
            label(r.subs),
            us(r.mean_ns),
            us(r.p50_ns as f64),
            us(r.p99_ns as f64),
            r.mean_matches,
            r.p99_matches,
            r.mean_ns / r.mean_matches.max(1.0),
            us(r.p99_selective_ns as f64),
            r.selective_share * 100.0
        );
    }
    println!("\n## Updates (10k single updates on the built index)\n");
    println!("| subs | replace mean µs | p50 | p99 | remove+insert mean µs | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        if let (Some(rep), Some(ch)) = (r.replace, r.churn) {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                label(r.subs),
                us(rep.0),
                us(rep.1 as f64),
                us(rep.2 as f64),
                us(ch.0),
                us(ch.1 as f64),
                us(ch.2 as f64)
            );
        }
    }
    println!("\n## Memory (fresh process per case)\n");
    println!("| case | subs | RSS growth B/sub | index estimate B/sub | parts of the estimate (B/sub) |");
    println!("|---|---|---|---|---|");
    let (scan_rss, _, _) = memory("scan", 10_000);
    println!("| ScanIndex, total | 10k | {} | | |", scan_rss / 10_000);
    for &n in sizes {
        let (total, estimate, parts) = memory("fast", n);
        let (payload, _, _) = memory("payload", n);
        println!(
            "| FastIndex, total | {} | {} | {} | {} |",
            label(n),
            total / n,
            estimate.unwrap_or(0) / n,
            parts.unwrap_or_default()
        );
        println!(
            "| for scale: the same subscriptions as Arc<Subscription> values alone | {} | {} | | |",
            label(n),
            payload / n
        );
    }
    let (roaring_ns, vec_ns, roaring_bytes, vec_bytes) = compare_sets(1_000_000);
    println!("\n## Set representation (candidate sets only, 1M, 2k events)\n");
    println!("| sets | mean µs/event | bytes/sub of the sets |");
    println!("|---|---|---|");
    println!(
        "| RoaringBitmap | {} | {} (serialized size) |",
        us(roaring_ns),
        roaring_bytes / 1_000_000
    );
    println!(
        "| sorted Vec<u32> | {} | {} (capacity) |",
        us(vec_ns),
        vec_bytes / 1_000_000
    );
}
