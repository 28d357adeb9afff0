//! The application API (docs/PROTOCOL.md, "Application API over NATS"):
//! requests on `<prefix>.api.<method>`, and their replies.
//!
//! Back ends are trusted, but their requests are still untrusted input:
//! every field is checked here, once, into an [`ApiRequest`], so the router
//! acts only on well-formed requests and every refusal names the field.
//! Requests and replies are MessagePack maps, or JSON when the request
//! said `Content-Type: application/json`; the reply uses the request's
//! encoding.

use rmpv::Value;
use serde::Serialize;

use crate::subscription::RawSubscription;
use crate::value::{self, DecodeError};
use crate::{ids, Encoding};

/// Most users one `presence` request may ask about.
pub const MAX_PRESENCE_USERS: usize = 1000;
/// Default and largest `limit` of `room_presence`.
pub const ROOM_PRESENCE_LIMIT: (u64, u64) = (1000, 10_000);
/// Longest `reason` (disconnect) and `jti` (revoke), in bytes.
pub const MAX_TEXT_BYTES: usize = 128;

/// The error codes of the API (a subset shared with the client ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiCode {
    /// A field is missing, has the wrong type, or breaks a naming rule.
    BadRequest,
    /// Could not be done in time; safe to retry.
    Unavailable,
    /// A server-side failure.
    Internal,
    /// What the client op would refuse (`subscribe`, `join`).
    InvalidFilter,
    /// The user already has the maximum number of subscriptions.
    TooManySubscriptions,
    /// The user is already in the maximum number of rooms.
    TooManyRooms,
}

impl ApiCode {
    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiCode::BadRequest => "bad_request",
            ApiCode::Unavailable => "unavailable",
            ApiCode::Internal => "internal",
            ApiCode::InvalidFilter => "invalid_filter",
            ApiCode::TooManySubscriptions => "too_many_subscriptions",
            ApiCode::TooManyRooms => "too_many_rooms",
        }
    }
}

/// A refused or failed API request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    /// What kind of failure.
    pub code: ApiCode,
    /// Human-readable reason.
    pub message: String,
}

impl ApiError {
    /// A `bad_request` error.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            code: ApiCode::BadRequest,
            message: message.into(),
        }
    }

    /// An `unavailable` error.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            code: ApiCode::Unavailable,
            message: message.into(),
        }
    }
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// Every token of `user` issued (`iat`) before `before` (unix s).
    User {
        /// The user id.
        user: String,
        /// Unix seconds.
        before: u64,
    },
    /// The token with this `jti`, until `until` (unix s).
    Token {
        /// The token id.
        jti: String,
        /// Unix seconds.
        until: u64,
    },
}

/// A checked API request.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// Close every connection of a user (4003).
    Disconnect {
        /// The user id.
        user: String,
        /// Send `reconnect` (after_ms 0) before the close.
        reconnect: bool,
        /// Given to the client in the `reconnect` frame.
        reason: Option<String>,
    },
    /// Refuse tokens from now on and close the connections using them.
    Revoke(Revocation),
    /// Create or replace a subscription of a user.
    Subscribe {
        /// The user id.
        user: String,
        /// The client op's fields, checked by the router as the client op's are.
        raw: Box<RawSubscription>,
    },
    /// Remove a subscription of a user.
    Unsubscribe {
        /// The user id.
        user: String,
        /// A valid subscription name.
        sub: String,
    },
    /// Add a user to a room.
    Join {
        /// The user id.
        user: String,
        /// A valid room name.
        room: String,
    },
    /// Remove a user from a room.
    Leave {
        /// The user id.
        user: String,
        /// A valid room name.
        room: String,
    },
    /// A user's subscriptions and rooms.
    List {
        /// The user id.
        user: String,
    },
    /// Connection counts of users.
    Presence {
        /// Valid user ids, at most [`MAX_PRESENCE_USERS`].
        users: Vec<String>,
    },
    /// A room's members and which of them are online.
    RoomPresence {
        /// A valid room name.
        room: String,
        /// Most online ids to list.
        limit: usize,
    },
    /// Fleet-wide counts.
    Stats,
}

