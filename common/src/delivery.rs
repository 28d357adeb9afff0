//! Deliveries: the pre-targeted message a router publishes on a user's
//! subject, and the `event`/`batch` frames an edge builds from it.
//!
//! A delivery body is the event frame's map without `op` (and without `pos`,
//! which the delivery log assigns): `{"type","data","ts", "id"?, "key"?,
//! "prio"?, "sub"?}`, with the producer's `data` bytes embedded untouched.
//! The edge turns it into a frame by rewriting only the map header and
//! prepending `op` (and `pos`), so a MessagePack client gets the producer's
//! bytes with no decode and no re-encode on the edge.

use std::num::NonZeroU32;

use crate::event::{Prio, ProducerEvent};
use crate::transcode::{self, TranscodeError};
use crate::Encoding;

/// What a delivery body carries for the edge beyond the event itself.
///
/// The router knows it when it targets the event for a user (which of the
/// user's subscriptions matched); the edge reads it with [`peek_meta`] and
/// the frame writers never show it to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BodyExtras {
    /// The effective throttle for this user (docs/PROTOCOL.md, "Throttling"):
    /// the smallest `throttle_ms` of the matching subscriptions, `None` when
    /// the event has no key, is `critical`, or any matching subscription is
    /// unthrottled.
    pub throttle_ms: Option<NonZeroU32>,
    /// A snapshot (docs/PROTOCOL.md, "Snapshots"): the client sees
    /// `"snapshot": true`, and the body has no `pos` ever.
    pub snapshot: bool,
}

/// The map header that marks a body carrying the internal trailer: a
/// `map32` header, which [`encode_delivery`] never writes otherwise (a body
/// has at most 8 client-visible entries, a `fixmap`). So telling the two
/// kinds apart costs the edge one byte comparison.
const INTERNAL_HEADER: u8 = 0xdf;
/// The internal trailer's key (`fixstr` "~t", a name no client field can
/// have) and the `uint32` marker of its value; 4 value bytes follow.
const TRAILER_TAG: [u8; 4] = [0xa2, b'~', b't', 0xce];
/// Bytes of the internal trailer: the tag and a big-endian u32.
const TRAILER_LEN: usize = TRAILER_TAG.len() + 4;

/// Writes a delivery body for one user.
///
/// `data` is the payload to send (the event's own bytes, or a trimmed copy
/// when the user's subscriptions asked for `fields`); `subs` names the user's
/// matching subscriptions (empty for direct, room and broadcast targets).
pub fn encode_delivery(event: &ProducerEvent, ts_ms: u64, subs: &[&str], data: &[u8], out: &mut Vec<u8>) {
    encode_delivery_with(event, ts_ms, subs, data, BodyExtras::default(), out)
}

