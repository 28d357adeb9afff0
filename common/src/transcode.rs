//! Byte-level MessagePack helpers for the delivery path.
//!
//! This module owns the four things done to a producer's `data` bytes on
//! their way to a client (docs/PROTOCOL.md, "JSON clients and MessagePack
//! payloads" and "`fields`"):
//!
//! * measuring one encoded value without decoding it ([`value_len`]; also
//!   the depth check at ingest),
//! * trimming a map payload to the keys a subscription asked for
//!   ([`trim_map_fields`], by the router), copying kept entries byte for byte,
//! * transcoding MessagePack to JSON text for `switchyard.v1.json`
//!   connections ([`msgpack_to_json`], by the edge),
//! * converting a JSON producer's event to MessagePack at ingest
//!   ([`json_members_to_msgpack`], [`json_text_to_msgpack`]).
//!
//! It must not build an intermediate value tree (`rmpv::Value` or similar):
//! everything works on the input slice and appends to the caller's output
//! buffer, with no allocation per value beyond that buffer. Input is
//! untrusted: nothing here may panic on arbitrary bytes, length prefixes are
//! checked against the bytes actually present, nesting is limited to
//! [`MAX_DEPTH`], and the JSON text stays linear in the MessagePack size (at
//! most [`json_len_bound`] bytes): a map key that is itself an array, map or
//! extension is written as a fixed string, never rendered.

use std::io::Write as _;

use base64::Engine as _;

/// Deepest container nesting accepted; guards the stack against hostile input.
pub const MAX_DEPTH: usize = 64;

/// Why a MessagePack buffer could not be measured, trimmed or transcoded.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The buffer ends before the value (or a length it announces) does.
    #[error("truncated MessagePack value")]
    Truncated,
    /// The bytes are not valid MessagePack.
    #[error("invalid MessagePack: {0}")]
    Invalid(&'static str),
    /// Containers are nested deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {} levels", MAX_DEPTH)]
    TooDeep,
    /// JSON text that does not parse ([`json_text_to_msgpack`]).
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
}

