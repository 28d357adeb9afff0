//! Codec hot paths of the wire contract: what every producer event, every
//! delivery and every client frame goes through.
//!
//! - `parse_event`: the router decodes each producer event once (MessagePack
//!   walked at the byte level with `data` kept as a zero-copy slice, or JSON
//!   with `data` converted to MessagePack once). Its cost bounds the router's
//!   ingest rate.
//! - `encode_delivery`: the router writes one delivery body per targeted user,
//!   so for a `match` event it runs once per matching user: fan-out cost.
//! - `write_event_frame` / `write_batch_frame`: the edge turns each delivery
//!   body into a frame for every connection of the user. MessagePack is a
//!   header rewrite plus a copy; JSON transcodes the whole body. This runs
//!   once per delivered message per connection, the edge's hottest path.
//! - `decode_client_frame`: every client frame is decoded on the edge;
//!   `subscribe` is the most complex one the protocol has.
//!
//! The event is a realistic `tier_patterns` event: a data map of about 200
//! bytes (MessagePack), a `match` target with three dimensions and a
//! `confidence` value. Outputs go into a reused `Vec` cleared every
//! iteration, as the edge and router do, so allocation is not measured.
//!
//! Throughput is in bytes of input: the producer payload, the delivery body
//! (or the 50 bodies of a batch) and the client frame respectively.

// `criterion_group!` generates an undocumented `pub fn benches` that no item
// attribute can reach, and the workspace turns missing docs into warnings.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use switchyard_common::client::{decode_client_frame, ClientOp};
use switchyard_common::delivery::{encode_delivery, write_batch_frame, write_event_frame};
use switchyard_common::event::{parse_event, ProducerEvent, Target};
use switchyard_common::transcode::json_to_msgpack;
use switchyard_common::Encoding;

/// Subject type token of the benchmark event (`<prefix>.events.tier_patterns`).
const SUBJECT_TYPE: &str = "tier_patterns";
/// Unix milliseconds stamped on deliveries.
const TS_MS: u64 = 1_767_225_600_123;
/// Events in the batch frame benchmark.
const BATCH: usize = 50;

/// The producer event as JSON: a pattern detection for one symbol.
fn event_json() -> serde_json::Value {
    json!({
        "type": "tier_patterns",
        "id": "pat-20260101-AAPL-daily-000123",
        "prio": "high",
        "target": {
            "match": { "symbol": "AAPL", "tier": "daily", "pattern_type": "BreakoutBO" },
            "values": { "confidence": 0.82 }
        },
        "data": {
            "symbol": "AAPL",
            "tier": "daily",
            "pattern_type": "BreakoutBO",
            "confidence": 0.82,
            "price": 187.42,
            "volume": 48_213_900u64,
            "avg_volume": 31_550_000u64,
            "detected_at": 1_767_225_600_000u64,
            "timeframe": "1d",
            "direction": "up",
            "note": "close above 55-day high on 1.5x volume"
        }
    })
}

fn msgpack(v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    json_to_msgpack(v, &mut out);
    out
}

/// The MessagePack payload, the JSON payload and the parsed event.
fn fixtures() -> (Bytes, Bytes, ProducerEvent) {
    let v = event_json();
    let mp = Bytes::from(msgpack(&v));
    let js = Bytes::from(serde_json::to_vec(&v).expect("json encodes"));
    let ev = parse_event(SUBJECT_TYPE, None, &mp, false).expect("benchmark event parses");
    assert!(
        (180..=240).contains(&ev.data.len()),
        "data map is {} bytes, want about 200",
        ev.data.len()
    );
    let Target::Match { dimensions, values, .. } = &ev.target else {
        panic!("benchmark event must have a match target")
    };
    assert_eq!((dimensions.len(), values.len()), (3, 1));
    // Both encodings must describe the same event.
    assert_eq!(
        parse_event(SUBJECT_TYPE, None, &js, true).expect("json event parses"),
        ev
    );
    (mp, js, ev)
}

