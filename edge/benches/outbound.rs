//! The per-connection outbound queue (`switchyard_edge::outbound`): every
//! delivery to every connection goes through one `push` and, batched, one
//! `drain_batch`, under the connection's lock, so their cost bounds the
//! edge's fan-out rate and how long the fan-out side holds that lock.
//!
//! - `steady/*`: a connection that keeps up: 50 pushes (one batch) then one
//!   drain, with the default limits; pushes come 10 ms apart so the token
//!   bucket (100/s) never cuts one. Plain deliveries, and deliveries with
//!   distinct conflation keys (a key-map insert and remove each).
//! - `conflation_hit`: a backlog of 100 keyed deliveries; each push supersedes
//!   one of them (unlink, relink at the end, key-map update).
//! - `overflow/*`: a full queue (1024 `normal` deliveries): a `normal` push
//!   evicts the oldest one; a `low` push is refused without touching the queue.
//!
//! Bodies are 200-byte shared `Bytes` (a refcount bump per delivery, as with
//! NATS payloads); drained deliveries go into a reused `Vec`, so allocation
//! is not measured. Throughput is in pushed deliveries.

// `criterion_group!` generates an undocumented `pub fn benches` that no item
// attribute can reach, and the workspace turns missing docs into warnings.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard_common::event::Prio;
use switchyard_edge::outbound::Delivery;
use switchyard_edge::outbound::{Fate, OutboundConfig, OutboundQueue};

const BATCH: u64 = 50;
const BACKLOG: u64 = 100;
/// Pushes 10 ms apart: exactly the default rate, so the bucket never empties.
const STEP: Duration = Duration::from_millis(10);

fn delivery(body: &Bytes, pos: u64, prio: Prio, key: Option<u64>) -> Delivery {
    Delivery {
        body: body.clone(),
        pos: Some(pos),
        prio,
        conflation_key: key,
        replayed: false,
        throttle_ms: None,
        throttle_released: false,
    }
}

fn steady(c: &mut Criterion, body: &Bytes, keyed: bool) {
    let name = if keyed {
        "steady/push_drain_keyed"
    } else {
        "steady/push_drain"
    };
    let mut q = OutboundQueue::new(OutboundConfig::default());
    let mut out = Vec::with_capacity(BATCH as usize);
    let mut now = Instant::now();
    let mut pos = 0u64;
    let mut round = |q: &mut OutboundQueue, out: &mut Vec<Delivery>| {
        for _ in 0..BATCH {
            pos += 1;
            now += STEP;
            let key = keyed.then_some(pos);
            black_box(q.push(delivery(body, pos, Prio::Normal, key), now).wake);
        }
        out.clear();
        black_box(q.drain_batch(out));
    };
    for _ in 0..1000 {
        round(&mut q, &mut out);
    }
    assert_eq!(q.take_dropped(), None, "the steady state must not drop");
    assert!(q.is_empty());
    let mut g = c.benchmark_group("outbound");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function(name, |b| b.iter(|| round(&mut q, &mut out)));
    g.finish();
    assert_eq!(q.take_dropped(), None, "the steady state must not drop");
}

fn conflation_hit(c: &mut Criterion, body: &Bytes) {
    let mut q = OutboundQueue::new(OutboundConfig::default());
    let mut now = Instant::now();
    let mut pos = 0u64;
    for key in 0..BACKLOG {
        pos += 1;
        now += STEP;
        let _ = q.push(delivery(body, pos, Prio::Normal, Some(key)), now);
    }
    let mut g = c.benchmark_group("outbound");
    g.throughput(Throughput::Elements(BACKLOG));
    g.bench_function("conflation_hit", |b| {
        b.iter(|| {
            for key in 0..BACKLOG {
                pos += 1;
                let out = q.push(delivery(body, pos, Prio::Normal, Some(key)), now);
                debug_assert_eq!(out.fate, Fate::Replaced);
                black_box(out.wake);
            }
        })
    });
    g.finish();
    assert_eq!(q.len() as u64, BACKLOG);
    assert!(q.total_conflated() > 0);
    assert_eq!(q.take_dropped(), None);
}

fn overflow(c: &mut Criterion, body: &Bytes, prio: Prio) {
    let name = match prio {
        Prio::Low => "overflow/refuse_low",
        _ => "overflow/evict_normal",
    };
    let config = OutboundConfig::default();
    let mut q = OutboundQueue::new(config);
    let mut now = Instant::now();
    let mut pos = 0u64;
    for _ in 0..config.max_events {
        pos += 1;
        now += STEP;
        let _ = q.push(delivery(body, pos, Prio::Normal, None), now);
    }
    let mut g = c.benchmark_group("outbound");
    g.throughput(Throughput::Elements(BACKLOG));
    g.bench_function(name, |b| {
        b.iter(|| {
            for _ in 0..BACKLOG {
                pos += 1;
                now += STEP;
                black_box(q.push(delivery(body, pos, prio, None), now).wake);
            }
        })
    });
    g.finish();
    assert_eq!(q.len(), config.max_events);
    assert_eq!(q.total_rate_limited(), 0);
    assert!(q.total_slow_consumer() > 0);
}

fn benches(c: &mut Criterion) {
    let body = Bytes::from(vec![0xa5u8; 200]);
    steady(c, &body, false);
    steady(c, &body, true);
    conflation_hit(c, &body);
    overflow(c, &body, Prio::Normal);
    overflow(c, &body, Prio::Low);
}

criterion_group! {
    name = outbound;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(outbound);
