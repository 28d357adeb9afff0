//! Client ↔ edge frames: decoding what clients send, encoding control frames
//! the edge sends back.
//!
//! Decoding is strict about what the protocol requires (`op`, `id`, required
//! fields) and lenient about the rest (unknown fields are ignored). Semantic
//! validation of names and filters belongs to the router ([`crate::subscription`]);
//! this module only checks that a frame is well formed. Event and batch
//! frames are built from delivery bytes in [`crate::delivery`], not here.

use rmpv::Value;
use serde::Serialize;

use crate::subscription::{RawSubscription, Subscription};
use crate::value::{self, get};
use crate::{transcode, Encoding, ErrorCode};

/// One decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    /// The client's request id, echoed in the reply.
    pub id: Option<u32>,
    /// What the client asks for.
    pub op: ClientOp,
}

/// Where a client asks to resume from (`epoch` + `since`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The log incarnation the client's `since` refers to.
    pub epoch: String,
    /// The largest `pos` the client has seen (0: everything the log holds).
    pub since: u64,
}

/// The operations a client may send.
#[derive(Debug, Clone, PartialEq)]
// One per client op, never stored in bulk: boxing the subscription would
// save nothing that matters and cost an allocation per op.
#[allow(clippy::large_enum_variant)]
pub enum ClientOp {
    /// Authenticate (first frame) or refresh the token (later).
    Auth {
        /// The JWT.
        token: String,
        /// Resume point, when the client asks to resume.
        resume: Option<Resume>,
    },
    /// Create or replace a named subscription.
    Subscribe(RawSubscription),
    /// Remove a named subscription (the name is validated by the router).
    Unsubscribe {
        /// Subscription name as sent.
        sub: Value,
    },
    /// List the user's subscriptions.
    List,
    /// Join a room.
    Join {
        /// Room name as sent.
        room: Value,
    },
    /// Leave a room.
    Leave {
        /// Room name as sent.
        room: Value,
    },
    /// Application-level ping.
    Ping,
    /// Application RPC.
    Rpc {
        /// Method name (validated).
        method: String,
        /// Arbitrary payload passed to the application.
        data: Value,
    },
}

impl ClientOp {
    /// The op name, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            ClientOp::Auth { .. } => "auth",
            ClientOp::Subscribe(_) => "subscribe",
            ClientOp::Unsubscribe { .. } => "unsubscribe",
            ClientOp::List => "list",
            ClientOp::Join { .. } => "join",
            ClientOp::Leave { .. } => "leave",
            ClientOp::Ping => "ping",
            ClientOp::Rpc { .. } => "rpc",
        }
    }
}

/// A frame that could not be accepted, with what the `error` reply needs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    /// The frame's `id` when one could be read.
    pub id: Option<u32>,
    /// Protocol error code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// What was wrong, for callers that treat kinds differently (an edge
    /// answers a bad resume point in an `auth` frame with `bad_frame`, any
    /// other undecodable `auth` frame with `unauthorized`).
    pub kind: FrameErrorKind,
}

/// The kind of a [`FrameError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrameErrorKind {
    /// Not a frame, or a field that is missing, mistyped or invalid.
    #[default]
    Invalid,
    /// The resume point (`epoch`, `since`) is wrong: [`ResumeError`].
    BadResume,
}

impl FrameError {
    fn bad(id: Option<u32>, message: impl Into<String>) -> FrameError {
        FrameError {
            id,
            code: ErrorCode::BadFrame,
            message: message.into(),
            kind: FrameErrorKind::Invalid,
        }
    }

    /// Whether the frame was refused for its resume point.
    pub fn is_bad_resume(&self) -> bool {
        self.kind == FrameErrorKind::BadResume
    }
}