/// [`encode_delivery`] with what only the edge reads ([`BodyExtras`]).
///
/// A throttle is written as the last map entry under a reserved key, after
/// a `map32` header: the edge finds it without walking the map, and cuts it
/// off (entry count and bytes) when it builds frames, so clients never see
/// it, on live deliveries and on replays from the log alike. Without extras
/// the body is exactly what [`encode_delivery`] always wrote.
pub fn encode_delivery_with(
    event: &ProducerEvent,
    ts_ms: u64,
    subs: &[&str],
    data: &[u8],
    extras: BodyExtras,
    out: &mut Vec<u8>,
) {
    let n = 3
        + u32::from(event.id.is_some())
        + u32::from(event.key.is_some())
        + u32::from(event.prio != Prio::Normal)
        + u32::from(!subs.is_empty())
        + u32::from(extras.snapshot);
    match extras.throttle_ms {
        // Writes into a Vec cannot fail.
        None => {
            let _ = rmp::encode::write_map_len(out, n);
        }
        Some(_) => {
            out.push(INTERNAL_HEADER);
            out.extend_from_slice(&(n + 1).to_be_bytes());
        }
    }
    write_str(out, "type");
    write_str(out, &event.event_type);
    write_str(out, "data");
    out.extend_from_slice(data);
    write_str(out, "ts");
    let _ = rmp::encode::write_uint(out, ts_ms);
    if let Some(id) = &event.id {
        write_str(out, "id");
        write_str(out, id);
    }
    if let Some(key) = &event.key {
        write_str(out, "key");
        write_str(out, key);
    }
    if event.prio != Prio::Normal {
        write_str(out, "prio");
        write_str(out, event.prio.as_str());
    }
    if !subs.is_empty() {
        write_str(out, "sub");
        let _ = rmp::encode::write_array_len(out, subs.len() as u32);
        for s in subs {
            write_str(out, s);
        }
    }
    if extras.snapshot {
        write_str(out, "snapshot");
        let _ = rmp::encode::write_bool(out, true);
    }
    if let Some(ms) = extras.throttle_ms {
        out.extend_from_slice(&TRAILER_TAG);
        out.extend_from_slice(&ms.get().to_be_bytes());
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

/// What flow control needs from a delivery body, read without decoding `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryMeta {
    /// The event's priority.
    pub prio: Prio,
    /// Hash of (`type`, `key`) when the event has a key: its conflation identity.
    pub conflation_key: Option<u64>,
    /// The effective throttle the router computed for this user (see [`BodyExtras`]).
    pub throttle_ms: Option<NonZeroU32>,
}

/// Reads priority, conflation identity and throttle from a delivery body.
pub fn peek_meta(body: &[u8]) -> Result<DeliveryMeta, TranscodeError> {
    let Body {
        entries,
        mut rest,
        throttle_ms,
    } = split_body(body)?;
    let mut meta = DeliveryMeta {
        throttle_ms,
        ..DeliveryMeta::default()
    };
    let mut ty: &[u8] = &[];
    let mut key: Option<&[u8]> = None;
    for _ in 0..entries {
        let klen = transcode::value_len(rest)?;
        let (k, after_key) = rest.split_at(klen);
        let vlen = transcode::value_len(after_key)?;
        let (v, after_value) = after_key.split_at(vlen);
        match str_payload(k) {
            Some(b"type") => ty = str_payload(v).unwrap_or_default(),
            Some(b"key") => key = str_payload(v),
            Some(b"prio") => {
                meta.prio = str_payload(v)
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .and_then(Prio::parse)
                    .unwrap_or_default()
            }
            _ => {}
        }
        rest = after_value;
    }
    if let Some(key) = key {
        // FNV-1a over type, a separator no name contains, and key.
        let h = crate::hash::Fnv1a::new().write(ty).write(&[0]).write(key).finish();
        meta.conflation_key = Some(h);
    }
    Ok(meta)
}

/// Whether the body's `sub` list names `name` (the edge uses it to tell a
/// new subscription's live events while that subscription's snapshot is
/// on its way).
pub fn body_has_sub(body: &[u8], name: &str) -> bool {
    let Ok(Body { entries, mut rest, .. }) = split_body(body) else {
        return false;
    };
    for _ in 0..entries {
        let Ok(klen) = transcode::value_len(rest) else {
            return false;
        };
        let (k, after_key) = rest.split_at(klen);
        let Ok(vlen) = transcode::value_len(after_key) else {
            return false;
        };
        let (mut v, after_value) = after_key.split_at(vlen);
        if str_payload(k) == Some(b"sub") {
            let Ok(n) = rmp::decode::read_array_len(&mut v) else {
                return false;
            };
            for _ in 0..n {
                let Ok(len) = transcode::value_len(v) else { return false };
                let (s, next) = v.split_at(len);
                if str_payload(s) == Some(name.as_bytes()) {
                    return true;
                }
                v = next;
            }
            return false;
        }
        rest = after_value;
    }
    false
}

/// Reads the `ts` field (unix ms at publish) from a delivery body, without
/// decoding `data`. The edge uses it for its delivery-latency histogram.
pub fn peek_ts(body: &[u8]) -> Option<u64> {
    let Body { entries, mut rest, .. } = split_body(body).ok()?;
    for _ in 0..entries {
        let klen = transcode::value_len(rest).ok()?;
        let (k, after_key) = rest.split_at(klen);
        let vlen = transcode::value_len(after_key).ok()?;
        let (mut v, after_value) = after_key.split_at(vlen);
        if str_payload(k) == Some(b"ts") {
            return rmp::decode::read_int(&mut v).ok();
        }
        rest = after_value;
    }
    None
}

/// The bytes of a MessagePack string value, if it is one.
fn str_payload(v: &[u8]) -> Option<&[u8]> {
    let (&first, rest) = v.split_first()?;
    let (len, rest) = match first {
        0xa0..=0xbf => (usize::from(first & 0x1f), rest),
        0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
        0xda => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            rest.get(2..)?,
        ),
        0xdb => (
            u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize,
            rest.get(4..)?,
        ),
        _ => return None,
    };
    rest.get(..len)
}

