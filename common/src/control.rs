//! Requests from edges to the router tier, and the router's replies.
//!
//! The user id always comes from the edge's verified token, never from the
//! client frame. Encoded as MessagePack (externally tagged enums) on the
//! `<prefix>.control` subject.

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::subscription::{RawSubscription, Subscription};
use crate::ErrorCode;

/// A subscription or membership change, on behalf of an authenticated user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// The verified user id (JWT `sub`).
    pub user: String,
    /// The token's `rooms` claim, which authorizes `join`.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// The token's `roles` claim, passed to the application's authorization hook.
    #[serde(default)]
    pub roles: Vec<String>,
    /// What to do.
    pub op: ControlOp,
}

/// The operation requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One per client op, never stored in bulk: boxing the subscription would
// save nothing that matters and cost an allocation per op.
#[allow(clippy::large_enum_variant)]
pub enum ControlOp {
    /// Create or replace a subscription.
    Subscribe(RawSubscription),
    /// Remove a subscription.
    Unsubscribe {
        /// Name as sent by the client.
        sub: Value,
    },
    /// List subscriptions.
    List,
    /// Join a room.
    Join {
        /// Room as sent by the client.
        room: Value,
    },
    /// Leave a room.
    Leave {
        /// Room as sent by the client.
        room: Value,
    },
}

/// The router's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlReply {
    /// Applied.
    Ok,
    /// Refused.
    Error {
        /// Protocol error code.
        code: ErrorCode,
        /// Human-readable reason.
        message: String,
    },
    /// The user's subscriptions.
    Subs(Vec<Subscription>),
    /// Applied, and the snapshot the subscribe asked for: delivery bodies
    /// marked `snapshot` (docs/PROTOCOL.md, "Snapshots").
    Snapshot(Vec<serde_bytes::ByteBuf>),
}

/// Encodes a request or reply.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(msg).expect("control messages encode")
}

/// Decodes a request or reply.
pub fn decode<'a, T: Deserialize<'a>>(buf: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let req = ControlRequest {
            user: "u1".into(),
            rooms: vec!["desk:*".into()],
            roles: vec!["agent".into()],
            op: ControlOp::Subscribe(RawSubscription {
                sub: Value::from("s"),
                sub_type: Value::from("tick"),
                filters: Some(Value::Map(vec![(
                    Value::from("symbol"),
                    Value::Array(vec![Value::from("AAPL")]),
                )])),
                min: None,
                max: None,
                fields: None,
                throttle_ms: Some(Value::from(250)),
                snapshot: Some(Value::from(true)),
            }),
        };
        assert_eq!(decode::<ControlRequest>(&encode(&req)).unwrap(), req);
        let rep = ControlReply::Error {
            code: ErrorCode::Forbidden,
            message: "no".into(),
        };
        assert_eq!(decode::<ControlReply>(&encode(&rep)).unwrap(), rep);
        assert_eq!(
            decode::<ControlReply>(&encode(&ControlReply::Ok)).unwrap(),
            ControlReply::Ok
        );
        let snap = ControlReply::Snapshot(vec![serde_bytes::ByteBuf::from(vec![0x80u8, 1, 2])]);
        let bytes = encode(&snap);
        assert!(
            bytes.windows(2).any(|w| w == [0xc4, 3]),
            "bodies travel as MessagePack bin"
        );
        assert_eq!(decode::<ControlReply>(&bytes).unwrap(), snap);
    }
}