/// Every method name (the metrics labels).
pub const METHODS: &[&str] = &[
    "disconnect",
    "revoke",
    "subscribe",
    "unsubscribe",
    "join",
    "leave",
    "list",
    "presence",
    "room_presence",
    "stats",
];

/// The encoding a request's `Content-Type` header value asks for.
pub fn encoding_of(content_type: Option<&str>) -> Encoding {
    match content_type {
        Some(t) if crate::event::is_json_content_type(t) => Encoding::Json,
        _ => Encoding::MsgPack,
    }
}

/// Decodes and checks the request `payload` for `method`.
pub fn parse_request(method: &str, enc: Encoding, payload: &[u8]) -> Result<ApiRequest, ApiError> {
    let body = if payload.is_empty() {
        Value::Map(Vec::new())
    } else {
        value::decode(enc, payload).map_err(|e: DecodeError| ApiError::bad(format!("undecodable request: {e}")))?
    };
    let Value::Map(map) = body else {
        return Err(ApiError::bad("the request must be a map"));
    };
    let fields = Fields(&map);
    Ok(match method {
        "disconnect" => ApiRequest::Disconnect {
            user: fields.user("user")?,
            reconnect: fields.bool("reconnect")?.unwrap_or(false),
            reason: fields.text("reason")?,
        },
        "revoke" => ApiRequest::Revoke(revocation(&fields)?),
        "subscribe" => ApiRequest::Subscribe {
            user: fields.user("user")?,
            raw: Box::new(RawSubscription {
                sub: fields.required("sub")?.clone(),
                sub_type: fields.required("type")?.clone(),
                filters: fields.optional("filters"),
                min: fields.optional("min"),
                max: fields.optional("max"),
                fields: fields.optional("fields"),
                throttle_ms: fields.optional("throttle_ms"),
                snapshot: fields.optional("snapshot"),
            }),
        },
        "unsubscribe" => ApiRequest::Unsubscribe {
            user: fields.user("user")?,
            sub: fields.name("sub", ids::is_valid_sub_name)?,
        },
        "join" | "leave" => {
            let user = fields.user("user")?;
            let room = fields.name("room", ids::is_valid_room)?;
            if method == "join" {
                ApiRequest::Join { user, room }
            } else {
                ApiRequest::Leave { user, room }
            }
        }
        "list" => ApiRequest::List {
            user: fields.user("user")?,
        },
        "presence" => {
            let Value::Array(list) = fields.required("users")? else {
                return Err(ApiError::bad("users must be an array of user ids"));
            };
            if list.len() > MAX_PRESENCE_USERS {
                return Err(ApiError::bad(format!("at most {MAX_PRESENCE_USERS} users per request")));
            }
            let users = list
                .iter()
                .map(|v| match v.as_str() {
                    Some(u) if ids::is_valid_user_id(u) => Ok(u.to_string()),
                    _ => Err(ApiError::bad("users must be an array of valid user ids")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            ApiRequest::Presence { users }
        }
        "room_presence" => {
            let room = fields.name("room", ids::is_valid_room)?;
            let (default, most) = ROOM_PRESENCE_LIMIT;
            let limit = match fields.get("limit") {
                None => default,
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=most).contains(&n) => n,
                    _ => return Err(ApiError::bad(format!("limit must be an integer from 1 to {most}"))),
                },
            };
            ApiRequest::RoomPresence {
                room,
                limit: limit as usize,
            }
        }
        "stats" => ApiRequest::Stats,
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(ApiError::bad(format!("unknown method {shown:?}")));
        }
    })
}

fn revocation(fields: &Fields<'_>) -> Result<Revocation, ApiError> {
    match (fields.get("user"), fields.get("jti")) {
        (Some(_), None) => Ok(Revocation::User {
            user: fields.user("user")?,
            before: fields.unix_s("before")?,
        }),
        (None, Some(_)) => {
            let jti = fields.text("jti")?.unwrap_or_default();
            if jti.is_empty() {
                return Err(ApiError::bad("jti must be a non-empty string"));
            }
            Ok(Revocation::Token {
                jti,
                until: fields.unix_s("until")?,
            })
        }
        _ => Err(ApiError::bad("give either user and before, or jti and until")),
    }
}