/// A delivery body whose map header has been read: its client-visible
/// entries (the internal trailer, if any, already cut off) and the throttle
/// that trailer held.
struct Body<'a> {
    entries: u32,
    rest: &'a [u8],
    throttle_ms: Option<NonZeroU32>,
}

fn split_body(body: &[u8]) -> Result<Body<'_>, TranscodeError> {
    if body.first() == Some(&INTERNAL_HEADER) {
        if let Some(b) = split_internal(body) {
            return Ok(b);
        }
    }
    let mut rd = body;
    let entries =
        rmp::decode::read_map_len(&mut rd).map_err(|_| TranscodeError::Invalid("delivery body is not a map"))?;
    Ok(Body {
        entries,
        rest: rd,
        throttle_ms: None,
    })
}

/// A body written with [`BodyExtras`]: `map32` header, entries, trailer.
/// `None` when the bytes do not end with a trailer (then the body is read
/// as the plain map its header says it is).
fn split_internal(body: &[u8]) -> Option<Body<'_>> {
    let entries = u32::from_be_bytes(body.get(1..5)?.try_into().ok()?);
    let at = body
        .len()
        .checked_sub(TRAILER_LEN)
        .filter(|&at| at >= 5 && entries > 0)?;
    let (front, trailer) = body.split_at(at);
    let (tag, ms) = trailer.split_at(TRAILER_TAG.len());
    if tag != TRAILER_TAG {
        return None;
    }
    Some(Body {
        entries: entries - 1,
        rest: &front[5..],
        throttle_ms: NonZeroU32::new(u32::from_be_bytes(ms.try_into().ok()?)),
    })
}

fn write_msgpack_entries(body: &Body<'_>, extra: u32, pos: Option<u64>, out: &mut Vec<u8>) {
    let _ = rmp::encode::write_map_len(out, body.entries + extra + u32::from(pos.is_some()));
    if let Some(pos) = pos {
        write_str(out, "pos");
        let _ = rmp::encode::write_uint(out, pos);
    }
    out.extend_from_slice(body.rest);
}

/// Appends JSON for a body with `prefix` fields spliced in front of its own.
/// The body must be a map with at least one entry (every delivery has
/// `type`, `data` and `ts`), or the spliced text would not be JSON.
fn write_json_entries(body: &[u8], pos: Option<u64>, out: &mut Vec<u8>) -> Result<(), TranscodeError> {
    let b = split_body(body)?;
    if b.entries == 0 {
        return Err(TranscodeError::Invalid("empty delivery body"));
    }
    if let Some(pos) = pos {
        out.extend_from_slice(b"\"pos\":");
        out.extend_from_slice(pos.to_string().as_bytes());
        out.push(b',');
    }
    // The entries continue the map the caller opened.
    transcode::map_entries_to_json(b.entries, b.rest, out)?;
    out.push(b'}');
    Ok(())
}

