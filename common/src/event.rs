//! Producer events: the payload producers publish on `<prefix>.events.<type>[.<key>]`.
//!
//! A MessagePack event is walked at the byte level so its `data` can be kept
//! as a zero-copy slice of the NATS payload and passed to clients byte for
//! byte; only the small control fields are decoded. A JSON event (header
//! `Content-Type: application/json`) has its `data` converted to MessagePack
//! once, here. Anything malformed is an [`EventError`], never a panic.

use bytes::Bytes;
use rmpv::Value;

use crate::ids;
use crate::transcode;
use crate::value::{as_number, get, MAX_DEPTH};

/// Most users one `users` target may list.
pub const MAX_TARGET_USERS: usize = 10_000;
/// Longest producer `id` and `key`, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Delivery priority; decides what a slow connection drops first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Prio {
    /// Dropped first.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Never dropped for a slow consumer.
    High,
    /// Never dropped, never rate limited, never conflated.
    Critical,
}

impl Prio {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Prio::Low => "low",
            Prio::Normal => "normal",
            Prio::High => "high",
            Prio::Critical => "critical",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Prio> {
        Some(match s {
            "low" => Prio::Low,
            "normal" => Prio::Normal,
            "high" => Prio::High,
            "critical" => Prio::Critical,
            _ => return None,
        })
    }
}

/// Who an event is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// These users, directly.
    Users(Vec<String>),
    /// The members of a room.
    Room(String),
    /// Every user with a live connection (and, when durable, resuming users).
    All,
    /// Users whose subscriptions of `sub_type` match.
    Match {
        /// Subscription type (defaults to the event's type).
        sub_type: String,
        /// `match` dimensions.
        dimensions: Vec<(String, String)>,
        /// `values` fields.
        values: Vec<(String, f64)>,
    },
}

/// A decoded, validated producer event.
#[derive(Debug, Clone, PartialEq)]
pub struct ProducerEvent {
    /// Event type shown to clients.
    pub event_type: String,
    /// The payload as MessagePack bytes (a slice of the NATS message for MessagePack producers).
    pub data: Bytes,
    /// Producer id for deduplication.
    pub id: Option<String>,
    /// Who gets it.
    pub target: Target,
    /// Priority.
    pub prio: Prio,
    /// Conflation key.
    pub key: Option<String>,
    /// Kept in the delivery log (default) or live only.
    pub durable: bool,
}

/// Why a producer event was dropped.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The payload did not decode.
    #[error("undecodable event: {0}")]
    Decode(#[source] DecodeProblem),
    /// The subject is not `<prefix>.events.<type>[.<key>]` with a valid type.
    #[error("bad subject: {0}")]
    Subject(String),
    /// No valid `target`.
    #[error("bad target: {0}")]
    Target(String),
    /// Some other field breaks the rules.
    #[error("bad field: {0}")]
    Field(String),
    /// Maps and arrays nested deeper than [`transcode::MAX_DEPTH`] (64)
    /// levels, in `data` or elsewhere: refused at ingest so that every
    /// accepted payload can be transcoded for JSON clients.
    #[error("nested deeper than {} levels", transcode::MAX_DEPTH)]
    TooDeep,
}

