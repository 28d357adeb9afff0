//! The latest keyed event of each (type, key), as the router tier keeps it
//! for snapshots (docs/PROTOCOL.md, "Snapshots").
//!
//! The match stage stores every keyed, subscription-targeted event on
//! `<prefix>.latest.<type>.<key token>` in a stream that keeps one message
//! per subject; routers read them back to answer `snapshot: true`. An entry
//! holds what matching a new subscription needs (the target) and what its
//! delivery body needs (type, data, ts, id, key, prio), so a snapshot is
//! built without the producer's original message.

use base64::Engine as _;
use bytes::Bytes;
use rmpv::Value;

use crate::event::{Prio, ProducerEvent, Target};
use crate::transcode;

/// Why a stored entry could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed latest-event entry: {0}")]
pub struct LatestError(&'static str);

/// The subject token of `key`: the key itself when it is a plain subject
/// token, else `~` and the key in URL-safe base64 (a key may hold dots,
/// wildcards or spaces, and a plain key never starts with `~`).
pub fn key_token(key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 128
        && !key.starts_with('~')
        && key
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'));
    if plain {
        key.to_string()
    } else {
        format!("~{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key))
    }
}

/// Writes the entry for `event` (which must have a key and a `match`
/// target; others are not kept) published at `ts`. `None` otherwise.
pub fn encode(event: &ProducerEvent, ts: u64, out: &mut Vec<u8>) -> Option<()> {
    let Target::Match {
        sub_type,
        dimensions,
        values,
    } = &event.target
    else {
        return None;
    };
    let key = event.key.as_deref()?;
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_array_len(out, 9);
    let _ = rmp::encode::write_str(out, sub_type);
    let _ = rmp::encode::write_map_len(out, dimensions.len() as u32);
    for (d, v) in dimensions {
        let _ = rmp::encode::write_str(out, d);
        let _ = rmp::encode::write_str(out, v);
    }
    let _ = rmp::encode::write_map_len(out, values.len() as u32);
    for (f, v) in values {
        let _ = rmp::encode::write_str(out, f);
        let _ = rmp::encode::write_f64(out, *v);
    }
    let _ = rmp::encode::write_str(out, &event.event_type);
    out.extend_from_slice(&event.data);
    let _ = rmp::encode::write_uint(out, ts);
    match &event.id {
        Some(id) => {
            let _ = rmp::encode::write_str(out, id);
        }
        None => {
            let _ = rmp::encode::write_nil(out);
        }
    }
    let _ = rmp::encode::write_str(out, key);
    let _ = rmp::encode::write_str(out, event.prio.as_str());
    Some(())
}

/// Reads an entry back: the event (live only, as snapshots are) and its `ts`.
pub fn decode(buf: &Bytes) -> Result<(ProducerEvent, u64), LatestError> {
    let mut rd: &[u8] = buf;
    if rmp::decode::read_array_len(&mut rd).map_err(|_| LatestError("not an array"))? != 9 {
        return Err(LatestError("not 9 fields"));
    }
    let sub_type = read_string(&mut rd)?;
    let dimensions = read_map(&mut rd, |v| v.as_str().map(str::to_string))?;
    let values = read_map(&mut rd, |v| v.as_f64())?;
    let event_type = read_string(&mut rd)?;
    let data_len = transcode::value_len(rd).map_err(|_| LatestError("data"))?;
    let start = buf.len() - rd.len();
    let data = buf.slice(start..start + data_len);
    rd = &rd[data_len..];
    let ts = rmp::decode::read_int(&mut rd).map_err(|_| LatestError("ts"))?;
    let id = match rd.first() {
        Some(0xc0) => {
            rd = &rd[1..];
            None
        }
        _ => Some(read_string(&mut rd)?),
    };
    let key = read_string(&mut rd)?;
    let prio = Prio::parse(&read_string(&mut rd)?).ok_or(LatestError("prio"))?;
    let event = ProducerEvent {
        event_type,
        data,
        id,
        target: Target::Match {
            sub_type,
            dimensions,
            values,
        },
        prio,
        key: Some(key),
        durable: false,
    };
    Ok((event, ts))
}

fn read_string(rd: &mut &[u8]) -> Result<String, LatestError> {
    match rmpv::decode::read_value(rd) {
        Ok(Value::String(s)) => s.into_str().ok_or(LatestError("string not UTF-8")),
        _ => Err(LatestError("expected a string")),
    }
}

fn read_map<T>(rd: &mut &[u8], value: impl Fn(&Value) -> Option<T>) -> Result<Vec<(String, T)>, LatestError> {
    match rmpv::decode::read_value(rd) {
        Ok(Value::Map(entries)) => entries
            .iter()
            .map(|(k, v)| match (k.as_str(), value(v)) {
                (Some(k), Some(v)) => Ok((k.to_string(), v)),
                _ => Err(LatestError("map entry")),
            })
            .collect(),
        _ => Err(LatestError("expected a map")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: Option<&str>, target: Target) -> ProducerEvent {
        let mut data = Vec::new();
        rmpv::encode::write_value(&mut data, &Value::Map(vec![(Value::from("px"), Value::from(1.5))])).unwrap();
        ProducerEvent {
            event_type: "tick".into(),
            data: Bytes::from(data),
            id: Some("e1".into()),
            target,
            prio: Prio::High,
            key: key.map(str::to_string),
            durable: true,
        }
    }

    fn matching() -> Target {
        Target::Match {
            sub_type: "ticks".into(),
            dimensions: vec![("symbol".into(), "AAPL".into())],
            values: vec![("px".into(), 1.5)],
        }
    }

    #[test]
    fn entries_round_trip_as_live_events() {
        let ev = event(Some("AAPL"), matching());
        let mut buf = Vec::new();
        encode(&ev, 42, &mut buf).unwrap();
        let (back, ts) = decode(&Bytes::from(buf)).unwrap();
        assert_eq!(ts, 42);
        assert_eq!(back, ProducerEvent { durable: false, ..ev });
        let mut anonymous = event(Some("k"), matching());
        anonymous.id = None;
        let mut buf = Vec::new();
        encode(&anonymous, 1, &mut buf).unwrap();
        assert_eq!(decode(&Bytes::from(buf)).unwrap().0.id, None);
    }

    #[test]
    fn only_keyed_subscription_events_are_kept() {
        let mut buf = Vec::new();
        assert!(encode(&event(None, matching()), 1, &mut buf).is_none());
        assert!(encode(&event(Some("k"), Target::All), 1, &mut buf).is_none());
        assert!(buf.is_empty());
        assert!(decode(&Bytes::from_static(b"\x92\x01\x02")).is_err());
        assert!(decode(&Bytes::from_static(b"")).is_err());
    }

    #[test]
    fn keys_become_single_subject_tokens() {
        assert_eq!(key_token("AAPL"), "AAPL");
        assert_eq!(key_token("BRK-B_1"), "BRK-B_1");
        for odd in ["a.b", "*", ">", "with space", "", "~tilde", "é"] {
            let t = key_token(odd);
            assert!(t.starts_with('~'), "{odd:?} → {t}");
            assert!(!t.contains(['.', '*', '>', ' ']), "{t}");
        }
        assert_ne!(key_token("a.b"), key_token("a_b"));
    }
}