/// Writes an `event` frame from a delivery body (and its `pos`, if durable).
pub fn write_event_frame(
    enc: Encoding,
    body: &[u8],
    pos: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(), TranscodeError> {
    match enc {
        Encoding::MsgPack => {
            let b = split_body(body)?;
            let _ = rmp::encode::write_map_len(out, b.entries + 1 + u32::from(pos.is_some()));
            write_str(out, "op");
            write_str(out, "event");
            if let Some(pos) = pos {
                write_str(out, "pos");
                let _ = rmp::encode::write_uint(out, pos);
            }
            out.extend_from_slice(b.rest);
            Ok(())
        }
        Encoding::Json => {
            let start = out.len();
            out.extend_from_slice(b"{\"op\":\"event\",");
            write_json_entries(body, pos, out).inspect_err(|_| out.truncate(start))
        }
    }
}

/// Writes a `batch` frame from several delivery bodies, in order; fails
/// (writing nothing) when any of them does not convert. See
/// [`write_batch_frame_skipping`] for the writer's variant.
pub fn write_batch_frame<'a>(
    enc: Encoding,
    bodies: impl ExactSizeIterator<Item = (&'a [u8], Option<u64>)>,
    out: &mut Vec<u8>,
) -> Result<(), TranscodeError> {
    let start = out.len();
    let written = write_batch_frame_skipping(enc, bodies, out);
    match written.first_error {
        None => Ok(()),
        Some(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Appends one element of a `batch` frame's `events` array: the event map
/// (without `op`) of one delivery body, with its `pos` if durable.
///
/// This is the per-event step of [`write_batch_frame`], public so a writer
/// can convert a batch one event at a time and skip only the events that do
/// not convert. On error `out` is left as it was.
pub fn write_batch_event(
    enc: Encoding,
    body: &[u8],
    pos: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(), TranscodeError> {
    match enc {
        Encoding::MsgPack => {
            write_msgpack_entries(&split_body(body)?, 0, pos, out);
            Ok(())
        }
        Encoding::Json => {
            let start = out.len();
            out.push(b'{');
            write_json_entries(body, pos, out).inspect_err(|_| out.truncate(start))
        }
    }
}

/// What [`write_batch_frame_skipping`] wrote.
#[derive(Debug, Default)]
pub struct SkippingBatch {
    /// Events in the frame; 0 means no frame was written at all.
    pub written: usize,
    /// Events left out because they did not convert.
    pub skipped: usize,
    /// Why the first skipped event did not convert (for the log).
    pub first_error: Option<TranscodeError>,
}

impl SkippingBatch {
    fn note(&mut self, r: Result<(), TranscodeError>) {
        match r {
            Ok(()) => self.written += 1,
            Err(e) => {
                self.skipped += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// Writes a `batch` frame from several delivery bodies, in order, leaving
/// out each body that does not convert instead of failing the whole frame
/// (one bad event must cost only itself: docs/PROTOCOL.md's `dropped` promise
/// and the `pos` bookkeeping of the caller depend on it).
///
/// When no body converts, nothing is written (`written` is 0). A frame
/// whose other events all converted holds them in order, with the array
/// length counting only those.
pub fn write_batch_frame_skipping<'a>(
    enc: Encoding,
    bodies: impl ExactSizeIterator<Item = (&'a [u8], Option<u64>)>,
    out: &mut Vec<u8>,
) -> SkippingBatch {
    let start = out.len();
    let mut result = SkippingBatch::default();
    match enc {
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(out, 2);
            write_str(out, "op");
            write_str(out, "batch");
            write_str(out, "events");
            let header_at = out.len();
            let announced = bodies.len() as u32;
            let _ = rmp::encode::write_array_len(out, announced);
            let header_len = out.len() - header_at;
            for (body, pos) in bodies {
                result.note(write_batch_event(enc, body, pos, out));
            }
            if result.skipped > 0 && result.written > 0 {
                transcode::set_container_header(
                    out,
                    header_at,
                    header_len,
                    transcode::Container::Array,
                    result.written as u32,
                );
            }
        }
        Encoding::Json => {
            out.extend_from_slice(b"{\"op\":\"batch\",\"events\":[");
            for (body, pos) in bodies {
                let before = out.len();
                if result.written > 0 {
                    out.push(b',');
                }
                let r = write_batch_event(enc, body, pos, out);
                if r.is_err() {
                    out.truncate(before);
                }
                result.note(r);
            }
            out.extend_from_slice(b"]}");
        }
    }
    if result.written == 0 {
        out.truncate(start);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Target;
    use bytes::Bytes;

    fn event() -> ProducerEvent {
        ProducerEvent {
            event_type: "tick".into(),
            data: Bytes::from_static(&[0x81, 0xa1, b'p', 0x05]),
            id: None,
            target: Target::All,
            prio: Prio::Normal,
            key: None,
            durable: true,
        }
    }

    #[test]
    fn golden_event_frame_msgpack() {
        let ev = event();
        let mut body = Vec::new();
        encode_delivery(&ev, 1, &[], &ev.data, &mut body);
        let mut frame = Vec::new();
        write_event_frame(Encoding::MsgPack, &body, None, &mut frame).unwrap();
        let mut expected = vec![0x84, 0xa2, b'o', b'p', 0xa5];
        expected.extend_from_slice(b"event");
        expected.extend_from_slice(&[0xa4]);
        expected.extend_from_slice(b"type");
        expected.extend_from_slice(&[0xa4]);
        expected.extend_from_slice(b"tick");
        expected.extend_from_slice(&[0xa4]);
        expected.extend_from_slice(b"data");
        expected.extend_from_slice(&[0x81, 0xa1, b'p', 0x05]);
        expected.extend_from_slice(&[0xa2, b't', b's', 0x01]);
        assert_eq!(frame, expected);
    }

    #[test]
    fn golden_event_frame_json_with_pos_and_subs() {
        let mut ev = event();
        ev.id = Some("e1".into());
        ev.prio = Prio::High;
        let mut body = Vec::new();
        encode_delivery(&ev, 1700, &["s1"], &ev.data, &mut body);
        let mut frame = Vec::new();
        write_event_frame(Encoding::Json, &body, Some(9), &mut frame).unwrap();
        assert_eq!(
            std::str::from_utf8(&frame).unwrap(),
            r#"{"op":"event","pos":9,"type":"tick","data":{"p":5},"ts":1700,"id":"e1","prio":"high","sub":["s1"]}"#
        );
    }

    #[test]
    fn meta_is_read_without_decoding_data() {
        let mut ev = event();
        let mut body = Vec::new();
        encode_delivery(&ev, 1, &[], &ev.data, &mut body);
        assert_eq!(
            peek_meta(&body).unwrap(),
            DeliveryMeta {
                prio: Prio::Normal,
                conflation_key: None,
                throttle_ms: None
            }
        );
        ev.key = Some("AAPL".into());
        ev.prio = Prio::Critical;
        let mut a = Vec::new();
        encode_delivery(&ev, 1, &[], &ev.data, &mut a);
        let ma = peek_meta(&a).unwrap();
        assert_eq!(ma.prio, Prio::Critical);
        assert!(ma.conflation_key.is_some());
        ev.key = Some("TSLA".into());
        let mut b = Vec::new();
        encode_delivery(&ev, 2, &[], &ev.data, &mut b);
        assert_ne!(ma.conflation_key, peek_meta(&b).unwrap().conflation_key);
        ev.event_type = "quote".into();
        ev.key = Some("AAPL".into());
        let mut c = Vec::new();
        encode_delivery(&ev, 2, &[], &ev.data, &mut c);
        assert_ne!(ma.conflation_key, peek_meta(&c).unwrap().conflation_key);
        assert!(peek_meta(&[0x01]).is_err());
    }

    #[test]
    fn the_internal_trailer_is_read_by_the_edge_and_never_sent() {
        let mut ev = event();
        ev.key = Some("AAPL".into());
        ev.id = Some("e1".into());
        let extras = BodyExtras {
            throttle_ms: NonZeroU32::new(250),
            ..BodyExtras::default()
        };
        for subs in [&[][..], &["s1", "s2"][..]] {
            let mut plain = Vec::new();
            encode_delivery(&ev, 5, subs, &ev.data, &mut plain);
            let mut internal = Vec::new();
            encode_delivery_with(&ev, 5, subs, &ev.data, extras, &mut internal);
            assert_eq!(internal[0], INTERNAL_HEADER);
            assert_eq!(internal.len(), plain.len() + 4 + TRAILER_LEN);
            let (mp, mi) = (peek_meta(&plain).unwrap(), peek_meta(&internal).unwrap());
            assert_eq!(mp.throttle_ms, None);
            assert_eq!(mi.throttle_ms, NonZeroU32::new(250));
            assert_eq!((mp.prio, mp.conflation_key), (mi.prio, mi.conflation_key));
            assert_eq!(peek_ts(&internal), Some(5));
            for enc in [Encoding::Json, Encoding::MsgPack] {
                for pos in [None, Some(3)] {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    write_event_frame(enc, &plain, pos, &mut a).unwrap();
                    write_event_frame(enc, &internal, pos, &mut b).unwrap();
                    assert_eq!(a, b, "{enc:?} event frame");
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    write_batch_frame(enc, [(&plain[..], pos), (&plain[..], None)].into_iter(), &mut a).unwrap();
                    write_batch_frame(enc, [(&internal[..], pos), (&plain[..], None)].into_iter(), &mut b).unwrap();
                    assert_eq!(a, b, "{enc:?} batch frame");
                }
            }
            // Still one MessagePack map, with one entry more for a reader
            // that knows nothing of the trailer.
            let mut rd = &internal[..];
            let v = rmpv::decode::read_value(&mut rd).unwrap();
            assert!(rd.is_empty());
            let plain_len = rmpv::decode::read_value(&mut &plain[..])
                .unwrap()
                .as_map()
                .unwrap()
                .len();
            assert_eq!(v.as_map().unwrap().len(), plain_len + 1);
        }
        // A map32 body without the trailer is read as the plain map it is.
        let m32 = [0xdf, 0, 0, 0, 1, 0xa1, b'a', 0x01];
        assert_eq!(peek_meta(&m32).unwrap().throttle_ms, None);
        let mut out = Vec::new();
        write_event_frame(Encoding::Json, &m32, None, &mut out).unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"op":"event","a":1}"#);
        // Too short to hold a trailer, or a trailer with no entry before it.
        assert!(peek_meta(&[0xdf, 0, 0]).is_err());
        let mut bare = vec![0xdf, 0, 0, 0, 0];
        bare.extend_from_slice(&TRAILER_TAG);
        bare.extend_from_slice(&[0, 0, 0, 9]);
        assert!(peek_meta(&bare).is_ok());
    }

    #[test]
    fn ts_is_read_without_decoding_data() {
        let ev = event();
        for ts in [0, 1, 1_700_000_000_123, u64::MAX] {
            let mut body = Vec::new();
            encode_delivery(&ev, ts, &["s"], &ev.data, &mut body);
            assert_eq!(peek_ts(&body), Some(ts));
        }
        assert_eq!(peek_ts(&[0x80]), None, "an empty map has no ts");
        assert_eq!(peek_ts(&[0x01]), None, "not a map");
    }

    #[test]
    fn batch_frames() {
        let ev = event();
        let mut a = Vec::new();
        encode_delivery(&ev, 1, &[], &ev.data, &mut a);
        let mut out = Vec::new();
        write_batch_frame(
            Encoding::Json,
            [(&a[..], None), (&a[..], Some(2))].into_iter(),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"op":"batch","events":[{"type":"tick","data":{"p":5},"ts":1},{"pos":2,"type":"tick","data":{"p":5},"ts":1}]}"#
        );
        out.clear();
        write_batch_frame(Encoding::MsgPack, [(&a[..], Some(2))].into_iter(), &mut out).unwrap();
        let v = rmpv::decode::read_value(&mut &out[..]).unwrap();
        let events = crate::value::get(v.as_map().unwrap(), "events")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            crate::value::get(events[0].as_map().unwrap(), "pos").unwrap().as_u64(),
            Some(2)
        );
        assert!(write_batch_frame(Encoding::MsgPack, [(&[0x01u8][..], None)].into_iter(), &mut out).is_err());
    }

    #[test]
    fn a_bad_event_costs_only_itself() {
        let ev = event();
        let mut good = Vec::new();
        encode_delivery(&ev, 1, &[], &ev.data, &mut good);
        // Undecodable data (reserved marker): fine for MessagePack clients
        // byte for byte, not convertible to JSON.
        let mut bad_data = Vec::new();
        encode_delivery(&ev, 1, &[], &[0xc1], &mut bad_data);
        let not_a_map: &[u8] = &[0x01];

        let mut out = vec![b'#'];
        let r = write_batch_frame_skipping(
            Encoding::Json,
            [
                (&good[..], Some(1)),
                (&bad_data[..], Some(2)),
                (not_a_map, None),
                (&good[..], Some(4)),
            ]
            .into_iter(),
            &mut out,
        );
        assert_eq!((r.written, r.skipped), (2, 2));
        assert_eq!(r.first_error, Some(TranscodeError::Invalid("reserved marker 0xc1")));
        assert_eq!(
            std::str::from_utf8(&out[1..]).unwrap(),
            r#"{"op":"batch","events":[{"pos":1,"type":"tick","data":{"p":5},"ts":1},{"pos":4,"type":"tick","data":{"p":5},"ts":1}]}"#
        );
        // A bad first event leaves no stray comma.
        out.truncate(1);
        let r = write_batch_frame_skipping(
            Encoding::Json,
            [(&bad_data[..], Some(2)), (&good[..], None)].into_iter(),
            &mut out,
        );
        assert_eq!((r.written, r.skipped), (1, 1));
        assert_eq!(
            std::str::from_utf8(&out[1..]).unwrap(),
            r#"{"op":"batch","events":[{"type":"tick","data":{"p":5},"ts":1}]}"#
        );
        // Nothing convertible: nothing written.
        out.truncate(1);
        let r = write_batch_frame_skipping(Encoding::Json, [(&bad_data[..], None)].into_iter(), &mut out);
        assert_eq!((r.written, r.skipped), (0, 1));
        assert_eq!(out, b"#");

        // MessagePack: the array length counts the written events only,
        // with the smallest header (16 announced, 15 written: array16 → fixarray).
        for (n, bad_at) in [(3, 1), (16, 7), (17, 0)] {
            let bodies: Vec<(&[u8], Option<u64>)> = (0..n)
                .map(|i| {
                    if i == bad_at {
                        (not_a_map, None)
                    } else {
                        (&good[..], Some(i as u64))
                    }
                })
                .collect();
            let mut out = Vec::new();
            let r = write_batch_frame_skipping(Encoding::MsgPack, bodies.iter().copied(), &mut out);
            assert_eq!((r.written, r.skipped), (n - 1, 1));
            let mut rd = &out[..];
            let v = rmpv::decode::read_value(&mut rd).unwrap();
            assert!(rd.is_empty(), "the frame is exactly one value");
            let events = crate::value::get(v.as_map().unwrap(), "events")
                .unwrap()
                .as_array()
                .unwrap();
            assert_eq!(events.len(), n - 1);
            let all_good: Vec<(&[u8], Option<u64>)> = bodies.iter().copied().filter(|b| b.0 != not_a_map).collect();
            let mut expected = Vec::new();
            write_batch_frame(Encoding::MsgPack, all_good.into_iter(), &mut expected).unwrap();
            assert_eq!(out, expected);
        }
        let mut out = Vec::new();
        let r = write_batch_frame_skipping(Encoding::MsgPack, [(not_a_map, None)].into_iter(), &mut out);
        assert_eq!((r.written, r.skipped), (0, 1));
        assert!(out.is_empty());
    }

    #[test]
    fn batch_event_is_one_element_of_the_batch() {
        let ev = event();
        let mut body = Vec::new();
        encode_delivery(&ev, 1, &[], &ev.data, &mut body);
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let mut one = Vec::new();
            write_batch_event(enc, &body, Some(3), &mut one).unwrap();
            let mut frame = Vec::new();
            write_batch_frame(enc, [(&body[..], Some(3))].into_iter(), &mut frame).unwrap();
            let at = frame.windows(one.len()).position(|w| w == &one[..]);
            assert!(at.is_some(), "{enc:?}: the element appears in the frame");
            let mut out = vec![7];
            assert!(write_batch_event(enc, &[0x01], None, &mut out).is_err());
            assert_eq!(out, [7]);
        }
        // A JSON frame is spliced from the body's entries: an empty map or
        // a non-map would make broken JSON, so they are errors.
        for body in [&[0x80][..], &[0x01], &[0x91, 0x01]] {
            let mut out = Vec::new();
            assert!(write_event_frame(Encoding::Json, body, Some(1), &mut out).is_err());
            assert!(out.is_empty());
        }
    }

    #[test]
    fn snapshot_bodies_say_so_and_name_their_subscription() {
        let mut ev = event();
        ev.key = Some("AAPL".into());
        let extras = BodyExtras {
            snapshot: true,
            ..BodyExtras::default()
        };
        let mut body = Vec::new();
        encode_delivery_with(&ev, 5, &["watch"], &ev.data, extras, &mut body);
        let mut frame = Vec::new();
        write_event_frame(Encoding::Json, &body, None, &mut frame).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["snapshot"], true);
        assert_eq!(v["sub"], serde_json::json!(["watch"]));
        assert!(v.get("pos").is_none());
        assert!(body_has_sub(&body, "watch"));
        assert!(!body_has_sub(&body, "watc"));
        let mut plain = Vec::new();
        encode_delivery(&ev, 5, &[], &ev.data, &mut plain);
        assert!(!body_has_sub(&plain, "watch"));
        assert!(!body_has_sub(b"\xc1", "watch"));
    }
}