/// Field access with errors that name the field.
struct Fields<'a>(&'a [(Value, Value)]);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        value::get(self.0, name).filter(|v| !v.is_nil())
    }

    fn optional(&self, name: &str) -> Option<Value> {
        self.get(name).cloned()
    }

    fn required(&self, name: &str) -> Result<&'a Value, ApiError> {
        self.get(name)
            .ok_or_else(|| ApiError::bad(format!("missing field {name}")))
    }

    fn user(&self, name: &str) -> Result<String, ApiError> {
        self.name(name, ids::is_valid_user_id)
    }

    fn name(&self, name: &str, valid: fn(&str) -> bool) -> Result<String, ApiError> {
        match self.required(name)?.as_str() {
            Some(s) if valid(s) => Ok(s.to_string()),
            _ => Err(ApiError::bad(format!("{name} is not a valid {name}"))),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::bad(format!("{name} must be a boolean"))),
        }
    }

    fn text(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                Some(s) if s.len() <= MAX_TEXT_BYTES => Ok(Some(s.to_string())),
                _ => Err(ApiError::bad(format!(
                    "{name} must be a string of at most {MAX_TEXT_BYTES} bytes"
                ))),
            },
        }
    }

    fn unix_s(&self, name: &str) -> Result<u64, ApiError> {
        match self.required(name)? {
            v if v.as_u64().is_some() => Ok(v.as_u64().unwrap_or_default()),
            // A JSON back end may send a float; whole seconds are kept.
            Value::F64(f) if f.is_finite() && *f >= 0.0 => Ok(*f as u64),
            _ => Err(ApiError::bad(format!(
                "{name} must be unix seconds (a non-negative number)"
            ))),
        }
    }
}

#[derive(Serialize)]
struct Success<'a, T: Serialize> {
    result: &'a T,
}

#[derive(Serialize)]
struct Failure<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

/// The reply `{"result": result}` in `enc`.
pub fn encode_result<T: Serialize>(enc: Encoding, result: &T) -> Vec<u8> {
    encode(enc, &Success { result })
}

/// The reply `{"error": {"code", "message"}}` in `enc`.
pub fn encode_error(enc: Encoding, error: &ApiError) -> Vec<u8> {
    encode(
        enc,
        &Failure {
            error: ErrorBody {
                code: error.code.as_str(),
                message: &error.message,
            },
        },
    )
}

fn encode<T: Serialize>(enc: Encoding, reply: &T) -> Vec<u8> {
    match enc {
        Encoding::MsgPack => rmp_serde::to_vec_named(reply).expect("API replies encode"),
        Encoding::Json => serde_json::to_vec(reply).expect("API replies encode"),
    }
}

