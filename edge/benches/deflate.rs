//! permessage-deflate on the edge's write path
//! (`switchyard_edge::deflate::put_data_frame`): what a connection that
//! negotiated it pays per data frame, and what it saves.
//!
//! - `event/*`: one W1-like `event` frame (a tick: `seq`, `t`, `sym`, `px`,
//!   its `type`, `sub` and `ts`), MessagePack and JSON, compressed with a
//!   per-thread compressor reset for the message (the default, no context
//!   takeover), and framed plain for comparison.
//! - `batch50/*`: a `batch` frame of 50 such events.
//! - `takeover/batch50`: the same batch with a connection's own compressor
//!   that keeps its window (`SWITCHYARD_DEFLATE_CONTEXT_TAKEOVER=true`).
//! - `inflate/*`: the reader's side, inflating a compressed client frame of
//!   each size.
//!
//! Frames go into a reused buffer (cleared each time), as the connection's
//! wire does. Throughput is in payload bytes before compression. The
//! compressed sizes (the ratio) are printed once at start, and so is the
//! memory a connection's own compressor takes with context takeover: the
//! growth of this process's RSS over 500 such compressors, each having
//! compressed two batches (window 15 and window 9).

// `criterion_group!` generates an undocumented `pub fn benches` that no item
// attribute can reach, and the workspace turns missing docs into warnings.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rmpv::Value;
use switchyard_common::delivery::{write_batch_frame_skipping, write_event_frame};
use switchyard_common::Encoding;
use switchyard_edge::deflate::{self, codec, negotiate, DeflateSettings, FrameDeflater};
use switchyard_edge::wsframe;

/// A W1 tick as the edge receives it from its delivery stage.
fn tick_body(seq: u64) -> Vec<u8> {
    let t = 1_765_000_000_000_000 + seq * 5_000;
    let sym = format!("S{:03}", (seq * 7) % 500);
    let v = Value::Map(vec![
        ("type".into(), "tick".into()),
        ("sub".into(), "ticks".into()),
        (
            "data".into(),
            Value::Map(vec![
                ("seq".into(), Value::from(seq)),
                ("t".into(), Value::from(t)),
                ("sym".into(), Value::from(sym)),
                ("px".into(), Value::from(100.0 + (seq % 1000) as f64 / 100.0)),
            ]),
        ),
        ("ts".into(), Value::from(t / 1000)),
    ]);
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, &v).expect("encoding to a Vec");
    b
}

/// A frame of `n` ticks: an `event` for one, a `batch` for more.
fn payload(enc: Encoding, n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if n == 1 {
        write_event_frame(enc, &tick_body(123_456), None, &mut out).expect("event frame");
        return out;
    }
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| tick_body(123_456 + i * 13)).collect();
    let r = write_batch_frame_skipping(enc, bodies.iter().map(|b| (&b[..], None)), &mut out);
    assert_eq!(r.written as u64, n);
    out
}

fn deflater(takeover: bool) -> FrameDeflater {
    let s = DeflateSettings {
        min_bytes: 1,
        context_takeover: takeover,
        ..DeflateSettings::default()
    };
    let agreed = negotiate([&b"permessage-deflate"[..]], &s).expect("accepted");
    FrameDeflater::new(&agreed, &s)
}

fn frame(payload: &[u8], d: Option<&mut FrameDeflater>) -> Vec<u8> {
    let mut buf = Vec::new();
    deflate::put_data_frame(&mut buf, wsframe::BINARY, payload, d);
    buf
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// RSS per connection-owned compressor (context takeover) at `bits`.
fn takeover_memory(bits: u8, batch: &[u8]) -> Option<u64> {
    const N: u64 = 500;
    let s = DeflateSettings {
        min_bytes: 1,
        context_takeover: true,
        window_bits: bits,
        ..DeflateSettings::default()
    };
    let agreed = negotiate([&b"permessage-deflate"[..]], &s).expect("accepted");
    let before = rss_bytes()?;
    let mut all: Vec<FrameDeflater> = (0..N).map(|_| FrameDeflater::new(&agreed, &s)).collect();
    let mut buf = Vec::with_capacity(1 << 16);
    for d in &mut all {
        for _ in 0..2 {
            buf.clear();
            deflate::put_data_frame(&mut buf, wsframe::BINARY, batch, Some(d));
        }
    }
    let after = rss_bytes()?;
    drop(all);
    Some(after.saturating_sub(before) / N)
}

fn bench(c: &mut Criterion) {
    let batch = payload(Encoding::MsgPack, 50);
    for bits in [15, 9] {
        if let Some(per) = takeover_memory(bits, &batch) {
            eprintln!(
                "context takeover, window {bits}: {} KiB of RSS per connection's compressor",
                per / 1024
            );
        }
    }
    for (enc, name, sizes) in [
        (Encoding::MsgPack, "msgpack", &[1u64, 3, 10, 50][..]),
        (Encoding::Json, "json", &[1, 50][..]),
    ] {
        for &n in sizes {
            let what = if n == 1 {
                "event".to_string()
            } else {
                format!("batch{n}")
            };
            let payload = &payload(enc, n);
            let compressed = frame(payload, Some(&mut deflater(false)));
            let mut own = deflater(true);
            let _ = frame(payload, Some(&mut own));
            let second = frame(payload, Some(&mut own));
            eprintln!(
                "{what}/{name}: {} payload bytes -> {} framed compressed ({:.2}); with takeover, a repeat -> {}",
                payload.len(),
                compressed.len(),
                compressed.len() as f64 / (payload.len() + wsframe::header_len(payload.len())) as f64,
                second.len()
            );
            let mut g = c.benchmark_group(what);
            g.throughput(Throughput::Bytes(payload.len() as u64));
            let mut buf = Vec::with_capacity(1 << 16);
            let mut d = deflater(false);
            g.bench_function(format!("{name}/deflate"), |b| {
                b.iter(|| {
                    buf.clear();
                    deflate::put_data_frame(&mut buf, wsframe::BINARY, black_box(payload), Some(&mut d));
                    black_box(buf.len())
                })
            });
            g.bench_function(format!("{name}/plain"), |b| {
                b.iter(|| {
                    buf.clear();
                    deflate::put_data_frame(&mut buf, wsframe::BINARY, black_box(payload), None);
                    black_box(buf.len())
                })
            });
            if n == 50 {
                let mut own = deflater(true);
                g.bench_function(format!("{name}/deflate_takeover"), |b| {
                    b.iter(|| {
                        buf.clear();
                        deflate::put_data_frame(&mut buf, wsframe::BINARY, black_box(payload), Some(&mut own));
                        black_box(buf.len())
                    })
                });
            }
            // Only what deflate made smaller goes compressed (RSV1).
            if compressed[0] & wsframe::RSV1 != 0 {
                let head = match compressed[1] {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                let body = &compressed[head..];
                g.bench_function(format!("{name}/inflate"), |b| {
                    b.iter(|| black_box(codec::inflate(black_box(body), 1 << 16).expect("inflates").len()))
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