/// Why an event's bytes did not decode (the source of [`EventError::Decode`]).
#[derive(Debug, thiserror::Error)]
pub enum DecodeProblem {
    /// The bytes are not shaped as an event (not a map, bytes left over...).
    #[error("{0}")]
    Shape(&'static str),
    /// A key or field value is not valid MessagePack.
    #[error("{0}")]
    MsgPack(#[source] rmpv::decode::Error),
    /// One field's value is not valid MessagePack.
    #[error("{key}: {source}")]
    Field {
        /// The field.
        key: String,
        /// The decoding error.
        #[source]
        source: rmpv::decode::Error,
    },
    /// A JSON event that is not one JSON object.
    #[error("event must be a JSON object: {0}")]
    NotJsonObject(#[source] transcode::TranscodeError),
    /// The value could not be measured or transcoded.
    #[error("{0}")]
    Transcode(#[source] transcode::TranscodeError),
}

impl EventError {
    /// A short label for the `reason` of the malformed-events counter.
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::Decode(_) => "decode",
            EventError::Subject(_) => "subject",
            EventError::Target(_) => "target",
            EventError::Field(_) => "field",
            EventError::TooDeep => "too_deep",
        }
    }
}

/// Whether a `Content-Type` header value names JSON (parameters allowed).
pub fn is_json_content_type(v: &str) -> bool {
    v.split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Parses an event published on a subject with `subject_type` and optional
/// `subject_key` tokens.
pub fn parse_event(
    subject_type: &str,
    subject_key: Option<&str>,
    payload: &Bytes,
    json: bool,
) -> Result<ProducerEvent, EventError> {
    if !ids::is_valid_type_name(subject_type) {
        return Err(EventError::Subject(format!("invalid type token {subject_type:?}")));
    }
    let (fields, data) = if json {
        split_json(payload)?
    } else {
        split_msgpack(payload)?
    };
    let event_type = match get(&fields, "type") {
        None | Some(Value::Nil) => subject_type.to_string(),
        Some(v) => match v.as_str() {
            Some(t) if ids::is_valid_type_name(t) => t.to_string(),
            _ => return Err(EventError::Field("type must be a valid type name".into())),
        },
    };
    let id = match get(&fields, "id") {
        None | Some(Value::Nil) => None,
        Some(Value::String(s)) => match s.as_str() {
            Some(s) if !s.is_empty() && s.len() <= MAX_ID_LEN => Some(s.to_string()),
            _ => {
                return Err(EventError::Field(
                    "id must be a non-empty string of at most 256 bytes".into(),
                ))
            }
        },
        Some(Value::Integer(i)) => Some(i.to_string()),
        Some(_) => return Err(EventError::Field("id must be a string or integer".into())),
    };
    let prio = match get(&fields, "prio") {
        None | Some(Value::Nil) => Prio::Normal,
        Some(v) => v
            .as_str()
            .and_then(Prio::parse)
            .ok_or_else(|| EventError::Field("prio must be low, normal, high or critical".into()))?,
    };
    let key = match get(&fields, "key") {
        None | Some(Value::Nil) => subject_key.map(str::to_string),
        Some(v) => match v.as_str() {
            Some(k) if !k.is_empty() && k.len() <= MAX_ID_LEN => Some(k.to_string()),
            _ => {
                return Err(EventError::Field(
                    "key must be a non-empty string of at most 256 bytes".into(),
                ))
            }
        },
    };
    let durable = match get(&fields, "durable") {
        None | Some(Value::Nil) => true,
        Some(Value::Boolean(b)) => *b,
        Some(_) => return Err(EventError::Field("durable must be a boolean".into())),
    };
    let target = parse_target(get(&fields, "target"), &event_type)?;
    Ok(ProducerEvent {
        event_type,
        data,
        id,
        target,
        prio,
        key,
        durable,
    })
}

fn parse_target(v: Option<&Value>, event_type: &str) -> Result<Target, EventError> {
    let bad = |m: &str| EventError::Target(m.to_string());
    let Some(Value::Map(t)) = v else {
        return Err(bad("target must be a map"));
    };
    let kinds = ["users", "room", "all", "match"]
        .iter()
        .filter(|k| get(t, k).is_some())
        .count();
    if kinds != 1 {
        return Err(bad("target needs exactly one of users, room, all, match"));
    }
    if let Some(users) = get(t, "users") {
        let Value::Array(list) = users else {
            return Err(bad("users must be an array"));
        };
        if list.is_empty() || list.len() > MAX_TARGET_USERS {
            return Err(bad("users must list 1 to 10000 user ids"));
        }
        let mut out = Vec::with_capacity(list.len());
        for u in list {
            match u.as_str() {
                Some(s) if ids::is_valid_user_id(s) => out.push(s.to_string()),
                _ => return Err(bad("users must be valid user ids")),
            }
        }
        out.sort_unstable();
        out.dedup();
        return Ok(Target::Users(out));
    }
    if let Some(room) = get(t, "room") {
        return match room.as_str() {
            Some(r) if ids::is_valid_room(r) => Ok(Target::Room(r.to_string())),
            _ => Err(bad("room must be a valid room name")),
        };
    }
    if let Some(all) = get(t, "all") {
        return match all {
            Value::Boolean(true) => Ok(Target::All),
            _ => Err(bad("all must be true")),
        };
    }
    let Some(Value::Map(m)) = get(t, "match") else {
        return Err(bad("match must be a map"));
    };
    let sub_type = match get(t, "type") {
        None | Some(Value::Nil) => event_type.to_string(),
        Some(v) => match v.as_str() {
            Some(s) if ids::is_valid_type_name(s) => s.to_string(),
            _ => return Err(bad("target type must be a valid type name")),
        },
    };
    let mut dimensions = Vec::with_capacity(m.len());
    for (k, v) in m {
        match (k.as_str(), v.as_str()) {
            (Some(d), Some(val)) if ids::is_valid_type_name(d) && ids::is_valid_value(val) => {
                if dimensions.iter().any(|(x, _): &(String, String)| x == d) {
                    return Err(bad("duplicate match dimension"));
                }
                dimensions.push((d.to_string(), val.to_string()));
            }
            _ => return Err(bad("match must map dimension names to strings of at most 64 bytes")),
        }
    }
    let mut values = Vec::new();
    match get(t, "values") {
        None | Some(Value::Nil) => {}
        Some(Value::Map(vals)) => {
            for (k, v) in vals {
                match (k.as_str(), as_number(v)) {
                    (Some(f), Some(n)) if ids::is_valid_type_name(f) && !n.is_nan() => values.push((f.to_string(), n)),
                    _ => return Err(bad("values must map field names to numbers")),
                }
            }
        }
        Some(_) => return Err(bad("values must be a map")),
    }
    Ok(Target::Match {
        sub_type,
        dimensions,
        values,
    })
}

/// The MessagePack `nil`, used when an event carries no `data`.
const NIL: &[u8] = &[0xc0];

/// A transcoding error as an event error (nesting keeps its kind).
fn measure_error(e: transcode::TranscodeError) -> EventError {
    match e {
        transcode::TranscodeError::TooDeep => EventError::TooDeep,
        e => EventError::Decode(DecodeProblem::Transcode(e)),
    }
}

fn split_msgpack(payload: &Bytes) -> Result<(Vec<(Value, Value)>, Bytes), EventError> {
    let dec = |m: &'static str| EventError::Decode(DecodeProblem::Shape(m));
    let bad_value = |e: rmpv::decode::Error| EventError::Decode(DecodeProblem::MsgPack(e));
    let mut rd: &[u8] = payload;
    let n = rmp::decode::read_map_len(&mut rd).map_err(|_| dec("event must be a MessagePack map"))?;
    let mut fields = Vec::with_capacity(n.min(16) as usize);
    let mut data = Bytes::from_static(NIL);
    for _ in 0..n {
        let key_len = transcode::value_len(rd).map_err(measure_error)?;
        let key = rmpv::decode::read_value(&mut &rd[..key_len]).map_err(bad_value)?;
        rd = &rd[key_len..];
        // Measuring `data` also checks its depth (docs/PROTOCOL.md, "Event fields":
        // deeper than 64 levels is malformed), so it is refused here rather than
        // failing later on the way to a JSON client.
        let val_len = transcode::value_len(rd).map_err(measure_error)?;
        if key.as_str() == Some("data") {
            let start = payload.len() - rd.len();
            data = payload.slice(start..start + val_len);
        } else {
            let v = rmpv::decode::read_value_with_max_depth(&mut &rd[..val_len], MAX_DEPTH).map_err(bad_value)?;
            fields.push((key, v));
        }
        rd = &rd[val_len..];
    }
    if !rd.is_empty() {
        return Err(dec("trailing bytes after the event map"));
    }
    Ok((fields, data))
}

fn split_json(payload: &[u8]) -> Result<(Vec<(Value, Value)>, Bytes), EventError> {
    // One streaming pass: every member becomes MessagePack by the same rules
    // (`-0` is the integer 0, as written; depth checked), `data` is kept as
    // those bytes and the other fields are decoded from theirs. A repeated
    // field counts once, the last one written (as a JSON object parser would).
    let mut fields: Vec<(Value, Value)> = Vec::new();
    let mut data = Bytes::from_static(NIL);
    let mut bad: Option<EventError> = None;
    transcode::json_members_to_msgpack(payload, &mut |key, value| {
        if key == "data" {
            data = Bytes::from(std::mem::take(value));
            return;
        }
        match rmpv::decode::read_value_with_max_depth(&mut &value[..], MAX_DEPTH) {
            Ok(v) => match fields.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
                Some(slot) => slot.1 = v,
                None => fields.push((Value::from(key), v)),
            },
            Err(e) => {
                bad.get_or_insert_with(|| {
                    EventError::Decode(DecodeProblem::Field {
                        key: key.to_string(),
                        source: e,
                    })
                });
            }
        }
    })
    .map_err(|e| match e {
        e @ transcode::TranscodeError::Json(_) => EventError::Decode(DecodeProblem::NotJsonObject(e)),
        e => measure_error(e),
    })?;
    match bad {
        Some(e) => Err(e),
        None => Ok((fields, data)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mp(v: &serde_json::Value) -> Bytes {
        let mut out = Vec::new();
        transcode::json_to_msgpack(v, &mut out);
        Bytes::from(out)
    }

    #[test]
    fn msgpack_data_is_passed_through_byte_for_byte() {
        // {"target":{"all":true},"data":<bin 3 bytes>} written by hand.
        let mut buf = vec![0x82, 0xa6];
        buf.extend_from_slice(b"target");
        buf.extend_from_slice(&[0x81, 0xa3, b'a', b'l', b'l', 0xc3, 0xa4]);
        buf.extend_from_slice(b"data");
        let data = [0xc4, 0x03, 1, 2, 3];
        buf.extend_from_slice(&data);
        let ev = parse_event("tick", Some("AAPL"), &Bytes::from(buf), false).unwrap();
        assert_eq!(&ev.data[..], &data);
        assert_eq!(ev.target, Target::All);
        assert_eq!(ev.key.as_deref(), Some("AAPL"));
        assert_eq!(ev.event_type, "tick");
        assert!(ev.durable);
        assert_eq!(ev.prio, Prio::Normal);
    }

    #[test]
    fn json_event_with_match_target() {
        let payload = br#"{"type":"tier_patterns","data":{"p":1},"id":"e1","prio":"high","durable":false,
            "target":{"match":{"symbol":"AAPL","tier":"daily"},"values":{"confidence":0.8}}}"#;
        let ev = parse_event("patterns", None, &Bytes::from_static(payload), true).unwrap();
        assert_eq!(ev.event_type, "tier_patterns");
        assert_eq!(&ev.data[..], &[0x81, 0xa1, b'p', 0x01]);
        assert_eq!(ev.id.as_deref(), Some("e1"));
        assert_eq!(ev.prio, Prio::High);
        assert!(!ev.durable);
        let Target::Match {
            sub_type,
            dimensions,
            values,
        } = ev.target
        else {
            panic!()
        };
        assert_eq!(sub_type, "tier_patterns");
        assert_eq!(dimensions.len(), 2);
        assert_eq!(values, vec![("confidence".to_string(), 0.8)]);
    }

    #[test]
    fn malformed_events() {
        let cases = [
            json!({"data":1}),
            json!({"target":{}}),
            json!({"target":{"users":["a.b"]}}),
            json!({"target":{"users":["ok"],"all":true}}),
            json!({"target":{"all":false}}),
            json!({"target":{"room":"a b"}}),
            json!({"target":{"match":{"symbol":1}}}),
            json!({"target":{"match":{"symbol":"x".repeat(65)}}}),
            json!({"target":{"match":{"s":"a"},"values":{"c":"high"}}}),
            json!({"target":{"all":true},"prio":"urgent"}),
            json!({"target":{"all":true},"durable":"yes"}),
            json!({"target":{"all":true},"type":"Bad"}),
            json!([1, 2]),
        ];
        for c in &cases {
            assert!(parse_event("t", None, &mp(c), false).is_err(), "{c} accepted");
        }
        assert!(parse_event("Bad", None, &mp(&json!({"target":{"all":true}})), false).is_err());
        assert!(parse_event("t", None, &Bytes::from_static(&[0x82, 0xa1]), false).is_err());
        assert!(parse_event("t", None, &Bytes::from_static(b"{"), true).is_err());
    }

    #[test]
    fn json_minus_zero_is_the_integer_zero() {
        let payload = br#"{"target":{"all":true},"data":{"a":-0,"b":-0.0,"c":[-0]}}"#;
        let ev = parse_event("t", None, &Bytes::from_static(payload), true).unwrap();
        let mut expected = vec![0x83, 0xa1, b'a', 0x00, 0xa1, b'b', 0xcb];
        expected.extend_from_slice(&(-0.0f64).to_bits().to_be_bytes());
        expected.extend_from_slice(&[0xa1, b'c', 0x91, 0x00]);
        assert_eq!(&ev.data[..], &expected[..]);
        let ev = parse_event(
            "t",
            None,
            &Bytes::from_static(br#"{"target":{"all":true},"data":-0}"#),
            true,
        )
        .unwrap();
        assert_eq!(&ev.data[..], &[0x00]);
    }

    #[test]
    fn json_events_read_in_one_pass() {
        let parse = |text: &'static str| parse_event("t", None, &Bytes::from_static(text.as_bytes()), true);
        // A repeated field counts once, the last one written.
        let ev = parse(r#"{"data":1,"target":{"users":["a"]},"prio":"low","prio":"high","data":[2]}"#).unwrap();
        assert_eq!(ev.prio, Prio::High);
        assert_eq!(&ev.data[..], &[0x91, 0x02]);
        assert_eq!(ev.target, Target::Users(vec!["a".into()]));
        // Numbers in other fields follow the same rules.
        let ev = parse(r#"{"target":{"match":{"s":"x"},"values":{"c":-0,"d":1e2}},"id":-0}"#).unwrap();
        assert_eq!(ev.id.as_deref(), Some("0"));
        let Target::Match { values, .. } = ev.target else {
            panic!()
        };
        assert_eq!(values, vec![("c".to_string(), 0.0), ("d".to_string(), 100.0)]);
        for bad in [
            r#"[1]"#,
            r#""x""#,
            r#"{"target":{"all":true}} 1"#,
            r#"{"target":{"all":true},"#,
            "",
        ] {
            assert!(matches!(parse(bad), Err(EventError::Decode(_))), "{bad}");
        }
        // Serde's private marker key is an ordinary key here.
        let ev = parse(r#"{"target":{"all":true},"data":{"$serde_json::private::RawValue":1}}"#).unwrap();
        assert_eq!(ev.data.len(), 33);
    }

    /// `{"target":{"all":true},"data":<levels nested arrays>}` in MessagePack.
    fn msgpack_nested(levels: usize) -> Bytes {
        let mut buf = vec![0x82, 0xa6];
        buf.extend_from_slice(b"target");
        buf.extend_from_slice(&[0x81, 0xa3, b'a', b'l', b'l', 0xc3, 0xa4]);
        buf.extend_from_slice(b"data");
        buf.resize(buf.len() + levels - 1, 0x91);
        buf.push(0x80);
        Bytes::from(buf)
    }

    /// The same in JSON, `levels` containers alternating objects and arrays.
    fn json_nested(levels: usize) -> Bytes {
        // Level i (from 0) is an object when i is even; the last is empty.
        let mut text = String::from(if levels % 2 == 1 { "{}" } else { "[]" });
        for i in (0..levels - 1).rev() {
            text = if i % 2 == 1 {
                format!("[{text}]")
            } else {
                format!(r#"{{"k":{text}}}"#)
            };
        }
        Bytes::from(format!(r#"{{"target":{{"all":true}},"data":{text}}}"#))
    }

    #[test]
    fn data_nested_deeper_than_64_levels_is_malformed() {
        for levels in [1, 2, 63, 64] {
            let ev = parse_event("t", None, &msgpack_nested(levels), false).unwrap();
            assert_eq!(transcode::value_len(&ev.data), Ok(levels));
            let ev = parse_event("t", None, &json_nested(levels), true).unwrap();
            assert_eq!(transcode::value_len(&ev.data).map(|_| ()), Ok(()), "{levels}");
            let mut json = Vec::new();
            assert!(transcode::msgpack_to_json(&ev.data, &mut json).is_ok());
            let depth = json.iter().filter(|&&b| b == b'{' || b == b'[').count();
            assert_eq!(depth, levels, "json depth");
        }
        for levels in [65, 66, 200] {
            let e = parse_event("t", None, &msgpack_nested(levels), false).unwrap_err();
            assert!(matches!(e, EventError::TooDeep), "{e:?}");
            assert_eq!(e.reason(), "too_deep");
            let e = parse_event("t", None, &json_nested(levels), true).unwrap_err();
            if levels < 128 {
                assert!(matches!(e, EventError::TooDeep), "{levels}: {e:?}");
            } else {
                // serde_json's own limit (128) answers first for the whole text.
                assert!(matches!(e, EventError::TooDeep | EventError::Decode(_)), "{e:?}");
            }
        }
    }

    #[test]
    fn content_type() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(!is_json_content_type("application/msgpack"));
    }
}