/// Errors compare by kind (and, for JSON, by message): what tests and
/// callers that branch on an error need; `serde_json::Error` has no `==`.
impl PartialEq for TranscodeError {
    fn eq(&self, other: &TranscodeError) -> bool {
        match (self, other) {
            (TranscodeError::Truncated, TranscodeError::Truncated)
            | (TranscodeError::TooDeep, TranscodeError::TooDeep) => true,
            (TranscodeError::Invalid(a), TranscodeError::Invalid(b)) => a == b,
            (TranscodeError::Json(a), TranscodeError::Json(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

/// One decoded MessagePack header. Scalars carry their payload; containers
/// carry their element count (entries for maps).
enum Head<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
    Ext(i8, &'a [u8]),
}

/// `n` bytes of `buf` starting at `pos`, or `Truncated`.
fn take(buf: &[u8], pos: usize, n: usize) -> Result<&[u8], TranscodeError> {
    let end = pos.checked_add(n).ok_or(TranscodeError::Truncated)?;
    buf.get(pos..end).ok_or(TranscodeError::Truncated)
}

/// Big-endian unsigned integer of `n` (1, 2, 4 or 8) bytes at `pos`.
fn be(buf: &[u8], pos: usize, n: usize) -> Result<u64, TranscodeError> {
    Ok(take(buf, pos, n)?
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Decodes the header at `pos`. Returns the head and the position after it:
/// after the whole value for scalars, after the header only for containers.
/// A container announcing more elements than there are bytes left is
/// reported as `Truncated` at once (every element takes at least one byte).
fn read_head(buf: &[u8], pos: usize) -> Result<(Head<'_>, usize), TranscodeError> {
    let marker = *buf.get(pos).ok_or(TranscodeError::Truncated)?;
    let p = pos + 1;
    // Variable-length payload: `len_bytes` length prefix, then the data.
    let sized = |len_bytes: usize| -> Result<(&[u8], usize), TranscodeError> {
        let len = be(buf, p, len_bytes)? as usize;
        let start = p + len_bytes;
        Ok((take(buf, start, len)?, start + len))
    };
    let container = |n: u64, per: u64, after: usize| -> Result<usize, TranscodeError> {
        let left = (buf.len() - after.min(buf.len())) as u64;
        if n.saturating_mul(per) > left {
            return Err(TranscodeError::Truncated);
        }
        Ok(n as usize)
    };
    let fixed = |n: usize| be(buf, p, n);
    Ok(match marker {
        0x00..=0x7f => (Head::Uint(u64::from(marker)), p),
        0x80..=0x8f => (Head::Map(container(u64::from(marker & 0x0f), 2, p)?), p),
        0x90..=0x9f => (Head::Array(container(u64::from(marker & 0x0f), 1, p)?), p),
        0xa0..=0xbf => {
            let len = usize::from(marker & 0x1f);
            (Head::Str(take(buf, p, len)?), p + len)
        }
        0xc0 => (Head::Nil, p),
        0xc1 => return Err(TranscodeError::Invalid("reserved marker 0xc1")),
        0xc2 => (Head::Bool(false), p),
        0xc3 => (Head::Bool(true), p),
        0xc4..=0xc6 => {
            let (data, end) = sized(1 << (marker - 0xc4))?;
            (Head::Bin(data), end)
        }
        0xc7..=0xc9 => {
            let len_bytes = 1 << (marker - 0xc7);
            let len = be(buf, p, len_bytes)? as usize;
            let ty = fixed_i8(buf, p + len_bytes)?;
            let start = p + len_bytes + 1;
            (Head::Ext(ty, take(buf, start, len)?), start + len)
        }
        0xca => (Head::F32(f32::from_bits(fixed(4)? as u32)), p + 4),
        0xcb => (Head::F64(f64::from_bits(fixed(8)?)), p + 8),
        0xcc..=0xcf => {
            let n = 1 << (marker - 0xcc);
            (Head::Uint(fixed(n)?), p + n)
        }
        0xd0 => (Head::Int(i64::from(fixed(1)? as u8 as i8)), p + 1),
        0xd1 => (Head::Int(i64::from(fixed(2)? as u16 as i16)), p + 2),
        0xd2 => (Head::Int(i64::from(fixed(4)? as u32 as i32)), p + 4),
        0xd3 => (Head::Int(fixed(8)? as i64), p + 8),
        0xd4..=0xd8 => {
            let len = 1 << (marker - 0xd4);
            let ty = fixed_i8(buf, p)?;
            (Head::Ext(ty, take(buf, p + 1, len)?), p + 1 + len)
        }
        0xd9..=0xdb => {
            let (data, end) = sized(1 << (marker - 0xd9))?;
            (Head::Str(data), end)
        }
        0xdc | 0xdd => {
            let w = if marker == 0xdc { 2 } else { 4 };
            (Head::Array(container(fixed(w)?, 1, p + w)?), p + w)
        }
        0xde | 0xdf => {
            let w = if marker == 0xde { 2 } else { 4 };
            (Head::Map(container(fixed(w)?, 2, p + w)?), p + w)
        }
        0xe0..=0xff => (Head::Int(i64::from(marker as i8)), p),
    })
}

fn fixed_i8(buf: &[u8], pos: usize) -> Result<i8, TranscodeError> {
    Ok(*buf.get(pos).ok_or(TranscodeError::Truncated)? as i8)
}

/// Byte length of the one complete MessagePack value at the start of `buf`;
/// lets callers step over values (keys, payloads) without decoding them.
///
/// Iterative with an explicit fixed-size stack, so hostile nesting yields
/// [`TranscodeError::TooDeep`] rather than a stack overflow.
pub fn value_len(buf: &[u8]) -> Result<usize, TranscodeError> {
    value_len_within(buf, 0)
}

/// [`value_len`] for a value already inside `open` containers: the value
/// may nest only `MAX_DEPTH - open` more levels.
fn value_len_within(buf: &[u8], open: usize) -> Result<usize, TranscodeError> {
    // Elements still to skip in each open container.
    let mut stack = [0usize; MAX_DEPTH];
    let mut depth = open.min(MAX_DEPTH);
    let floor = depth;
    let mut pos = 0;
    loop {
        let (head, next) = read_head(buf, pos)?;
        pos = next;
        let children = match head {
            Head::Array(n) => Some(n),
            Head::Map(n) => Some(n * 2),
            _ => None,
        };
        if let Some(n) = children {
            if depth >= MAX_DEPTH {
                return Err(TranscodeError::TooDeep);
            }
            if n > 0 {
                stack[depth] = n;
                depth += 1;
                continue;
            }
        }
        // One value finished: count it against the enclosing containers.
        loop {
            if depth == floor {
                return Ok(pos);
            }
            stack[depth - 1] -= 1;
            if stack[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

/// What a subscription with `fields` receives of `payload`: the top-level
/// keys `keep` accepts, written to `scratch`, or `payload` whole when it is
/// not a map (or does not parse), as docs/PROTOCOL.md ("`fields`") says.
pub fn fields_of<'a>(payload: &'a [u8], keep: &dyn Fn(&str) -> bool, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    scratch.clear();
    match trim_map_fields(payload, keep, scratch) {
        Ok(true) => scratch,
        Ok(false) | Err(_) => payload,
    }
}

/// Implements `fields` (docs/PROTOCOL.md, "`fields`"): writes to `out` the
/// map `payload` restricted to string keys accepted by `keep`, copying each
/// kept key and value byte for byte and using the smallest map header for the
/// new count.
///
/// Returns `Ok(false)` and writes nothing when `payload` is not a map (the
/// caller then sends it whole). Entries with non-string keys (or keys that
/// are not valid UTF-8) are dropped. Bytes after the map are ignored. On
/// error `out` is left as it was.
pub fn trim_map_fields(payload: &[u8], keep: &dyn Fn(&str) -> bool, out: &mut Vec<u8>) -> Result<bool, TranscodeError> {
    if !matches!(payload.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Ok(false);
    }
    let start = out.len();
    let result = trim_into(payload, keep, out, start);
    if result.is_err() {
        out.truncate(start);
    }
    result.map(|()| true)
}

fn trim_into(
    payload: &[u8],
    keep: &dyn Fn(&str) -> bool,
    out: &mut Vec<u8>,
    start: usize,
) -> Result<(), TranscodeError> {
    let (Head::Map(entries), mut pos) = read_head(payload, 0)? else {
        return Err(TranscodeError::Invalid("expected a map"));
    };
    // Reserve room for the largest header (map32) and close the gap later,
    // so the kept entries are copied only once and nothing else is allocated.
    out.extend_from_slice(&[0; 5]);
    let mut kept: u32 = 0;
    for _ in 0..entries {
        let key_start = pos;
        let key_end = key_start + value_len(&payload[key_start..])?;
        let value_end = key_end + value_len(&payload[key_end..])?;
        pos = value_end;
        if let (Head::Str(name), _) = read_head(payload, key_start)? {
            if std::str::from_utf8(name).is_ok_and(keep) {
                out.extend_from_slice(&payload[key_start..value_end]);
                kept += 1;
            }
        }
    }
    set_container_header(out, start, 5, Container::Map, kept);
    Ok(())
}

/// A MessagePack container family, for [`set_container_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Container {
    /// fixarray / array16 / array32.
    Array,
    /// fixmap / map16 / map32.
    Map,
}

/// Replaces the `old_len`-byte container header at `out[start..]` with the
/// smallest header for `count` elements, moving what follows when the
/// sizes differ. Lets writers that learn a count only at the end reserve
/// room first (5 bytes: the largest header) and copy the elements once.
pub(crate) fn set_container_header(out: &mut Vec<u8>, start: usize, old_len: usize, kind: Container, count: u32) {
    let (fix, x16, x32) = match kind {
        Container::Array => (0x90, 0xdc, 0xdd),
        Container::Map => (0x80, 0xde, 0xdf),
    };
    let mut header = [0u8; 5];
    let len = if count <= 15 {
        header[0] = fix | count as u8;
        1
    } else if let Ok(n) = u16::try_from(count) {
        header[0] = x16;
        header[1..3].copy_from_slice(&n.to_be_bytes());
        3
    } else {
        header[0] = x32;
        header[1..5].copy_from_slice(&count.to_be_bytes());
        5
    };
    let end = out.len();
    if len != old_len {
        if len > old_len {
            out.resize(end + (len - old_len), 0);
        }
        out.copy_within(start + old_len..end, start + len);
        out.truncate(end + len - old_len);
    }
    out[start..start + len].copy_from_slice(&header[..len]);
}

/// Most JSON bytes [`msgpack_to_json`] writes per MessagePack byte it reads.
///
/// The worst value is a `fixext1` (3 bytes): `{"$ext":-128,"base64":"AA=="}`
/// and the comma after it, 30 bytes. Everything else writes less per byte:
/// a one-byte key becomes at most `"$array":` (9 bytes), a one-byte value at
/// most `false,` (6), a control character in a string `\u0001` (6), binary
/// 4 base64 bytes per 3, and numbers at most 21 characters for 9 bytes. A
/// container's brackets take the place of its header byte and of its last
/// element's comma.
pub const JSON_BYTES_PER_MSGPACK_BYTE: usize = 10;

/// Upper bound on the JSON text [`msgpack_to_json`] writes for a value of
/// `msgpack_len` bytes: linear, whatever the input (the fuzz oracle).
pub fn json_len_bound(msgpack_len: usize) -> usize {
    msgpack_len.saturating_mul(JSON_BYTES_PER_MSGPACK_BYTE)
}

/// Transcodes the one MessagePack value at the start of `buf` into JSON text
/// appended to `out`, for `switchyard.v1.json` connections; returns the
/// number of input bytes consumed.
///
/// Rules (docs/PROTOCOL.md, "JSON clients and MessagePack payloads"): binary
/// becomes a standard padded base64 string; extensions become
/// `{"$ext":<type>,"base64":"<data>"}`; NaN and infinities become `null`;
/// floats are printed in their shortest round-tripping form and always as
/// floats (`1.0`, `1e300`), float32 from the f32's own shortest form (`0.1`);
/// invalid UTF-8 in a string becomes U+FFFD. A non-string map key becomes a
/// string: integer and float keys their decimal text (`"12"`, `"-1"`,
/// `"1.5"`; `"null"` for NaN/infinite float keys), `true`/`false`/`null` keys
/// those words, a binary key its base64, and an array, map or extension key
/// the fixed string `"$array"`, `"$map"` or `"$ext"` (never its contents, so
/// the output stays within [`json_len_bound`]). Keys that become equal
/// strings are all written, in order. On error `out` is left as it was.
pub fn msgpack_to_json(buf: &[u8], out: &mut Vec<u8>) -> Result<usize, TranscodeError> {
    let start = out.len();
    let result = to_json(buf, 0, out, 0);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Transcodes `entries` map entries at the start of `buf` (a map's body,
/// after its header) into JSON `"key":value` pairs separated by commas,
/// without braces, by the rules of [`msgpack_to_json`] for a map's entries;
/// returns the input bytes consumed. Lets a caller splice a map's entries
/// into an object it writes itself (the edge's event frames). On error `out`
/// is left as it was.
pub fn map_entries_to_json(entries: u32, buf: &[u8], out: &mut Vec<u8>) -> Result<usize, TranscodeError> {
    let start = out.len();
    let mut pos = 0;
    for i in 0..entries {
        if i > 0 {
            out.push(b',');
        }
        let r = key_to_json(buf, pos, out, 1).and_then(|p| {
            out.push(b':');
            to_json(buf, p, out, 1)
        });
        match r {
            Ok(p) => pos = p,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    Ok(pos)
}

/// Appends formatted text; writing into a `Vec<u8>` cannot fail.
fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
}

/// Shortest round-tripping float text (`Debug` keeps `1.0` a float and
/// switches to exponent form for very large or small magnitudes).
fn push_f64(f: f64, out: &mut Vec<u8>) {
    if f.is_finite() {
        push_fmt(out, format_args!("{f:?}"));
    } else {
        out.extend_from_slice(b"null");
    }
}

fn push_f32(f: f32, out: &mut Vec<u8>) {
    if f.is_finite() {
        push_fmt(out, format_args!("{f:?}"));
    } else {
        out.extend_from_slice(b"null");
    }
}

/// `data` as a quoted standard padded base64 string (no escaping needed).
fn push_base64_string(data: &[u8], out: &mut Vec<u8>) -> Result<(), TranscodeError> {
    let len = base64::encoded_len(data.len(), true).ok_or(TranscodeError::Invalid("binary too large"))?;
    out.push(b'"');
    let at = out.len();
    out.resize(at + len, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(data, &mut out[at..])
        .map_err(|_| TranscodeError::Invalid("binary too large"))?;
    out.truncate(at + written);
    out.push(b'"');
    Ok(())
}

/// Writes the value at `pos` as JSON; `depth` counts enclosing containers.
fn to_json(buf: &[u8], pos: usize, out: &mut Vec<u8>, depth: usize) -> Result<usize, TranscodeError> {
    let (head, mut pos) = read_head(buf, pos)?;
    match head {
        Head::Nil => out.extend_from_slice(b"null"),
        Head::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        Head::Uint(n) => push_fmt(out, format_args!("{n}")),
        Head::Int(n) => push_fmt(out, format_args!("{n}")),
        Head::F32(f) => push_f32(f, out),
        Head::F64(f) => push_f64(f, out),
        Head::Str(s) => write_json_string(&String::from_utf8_lossy(s), out),
        Head::Bin(b) => push_base64_string(b, out)?,
        Head::Ext(ty, data) => {
            push_fmt(out, format_args!("{{\"$ext\":{ty},\"base64\":"));
            push_base64_string(data, out)?;
            out.push(b'}');
        }
        Head::Array(n) => {
            if depth >= MAX_DEPTH {
                return Err(TranscodeError::TooDeep);
            }
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                pos = to_json(buf, pos, out, depth + 1)?;
            }
            out.push(b']');
        }
        Head::Map(n) => {
            if depth >= MAX_DEPTH {
                return Err(TranscodeError::TooDeep);
            }
            out.push(b'{');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                pos = key_to_json(buf, pos, out, depth + 1)?;
                out.push(b':');
                pos = to_json(buf, pos, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(pos)
}

/// Writes the map key at `pos` as a JSON string (see [`msgpack_to_json`]).
fn key_to_json(buf: &[u8], pos: usize, out: &mut Vec<u8>, depth: usize) -> Result<usize, TranscodeError> {
    let (head, next) = read_head(buf, pos)?;
    match head {
        Head::Str(s) => write_json_string(&String::from_utf8_lossy(s), out),
        Head::Bin(b) => push_base64_string(b, out)?,
        Head::Nil => out.extend_from_slice(b"\"null\""),
        Head::Bool(b) => out.extend_from_slice(if b { b"\"true\"" } else { b"\"false\"" }),
        Head::Uint(n) => push_fmt(out, format_args!("\"{n}\"")),
        Head::Int(n) => push_fmt(out, format_args!("\"{n}\"")),
        Head::F32(f) => {
            out.push(b'"');
            push_f32(f, out);
            out.push(b'"');
        }
        Head::F64(f) => {
            out.push(b'"');
            push_f64(f, out);
            out.push(b'"');
        }
        // Never the key's contents: rendering a container key as escaped
        // JSON text doubles its quotes and backslashes at every level of
        // keys inside keys, so ~130 bytes could become gigabytes. A fixed
        // string keeps the output linear in the input; the key is skipped.
        Head::Array(_) => return skip_key(buf, pos, depth, b"\"$array\"", out),
        Head::Map(_) => return skip_key(buf, pos, depth, b"\"$map\"", out),
        Head::Ext(..) => out.extend_from_slice(b"\"$ext\""),
    }
    Ok(next)
}

/// Writes `text` for the container key at `pos` and returns the position
/// after the whole key (measured, not rendered).
/// The key sits inside `open` containers and counts against [`MAX_DEPTH`]
/// like any value.
fn skip_key(buf: &[u8], pos: usize, open: usize, text: &[u8], out: &mut Vec<u8>) -> Result<usize, TranscodeError> {
    let len = value_len_within(&buf[pos..], open)?;
    out.extend_from_slice(text);
    Ok(pos + len)
}

/// Encodes a JSON producer's `data`, given as JSON text, as MessagePack, so
/// every client format is served from one MessagePack payload
/// (docs/PROTOCOL.md, "JSON clients and MessagePack payloads").
///
/// Numbers written without fraction or exponent become MessagePack
/// integers (smallest encoding) when they fit in 64 bits, `-0` included
/// (it becomes 0); every other number is a float64. Objects become maps
/// with their keys in the order written (a repeated key is kept each time,
/// as written). Streaming: no value tree is built. Containers nested deeper
/// than [`MAX_DEPTH`] give [`TranscodeError::TooDeep`], so what this
/// accepts a MessagePack producer could have sent. On error `out` is left
/// as it was.
pub fn json_text_to_msgpack(text: &str, out: &mut Vec<u8>) -> Result<(), TranscodeError> {
    use serde::de::DeserializeSeed as _;
    let start = out.len();
    let mut writer = JsonToMsgpack::new(text.as_bytes(), out);
    let mut de = serde_json::Deserializer::from_str(text);
    let result = (&mut writer).deserialize(&mut de).and_then(|()| de.end());
    let too_deep = writer.too_deep;
    result.map_err(|e| {
        out.truncate(start);
        json_error(e, too_deep)
    })
}

/// Converts each member of the JSON object `text` to MessagePack by the
/// rules of [`json_text_to_msgpack`] (each value's depth counted from the
/// value), calling `member(key, value)` in the order written. `value` is a
/// scratch buffer the callback may keep (`std::mem::take`); it is cleared
/// before the next member. Lets a JSON producer event be read in one pass
/// with its `data` converted exactly (the reason for streaming: a parsed
/// `serde_json::Value` has lost how numbers were written).
pub fn json_members_to_msgpack(text: &[u8], member: &mut dyn FnMut(&str, &mut Vec<u8>)) -> Result<(), TranscodeError> {
    let mut scratch = Vec::new();
    let mut writer = JsonToMsgpack::new(text, &mut scratch);
    let mut de = serde_json::Deserializer::from_slice(text);
    let result = serde::Deserializer::deserialize_map(
        &mut de,
        Members {
            writer: &mut writer,
            member,
        },
    )
    .and_then(|()| de.end());
    let too_deep = writer.too_deep;
    result.map_err(|e| json_error(e, too_deep))
}

fn json_error(e: serde_json::Error, too_deep: bool) -> TranscodeError {
    if too_deep {
        TranscodeError::TooDeep
    } else {
        TranscodeError::Json(e)
    }
}

/// The visitor of [`json_members_to_msgpack`]: one object, each member's
/// value written by the shared [`JsonToMsgpack`].
struct Members<'w, 'o, 't, 'm> {
    writer: &'w mut JsonToMsgpack<'o, 't>,
    member: &'m mut dyn FnMut(&str, &mut Vec<u8>),
}

impl<'de> serde::de::Visitor<'de> for Members<'_, '_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'_, str>>()? {
            self.writer.out.clear();
            map.next_value_seed(&mut *self.writer)?;
            (self.member)(&key, self.writer.out);
        }
        Ok(())
    }
}

/// The number tokens of a JSON text, in order: serde_json reports `-0` and
/// `-0.0` alike (as the float −0.0), so whether a number was written as an
/// integer is read from the text itself. The text is the one the parser
/// reads, and the parser reports numbers in text order, so the n-th number
/// reported is the n-th token here.
struct NumberTokens<'t> {
    text: &'t [u8],
    pos: usize,
}

impl NumberTokens<'_> {
    /// Steps to the end of the next number token; whether it was written
    /// without fraction or exponent. Outside strings, only numbers contain
    /// `-` or digits.
    fn next_is_integer(&mut self) -> bool {
        let t = self.text;
        let mut i = self.pos;
        while i < t.len() {
            match t[i] {
                b'"' => {
                    i += 1;
                    while i < t.len() {
                        match t[i] {
                            b'\\' => i += 2,
                            b'"' => {
                                i += 1;
                                break;
                            }
                            _ => i += 1,
                        }
                    }
                }
                b'-' | b'0'..=b'9' => {
                    let start = i;
                    while i < t.len() && matches!(t[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                        i += 1;
                    }
                    self.pos = i;
                    return !t[start..i].iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
                }
                _ => i += 1,
            }
        }
        self.pos = i;
        false
    }
}

/// The serde visitor behind [`json_text_to_msgpack`]: writes each value as
/// MessagePack as the parser reports it.
struct JsonToMsgpack<'o, 't> {
    out: &'o mut Vec<u8>,
    numbers: NumberTokens<'t>,
    /// Containers open around the value being read.
    depth: usize,
    /// Set when the error being returned is nesting past [`MAX_DEPTH`].
    too_deep: bool,
}

impl<'o, 't> JsonToMsgpack<'o, 't> {
    fn new(text: &'t [u8], out: &'o mut Vec<u8>) -> JsonToMsgpack<'o, 't> {
        JsonToMsgpack {
            out,
            numbers: NumberTokens { text, pos: 0 },
            depth: 0,
            too_deep: false,
        }
    }

    /// Opens a container: checks the depth and reserves its header.
    fn open<E: serde::de::Error>(&mut self) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            self.too_deep = true;
            return Err(E::custom(format_args!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.depth += 1;
        let at = self.out.len();
        self.out.extend_from_slice(&[0; 5]);
        Ok(at)
    }

    /// Closes a container opened at `at` with `count` elements.
    fn close<E: serde::de::Error>(&mut self, at: usize, kind: Container, count: usize) -> Result<(), E> {
        self.depth -= 1;
        let count = u32::try_from(count).map_err(|_| E::custom("more than 2^32 elements"))?;
        set_container_header(self.out, at, 5, kind, count);
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut JsonToMsgpack<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

// Writes into a Vec<u8> cannot fail, so the encoders' results are ignored.
impl<'de> serde::de::Visitor<'de> for &mut JsonToMsgpack<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        let _ = rmp::encode::write_nil(self.out);
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        let _ = rmp::encode::write_bool(self.out, b);
        Ok(())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.numbers.next_is_integer();
        let _ = rmp::encode::write_uint(self.out, n);
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.numbers.next_is_integer();
        let _ = rmp::encode::write_sint(self.out, n);
        Ok(())
    }

    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        // An integer-form number reaches here beyond 64 bits (a float by
        // the rule) or as `-0`, which is the integer 0.
        if self.numbers.next_is_integer() && f == 0.0 {
            let _ = rmp::encode::write_uint(self.out, 0);
        } else {
            let _ = rmp::encode::write_f64(self.out, f);
        }
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        let _ = rmp::encode::write_str(self.out, s);
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let at = self.open()?;
        let mut n = 0;
        while seq.next_element_seed(&mut *self)?.is_some() {
            n += 1;
        }
        self.close(at, Container::Array, n)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let at = self.open()?;
        let mut n = 0;
        // JSON keys are strings: the same writer turns them into MessagePack strings.
        while map.next_key_seed(&mut *self)?.is_some() {
            map.next_value_seed(&mut *self)?;
            n += 1;
        }
        self.close(at, Container::Map, n)
    }
}

/// Encodes a parsed JSON value as MessagePack, for tests, tools and
/// producers that already hold a `serde_json::Value`.
///
/// Integers that serde_json holds as `u64`/`i64` get the smallest integer
/// encoding; every other number is a float64; objects become maps with
/// string keys. A parsed value has lost what [`json_text_to_msgpack`] reads
/// from the text (`-0` arrives as the float −0.0, object keys sorted), so
/// producer events go through that function instead. Recursive: nesting is
/// bounded by serde_json's parser (128 levels).
pub fn json_to_msgpack(value: &serde_json::Value, out: &mut Vec<u8>) {
    use rmp::encode;
    use serde_json::Value;
    // Writes into a Vec<u8> cannot fail, so the results are ignored; lengths
    // cannot exceed u32 because such a value would not fit in memory.
    match value {
        Value::Null => {
            let _ = encode::write_nil(out);
        }
        Value::Bool(b) => {
            let _ = encode::write_bool(out, *b);
        }
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                let _ = encode::write_uint(out, u);
            } else if let Some(i) = n.as_i64() {
                let _ = encode::write_sint(out, i);
            } else {
                let _ = encode::write_f64(out, n.as_f64().unwrap_or(f64::NAN));
            }
        }
        Value::String(s) => {
            let _ = encode::write_str(out, s);
        }
        Value::Array(items) => {
            let _ = encode::write_array_len(out, items.len() as u32);
            for item in items {
                json_to_msgpack(item, out);
            }
        }
        Value::Object(map) => {
            let _ = encode::write_map_len(out, map.len() as u32);
            for (k, v) in map {
                let _ = encode::write_str(out, k);
                json_to_msgpack(v, out);
            }
        }
    }
}

/// Appends `s` as a quoted JSON string (quote, backslash and control
/// characters escaped); shared by every module that writes JSON frames.
pub fn write_json_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(short);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as Mp;
    use serde_json::json;

    fn enc(v: &Mp) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn to_json_string(buf: &[u8]) -> String {
        let mut out = Vec::new();
        let used = msgpack_to_json(buf, &mut out).unwrap();
        assert_eq!(used, buf.len());
        String::from_utf8(out).unwrap()
    }

    fn to_mp(v: &serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        json_to_msgpack(v, &mut out);
        out
    }

    #[test]
    fn value_len_each_family() {
        let cases: &[&[u8]] = &[
            &[0xc0],
            &[0xc3],
            &[0x7f],
            &[0xe0],
            &[0xcc, 1],
            &[0xcd, 1, 2],
            &[0xd2, 1, 2, 3, 4],
            &[0xcf, 1, 2, 3, 4, 5, 6, 7, 8],
            &[0xca, 0, 0, 0, 0],
            &[0xcb, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xa2, b'h', b'i'],
            &[0xd9, 1, b'x'],
            &[0xda, 0, 1, b'x'],
            &[0xdb, 0, 0, 0, 1, b'x'],
            &[0xc4, 2, 9, 9],
            &[0xc5, 0, 1, 9],
            &[0xc6, 0, 0, 0, 1, 9],
            &[0x92, 0x01, 0xa1, b'a'],
            &[0xdc, 0, 2, 0x90, 0x80],
            &[0xdd, 0, 0, 0, 1, 0xc0],
            &[0x81, 0xa1, b'k', 0x91, 0x05],
            &[0xde, 0, 1, 0x01, 0x02],
            &[0xdf, 0, 0, 0, 1, 0x01, 0x80],
            &[0xd4, 1, 0xaa],
            &[0xd5, 1, 0, 0],
            &[0xd6, 1, 0, 0, 0, 0],
            &[0xd7, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xd8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xc7, 1, 5, 0],
            &[0xc8, 0, 1, 5, 0],
            &[0xc9, 0, 0, 0, 1, 5, 0],
        ];
        for case in cases {
            assert_eq!(value_len(case), Ok(case.len()), "{case:02x?}");
            let mut padded = case.to_vec();
            padded.extend_from_slice(&[0xc0, 0xc0]);
            assert_eq!(value_len(&padded), Ok(case.len()), "{case:02x?}");
            for cut in 0..case.len() {
                assert_eq!(
                    value_len(&case[..cut]),
                    Err(TranscodeError::Truncated),
                    "{case:02x?} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn value_len_hostile_input() {
        assert_eq!(value_len(&[0xc1]), Err(TranscodeError::Invalid("reserved marker 0xc1")));
        assert_eq!(
            value_len(&[0xdb, 0xff, 0xff, 0xff, 0xff]),
            Err(TranscodeError::Truncated)
        );
        assert_eq!(
            value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]),
            Err(TranscodeError::Truncated)
        );
        assert_eq!(
            value_len(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0]),
            Err(TranscodeError::Truncated)
        );
        assert_eq!(
            value_len(&[0xc9, 0xff, 0xff, 0xff, 0xff, 1]),
            Err(TranscodeError::Truncated)
        );
        let deep = vec![0x91u8; 100_000];
        assert_eq!(value_len(&deep), Err(TranscodeError::TooDeep));
        let mut out = Vec::new();
        assert_eq!(msgpack_to_json(&deep, &mut out), Err(TranscodeError::TooDeep));
        assert!(out.is_empty());
        // Exactly MAX_DEPTH nested containers are fine; one more is not.
        let mut ok = vec![0x91u8; MAX_DEPTH - 1];
        ok.push(0x90);
        assert_eq!(value_len(&ok), Ok(MAX_DEPTH));
        assert!(msgpack_to_json(&ok, &mut out).is_ok());
        let mut too_deep = vec![0x91u8; MAX_DEPTH];
        too_deep.push(0x90);
        assert_eq!(value_len(&too_deep), Err(TranscodeError::TooDeep));
    }

    #[test]
    fn trim_keeps_selected_string_keys() {
        let payload = enc(&Mp::Map(vec![
            (Mp::from("a"), Mp::from(1)),
            (Mp::from("b"), Mp::Array(vec![Mp::from("x"), Mp::from(2.5)])),
            (Mp::from("c"), Mp::Nil),
            (Mp::from(7), Mp::from("int key")),
        ]));
        let mut out = vec![0xee];
        let keep = |k: &str| k == "a" || k == "c" || k == "7";
        assert_eq!(trim_map_fields(&payload, &keep, &mut out), Ok(true));
        let expected = enc(&Mp::Map(vec![(Mp::from("a"), Mp::from(1)), (Mp::from("c"), Mp::Nil)]));
        assert_eq!(out[0], 0xee);
        assert_eq!(&out[1..], &expected[..]);
    }

    #[test]
    fn trim_uses_smallest_header() {
        let entries = (0..20).map(|i| (Mp::from(format!("k{i}")), Mp::from(i))).collect();
        let payload = enc(&Mp::Map(entries));
        assert_eq!(payload[0], 0xde);
        let mut out = Vec::new();
        assert_eq!(trim_map_fields(&payload, &|k| k != "k3", &mut out), Ok(true));
        let expected: Vec<_> = (0..20)
            .filter(|&i| i != 3)
            .map(|i| (Mp::from(format!("k{i}")), Mp::from(i)))
            .collect();
        assert_eq!(out, enc(&Mp::Map(expected)));
        out.clear();
        assert_eq!(trim_map_fields(&payload, &|k| k.len() == 2, &mut out), Ok(true));
        assert_eq!(out[0], 0x8a);
        assert_eq!(value_len(&out), Ok(out.len()));
    }

    #[test]
    fn trim_non_map_and_errors() {
        let mut out = Vec::new();
        for payload in [&[0x91, 0x01][..], &[0xa1, b'a'], &[], &[0xc1]] {
            assert_eq!(trim_map_fields(payload, &|_| true, &mut out), Ok(false));
            assert!(out.is_empty());
        }
        let truncated = [0x82, 0xa1, b'a', 0x01, 0xa1];
        assert_eq!(
            trim_map_fields(&truncated, &|_| true, &mut out),
            Err(TranscodeError::Truncated)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn json_of_nested_map_with_bin_and_odd_keys() {
        let v = Mp::Map(vec![
            (
                Mp::from("m"),
                Mp::Map(vec![
                    (Mp::from("bin"), Mp::Binary(vec![0, 1, 2, 0xff])),
                    (Mp::from("n"), Mp::from(-5)),
                ]),
            ),
            (Mp::from(42), Mp::from("int key")),
            (Mp::from(-3), Mp::from(1)),
            (Mp::Boolean(true), Mp::Boolean(false)),
            (Mp::Nil, Mp::Nil),
            (Mp::F64(1.5), Mp::from(2)),
            (Mp::Binary(b"hi".to_vec()), Mp::from(3)),
            (Mp::Array(vec![Mp::from(1), Mp::from("a")]), Mp::from(4)),
        ]);
        assert_eq!(
            to_json_string(&enc(&v)),
            r#"{"m":{"bin":"AAEC/w==","n":-5},"42":"int key","-3":1,"true":false,"null":null,"1.5":2,"aGk=":3,"$array":4}"#
        );
    }

    #[test]
    fn key_rules_give_fixed_strings_for_containers_and_keep_equal_keys() {
        let v = Mp::Map(vec![
            (Mp::Map(vec![(Mp::from("x"), Mp::from(1))]), Mp::from(1)),
            (Mp::Array(vec![Mp::from("y")]), Mp::from(2)),
            (Mp::Ext(7, vec![1, 2]), Mp::from(3)),
            (Mp::Map(vec![]), Mp::from(4)),
            (Mp::F32(0.5), Mp::from(5)),
            (Mp::F64(f64::NAN), Mp::from(6)),
            (Mp::Boolean(false), Mp::from(7)),
            (Mp::from(u64::MAX), Mp::from(8)),
            (Mp::from("7"), Mp::from(9)),
            (Mp::from(7), Mp::from(10)),
        ]);
        assert_eq!(
            to_json_string(&enc(&v)),
            r#"{"$map":1,"$array":2,"$ext":3,"$map":4,"0.5":5,"null":6,"false":7,"18446744073709551615":8,"7":9,"7":10}"#
        );
    }

    /// Maps keyed by maps, `depth` deep: `{{{…{}: nil}: nil}: nil}`, 2 bytes a level.
    fn keys_in_keys(depth: usize) -> Vec<u8> {
        let mut buf = vec![0x81; depth];
        buf.push(0x80);
        buf.resize(2 * depth + 1, 0xc0);
        buf
    }

    #[test]
    fn keys_inside_keys_stay_linear() {
        // Rendering container keys as escaped JSON doubled the output per
        // level: depth 20 gave megabytes, the issue's ~130 bytes at depth
        // 60 gave more than memory. Now each is 13 bytes of JSON.
        for depth in [20, 30, 45, 60, MAX_DEPTH - 1] {
            let buf = keys_in_keys(depth);
            let mut out = Vec::new();
            assert_eq!(msgpack_to_json(&buf, &mut out), Ok(buf.len()), "depth {depth}");
            assert!(out.len() <= 2 * buf.len(), "depth {depth}: {} bytes", out.len());
            assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"$map":null}"#);
        }
        // Maps keyed by arrays of maps keyed by arrays…, 63 levels, with
        // a long string value at the bottom: ~130 bytes.
        let mut buf: Vec<u8> = [0x81, 0x91].repeat(31);
        let maps = 31;
        buf.extend_from_slice(&[0x81, 0xa0, 0xbf]);
        buf.extend_from_slice(&[b'x'; 31]);
        buf.resize(buf.len() + maps, 0xc0);
        let mut out = Vec::new();
        assert_eq!(msgpack_to_json(&buf, &mut out), Ok(buf.len()));
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"$array":null}"#);
        out.clear();
        // Keys count against the depth limit like values: a key whose own
        // nesting takes the total past MAX_DEPTH is refused, as at ingest.
        let mut deep_key = vec![0x81u8];
        deep_key.extend_from_slice(&keys_in_keys(MAX_DEPTH - 1));
        deep_key.push(0xc0);
        assert_eq!(value_len(&deep_key), Err(TranscodeError::TooDeep));
        assert_eq!(msgpack_to_json(&deep_key, &mut out), Err(TranscodeError::TooDeep));
    }

    #[test]
    fn json_len_bound_holds_and_is_reached_by_fixext1() {
        // The worst value per byte: fixext1, 3 bytes for 30 of JSON with its comma.
        let items: Vec<Mp> = (0..1000).map(|_| Mp::Ext(-128, vec![0])).collect();
        let buf = enc(&Mp::Array(items));
        let json = to_json_string(&buf);
        assert!(json.len() <= json_len_bound(buf.len()));
        assert!(json.len() * 10 >= json_len_bound(buf.len()) * 9, "the bound is tight");
        // Other dense shapes stay under it too.
        let shapes = [
            Mp::Map((0..500).map(|_| (Mp::Array(vec![]), Mp::Boolean(false))).collect()),
            Mp::Map((0..500).map(|_| (Mp::Boolean(false), Mp::Boolean(false))).collect()),
            Mp::Array((0..500).map(|_| Mp::from("\u{1}".repeat(31))).collect()),
            Mp::Map((0..500).map(|_| (Mp::Array(vec![]), Mp::Ext(1, vec![0]))).collect()),
            Mp::Array((0..500).map(|_| Mp::from(i64::MIN)).collect()),
            Mp::Array((0..500).map(|_| Mp::F32(-1.1754944e-38)).collect()),
        ];
        for v in shapes {
            let buf = enc(&v);
            let json = to_json_string(&buf);
            assert!(
                json.len() <= json_len_bound(buf.len()),
                "{} > bound for {}",
                json.len(),
                buf.len()
            );
        }
    }

    fn text_to_mp(text: &str) -> Result<Vec<u8>, TranscodeError> {
        let mut out = vec![0xee];
        json_text_to_msgpack(text, &mut out)
            .map(|()| out[1..].to_vec())
            .inspect_err(|_| {
                assert_eq!(out, [0xee], "left as it was");
            })
    }

    fn f64_mp(f: f64) -> Vec<u8> {
        let mut v = vec![0xcb];
        v.extend_from_slice(&f.to_bits().to_be_bytes());
        v
    }

    #[test]
    fn json_text_numbers_follow_how_they_were_written() {
        assert_eq!(text_to_mp("-0"), Ok(vec![0x00]), "-0 is the integer 0");
        assert_eq!(text_to_mp("0"), Ok(vec![0x00]));
        assert_eq!(text_to_mp("-0.0"), Ok(f64_mp(-0.0)));
        assert_eq!(text_to_mp("-0e0"), Ok(f64_mp(-0.0)));
        assert_eq!(text_to_mp("-1e-400"), Ok(f64_mp(-0.0)), "underflow is still a float");
        assert_eq!(text_to_mp("1e3"), Ok(f64_mp(1000.0)));
        assert_eq!(text_to_mp("-1"), Ok(vec![0xff]));
        assert_eq!(text_to_mp("300"), Ok(vec![0xcd, 0x01, 0x2c]));
        assert_eq!(
            text_to_mp("18446744073709551615"),
            Ok(vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        );
        assert_eq!(text_to_mp("18446744073709551616"), Ok(f64_mp(18446744073709551616.0)));
        assert_eq!(text_to_mp("-9223372036854775809"), Ok(f64_mp(-9223372036854775809.0)));
        // Numbers and number-like text inside strings and keys do not shift
        // the token count: each -0 below is still found as written.
        let text = r#"{"k-0\"1.5":-0, "s":"-0.5 \\\" 3e4", "a":[-0, -0.0, -1e-400, 2, -0]}"#;
        let expected = enc(&Mp::Map(vec![
            (Mp::from("k-0\"1.5"), Mp::from(0)),
            (Mp::from("s"), Mp::from("-0.5 \\\" 3e4")),
            (
                Mp::from("a"),
                Mp::Array(vec![
                    Mp::from(0),
                    Mp::F64(-0.0),
                    Mp::F64(-0.0),
                    Mp::from(2),
                    Mp::from(0),
                ]),
            ),
        ]));
        assert_eq!(text_to_mp(text), Ok(expected));
    }

    #[test]
    fn json_text_keeps_key_order_and_limits_depth() {
        let expected = enc(&Mp::Map(vec![
            (Mp::from("z"), Mp::from(1)),
            (Mp::from("a"), Mp::Nil),
            (Mp::from("z"), Mp::Boolean(true)),
        ]));
        assert_eq!(text_to_mp(r#" {"z":1,"a":null,"z":true} "#), Ok(expected));
        let items: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        let big = format!("[{}]", items.join(","));
        let mp = text_to_mp(&big).unwrap();
        assert_eq!(mp[..3], [0xdc, 0, 20], "smallest header for 20 elements");
        assert_eq!(value_len(&mp), Ok(mp.len()));
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let ok = text_to_mp(&nested(MAX_DEPTH)).unwrap();
        assert_eq!(value_len(&ok), Ok(MAX_DEPTH));
        assert_eq!(text_to_mp(&nested(MAX_DEPTH + 1)), Err(TranscodeError::TooDeep));
        assert_eq!(
            text_to_mp(&format!(
                "{}1{}",
                r#"{"a":"#.repeat(MAX_DEPTH + 1),
                "}".repeat(MAX_DEPTH + 1)
            )),
            Err(TranscodeError::TooDeep)
        );
        assert_eq!(text_to_mp(&nested(10_000)), Err(TranscodeError::TooDeep));
        for bad in ["", "[1,", "{1:2}", "[1] 2", "nul", "\"\\ud800\""] {
            assert!(matches!(text_to_mp(bad), Err(TranscodeError::Json(_))), "{bad:?}");
        }
    }

    #[test]
    fn json_of_scalars() {
        let cases: Vec<(Mp, &str)> = vec![
            (Mp::Ext(5, vec![1, 2, 3]), r#"{"$ext":5,"base64":"AQID"}"#),
            (Mp::Ext(-1, vec![0; 4]), r#"{"$ext":-1,"base64":"AAAAAA=="}"#),
            (Mp::F64(f64::NAN), "null"),
            (Mp::F64(f64::INFINITY), "null"),
            (Mp::F32(f32::NEG_INFINITY), "null"),
            (Mp::F64(1.0), "1.0"),
            (Mp::F64(-0.0), "-0.0"),
            (Mp::F64(1e300), "1e300"),
            (Mp::F32(0.1), "0.1"),
            (Mp::from(-1), "-1"),
            (Mp::from(-200), "-200"),
            (Mp::from(i64::MIN), "-9223372036854775808"),
            (Mp::from(u64::MAX), "18446744073709551615"),
            (Mp::from("é☃\u{1F600}"), "\"é☃\u{1F600}\""),
            (
                Mp::from("q\"b\\n\n\t\r\u{8}\u{c}\u{1}\u{1f}"),
                r#""q\"b\\n\n\t\r\b\f\u0001\u001f""#,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(to_json_string(&enc(&v)), want, "{v:?}");
        }
        // Invalid UTF-8 in a str is replaced, and only the first value is read.
        let mut out = Vec::new();
        assert_eq!(msgpack_to_json(&[0xa3, b'a', 0xff, b'b', 0xc0], &mut out), Ok(4));
        assert_eq!(String::from_utf8(out).unwrap(), "\"a\u{FFFD}b\"");
    }

    #[test]
    fn json_to_msgpack_numbers_and_nesting() {
        assert_eq!(to_mp(&json!(1)), [0x01]);
        assert_eq!(to_mp(&json!(-1)), [0xff]);
        assert_eq!(to_mp(&json!(300)), [0xcd, 0x01, 0x2c]);
        let mut f = vec![0xcb];
        f.extend_from_slice(&1.5f64.to_bits().to_be_bytes());
        assert_eq!(to_mp(&json!(1.5)), f);
        let parsed: serde_json::Value = serde_json::from_str("1e3").unwrap();
        let mut f = vec![0xcb];
        f.extend_from_slice(&1000f64.to_bits().to_be_bytes());
        assert_eq!(to_mp(&parsed), f);
        let parsed: serde_json::Value = serde_json::from_str("18446744073709551616").unwrap();
        let mut f = vec![0xcb];
        f.extend_from_slice(&18446744073709551616f64.to_bits().to_be_bytes());
        assert_eq!(to_mp(&parsed), f);
        assert_eq!(
            to_mp(&json!(u64::MAX)),
            [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        let nested = json!({"a": {"b": [null, true, "s"]}});
        let expected = enc(&Mp::Map(vec![(
            Mp::from("a"),
            Mp::Map(vec![(
                Mp::from("b"),
                Mp::Array(vec![Mp::Nil, Mp::Boolean(true), Mp::from("s")]),
            )]),
        )]));
        assert_eq!(to_mp(&nested), expected);
    }

    #[test]
    fn json_round_trip() {
        let v = json!({
            "symbol": "AAPL", "confidence": 0.8, "count": 3, "neg": -7, "big": u64::MAX,
            "flag": false, "none": null, "tags": ["a", "b\n\"c\""], "inner": {"x": 1.0, "y": []}
        });
        let back: serde_json::Value = serde_json::from_str(&to_json_string(&to_mp(&v))).unwrap();
        assert_eq!(back, v);
    }
}