/// `{}`: the result of methods that answer nothing but success.
#[derive(Debug, Serialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgpack(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    fn parse(method: &str, v: serde_json::Value) -> Result<ApiRequest, ApiError> {
        parse_request(method, Encoding::MsgPack, &msgpack(&v))
    }

    #[test]
    fn disconnect_reads_its_fields_and_defaults() {
        assert_eq!(
            parse("disconnect", serde_json::json!({"user": "u1"})).unwrap(),
            ApiRequest::Disconnect {
                user: "u1".into(),
                reconnect: false,
                reason: None
            }
        );
        assert_eq!(
            parse(
                "disconnect",
                serde_json::json!({"user": "u1", "reconnect": true, "reason": "maintenance"})
            )
            .unwrap(),
            ApiRequest::Disconnect {
                user: "u1".into(),
                reconnect: true,
                reason: Some("maintenance".into())
            }
        );
    }

    #[test]
    fn bad_fields_are_bad_requests_naming_the_field() {
        for (method, body, field) in [
            ("disconnect", serde_json::json!({}), "user"),
            ("disconnect", serde_json::json!({"user": "a.b"}), "user"),
            (
                "disconnect",
                serde_json::json!({"user": "u", "reconnect": 1}),
                "reconnect",
            ),
            (
                "disconnect",
                serde_json::json!({"user": "u", "reason": "x".repeat(129)}),
                "reason",
            ),
            ("revoke", serde_json::json!({"user": "u"}), "before"),
            ("revoke", serde_json::json!({"user": "u", "before": -1}), "before"),
            ("revoke", serde_json::json!({"jti": "j", "until": "soon"}), "until"),
            ("revoke", serde_json::json!({"user": "u", "jti": "j"}), "either"),
            (
                "unsubscribe",
                serde_json::json!({"user": "u", "sub": "no spaces"}),
                "sub",
            ),
            ("join", serde_json::json!({"user": "u", "room": ""}), "room"),
            ("presence", serde_json::json!({"users": "u"}), "users"),
            ("presence", serde_json::json!({"users": ["ok", "not ok"]}), "users"),
            ("room_presence", serde_json::json!({"room": "r", "limit": 0}), "limit"),
            (
                "room_presence",
                serde_json::json!({"room": "r", "limit": 10_001}),
                "limit",
            ),
            ("subscribe", serde_json::json!({"user": "u", "sub": "s"}), "type"),
            ("nonsense", serde_json::json!({}), "unknown method"),
        ] {
            let e = parse(method, body).unwrap_err();
            assert_eq!(e.code, ApiCode::BadRequest, "{method}");
            assert!(e.message.contains(field), "{method}: {}", e.message);
        }
        let too_many: Vec<String> = (0..=MAX_PRESENCE_USERS).map(|i| format!("u{i}")).collect();
        assert_eq!(
            parse("presence", serde_json::json!({ "users": too_many }))
                .unwrap_err()
                .code,
            ApiCode::BadRequest
        );
        assert_eq!(
            parse_request("stats", Encoding::MsgPack, &[0xc1]).unwrap_err().code,
            ApiCode::BadRequest
        );
        assert_eq!(
            parse_request("stats", Encoding::MsgPack, &msgpack(&serde_json::json!([1])))
                .unwrap_err()
                .code,
            ApiCode::BadRequest
        );
    }

    #[test]
    fn json_requests_and_empty_bodies_are_read() {
        let r = parse_request("revoke", Encoding::Json, br#"{"jti":"abc","until":1900000000}"#).unwrap();
        assert_eq!(
            r,
            ApiRequest::Revoke(Revocation::Token {
                jti: "abc".into(),
                until: 1_900_000_000
            })
        );
        assert_eq!(parse_request("stats", Encoding::Json, b"").unwrap(), ApiRequest::Stats);
        assert_eq!(
            parse_request("room_presence", Encoding::Json, br#"{"room":"desk:1"}"#).unwrap(),
            ApiRequest::RoomPresence {
                room: "desk:1".into(),
                limit: 1000
            }
        );
    }

    #[test]
    fn replies_take_the_request_encoding() {
        #[derive(Serialize)]
        struct Count {
            connections: u64,
        }
        let json = encode_result(Encoding::Json, &Count { connections: 2 });
        assert_eq!(json, br#"{"result":{"connections":2}}"#);
        let err = encode_error(Encoding::Json, &ApiError::bad("missing field user"));
        assert_eq!(
            err,
            br#"{"error":{"code":"bad_request","message":"missing field user"}}"#.to_vec()
        );
        let mp = encode_result(Encoding::MsgPack, &Empty {});
        let v = rmpv::decode::read_value(&mut &mp[..]).unwrap();
        assert_eq!(v, Value::Map(vec![(Value::from("result"), Value::Map(Vec::new()))]));
    }

    #[test]
    fn content_type_picks_the_encoding() {
        assert_eq!(encoding_of(Some("application/json; charset=utf-8")), Encoding::Json);
        assert_eq!(encoding_of(Some("application/msgpack")), Encoding::MsgPack);
        assert_eq!(encoding_of(None), Encoding::MsgPack);
    }
}