/// Decodes one client frame received on a connection speaking `enc`.
pub fn decode_client_frame(enc: Encoding, buf: &[u8]) -> Result<ClientFrame, FrameError> {
    let root = value::decode(enc, buf).map_err(|e| FrameError::bad(None, e.to_string()))?;
    let Value::Map(map) = root else {
        return Err(FrameError::bad(None, "a frame must be a map"));
    };
    let id = match get(&map, "id") {
        None | Some(Value::Nil) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Some(n),
            None => return Err(FrameError::bad(None, "id must be an unsigned 32-bit integer")),
        },
    };
    let op = match get(&map, "op") {
        Some(Value::String(s)) => s.as_str().unwrap_or(""),
        Some(_) => return Err(FrameError::bad(id, "op must be a string")),
        None => return Err(FrameError::bad(id, "missing op")),
    };
    let required = |field: &str| -> Result<Value, FrameError> {
        match get(&map, field) {
            None | Some(Value::Nil) => Err(FrameError::bad(id, format!("missing {field}"))),
            Some(v) => Ok(v.clone()),
        }
    };
    let optional = |field: &str| -> Option<Value> {
        match get(&map, field) {
            None | Some(Value::Nil) => None,
            Some(v) => Some(v.clone()),
        }
    };
    let op = match op {
        "auth" => {
            let token = match required("token")? {
                Value::String(s) if s.as_str().is_some() => s.into_str().unwrap_or_default(),
                _ => return Err(FrameError::bad(id, "token must be a string")),
            };
            let resume = parse_resume(optional("epoch"), optional("since")).map_err(|e| FrameError {
                kind: FrameErrorKind::BadResume,
                ..FrameError::bad(id, e.to_string())
            })?;
            ClientOp::Auth { token, resume }
        }
        "subscribe" => ClientOp::Subscribe(RawSubscription {
            sub: required("sub")?,
            sub_type: required("type")?,
            filters: optional("filters"),
            min: optional("min"),
            max: optional("max"),
            fields: optional("fields"),
            throttle_ms: optional("throttle_ms"),
            snapshot: optional("snapshot"),
        }),
        "unsubscribe" => ClientOp::Unsubscribe { sub: required("sub")? },
        "list" => ClientOp::List,
        "join" => ClientOp::Join {
            room: required("room")?,
        },
        "leave" => ClientOp::Leave {
            room: required("room")?,
        },
        "ping" => ClientOp::Ping,
        "rpc" => {
            let method = match required("method")? {
                Value::String(s) => s.into_str().unwrap_or_default(),
                _ => return Err(FrameError::bad(id, "method must be a string")),
            };
            if !crate::ids::is_valid_method(&method) {
                return Err(FrameError {
                    id,
                    code: ErrorCode::InvalidFilter,
                    message: "invalid rpc method name".into(),
                    kind: FrameErrorKind::Invalid,
                });
            }
            ClientOp::Rpc {
                method,
                data: optional("data").unwrap_or(Value::Nil),
            }
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(FrameError::bad(id, format!("unknown op {shown:?}")));
        }
    };
    Ok(ClientFrame { id, op })
}

/// Every resume-point error message starts with this. Match on
/// [`FrameErrorKind::BadResume`] (or [`ResumeError`]) rather than on the text.
pub const RESUME_ERROR_PREFIX: &str = "resume: ";

/// Why a resume point was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// `since` without `epoch`.
    #[error("resume: since without epoch")]
    SinceWithoutEpoch,
    /// `epoch` is not a string.
    #[error("resume: epoch must be a string")]
    EpochNotString,
    /// `since` is not an unsigned integer.
    #[error("resume: since must be an unsigned integer")]
    SinceNotUnsigned,
}

/// Interprets the resume fields of an upgrade URL or `auth` frame.
/// `epoch` alone means `since: 0`; `since` alone, or a `since` that is not an
/// unsigned integer, is refused.
pub fn parse_resume(epoch: Option<Value>, since: Option<Value>) -> Result<Option<Resume>, ResumeError> {
    match (epoch, since) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ResumeError::SinceWithoutEpoch),
        (Some(e), since) => {
            let epoch = match e {
                Value::String(s) => s.into_str().ok_or(ResumeError::EpochNotString)?,
                _ => return Err(ResumeError::EpochNotString),
            };
            let since = match since {
                None => 0,
                Some(v) => v.as_u64().ok_or(ResumeError::SinceNotUnsigned)?,
            };
            Ok(Some(Resume { epoch, since }))
        }
    }
}

/// Per-connection limits announced in `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Largest client frame accepted, in bytes.
    pub max_frame_bytes: u64,
    /// Most subscriptions one user may hold.
    pub max_subscriptions: u64,
    /// Sustained events per second on this connection.
    pub rate_per_s: u64,
    /// Token-bucket burst.
    pub burst: u64,
    /// Most events in one `batch` frame.
    pub batch_max_events: u64,
    /// Largest `batch` frame, in bytes.
    pub batch_max_bytes: u64,
}