fn bench_parse_event(c: &mut Criterion) {
    let (mp, js, ev) = fixtures();
    let mut body = Vec::new();
    encode_delivery(&ev, TS_MS, &["breakouts"], &ev.data, &mut body);
    eprintln!(
        "event: {} bytes MessagePack ({} bytes data), {} bytes JSON; delivery body {} bytes",
        mp.len(),
        ev.data.len(),
        js.len(),
        body.len()
    );
    let mut g = c.benchmark_group("parse_event");
    g.throughput(Throughput::Bytes(mp.len() as u64));
    g.bench_function("msgpack", |b| {
        b.iter(|| parse_event(black_box(SUBJECT_TYPE), None, black_box(&mp), false).expect("parses"))
    });
    g.throughput(Throughput::Bytes(js.len() as u64));
    g.bench_function("json", |b| {
        b.iter(|| parse_event(black_box(SUBJECT_TYPE), None, black_box(&js), true).expect("parses"))
    });
    g.finish();
}

fn bench_encode_delivery(c: &mut Criterion) {
    let (_, _, ev) = fixtures();
    let subs: &[&str] = &["breakouts"];
    let mut out = Vec::with_capacity(512);
    encode_delivery(&ev, TS_MS, subs, &ev.data, &mut out);
    let mut g = c.benchmark_group("encode_delivery");
    g.throughput(Throughput::Bytes(out.len() as u64));
    g.bench_function("msgpack", |b| {
        b.iter(|| {
            out.clear();
            encode_delivery(
                black_box(&ev),
                black_box(TS_MS),
                black_box(subs),
                black_box(&ev.data),
                &mut out,
            );
            black_box(out.len())
        })
    });
    g.finish();
}

/// A delivery body as the router publishes it, with a distinct `ts` per `i`.
fn delivery_body(ev: &ProducerEvent, i: u64) -> Vec<u8> {
    let mut body = Vec::new();
    encode_delivery(ev, TS_MS + i, &["breakouts"], &ev.data, &mut body);
    body
}

fn encodings() -> [(Encoding, &'static str); 2] {
    [(Encoding::MsgPack, "msgpack"), (Encoding::Json, "json")]
}

fn bench_write_event_frame(c: &mut Criterion) {
    let (_, _, ev) = fixtures();
    let body = delivery_body(&ev, 0);
    let mut out = Vec::with_capacity(1024);
    let mut g = c.benchmark_group("write_event_frame");
    g.throughput(Throughput::Bytes(body.len() as u64));
    for (enc, name) in encodings() {
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                out.clear();
                write_event_frame(black_box(enc), black_box(&body), Some(black_box(41_337)), &mut out).expect("frame");
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn bench_write_batch_frame(c: &mut Criterion) {
    let (_, _, ev) = fixtures();
    let bodies: Vec<(Vec<u8>, u64)> = (0..BATCH as u64).map(|i| (delivery_body(&ev, i), 41_337 + i)).collect();
    let total: usize = bodies.iter().map(|(b, _)| b.len()).sum();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut g = c.benchmark_group("write_batch_frame");
    g.throughput(Throughput::Bytes(total as u64));
    for (enc, name) in encodings() {
        g.bench_function(BenchmarkId::new(name, BATCH), |b| {
            b.iter(|| {
                out.clear();
                let items = black_box(&bodies).iter().map(|(body, pos)| (&body[..], Some(*pos)));
                write_batch_frame(black_box(enc), items, &mut out).expect("batch");
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn bench_decode_client_frame(c: &mut Criterion) {
    let frame = json!({
        "op": "subscribe",
        "id": 7,
        "sub": "breakouts",
        "type": "tier_patterns",
        "filters": { "symbol": ["AAPL", "TSLA", "NVDA"], "tier": ["daily"] },
        "min": { "confidence": 0.6 }
    });
    let inputs = [
        (Encoding::MsgPack, "msgpack", msgpack(&frame)),
        (
            Encoding::Json,
            "json",
            serde_json::to_vec(&frame).expect("json encodes"),
        ),
    ];
    let mut g = c.benchmark_group("decode_client_frame/subscribe");
    for (enc, name, buf) in &inputs {
        let decoded = decode_client_frame(*enc, buf).expect("subscribe frame decodes");
        assert!(matches!(decoded.op, ClientOp::Subscribe(_)));
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| decode_client_frame(black_box(*enc), black_box(buf)).expect("decodes"))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    // Short runs keep the whole `cargo bench` under about two minutes on two cores.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_parse_event, bench_encode_delivery, bench_write_event_frame, bench_write_batch_frame, bench_decode_client_frame
}
criterion_main!(benches);
