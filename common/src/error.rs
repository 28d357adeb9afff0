//! The protocol's error codes (for `error` frames) and WebSocket close codes.
//!
//! Each layer's error type maps itself onto these; nothing here decides policy.

use serde::{Deserialize, Serialize};

/// An error code carried by an `error` frame (docs/PROTOCOL.md, "Errors and close codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Undecodable frame, unknown op, missing required field, bad `id`.
    BadFrame,
    /// Missing, bad or late token.
    Unauthorized,
    /// The user may not do this (e.g. join a room the token does not allow).
    Forbidden,
    /// A name, value, bound or type that breaks the protocol's rules.
    InvalidFilter,
    /// The user already has the maximum number of subscriptions.
    TooManySubscriptions,
    /// The user is already in the maximum number of rooms (1.1; docs/PROTOCOL.md).
    TooManyRooms,
    /// The request was cut by a rate limit.
    RateLimited,
    /// The token's `exp` passed without a refresh.
    TokenExpired,
    /// A backend (router tier, application) did not answer in time.
    Unavailable,
    /// A server-side failure that is not the client's fault.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the edge uses (docs/PROTOCOL.md, "Errors and close codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Normal closure, in answer to a client's close.
    Normal = 1000,
    /// Node draining; `reconnect` was sent first.
    GoingAway = 1001,
    /// The client broke RFC 6455 (unmasked frame, bad control frame,
    /// reserved bits, unknown opcode, fragments out of order).
    ProtocolError = 1002,
    /// A text message (or close reason) that is not valid UTF-8.
    InvalidPayload = 1007,
    /// Nothing received for two heartbeat intervals.
    HeartbeatTimeout = 4000,
    /// Missing, bad or late token; refresh for another user.
    Unauthorized = 4001,
    /// Disconnected by the application (application API `disconnect`).
    Disconnected = 4003,
    /// Frame over the size limit, bad-frame budget spent, too many connections.
    PolicyViolation = 4008,
    /// Outbound queue stayed full past the deadline.
    SlowConsumer = 4009,
    /// Token expired without refresh.
    TokenExpired = 4010,
}

impl CloseCode {
    /// The numeric code for the close frame.
    pub fn code(self) -> u16 {
        self as u16
    }
}