/// The control frames the edge sends (everything but `event` and `batch`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// Authentication succeeded; the connection is live.
    Ready {
        /// Id of the `auth` frame, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// This connection's id.
        conn: &'a str,
        /// The authenticated user (`sub`).
        user: &'a str,
        /// The delivery log's incarnation.
        epoch: &'a str,
        /// Live events after this position follow.
        pos: u64,
        /// Unix milliseconds on the server.
        server_time: u64,
        /// WebSocket ping interval.
        heartbeat_ms: u64,
        /// Limits of this connection.
        limits: Limits,
    },
    /// A request succeeded.
    Ok {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
    },
    /// A request failed.
    Error {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// Protocol error code (or an application's own code, for rpc).
        code: &'a str,
        /// Human-readable reason.
        message: &'a str,
    },
    /// Reply to `list`.
    Subs {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// The user's subscriptions.
        subs: &'a [Subscription],
    },
    /// Reply to `ping`.
    Pong {
        /// Echoed request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// Unix milliseconds on the server.
        server_time: u64,
    },
    /// Events this connection did not get since the last notice of `reason`.
    Dropped {
        /// How many.
        count: u64,
        /// `rate_limited` or `slow_consumer`.
        reason: &'a str,
    },
    /// The node is draining: reconnect after the delay.
    Reconnect {
        /// Delay before reconnecting.
        after_ms: u64,
        /// Why.
        reason: &'a str,
    },
    /// End of a resume replay.
    Resumed {
        /// Whether nothing after `since` was lost.
        recovered: bool,
        /// How many events were replayed.
        replayed: u64,
    },
}

/// Encodes a control frame for a connection speaking `enc`.
///
/// JSON is produced by transcoding the MessagePack form, so both encodings
/// follow one set of rules.
pub fn encode_server_frame(enc: Encoding, frame: &ServerFrame<'_>, out: &mut Vec<u8>) {
    match enc {
        Encoding::MsgPack => {
            // Serializing plain structs into a Vec cannot fail.
            rmp_serde::encode::write_named(out, frame).expect("control frame encodes");
        }
        Encoding::Json => {
            let mp = rmp_serde::to_vec_named(frame).expect("control frame encodes");
            transcode::msgpack_to_json(&mp, out).expect("own MessagePack transcodes");
        }
    }
}

