//! Reading server frames on the load generator's hot path without building
//! a value tree: one pass over the MessagePack map picks out what the
//! accounting needs (`op`, and per event the producer's `seq` and `t` from
//! `data`, and `pos`). Control frames are rare and decoded fully elsewhere.

use switchyard_common::transcode::value_len;

/// One event as the accounting sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// The producer's sequence number (`data.seq`).
    pub seq: u64,
    /// The producer's publish time, unix µs (`data.t`).
    pub t_us: u64,
    /// The delivery log position (durable events).
    pub pos: Option<u64>,
}

/// What a frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// `event` or `batch`: the events were appended to the output.
    Events,
    /// `dropped`: `count` events were not sent for `reason`.
    Dropped {
        /// Events dropped.
        count: u64,
        /// `true` for `rate_limited`, `false` for `slow_consumer`.
        rate_limited: bool,
    },
    /// Any other op (decode it fully if it matters).
    Other(String),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable frame: {0}")]
pub struct WireError(&'static str);

fn err(what: &'static str) -> WireError {
    WireError(what)
}

fn split(buf: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let n = value_len(buf).map_err(|_| err("value"))?;
    Ok(buf.split_at(n))
}

fn map_len(buf: &[u8]) -> Result<(usize, &[u8]), WireError> {
    let (&b, rest) = buf.split_first().ok_or(err("empty"))?;
    match b {
        0x80..=0x8f => Ok((usize::from(b & 0x0f), rest)),
        0xde => {
            let n = u16::from_be_bytes(
                rest.get(..2)
                    .ok_or(err("map16"))?
                    .try_into()
                    .map_err(|_| err("map16"))?,
            );
            Ok((usize::from(n), &rest[2..]))
        }
        0xdf => {
            let n = u32::from_be_bytes(
                rest.get(..4)
                    .ok_or(err("map32"))?
                    .try_into()
                    .map_err(|_| err("map32"))?,
            );
            Ok((n as usize, &rest[4..]))
        }
        _ => Err(err("not a map")),
    }
}

fn array_len(buf: &[u8]) -> Result<(usize, &[u8]), WireError> {
    let (&b, rest) = buf.split_first().ok_or(err("empty"))?;
    match b {
        0x90..=0x9f => Ok((usize::from(b & 0x0f), rest)),
        0xdc => {
            let n = u16::from_be_bytes(
                rest.get(..2)
                    .ok_or(err("arr16"))?
                    .try_into()
                    .map_err(|_| err("arr16"))?,
            );
            Ok((usize::from(n), &rest[2..]))
        }
        0xdd => {
            let n = u32::from_be_bytes(
                rest.get(..4)
                    .ok_or(err("arr32"))?
                    .try_into()
                    .map_err(|_| err("arr32"))?,
            );
            Ok((n as usize, &rest[4..]))
        }
        _ => Err(err("not an array")),
    }
}

fn as_str(v: &[u8]) -> Option<&[u8]> {
    let (&b, rest) = v.split_first()?;
    let (n, rest) = match b {
        0xa0..=0xbf => (usize::from(b & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
        0xda => (
            usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    rest.get(..n)
}

fn as_u64(v: &[u8]) -> Option<u64> {
    let (&b, rest) = v.split_first()?;
    Some(match b {
        0x00..=0x7f => u64::from(b),
        0xcc => u64::from(*rest.first()?),
        0xcd => u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
        0xce => u64::from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
        0xcf => u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
        _ => return None,
    })
}

/// Reads one event map (an `event` frame, or an element of `batch.events`).
fn event(buf: &[u8], out: &mut Vec<Seen>) -> Result<Option<&'static str>, WireError> {
    let (n, mut rest) = map_len(buf)?;
    let mut seen = Seen::default();
    let mut has_seq = false;
    let mut op = None;
    let mut events = None;
    for _ in 0..n {
        let (k, r) = split(rest)?;
        let (v, r) = split(r)?;
        rest = r;
        match as_str(k) {
            Some(b"op") => {
                op = Some(match as_str(v) {
                    Some(b"event") => "event",
                    Some(b"batch") => "batch",
                    _ => "other",
                })
            }
            Some(b"pos") => seen.pos = as_u64(v),
            Some(b"events") => events = Some(v),
            Some(b"data") => {
                if let Ok((m, mut d)) = map_len(v) {
                    for _ in 0..m {
                        let (dk, dr) = split(d)?;
                        let (dv, dr) = split(dr)?;
                        d = dr;
                        match as_str(dk) {
                            Some(b"seq") => {
                                seen.seq = as_u64(dv).ok_or(err("seq"))?;
                                has_seq = true;
                            }
                            Some(b"t") => seen.t_us = as_u64(dv).ok_or(err("t"))?,
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(ev) = events {
        let (m, mut r) = array_len(ev)?;
        for _ in 0..m {
            let (one, rr) = split(r)?;
            r = rr;
            event(one, out)?;
        }
    } else if has_seq && op != Some("other") {
        out.push(seen);
    }
    Ok(op)
}

/// Reads a MessagePack server frame; events go to `out`.
pub fn read_frame(buf: &[u8], out: &mut Vec<Seen>) -> Result<Kind, WireError> {
    match event(buf, out)? {
        Some("event") | Some("batch") => Ok(Kind::Events),
        _ => {
            let v = rmpv::decode::read_value(&mut &buf[..]).map_err(|_| err("control frame"))?;
            let map = v.as_map().ok_or(err("not a map"))?;
            let get = |k: &str| switchyard_common::value::get(map, k);
            let op = get("op").and_then(|o| o.as_str()).unwrap_or("").to_string();
            if op == "dropped" {
                return Ok(Kind::Dropped {
                    count: get("count").and_then(|c| c.as_u64()).unwrap_or(0),
                    rate_limited: get("reason").and_then(|r| r.as_str()) == Some("rate_limited"),
                });
            }
            Ok(Kind::Other(op))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_common::transcode::json_to_msgpack;

    fn mp(v: serde_json::Value) -> Vec<u8> {
        let mut b = Vec::new();
        json_to_msgpack(&v, &mut b);
        b
    }

    #[test]
    fn reads_events_batches_and_drops() {
        let mut out = Vec::new();
        let f = mp(
            json!({"op":"event","type":"tick","data":{"seq":7,"t":1_700_000_000_000_000u64,"px":1.5},"ts":1,"pos":42}),
        );
        assert_eq!(read_frame(&f, &mut out).unwrap(), Kind::Events);
        assert_eq!(
            out,
            vec![Seen {
                seq: 7,
                t_us: 1_700_000_000_000_000,
                pos: Some(42)
            }]
        );
        out.clear();
        let f = mp(
            json!({"op":"batch","events":[{"type":"tick","data":{"seq":1,"t":5}},{"type":"tick","data":{"t":6,"seq":300}}]}),
        );
        assert_eq!(read_frame(&f, &mut out).unwrap(), Kind::Events);
        assert_eq!(out.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![1, 300]);
        let f = mp(json!({"op":"dropped","count":3,"reason":"slow_consumer"}));
        assert_eq!(
            read_frame(&f, &mut out).unwrap(),
            Kind::Dropped {
                count: 3,
                rate_limited: false
            }
        );
        let f = mp(json!({"op":"ok","id":1}));
        assert_eq!(read_frame(&f, &mut out).unwrap(), Kind::Other("ok".into()));
    }
}