/// Encodes an `rpc_result` frame around the application's MessagePack `data` bytes.
pub fn encode_rpc_result(enc: Encoding, id: Option<u32>, data: &[u8], out: &mut Vec<u8>) {
    let mut mp = Vec::with_capacity(data.len() + 24);
    let n = if id.is_some() { 3 } else { 2 };
    rmp::encode::write_map_len(&mut mp, n).expect("vec write");
    rmp::encode::write_str(&mut mp, "op").expect("vec write");
    rmp::encode::write_str(&mut mp, "rpc_result").expect("vec write");
    if let Some(id) = id {
        rmp::encode::write_str(&mut mp, "id").expect("vec write");
        rmp::encode::write_uint(&mut mp, u64::from(id)).expect("vec write");
    }
    rmp::encode::write_str(&mut mp, "data").expect("vec write");
    mp.extend_from_slice(data);
    match enc {
        Encoding::MsgPack => out.extend_from_slice(&mp),
        Encoding::Json => {
            if transcode::msgpack_to_json(&mp, out).is_err() {
                out.clear();
                encode_server_frame(
                    enc,
                    &ServerFrame::Error {
                        id,
                        code: ErrorCode::Internal.as_str(),
                        message: "application reply is not valid MessagePack",
                    },
                    out,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(v: serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        transcode::json_to_msgpack(&v, &mut out);
        out
    }

    #[test]
    fn golden_msgpack_ping() {
        // {"op":"ping","id":7}
        let bytes = [
            0x82, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g', 0xa2, b'i', b'd', 0x07,
        ];
        let f = decode_client_frame(Encoding::MsgPack, &bytes).unwrap();
        assert_eq!(
            f,
            ClientFrame {
                id: Some(7),
                op: ClientOp::Ping
            }
        );
    }

    #[test]
    fn golden_json_subscribe() {
        let f = decode_client_frame(
            Encoding::Json,
            br#"{"op":"subscribe","id":3,"sub":"s1","type":"tick","filters":{"symbol":["AAPL"]},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(f.id, Some(3));
        let ClientOp::Subscribe(raw) = f.op else {
            panic!("not subscribe")
        };
        assert_eq!(raw.sub.as_str(), Some("s1"));
        assert_eq!(raw.sub_type.as_str(), Some("tick"));
        assert!(raw.min.is_none());
    }

    #[test]
    fn golden_server_frames() {
        let mut out = Vec::new();
        encode_server_frame(Encoding::MsgPack, &ServerFrame::Ok { id: Some(5) }, &mut out);
        assert_eq!(out, [0x82, 0xa2, b'o', b'p', 0xa2, b'o', b'k', 0xa2, b'i', b'd', 0x05]);
        out.clear();
        encode_server_frame(
            Encoding::MsgPack,
            &ServerFrame::Pong {
                id: None,
                server_time: 1,
            },
            &mut out,
        );
        let mut expected = vec![0x82, 0xa2, b'o', b'p', 0xa4, b'p', b'o', b'n', b'g', 0xab];
        expected.extend_from_slice(b"server_time");
        expected.push(0x01);
        assert_eq!(out, expected);
        out.clear();
        encode_server_frame(
            Encoding::Json,
            &ServerFrame::Error {
                id: Some(9),
                code: ErrorCode::BadFrame.as_str(),
                message: "x",
            },
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"op":"error","id":9,"code":"bad_frame","message":"x"}"#
        );
        out.clear();
        encode_server_frame(
            Encoding::Json,
            &ServerFrame::Dropped {
                count: 3,
                reason: "rate_limited",
            },
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"op":"dropped","count":3,"reason":"rate_limited"}"#
        );
    }

    #[test]
    fn bad_ids_are_not_echoed() {
        for id in [
            serde_json::json!(-1),
            serde_json::json!(4294967296u64),
            serde_json::json!("7"),
            serde_json::json!(1.5),
        ] {
            let e = decode_client_frame(Encoding::MsgPack, &mp(serde_json::json!({"op":"ping","id":id}))).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadFrame);
            assert_eq!(e.id, None);
        }
    }

    #[test]
    fn errors_keep_the_id_when_readable() {
        let e = decode_client_frame(Encoding::Json, br#"{"op":"nope","id":4}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadFrame));
        let e = decode_client_frame(Encoding::Json, br#"{"op":"subscribe","id":4,"type":"t"}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadFrame));
        assert!(decode_client_frame(Encoding::Json, b"[1,2]").is_err());
        assert!(decode_client_frame(Encoding::Json, b"{").is_err());
        assert!(decode_client_frame(Encoding::MsgPack, &[0xc1]).is_err());
        assert!(decode_client_frame(Encoding::MsgPack, &[0x91; 10_000]).is_err());
    }

    #[test]
    fn auth_resume_fields() {
        let f = decode_client_frame(Encoding::Json, br#"{"op":"auth","token":"t","epoch":"e1","since":42}"#).unwrap();
        assert_eq!(
            f.op,
            ClientOp::Auth {
                token: "t".into(),
                resume: Some(Resume {
                    epoch: "e1".into(),
                    since: 42
                })
            }
        );
        let f = decode_client_frame(Encoding::Json, br#"{"op":"auth","token":"t","epoch":"e1"}"#).unwrap();
        assert_eq!(
            f.op,
            ClientOp::Auth {
                token: "t".into(),
                resume: Some(Resume {
                    epoch: "e1".into(),
                    since: 0
                })
            }
        );
        for (bad, why) in [
            (
                &br#"{"op":"auth","token":"t","since":1}"#[..],
                ResumeError::SinceWithoutEpoch,
            ),
            (
                br#"{"op":"auth","token":"t","epoch":"e","since":-1}"#,
                ResumeError::SinceNotUnsigned,
            ),
            (br#"{"op":"auth","token":"t","epoch":7}"#, ResumeError::EpochNotString),
        ] {
            let e = decode_client_frame(Encoding::Json, bad).unwrap_err();
            assert_eq!(e.kind, FrameErrorKind::BadResume);
            assert!(e.is_bad_resume());
            assert_eq!(e.message, why.to_string());
            assert!(e.message.starts_with(RESUME_ERROR_PREFIX));
        }
        let e = decode_client_frame(Encoding::Json, br#"{"op":"auth"}"#).unwrap_err();
        assert_eq!(
            e.kind,
            FrameErrorKind::Invalid,
            "a missing token is not a resume problem"
        );
    }
}
